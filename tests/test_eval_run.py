"""End-to-end `evaluate(...)` and `lumina eval` with a tiny random pipeline (scores ~0: we check
structure, files, determinism and logging, not quality)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from lumina_lightning.data import synth
from lumina_lightning.data.synth import TAGS
from lumina_lightning.eval.cli import main as eval_main
from lumina_lightning.eval.run import evaluate
from lumina_lightning.sampling.testing import build_tiny_pipeline, tiny_text_encoder

FAST = {"steps": 2}  # preset "fast" = Flow-DPM + CFG-trunc + TeaCache; 2 steps keep it quick


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth.generate_synthetic(tmp_path_factory.mktemp("synth"), 0, size=16, seed=0, n_test=18)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipe"))


@pytest.fixture(scope="module")
def evaluated(pipe, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    results = evaluate(pipe, data.test_geneval, out, preset="fast", images_per_prompt=2, seed=0, manifest=data.test,
                       compare_to="diffusers", max_prompts=6, batch_size=5, sampler_overrides=FAST, progress=False,
                       val_records=6)
    return out, results


def test_results_structure(evaluated):
    out, results = evaluated
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["overall"] == results["overall"]
    assert set(results["tags"]) == set(TAGS) and results["absent_tags"] == []
    assert 0.0 <= results["overall"] <= 1.0
    assert results["overall"] == pytest.approx(np.mean(list(results["tags"].values())))
    assert results["images"] == 12 and results["prompts"] == 6
    assert sum(n for _, n in results["counts"].values()) == 12
    s = results["settings"]
    assert (s["preset"], s["solver"], s["steps"], s["width"], s["height"]) == ("fast", "dpm", 2, 16, 16)
    assert s["images_per_prompt"] == 2 and s["seed"] == 0
    assert results["detector"]["shapes"] == list(synth.DEFAULT_SHAPES)
    for key in ("generate_s", "score_s", "total_s", "val_loss_s", "detector_validation_s"):
        assert results["timings"][key] >= 0
    # the detector passes on the ground truth of the same split
    dv = results["detector_validation"]
    assert dv["passed"] and set(dv["tags"]) == set(TAGS)
    # sampling-noise intervals around every score, and the chance level of each task
    ci = results["ci95"]
    assert ci["overall"][0] <= results["overall"] <= ci["overall"][1]
    for tag, (low, high) in ci["tags"].items():
        assert low <= results["tags"][tag] <= high
    pb = results["prompt_blind"]
    assert set(pb["tags"]) == set(TAGS) and all(0.0 <= v <= 1.0 for v in pb["tags"].values())
    assert pb["overall"] < dv["overall"]  # ignoring prompts loses against the same renders' own prompts
    # correct images credited on objects smaller than any ground-truth object of their task
    u = results["undersized"]
    assert set(u["tags"]) <= set(dv["min_object_area"]) and 0 <= u["undersized"] <= u["correct"]
    assert u["correct"] == sum(t["correct"] for t in u["tags"].values())
    assert u["overall_without"] <= results["overall"] + 1e-9
    # fixed-timestep validation loss: 8 stratified timesteps, finite, deterministic inputs
    vl = results["val_loss"]
    assert len(vl["per_t"]) == 8 and vl["timesteps"][0] == pytest.approx(1 / 16)
    assert math.isfinite(vl["mean"]) and vl["records"] == 6 and vl["caption_level"] == "prompt"
    # sampler comparison from the same noise
    c = results["compare"]
    assert c["reference_preset"] == "diffusers" and c["images"] == 12
    assert 0 < c["psnr"] <= 100 and -1 <= c["ssim"] <= 1
    assert c["reference_settings"]["solver"] == "euler" and c["reference_nfe_per_image"] == 30


def test_files_in_geneval_layout(evaluated):
    out, _ = evaluated
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 12
    row = json.loads(lines[0])
    assert {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"} <= set(row)
    assert row["filename"] == "images/00000/samples/0000.png"
    spec = json.loads((out / "images" / "00000" / "metadata.jsonl").read_text())
    assert spec == json.loads(row["metadata"])
    with Image.open(out / row["filename"]) as im:
        assert im.size == (16, 16)
        record = json.loads(im.text["lumina_settings"])
    assert record["seed"] == 0 and record["prompt"] == spec["prompt"] and record["solver"] == "dpm"
    assert sorted(p.name for p in (out / "images" / "00005" / "samples").iterdir()) == ["0000.png", "0001.png"]


def test_reports(evaluated):
    out, results = evaluated
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for tag in TAGS:
        assert f"## {tag}" in md and f"<h2>{tag}</h2>" in html
        assert (out / "grids" / f"{tag}.png").is_file()
    assert "plots/tag_accuracy.png" in md and (out / "plots" / "tag_accuracy.png").is_file()
    blind = results["prompt_blind"]["tags"]["colors"]
    assert f"| {results['tags']['colors']:.3f} | " in md and f"| {blind:.3f} |" in md
    assert "prompt-blind" in md and "95 % interval" in html
    assert "undersized credits" in md
    assert "✗" in md and ("✗" in html or "✓" in html)
    # the validation loss at every timestep, not only its mean (where a model is weak)
    vl = results["val_loss"]
    assert f"{vl['timesteps'][3]:.2f}: {vl['per_t'][3]:.4f}" in md and f"{vl['mean']:.5f}" in md
    assert "images/00000/samples/0000.png" in html
    assert results["files"]["grids"]["counting"] == "grids/counting.png"


def test_report_rewritten_without_a_task_drops_its_grid(evaluated, tmp_path):
    import shutil

    from lumina_lightning.eval.report import write_report

    out, results = evaluated
    again = tmp_path / "again"
    shutil.copytree(out, again)
    rows = [json.loads(line) for line in (again / "results.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["tag"] != "counting"]
    files = write_report({**results, "tags": {t: v for t, v in results["tags"].items() if t != "counting"}}, kept, again)
    assert "counting" not in files["grids"] and not (again / "grids" / "counting.png").exists()
    assert (again / "grids" / "colors.png").is_file()


def test_detector_is_validated_at_the_evaluated_size(pipe, tmp_path_factory, tmp_path, capsys):
    """Samples judged at 16 px from 32 px renders: the detector is validated on the renders reduced
    to 16 px (the ceiling of the model's score), with the native result beside it."""
    data32 = synth.generate_synthetic(tmp_path_factory.mktemp("synth32"), 0, size=32, seed=1, n_test=18)
    results = evaluate(pipe, data32.test_geneval, tmp_path, preset="fast", images_per_prompt=1, seed=0,
                       manifest=data32.test, max_prompts=2, width=16, height=16, sampler_overrides=FAST,
                       progress=False, val_records=0)
    dv = results["detector_validation"]
    assert dv["size"] == [16, 16] and dv["resized"] == dv["images"] == 18
    assert dv["native"]["images"] == 18 and dv["native"]["passed"] and dv["native"]["object_recall"] >= 0.98
    assert dv["overall"] <= dv["native"]["overall"] and dv["object_recall"] is None
    md = (tmp_path / "report.md").read_text()
    assert "## Detector on ground-truth renders at 16×16" in md and "| at native size |" in md
    from lumina_lightning.eval.cli import _print_validation

    _print_validation(dv)
    printed = capsys.readouterr().out
    assert "at 16×16, the evaluated size" in printed and "at their native size:" in printed


def test_seeds_do_not_depend_on_batching(pipe, data, evaluated, tmp_path):
    out, _ = evaluated
    again = evaluate(pipe, data.test_geneval, tmp_path, preset="fast", images_per_prompt=2, seed=0, max_prompts=2,
                     batch_size=1, sampler_overrides=FAST, progress=False, report=False)
    assert again["detector_validation"] is None and again["val_loss"] is None and again["compare"] is None
    for rel in ("images/00001/samples/0001.png", "images/00000/samples/0000.png"):
        a = np.asarray(Image.open(out / rel), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / rel), dtype=np.int16)
        assert np.abs(a - b).max() <= 1


def test_cli_end_to_end_with_mlflow(pipe, data, tmp_path, monkeypatch, capsys):
    from lumina_lightning.sampling.pipeline_io import save_pipeline

    monkeypatch.chdir(tmp_path)  # MLflow's ./mlartifacts goes here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ckpt = save_pipeline(tmp_path / "model", pipe.model, text_encoder_spec={"path": tiny_text_encoder(tmp_path)},
                         autoencoder_spec={"kind": "pixel"})
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    rc = eval_main(["--ckpt", str(ckpt), "--prompts", str(data.test_geneval), "--out", str(tmp_path / "out"),
                    "--preset", "fast", "--steps", "2", "--cfg", "2.0", "--images-per-prompt", "1", "--max-prompts", "6",
                    "--manifest", str(data.test), "--val-records", "4", "--validate-detector", "--no-progress",
                    "--tracking-uri", uri, "--experiment", "eval-test", "--run-name", "tiny"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "detector on ground-truth renders" in printed and "MLflow run" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    low, high = results["ci95"]["overall"]
    assert f"95 % [{low:.2f}, {high:.2f}]  chance {results['prompt_blind']['overall']:.3f}" in printed
    # the same command again, paired with the first run: the CLI prints the paired difference
    rc = eval_main(["--ckpt", str(ckpt), "--prompts", str(data.test_geneval), "--out", str(tmp_path / "out2"),
                    "--preset", "fast", "--steps", "2", "--cfg", "2.0", "--images-per-prompt", "1", "--max-prompts", "6",
                    "--val-records", "0", "--no-progress", "--paired-with", str(tmp_path / "out")])
    assert rc == 0
    assert re.search(r"overall difference \+0\.000 \[-0\.\d+, \+0\.\d+\] over 6 paired images",
                     capsys.readouterr().out)
    assert "this run − " in (tmp_path / "out2" / "report.md").read_text()
    assert results["checkpoint"] == str(ckpt) and results["settings"]["cfg_scale"] == 2.0
    assert results["images"] == 6 and results["mlflow"]["experiment"] == "eval-test"
    for name in ("report.md", "report.html", "results.jsonl"):
        assert (tmp_path / "out" / name).is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(results["mlflow"]["run_id"])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.metrics["geneval/overall"] == pytest.approx(results["overall"])
    assert run.data.metrics["detector_gt/min_tag"] >= 0.98 and "val_loss" in run.data.metrics
    assert run.data.metrics["prompt_blind/overall"] == pytest.approx(results["prompt_blind"]["overall"])
    if results["undersized"]["share"] is not None:
        assert run.data.metrics["undersized/share"] == pytest.approx(results["undersized"]["share"])
    assert run.data.metrics["geneval_ci95/overall_low"] <= results["overall"]
    assert run.data.params["sampler.solver"] == "dpm" and run.data.tags["kind"] == "eval"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "report.md", "results.json", "grids", "plots", "images"} <= artifacts
    assert (tmp_path / "mlartifacts").is_dir()

    # re-score the saved images (GenEval layout) without generating: same per-task numbers
    rc = eval_main(["--images", str(tmp_path / "out" / "images"), "--out", str(tmp_path / "rescored")])
    assert rc == 0
    rescored = json.loads((tmp_path / "rescored" / "results.json").read_text())
    assert rescored["tags"] == results["tags"] and rescored["detector"] == results["detector"]
    # ... and its images keep their identity (prompt index, sample, seed), so they pair with the run
    rc = eval_main(["--images", str(tmp_path / "out" / "images"), "--out", str(tmp_path / "rescored2"),
                    "--paired-with", str(tmp_path / "out")])
    assert rc == 0 and "over 6 paired images" in capsys.readouterr().out


def test_cli_validate_detector_only(data, tmp_path, capsys):
    from lumina_lightning.cli import main as lumina_main

    rc = lumina_main(["eval", "--validate-detector", "--manifest", str(data.test), "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "passes the 0.98 bar" in printed
    for tag in TAGS:
        assert tag in printed
    assert json.loads((tmp_path / "detector_validation.json").read_text())["passed"]


def test_cli_errors(tmp_path, capsys):
    assert eval_main(["--out", str(tmp_path)]) == 2
    assert "give --ckpt" in capsys.readouterr().err
    assert eval_main(["--ckpt", str(tmp_path / "missing"), "--prompts", str(tmp_path / "p.jsonl"),
                      "--out", str(tmp_path / "out")]) == 2
    assert "lumina eval: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are known to be good


def test_default_size_is_the_trained_resolution(pipe, data, tmp_path):
    """Without --width/--height the model is sampled at the size it was trained at (pipeline.json),
    not the dataset's: the tiny 32 px export scored 0.13 at the dataset's 64 px, 0.32 at 32 px."""
    common = dict(preset="fast", images_per_prompt=1, max_prompts=1, sampler_overrides={"steps": 1},
                  progress=False, report=False)
    assert evaluate(pipe, data.test_geneval, tmp_path / "a", **common)["settings"]["width"] == 16  # dataset size
    pipe.resolution = 32
    try:
        s = evaluate(pipe, data.test_geneval, tmp_path / "b", **common)["settings"]
        assert (s["width"], s["height"]) == (32, 32)
        s = evaluate(pipe, data.test_geneval, tmp_path / "c", width=48, height=16, **common)["settings"]
        assert (s["width"], s["height"]) == (48, 16)  # explicit sizes still win
    finally:
        pipe.resolution = None


def test_min_images_per_task_by_hand():
    from lumina_lightning.eval.run import image_jobs, images_per_spec

    specs = [{"tag": "single_object"}] * 3 + [{"tag": "position"}] * 10
    # 3 single-object prompts need ceil(32 / 3) = 11 images each; 10 position prompts x 4 = 40 >= 32
    assert images_per_spec(specs, 4, 32) == [11] * 3 + [4] * 10
    assert images_per_spec(specs, 4, 0) == [4] * 13
    jobs = image_jobs([3, 1, 2], 2, seed=100)
    # the first images_per_prompt images keep their seeds; extras take 100 + 3*2 = 106, 107, ...
    assert jobs == [(0, 0, 100), (0, 1, 101), (0, 2, 106), (1, 0, 102), (2, 0, 104), (2, 1, 105)]
    assert len({s for _, _, s in jobs}) == len(jobs)


def test_min_images_per_task_scores_small_tasks_on_more_images(pipe, data, tmp_path):
    common = dict(preset="fast", images_per_prompt=1, max_per_tag=1, sampler_overrides={"steps": 1},
                  progress=False, report=False)
    plain = evaluate(pipe, data.test_geneval, tmp_path / "a", **common)
    more = evaluate(pipe, data.test_geneval, tmp_path / "b", min_images_per_task=3, **common)
    assert all(total == 1 for _, total in plain["counts"].values())
    assert more["counts"] and all(total == 3 for _, total in more["counts"].values())
    assert more["settings"]["min_images_per_task"] == 3 and more["images"] == 3 * plain["images"]
    # image 0 of every prompt is the same image in both runs
    for i in range(plain["prompts"]):
        rel = f"images/{i:05d}/samples/0000.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / rel)), np.asarray(Image.open(tmp_path / "b" / rel)))
    with pytest.raises(ValueError, match="min_images_per_task"):
        evaluate(pipe, data.test_geneval, tmp_path / "c", min_images_per_task=-1, **common)


def test_paired_with_an_earlier_run(pipe, data, evaluated, tmp_path, capsys):
    out, results = evaluated
    kwargs = dict(preset="fast", images_per_prompt=2, max_prompts=6, batch_size=5, sampler_overrides=FAST,
                  progress=False, val_records=0, report=False)
    # the same pipeline, prompts and seeds draw the same images: a difference of exactly 0
    again = evaluate(pipe, data.test_geneval, tmp_path / "again", seed=0, paired_with=out, **kwargs)
    assert again["paired"]["pairs"] == results["images"] == 12
    low, high = again["paired"]["interval"]
    assert again["paired"]["difference"] == 0.0 and low < 0 < high  # 12 agreeing images: not a certainty
    # other seeds: nothing to pair, said plainly
    other = evaluate(pipe, data.test_geneval, tmp_path / "other", seed=100, paired_with=out, **kwargs)
    assert other["paired"]["pairs"] == 0 and other["paired"]["difference"] is None
    with pytest.raises(FileNotFoundError, match="earlier `lumina eval`"):
        evaluate(pipe, data.test_geneval, tmp_path / "x", paired_with=tmp_path / "nowhere", **kwargs)


# --------------------------------------------------------------------------------------------
# inputs checked before anything is deleted or generated; a folder never mixes runs
# --------------------------------------------------------------------------------------------
QUICK = dict(preset="fast", images_per_prompt=1, sampler_overrides={"steps": 1}, progress=False, val_records=0)


def test_bad_inputs_leave_the_previous_run_alone(pipe, data, tmp_path):
    out = tmp_path / "out"
    first = evaluate(pipe, data.test_geneval, out, max_prompts=3, **QUICK)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    # each is refused before the old images are deleted (these used to fail after generating a new set)
    with pytest.raises(ValueError, match="needs the synthetic manifest"):
        evaluate(pipe, data.test_geneval, out, max_prompts=1, validate=True, **QUICK)
    with pytest.raises(ValueError, match="unknown preset 'nonsense'"):
        evaluate(pipe, data.test_geneval, out, max_prompts=1, compare_to="nonsense", **QUICK)
    with pytest.raises(FileNotFoundError, match="manifest"):
        evaluate(pipe, data.test_geneval, out, max_prompts=1, manifest=tmp_path / "missing.jsonl", **QUICK)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert json.loads((out / "results.json").read_text())["overall"] == first["overall"]


def test_a_rerun_leaves_no_results_or_reports_of_the_previous_one(pipe, data, tmp_path):
    out = tmp_path / "out"
    evaluate(pipe, data.test_geneval, out, max_prompts=3, **QUICK)
    assert (out / "report.md").is_file() and (out / "grids").is_dir()
    again = evaluate(pipe, data.test_geneval, out, max_prompts=2, report=False, **QUICK)
    assert sorted(p.name for p in out.iterdir()) == ["images", "results.json", "results.jsonl"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000", "00001"]
    assert json.loads((out / "results.json").read_text())["prompts"] == again["prompts"] == 2
    # only what a run writes goes: a file of the user's own in plots/ or grids/ stays
    evaluate(pipe, data.test_geneval, out, max_prompts=2, **QUICK)
    (out / "plots" / "notes.txt").write_text("mine")
    evaluate(pipe, data.test_geneval, out, max_prompts=2, report=False, **QUICK)
    assert [p.name for p in (out / "plots").iterdir()] == ["notes.txt"] and not (out / "grids").exists()


def test_prompt_limits_under_one_are_refused(pipe, data, tmp_path, capsys):
    for kwargs in ({"max_prompts": 0}, {"max_prompts": -1}, {"max_per_tag": 0}):
        name = next(iter(kwargs))
        with pytest.raises(ValueError, match=f"{name} must be >= 1"):
            evaluate(pipe, data.test_geneval, tmp_path / "out", **kwargs, **QUICK)
    assert not (tmp_path / "out").exists()
    # the CLI names the flag, before any model loads (the checkpoint does not even exist)
    assert eval_main(["--ckpt", str(tmp_path / "missing"), "--prompts", str(data.test_geneval),
                      "--out", str(tmp_path / "out"), "--max-prompts", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == "lumina eval: error: --max-prompts must be >= 1 (or left out: all prompts), got -1\n"


# --------------------------------------------------------------------------------------------
# which weights were judged
# --------------------------------------------------------------------------------------------
def test_settings_record_the_weights_and_the_checkpoint(pipe, data, tmp_path):
    res = evaluate(pipe, data.test_geneval, tmp_path / "a", max_prompts=1, report=False, checkpoint="exports/s1",
                   ema=False, **QUICK)
    assert res["checkpoint"] == "exports/s1" and res["settings"]["ema"] is False
    with Image.open(tmp_path / "a" / "images/00000/samples/0000.png") as im:
        assert json.loads(im.text["lumina_settings"])["checkpoint"] == "exports/s1"
    # the model's own record wins over "auto" (load_nextdit sets weights_ema)
    pipe.model.weights_ema = True
    try:
        res = evaluate(pipe, data.test_geneval, tmp_path / "b", max_prompts=1, report=False, **QUICK)
    finally:
        del pipe.model.weights_ema
    assert res["settings"]["ema"] is True and res["checkpoint"] is None
    res = evaluate(pipe, data.test_geneval, tmp_path / "c", max_prompts=1, report=False, **QUICK)
    assert res["settings"]["ema"] is None  # an in-memory model that does not say


def test_pipeline_evaluations_say_which_export_and_weights(pipe, data, tmp_path):
    from types import SimpleNamespace

    from lumina_lightning.sampling.pipeline_io import save_pipeline
    from lumina_lightning.training.pipeline import EvalStep, _evaluate

    export = save_pipeline(tmp_path / "export", pipe.model, text_encoder_spec={"path": tiny_text_encoder(tmp_path)},
                           autoencoder_spec={"kind": "pixel"})
    cfg = SimpleNamespace(eval=EvalStep(prompts=str(data.test_geneval), manifest=None, preset="fast",
                                        images_per_prompt=1, max_prompts=1, steps=1, batch_size=4))
    raw = _evaluate(cfg, str(export), tmp_path / "raw", False, size=16)
    assert raw["checkpoint"] == str(export) and raw["settings"]["ema"] is False


# --------------------------------------------------------------------------------------------
# re-scoring a folder: the report and the MLflow run show exactly the scored images
# --------------------------------------------------------------------------------------------
def _artifact_files(client, run_id, path):
    files = []
    for a in client.list_artifacts(run_id, path):
        files += _artifact_files(client, run_id, a.path) if a.is_dir else [a.path]
    return files


def test_rescored_images_are_the_ones_reported_and_logged(evaluated, tmp_path, monkeypatch):
    import shutil

    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    src, _ = evaluated
    # the --out folder holds another run: more prompt folders than the scored set, and its own report
    other = tmp_path / "other"
    shutil.copytree(src, other)
    for i in range(6, 9):
        shutil.copytree(other / "images" / "00000", other / "images" / f"{i:05d}")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert eval_main(["--images", str(src / "images"), "--out", str(other), "--tracking-uri", uri]) == 0
    scored = sorted(f"images/{p.relative_to(src / 'images').as_posix()}" for p in (src / "images").rglob("*.png"))
    assert sorted(f"images/{p.relative_to(other / 'images').as_posix()}"
                  for p in (other / "images").rglob("*.png")) == scored
    rows = [json.loads(line) for line in (other / "results.jsonl").read_text().splitlines()]
    assert sorted(r["filename"] for r in rows) == scored
    # hard links, not second copies, on one file system
    assert all((other / f).stat().st_ino == (src / f).stat().st_ino for f in scored)
    run_id = json.loads((other / "results.json").read_text())["mlflow"]["run_id"]
    logged = _artifact_files(MlflowClient(tracking_uri=uri), run_id, "images")
    assert sorted(p for p in logged if p.endswith(".png")) == scored
    # relative links: the folder can move
    moved = tmp_path / "moved"
    other.rename(moved)
    html = (moved / "report.html").read_text()
    srcs = re.findall(r"<img src='([^']*)'", html)
    assert srcs and all(not s.startswith("/") and (moved / s).is_file() for s in srcs)
    # re-scoring a run's own folder in place keeps its images
    assert eval_main(["--images", str(moved / "images"), "--out", str(moved)]) == 0
    assert sorted(f"images/{p.relative_to(moved / 'images').as_posix()}"
                  for p in (moved / "images").rglob("*.png")) == scored


# --------------------------------------------------------------------------------------------
# MLflow: keys it accepts, its refusals as one line, artifacts on the server's side
# --------------------------------------------------------------------------------------------
def test_metric_keys_are_names_mlflow_accepts(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from lumina_lightning.eval.tracking import log_to_mlflow, metric_key

    assert metric_key("geneval/colors?") == "geneval/colors_" and metric_key("geneval/..") == "geneval/__"
    assert metric_key("time/total_s") == "time/total_s" and metric_key("a//b:c") == "a/_/b_c"
    monkeypatch.chdir(tmp_path)  # MLflow's ./mlartifacts goes here
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    results = {"overall": 0.5, "tags": {"colors?": 0.5, "../x": 0.5}, "settings": {"preset": "fast"}}
    (tmp_path / "out").mkdir()
    info = log_to_mlflow(results, tmp_path / "out", tracking_uri=uri, experiment="keys")
    run = MlflowClient(tracking_uri=uri).get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["geneval/colors_"] == 0.5 and run.data.metrics["geneval/__/x"] == 0.5


def test_cli_reports_an_mlflow_refusal_in_one_line(evaluated, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src, _ = evaluated
    rc = eval_main(["--images", str(src / "images"), "--out", str(tmp_path / "out"), "--tracking-uri", "nosuch://x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lumina eval: error: MLflow logging failed (results are in ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (tmp_path / "out" / "results.json").is_file()


def test_training_leaves_artifacts_to_a_tracking_server(tmp_path, monkeypatch):
    from types import SimpleNamespace as NS

    from lumina_lightning.training.session import make_logger

    monkeypatch.chdir(tmp_path)

    def cfg(uri, artifact_location=None):
        return NS(stage="s1", tracking=NS(enabled=True, tracking_uri=uri, artifact_location=artifact_location,
                                          experiment="e", run_name=None, tags={}))

    for uri in ("http://mlflow.example:5000", "https://mlflow.example", "databricks"):
        logger, used = make_logger(cfg(uri), NS(path="recipe.yaml"))
        assert used == uri and logger._artifact_location is None
    logger, _ = make_logger(cfg(f"sqlite:///{tmp_path / 'm.db'}"), NS(path="recipe.yaml"))
    assert logger._artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()
    logger, _ = make_logger(cfg("http://mlflow.example", "s3://bucket/a"), NS(path="recipe.yaml"))
    assert logger._artifact_location == "s3://bucket/a"  # an explicit location still wins


# --------------------------------------------------------------------------------------------
# SSIM of the sampler comparison
# --------------------------------------------------------------------------------------------
def _ssim_by_hand(x, y, window):
    """SSIM with a ``window``-px Gaussian of sigma 1.5 * window / 11 (Wang et al. 2004), the images
    reflection-padded and the map averaged over every pixel as torchmetrics does, written out here."""
    import torch
    import torch.nn.functional as F

    sigma = 1.5 * window / 11
    d = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(d ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(3, 1, window, window)
    pad = (window - 1) // 2

    def blur(t):
        return F.conv2d(F.pad(t, (pad,) * 4, mode="reflect"), k, groups=3)

    x, y = x.double()[None], y.double()[None]
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx.clamp(min=0) + vy.clamp(min=0) + c2))
    return float(s.mean())


def test_ssim_window_fits_small_images():
    from lumina_lightning.eval.metrics import _to_unit, image_fidelity

    rng = np.random.default_rng(0)

    def images(side):
        return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(2)]

    for side, window in ((8, 7), (16, 11), (4, 3), (5, 5)):
        a, b = images(side), images(side)
        got = image_fidelity(a, b)["ssim_per_image"]
        want = [_ssim_by_hand(x, y, window) for x, y in zip(_to_unit(a), _to_unit(b))]
        assert got == pytest.approx(want, abs=1e-5), side
    with pytest.raises(ValueError, match="SSIM needs images of at least 3 × 3 px, got 2 × 2"):
        image_fidelity(images(2), images(2))


def test_too_small_for_ssim_is_refused_before_generating(pipe, data, tmp_path):
    with pytest.raises(ValueError, match="SSIM needs images of at least 3 × 3 px"):
        evaluate(pipe, data.test_geneval, tmp_path / "out", max_prompts=1, width=2, height=2, compare_to="diffusers",
                 **QUICK)
    assert not (tmp_path / "out").exists()


def test_rescoring_images_honours_the_manifest_and_refuses_val_records(evaluated, data, tmp_path, capsys):
    """--images used to ignore --validate-detector / --manifest / --val-records silently."""
    src, first = evaluated
    rc = eval_main(["--images", str(src / "images"), "--out", str(tmp_path / "a"), "--validate-detector",
                    "--manifest", str(data.test), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "detector on ground-truth renders" in printed and "chance" in printed
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    dv, again = results["detector_validation"], first["detector_validation"]
    assert results["manifest"] == str(data.test)
    # the same checks a generating run makes, at the scored images' size
    assert dv["size"] == again["size"] and dv["overall"] == again["overall"] and dv["images"] == again["images"]
    assert results["prompt_blind"]["overall"] == pytest.approx(first["prompt_blind"]["overall"])
    assert results["undersized"] == first["undersized"]
    assert results["overall"] == first["overall"]
    # --validate-detector with no manifest to validate on is an error, not a no-op
    assert eval_main(["--images", str(src / "images"), "--out", str(tmp_path / "b"), "--validate-detector"]) == 2
    assert "--validate-detector needs --manifest" in capsys.readouterr().err
    # the validation loss needs the model: refused like the other generation-only flags
    with pytest.raises(SystemExit) as exit_:
        eval_main(["--images", str(src / "images"), "--out", str(tmp_path / "c"), "--manifest", str(data.test),
                   "--val-records", "5"])
    assert exit_.value.code == 2 and "--val-records would be ignored" in capsys.readouterr().err


def test_a_damaged_manifest_is_named_by_file_and_line_before_generating(pipe, data, tmp_path):
    """The detector validation reads the manifest after every image was generated, and `json.loads` of
    one line said "line 1" whichever line it was: the line is named, and nothing is generated."""
    from lumina_lightning.data.records import ManifestError

    lines = data.test.read_text().splitlines()
    lines[2] = lines[2][:40]  # a line cut short, as by an interrupted copy
    manifest = tmp_path / "test.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(ManifestError, match=rf"{re.escape(str(manifest))}:3: malformed JSON line"):
        evaluate(pipe, data.test_geneval, out, max_prompts=1, manifest=manifest, **QUICK)
    assert not (out / "images").exists()
