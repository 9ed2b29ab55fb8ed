"""Attribute accuracy: the parser agrees with the generator's own captions, and catches wrong ones."""

from __future__ import annotations

import pytest

from lumina_lightning.modules.unicap_eval import (
    attribute_accuracy,
    evaluate_manifest,
    format_accuracy,
    parse_caption,
    truth_from_meta,
)
from training_utils import tiny_synthetic


@pytest.mark.parametrize("level", ["short", "medium", "long", "tags", "prompt"])
def test_generator_captions_score_perfectly(level):
    # every caption level the synthetic generator writes is parsed back to its own metadata
    result = evaluate_manifest(tiny_synthetic() / "train.jsonl", level)
    assert result["n"] == 96
    for key in ("color", "shape", "count", "binding", "all"):
        assert result[key] == 1.0, (key, result)
    assert set(result["by_tag"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert "| color | 1.000 |" in format_accuracy(result)


def test_parser_reads_counts_colours_shapes_and_pairs():
    p = parse_caption("Three Purple Triangles on a black background")
    assert p.colors == {"purple"} and p.shapes == {"triangle"} and p.count == 3
    assert p.pairs == {("purple", "triangle")}
    p = parse_caption("a red circle left of a blue square")
    assert p.count == 2 and p.pairs == {("red", "circle"), ("blue", "square")}
    p = parse_caption("2 white crosses, gray background, 2 objects")
    assert p.count == 2 and p.shapes == {"cross"}
    assert parse_caption("A flat picture of four objects. A large red circle is on the left.").count == 4
    assert parse_caption("").count is None and parse_caption("a purple thing").colors == {"purple"}


def test_wrong_captions_are_scored_per_attribute():
    meta = {"tag": "color_attr", "objects": [{"class": "circle", "color": "red", "bbox": [0, 0, 4, 4]},
                                             {"class": "square", "color": "blue", "bbox": [5, 5, 9, 9]}]}
    assert truth_from_meta(meta).count == 2
    items = [
        ("a red circle and a blue square", meta),  # all right
        ("a blue circle and a red square", meta),  # colours, shapes, count right; binding wrong
        ("a red circle", meta),  # one object missing
        ("three green triangles", meta),  # everything wrong
        ("a red circle", {"tag": "x"}),  # no objects: not scored
    ]
    r = attribute_accuracy(items)
    assert r["n"] == 4
    assert r["color"] == 0.5 and r["shape"] == 0.5 and r["count"] == 0.5 and r["binding"] == 0.25
    assert r["all"] == 0.5 and r["by_tag"]["color_attr"]["n"] == 4
    assert attribute_accuracy([])["n"] == 0


def test_prompt_level_scores_colour_only_where_the_prompt_names_one():
    """GenEval's prompt names no colour for single_object / two_object: a colour-less caption is
    right there, a wrong colour still counts where the prompt names one."""
    obj = {"class": "circle", "color": "red", "bbox": [0, 0, 4, 4]}
    single = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "objects": [obj]}
    colors = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "objects": [obj]}
    items = [("a photo of a circle", single), ("a photo of a blue circle", colors)]
    r = attribute_accuracy(items, level="prompt")
    assert r["n"] == 2 and r["n_color"] == 1
    assert r["color"] == 0.0 and r["binding"] == 0.0 and r["shape"] == 1.0 and r["all"] == 0.5
    assert r["by_tag"]["single_object"]["all"] == 1.0 and r["by_tag"]["colors"]["color"] == 0.0
    # other levels name every colour: the colour-less caption is wrong there
    assert attribute_accuracy(items, level="short")["color"] == 0.0 and attribute_accuracy(items)["n_color"] == 2
