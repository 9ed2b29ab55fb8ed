"""TeaCache: exactness at threshold 0, skipping with a threshold, per-row caches, every solver."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lumina_lightning.sampling.teacache import COEFFICIENTS, TeaCache, rel_l1, rel_l1_rows, rescale
from lumina_lightning.sampling.testing import build_tiny_pipeline

PROMPTS = ["a red circle left of a blue square", "two green stars"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("teacache"))


def _run(pipe, solver, steps, **kw):
    return pipe(PROMPTS, width=32, height=24, seed=[3, 4], solver=solver, steps=steps, cfg_trunc=0.6, **kw)


def test_polynomials_and_indicator():
    # coefficients straight from the spec (§6.3), highest degree first
    assert COEFFICIENTS["v1"][-1] == pytest.approx(0.86377344) and COEFFICIENTS["v2"][0] == pytest.approx(225.7042019806413)
    assert rescale(0.0, "v1") == pytest.approx(0.86377344)
    assert rescale(0.2, "v2") == pytest.approx(float(np.poly1d(COEFFICIENTS["v2"])(0.2)))
    a, b = torch.ones(4, 3), torch.full((4, 3), 1.1)
    assert rel_l1(b, a) == pytest.approx(0.1, rel=1e-5)
    assert rel_l1(torch.zeros(2), torch.zeros(2)) == 0.0
    # the per-call batch of rows (one host read) gives each row's rel_l1, edge cases included
    pairs = [(b, a), (torch.randn(5, 3), torch.randn(5, 3)), (torch.zeros(2), torch.zeros(2)), (torch.ones(2), torch.zeros(2))]
    assert rel_l1_rows(pairs) == pytest.approx([rel_l1(c, p) for c, p in pairs[:3]] + [float("inf")])
    assert rel_l1_rows(pairs)[3] == float("inf") and rel_l1_rows([]) == []
    with pytest.raises(ValueError):
        rescale(0.1, "v3")


@pytest.mark.parametrize("solver,steps", [("euler", 8), ("midpoint", 4), ("dpm", 8)])
def test_threshold_zero_equals_no_cache_exactly(pipe, solver, steps):
    base = _run(pipe, solver, steps, teacache=0.0)
    assert "teacache_log" not in base.stats
    for version in ("v1", "v2"):
        zero = _run(pipe, solver, steps, teacache=0.0, teacache_version=version)
        assert torch.equal(zero.latents, base.latents)
    # A threshold below the v1 polynomial's minimum (~0.09) never skips: it runs the staged forward
    # (prepare -> indicator -> run_layers -> finalize) every call, and that is bit-identical too.
    staged = _run(pipe, solver, steps, teacache=1e-6, teacache_version="v1")
    assert staged.stats["skipped_rows"] == 0 and len(staged.stats["teacache_log"]) == staged.nfe
    assert torch.equal(staged.latents, base.latents)


@pytest.mark.parametrize("solver,steps", [("euler", 12), ("midpoint", 6), ("dpm", 12)])
def test_threshold_skips_and_stays_close(pipe, solver, steps):
    base = _run(pipe, solver, steps, teacache=0.0)
    cached = _run(pipe, solver, steps, teacache=1.0, teacache_version="v1")
    log = cached.stats["teacache_log"]
    assert cached.stats["skipped_rows"] > 0
    assert cached.stats["block_rows"] + cached.stats["skipped_rows"] == cached.rows == base.rows
    assert all(log[0]) and all(log[-1])  # first and last calls always computed
    rel = float((cached.latents - base.latents).norm() / base.latents.norm())
    assert 0 < rel < 0.02
    # the cached images decode and look like the uncached ones
    diff = np.abs(np.asarray(cached.images[0], dtype=np.float32) - np.asarray(base.images[0], dtype=np.float32))
    assert diff.mean() < 2.0


def test_per_row_caches_are_batch_independent(pipe):
    """Each (branch, sample) row decides alone: a sample's decisions and result are those it gets alone."""
    kw = dict(width=32, height=24, solver="euler", steps=10, teacache=0.8, cfg_trunc=0.7)
    both = pipe(PROMPTS, seed=[3, 4], **kw)
    alone = pipe(PROMPTS[1], seed=[4], **kw)
    log_both, log_alone = both.stats["teacache_log"], alone.stats["teacache_log"]
    # rows while guided: [cond0, cond1, uncond0, uncond1] vs [cond, uncond]; after truncation [c0, c1] vs [c]
    for row_b, row_a in zip(log_both, log_alone):
        if len(row_b) == 4:
            assert [row_b[1], row_b[3]] == row_a
        else:
            assert [row_b[1]] == row_a
    assert any(not r for row in log_alone for r in row)  # something was skipped
    assert torch.allclose(both.latents[1], alone.latents[0], atol=1e-4)
    # cond and uncond branches decide separately (they see different captions)
    guided = [row for row in log_both if len(row) == 4]
    assert any(row[0] != row[2] or row[1] != row[3] for row in guided) or all(all(r) for r in guided)


def test_teacache_object_directly_with_subset_rows():
    from lumina_lightning.sampling.testing import tiny_model

    model = tiny_model(in_channels=4, cap_feat_dim=32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    feats = torch.randn(2, 6, 32, generator=gen)
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    cache = TeaCache(model, threshold=10.0, total_calls=4)
    rows = [("cond", 0), ("cond", 1)]
    with torch.no_grad():
        t0 = torch.full((2,), 0.2)
        first = cache(x, t0, feats, mask, rows)
        assert torch.equal(first, model(x, t0, feats, mask))
        # force row 1 to compute and row 0 to skip: a fresh state for row 1 only
        cache.state.pop(("cond", 1))
        t1 = torch.full((2,), 0.25)
        second = cache(x, t1, feats, mask, rows)
        assert cache.log[-1] == [False, True]
        full = model(x, t1, feats, mask)
        assert torch.allclose(second[1], full[1], atol=1e-5)  # the computed row is the real forward
        assert not torch.allclose(second[0], full[0], atol=1e-7)  # the skipped row reused the residual


def test_calibrated_coefficients(pipe, tmp_path):
    """Coefficients fitted on the model's own trajectories act as a TeaCache version and survive JSON."""
    import json

    from lumina_lightning.sampling import load_pipeline, save_pipeline

    coeffs = pipe.calibrate_teacache(["three yellow triangles"], width=16, height=16, seeds=(1, 2), steps=6)
    assert len(coeffs) == 3 and all(np.isfinite(coeffs))
    r = _run(pipe, "dpm", 8, teacache=0.05, teacache_version=coeffs)
    assert r.settings["teacache_version"] == pytest.approx(coeffs)
    json.dumps(r.settings)
    assert all(r.stats["teacache_log"][0]) and all(r.stats["teacache_log"][-1])
    # as a pipeline default it applies whenever a preset or call turns TeaCache on
    save_pipeline(tmp_path / "p", pipe.model, text_encoder_spec={"path": pipe.text_encoder.path},
                  autoencoder_spec={"kind": "pixel"}, defaults={"teacache_version": coeffs})
    loaded = load_pipeline(tmp_path / "p")
    assert loaded.resolve("fast").teacache_version == pytest.approx(tuple(coeffs))
    assert loaded.resolve("official").teacache == 0.0
    again = loaded(PROMPTS, width=32, height=24, seed=[3, 4], solver="dpm", steps=8, cfg_trunc=0.6, teacache=0.05)
    assert torch.equal(again.latents, r.latents)
    with pytest.raises(ValueError):
        _run(pipe, "euler", 2, teacache=0.1, teacache_version=[float("nan")])


def test_fit_coefficients_recovers_a_usable_polynomial_and_rejects_unusable_ones():
    from lumina_lightning.sampling.teacache import fit_coefficients

    x = np.linspace(0.01, 0.3, 20)
    exact = fit_coefficients(list(zip(x, 0.5 * x**2 + 2 * x + 0.1)), degree=2)
    assert exact == pytest.approx([0.5, 2.0, 0.1], abs=1e-9)  # increasing and positive: kept as fitted
    # an output change that falls as the input change grows: no polynomial of degree 2 or 1 is
    # monotone there, so the schedule falls back to the mean change per call (here 0.5)
    x = np.linspace(0.0, 1.0, 11)
    assert fit_coefficients(list(zip(x, 1.0 - x)), degree=2) == pytest.approx([0.0, 0.0, 0.5])
    # a quadratic that would turn negative inside the observed range is replaced by the linear fit
    x = np.linspace(0.0, 1.0, 21)
    y = np.where(x < 0.8, x, 0.8 - 3 * (x - 0.8))  # rises, then collapses
    coeffs = fit_coefficients(list(zip(x, y)), degree=2)
    values = np.polyval(coeffs, np.linspace(0, 1, 101))
    assert coeffs[0] == 0.0 and values.min() >= 0 and np.all(np.diff(values) >= 0)
