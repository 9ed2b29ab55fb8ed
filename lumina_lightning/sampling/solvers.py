"""ODE solvers for the probability-flow ODE ``dx/dt = v(x, t)``, as pure functions.

Time convention: t = 0 noise, t = 1 data, ``v = data − noise`` (spec §1.5). Each solver takes

* ``velocity(x, t) -> v``: any callable; ``t`` is a Python float (model time), ``x`` the fp32 state
  of the whole batch. CFG, renorm, truncation and TeaCache all live inside this callable
  (:mod:`.guidance`, :mod:`.teacache`), so every solver works with every technique;
* ``x``: the state at ``grid[0]`` (noise);
* ``grid``: the increasing model times from :mod:`.timesteps` (N + 1 points, N steps);
* ``callback(i, n, x)``: optional, called after step ``i`` (0-based) of ``n`` with the new state.

and returns the state at ``grid[-1]`` (= 1, data). Solvers (spec §6.1):

* ``euler``    1 evaluation per step (official ``--solver euler``; diffusers' scheduler loop).
* ``midpoint`` 2 evaluations per step, the second at ``t + dt/2`` (torchdiffeq's fixed-grid midpoint,
  which the official ``--solver midpoint`` uses; the official default is 18 points = 17 steps).
* ``dpm``      Flow-DPM-Solver: DPM-Solver++ (data prediction), multistep, order 2, first-order start
  and lower-order final step (the official ``transport/dpm_solver.py`` from Sana); N evaluations for
  N steps; meant for :func:`.timesteps.flow_dpm_grid`.

DPM-Solver++ in our convention (derived here once): the flow path is ``x_t = α_t·x1 + σ_t·x0`` with
``α_t = t`` (data coefficient) and ``σ_t = 1 − t`` (noise coefficient), half log-SNR
``λ_t = log(α_t / σ_t) = log(t / (1 − t))``, increasing from −∞ (noise) to +∞ (data). The data
prediction is ``x̂1 = E[x1 | x_t]``; since ``v = x1 − x0`` and ``x_t = x1 − σ_t·v``, ``x̂1 = x + σ·v``
(spec §6.1: the official code forms ε = x − (1 − σ)·v and x0 = (x − σε)/α, which is the same).
With ``h = λ_t − λ_s`` the DPM-Solver++ updates from s to t are

    order 1:  x_t = (σ_t/σ_s)·x_s − α_t·expm1(−h)·x̂1_s
    order 2:  x_t = (σ_t/σ_s)·x_s − α_t·expm1(−h)·(x̂1_s + ½·D),  D = (x̂1_s − x̂1_prev)/r,  r = h_prev/h

(``solver_type="dpmsolver"`` of the official file). At t = 1, σ_t = 0 and h = ∞, so the order-1 step
returns x̂1 exactly, which is why the last step is taken at order 1.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]

EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "dpm": 1}
SOLVER_NAMES = tuple(EVALS_PER_STEP)


def _times(grid: torch.Tensor | list[float]) -> list[float]:
    ts = [float(t) for t in (grid.tolist() if isinstance(grid, torch.Tensor) else grid)]
    if len(ts) < 2:
        raise ValueError("a time grid needs at least 2 points")
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError("time grids must be strictly increasing (t = 0 noise -> t = 1 data)")
    return ts


def euler(velocity: Velocity, x: torch.Tensor, grid: torch.Tensor, *, callback: StepCallback | None = None) -> torch.Tensor:
    """Explicit Euler: ``x ← x + (t_{i+1} − t_i)·v(x, t_i)``."""
    ts = _times(grid)
    n = len(ts) - 1
    for i in range(n):
        x = x + (ts[i + 1] - ts[i]) * velocity(x, ts[i])
        if callback is not None:
            callback(i, n, x)
    return x


def midpoint(velocity: Velocity, x: torch.Tensor, grid: torch.Tensor, *, callback: StepCallback | None = None) -> torch.Tensor:
    """Explicit midpoint (RK2): ``x ← x + dt·v(x + dt/2·v(x, t), t + dt/2)`` (torchdiffeq's "midpoint")."""
    ts = _times(grid)
    n = len(ts) - 1
    for i in range(n):
        dt = ts[i + 1] - ts[i]
        half = 0.5 * dt
        x_mid = x + half * velocity(x, ts[i])
        x = x + dt * velocity(x_mid, ts[i] + half)
        if callback is not None:
            callback(i, n, x)
    return x


def _half_log_snr(t: float) -> float:
    """λ_t = log(t / (1 − t)); −∞ at pure noise, +∞ at data."""
    if t <= 0.0:
        return -math.inf
    if t >= 1.0:
        return math.inf
    return math.log(t) - math.log1p(-t)


def dpm_solver_2m(
    velocity: Velocity, x: torch.Tensor, grid: torch.Tensor, *, callback: StepCallback | None = None
) -> torch.Tensor:
    """Flow-DPM-Solver: DPM-Solver++(2M), first-order first step, first-order final step (see module doc).

    One velocity evaluation per step, at ``grid[0..N−1]``; the final state needs none.
    """
    ts = _times(grid)
    n = len(ts) - 1
    lam = [_half_log_snr(t) for t in ts]
    x0_prev: torch.Tensor | None = None
    for i in range(n):
        s, t = ts[i], ts[i + 1]
        x0 = x + (1.0 - s) * velocity(x, s)  # data prediction x̂1 = x + σ·v
        h = lam[i + 1] - lam[i]
        phi = math.expm1(-h)  # -1 when stepping onto t = 1 (h = inf)
        ratio = (1.0 - t) / (1.0 - s)  # σ_t / σ_s
        # official multistep loop: order min(2, steps + 1 - step) with the first step at order 1
        second_order = x0_prev is not None and i < n - 1
        if second_order:
            r = (lam[i] - lam[i - 1]) / h
            d = (x0 - x0_prev) / r
            x = ratio * x - (t * phi) * (x0 + 0.5 * d)
        else:
            x = ratio * x - (t * phi) * x0
        x0_prev = x0
        if callback is not None:
            callback(i, n, x)
    return x


SOLVERS: dict[str, Callable[..., torch.Tensor]] = {"euler": euler, "midpoint": midpoint, "dpm": dpm_solver_2m}


def check_solver(name: str) -> str:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return name


def nfe(solver: str, steps: int) -> int:
    """Velocity evaluations (= transformer forward calls with batched CFG) of ``steps`` solver steps."""
    return EVALS_PER_STEP[check_solver(solver)] * steps


def solve(
    solver: str, velocity: Velocity, x: torch.Tensor, grid: torch.Tensor, *, callback: StepCallback | None = None
) -> torch.Tensor:
    """Run the named solver (``euler`` | ``midpoint`` | ``dpm``) over ``grid``."""
    return SOLVERS[check_solver(solver)](velocity, x, grid, callback=callback)
