"""The prompt-blind chance level of mini-GenEval, checked against counts taken from the metadata."""

from __future__ import annotations

import json

import pytest

from lumina_lightning.data import synth
from lumina_lightning.eval.metrics import prompt_blind_baseline


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth.generate_synthetic(tmp_path_factory.mktemp("synth"), 0, size=64, seed=1, n_test=60)


def _single_object_classes(manifest):
    rows = [json.loads(line) for line in open(manifest, encoding="utf-8")]
    return [r["meta"]["objects"][0]["class"] for r in rows if r["meta"]["tag"] == "single_object"]


def _spec(cls):
    return {"tag": "single_object", "prompt": f"a photo of a {cls}", "include": [{"class": cls, "count": 1}]}


def test_single_object_chance_is_the_share_of_each_shape(data):
    classes = _single_object_classes(data.test)
    n = len(classes)
    assert n >= 6 and len(set(classes)) >= 2
    share = {c: classes.count(c) / n for c in synth.DEFAULT_SHAPES}
    # a prompt-blind model draws a random single-object scene: "a photo of a circle" passes exactly
    # when that scene is a circle (the detector is exact on these renders)
    res = prompt_blind_baseline([_spec("circle")], data.test)
    assert res["tags"] == {"single_object": pytest.approx(share["circle"])}
    assert res["images"] == {"single_object": n} and res["missing_tags"] == []
    # tags are averaged over images: 1 image of the circle prompt, 3 of the square prompt
    res = prompt_blind_baseline([_spec("circle"), _spec("square")], data.test, weights=[1, 3])
    assert res["overall"] == pytest.approx((share["circle"] + 3 * share["square"]) / 4)


def test_every_tag_scores_between_zero_and_its_ground_truth(data):
    from lumina_lightning.eval.geneval import read_metadata
    from lumina_lightning.eval.metrics import validate_detector

    specs = read_metadata(data.test_geneval)
    res = prompt_blind_baseline(specs, data.test, size=(32, 32))
    gt = validate_detector(data.test)
    assert set(res["tags"]) == set(gt["tags"])
    for tag, acc in res["tags"].items():
        # ignoring the prompt can only lose: the same renders scored against their own prompts pass
        assert 0.0 <= acc < gt["tags"][tag]
    assert res["overall"] == pytest.approx(sum(res["tags"].values()) / len(res["tags"]))


def test_missing_tags_and_bad_weights(data):
    rows = [json.loads(line) for line in open(data.test, encoding="utf-8")]
    only_colors = [r for r in rows if r["meta"]["tag"] == "colors"]
    res = prompt_blind_baseline([_spec("circle")], only_colors, root=data.test.parent)
    assert res["tags"] == {} and res["overall"] is None and res["missing_tags"] == ["single_object"]
    with pytest.raises(ValueError, match="one weight per prompt"):
        prompt_blind_baseline([_spec("circle")], data.test, weights=[1, 2])
