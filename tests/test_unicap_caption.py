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
    assert resumed.already_done == 4 and resumed.written == 6 and resumed.complete
    assert [e["reason"] for e in resumed.skipped] == ["missing_file"]  # only the one not reported before
    # identical to the uninterrupted run, line for line (same batches, greedy decoding)
    assert out.read_text() == (tmp_path / "a" / "out.jsonl").read_text()
    again = caption_manifest(captioner, inp, out, ["short", "tags"], batch_size=4, progress=False)
    assert again.written == 0 and again.already_done == 11

    # the manifest reads back in the data pipeline's record format, no duplicates, bad images absent
    records = load_records(out).records
    assert [r.image for r in records] == good
    for r in records:
        assert set(r.captions) == {"short", "tags"} and r.captions["short"].strip()
        assert r.width == r.height == 16 and r.meta["objects"]  # the input's metadata travels along
    assert read_done(out, include_skipped=False) == set(good)
    # --retry-skipped tries the unreadable images again (and skips them again)
    retry = caption_manifest(captioner, inp, out, ["short"], batch_size=4, progress=False, retry_skipped=True)
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
