"""benchmarks/sampler_speed.py on a debug-size random model: the interleaved timing rounds, the
exact counts, the table and the verdict (no timing is asserted)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sampler_speed", ROOT / "benchmarks" / "sampler_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_time_rounds_interleaves_configurations(bench):
    order = []

    class Pipe:
        device = type("D", (), {"type": "cpu"})()

        def sample_latents(self, noise, cond, uncond, settings):
            order.append(settings)

    times = bench.time_rounds(Pipe(), [("a", "A"), ("b", "B"), ("c", "C")], None, None, None, repeats=3)
    assert len(times) == 3 and all(len(t) == 3 for t in times) and all(x > 0 for t in times for x in t)
    # every round runs each configuration once, starting one later each round
    assert order == ["A", "B", "C", "B", "C", "A", "C", "A", "B"]


def test_benchmark_on_a_random_model(bench, tmp_path):
    pipe = bench.random_pipeline(tmp_path, "NextDiT_debug", 0.1, 0)
    rows, coeffs = bench.benchmark(pipe, ["a red circle"], (16, 16), seed=0, accurate=False, teacache=None,
                                   calibrate=False, log=lambda m: None, repeats=2,
                                   only=["fast (", "DPM-Solver 20 alone"])
    assert coeffs is None
    assert [r["name"] for r in rows][0] == bench.BASELINE and len(rows) == 3
    base, fast, dpm = rows
    assert base["speedup"] == 1.0 and base["speedup_range"] == (1.0, 1.0)
    assert (base["calls"], base["rows"]) == (50, 100)
    assert (fast["calls"], dpm["calls"], dpm["rows"]) == (20, 20, 40)
    assert fast["speedup_range"][0] <= fast["speedup"] <= fast["speedup_range"][1]
    text = bench.table(rows)
    assert "speedup wall (range over rounds)" in text and text.count("\n") == len(rows) + 1
    assert "wall time (rounds:" in bench.verdict(rows)


def test_an_export_is_benchmarked_with_what_its_presets_run(bench, tmp_path):
    """A tiny export stores the CFG scale it was judged with and a calibrated TeaCache: its `fast`
    row must be what `--preset fast` runs there, and every row must guide at that scale."""
    pipe = bench.random_pipeline(tmp_path, "NextDiT_debug", 0.1, 0)
    pipe.defaults = {"cfg_scale": 2.0, "teacache": 0.1, "teacache_version": [0.0, 0.0, 0.0, 1.0, 0.0]}
    seen = []
    sample = pipe.sample_latents
    pipe.sample_latents = lambda noise, cond, uncond, s: seen.append(s) or sample(noise, cond, uncond, s)
    rows, _ = bench.benchmark(pipe, ["a red circle"], (16, 16), seed=0, accurate=False, teacache=None,
                              calibrate=False, log=lambda m: None, repeats=1, only=["fast"])
    assert {s.cfg_scale for s in seen} == {2.0}  # baseline, references and every row
    names = [r["name"] for r in rows]
    assert len(names) == 3 and "stored" in names[2]
    assert pipe.resolve("fast") in seen
    assert bench.verdict(rows).startswith(names[2])
    # without a stored calibration the verdict is about the plain preset, not the benchmark's own calibration
    plain = [dict(r, name=n) for r, n in zip(rows, [bench.BASELINE, "fast (DPM 20 ...)", "fast, calibrated TeaCache 0.1"])]
    assert bench.verdict(plain).startswith("fast (DPM 20 ...)")
