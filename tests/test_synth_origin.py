"""Who made a synthetic set (``synth_config.json``'s ``origin``) decides whether a recipe's
``data.synthetic`` may regenerate it: a ``lumina data synth`` set is the user's and is never written over."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from lumina_lightning.data import synth
from lumina_lightning.data.cli import main as data_main
from lumina_lightning.training.run import ensure_synthetic

SMALL = {"n": 8, "n_test": 6, "size": 16, "seed": 0}
OTHER = {"n": 10, "n_test": 6, "size": 16, "seed": 0}


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _ensure(folder: Path, spec: dict) -> None:
    ensure_synthetic(SimpleNamespace(data=SimpleNamespace(path=str(folder / "train.jsonl"), synthetic=spec)))


def _origin(folder: Path) -> str | None:
    return json.loads((folder / synth.COMPLETE_MARKER).read_text()).get("origin")


def _cli_set(folder: Path, spec: dict) -> None:
    argv = ["synth", "--out", str(folder), "--n", str(spec["n"]), "--n-test", str(spec["n_test"]),
            "--size", str(spec["size"]), "--seed", str(spec["seed"])]
    assert data_main(argv) == 0


def test_user_made_set_that_differs_is_refused_and_untouched(tmp_path):
    folder = tmp_path / "synth"
    _cli_set(folder, SMALL)
    assert _origin(folder) == "cli"
    before = _digest(folder)
    with pytest.raises(ValueError) as err:
        _ensure(folder, OTHER)
    message = str(err.value)
    assert "lumina data synth" in message and "n_train 8 -> 10" in message
    assert "data.synthetic=null" in message and "point data.path into another folder" in message
    assert _digest(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]  # nothing moved aside, no lock left


def test_recipe_made_set_that_differs_is_regenerated_in_place(tmp_path):
    folder = tmp_path / "synth"
    _ensure(folder, SMALL)
    assert _origin(folder) == "recipe"
    _ensure(folder, OTHER)
    assert len((folder / "train.jsonl").read_text().splitlines()) == 10
    assert _origin(folder) == "recipe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


def test_set_of_unknown_origin_that_differs_is_moved_aside_not_deleted(tmp_path, caplog):
    folder = tmp_path / "synth"
    synth.generate_synthetic(folder, **SMALL)  # what every earlier version wrote: no origin
    assert _origin(folder) is None
    before = _digest(folder)
    with caplog.at_level(logging.WARNING, logger="lumina_lightning.train"):
        _ensure(folder, OTHER)
    (aside,) = [p for p in tmp_path.iterdir() if p.name != "synth"]
    assert aside.name.startswith("synth.replaced-") and _digest(aside) == before
    assert str(aside) in caplog.text and "n_train 8 -> 10" in caplog.text
    assert len((folder / "train.jsonl").read_text().splitlines()) == 10 and _origin(folder) == "recipe"


def test_identical_set_is_reused_whoever_made_it_and_keeps_its_maker(tmp_path):
    for name, make in (("cli", lambda f: _cli_set(f, SMALL)), ("legacy", lambda f: synth.generate_synthetic(f, **SMALL)),
                       ("recipe", lambda f: _ensure(f, SMALL))):
        folder = tmp_path / name
        make(folder)
        origin = _origin(folder)
        stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
        _ensure(folder, dict(SMALL))
        assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamps, name
        # a file of the set gone: regenerated with the same arguments, and still the same maker's
        (folder / "train.jsonl").unlink()
        _ensure(folder, dict(SMALL))
        assert (folder / "train.jsonl").is_file() and _origin(folder) == origin, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli", "legacy", "recipe"]


def test_origin_is_not_a_data_synthetic_argument(tmp_path):
    with pytest.raises(ValueError, match=r"data.synthetic: unknown synthetic dataset arguments \['origin'\]"):
        _ensure(tmp_path / "synth", {**SMALL, "origin": "cli"})
    with pytest.raises(ValueError, match="origin must be one of"):
        synth.generate_synthetic(tmp_path / "x", 2, size=16, origin="user")
