"""``lumina caption``: resumable batched captioning into a manifest the generation recipes train on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lumina_lightning.data.records import load_records, record_to_dict
from lumina_lightning.modules.caption_cli import caption_manifest, main, read_done, skipped_path
from lumina_lightning.modules.unicap import load_captioner
from lumina_lightning.training.recipe import load_recipe
from lumina_lightning.training.run import train
from lumina_lightning.training.unicap_run import train_unicap
from test_unicap_helpers import bad_images, unicap_recipe
from training_utils import tiny_recipe, tiny_synthetic


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A briefly trained tiny captioner (it says short colour/shape phrases, not empty strings)."""
    tmp = tmp_path_factory.mktemp("captioner")
    recipe = unicap_recipe(tmp, trainer={"max_steps": 30}, data={"level_weights": {"short": 0.7, "tags": 0.3}},
                           validation={"eval_samples": 0})
    result = train_unicap(load_recipe(recipe))
    assert result.export_dir is not None
    return result.export_dir


@pytest.fixture(scope="module")
def captioner(export):
    return load_captioner(export)


def _input_manifest(tmp: Path, n: int = 9) -> tuple[Path, list[str]]:
    """``n`` synthetic records with an unreadable and a missing image among them."""
    records = load_records(tiny_synthetic() / "train.jsonl").records[:n]
    broken, missing = bad_images(tmp / "bad")
    rows = [record_to_dict(r) for r in records]
    rows.insert(2, {"image": str(broken), "captions": {"short": "x"}})
    rows.insert(6, {"image": str(missing), "captions": {"short": "y"}})
    path = tmp / "input.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [r.image for r in records]


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_without_duplicates_to_the_same_result(tmp_path, captioner):
    inp, good = _input_manifest(tmp_path)
    straight = caption_manifest(captioner, inp, tmp_path / "a" / "out.jsonl", ["short", "tags"], batch_size=4,
                                progress=False)
    assert straight.written == 9 and straight.batches == 3 and straight.complete
    assert sorted(e["reason"] for e in straight.skipped) == ["missing_file", "unreadable_image"]

    out = tmp_path / "b" / "out.jsonl"

    def stop_after_first(batch: int, written: int) -> None:
        assert written == 3  # batch 1 = 4 records, one of them unreadable
        raise Interrupt

    with pytest.raises(Interrupt):
        caption_manifest(captioner, inp, out, ["short", "tags"], batch_size=4, progress=False,
                         on_batch=stop_after_first)
    assert len(out.read_text().splitlines()) == 3 and len(skipped_path(out).read_text().splitlines()) == 1
    resumed = caption_manifest(captioner, inp, out, ["short", "tags"], batch_size=4, progress=False)
    # 3 records already in the output; the unreadable image of batch 1 is reported apart
    assert resumed.already_done == 3 and resumed.previously_skipped == 1 and resumed.written == 6 and resumed.complete
    assert [e["reason"] for e in resumed.skipped] == ["missing_file"]  # only the one not reported before
    # identical to the uninterrupted run, line for line (same batches, greedy decoding)
    assert out.read_text() == (tmp_path / "a" / "out.jsonl").read_text()
    again = caption_manifest(captioner, inp, out, ["short", "tags"], batch_size=4, progress=False)
    assert again.written == 0 and again.already_done == 9 and again.previously_skipped == 2

    # the manifest reads back in the data pipeline's record format, no duplicates, bad images absent
    records = load_records(out).records
    assert [r.image for r in records] == good
    for r in records:
        assert set(r.captions) == {"short", "tags"} and r.captions["short"].strip()
        assert r.width == r.height == 16 and r.meta["objects"]  # the input's metadata travels along
    assert read_done(out, include_skipped=False) == set(good)
    # --retry-skipped tries the unreadable images again (and skips them again)
    retry = caption_manifest(captioner, inp, out, ["short", "tags"], batch_size=4, progress=False,
                             retry_skipped=True)
    assert retry.written == 0 and len(retry.skipped) == 2


def test_torn_last_line_is_dropped_and_redone(tmp_path, captioner):
    inp, good = _input_manifest(tmp_path, n=5)
    out = tmp_path / "out.jsonl"
    caption_manifest(captioner, inp, out, ["short"], batch_size=8, progress=False)
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    report = caption_manifest(captioner, inp, out, ["short"], batch_size=8, progress=False)
    assert report.written == 1 and out.read_text() == full


def test_cli_relative_paths_generation_flags_and_eval(tmp_path, export, capsys):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = []
    for r in load_records(tiny_synthetic() / "test.jsonl").records[:6]:
        dst = data / "images" / Path(r.image).name
        shutil.copy(r.image, dst)
        rows.append({"image": f"images/{dst.name}", "captions": r.captions, "meta": r.meta})
    (data / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = data / "out.jsonl"
    code = main(["--model", str(export), "--input", str(data / "in.jsonl"), "--output", str(out),
                 "--levels", "short,medium", "--max-new-tokens", "6", "--batch-size", "4", "--no-progress", "--eval"])
    assert code == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["image"] for x in lines] == [r["image"] for r in rows]  # relative to the new manifest
    assert all(set(x["captions"]) == {"short", "medium"} for x in lines)
    result = json.loads(out.with_name("out.jsonl.eval.json").read_text())
    assert result["n"] == 6 and result["level"] == "short" and 0.0 <= result["color"] <= 1.0
    assert "attribute accuracy" in capsys.readouterr().out
    # sampling settings are accepted; a folder input works; unknown levels and missing models are errors
    folder_out = tmp_path / "folder.jsonl"
    assert main(["--model", str(export), "--input", str(data / "images"), "--output", str(folder_out),
                 "--levels", "tags", "--sample", "--temperature", "0.9", "--top-p", "0.8", "--no-progress"]) == 0
    assert len(load_records(folder_out).records) == 6
    assert main(["--model", str(export), "--input", str(data / "in.jsonl"), "--output", str(tmp_path / "x.jsonl"),
                 "--levels", "poem"]) == 2
    assert main(["--model", str(tmp_path / "nope"), "--input", str(data / "in.jsonl"),
                 "--output", str(tmp_path / "y.jsonl")]) == 2
    assert f"--model {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_written_captions_train_the_tiny_generation_recipe(tmp_path, captioner):
    out = tmp_path / "captions" / "train_unicap.jsonl"
    report = caption_manifest(captioner, tiny_synthetic() / "train.jsonl", out, ["short", "tags"], batch_size=16,
                              limit=16, generation={"max_new_tokens": 12}, progress=False)
    assert report.written == 16
    records = load_records(out).records
    assert all(r.captions["short"].strip() for r in records)
    recipe = tiny_recipe(tmp_path, data={"path": str(out), "val_path": None, "caption_weights": {"short": 1.0}},
                         trainer={"max_steps": 2, "checkpoint_every_n_steps": 2})
    result = train(load_recipe(recipe))
    assert result.exit_code == 0 and result.global_step == 2 and result.export_dir is not None


def test_rerun_with_other_settings_is_refused_or_replaced(tmp_path, captioner, export, capsys, caplog):
    """The output records what it was written with (<output>.caption.json): a rerun with another
    model, levels or generation settings would mix captions, so it is refused unless
    --on-mismatch replace, which moves the old files aside (never deletes) and starts afresh."""
    from lumina_lightning.modules.caption_cli import SettingsMismatch, settings_path

    inp, good = _input_manifest(tmp_path, n=3)
    out = tmp_path / "out.jsonl"
    first = caption_manifest(captioner, inp, out, ["short"], batch_size=8, progress=False)
    assert first.written == 3
    recorded = json.loads(settings_path(out).read_text())
    assert recorded["levels"] == ["short"] and recorded["captioner"]["path"] == str(export.resolve())
    assert recorded["captioner"]["weights"] and recorded["input"] == str(inp.resolve())
    before = out.read_text()

    with pytest.raises(SettingsMismatch, match=r"levels \['short'\] then, \['tags'\] now"):
        caption_manifest(captioner, inp, out, ["tags"], batch_size=8, progress=False)
    with pytest.raises(SettingsMismatch, match="generation.max_new_tokens 12 then, 5 now"):
        caption_manifest(captioner, inp, out, ["short"], generation={"max_new_tokens": 5}, progress=False)
    with pytest.raises(SettingsMismatch, match="limit None then, 2 now"):
        caption_manifest(captioner, inp, out, ["short"], limit=2, progress=False)
    other = tmp_path / "other-export"
    shutil.copytree(export, other)
    with pytest.raises(SettingsMismatch, match=f"captioner.path '{export.resolve()}' then, '{other.resolve()}' now"):
        caption_manifest(load_captioner(other), inp, out, ["short"], progress=False)
    assert out.read_text() == before  # a refusal leaves everything as it was
    # same settings (a greedy run's seed does not matter): resumes
    again = caption_manifest(captioner, inp, out, ["short"], seed=7, progress=False)
    assert again.written == 0 and again.already_done == 3

    args = ["--model", str(export), "--input", str(inp), "--output", str(out), "--levels", "tags", "--no-progress"]
    capsys.readouterr()
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the loading bar
    assert len(err) == 1 and err[0].startswith("error: ")
    err = err[0]
    assert "levels ['short'] then, ['tags'] now" in err and "--on-mismatch replace" in err
    assert main(args + ["--on-mismatch", "replace"]) == 0
    moved = sorted(p.name for p in tmp_path.glob("out.jsonl*.replaced-*"))
    assert len(moved) == 3 and moved[0].startswith("out.jsonl.caption.json.replaced-")
    assert (tmp_path / [m for m in moved if m.startswith("out.jsonl.replaced-")][0]).read_text() == before
    assert all(set(r.captions) == {"tags"} for r in load_records(out).records)
    assert json.loads(settings_path(out).read_text())["levels"] == ["tags"]

    # an output an older version wrote (no settings file) resumes as before, with a warning
    settings_path(out).unlink()
    with caplog.at_level("WARNING"):
        legacy = caption_manifest(captioner, inp, out, ["short"], progress=False)
    assert legacy.written == 0 and legacy.already_done == 3 and "older version" in caplog.text


def test_rerun_reports_earlier_unreadable_images_and_keeps_its_exit_code(tmp_path, export, capsys):
    """Images an earlier run found unreadable are not "already done", and a rerun that changes
    nothing answers what the first run answered."""
    broken, missing = bad_images(tmp_path / "bad")
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"image": str(p), "captions": {"short": "x"}}) + "\n" for p in (broken, missing)))
    args = ["--model", str(export), "--input", str(inp), "--output", str(tmp_path / "out.jsonl"), "--levels", "short",
            "--no-progress", "--device", "cpu"]
    assert main(args) == 1  # nothing could be captioned
    first = capsys.readouterr().out
    assert "0 already done, 2 unreadable" in first
    assert main(args) == 1
    rerun = capsys.readouterr().out
    assert "0 already done, 2 skipped earlier as unreadable" in rerun and "0 unreadable" in rerun

    mixed, good = _input_manifest(tmp_path / "m", n=2)
    out = tmp_path / "mixed.jsonl"
    args = ["--model", str(export), "--input", str(mixed), "--output", str(out), "--levels", "short", "--no-progress"]
    assert main(args) == 0 and main(args) == 0
    assert "2 already done, 2 skipped earlier as unreadable" in capsys.readouterr().out


def test_pipeline_reuses_the_captioner_and_replaces_captions_written_otherwise(tmp_path, monkeypatch, export):
    """`lumina pipeline` with UniCap on, run again: the captioner is not trained again and its captions
    are kept; other levels or a retrained captioner replace the captions (the old ones moved aside),
    never resume them."""
    import types

    from lumina_lightning.training import pipeline as pl

    trained = []

    def fake_train_unicap(loaded):  # the real captioner's weights, "trained" into the run's folder
        trained.append(loaded.config.output_dir)
        dest = Path(loaded.config.output_dir) / "export"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(export, dest, copy_function=shutil.copy)  # new mtimes, as retrained weights have
        return types.SimpleNamespace(export_dir=dest, exit_code=0, stopped_by_signal=None, metrics={"all": 0.5})

    monkeypatch.setattr("lumina_lightning.training.unicap_run.train_unicap", fake_train_unicap)
    out = tmp_path / "out"
    recipes = Path(__file__).resolve().parents[1] / "recipes"

    def run(*extra):
        cfg = pl.load_pipeline_config(recipes / "tiny" / "pipeline.yaml",
                                      [f"output_dir={out}", "unicap.limit=3", "unicap.max_new_tokens=8", *extra])
        summary = {}
        manifest = pl._unicap(cfg, tiny_synthetic(), summary, False)
        levels = [sorted(json.loads(x)["captions"]) for x in manifest.read_text().splitlines()]
        assert levels and all(found == sorted(cfg.unicap.levels) for found in levels), levels
        return manifest, summary["unicap"], levels

    manifest, info, levels = run()
    assert len(trained) == 1 and not info["reused"] and len(levels) == 3
    first = manifest.read_text()
    manifest, info, _ = run()  # unchanged: reused, and the captions kept as they were
    assert len(trained) == 1 and info["reused"] and manifest.read_text() == first
    assert not list(out.glob("**/*.replaced-*"))

    manifest, info, levels = run("unicap.levels=[short]")
    assert len(trained) == 1 and info["reused"] and levels == [["short"]] * 3
    assert len(list((out / "captions").glob("train_unicap.jsonl.replaced-*"))) == 1

    manifest, info, levels = run("unicap.levels=[short]", "unicap.overrides=[optim.lr=1.0e-3]")  # another recipe
    assert len(trained) == 2 and not info["reused"] and levels == [["short"]] * 3
    assert len(list(out.glob("unicap.replaced-*"))) == 1  # the old captioner kept aside, not resumed
    assert len(list((out / "captions").glob("train_unicap.jsonl.replaced-*"))) == 2  # new weights, new captions
