"""Sampling time grids, stated once in the official time convention.

Convention (spec §1.5, :mod:`lumina_lightning.flow.convention`): **t = 0 is noise, t = 1 is data**,
``x_t = t·x1 + (1 − t)·x0`` and the model predicts ``v = x1 − x0``. Every grid here is an increasing
sequence of model times ending at t = 1; a solver with N steps walks the N intervals of an N + 1 point
grid. σ-based code (diffusers, ComfyUI, the DPM-Solver maths) uses ``σ = 1 − t``.

The shift is :func:`lumina_lightning.flow.objective.time_shift` (``t' = t / (t + s(1 − t))``, spec §6.1),
the same function that training uses; ``s > 1`` spends more steps near noise.

* :func:`uniform_grid` — the official ODE grid: ``t = linspace(0, 1, N + 1)`` then shifted (official
  ``transport/integrators.py``). Note the official ``--num_sampling_steps`` counts *grid points*
  (18 points = 17 midpoint steps); here ``steps`` always counts intervals. It is also exactly the
  grid of diffusers' ``FlowMatchEulerDiscreteScheduler``: σ = linspace(1, 1/N, N) shifted, plus a final 0.
* :func:`flow_dpm_grid` — Flow-DPM-Solver's ``skip_type="time_uniform_flow"`` (official
  ``transport/dpm_solver.py``): σ = shift(1 − linspace(1, 0.001, N + 1)) reversed, i.e. in model time
  ``t = shift(linspace(0.001, 1, N + 1))``. It starts a hair after pure noise (σ ≈ shift(0.999)) and
  ends exactly at t = 1 (σ = 0).
"""

from __future__ import annotations

import torch

from lumina_lightning.flow.objective import time_shift

# The first point of the time_uniform_flow grid before shifting: official t_0 = 1 / total_N = 1e-3.
FLOW_DPM_T_START = 1e-3


def uniform_grid(steps: int, shift: float = 1.0, *, t_start: float = 0.0) -> torch.Tensor:
    """``steps + 1`` increasing model times from ``shift(t_start)`` to 1 (float64, CPU).

    Args:
        steps: number of solver intervals (N).
        shift: time shift factor ``s`` (1 = none; the official samplers use 6).
        t_start: first point before shifting (0 = pure noise).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= t_start < 1.0:
        raise ValueError(f"t_start must be in [0, 1), got {t_start}")
    t = torch.linspace(t_start, 1.0, steps + 1, dtype=torch.float64)
    t = time_shift(t, float(shift))
    t[-1] = 1.0  # exact end point (time_shift(1) is 1 up to rounding)
    return t


def flow_dpm_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The Flow-DPM-Solver ``time_uniform_flow`` grid in model time (see module docstring)."""
    return uniform_grid(steps, shift, t_start=FLOW_DPM_T_START)


def grid_for(solver: str, steps: int, shift: float) -> torch.Tensor:
    """The grid each solver uses: ``dpm`` gets the Flow-DPM grid, the ODE solvers the uniform grid."""
    return flow_dpm_grid(steps, shift) if solver == "dpm" else uniform_grid(steps, shift)


def sigmas(grid: torch.Tensor) -> torch.Tensor:
    """The σ = 1 − t view of a grid (decreasing, ends at 0)."""
    return 1.0 - grid
