"""The rectified-flow training objective of Lumina-Image 2.0 as small pure functions (spec §5).

Time convention (see :mod:`.convention`): t = 0 is noise, t = 1 is data, target = data − noise.
Every function here is unit-tested against hand-derived values in ``tests/test_flow.py``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from lumina_lightning.flow.convention import interpolate, velocity_target

TIMESTEP_SAMPLERS = ("uniform", "lognorm")


# ------------------------------------------------------------------------------------------------
# timesteps
# ------------------------------------------------------------------------------------------------


def sample_timesteps(
    n: int,
    kind: str = "lognorm",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw ``n`` training times in (0, 1).

    ``lognorm``: t = sigmoid(u), u ~ N(mean, std) — logit-normal, the official ``--snr_type lognorm``
    with (0, 1). ``uniform``: t ~ U(0, 1) (the official code default).
    """
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if kind == "lognorm":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    raise ValueError(f"unknown timestep sampler {kind!r}; choose one of {TIMESTEP_SAMPLERS}")


def time_shift(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Shift times toward noise: ``t' = t / (t + s (1 − t))`` (spec §5 and §6.1).

    In the σ = 1 − t convention this is the SD3/FLUX shift ``σ' = s σ / (1 + (s − 1) σ)``. ``s > 1``
    spends more steps/samples near noise; ``s = 1`` is the identity. Used by training (``s = e^mu``)
    and by the samplers' time grids (``s = 6`` by default).
    """
    if shift <= 0:
        raise ValueError(f"time shift must be > 0, got {shift}")
    return t / (t + shift * (1 - t))


def shift_mu(
    seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent ``mu``, linear in the image-token count (spec §5):

    ``mu = 0.5 + (1.15 − 0.5)·(seq_len − 256)/(4096 − 256)``: 0.5 at 256 tokens (256 px with the
    FLUX VAE and patch 2), 1.15 at 4096 tokens (1024 px). The training shift factor is ``e^mu``.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def image_seq_len(resolution: int, downsample: int, patch_size: int) -> int:
    """Image tokens of a square ``resolution`` image: ``(resolution / (downsample · patch))²``."""
    side = resolution // (downsample * patch_size)
    return side * side


def training_shift(resolution: int, downsample: int = 8, patch_size: int = 2) -> float:
    """The official training shift factor ``e^mu`` for a stage resolution (computed once per run)."""
    return math.exp(shift_mu(image_seq_len(resolution, downsample, patch_size)))


def stratified_timesteps(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` fixed mid-points ``(i + 0.5)/n`` of equal bins: a validation loss that does not depend on luck."""
    return (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------


def per_sample_mse(pred: torch.Tensor | list[torch.Tensor], target: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Mean squared error per sample over all non-batch elements -> (B,). Lists may mix sizes."""
    if isinstance(pred, torch.Tensor):
        return (pred.float() - target.float()).square().flatten(1).mean(dim=1)
    return torch.stack([(p.float() - q.float()).square().mean() for p, q in zip(pred, target)])


def flow_matching_loss(
    model: Callable[..., torch.Tensor],
    x1: torch.Tensor,
    t: torch.Tensor,
    *model_args,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample rectified-flow loss ``|v(x_t, t) − (x1 − x0)|²`` at given times -> (B,).

    Args:
        model: callable ``model(x_t, t, *model_args)`` returning the velocity.
        x1: clean latents (B, C, H, W) (the data end, t = 1).
        t: (B,) times in [0, 1] (already shifted).
        noise: x0; drawn from ``generator`` when omitted.
    """
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype) if noise is None else noise
    xt = interpolate(x0, x1, t)
    return per_sample_mse(model(xt, t, *model_args), velocity_target(x0, x1))


def pool_latents(latents: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """The auxiliary low-resolution target: ``avg_pool2d(latents, factor)`` (spec §5, 1024 -> "256 px")."""
    return F.avg_pool2d(latents, kernel_size=factor, stride=factor)


# ------------------------------------------------------------------------------------------------
# per-timestep-bin bookkeeping
# ------------------------------------------------------------------------------------------------


class TimestepBins:
    """Accumulates per-sample losses into ``n_bins`` equal bins of t (the official code logs 20).

    Diffusion losses differ by orders of magnitude across t, so one scalar hides where learning
    happens; the binned means show it. Bins are [i/n, (i+1)/n); t = 1 falls in the last bin.
    """

    def __init__(self, n_bins: int = 20) -> None:
        self.n_bins = n_bins
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(self.n_bins, dtype=torch.float64)
        self.counts = torch.zeros(self.n_bins, dtype=torch.long)

    def bin_index(self, t: torch.Tensor) -> torch.Tensor:
        return (t.detach().double().cpu() * self.n_bins).long().clamp(0, self.n_bins - 1)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        idx = self.bin_index(t)
        self.sums.index_add_(0, idx, losses.detach().double().cpu())
        self.counts.index_add_(0, idx, torch.ones_like(idx))

    def means(self) -> dict[int, float]:
        """{bin index: mean loss} for the bins that saw at least one sample."""
        return {i: float(self.sums[i] / self.counts[i]) for i in range(self.n_bins) if self.counts[i] > 0}

    def labels(self) -> list[str]:
        return [f"{i / self.n_bins:.2f}-{(i + 1) / self.n_bins:.2f}" for i in range(self.n_bins)]
