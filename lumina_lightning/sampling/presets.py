"""Named sampler settings and their resolution (defaults ← preset ← explicit arguments).

``steps`` always counts solver *intervals*. The official ``--num_sampling_steps 18`` counts grid points,
so the official default is midpoint with 17 steps = 34 transformer calls (spec §6.1).

* ``official`` — what ``scripts/sample.sh`` runs (spec §6.1, §10 item 7): midpoint, 17 steps, shift 6,
  CFG 4, renorm 1.0 in the official clip-only form, no truncation (official default cfg_trunc = 100).
* ``fast`` — the accelerated stack: Flow-DPM-Solver (DPM-Solver++ 2M, ``time_uniform_flow`` grid) with
  20 steps, CFG-Trunc in model time at 0.25 (the official demo's value: under shift 6 it keeps CFG for
  about the first 2/3 of the grid), TeaCache v1 at 0.3 (the reference script's default threshold). The
  v1/v2 polynomials were fitted on the released 2.6B model; for other models put coefficients from
  ``LuminaPipeline.calibrate_teacache`` into the pipeline's defaults (``teacache_version``, with the
  threshold they were chosen for as ``teacache``), which then apply to every preset that turns
  TeaCache on (``lumina pipeline`` does this for its exports: ``teacache_calibration``). Benchmark:
  ``benchmarks/sampler_speed.py``.
* ``diffusers`` — ``Lumina2Pipeline`` defaults (spec §6.2): Euler 30, shift 6, CFG 4, diffusers' renorm
  (last-axis, always rescale) and step-fraction truncation with ratio 1.0 (never).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from lumina_lightning.sampling.guidance import CFG_MODES, Guidance
from lumina_lightning.sampling.solvers import check_solver
from lumina_lightning.sampling.teacache import coefficients


@dataclass(frozen=True)
class SamplerSettings:
    """Everything that decides a sample besides prompts, size and noise."""

    solver: str = "midpoint"
    steps: int = 17
    shift: float = 6.0
    cfg_scale: float = 4.0
    renorm: float = 1.0
    cfg_trunc: float | None = None
    cfg_mode: str = "official"
    teacache: float = 0.0
    # "v1" | "v2" (the released model's polynomials) or explicit coefficients (a tuple) fitted with
    # LuminaPipeline.calibrate_teacache for another model
    teacache_version: str | tuple[float, ...] = "v1"

    def __post_init__(self) -> None:
        check_solver(self.solver)
        if int(self.steps) < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"unknown cfg_mode {self.cfg_mode!r}; choose one of {CFG_MODES}")
        if not isinstance(self.teacache_version, str):
            object.__setattr__(self, "teacache_version", tuple(float(c) for c in self.teacache_version))
        coefficients(self.teacache_version)  # validates
        if self.teacache < 0:
            raise ValueError(f"teacache threshold must be >= 0 (0 disables it), got {self.teacache}")
        Guidance(self.cfg_scale, self.renorm, self.cfg_trunc, self.cfg_mode)  # validates

    @property
    def guidance(self) -> Guidance:
        return Guidance(scale=float(self.cfg_scale), renorm=float(self.renorm), trunc=self.cfg_trunc, mode=self.cfg_mode)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not isinstance(self.teacache_version, str):
            d["teacache_version"] = list(self.teacache_version)
        return d

    def replace(self, **changes: Any) -> "SamplerSettings":
        return replace(self, **changes)


PRESETS: dict[str, SamplerSettings] = {
    "official": SamplerSettings(
        solver="midpoint", steps=17, shift=6.0, cfg_scale=4.0, renorm=1.0, cfg_trunc=None, cfg_mode="official",
        teacache=0.0,
    ),
    "fast": SamplerSettings(
        solver="dpm", steps=20, shift=6.0, cfg_scale=4.0, renorm=1.0, cfg_trunc=0.25, cfg_mode="official",
        teacache=0.3, teacache_version="v1",
    ),
    "diffusers": SamplerSettings(
        solver="euler", steps=30, shift=6.0, cfg_scale=4.0, renorm=1.0, cfg_trunc=1.0, cfg_mode="diffusers",
        teacache=0.0,
    ),
}
DEFAULT_PRESET = "official"
SETTING_NAMES = tuple(f.name for f in fields(SamplerSettings))


def resolve_settings(preset: str | None = None, base: dict[str, Any] | None = None, **overrides: Any) -> SamplerSettings:
    """``SamplerSettings`` from a preset (default ``official``), then ``base`` (e.g. a pipeline folder's
    defaults), then explicit overrides; ``None`` values are ignored at each level.

    A ``teacache`` threshold in ``base`` belongs with the coefficients calibrated for that model
    (``teacache_version``): it sets the threshold of presets that use TeaCache and never turns the
    cache on for one that does not (``official`` stays exact). ``teacache=True`` in the overrides
    turns it on at that threshold, or at ``fast``'s without one.
    """
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    settings = PRESETS[name]
    base = dict(base or {})
    model_threshold = base.pop("teacache", None)
    if model_threshold is not None and (isinstance(model_threshold, bool) or float(model_threshold) <= 0):
        raise ValueError(f"a pipeline's default teacache threshold must be a number > 0, got {model_threshold!r}")
    if model_threshold is not None and settings.teacache:
        base["teacache"] = float(model_threshold)
    for layer in (base, overrides):
        unknown = sorted(set(layer) - set(SETTING_NAMES))
        if unknown:
            raise ValueError(f"unknown sampler setting(s) {unknown}; known: {list(SETTING_NAMES)}")
        changes = {k: v for k, v in layer.items() if v is not None}
        if changes:
            settings = settings.replace(**changes)
    if isinstance(settings.teacache, bool):
        on = float(model_threshold) if model_threshold is not None else PRESETS["fast"].teacache
        settings = settings.replace(teacache=on if settings.teacache else 0.0)
    return settings.replace(steps=int(settings.steps))
