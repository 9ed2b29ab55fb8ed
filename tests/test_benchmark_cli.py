"""The benchmark scripts' command lines: mistakes are one-line messages (not tracebacks), every
output starts with the command that reproduces it, and what a table row claims is what was run
(model_speed's "mixed captions", sampler_speed's image side on a checkpoint)."""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    """A benchmark script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # sampler_speed's dataclasses look their module up while it loads
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


@pytest.fixture(scope="module")
def sampler():
    return load("sampler_speed")


def run_sampler(sampler, capsys, *argv: str) -> tuple[int, str, str]:
    code = sampler.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- sampler_speed.py: usage errors up front, one line, exit 2 -------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_sampler_cuda_on_a_cpu_host_is_a_one_line_error(sampler, capsys):
    code, out, err = run_sampler(sampler, capsys, "--device", "cuda", "--random-model", "NextDiT_debug")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["sampler_speed.py: error: --device cuda: no CUDA GPU here (use --device cpu)"]


def test_sampler_missing_ckpt_is_a_one_line_error(sampler, capsys, tmp_path):
    missing = tmp_path / "no_such_export"
    code, out, err = run_sampler(sampler, capsys, "--ckpt", str(missing))
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"sampler_speed.py: error: --ckpt {missing}: no checkpoint or pipeline there"]


def test_sampler_only_without_a_fast_row_prints_the_table(sampler, capsys, one_thread):
    """`--only DPM` leaves out every `fast` row: the table is still printed, the verdict says why
    there is nothing to judge (it was an IndexError after all the work)."""
    argv = ["--random-model", "NextDiT_debug", "--random-size", "16", "--repeats", "1", "--no-accurate-ref",
            "--no-calibrate", "--only", "DPM"]
    code, out, _ = run_sampler(sampler, capsys, *argv)
    assert code == 0
    assert out.splitlines()[0] == "python " + shlex.join([os.path.relpath(ROOT / "benchmarks" / "sampler_speed.py"),
                                                          *argv])
    assert "| Euler-50, full CFG | 50 |" in out and "| DPM-Solver 20 alone | 20 |" in out
    assert "No `fast` row to judge" in out


def test_sampler_ckpt_runs_at_the_resolution_it_records(sampler, capsys, tmp_path, one_thread):
    """An export records its training resolution (pipeline.json); `lumina sample` uses it, so the
    benchmark does too unless --size says otherwise (it always ran at 64 px)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from app_helpers import build_tiny_pipe
    finally:
        sys.path.remove(str(ROOT / "tests"))
    from lumina_lightning.sampling.pipeline_io import save_pipeline

    folder = save_pipeline(tmp_path / "export", build_tiny_pipe(tmp_path).model, resolution=32,
                           text_encoder_spec={"path": "minilm", "max_length": 64}, autoencoder_spec={"kind": "pixel"})
    common = ["--ckpt", str(folder), "--random-model", "", "--repeats", "1", "--no-accurate-ref", "--no-calibrate",
              "--only", "fast"]
    code, out, err = run_sampler(sampler, capsys, *common)
    assert code == 0, err
    assert f"## Trained model `{folder}` at 32x32 (the resolution the checkpoint records)" in out
    code, out, err = run_sampler(sampler, capsys, *common, "--size", "16")
    assert code == 0, err
    assert f"## Trained model `{folder}` at 16x16 (--size)" in out


# -- pipeline_scaling.py: a failed variant shows why --------------------------------------------------


def test_pipeline_scaling_prints_a_failed_variants_log_tail(tmp_path, monkeypatch, capsys):
    """The variants are child processes writing OUT/<variant>.log; here the child is a stand-in that
    writes a traceback and exits 1 (the real one takes minutes), as `--accelerator gpu` does on a CPU host."""
    import lumina_lightning.training.pipeline as pl

    scaling = load("pipeline_scaling")
    monkeypatch.setattr(pl, "_synthetic", lambda step: None)
    log_lines = [f"line {i}" for i in range(1, 31)] + ["MisconfigurationException: No supported gpu backend found!"]

    class FailingVariant:
        def __init__(self, cmd, stdout, stderr, env, cwd):
            stdout.write("\n".join(log_lines) + "\n")

        def poll(self):
            return 1

    monkeypatch.setattr(scaling.subprocess, "Popen", FailingVariant)
    monkeypatch.setattr(scaling.time, "sleep", lambda s: None)
    argv = ["--out", str(tmp_path / "scal"), "--variants", "k1", "--accelerator", "gpu"]
    assert scaling.main(argv) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "python " + shlex.join([os.path.relpath(scaling.__file__), *argv])
    assert "did not finish (exit 1)" in out
    tail = out[out.index(f"last lines of {tmp_path / 'scal' / 'k1.log'}"):]
    assert "    MisconfigurationException: No supported gpu backend found!" in tail
    assert "    line 17\n" in tail and "line 16\n" not in tail  # the last 15 lines, no more


# -- model_speed.py: "mixed captions" always has padding ----------------------------------------------


@pytest.fixture(scope="module")
def model_speed():
    return load("model_speed")


def caption_lengths(model_speed, batch: int, cap_len: int) -> list[int]:
    from lumina_lightning.models import NextDiTConfig

    cfg = NextDiTConfig(**model_speed.PRESETS["tiny"])
    *_, mask = model_speed.inputs(cfg, batch, 4, cap_len, "cpu", torch.float32, padded=True)
    return mask.sum(1).tolist()


def test_mixed_captions_at_batch_1_are_padded(model_speed):
    """At batch 1 the "mixed" row re-measured the "equal" one: nothing was padded (the README's 2.6B
    1024 px row runs --batch 1)."""
    assert caption_lengths(model_speed, 1, 256) == [128]
    assert model_speed.padding_label(model_speed.caption_padding(1, 256), 256) == "128 of 256"


def test_mixed_captions_at_larger_batches_are_padded_as_before(model_speed):
    assert caption_lengths(model_speed, 4, 64) == [64, 56, 48, 40]
    assert model_speed.padding_label(model_speed.caption_padding(4, 64), 64) == "0/8/16/24 of 64"


# -- every script's output starts with the command that reproduces it --------------------------------


@pytest.mark.parametrize("name", ["model_speed", "data_speed", "pipeline_scaling", "sampler_speed"])
def test_each_script_names_the_command_that_reproduces_it(name, monkeypatch):
    module = load(name)
    argv = ["--threads", "1", "--prompts", "a red circle"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    expected = f"python {os.path.relpath(ROOT / 'benchmarks' / f'{name}.py')} --threads 1 --prompts 'a red circle'"
    assert module.command_line(argv) == expected
    monkeypatch.setattr(sys, "argv", ["benchmarks/x.py", "--repeats", "20"])  # as typed on the command line
    assert module.command_line(None) == "python benchmarks/x.py --repeats 20"


# -- data_speed.py --recipe-step: the step the tiny recipes train -------------------------------------


def test_data_speed_can_time_the_tiny_recipes_own_step(one_thread):
    """The default consumer is NextDiT_debug at 64 px; --recipe-step times recipes/base/tiny.yaml's
    model (NextDiT_mini, patch 4, 384-d MiniLM features) at the recipes' 16 px."""
    from lumina_lightning.training.recipe import load_recipe

    data_speed = load("data_speed")
    cfg = load_recipe(str(ROOT / "recipes" / "tiny" / "stage1_lowres.yaml")).config
    assert {k: cfg.model.overrides[k] for k in data_speed.RECIPE_MODEL} == data_speed.RECIPE_MODEL
    assert (cfg.model.size, cfg.text_encoder.max_length) == ("NextDiT_mini", data_speed.RECIPE_CAP_LEN)
    rate, name = data_speed._step_rate(3, 16, 2, 1, recipe=True)
    assert rate > 0 and name.startswith("NextDiT_mini patch 4")
    assert data_speed._step_rate(3, 16, 2, 1)[1] == "NextDiT_debug"  # the default is unchanged
