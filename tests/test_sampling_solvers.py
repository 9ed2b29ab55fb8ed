"""Time grids and solvers: exact toy problem convergence orders and diffusers-scheduler parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lumina_lightning.flow.objective import time_shift
from lumina_lightning.sampling.solvers import nfe, solve
from lumina_lightning.sampling.testing import tiny_model
from lumina_lightning.sampling.timesteps import flow_dpm_grid, uniform_grid


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# Gaussian toy with an exact velocity field
#
# Data x1 ~ N(μ, s²I), noise x0 ~ N(0, I), independent; x_t = t·x1 + (1 − t)·x0 (t = 0 noise).
# Per dimension (x_t, x1 − x0) is jointly Gaussian with
#     E[x_t] = tμ,   Var[x_t] = t²s² + (1 − t)² =: V(t),
#     E[x1 − x0] = μ,   Cov(x1 − x0, x_t) = t·s² − (1 − t).
# The flow-matching velocity is the conditional mean of the target given x_t:
#     v(x, t) = E[x1 − x0 | x_t = x] = μ + (t·s² − (1 − t)) / V(t) · (x − tμ).
# Since V'(t) = 2(t·s² − (1 − t)), this is v = μ + (x − tμ)·V'/(2V): the standardised coordinate
# z = (x − tμ)/√V(t) is constant along the ODE, so the exact flow map from t_a to t_b is
#     x(t_b) = t_b·μ + √V(t_b) · (x(t_a) − t_a·μ)/√V(t_a)     (at t_b = 1: μ + s·z, a data sample).
# ------------------------------------------------------------------------------------------------

MU, S = 1.0, 0.5


def _var(t: float) -> float:
    return t * t * S * S + (1 - t) ** 2


def toy_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    return MU + (t * S * S - (1 - t)) / _var(t) * (x - t * MU)


def toy_exact(x: torch.Tensor, ta: float, tb: float) -> torch.Tensor:
    return tb * MU + math.sqrt(_var(tb)) * (x - ta * MU) / math.sqrt(_var(ta))


def _slope(steps: list[int], errors: list[float]) -> float:
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


def test_toy_velocity_is_the_flow_matching_target():
    # Monte-Carlo check of the derivation: regress x1 − x0 on x_t at a fixed t.
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(400_000, generator=gen, dtype=torch.float64)
    x1 = MU + S * torch.randn(400_000, generator=gen, dtype=torch.float64)
    t = 0.3
    xt = t * x1 + (1 - t) * x0
    target = x1 - x0
    slope = float(((xt - xt.mean()) * (target - target.mean())).mean() / xt.var())
    assert slope == pytest.approx((t * S * S - (1 - t)) / _var(t), abs=5e-3)
    assert float(target.mean()) == pytest.approx(MU, abs=5e-3)
    # and the exact flow map sends N(0, 1) to N(μ, s²)
    out = toy_exact(x0, 0.0, 1.0)
    assert float(out.mean()) == pytest.approx(MU, abs=5e-3) and float(out.std()) == pytest.approx(S, abs=5e-3)


@pytest.mark.parametrize("solver,low,high", [("euler", 0.9, 1.1), ("midpoint", 1.8, 3.2), ("dpm", 1.8, 2.3)])
def test_convergence_order_on_gaussian_toy(solver, low, high):
    """Error vs steps on a grid from pure noise to t = 0.8 (λ stays finite, so DPM-Solver++ is in its
    asymptotic regime at small N): Euler order 1, midpoint and DPM-Solver++(2M) order 2.

    On this toy the midpoint rule's h² error term cancels and it converges at order 3; the test
    accepts "at least 2" for it.
    """
    x = torch.randn(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    steps = [8, 16, 32, 64]
    errors = []
    for n in steps:
        grid = 0.8 * uniform_grid(n, 1.0)
        out = solve(solver, toy_velocity, x.clone(), grid)
        errors.append(float((out - toy_exact(x, 0.0, 0.8)).abs().max()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert low <= _slope(steps, errors) <= high, (errors, _slope(steps, errors))


@pytest.mark.parametrize("solver", ["euler", "midpoint", "dpm"])
def test_solvers_converge_on_their_official_grids(solver):
    # Full official grids to t = 1 (data), shift 6: errors shrink; high step counts are accurate.
    x = torch.randn(500, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errs = {}
    for n in (16, 256):
        grid = flow_dpm_grid(n, 6.0) if solver == "dpm" else uniform_grid(n, 6.0)
        out = solve(solver, toy_velocity, x.clone(), grid)
        errs[n] = float((out - toy_exact(x, float(grid[0]), 1.0)).abs().max())
    assert errs[256] < errs[16] / 10
    assert errs[256] < 0.05


def test_dpm_solver_matches_diffusers_multistep_scheduler():
    # diffusers' DPMSolverMultistepScheduler with flow sigmas builds the same time_uniform_flow grid;
    # its flow_prediction is the σ-convention flow = −v and it is fed σ·1000.
    from diffusers import DPMSolverMultistepScheduler

    n, shift = 12, 6.0
    sched = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction", algorithm_type="dpmsolver++",
        solver_order=2, final_sigmas_type="zero",
    )
    sched.set_timesteps(n)
    grid = flow_dpm_grid(n, shift)
    assert torch.allclose((1 - grid).float(), sched.sigmas.float(), atol=1e-6)
    x = torch.randn(300, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = x.clone()
    for i, t in enumerate(sched.timesteps):
        y = sched.step(-toy_velocity(y, 1 - float(sched.sigmas[i])), t, y).prev_sample
    ours = solve("dpm", toy_velocity, x.clone(), grid)
    assert (ours - y).abs().max() < 1e-5


def test_grids():
    g = uniform_grid(17, 6.0)
    assert len(g) == 18 and g[0] == 0 and g[-1] == 1 and torch.all(g[1:] > g[:-1])
    assert torch.allclose(g, time_shift(torch.linspace(0, 1, 18, dtype=torch.float64), 6.0))
    # official time_uniform_flow: σ = shift(1 − linspace(1, 0.001, N + 1)) reversed, σ-shift s·σ/(1 + (s − 1)σ)
    n, s = 20, 6.0
    sig = 1.0 - torch.linspace(1.0, 0.001, n + 1, dtype=torch.float64)
    sig = (s * sig / (1 + (s - 1) * sig)).flip(0)
    assert torch.allclose(1 - flow_dpm_grid(n, s), sig, atol=1e-12)
    assert nfe("midpoint", 17) == 34 and nfe("dpm", 20) == 20 and nfe("euler", 30) == 30
    with pytest.raises(ValueError):
        solve("rk4", toy_velocity, torch.zeros(1), g)


@pytest.mark.parametrize("steps,shift", [(8, 6.0), (5, 3.0)])
def test_euler_matches_diffusers_scheduler_loop(tmp_path, steps, shift):
    """Our Euler on the shifted uniform grid == diffusers' FlowMatchEulerDiscreteScheduler loop around
    ``Lumina2Transformer2DModel`` with the same weights (fed 1 − σ, output negated), ≤ 1e-4."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel

    from lumina_lightning.models.io import save_nextdit

    model = tiny_model("NextDiT_debug", in_channels=4, cap_feat_dim=32)
    save_nextdit(model, tmp_path / "transformer", fmt="diffusers")
    theirs = Lumina2Transformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(2, 4, 16, 24, generator=gen)
    feats = torch.randn(2, 12, 32, generator=gen)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, :12] = True
    mask[1, :5] = True

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            model_t = (1 - t / sched.config.num_train_timesteps).expand(2)
            v = theirs(hidden_states=x, timestep=model_t, encoder_hidden_states=feats,
                       encoder_attention_mask=mask, return_dict=False)[0]
            x = sched.step(-v, t, x, return_dict=False)[0]
        grid = uniform_grid(steps, shift)
        assert torch.allclose(1 - grid.float(), sched.sigmas.float(), atol=1e-6)
        ours = solve("euler", lambda z, t: model(z, torch.full((2,), t), feats, mask), noise.clone(), grid)
    assert (ours - x).abs().max() < 1e-4
    assert x.abs().max() > 0.1  # a real trajectory, not zeros
