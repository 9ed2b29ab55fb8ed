"""The time convention of Lumina-Image 2.0, stated once for the whole code base.

Official convention (spec §1.5, ``transport/path.py`` ICPlan, "Linear" path, velocity prediction):

* ``x0 ~ N(0, I)`` is **noise** and ``x1`` is **data**;
* ``x_t = t * x1 + (1 - t) * x0``, so **t = 0 is pure noise and t = 1 is clean data**;
* the network predicts the velocity ``v(x_t, t) ≈ x1 - x0`` (data minus noise), from the *raw* time
  ``t ∈ [0, 1]`` (not multiplied by 1000);
* sampling integrates ``dx/dt = v`` from t = 0 to t = 1.

Everything in ``flow/`` and ``sampling/`` uses this convention. Code that talks to σ-based tools
(diffusers' ``FlowMatchEulerDiscreteScheduler``, ComfyUI), where ``σ = 1 - t`` and σ = 1 is noise,
converts at the boundary with :func:`sigma_to_t` / :func:`t_to_sigma` and :func:`velocity_to_sigma_flow`
(the model output is negated there). Getting this backwards is the classic bug of third-party
Lumina-2 trainers (spec §9.2: kohya sd-scripts #2201; diffusers' LoRA script shifts toward data).

What the network's output *means* is a separate choice (:data:`PREDICTIONS`): the official models
predict the velocity; ``prediction: data`` (a DEVIATION, opt-in per recipe) has the same network
predict the clean sample ``x1`` and turns it into the velocity with :func:`velocity_from_output`, so
the loss, the samplers, guidance and TeaCache all keep working on velocities.
"""

from __future__ import annotations

import torch

NOISE_T = 0.0  # t at pure noise
DATA_T = 1.0  # t at clean data


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = t * x1 + (1 - t) * x0`` with x0 noise, x1 data; ``t`` is (B,) or broadcastable."""
    t = _expand(t, x1)
    return t * x1 + (1.0 - t) * x0


def velocity_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The flow-matching target ``u_t = x1 - x0`` (data minus noise)."""
    return x1 - x0


# What the network outputs: "velocity" (official, spec §1.5) or "data" (x1-prediction; Li & He 2025,
# "Back to Basics: Let Denoising Generative Models Denoise" (JiT): a small pixel-space model cannot
# reproduce the noise part of v = x1 - x0 patch by patch, but the clean image is simple).
PREDICTIONS = ("velocity", "data")
# JiT's clip of 1 - t in the data -> velocity conversion, so t -> 1 does not divide by zero.
DATA_PREDICTION_MIN_GAP = 0.05


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    return prediction


def velocity_from_output(
    out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor | float,
    prediction: str = "velocity",
    min_gap: float = DATA_PREDICTION_MIN_GAP,
) -> torch.Tensor:
    """The velocity a network output stands for.

    ``velocity``: the output itself. ``data``: the output is an estimate of x1; since
    ``x_t = t x1 + (1 - t) x0`` the velocity ``x1 - x0`` is ``(x1 - x_t) / (1 - t)``, with ``1 - t``
    clipped below at ``min_gap`` (JiT, §3).
    """
    if check_prediction(prediction) == "velocity":
        return out
    gap = (1.0 - _expand(t, x_t)).clamp_min(min_gap)
    return (out - x_t) / gap


def t_to_sigma(t: torch.Tensor | float) -> torch.Tensor | float:
    """Noise level of the σ convention: ``σ = 1 - t`` (σ = 1 is noise)."""
    return 1.0 - t


def sigma_to_t(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """Model time from a σ: ``t = 1 - σ`` (what diffusers' Lumina2Pipeline feeds the transformer)."""
    return 1.0 - sigma


def velocity_to_sigma_flow(v: torch.Tensor) -> torch.Tensor:
    """Our velocity (d x / d t) as the σ-convention flow (d x / d σ) that σ-schedulers step with: ``-v``."""
    return -v


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() >= 1 else t
