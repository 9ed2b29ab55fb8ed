"""CFG, CFG-Renorm (official per-sample and diffusers forms) and CFG-Truncation (time and step fraction)."""

from __future__ import annotations

import math

import pytest
import torch

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
from lumina_lightning.sampling.solvers import solve
from lumina_lightning.sampling.testing import tiny_model
from lumina_lightning.sampling.timesteps import flow_dpm_grid, uniform_grid


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _official_batch1(v_cond, v_uncond, scale, r):
    """The official forward_with_cfg maths, valid for one sample only (Python `if` on a tensor)."""
    v = v_uncond + scale * (v_cond - v_uncond)
    max_norm = torch.linalg.vector_norm(v_cond) * r
    norm = torch.linalg.vector_norm(v)
    if norm >= max_norm:
        v = v * (max_norm / norm)
    return v


def test_renorm_official_clips_only_and_per_sample():
    gen = torch.Generator().manual_seed(0)
    v_cond = torch.randn(3, 4, 6, 5, generator=gen)
    v_uncond = torch.randn(3, 4, 6, 5, generator=gen)
    v_uncond[1] = v_cond[1] * 1.1  # sample 1: v = 0.7·v_c, below the clip, untouched
    scale, r = 4.0, 1.0
    out = guide(v_cond, v_uncond, Guidance(scale=scale, renorm=r))
    for i in range(3):
        assert torch.allclose(out[i], _official_batch1(v_cond[i], v_uncond[i], scale, r), atol=1e-6)
    raw = apply_cfg(v_cond, v_uncond, scale)
    norms = torch.linalg.vector_norm(out.flatten(1), dim=1)
    cond_norms = torch.linalg.vector_norm(v_cond.flatten(1), dim=1)
    assert torch.allclose(norms[[0, 2]], cond_norms[[0, 2]] * r, rtol=1e-5)  # clipped to r·‖v_c‖
    assert torch.equal(out[1], raw[1])  # never scaled up
    # r = 2 clips at twice the conditional norm
    out2 = renorm_official(raw, v_cond, 2.0)
    assert torch.all(torch.linalg.vector_norm(out2.flatten(1), dim=1) <= 2 * cond_norms * (1 + 1e-5))


def test_renorm_diffusers_last_axis_always_rescales():
    gen = torch.Generator().manual_seed(1)
    v_cond = torch.randn(2, 4, 6, 5, generator=gen)
    v = torch.randn(2, 4, 6, 5, generator=gen) * 0.1  # smaller than cond: diffusers scales *up*
    out = renorm_diffusers(v, v_cond)
    assert torch.allclose(out.norm(dim=-1), v_cond.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(out / out.norm(dim=-1, keepdim=True), v / v.norm(dim=-1, keepdim=True), atol=1e-6)


def test_truncation_time_semantics():
    grid = uniform_grid(10, 1.0)
    assert truncation_time(Guidance(trunc=0.25), grid) == 0.25
    assert truncation_time(Guidance(trunc=None), grid) == math.inf
    assert truncation_time(Guidance(trunc=100.0), grid) == math.inf  # official default: never
    assert truncation_time(Guidance(scale=1.0), grid) == -math.inf  # no guidance at all
    # diffusers: guide on step i iff (i + 1)/N <= ratio -> 10 steps, 0.25 -> steps 0, 1 -> t < grid[2]
    assert truncation_time(Guidance(trunc=0.25, mode="diffusers"), grid) == float(grid[2])
    assert truncation_time(Guidance(trunc=1.0, mode="diffusers"), grid) == math.inf


def test_pad_captions():
    f1, m1 = torch.ones(2, 3, 4), torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    f2, m2 = torch.ones(2, 5, 4), torch.tensor([[1] * 5, [1, 0, 0, 0, 0]], dtype=torch.bool)
    feats, mask = pad_captions([f1, f2], [m1, m2])
    assert feats.shape == (4, 5, 4) and mask.shape == (4, 5)
    assert mask.sum(1).tolist() == [3, 2, 5, 1]
    assert torch.all(feats[:2, 3:] == 0)


class Recorder:
    """A forward that records which rows (branch, sample) each call evaluated."""

    def __init__(self, model):
        self.model = model
        self.calls: list[tuple[float, list]] = []

    def __call__(self, x, t, feats, mask, rows):
        self.calls.append((float(t[0]), list(rows)))
        return self.model(x, t, feats, mask)


def _captions(gen, b, lengths, dim=32, length=10):
    feats = torch.randn(b, length, dim, generator=gen)
    mask = torch.zeros(b, length, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return feats, mask


@pytest.mark.parametrize(
    "solver,mode,trunc,guided_calls",
    [
        ("euler", "official", 0.5, 5),  # t = 0, .1, .., .4 guided
        ("midpoint", "official", 0.5, 10),  # 5 steps x 2 evaluations (midpoints .05, .. .45 < .5)
        ("dpm", "official", 0.5, 5),
        ("euler", "diffusers", 0.25, 2),  # steps 0, 1
        ("midpoint", "diffusers", 0.25, 4),
        ("dpm", "diffusers", 0.25, 2),
    ],
)
def test_truncation_skips_uncond_forwards(solver, mode, trunc, guided_calls):
    model = tiny_model(in_channels=4, cap_feat_dim=32)
    gen = torch.Generator().manual_seed(2)
    b = 2
    cond = _captions(gen, b, [7, 4])
    uncond = _captions(gen, b, [1, 1])
    rec = Recorder(model)
    grid = flow_dpm_grid(10, 1.0) if solver == "dpm" else uniform_grid(10, 1.0)
    g = Guidance(scale=4.0, renorm=1.0, trunc=trunc, mode=mode)
    vel = GuidedVelocity(rec, cond, uncond, g, truncation_time(g, grid))
    with torch.no_grad():
        solve(solver, vel, torch.randn(b, 4, 8, 8, generator=gen), grid)
    calls = rec.calls
    n_calls = 20 if solver == "midpoint" else 10
    assert len(calls) == vel.calls == n_calls
    with_uncond = [i for i, (_, rows) in enumerate(calls) if any(r[0] == "uncond" for r in rows)]
    assert with_uncond == list(range(guided_calls))  # all guided calls come first, then never again
    assert vel.guided_calls == guided_calls
    assert vel.rows == guided_calls * 2 * b + (n_calls - guided_calls) * b
    if mode == "official":
        assert all(t >= trunc for t, rows in calls[guided_calls:]) and all(t < trunc for t, _ in calls[:guided_calls])


def test_renorm_per_sample_batch_equals_each_sample_alone():
    """The batched guided velocity of 3 samples (different captions and lengths) equals each alone,
    with the clip active for some samples and not others (where the official batch-1 `if` would fail)."""
    model = tiny_model(in_channels=4, cap_feat_dim=32)
    gen = torch.Generator().manual_seed(3)
    b = 3
    cond = _captions(gen, b, [9, 3, 6])
    uncond = _captions(gen, b, [1, 1, 2])
    x = torch.randn(b, 4, 8, 8, generator=gen)
    g = Guidance(scale=4.0, renorm=1.0)
    plain = lambda x, t, f, m, rows: model(x, t, f, m)  # noqa: E731
    with torch.no_grad():
        batch = GuidedVelocity(plain, cond, uncond, g)(x, 0.3)
        alone = [
            GuidedVelocity(plain, (cond[0][i:i + 1], cond[1][i:i + 1]), (uncond[0][i:i + 1], uncond[1][i:i + 1]), g)(x[i:i + 1], 0.3)
            for i in range(b)
        ]
        raw = GuidedVelocity(plain, cond, uncond, Guidance(scale=4.0, renorm=0.0))(x, 0.3)
    assert torch.allclose(batch, torch.cat(alone), atol=1e-5)
    clipped = [not torch.allclose(batch[i], raw[i]) for i in range(b)]
    assert any(clipped)
    # pick a renorm factor that sits between the samples' ratios: some clip, some do not
    with torch.no_grad():
        vc = GuidedVelocity(plain, cond, None, g)(x, 0.3)
    ratio = torch.linalg.vector_norm(raw.flatten(1), dim=1) / torch.linalg.vector_norm(vc.flatten(1), dim=1)
    r = float(ratio.median())
    g_mid = Guidance(scale=4.0, renorm=r)
    with torch.no_grad():
        batch = GuidedVelocity(plain, cond, uncond, g_mid)(x, 0.3)
        for i in range(b):
            one = GuidedVelocity(plain, (cond[0][i:i + 1], cond[1][i:i + 1]), (uncond[0][i:i + 1], uncond[1][i:i + 1]), g_mid)(x[i:i + 1], 0.3)
            assert torch.allclose(batch[i:i + 1], one, atol=1e-5)
    assert not torch.allclose(batch, raw) and torch.allclose(batch[ratio < r], raw[ratio < r])


def test_no_guidance_means_no_uncond_forward():
    model = tiny_model(in_channels=4, cap_feat_dim=32)
    gen = torch.Generator().manual_seed(4)
    rec = Recorder(model)
    cond, uncond = _captions(gen, 1, [5]), _captions(gen, 1, [1])
    vel = GuidedVelocity(rec, cond, uncond, Guidance(scale=1.0))
    with torch.no_grad():
        solve("euler", vel, torch.randn(1, 4, 8, 8, generator=gen), uniform_grid(3))
    assert vel.rows == 3 and all(r[0] == "cond" for _, rows in rec.calls for r in rows)


def test_scales_below_one_guide_in_official_mode_only():
    # official forward_with_cfg guides at any scale but 1 (0 = the unconditional model); diffusers'
    # Lumina2Pipeline only above 1
    assert Guidance(scale=0.5).guided and Guidance(scale=0.0).guided and not Guidance(scale=1.0).guided
    assert not Guidance(scale=0.5, mode="diffusers").guided and not Guidance(scale=1.0, mode="diffusers").guided
    assert Guidance(scale=1.5, mode="diffusers").guided
    model = tiny_model(in_channels=4, cap_feat_dim=32)
    gen = torch.Generator().manual_seed(5)
    cond, uncond = _captions(gen, 1, [5]), _captions(gen, 1, [1])
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    rec = Recorder(model)
    vel = GuidedVelocity(rec, cond, uncond, Guidance(scale=0.5, mode="diffusers"))
    with torch.no_grad():
        plain = solve("euler", vel, noise.clone(), uniform_grid(3))
        unguided = solve("euler", GuidedVelocity(Recorder(model), cond, uncond, Guidance(scale=1.0)), noise.clone(), uniform_grid(3))
    assert vel.rows == 3 and torch.equal(plain, unguided)
    # scale 0 in official mode samples the unconditional model: the same as conditioning on the uncond caption
    with torch.no_grad():
        zero = solve("euler", GuidedVelocity(Recorder(model), cond, uncond, Guidance(scale=0.0, renorm=0.0)), noise.clone(),
                     uniform_grid(3))
        uncond_only = solve("euler", GuidedVelocity(Recorder(model), uncond, uncond, Guidance(scale=1.0)), noise.clone(),
                            uniform_grid(3))
    assert torch.allclose(zero, uncond_only, atol=1e-5)


def test_renorm_of_zero_norms_is_finite_with_hand_derived_values():
    """0/0 in either renorm form (a fresh model outputs exactly zero velocities) must not give NaN."""
    zero = torch.zeros(2, 1, 1, 2)
    for mode in ("official", "diffusers"):
        out = guide(zero, zero, Guidance(4.0, 1.0, None, mode))
        assert torch.equal(out, zero), mode  # v = 0 and v_c = 0: v stays 0
    # per sample / per row: sample 0 is an ordinary one, sample 1 has a zero guided velocity
    v_cond = torch.tensor([[[[3.0, 4.0]]], [[[3.0, 0.0]]]])  # norms 5 and 3
    # w = 4: v = v_u + 4 (v_c - v_u). Sample 0: v_u = 2 v_c -> v = -2 v_c = (-6, -8), norm 10.
    # Sample 1: v_u = 4/3 v_c = (4, 0) -> v = (4, 0) + 4 (-1, 0) = (0, 0).
    v_uncond = torch.tensor([[[[6.0, 8.0]]], [[[4.0, 0.0]]]])
    expected = torch.tensor([[[[-3.0, -4.0]]], [[[0.0, 0.0]]]])  # sample 0 clipped to norm 5: (-6, -8)·5/10
    for mode in ("official", "diffusers"):
        assert torch.allclose(guide(v_cond, v_uncond, Guidance(4.0, 1.0, None, mode)), expected), mode
    # a zero conditional velocity with a non-zero guided one: official clips to r·0 = 0, diffusers rescales to 0
    v = torch.tensor([[[[-9.0, -12.0]]]])
    assert torch.equal(renorm_official(v, torch.zeros_like(v), 1.0), torch.zeros_like(v))
    assert torch.equal(renorm_diffusers(v, torch.zeros_like(v)), torch.zeros_like(v))
    # a zero v with a non-zero v_c: official leaves it (0 < r·5), diffusers has no direction to scale
    z = torch.zeros(1, 1, 1, 2)
    assert torch.equal(renorm_official(z, v_cond[:1], 1.0), z)
    assert torch.equal(renorm_diffusers(z, v_cond[:1]), z)
