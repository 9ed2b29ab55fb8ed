"""Record formats: JSONL/JSON manifests, official shapes, image folders, data YAMLs with ratios."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumina_lightning.data.records import (
    ManifestError,
    Record,
    load_records,
    read_data_yaml,
    read_folder,
    read_manifest,
    write_manifest,
)


def _img(path: Path, size=(32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_round_trip(tmp_path):
    _img(tmp_path / "img" / "a.png")
    _img(tmp_path / "img" / "b.png")
    records = [
        Record(str(tmp_path / "img" / "a.png"), {"short": "a red thing", "long": "a long text", "long_de": "ein Text"},
               {"score": 0.9}, system="align", width=32, height=24),
        Record(str(tmp_path / "img" / "b.png"), {"caption": "just one"}),
    ]
    path = write_manifest(records, tmp_path / "m.jsonl")
    assert json.loads(path.read_text().splitlines()[0])["image"] == "img/a.png"  # relative on disk
    back = read_manifest(path, source="src")
    assert [r.image for r in back] == [r.image for r in records]
    assert back[0].captions == records[0].captions and back[0].meta == {"score": 0.9}
    assert (back[0].system, back[0].width, back[0].height) == ("align", 32, 24)
    assert back[1].captions == {"caption": "just one"} and back[1].source == "src"


def test_single_caption_and_json_list(tmp_path):
    rows = [{"image": "x.png", "caption": "hello", "extra": 1}, {"file_name": "y.png", "text": "hf style"}]
    _jsonl(tmp_path / "m.jsonl", rows)
    (tmp_path / "m.json").write_text(json.dumps(rows))
    for name in ("m.jsonl", "m.json"):
        recs = read_manifest(tmp_path / name)
        assert recs[0].captions == {"caption": "hello"} and recs[0].meta == {"extra": 1}
        assert recs[1].captions == {"caption": "hf style"}
        assert recs[0].image == str(tmp_path / "x.png")


def test_official_shapes_and_system_templates(tmp_path):
    rows = [
        {"image_path": "a.png", "prompt": "readme shape"},
        {"image_path": "b.png", "super_high_quality_caption": "dense caption"},
        {"path": "c.png", "prompt": "path prompt"},
        {"path": "d.png", "prompt": "own system", "system": "real"},
    ]
    recs = read_manifest(_jsonl(tmp_path / "m.jsonl", rows))
    assert [r.captions["caption"] for r in recs] == ["readme shape", "dense caption", "path prompt", "own system"]
    # spec §3: super_high_quality_caption -> align, path+prompt -> base; a record's own key wins
    assert [r.system for r in recs] == [None, "align", "base", "real"]
    # a source-level system overrides the shape default but not the record's own
    recs = read_manifest(tmp_path / "m.jsonl", system="aesthetics")
    assert [r.system for r in recs] == ["aesthetics", "aesthetics", "aesthetics", "real"]


def test_root_and_absolute_paths(tmp_path):
    rows = [{"image": "rel.png", "caption": "x"}, {"image": str(tmp_path / "abs.png"), "caption": "y"}]
    recs = read_manifest(_jsonl(tmp_path / "m.jsonl", rows), root=tmp_path / "images")
    assert recs[0].image == str(tmp_path / "images" / "rel.png")
    assert recs[1].image == str(tmp_path / "abs.png")


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"image": "a.png", "caption": "x"', "malformed JSON"),
        ('{"caption": "no image"}', "no image path"),
        ('{"image": "a.png"}', "no caption"),
        ('{"image": "a.png", "captions": ["x"]}', "captions"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "ok.png", "caption": "fine"}\n\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert f"{path}:3" in str(err.value) and expected in str(err.value)


def test_folder_with_txt_and_json_sidecars(tmp_path):
    _img(tmp_path / "b.png")
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "sub" / "c.png")
    _img(tmp_path / "nocap.png")
    (tmp_path / "a.txt").write_text("  caption of a \n")
    (tmp_path / "b.txt").write_text("caption of b")
    (tmp_path / "b.json").write_text(json.dumps({"captions": {"short": "b short"}, "system": "base", "score": 3}))
    (tmp_path / "sub" / "c.json").write_text(json.dumps({"prompt": "c prompt", "width": 32, "height": 24}))
    recs = read_folder(tmp_path)
    names = [Path(r.image).name for r in recs]
    assert names == ["a.jpg", "b.png", "nocap.png", "c.png"]
    by = dict(zip(names, recs))
    assert by["a.jpg"].captions == {"caption": "caption of a"}
    assert by["b.png"].captions == {"short": "b short", "caption": "caption of b"}
    assert by["b.png"].system == "base" and by["b.png"].meta == {"score": 3}
    assert by["c.png"].captions == {"caption": "c prompt"} and by["c.png"].width == 32
    assert by["nocap.png"].captions == {}  # kept, so the loader counts it as an empty caption
    assert len(load_records(tmp_path).records) == 4


def test_data_yaml_mixes_sources_with_ratios(tmp_path):
    _jsonl(tmp_path / "hq.jsonl", [{"image": f"h{i}.png", "caption": f"h{i}"} for i in range(10)])
    _jsonl(tmp_path / "web.jsonl", [{"image": f"w{i}.png", "caption": f"w{i}"} for i in range(20)])
    (tmp_path / "folder").mkdir()
    _img(tmp_path / "folder" / "f.png")
    (tmp_path / "folder" / "f.txt").write_text("folder caption")
    (tmp_path / "data.yaml").write_text(
        "META:\n"
        "  - path: hq.jsonl\n    ratio: 2.0\n    system: align\n"
        "  - path: web.jsonl\n    ratio: 0.25\n    root: imgs\n    type: jsonl\n"
        "  - path: folder\n"
    )
    rs = read_data_yaml(tmp_path / "data.yaml")
    assert len(rs.records) == 31 and [s.size for s in rs.sources] == [10, 20, 1]
    assert rs.records[0].system == "align" and rs.records[10].system is None
    assert rs.records[10].image == str(tmp_path / "imgs" / "w0.png")
    e0 = rs.epoch_indices(seed=0, epoch=0)
    counts = np.bincount(e0, minlength=31)
    assert (counts[:10] == 2).all() and counts[10:30].sum() == 5 and counts[30] == 1
    assert np.array_equal(e0, rs.epoch_indices(seed=0, epoch=0))  # deterministic
    assert not np.array_equal(e0, rs.epoch_indices(seed=0, epoch=1))  # a new web subset each epoch
    assert len(load_records(tmp_path / "data.yaml").records) == 31


def test_data_yaml_errors_are_clear(tmp_path):
    (tmp_path / "a.yaml").write_text("META: []\n")
    with pytest.raises(ManifestError, match="non-empty 'META'"):
        read_data_yaml(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("META:\n  - path: missing.jsonl\n")
    with pytest.raises(ManifestError, match="missing.jsonl not found"):
        read_data_yaml(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("META:\n  - path: b.yaml\n    ratoi: 1\n")
    with pytest.raises(ManifestError, match="unknown keys"):
        read_data_yaml(tmp_path / "c.yaml")


def test_negative_seed_draws_ratio_subsets(tmp_path):
    _jsonl(tmp_path / "web.jsonl", [{"image": f"w{i}.png", "caption": f"w{i}"} for i in range(20)])
    (tmp_path / "data.yaml").write_text("META:\n  - path: web.jsonl\n    ratio: 0.5\n")
    rs = read_data_yaml(tmp_path / "data.yaml")
    picked = rs.epoch_indices(seed=-1, epoch=0)
    assert len(picked) == 10 and np.array_equal(picked, rs.epoch_indices(seed=-1, epoch=0))


def test_caller_root_is_relative_to_the_cwd_for_manifests_and_data_yamls(tmp_path, monkeypatch):
    (tmp_path / "meta").mkdir()
    _jsonl(tmp_path / "meta" / "m.jsonl", [{"image": "a.png", "caption": "x"}])
    (tmp_path / "meta" / "mix.yaml").write_text("META:\n  - path: m.jsonl\n")
    (tmp_path / "meta" / "own.yaml").write_text("META:\n  - path: m.jsonl\n    root: pics\n")
    monkeypatch.chdir(tmp_path)
    want = str(tmp_path / "imgs" / "a.png")
    assert load_records("meta/m.jsonl", root="imgs").records[0].image == want
    assert load_records("meta/mix.yaml", root="imgs").records[0].image == want
    # a root written inside the YAML stays relative to the YAML's folder, and wins over the caller's
    assert load_records("meta/own.yaml", root="imgs").records[0].image == str(tmp_path / "meta" / "pics" / "a.png")


def test_data_yaml_key_given_twice_names_the_file_key_and_both_lines(tmp_path):
    """YAML keeps the last of two equal keys: a second `META:` would drop every source of the first
    silently, a second `ratio:` the intended weight."""
    import re

    _jsonl(tmp_path / "a.jsonl", [{"image": "a.png", "caption": "a"}])
    mix = tmp_path / "mix.yaml"
    mix.write_text("META:\n  - path: a.jsonl\nMETA:\n  - path: a.jsonl\n")
    with pytest.raises(ManifestError, match=rf"^{re.escape(str(mix))}: duplicate key `META` at lines 1 and 3"):
        read_data_yaml(mix)
    mix.write_text("META:\n  - path: a.jsonl\n    ratio: 2\n    ratio: 0.5\n")
    with pytest.raises(ManifestError, match=r"mix\.yaml: duplicate key `META\[0\].ratio` at lines 3 and 4"):
        load_records(mix)
