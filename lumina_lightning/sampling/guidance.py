"""Classifier-free guidance with CFG-Renorm and CFG-Truncation, in the official and diffusers forms.

Official (spec §6.2, ``NextDiT.forward_with_cfg``):

* guidance ``v = v_u + w·(v_c − v_u)``, cond and uncond evaluated in ONE batched forward (rows
  ``[cond ; uncond]``, captions right-padded to a common length);
* renorm ``r`` (active when > 0): with ``n_c = ‖v_c‖`` and ``n = ‖v‖`` over (C, H, W), if ``n ≥ r·n_c``
  then ``v ← v·r·n_c/n`` — it only ever scales *down*;
* truncation ``cfg_trunc`` in model time: guide only while ``t < cfg_trunc`` (t = 0 is noise);
  afterwards only the conditional rows are evaluated (half the cost).

Deliberate deviation: the official renorm uses a Python ``if`` on a tensor, which only works for a
single prompt (batch 1; the ComfyUI port breaks for batch > 1, spec §6.2/§9.2). Here the clip is
applied **per sample** with ``torch.where``, which equals running each sample alone.

diffusers (``Lumina2Pipeline``, spec §6.2 "diffusers differs"), selected with ``mode="diffusers"``:

* renorm over the **last axis only** (image width) per (b, c, h) row and **always** rescaled to the
  conditional norm: ``v ← v·‖v_c‖/‖v‖`` (``renorm > 0`` switches it on; its value is not used);
  a zero row stays zero (diffusers divides 0 by 0 there: NaN, as does the official form for a zero ``v``);
* truncation as a **fraction of steps**: guide on step ``i`` (0-based, of N) iff ``(i + 1)/N ≤ ratio``.
  Solvers only see times, so :func:`truncation_time` turns the rule into the equivalent threshold
  on the solver's own grid: step ``i`` evaluates at times in ``[grid[i], grid[i+1])``, hence "guided
  iff t < grid[k]" with k the number of guided steps. This holds for Euler, midpoint and DPM alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Hashable, Sequence

import torch

CFG_MODES = ("official", "diffusers")

# forward(x, t, cap_feats, cap_mask, rows) -> velocity; ``rows`` names each batch row as
# (branch, sample index), branch "cond" or "uncond", so that a cache (TeaCache) can key on it.
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Sequence[Hashable]], torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    """Guidance settings.

    Args:
        scale: CFG scale ``w`` (official and diffusers default 4.0). Without guidance there is no
            unconditional forward at all: official mode guides at every scale but 1.0 (as the official
            ``forward_with_cfg`` does: 0 samples the unconditional model, 0.5 halfway); diffusers mode
            only above 1.0 (``Lumina2Pipeline``'s ``do_classifier_free_guidance``).
        renorm: official: the clip factor ``r`` (default 1.0); diffusers: on when > 0. 0 disables.
        trunc: official: model-time threshold (guide while ``t < trunc``; ``None`` or ≥ 1 never
            truncates, like the official default 100); diffusers: step fraction ``ratio`` (guide on
            steps with ``(i + 1)/N ≤ ratio``; ``None`` or 1.0 never truncates).
        mode: ``"official"`` or ``"diffusers"`` — picks the renorm form and the truncation semantics.
    """

    scale: float = 4.0
    renorm: float = 1.0
    trunc: float | None = None
    mode: str = "official"

    def __post_init__(self) -> None:
        if self.mode not in CFG_MODES:
            raise ValueError(f"unknown guidance mode {self.mode!r}; choose one of {CFG_MODES}")
        if self.renorm < 0:
            raise ValueError(f"renorm must be >= 0 (0 disables it), got {self.renorm}")
        if self.trunc is not None and self.trunc < 0:
            raise ValueError(f"cfg truncation must be >= 0, got {self.trunc}")

    @property
    def guided(self) -> bool:
        return self.scale > 1.0 if self.mode == "diffusers" else self.scale != 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def apply_cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``v_u + w·(v_c − v_u)``."""
    return v_uncond + scale * (v_cond - v_uncond)


def renorm_official(v: torch.Tensor, v_cond: torch.Tensor, r: float) -> torch.Tensor:
    """Official CFG-Renorm, per sample: clip ``‖v‖`` to ``r·‖v_c‖`` (norms over all non-batch dims)."""
    dims = tuple(range(1, v.dim()))
    max_norm = torch.linalg.vector_norm(v_cond, dim=dims, keepdim=True) * float(r)
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    # official: `if new_norm >= max_norm: v *= max_norm / new_norm` — here per sample. A zero ``v``
    # (e.g. a freshly initialised model, whose output layer is zero) passes the test with 0 >= 0; the
    # official 0/0 gives NaN, here the divisor is 1 there and the zero velocity stays zero.
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return torch.where(norm >= max_norm, v * (max_norm / safe), v)


def renorm_diffusers(v: torch.Tensor, v_cond: torch.Tensor) -> torch.Tensor:
    """diffusers' ``cfg_normalization``: rescale every last-axis row to the conditional norm."""
    cond_norm = torch.norm(v_cond, dim=-1, keepdim=True)
    norm = torch.norm(v, dim=-1, keepdim=True)
    # a zero row has no direction to rescale: it stays zero (diffusers' 0 * (n_c / 0) is NaN)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return v * (cond_norm / safe)


def guide(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: Guidance) -> torch.Tensor:
    """CFG followed by the configured renorm."""
    v = apply_cfg(v_cond, v_uncond, guidance.scale)
    if guidance.renorm > 0:
        v = renorm_official(v, v_cond, guidance.renorm) if guidance.mode == "official" else renorm_diffusers(v, v_cond)
    return v


def truncation_time(guidance: Guidance, grid: torch.Tensor | Sequence[float]) -> float:
    """The model time from which on guidance is off (``inf`` = never): guide iff ``t < result``."""
    if not guidance.guided:
        return -math.inf
    if guidance.trunc is None:
        return math.inf
    if guidance.mode == "official":
        return float(guidance.trunc) if guidance.trunc < 1.0 else math.inf
    ts = [float(t) for t in (grid.tolist() if isinstance(grid, torch.Tensor) else grid)]
    n = len(ts) - 1
    # exactly diffusers' test, evaluated per step index
    k = sum(1 for i in range(n) if not (i + 1) / n > guidance.trunc)
    return ts[k] if k < n else math.inf


def pad_captions(
    feats: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate caption batches along the batch axis, right-padding to a common length."""
    length = max(f.shape[1] for f in feats)
    out_f, out_m = [], []
    for f, m in zip(feats, masks):
        pad = length - f.shape[1]
        if pad:
            f = torch.cat([f, f.new_zeros(f.shape[0], pad, f.shape[2])], dim=1)
            m = torch.cat([m.bool(), m.new_zeros(m.shape[0], pad, dtype=torch.bool)], dim=1)
        out_f.append(f)
        out_m.append(m.bool())
    return torch.cat(out_f, dim=0), torch.cat(out_m, dim=0)


def trim_captions(feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that are padding in every row (no effect on the model output)."""
    length = max(int(mask.sum(dim=1).max()), 1)
    return feats[:, :length], mask[:, :length]


class GuidedVelocity:
    """The velocity callable that solvers integrate: conditional (+ guided) velocity of B samples.

    While guidance is on, one forward evaluates ``2B`` rows ``[cond ; uncond]``; after the truncation
    time only the ``B`` conditional rows are evaluated. ``calls`` counts forward calls (a batched
    cond+uncond call counts 1) and ``rows`` the sample-rows evaluated, so the saving of truncation
    shows; ``guided_calls`` counts the calls that evaluated the unconditional branch.
    """

    def __init__(
        self,
        forward: Forward,
        cond: tuple[torch.Tensor, torch.Tensor],
        uncond: tuple[torch.Tensor, torch.Tensor] | None,
        guidance: Guidance,
        t_cut: float = math.inf,
    ) -> None:
        self.forward = forward
        self.guidance = guidance
        self.t_cut = t_cut if (guidance.guided and uncond is not None) else -math.inf
        self.cond_feats, self.cond_mask = trim_captions(*cond)
        if uncond is not None and guidance.guided:
            self.both_feats, self.both_mask = pad_captions([cond[0], uncond[0]], [cond[1], uncond[1]])
            self.both_feats, self.both_mask = trim_captions(self.both_feats, self.both_mask)
        self.calls = 0
        self.rows = 0
        self.guided_calls = 0

    def is_guided(self, t: float) -> bool:
        return t < self.t_cut

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        b = x.shape[0]
        self.calls += 1
        if self.is_guided(t):
            self.guided_calls += 1
            self.rows += 2 * b
            rows = [("cond", i) for i in range(b)] + [("uncond", i) for i in range(b)]
            tt = torch.full((2 * b,), t, dtype=torch.float32, device=x.device)
            out = self.forward(torch.cat([x, x], dim=0), tt, self.both_feats, self.both_mask, rows)
            return guide(out[:b], out[b:], self.guidance)
        self.rows += b
        tt = torch.full((b,), t, dtype=torch.float32, device=x.device)
        return self.forward(x, tt, self.cond_feats, self.cond_mask, [("cond", i) for i in range(b)])
