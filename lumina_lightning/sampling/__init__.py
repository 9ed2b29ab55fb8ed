"""Samplers and inference acceleration (spec §6): time grids, solvers, CFG-Renorm/Trunc, TeaCache and
the text-to-image pipeline shared by the CLI, the training module's validation grids and the app.

Time convention everywhere: t = 0 noise, t = 1 data, velocity = data − noise (spec §1.5).
"""

from lumina_lightning.sampling.guidance import (
    Guidance,
    GuidedVelocity,
    apply_cfg,
    guide,
    pad_captions,
    renorm_diffusers,
    renorm_official,
    truncation_time,
)
from lumina_lightning.sampling.pipeline import LuminaPipeline, SampleResult, kwargs_from_settings, snap_size, to_pil
from lumina_lightning.sampling.pipeline_io import (
    PipelineLoadError,
    export_diffusers_pipeline,
    load_pipeline,
    pipeline_spec,
    save_pipeline,
    update_pipeline_defaults,
)
from lumina_lightning.sampling.presets import PRESETS, SamplerSettings, resolve_settings
from lumina_lightning.sampling.solvers import SOLVERS, dpm_solver_2m, euler, midpoint, nfe, solve
from lumina_lightning.sampling.teacache import COEFFICIENTS, TeaCache, rel_l1, rescale
from lumina_lightning.sampling.timesteps import flow_dpm_grid, grid_for, uniform_grid

__all__ = [
    "COEFFICIENTS",
    "PRESETS",
    "SOLVERS",
    "Guidance",
    "GuidedVelocity",
    "LuminaPipeline",
    "PipelineLoadError",
    "SampleResult",
    "SamplerSettings",
    "TeaCache",
    "apply_cfg",
    "dpm_solver_2m",
    "euler",
    "export_diffusers_pipeline",
    "flow_dpm_grid",
    "grid_for",
    "guide",
    "kwargs_from_settings",
    "load_pipeline",
    "midpoint",
    "nfe",
    "pad_captions",
    "pipeline_spec",
    "rel_l1",
    "renorm_diffusers",
    "renorm_official",
    "rescale",
    "resolve_settings",
    "save_pipeline",
    "update_pipeline_defaults",
    "snap_size",
    "solve",
    "to_pil",
    "truncation_time",
    "uniform_grid",
]
