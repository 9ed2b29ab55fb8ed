"""The README's quickstart commands run (in a smoke mode), so the README cannot drift from the code."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from test_packaging import fenced_lines

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quickstart_block() -> str:
    match = re.search(r"## Quickstart\n(.*?)\n## ", README, flags=re.S)
    assert match, "README has no Quickstart section"
    return match.group(1)


def test_quickstart_has_install_main_job_and_tests():
    cmds = fenced_lines(quickstart_block())
    assert "pip install torch==2.13.0" in cmds and "pip install -e '.[dev]'" in cmds
    assert any(c.startswith("lumina pipeline ") for c in cmds)
    assert any("pytest" in c for c in cmds)


def final_eval_images(root):
    results = json.loads(next(root.glob("runs/*/eval/tiny_stage3_hq_ema/results.json")).read_text())
    return results["images"]


def test_quickstart_main_job_runs_in_smoke_mode(tmp_path):
    """`lumina pipeline recipes/tiny/pipeline.yaml`, exactly as written, plus `--smoke`, from a clean folder."""
    main_job = next(c for c in fenced_lines(quickstart_block()) if c.startswith("lumina pipeline "))
    argv = shlex.split(main_job)
    argv = [str(ROOT / a) if a.endswith(".yaml") else a for a in argv]  # the README runs from the checkout
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run([sys.executable, "-m", "lumina_lightning", *argv[1:], "--smoke"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    summary = json.loads(next(tmp_path.glob("runs/*/summary.json")).read_text())
    assert summary["ok"] and len(summary["stages"]) == 3
    assert all(s["geneval"]["ema"]["overall"] is not None for s in summary["stages"])
    final_eval = summary["stages"][-1]["geneval"]["ema"]
    low, high = final_eval["ci95"]["overall"]
    assert low <= final_eval["overall"] <= high and final_eval["prompt_blind"]["overall"] is not None
    assert "prompt-blind chance level:" in out.stdout
    # the detector's ceiling at each stage's size (16 px renders lose more than 32 px ones)
    ceilings = [s["geneval"]["ema"]["detector_ceiling"] for s in summary["stages"]]
    assert all(s["geneval"]["ema"]["detector_ceiling_autoencoder"] is None for s in summary["stages"])  # pixels
    assert all(0.5 <= c <= 1.0 for c in ceilings) and ceilings[0] <= ceilings[1]
    assert "| detector on ground truth at this size |" in out.stdout
    assert "undersized credits (final model):" in out.stdout and final_eval["undersized"]["correct"] >= 0
    # the final model against stage 1, paired image by image (smoke mode skips the raw weights)
    cmp_ = summary["comparisons"]["final_vs_stage1"]
    assert cmp_["pairs"] == final_eval_images(tmp_path)
    assert cmp_["interval"][0] <= cmp_["difference"] <= cmp_["interval"][1]
    assert "(paired over" in out.stdout
    # issue #8's bar, judged in the summary (smoke mode has no raw-weight evaluation to compare)
    judged = {t["name"]: t["met"] for t in summary["targets"]}
    assert judged["overall >= 0.6"] in (True, False) and judged["ema_vs_raw: no worse"] is None
    assert "targets (final model, EMA weights; reported, not enforced):" in out.stdout
    # the exports carry the trained size, the guidance scale the pipeline judged them with and
    # TeaCache coefficients calibrated on them (with the threshold they were chosen for)
    final = json.loads((Path(summary["stages"][-1]["export"]) / "pipeline.json").read_text())
    stage = summary["stages"][-1]["teacache"]
    assert final["resolution"] == 32 and final["defaults"] == {
        "cfg_scale": 2.0, "teacache_version": stage["coefficients"], "teacache": 0.1}
    assert len(stage["coefficients"]) == 3 and "TeaCache calibrated for" in out.stdout
    assert "lumina demo --ckpt" in out.stdout and "pipeline `" in out.stdout


def test_latent_pipeline_runs_in_smoke_mode(tmp_path):
    """`lumina pipeline recipes/tiny/latent_pipeline.yaml --smoke`: trains its autoencoder, then every stage
    and evaluation runs in its latent space, at 64 px."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run([sys.executable, "-m", "lumina_lightning", "pipeline",
                          str(ROOT / "recipes" / "tiny" / "latent_pipeline.yaml"), "--smoke"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert (tmp_path / "runs/tiny_smoke/conv_autoencoder/config.json").is_file()
    assert not (tmp_path / "runs/tiny/conv_autoencoder").exists()
    summary = json.loads(next(tmp_path.glob("runs/*/summary.json")).read_text())
    assert summary["ok"] and [s["stage"] for s in summary["stages"]] == [
        "tiny_latent_stage1", "tiny_latent_stage2", "tiny_latent_stage3"]
    assert all(s["resolution"] == 64 and s["geneval"]["ema"]["overall"] is not None for s in summary["stages"])
    # the ceiling of a latent model: the detector on the renders passed through its autoencoder
    for s in summary["stages"]:
        ceiling = s["geneval"]["ema"]["detector_ceiling_autoencoder"]
        assert 0.0 <= ceiling <= 1.0 and s["geneval"]["ema"]["detector_ceiling"] == 1.0
    assert "through the autoencoder) |" in out.stdout
    final = json.loads((Path(summary["stages"][-1]["export"]) / "pipeline.json").read_text())
    assert final["resolution"] == 64 and final["autoencoder"]["kind"] == "conv"
    assert final["autoencoder"]["path"] == str((tmp_path / "runs/tiny_smoke/conv_autoencoder").resolve())


def test_shapes_pipeline_runs_in_smoke_mode(tmp_path):
    """`lumina pipeline recipes/tiny/shapes_pipeline.yaml --smoke`: stages 1 and 3 read the one-object
    scenes at 32 px, stage 2 the mix, from the dataset the pipeline generates."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run([sys.executable, "-m", "lumina_lightning", "pipeline",
                          str(ROOT / "recipes" / "tiny" / "shapes_pipeline.yaml"), "--smoke"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    summary = json.loads(next(tmp_path.glob("runs/*/summary.json")).read_text())
    assert summary["ok"] and [s["resolution"] for s in summary["stages"]] == [32, 32, 32]
    single = len((tmp_path / "runs/tiny/synthetic/train_single.jsonl").read_text().splitlines())
    logs = out.stdout + out.stderr
    # stages 1 and 3 on the one-object scenes, stage 2 on every scene plus those again
    assert logs.count(f"data: {single} usable records") == 2 and f"data: {4000 + single} usable records" in logs
    assert 0 < single < 4000


def test_readme_sample_commands_parse():
    """Every `lumina sample` line the README shows is valid for the current parser (prompts included)."""
    from lumina_lightning.sampling.cli import build_parser, read_prompts

    lines = [c for c in fenced_lines(README) if c.startswith("lumina sample ")]
    assert lines, "the README shows no `lumina sample` command"
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[2:])
        assert read_prompts(args) and args.ckpt
