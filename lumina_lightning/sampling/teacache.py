"""TeaCache for Next-DiT: skip the main blocks when their input barely changed (spec §6.3).

The forward is run in stages (``NextDiT.prepare`` → ``run_layers`` → ``finalize``); nothing in the
model is patched. Per transformer call:

1. ``prepare`` (embedders, refiners, joint sequence) always runs — it is cheap next to the main blocks,
   and with the pipeline's ``context`` its caption half (caption refiner, positions, RoPE) is
   computed on the first call only.
2. The indicator is the modulated input of the first main block, ``layers[0].modulated_input``
   (RMSNorm(x)·(1 + scale_msa)), exactly the official TeaCache4Lumina2 choice.
3. ``rel = mean|m − m_prev| / mean|m_prev|``; the accumulator adds ``poly(rel)`` with the v1 or v2
   coefficients (highest degree first, ``np.poly1d`` order). While the accumulated value stays below
   the threshold the main blocks are skipped and the cached residual (output − input of the main
   block stack, from the last computed call) is added; otherwise the blocks run, the residual is
   stored and the accumulator resets to 0.
4. The first and last calls of a sampling run always compute (and reset the accumulator).

Choices, and why (the reference implementation keys its caches by joint sequence length and measures
``rel`` over the whole batch of a branch):

* **Per row.** Every (branch, sample) row of the batched cond+uncond forward has its own indicator,
  accumulator and residual, keyed ``("cond"|"uncond", i)``. The cond and uncond branches therefore decide
  separately (the official "separate caches per guidance branch"), and a sample's decisions do not
  depend on which other samples share its batch, so an image does not change when the batch around
  it changes (the reference's batch-wide mean would couple them). ``rel`` is measured over the row's
  real tokens only (padding excluded).
* **Exactness.** Rows that compute go through the main blocks together; if every row computes, the
  call is bit-identical to ``model.forward``. Rows that skip get ``hidden + residual``. Running a subset
  of rows is the same maths (rows never interact), equal up to float rounding of the smaller matmuls.
* **Threshold ≤ 0 disables the cache** (always compute, no indicator work), so ``threshold=0`` equals no
  cache exactly. This matters for v2, whose polynomial is negative near 0 (−1.41 at rel = 0): a literal
  "accumulated < 0" rule would still skip steps at threshold 0.
* **"Steps" are transformer calls**, so the cache works unchanged with every solver (midpoint's two
  evaluations per step are two calls) and with CFG truncation (uncond rows that are no longer
  evaluated simply keep their stale entries, unused).
* **Other models.** v1/v2 were fitted on the released 2.6B model. :class:`TeaCacheProbe` and
  :func:`fit_coefficients` (driven by ``LuminaPipeline.calibrate_teacache``) fit the same kind of
  polynomial for any Next-DiT; explicit coefficients are accepted wherever a version name is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Hashable, Sequence

import numpy as np
import torch

from lumina_lightning.models.nextdit import NextDiT

# spec §6.3 (ali-vilab/TeaCache, TeaCache4Lumina2), highest degree first
COEFFICIENTS: dict[str, list[float]] = {
    "v1": [393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344],
    "v2": [225.7042019806413, -608.8453716535591, 304.1869942338369, 124.21267720116742, -1.4089066892956552],
}


Version = str | Sequence[float]


def coefficients(version: Version) -> list[float]:
    """Polynomial coefficients (highest degree first) of ``"v1"``, ``"v2"`` or an explicit sequence
    (e.g. from :func:`fit_coefficients` for a model the released polynomials were not fitted on)."""
    if isinstance(version, str):
        try:
            return list(COEFFICIENTS[version])
        except KeyError:
            raise ValueError(
                f"unknown TeaCache version {version!r}; choose one of {sorted(COEFFICIENTS)} or give coefficients"
            ) from None
    coeffs = [float(c) for c in version]
    if not coeffs or not all(np.isfinite(coeffs)):
        raise ValueError(f"TeaCache coefficients must be a non-empty list of finite numbers, got {version!r}")
    return coeffs


def rescale(rel: float, version: Version = "v1") -> float:
    """The calibrated polynomial ``poly(rel)`` of a TeaCache version."""
    return float(np.poly1d(coefficients(version))(rel))


def rel_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """Relative L1 change ``mean|cur − prev| / mean|prev|`` (0 when both are ~0, inf when only prev is)."""
    return rel_l1_rows([(current, previous)])[0]


def rel_l1_rows(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """:func:`rel_l1` of each ``(current, previous)`` pair, read back to the host in one transfer.

    On CUDA each ``.item()`` waits for the GPU to drain and leaves it idle while the host launches
    the rest of the call; one read per call instead of two per row keeps that to a single wait.
    """
    if not pairs:
        return []
    stats = torch.stack([torch.stack([(c.float() - p.float()).abs().mean(), p.abs().float().mean(), c.abs().float().mean()])
                         for c, p in pairs]).tolist()
    out = []
    for diff, prev_mean, cur_mean in stats:
        if prev_mean <= 1e-9:
            out.append(0.0 if cur_mean <= 1e-9 else float("inf"))
        else:
            out.append(diff / prev_mean)
    return out


def _take_rows(value, idx: torch.Tensor):
    """Rows ``idx`` of a per-row tensor, or of each tensor in a tuple (the RoPE factors' layout may be
    one complex table or a (cos, sin) pair)."""
    if isinstance(value, torch.Tensor):
        return value[idx]
    return type(value)(_take_rows(v, idx) for v in value)


@dataclass
class _RowState:
    previous: torch.Tensor | None = None  # indicator of the row's real tokens at the last call
    residual: torch.Tensor | None = None  # main-block residual of the row's real tokens
    accumulated: float = 0.0


@dataclass
class TeaCacheStats:
    calls: int = 0
    rows: int = 0  # rows seen
    computed_rows: int = 0  # rows that went through the main blocks
    skipped_rows: int = 0
    skipped_calls: int = 0  # calls where every row skipped the main blocks
    per_row_skips: dict = field(default_factory=dict)

    @property
    def skip_fraction(self) -> float:
        return self.skipped_rows / self.rows if self.rows else 0.0


class TeaCache:
    """A ``forward(x, t, cap_feats, cap_mask, rows)`` with TeaCache, for one sampling run.

    Args:
        model: the Next-DiT.
        threshold: ``rel_l1_thresh``; ≤ 0 disables caching (plain forward).
        total_calls: transformer calls the run will make (``solvers.nfe(solver, steps)``); the first and
            last are always computed.
        version: ``"v1"`` (the reference default) or ``"v2"`` coefficients, or explicit coefficients.
    """

    def __init__(self, model: NextDiT, threshold: float, total_calls: int, version: Version = "v1") -> None:
        self.coefficients = coefficients(version)
        self.poly = np.poly1d(self.coefficients)
        self.model = model
        self.threshold = float(threshold)
        self.total_calls = int(total_calls)
        self.version = version
        self.state: dict[Hashable, _RowState] = {}
        self.stats = TeaCacheStats()
        self.call_index = 0
        # per call: which rows ran the main blocks (True) or reused the cached residual (False)
        self.log: list[list[bool]] = []

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cap_feats: torch.Tensor,
        cap_mask: torch.Tensor,
        rows: Sequence[Hashable],
        context: dict | None = None,
    ) -> torch.Tensor:
        k = self.call_index
        self.call_index += 1
        b = x.shape[0]
        self.stats.calls += 1
        self.stats.rows += b
        if not self.enabled:
            self.stats.computed_rows += b
            self.log.append([True] * b)
            return self.model(x, t, cap_feats, cap_mask, context)

        model = self.model
        seq = model.prepare(x, t, cap_feats, cap_mask, context)
        indicator = model.layers[0].modulated_input(seq.hidden, seq.adaln)
        img_lens = [(h // model.patch_size) * (w // model.patch_size) for h, w in seq.latent_sizes]
        seq_lens = [int(c) + n for c, n in zip(seq.cap_lens.tolist(), img_lens)]
        force = k == 0 or k >= self.total_calls - 1

        compute: list[int] = []
        currents = [indicator[i, : seq_lens[i]].detach() for i in range(b)]
        states = [self.state.setdefault(key, _RowState()) for key in rows]
        cached = [not force and st.previous is not None and st.residual is not None
                  and st.previous.shape == cur.shape for st, cur in zip(states, currents)]
        rels = iter(rel_l1_rows([(cur, st.previous) for cur, st, c in zip(currents, states, cached) if c]))
        for i, key in enumerate(rows):
            st, current = states[i], currents[i]
            if not cached[i]:
                calc = True
            else:
                st.accumulated += float(self.poly(next(rels)))
                calc = st.accumulated >= self.threshold
            if calc:
                st.accumulated = 0.0
                compute.append(i)
            else:
                self.stats.per_row_skips[key] = self.stats.per_row_skips.get(key, 0) + 1
            st.previous = current.clone()

        self.log.append([i in compute for i in range(b)])
        hidden = seq.hidden
        if len(compute) == b:
            out = model.run_layers(hidden, seq)
        else:
            out = hidden.clone()
            if compute:
                idx = torch.tensor(compute, device=hidden.device)
                mask = seq.mask[idx] if seq.mask is not None else None
                if mask is not None and bool(mask.all()):
                    mask = None
                sub = replace(
                    seq,
                    hidden=hidden[idx],
                    mask=mask,
                    rope=_take_rows(seq.rope, idx),
                    adaln=seq.adaln[idx],
                    cap_lens=seq.cap_lens[idx],
                    latent_sizes=[seq.latent_sizes[i] for i in compute],
                )
                out[idx] = model.run_layers(hidden[idx], sub)
            for i, key in enumerate(rows):
                if i not in compute:
                    n = seq_lens[i]
                    out[i, :n] = hidden[i, :n] + self.state[key].residual
        for i in compute:
            n = seq_lens[i]
            self.state[rows[i]].residual = (out[i, :n] - hidden[i, :n]).detach()
        self.stats.computed_rows += len(compute)
        self.stats.skipped_rows += b - len(compute)
        if not compute:
            self.stats.skipped_calls += 1
        return model.finalize(out, seq)


# ------------------------------------------------------------------------------------------------
# calibration for other models
# ------------------------------------------------------------------------------------------------


class TeaCacheProbe:
    """A plain forward (same signature as :class:`TeaCache`) that records, per row and between
    consecutive calls, ``(rel-L1 of the indicator, rel-L1 of the model output)`` pairs.

    The v1/v2 polynomials were fitted on the released 2.6B model, whose indicator changes by roughly
    0.05–0.3 per step; a small or differently trained Next-DiT can live entirely outside that range
    (e.g. ~0.003–0.03 for a random NextDiT_small, where v1 ≈ 0.8 per call and nothing is ever
    skipped at the usual thresholds). Fitting the same kind of polynomial on the model's own
    trajectories (TeaCache's calibration recipe: indicator change -> output change) makes the threshold
    mean the same thing again: the accumulated estimated relative change of the output.
    """

    def __init__(self, model: NextDiT) -> None:
        self.model = model
        self.previous: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pairs: list[tuple[float, float]] = []

    def __call__(self, x, t, cap_feats, cap_mask, rows, context=None):
        model = self.model
        seq = model.prepare(x, t, cap_feats, cap_mask, context)
        indicator = model.layers[0].modulated_input(seq.hidden, seq.adaln)
        img_lens = [(h // model.patch_size) * (w // model.patch_size) for h, w in seq.latent_sizes]
        out = model.finalize(model.run_layers(seq.hidden, seq), seq)
        for i, key in enumerate(rows):
            n = int(seq.cap_lens[i]) + img_lens[i]
            ind, v = indicator[i, :n].detach().float(), out[i].detach().float()
            if key in self.previous:
                prev_ind, prev_v = self.previous[key]
                self.pairs.append((rel_l1(ind, prev_ind), rel_l1(v, prev_v)))
            self.previous[key] = (ind, v)
        return out


def fit_coefficients(pairs: Sequence[tuple[float, float]], degree: int = 4) -> list[float]:
    """Least-squares polynomial (highest degree first) from indicator change to output change.

    The result drives an accumulator, so over the observed range [0, max change] it must be
    non-negative and non-decreasing (a larger input change must never predict a smaller output
    change, let alone a negative one that pays back earlier steps). Where the degree-``degree`` fit
    is not, lower degrees are tried, down to the constant mean output change per call (a uniform
    skip schedule). Leading zeros keep the length ``degree + 1``.

    Seen on a tiny trained model: an unconstrained quadratic came out as ``-0.91 x² + 0.47 x + 0.012``,
    negative beyond x = 0.54, so rows with large changes stopped recomputing at all.
    """
    pts = [(a, b) for a, b in pairs if np.isfinite(a) and np.isfinite(b)]
    if len(pts) <= degree:
        raise ValueError(f"need more than {degree} calibration pairs, got {len(pts)}")
    x, y = np.array(pts, dtype=np.float64).T
    grid = np.linspace(0.0, float(x.max()), 257)
    coeffs = np.array([max(float(y.mean()), 0.0)])
    for d in range(degree, 0, -1):
        fit = np.polyfit(x, y, d)
        values = np.polyval(fit, grid)
        if values.min() >= 0.0 and np.all(np.diff(values) >= -1e-12):
            coeffs = fit
            break
    return [0.0] * (degree + 1 - len(coeffs)) + [float(c) for c in coeffs]
