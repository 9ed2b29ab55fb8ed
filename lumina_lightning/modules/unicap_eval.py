"""Attribute accuracy of captions against the synthetic generator's metadata.

A caption of a synthetic image (``data/synth.py``) is parsed for the generator's colour words
(:data:`~lumina_lightning.data.synth.PALETTE`), shape words (singular and plural) and object count,
and compared with the record's ``meta.objects``:

* ``color``: the set of object colours named equals the true set;
* ``shape``: the set of shapes named equals the true set;
* ``count``: the number of objects stated equals the true number — from "N object(s)" where the
  caption says it (long captions, tags), else the sum over object phrases ("two red circles" = 2,
  "a red circle and a blue square" = 2), else the number of shape words;
* ``binding``: the set of (colour, shape) pairs named ("red circle") equals the true set — the
  hardest one on the held-out split, whose images contain colour–shape pairs never seen in training;
* ``all``: colour, shape and count all right.

Background colours (black, gray, brown) are not object colours, so "on a black background" never
counts as a colour mention. Works on every caption level the generator writes (short, medium, long,
tags, prompt); captions written by ``lumina caption`` keep the input's ``meta``, so its output
manifest can be scored directly (``lumina caption --eval``, :func:`evaluate_manifest`).

A level is scored on what its references state: the ``prompt`` level is GenEval's prompt, which
names no colour for the ``single_object`` and ``two_object`` tasks ("a photo of a circle"), so
there colour and binding are not scored (``n_color`` counts the captions they are scored on, and
``all`` is then shape and count).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from lumina_lightning.data.synth import COUNT_WORDS, PALETTE, PLURALS, SHAPES

__all__ = ["ATTRIBUTES", "ParsedCaption", "parse_caption", "truth_from_meta", "attribute_accuracy",
           "evaluate_manifest", "format_accuracy"]

ATTRIBUTES = ("color", "shape", "count", "binding", "all")
_NUMBERS = {**{w: n for n, w in COUNT_WORDS.items()}, "a": 1, "an": 1, "five": 5, "six": 6}
_SINGULAR = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
_COLOR = "|".join(sorted(PALETTE, key=len, reverse=True))
_SHAPE = "|".join(sorted(_SINGULAR, key=len, reverse=True))
_NUM = "|".join(sorted(_NUMBERS, key=len, reverse=True)) + r"|\d+"
_RE_TOTAL = re.compile(rf"\b({_NUM})\s+objects?\b")
_RE_PHRASE = re.compile(rf"\b({_NUM})\s+(?:(?:large|small|medium-sized|big|tiny)\s+)?(?:(?:{_COLOR})\s+)?({_SHAPE})\b")
_RE_PAIR = re.compile(rf"\b({_COLOR})\s+({_SHAPE})\b")
_RE_COLOR = re.compile(rf"\b({_COLOR})\b")
_RE_SHAPE = re.compile(rf"\b({_SHAPE})\b")


def _number(word: str) -> int:
    return int(word) if word.isdigit() else _NUMBERS[word]


@dataclass
class ParsedCaption:
    """What a caption says about the objects."""

    colors: set[str] = field(default_factory=set)
    shapes: set[str] = field(default_factory=set)
    count: int | None = None
    pairs: set[tuple[str, str]] = field(default_factory=set)


def parse_caption(text: str) -> ParsedCaption:
    """Colour words, shape words (singularised), object count and colour–shape pairs of ``text``."""
    t = text.lower()
    out = ParsedCaption()
    out.colors = set(_RE_COLOR.findall(t))
    out.shapes = {_SINGULAR[s] for s in _RE_SHAPE.findall(t)}
    out.pairs = {(c, _SINGULAR[s]) for c, s in _RE_PAIR.findall(t)}
    total = _RE_TOTAL.search(t)
    if total:
        out.count = _number(total.group(1))
    else:
        phrases = _RE_PHRASE.findall(t)
        if phrases:
            out.count = sum(_number(n) for n, _ in phrases)
        else:
            mentions = _RE_SHAPE.findall(t)
            out.count = len(mentions) if mentions else None
    return out


def truth_from_meta(meta: Mapping[str, Any]) -> ParsedCaption:
    """The true colours, shapes, count and pairs of a synthetic record's ``meta.objects``."""
    objects = meta.get("objects") or []
    return ParsedCaption(
        colors={o["color"] for o in objects},
        shapes={o["class"] for o in objects},
        count=len(objects),
        pairs={(o["color"], o["class"]) for o in objects},
    )


def level_names_colour(meta: Mapping[str, Any], level: str | None) -> bool:
    """Whether the references of caption ``level`` name the object colours of this record.

    Every level does except ``prompt`` (GenEval's prompt), whose ``include`` entries carry a
    ``color`` only for the tasks whose prompt names one.
    """
    base = (level or "").split("_")[0]
    if base != "prompt" or not isinstance(meta.get("include"), list):
        return True
    return any("color" in entry for entry in meta["include"])


def attribute_accuracy(items: Iterable[tuple[str, Mapping[str, Any]]], level: str | None = None) -> dict[str, Any]:
    """Per-attribute accuracy of ``(caption, meta)`` pairs (records without ``meta.objects`` are ignored).

    ``level``: the caption level scored; colour and binding are scored only on captions whose
    level's reference names colours (:func:`level_names_colour`), and ``all`` leaves colour out
    where it is not scored.

    Returns:
        ``{"n": N, "n_color": N_c, "color": ..., "shape": ..., "count": ..., "binding": ..., "all": ...,
        "by_tag": {tag: {"n", "all", ...}}}`` — accuracies are fractions in [0, 1] (0.0 when N = 0);
        ``color`` and ``binding`` are over the ``n_color`` captions they are scored on.
    """
    totals = {k: 0 for k in ATTRIBUTES}
    by_tag: dict[str, dict[str, float]] = {}
    n = n_color = 0
    for text, meta in items:
        if not meta or not meta.get("objects"):
            continue
        got, want = parse_caption(text or ""), truth_from_meta(meta)
        colour = level_names_colour(meta, level)
        ok = {
            "color": got.colors == want.colors,
            "shape": got.shapes == want.shapes,
            "count": got.count == want.count,
            "binding": got.pairs == want.pairs,
        }
        ok["all"] = (ok["color"] or not colour) and ok["shape"] and ok["count"]
        n += 1
        n_color += int(colour)
        tag = str(meta.get("tag", "?"))
        bucket = by_tag.setdefault(tag, {"n": 0, "n_color": 0, **{k: 0 for k in ATTRIBUTES}})
        bucket["n"] += 1
        bucket["n_color"] += int(colour)
        for k in ATTRIBUTES:
            if k in ("color", "binding") and not colour:
                continue
            totals[k] += int(ok[k])
            bucket[k] += int(ok[k])

    def share(count: float, over: int) -> float:
        return count / over if over else 0.0

    def rates(t: Mapping[str, float], n_all: int, n_col: int) -> dict[str, float]:
        return {k: share(t[k], n_col if k in ("color", "binding") else n_all) for k in ATTRIBUTES}

    result: dict[str, Any] = {"n": n, "n_color": n_color, **rates(totals, n, n_color)}
    result["by_tag"] = {tag: {"n": b["n"], **rates(b, int(b["n"]), int(b["n_color"]))}
                        for tag, b in sorted(by_tag.items())}
    return result


def evaluate_manifest(path: str | os.PathLike, level: str = "short") -> dict[str, Any]:
    """Attribute accuracy of caption ``level`` of every record of a manifest against its ``meta``."""
    from lumina_lightning.data.records import load_records

    records = load_records(path).records
    result = attribute_accuracy(((r.captions.get(level, ""), r.meta) for r in records), level=level)
    result["level"] = level
    result["manifest"] = str(Path(path))
    return result


def format_accuracy(result: Mapping[str, Any]) -> str:
    """A small Markdown table of an :func:`attribute_accuracy` result."""
    head = f"attribute accuracy ({result.get('level', 'caption')}, n={result['n']})"
    lines = [head, "", "| attribute | accuracy |", "|---|---|"]
    lines += [f"| {k} | {result[k]:.3f} |" for k in ATTRIBUTES]
    tags = result.get("by_tag") or {}
    if tags:
        lines += ["", "| tag | n | color | shape | count | binding | all |", "|---|---|---|---|---|---|---|"]
        for tag, b in tags.items():
            lines.append(f"| {tag} | {b['n']} | " + " | ".join(f"{b[k]:.2f}" for k in ATTRIBUTES) + " |")
    return "\n".join(lines)


def write_accuracy(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write an accuracy result as JSON."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2) + "\n")
    return p
