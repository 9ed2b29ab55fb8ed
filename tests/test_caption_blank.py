"""``lumina caption`` and blank captions: counted per level, warned about once, left out of the records."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from lumina_lightning.data.records import load_records, record_to_dict
from lumina_lightning.modules.caption_cli import caption_manifest, main
from lumina_lightning.modules.unicap import load_captioner
from test_unicap_helpers import tiny_vlm
from training_utils import tiny_synthetic

LEVELS = ["short", "tags"]


@pytest.fixture(scope="module")
def mute_vlm(tmp_path_factory) -> Path:
    """The tiny test VLM with a generation config that biases its end-of-turn token first: a real
    model whose every answer ends at once (what an undertrained captioner can do), decoding to ""."""
    folder = tmp_path_factory.mktemp("mute") / "vlm"
    shutil.copytree(tiny_vlm(), folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config["sequence_bias"] = [[[int(config["eos_token_id"])], 100.0]]
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def _input(tmp: Path, n: int = 3) -> tuple[Path, list]:
    records = load_records(tiny_synthetic() / "train.jsonl").records[:n]
    path = tmp / "input.jsonl"
    path.write_text("".join(json.dumps(record_to_dict(r)) + "\n" for r in records))
    return path, records


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _blank_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "blank caption" in r.getMessage()]


def test_blank_captions_are_counted_per_level_left_out_and_warned_once(tmp_path, mute_vlm, caplog):
    inp, records = _input(tmp_path)
    captioner = load_captioner(mute_vlm)
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING, logger="lumina_lightning.caption"):
        report = caption_manifest(captioner, inp, out, LEVELS, batch_size=2, generation={"max_new_tokens": 4},
                                  progress=False)
    assert report.written == 3 and report.batches == 2
    assert report.blank == {"short": 3, "tags": 3} and report.uncaptioned == 3
    assert report.blank_images == [r.image for r in records]
    (warning,) = _blank_warnings(caplog)  # once for the run, not once per batch
    assert "6 blank caption(s) (short 3, tags 3)" in warning and records[0].image in warning
    assert "3 record(s) have no caption at all" in warning
    # no "" levels in the manifest: the records are written (a rerun resumes past them) with no caption
    assert [row["captions"] for row in _rows(out)] == [{}, {}, {}]
    assert all(r.captions == {} for r in load_records(out).records)

    # --keep-captions keeps the input's other levels; a generated level replaces the input's, so a blank one
    # removes it (the input's caption must not pass for the captioner's, e.g. under --eval)
    kept = caption_manifest(captioner, inp, tmp_path / "kept.jsonl", LEVELS, generation={"max_new_tokens": 4},
                            keep_captions=True, progress=False)
    assert kept.blank == {"short": 3, "tags": 3}
    assert [row["captions"] for row in _rows(tmp_path / "kept.jsonl")] == [
        {k: v for k, v in r.captions.items() if k not in LEVELS} for r in records]
    assert any(r.captions.get("short") for r in records)  # there was an input caption to (not) keep


def test_keep_captions_eval_scores_the_captioner_not_the_input(tmp_path, mute_vlm, capsys):
    inp, _ = _input(tmp_path, n=3)
    argv = ["--model", str(mute_vlm), "--input", str(inp), "--output", str(tmp_path / "out.jsonl"), "--levels",
            "short", "--max-new-tokens", "4", "--no-progress", "--device", "cpu", "--keep-captions", "--eval"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out.jsonl.eval.json").read_text())
    assert result["n"] == 3 and (result["color"], result["shape"], result["all"]) == (0.0, 0.0, 0.0)


def test_captions_that_are_not_blank_are_not_counted(tmp_path, caplog):
    inp, _ = _input(tmp_path, n=2)
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING, logger="lumina_lightning.caption"):
        report = caption_manifest(load_captioner(tiny_vlm()), inp, out, LEVELS, generation={"max_new_tokens": 2},
                                  progress=False)
    assert report.blank == {"short": 0, "tags": 0} and report.blank_total == 0 and report.uncaptioned == 0
    assert not _blank_warnings(caplog)
    assert all(set(row["captions"]) == set(LEVELS) and all(row["captions"].values()) for row in _rows(out))


def test_cli_summary_names_the_blank_counts(tmp_path, mute_vlm, capsys):
    inp, _ = _input(tmp_path, n=2)
    argv = ["--model", str(mute_vlm), "--input", str(inp), "--output", str(tmp_path / "out.jsonl"),
            "--levels", ",".join(LEVELS), "--max-new-tokens", "4", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4 blank caption(s) (short 2, tags 2) left out of the records" in out
    assert "2 record(s) left with no caption" in out
