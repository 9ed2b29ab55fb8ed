"""GenEval-lite scoring rules, checked against GenEval's evaluate_images.py / summary_scores.py."""

from __future__ import annotations

import json

import pytest

from lumina_lightning.eval.geneval import (
    MAX_OBJECTS,
    confidence_intervals,
    paired_difference,
    evaluate_detections,
    group_detections,
    read_metadata,
    relative_position,
    summarize,
)


def det(cls, color, box, score=1.0):
    return {"class": cls, "color": color, "bbox": list(box), "score": score}


# --------------------------------------------------------------------------------------------
# relative_position: dead zone 0.1 x (sum of box sizes), relation when the share passes 0.5
# --------------------------------------------------------------------------------------------
def test_clear_relations():
    a, b = (0, 0, 10, 10), (30, 0, 40, 10)
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    top, bottom = (0, 0, 10, 10), (0, 30, 10, 40)
    assert relative_position(top, bottom) == {"above"}  # image y grows downwards
    assert relative_position(bottom, top) == {"below"}


def test_dead_zone_scales_with_box_sizes():
    # centres 1.5 px apart, dead zone 0.1 * (10 + 10) = 2 px: no relation at all
    assert relative_position((0, 0, 10, 10), (1.5, 0, 11.5, 10)) == set()
    # the same 5 px offset is a relation for small boxes and none for large ones (dead zone 8 px)
    assert relative_position((0, 0, 10, 10), (5, 0, 15, 10)) == {"left of"}
    assert relative_position((0, 0, 40, 40), (5, 0, 45, 40)) == set()


def test_normalised_offset_must_pass_half():
    # offset (-10, -30): revised (-8, -28) / |(-10, -30)| = (-0.25, -0.89): only "above"
    assert relative_position((0, 0, 10, 10), (10, 30, 20, 40)) == {"above"}
    # diagonal placements get both relations
    assert relative_position((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}
    # the revised offset is divided by the *original* offset's length: (-14, -6) has revised
    # (-12, -4) / 15.2 = (-0.79, -0.26) -> only "left of"
    assert relative_position((0, 0, 10, 10), (14, 6, 24, 16)) == {"left of"}


# --------------------------------------------------------------------------------------------
# include / exclude clauses
# --------------------------------------------------------------------------------------------
def test_count_is_at_least_and_exclude_makes_it_exact():
    three = [det("circle", "red", (i * 12, 0, i * 12 + 10, 10)) for i in range(3)]
    ok, reason = evaluate_detections(three, {"tag": "counting", "include": [{"class": "circle", "count": 2}]})
    assert ok and reason == ""  # GenEval: found >= count
    spec = {"tag": "counting", "include": [{"class": "circle", "count": 2, "color": "red"}],
            "exclude": [{"class": "circle", "count": 3}]}
    ok, reason = evaluate_detections(three, spec)
    assert not ok and reason == "expected circle<3, found 3"
    ok, _ = evaluate_detections(three[:2], spec)
    assert ok
    ok, reason = evaluate_detections(three[:1], spec)
    assert not ok and reason == "expected circle>=2, found 1"


def test_at_most_max_objects_per_class():
    many = [det("square", "blue", (i, 0, i + 1, 1), score=0.5 + i / 100) for i in range(20)]
    groups = group_detections(many)
    assert len(groups["square"]) == MAX_OBJECTS
    assert groups["square"][0]["score"] == max(d["score"] for d in many)  # most confident first
    ok, reason = evaluate_detections(many, {"tag": "counting", "include": [], "exclude": [{"class": "square", "count": 17}]})
    assert ok, reason  # GenEval only ever sees 16


def test_colour_is_checked_on_the_most_confident_objects_only():
    spec = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]}
    dets = [det("circle", "blue", (0, 0, 10, 10), 0.9), det("circle", "red", (20, 0, 30, 10), 0.8)]
    ok, reason = evaluate_detections(dets, spec)
    assert not ok
    assert reason.startswith("expected red circle>=1, found 0 red; and 1 blue")
    dets[1]["score"] = 0.95
    assert evaluate_detections(dets, spec)[0]


def test_colour_attribution_swapped_fails_both_clauses():
    spec = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                            {"class": "square", "count": 1, "color": "blue"}]}
    right = [det("circle", "red", (0, 0, 10, 10)), det("square", "blue", (20, 0, 30, 10))]
    swapped = [det("circle", "blue", (0, 0, 10, 10)), det("square", "red", (20, 0, 30, 10))]
    assert evaluate_detections(right, spec) == (True, "")
    ok, reason = evaluate_detections(swapped, spec)
    assert not ok and len(reason.splitlines()) == 2
    assert "expected red circle" in reason and "expected blue square" in reason


def test_position_clause_refers_to_an_earlier_group():
    # GenEval's format for "a red circle left of a blue square": the reference object first,
    # the other one carries ["left of", 0]
    spec = {"tag": "position", "include": [{"class": "square", "count": 1, "color": "blue"},
                                          {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}]}
    circle, square = det("circle", "red", (0, 10, 10, 20)), det("square", "blue", (30, 10, 40, 20))
    assert evaluate_detections([circle, square], spec) == (True, "")
    circle2, square2 = det("circle", "red", (30, 10, 40, 20)), det("square", "blue", (0, 10, 10, 20))
    ok, reason = evaluate_detections([circle2, square2], spec)
    assert not ok and reason == "expected circle left of target, found right of target"
    # no target: the square is missing (or has the wrong colour), so the relation cannot be checked
    ok, reason = evaluate_detections([circle], spec)
    assert not ok and reason.splitlines() == ["expected square>=1, found 0", "no target for circle to be left of"]
    ok, reason = evaluate_detections([circle, det("square", "green", (30, 10, 40, 20))], spec)
    assert not ok and "no target for circle to be left of" in reason
    # too close: inside the dead zone there is no relation
    ok, reason = evaluate_detections([det("circle", "red", (0, 10, 10, 20)), det("square", "blue", (1, 10, 11, 20))], spec)
    assert not ok and "expected circle left of target" in reason


def test_grouped_input_and_missing_class():
    grouped = {"circle": [det("circle", "red", (0, 0, 5, 5))]}
    assert evaluate_detections(grouped, {"tag": "single_object", "include": [{"class": "circle", "count": 1}]})[0]
    ok, reason = evaluate_detections([], {"tag": "single_object", "include": [{"class": "triangle", "count": 1}]})
    assert not ok and reason == "expected triangle>=1, found 0"


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------
def test_overall_is_the_mean_of_present_tags():
    rows = [
        {"tag": "single_object", "prompt": "a", "correct": True},
        {"tag": "single_object", "prompt": "a", "correct": True},
        {"tag": "single_object", "prompt": "b", "correct": False},
        {"tag": "single_object", "prompt": "b", "correct": True},
        {"tag": "colors", "prompt": "c", "correct": False},
        {"tag": "colors", "prompt": "c", "correct": False},
    ]
    s = summarize(rows)
    assert s["tags"]["single_object"] == {"accuracy": 0.75, "correct": 3, "total": 4}
    assert s["tags"]["colors"]["accuracy"] == 0.0
    assert s["overall"] == pytest.approx((0.75 + 0.0) / 2)  # not the image mean 0.5
    assert s["correct_images"] == pytest.approx(0.5)
    assert s["correct_prompts"] == pytest.approx(2 / 3)
    assert s["absent_tags"] == ["two_object", "counting", "position", "color_attr"]
    assert summarize([])["overall"] is None


def test_read_metadata(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"tag": "colors", "prompt": "a photo of a red circle",
                                "include": [{"class": "circle", "count": 1, "color": "red"}]}) + "\n\n")
    assert read_metadata(path)[0]["tag"] == "colors"
    path.write_text("{not json}\n")
    with pytest.raises(ValueError, match="m.jsonl:1"):
        read_metadata(path)
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="'prompt' and 'tag'"):
        read_metadata(path)


GOOD_LINE = {"tag": "colors", "prompt": "a photo of a red circle",
             "include": [{"class": "circle", "count": 1, "color": "red"}]}


@pytest.mark.parametrize("line, field", [
    ({"tag": "single_object", "prompt": "a photo of a square"}, "'include'"),  # would pass every image
    ({**GOOD_LINE, "include": []}, "'include'"),
    ({**GOOD_LINE, "include": [{"count": 1}]}, r"include\[0\]\.class"),  # failed after generation
    ({**GOOD_LINE, "include": [{"class": "circle"}]}, r"include\[0\]\.count"),
    ({**GOOD_LINE, "include": [{"class": "circle", "count": 0}]}, r"include\[0\]\.count"),
    ({**GOOD_LINE, "include": [{"class": "circle", "count": "2"}]}, r"include\[0\]\.count"),
    ({**GOOD_LINE, "include": [{"class": "circle", "count": True}]}, r"include\[0\]\.count"),
    ({**GOOD_LINE, "include": [{"class": "circle", "count": 1, "colour": "red"}]}, r"include\[0\] has unknown key"),
    ({**GOOD_LINE, "include": [{"class": "circle", "count": 1, "color": 3}]}, r"include\[0\]\.color"),
    ({**GOOD_LINE, "include": ["circle"]}, r"include\[0\] must be an object"),
    ({**GOOD_LINE, "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1,
                                                                 "position": ["next to", 0]}]},
     r"include\[1\]\.position"),
    ({**GOOD_LINE, "include": [{"class": "circle", "count": 1, "position": ["left of", 0]}]},
     r"include\[0\]\.position"),  # no earlier clause to stand left of
    ({**GOOD_LINE, "exclude": {"class": "circle", "count": 2}}, "'exclude' must be a list"),
    ({**GOOD_LINE, "exclude": [{"class": "circle", "count": 2, "color": "red"}]}, r"exclude\[0\] has unknown key"),
    ({**GOOD_LINE, "exclude": [{"class": "circle"}]}, r"exclude\[0\]\.count"),
    ({**GOOD_LINE, "tag": "colour"}, "unknown 'tag' 'colour'"),
    ({**GOOD_LINE, "tag": "colors?"}, "unknown 'tag'"),
    ({**GOOD_LINE, "prompt": ""}, "'prompt'"),
    (["colors", "a red circle"], "JSON object"),
])
def test_read_metadata_refuses_lines_the_scorer_would_misread(tmp_path, line, field):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(GOOD_LINE) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=rf"m\.jsonl:2: .*{field}"):
        read_metadata(path)


def test_read_metadata_accepts_what_the_generator_writes(tmp_path):
    from lumina_lightning.data import synth

    data = synth.generate_synthetic(tmp_path, 0, size=16, seed=0, n_test=18)
    specs = read_metadata(data.test_geneval)
    assert {s["tag"] for s in specs} == set(synth.TAGS)
    assert any("position" in c for s in specs for c in s["include"]) and any("exclude" in s for s in specs)


def test_score_folder_refuses_a_bad_metadata_line(tmp_path):
    from PIL import Image

    from lumina_lightning.eval.run import score_folder

    sub = tmp_path / "00000"
    (sub / "samples").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(sub / "samples" / "0000.png")
    (sub / "metadata.jsonl").write_text(json.dumps({"tag": "colour", "prompt": "x", "include": []}) + "\n")
    with pytest.raises(ValueError, match=r"00000/metadata\.jsonl:1: unknown 'tag'"):
        score_folder(tmp_path)


# --------------------------------------------------------------------------------------------
# confidence_intervals: two-stage bootstrap (prompts, then images), checked against hand values
# --------------------------------------------------------------------------------------------
def _rows(tag, per_prompt):
    """``per_prompt``: list of (correct, total) per prompt."""
    rows = []
    for j, (c, n) in enumerate(per_prompt):
        rows += [{"tag": tag, "prompt": f"{tag} {j}", "correct": k < c} for k in range(n)]
    return rows


def test_all_right_or_all_wrong_tasks_get_the_jeffreys_interval():
    # 0 of 32 and 32 of 32 images of one prompt are not certainties: the Jeffreys interval is
    # [0, Beta(½, 32½).ppf(0.975)] = [0, 0.0749] and [Beta(32½, ½).ppf(0.025), 1] = [0.9251, 1]
    ci = confidence_intervals(_rows("colors", [(32, 32)]) + _rows("position", [(0, 32)]), n_boot=4000)
    assert ci["tags"]["position"][0] == 0.0 and ci["tags"]["position"][1] == pytest.approx(0.0749, abs=0.006)
    assert ci["tags"]["colors"][1] == 1.0 and ci["tags"]["colors"][0] == pytest.approx(0.9251, abs=0.006)
    low, high = ci["overall"]
    assert low < 0.5 < high and ci["level"] == 0.95
    assert confidence_intervals([])["overall"] is None


def test_one_prompt_is_the_binomial_interval():
    # 200 of 400 images of a single prompt: p ± 1.96·sqrt(p(1-p)/n) = 0.5 ± 0.049
    low, high = confidence_intervals(_rows("counting", [(200, 400)]), n_boot=4000)["tags"]["counting"]
    assert low == pytest.approx(0.451, abs=0.012) and high == pytest.approx(0.549, abs=0.012)


def test_images_of_one_prompt_are_not_independent():
    # 20 prompts x 10 images, each prompt all right or all wrong: only the prompts vary, so the
    # accuracy is Binomial(20, 0.5)/20, whose 2.5 / 97.5 % quantiles are 6/20 and 14/20 -- far wider
    # than 100 of 200 independent images would give (0.5 ± 0.07)
    rows = _rows("two_object", [(10, 10)] * 10 + [(0, 10)] * 10)
    low, high = confidence_intervals(rows, n_boot=4000)["tags"]["two_object"]
    assert low == pytest.approx(0.30, abs=0.051) and high == pytest.approx(0.70, abs=0.051)


def test_overall_interval_is_over_the_mean_of_tags():
    rows = _rows("single_object", [(400, 400)]) + _rows("counting", [(200, 400)])
    ci = confidence_intervals(rows, n_boot=4000, seed=3)
    # single_object 400 of 400 is nearly certain (its Jeffreys posterior: mean 400½/401 = 0.9988, sd 0.0017),
    # so overall ~ (0.9988 + counting) / 2, whose bounds follow counting's
    assert ci["overall"][0] == pytest.approx((0.9988 + 0.451) / 2, abs=0.008)
    assert ci["overall"][1] == pytest.approx((1 + 0.549) / 2, abs=0.008)
    assert ci["overall"][0] <= summarize(rows)["overall"] <= ci["overall"][1]


def test_intervals_are_reproducible_and_validated():
    rows = _rows("colors", [(3, 4), (1, 4), (2, 4)])
    assert confidence_intervals(rows, seed=1) == confidence_intervals(rows, seed=1)
    narrow = confidence_intervals(rows, level=0.5)["tags"]["colors"]
    wide = confidence_intervals(rows, level=0.99)["tags"]["colors"]
    assert wide[0] <= narrow[0] <= narrow[1] <= wide[1]
    with pytest.raises(ValueError, match="level"):
        confidence_intervals(rows, level=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        confidence_intervals(rows, n_boot=0)


# --------------------------------------------------------------------------------------------
# paired_difference: same prompts and seeds, outcomes paired image by image
# --------------------------------------------------------------------------------------------
def _paired(tag, outcomes, prompt="p"):
    """``outcomes``: list of (a correct, b correct) for the images of one prompt."""
    a = [{"tag": tag, "prompt": prompt, "sample": k, "correct": x} for k, (x, _) in enumerate(outcomes)]
    b = [{"tag": tag, "prompt": prompt, "sample": k, "correct": y} for k, (_, y) in enumerate(outcomes)]
    return a, b


def test_identical_and_opposite_runs():
    a, _ = _paired("colors", [(True, True), (False, False), (True, True)])
    same = paired_difference(a, a)
    assert same["difference"] == 0.0 and same["pairs"] == 3
    # agreeing on 3 images says little: a wide interval around 0, not one of no width
    assert same["interval"][0] < -0.2 and same["interval"][1] > 0.2
    many, _ = _paired("colors", [(True, True)] * 200 + [(False, False)] * 200)
    low, high = paired_difference(many, many, n_boot=4000)["interval"]
    assert -0.02 < low < 0 < high < 0.02  # agreeing on 400 images: a narrow one
    a, b = _paired("colors", [(True, False)] * 5)
    opposite = paired_difference(a, b)
    assert opposite["difference"] == 1.0 and opposite["interval"][1] == 1.0 and 0.1 < opposite["interval"][0] < 0.9
    assert opposite["tags"]["colors"]["difference"] == 1.0
    assert paired_difference(a, [])["difference"] is None


def test_paired_interval_is_the_binomial_of_the_discordant_images():
    # 400 images: a right and b wrong on 100, both right on 100, both wrong on 200. The difference
    # per image is 1 with p = 0.25, else 0: 0.25 ± 1.96·sqrt(0.25·0.75/400) = 0.25 ± 0.042.
    a, b = _paired("counting", [(True, False)] * 100 + [(True, True)] * 100 + [(False, False)] * 200)
    d = paired_difference(a, b, n_boot=4000)
    assert d["difference"] == pytest.approx(0.25)
    assert d["interval"][0] == pytest.approx(0.208, abs=0.012) and d["interval"][1] == pytest.approx(0.292, abs=0.012)


def test_pairs_are_matched_by_prompt_and_sample():
    a, b = _paired("two_object", [(True, False), (False, True)])
    # reversed order and an unmatched extra image in b change nothing
    extra = {"tag": "two_object", "prompt": "p", "sample": 9, "correct": False}
    d = paired_difference(a, list(reversed(b)) + [extra])
    assert d["pairs"] == 2 and d["difference"] == 0.0
    # overall is the mean over tags of the per-tag differences
    a2, b2 = _paired("position", [(True, False)] * 4, prompt="q")
    d = paired_difference(a + a2, b + b2)
    assert d["tags"]["position"]["difference"] == 1.0 and d["difference"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="level"):
        paired_difference(a, b, level=0.0)
