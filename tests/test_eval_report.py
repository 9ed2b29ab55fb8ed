"""The Markdown / HTML reports and the printed table: rows for every tag scored, and prompts and tags
written as text (they come from hand-edited prompt files or are passed programmatically)."""

from __future__ import annotations

import re

from PIL import Image

from lumina_lightning.eval.cli import _print_table
from lumina_lightning.eval.geneval import summarize
from lumina_lightning.eval.report import write_report


def _report(tmp_path, rows):
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    for row in rows:
        row.setdefault("filename", "images/a.png")
        row.setdefault("reason", "")
        row.setdefault("detections", [])
    s = summarize(rows)
    results = {"tags": {t: v["accuracy"] for t, v in s["tags"].items()}, "overall": s["overall"],
               "counts": {t: [v["correct"], v["total"]] for t, v in s["tags"].items()}}
    return results, write_report(results, rows, tmp_path)


def test_tables_have_a_row_for_every_tag_in_the_mean(tmp_path, capsys):
    # results passed programmatically may carry a tag GenEval does not have: the mean counts it,
    # so the tables must show it too (an overall of 0.5 over "colors 1.0" alone reads as a bug)
    rows = [{"tag": "colors", "prompt": "a red circle", "correct": True},
            {"tag": "shading", "prompt": "a shaded circle", "correct": False}]
    results, _ = _report(tmp_path, rows)
    assert results["overall"] == 0.5
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    assert "| shading | 0.000 | – | 0 / 1 | – |" in md and "<tr><td>shading</td><td>0.000</td>" in html
    assert "| two_object | absent |" in md  # GenEval's tasks still listed, absent ones marked
    _print_table("t", results["tags"], results["counts"], results["overall"])
    printed = capsys.readouterr().out
    assert re.search(r"shading +0\.000 +\(0 / 1\)", printed) and "two_object     absent" in printed
    # the canonical order first, then the others
    assert printed.index("color_attr") < printed.index("shading")


def test_tags_and_prompts_are_text_not_markup_or_paths(tmp_path):
    evil = '../../<b onmouseover="x">escaped'  # markup, and a grid path two folders up from grids/
    rows = [{"tag": evil, "prompt": "a | b\nc <i>d</i>", "correct": False, "reason": "r1 | r2\nr3"},
            {"tag": "colors", "prompt": "p", "correct": True}]
    _, files = _report(tmp_path / "out", rows)
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<b onmouseover" not in html and "&lt;b onmouseover=&quot;x&quot;&gt;escaped" in html
    assert "<i>d</i>" not in html
    # the grid of that tag lies in grids/, named from the tag's safe characters
    grid = files["grids"][evil]
    assert re.fullmatch(r"grids/[A-Za-z0-9_.-]+\.png", grid) and (tmp_path / "out" / grid).is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grids", "images", "plots", "report.html",
                                                                    "report.md"]
    assert not list(tmp_path.glob("*.png"))
    # every Markdown table row keeps its cells: "|" escaped, newlines joined
    md = (tmp_path / "out" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 0 | a "))
    assert row == r"| 0 | a \| b; c <i>d</i> | ✗ | r1 \| r2; r3 |"
    assert len(re.split(r"(?<!\\)\|", row)) == 6  # 4 cells between 5 unescaped bars
    assert md.count("\n| 0 |") == 2  # one row per task's first image, none broken by a newline


def test_grid_names_of_tags_that_sanitise_alike_do_not_clash(tmp_path):
    rows = [{"tag": "a/b", "prompt": "p", "correct": True}, {"tag": "a?b", "prompt": "q", "correct": False}]
    _, files = _report(tmp_path, rows)
    assert len(set(files["grids"].values())) == 2
    assert all((tmp_path / g).is_file() for g in files["grids"].values())
