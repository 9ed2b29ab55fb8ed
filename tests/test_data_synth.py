"""Synthetic compositional data: determinism, held-out split, GenEval metadata, captions, rendering."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumina_lightning.data import synth
from lumina_lightning.data.records import load_records, read_manifest


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synth.generate_synthetic(tmp_path_factory.mktemp("s") / "d", 120, size=32, seed=0, n_test=36)


def test_same_seed_same_bytes(dataset, tmp_path):
    again = synth.generate_synthetic(tmp_path / "d", 120, size=32, seed=0, n_test=36, workers=2)
    assert _digest(again.root) == _digest(dataset.root)
    other = synth.generate_synthetic(tmp_path / "e", 120, size=32, seed=1, n_test=36)
    assert _digest(other.root)["train.jsonl"] != _digest(dataset.root)["train.jsonl"]


def test_holdout_split_is_disjoint(dataset):
    held = set(synth.DEFAULT_HOLDOUT)
    train, test = _rows(dataset.train), _rows(dataset.test)
    assert len(train) == 120 and len(test) == 36
    for row in train:
        assert not {(o["color"], o["class"]) for o in row["meta"]["objects"]} & held
    for row in test:
        assert {(o["color"], o["class"]) for o in row["meta"]["objects"]} & held
    # every colour and every shape still appears in training
    pairs = {(o["color"], o["class"]) for r in train for o in r["meta"]["objects"]}
    assert {c for c, _ in pairs} == set(synth.PALETTE) and {s for _, s in pairs} == set(synth.DEFAULT_SHAPES)
    # prompts naming a held-out pair never occur in training
    train_prompts = {r["meta"]["prompt"] for r in train}
    for row in test:
        if row["meta"]["tag"] in ("colors", "color_attr", "position", "counting"):
            assert row["meta"]["prompt"] not in train_prompts


def test_custom_holdout_and_errors(tmp_path):
    out = synth.generate_synthetic(tmp_path / "d", 30, size=32, seed=0, n_test=12, holdout="white:circle")
    assert all(("white", "circle") in {(o["color"], o["class"]) for o in r["meta"]["objects"]}
               for r in _rows(out.test))
    with pytest.raises(ValueError, match="colour:shape"):
        synth.parse_holdout("red-triangle")
    with pytest.raises(ValueError, match="every colour"):
        synth.generate_synthetic(tmp_path / "x", 6, holdout=[(c, "circle") for c in synth.PALETTE])
    assert synth.parse_holdout("none") == ()


def test_geneval_metadata_matches_the_render(dataset):
    rows = _rows(dataset.train) + _rows(dataset.test)
    tags = [r["meta"]["tag"] for r in _rows(dataset.train)]
    assert {t: tags.count(t) for t in synth.TAGS} == {t: 20 for t in synth.TAGS}  # balanced
    for row in rows:
        meta, objs = row["meta"], row["meta"]["objects"]
        img = np.asarray(Image.open(dataset.root / row["image"]))
        assert img.shape == (row["height"], row["width"], 3)
        count = sum(inc["count"] for inc in meta["include"])
        assert count == len(objs) and 1 <= len(objs) <= 4
        for inc in meta["include"]:
            match = [o for o in objs if o["class"] == inc["class"] and o.get("color") == inc.get("color", o["color"])]
            assert len(match) == inc["count"]
        assert meta["prompt"].startswith("a photo of ") and row["captions"]["prompt"] == meta["prompt"]
        bg = np.array(synth.BACKGROUNDS[meta["background"]])
        for o in objs:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"]
            centre = img[(y0 + y1 - 1) // 2, (x0 + x1 - 1) // 2]
            assert tuple(centre) == synth.PALETTE[o["color"]]  # solid fill, exact palette colour
        # flat colours only: every pixel is the background or an object colour
        colours = {tuple(c) for c in img.reshape(-1, 3)}
        assert colours <= {tuple(bg)} | {synth.PALETTE[o["color"]] for o in objs}
        if meta["tag"] == "position":
            ref, other = meta["include"]
            relation = other["position"][0]
            a = next(o for o in objs if o["class"] == other["class"])
            b = next(o for o in objs if o["class"] == ref["class"])
            ca, cb = np.add(a["bbox"][:2], a["bbox"][2:]) / 2, np.add(b["bbox"][:2], b["bbox"][2:]) / 2
            dx, dy = ca - cb
            assert {"left of": dx < -abs(dy), "right of": dx > abs(dy), "above": dy < -abs(dx),
                    "below": dy > abs(dx)}[relation]
        if meta["tag"] == "counting":
            assert meta["exclude"] == [{"class": objs[0]["class"], "count": len(objs) + 1}]


def test_captions_are_multi_level_and_dense(dataset):
    for row in _rows(dataset.train)[:30]:
        caps, meta = row["captions"], row["meta"]
        assert set(caps) == {"short", "medium", "long", "tags", "prompt"}
        assert meta["background"] in caps["medium"] and meta["background"] in caps["long"]
        for o in meta["objects"]:
            assert o["color"] in caps["long"] and o["class"] in caps["long"] and o["color"] in caps["tags"]
        assert len(caps["long"]) > len(caps["medium"]) > len(caps["short"])
    counting = next(r for r in _rows(dataset.train) if r["meta"]["tag"] == "counting")
    n = len(counting["meta"]["objects"])
    assert counting["captions"]["short"].startswith(synth.COUNT_WORDS[n])


def test_geneval_prompt_file(dataset):
    prompts = _rows(dataset.test_geneval)
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    assert {p["tag"] for p in prompts} == set(synth.TAGS)
    for p in prompts:
        assert set(p) <= {"tag", "include", "exclude", "prompt"} and p["include"]
    position = next(p for p in prompts if p["tag"] == "position")
    assert position["include"][1]["position"][1] == 0
    cfg = json.loads(dataset.config.read_text())
    assert cfg["holdout"] == [list(p) for p in synth.DEFAULT_HOLDOUT] and cfg["palette"]["red"] == [220, 40, 40]


def test_manifest_reads_as_records(dataset):
    recs = read_manifest(dataset.train)
    assert len(recs) == 120 and recs[0].width == 32 and Path(recs[0].image).is_file()
    assert recs[0].meta["tag"] == "single_object" and recs[0].captions["short"]


def test_subset_manifests_split_the_training_scenes_by_task(dataset):
    """train_hq.jsonl holds the multi-object scenes, train_single.jsonl the one-object ones (stages 1 and 3
    of recipes/tiny/shapes_pipeline.yaml), each in the training manifest's order; single_mix.yaml reads
    every scene plus the one-object scenes again."""
    train = _rows(dataset.train)
    hq, single = _rows(dataset.train_hq), _rows(dataset.train_single)
    assert {r["meta"]["tag"] for r in hq} == set(synth.HQ_TAGS)
    assert {r["meta"]["tag"] for r in single} == set(synth.SINGLE_TAGS)
    assert all(len(r["meta"]["objects"]) == 1 for r in single)
    assert all(len(r["meta"]["objects"]) >= 2 or r["meta"]["tag"] == "counting" for r in hq)
    assert single == [r for r in train if r["meta"]["tag"] in synth.SINGLE_TAGS]
    assert len(hq) + len(single) == len(train)
    mix = load_records(dataset.single_mix)
    assert [r.meta["id"] for r in mix.records] == [r["meta"]["id"] for r in single + train]
    assert len(mix.epoch_indices(seed=0, epoch=0)) == len(single) + len(train)


def test_palette_is_well_separated():
    cols = np.array(list(synth.PALETTE.values()), float)
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1)
    assert d[np.triu_indices(len(cols), 1)].min() > 100
    for bg in synth.BACKGROUNDS.values():
        assert np.linalg.norm(cols - np.array(bg), axis=-1).min() > 100


@pytest.mark.parametrize("shape", synth.SHAPES)
def test_render_scene_api(shape):
    scene = synth.Scene("colors", 32, 32, "black", [synth.SceneObject(shape, "yellow", (4, 4, 28, 28))])
    img = np.asarray(synth.render_scene(scene))
    fill = (img == synth.PALETTE["yellow"]).all(-1)[4:28, 4:28].mean()
    expected = {"square": 1.0, "circle": 0.785, "cross": 0.64, "triangle": 0.5}[shape]
    assert abs(fill - expected) < 0.08
    rebuilt = synth.scene_from_meta({"tag": "colors", "background": "black",
                                     "objects": [{"class": shape, "color": "yellow", "bbox": [4, 4, 28, 28]}]}, 32, 32)
    assert np.array_equal(np.asarray(synth.render_scene(rebuilt)), img)


def test_aspects_and_cli(tmp_path, capsys):
    from lumina_lightning.data.cli import main

    rc = main(["synth", "--out", str(tmp_path / "d"), "--n", "24", "--n-test", "6", "--size", "64",
               "--aspect", "1:1,2:1", "--seed", "3", "--shapes", "circle,square,triangle,cross"])
    assert rc == 0 and "wrote 24 train + 6 test" in capsys.readouterr().out
    sizes = {(r["width"], r["height"]) for r in _rows(tmp_path / "d" / "train.jsonl")}
    assert sizes <= {(64, 64), (96, 48)} and len(sizes) == 2
    assert main(["synth", "--out", str(tmp_path / "e"), "--n", "6", "--holdout", "red:hexagon"]) == 2
    assert "unknown hold-out pair" in capsys.readouterr().err


def test_interrupted_generation_is_redone(tmp_path):
    from types import SimpleNamespace

    from lumina_lightning.training.run import ensure_synthetic

    out = synth.generate_synthetic(tmp_path / "d", 8, size=32, seed=0, n_test=6)
    assert out.config.is_file() and not list(Path(out.root).glob("*.tmp"))
    # a run killed after the manifests but before the completion marker: data.path exists, yet the
    # dataset must be generated again rather than trusted
    expected = out.train.read_text()
    out.config.unlink()
    (out.root / synth.INCOMPLETE_MARKER).write_text("")  # what the generator leaves until it finishes
    out.train.write_text(expected[: len(expected) // 2])
    spec = {"n": 8, "size": 32, "seed": 0, "n_test": 6}
    ensure_synthetic(SimpleNamespace(data=SimpleNamespace(synthetic=spec, path=str(out.train))))
    assert out.train.read_text() == expected and out.config.is_file()


def test_an_interrupted_regeneration_does_not_pass_for_complete(tmp_path, monkeypatch):
    """Regenerating over a complete set removes its marker first: killed half-way, the folder (old and
    new images mixed) must not look complete to the next run."""
    out = synth.generate_synthetic(tmp_path / "d", 8, size=32, seed=0, n_test=6)
    assert synth.synthetic_complete(out.root)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_run_job", killed)
    with pytest.raises(KeyboardInterrupt):
        synth.generate_synthetic(out.root, 8, size=48, seed=0, n_test=6)
    assert not synth.synthetic_complete(out.root)


def test_data_synthetic_never_generates_over_a_users_folder(tmp_path):
    """A tiny recipe (which carries data.synthetic) pointed at the user's own manifest must not render
    a synthetic set over it; an unfinished generation (its marker) is redone."""
    from types import SimpleNamespace

    from lumina_lightning.training.run import ensure_synthetic

    spec = {"n": 8, "size": 32, "seed": 0, "n_test": 6}
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "train.jsonl").write_text('{"image": "images/a.png", "caption": "mine"}\n')
    for path in (mine / "train.jsonl", mine / "other.jsonl"):
        with pytest.raises(ValueError, match=r"holds files but no synthetic dataset.*data.synthetic=null"):
            ensure_synthetic(SimpleNamespace(data=SimpleNamespace(synthetic=spec, path=str(path))))
    assert (mine / "train.jsonl").read_text() == '{"image": "images/a.png", "caption": "mine"}\n'
    assert not (mine / "test.jsonl").exists()
    out = synth.generate_synthetic(tmp_path / "d", 8, size=32, seed=0, n_test=6)
    assert not (out.root / synth.INCOMPLETE_MARKER).exists()  # removed once complete
