"""GenEval-lite: GenEval's scoring rules applied to detections of the synthetic detector.

The rules follow ``evaluation/evaluate_images.py`` and ``evaluation/summary_scores.py`` of GenEval
(djghosh13/geneval; peers notes §D.1), re-implemented here:

* detections are grouped by class, most confident first, at most 16 per class (``MAX_OBJECTS``);
* every ``include`` clause ``{class, count, color?, position?}`` must hold (clauses are ANDed):
  the clause looks at the ``count`` most confident objects of its class only, so "two red circles"
  fails when the two most confident circles are not both red, even if a third one is;
  - count: at least ``count`` objects (``>=``, not ``==``; exactness comes from ``exclude``);
  - colour: among those objects at least ``count`` have the colour (GenEval classifies the colour
    of each crop with CLIP; here the colour comes with the detection);
  - position ``[relation, i]``: every one of those objects must stand in ``relation`` to every
    object matched by clause ``i`` (which must itself have matched), by :func:`relative_position`;
* every ``exclude`` clause ``{class, count}`` fails the image when ``count`` or more objects of the
  class were detected (clauses are ORed), which is how counting prompts demand an exact count;
* GenEval keeps Mask2Former boxes above confidence 0.3 (0.9 for counting) to suppress duplicate
  and hallucinated boxes; the synthetic detector's components are disjoint by construction and its
  score is a template IoU, so one threshold (``Detector.min_score``) serves every task;
* an image is correct or not, with GenEval's reason strings joined by newlines;
* a tag's accuracy is the mean over its images; overall = mean of the tag accuracies of the tags
  present (GenEval averages over the tasks it finds in the results, so an absent tag is not 0).

Metadata is GenEval's ``evaluation_metadata.jsonl`` format, which ``synth.generate_synthetic``
writes for its test split as ``test_geneval.jsonl``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lumina_lightning.data.synth import RELATIONS, TAGS

__all__ = [
    "MAX_OBJECTS",
    "POSITION_THRESHOLD",
    "group_detections",
    "relative_position",
    "evaluate_detections",
    "summarize",
    "confidence_intervals",
    "paired_difference",
    "read_metadata",
    "check_spec",
    "tag_order",
]

# GenEval's defaults: --options max_objects=16, position_threshold=0.1 (evaluate_images.py).
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
# GenEval's relation test: a direction is named when its share of the (revised) offset exceeds 0.5.
RELATION_COSINE = 0.5


def tag_order(tags: Iterable[str]) -> list[str]:
    """GenEval's six tasks in their usual order, then any other tags in the order given."""
    tags = list(tags)
    return [t for t in TAGS if t in tags] + [t for t in tags if t not in TAGS]


def read_metadata(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Prompt specs from a GenEval-format JSONL file (one JSON object per non-empty line)."""
    from lumina_lightning.data.records import text_lines

    rows = []
    for n, line in text_lines(path):  # a byte that is not UTF-8 is reported with its line
        text = line.strip()
        if not text:
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: invalid JSON ({err.msg})") from None
        check_spec(row, f"{path}:{n}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


# The keys of a clause the scorer reads (evaluate_detections); any other key, e.g. a misspelt
# "colour", would be ignored silently and the clause scored without it.
_INCLUDE_KEYS = {"class", "count", "color", "position"}
_EXCLUDE_KEYS = {"class", "count"}


def check_spec(spec: Any, where: str) -> None:
    """Refuse a metadata line the scorer would misread: ``ValueError("<where>: ...")`` naming the field.

    Why up front: a line without ``include`` passes every image (nothing is required), and a clause
    without ``class`` fails only after all the images were generated. The shape is GenEval's
    ``evaluation_metadata.jsonl`` (and what ``synth.geneval_metadata`` writes): ``prompt`` (text),
    ``tag`` (one of GenEval's six tasks), ``include`` (a non-empty list of ``{"class", "count" >= 1,
    "color"?, "position"?: [relation, index of an earlier clause]}``) and optional ``exclude`` (a list
    of ``{"class", "count" >= 1}``); other top-level keys are kept and ignored.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: a GenEval metadata line must be a JSON object, got {type(spec).__name__}")
    for key in ("prompt", "tag"):
        if key not in spec:
            raise ValueError(f"{where}: a GenEval metadata line needs 'prompt' and 'tag' (no '{key}')")
    if not isinstance(spec["prompt"], str) or not spec["prompt"].strip():
        raise ValueError(f"{where}: 'prompt' must be non-empty text, got {spec['prompt']!r}")
    if spec["tag"] not in TAGS:
        raise ValueError(f"{where}: unknown 'tag' {spec['tag']!r}; expected one of {', '.join(TAGS)}")
    if not isinstance(spec.get("include"), list) or not spec["include"]:
        raise ValueError(f"{where}: 'include' must be a non-empty list of {{\"class\", \"count\"}} objects "
                         f"(without it every image passes), got {spec.get('include')!r}")
    for field, keys in (("include", _INCLUDE_KEYS), ("exclude", _EXCLUDE_KEYS)):
        clauses = spec.get(field, [])
        if not isinstance(clauses, list):
            raise ValueError(f"{where}: '{field}' must be a list of objects, got {clauses!r}")
        for i, clause in enumerate(clauses):
            name = f"{field}[{i}]"
            if not isinstance(clause, dict):
                raise ValueError(f"{where}: {name} must be an object, got {clause!r}")
            unknown = sorted(set(clause) - keys)
            if unknown:
                raise ValueError(f"{where}: {name} has unknown key(s) {', '.join(map(repr, unknown))}; "
                                 f"expected {', '.join(sorted(keys))}")
            if not isinstance(clause.get("class"), str) or not clause["class"]:
                raise ValueError(f"{where}: {name}.class must be a class name, got {clause.get('class')!r}")
            count = clause.get("count")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{where}: {name}.count must be an integer >= 1, got {count!r}")
            if "color" in clause and (not isinstance(clause["color"], str) or not clause["color"]):
                raise ValueError(f"{where}: {name}.color must be a colour name, got {clause['color']!r}")
            if "position" in clause:
                pos = clause["position"]
                # the scorer relates this clause's objects to those of an earlier clause (matched_groups)
                ok = (isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS
                      and isinstance(pos[1], int) and not isinstance(pos[1], bool) and 0 <= pos[1] < i)
                if not ok:
                    raise ValueError(f"{where}: {name}.position must be [relation, index of an earlier include "
                                     f"clause] with relation one of {', '.join(RELATIONS)}, got {pos!r}")


def group_detections(
    detections: Iterable[Mapping[str, Any]], max_objects: int = MAX_OBJECTS
) -> dict[str, list[dict[str, Any]]]:
    """``{class: [detection, ...]}``, most confident first, at most ``max_objects`` per class."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for det in sorted(detections, key=lambda d: -float(d.get("score", 1.0))):
        items = groups.setdefault(det["class"], [])
        if len(items) < max_objects:
            items.append(dict(det))
    return groups


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of A to B as GenEval computes them (``relative_position`` in evaluate_images.py).

    The centre offset A − B is shrunk towards 0 on each axis by ``threshold × (size_a + size_b)``
    (a dead zone that scales with the objects, so touching neighbours are not "left of" each
    other); if nothing is left there is no relation. Otherwise the revised offset is divided by the
    length of the *original* offset and a direction is named when its component passes 0.5 (so
    diagonal placements can have two relations, and a small revised offset none).
    """
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -RELATION_COSINE:
        relations.add("left of")
    if dx > RELATION_COSINE:
        relations.add("right of")
    if dy < -RELATION_COSINE:  # image y grows downwards
        relations.add("above")
    if dy > RELATION_COSINE:
        relations.add("below")
    return relations


def evaluate_detections(
    detections: Iterable[Mapping[str, Any]] | Mapping[str, list[Mapping[str, Any]]],
    metadata: Mapping[str, Any],
    *,
    max_objects: int = MAX_OBJECTS,
    position_threshold: float = POSITION_THRESHOLD,
) -> tuple[bool, str]:
    """GenEval's per-image check (``evaluate`` in evaluate_images.py): ``(correct, reason)``.

    ``detections`` is a list of detector outputs or an already grouped ``{class: [...]}``.
    """
    if isinstance(detections, Mapping):
        objects = {k: list(v)[:max_objects] for k, v in detections.items()}
    else:
        objects = group_detections(detections, max_objects)
    correct = True
    reason: list[str] = []
    matched_groups: list[list[Mapping[str, Any]] | None] = []
    for req in metadata.get("include", []):
        classname = req["class"]
        count = int(req["count"])
        matched = True
        found = objects.get(classname, [])[:count]
        if len(found) < count:
            correct = matched = False
            reason.append(f"expected {classname}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [o["color"] for o in found]
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in dict.fromkeys(colors))
                    reason.append(f"expected {req['color']} {classname}>={count}, found "
                                  f"{colors.count(req['color'])} {req['color']}; and {seen}")
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                target = matched_groups[target_group] if target_group < len(matched_groups) else None
                if target is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found:
                        for target_obj in target:
                            true_rels = relative_position(obj["bbox"], target_obj["bbox"], position_threshold)
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(f"expected {classname} {expected_rel} target, found "
                                              f"{' and '.join(sorted(true_rels)) or 'no relation to the'} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        classname = req["class"]
        n = len(objects.get(classname, []))
        if n >= int(req["count"]):
            correct = False
            reason.append(f"expected {classname}<{req['count']}, found {n}")
    return correct, "\n".join(reason)


def summarize(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-tag and overall accuracy of per-image results (``summary_scores.py``).

    Returns ``{"overall", "tags": {tag: {"accuracy", "correct", "total"}}, "absent_tags",
    "images", "prompts", "correct_images", "correct_prompts"}``; ``overall`` is the mean over the
    tags present (``None`` when there are no results) and tags missing from the prompt set are
    listed in ``absent_tags`` instead of being counted as 0.
    """
    results = list(results)
    per_tag: dict[str, list[bool]] = {}
    per_prompt: dict[str, list[bool]] = {}
    for r in results:
        per_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
        key = r.get("metadata") or r.get("prompt")
        key = key if isinstance(key, str) else json.dumps(key, sort_keys=True)
        per_prompt.setdefault(key, []).append(bool(r["correct"]))
    order = tag_order(per_tag)
    tags = {t: {"accuracy": float(np.mean(per_tag[t])), "correct": int(sum(per_tag[t])), "total": len(per_tag[t])}
            for t in order}
    overall = float(np.mean([v["accuracy"] for v in tags.values()])) if tags else None
    return {
        "overall": overall,
        "tags": tags,
        "absent_tags": [t for t in TAGS if t not in per_tag],
        "images": len(results),
        "prompts": len(per_prompt),
        "correct_images": float(np.mean([r["correct"] for r in results])) if results else None,
        "correct_prompts": float(np.mean([any(v) for v in per_prompt.values()])) if per_prompt else None,
    }


def _check_bootstrap(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def _percentile_interval(draws: np.ndarray, level: float) -> list[float]:
    """The central ``level`` interval of bootstrap draws, ``[low, high]``."""
    low, high = np.percentile(draws, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(low), float(high)]


def confidence_intervals(
    results: Iterable[Mapping[str, Any]], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Percentile-bootstrap intervals for every tag's accuracy and for ``overall``.

    Why: mini-GenEval scores a few dozen images per task, so two runs of nearby recipes differ by
    several points from sampling alone; an interval says which differences mean something. Images of
    one prompt are not independent draws (same prompt, neighbouring seeds), and a task may have only
    three prompts, so the bootstrap has two stages, within each tag: resample the *prompts*, then draw
    each drawn prompt's accuracy from its Jeffreys posterior, Beta(correct + ½, wrong + ½). The first
    stage alone would call three equally-scored prompts certain; the second alone would ignore that
    prompts differ. The Jeffreys draw, rather than redrawing the images from the observed accuracy, is
    what keeps a task scored 0 of 32 or 32 of 32 from getting an interval of no width: for one prompt
    it gives the Jeffreys interval for a binomial proportion (Brown, Cai & DasGupta, 2001), whose
    bounds at 0 and at n correct are taken as 0 and 1, so every interval holds the point estimate.
    The prior moves each drawn prompt's accuracy towards ½, so the interval of a task scored near 0
    with 4 images per prompt sits above its point estimate (0.06 -> [0.05, 0.28]). That is kept on
    purpose: simulated tasks of 3 prompts x 11 images with prompt accuracies ~ Beta(0.3, 3) (the
    pipeline's single-object and colour tasks) are covered 98 % of the time at 95 %, where redrawing
    each prompt's images from its observed accuracy instead (widened to the Jeffreys interval of the
    pooled proportion) covers 75 % (and 8 x 4 at Beta(1, 1): 95.5 % either way, this interval 16 %
    narrower). ``overall`` is the mean of the resampled tag
    accuracies, as :func:`summarize` computes it.
    Deterministic for a given ``seed``.

    Returns ``{"level", "n_boot", "method", "overall": [low, high] | None, "tags": {tag: [low, high]}}``.
    """
    _check_bootstrap(level, n_boot)
    per_tag: dict[str, dict[str, list[int]]] = {}
    for r in results:
        cell = per_tag.setdefault(r["tag"], {}).setdefault(_prompt_key(r), [0, 0])
        cell[0] += int(bool(r["correct"]))
        cell[1] += 1
    out: dict[str, Any] = {"level": level, "n_boot": n_boot, "overall": None, "tags": {},
                           "method": "two-stage bootstrap: prompts, then each prompt's accuracy from its "
                                     "Jeffreys posterior"}
    if not per_tag:
        return out
    rng = np.random.default_rng(seed)
    order = tag_order(per_tag)
    draws, points = [], []
    for tag in order:
        cells = np.array(list(per_tag[tag].values()), dtype=np.float64)  # (prompts, [correct, total])
        pick = rng.integers(0, len(cells), size=(n_boot, len(cells)))
        correct, totals = cells[pick, 0], cells[pick, 1]
        acc = (totals * rng.beta(correct + 0.5, totals - correct + 0.5)).sum(axis=1) / totals.sum(axis=1)
        point = cells[:, 0].sum() / cells[:, 1].sum()
        draws.append(acc)
        points.append(point)
        out["tags"][tag] = _holding(_percentile_interval(acc, level), point)
    out["overall"] = _holding(_percentile_interval(np.mean(np.stack(draws), axis=0), level), float(np.mean(points)))
    return out


def _holding(interval: list[float], point: float) -> list[float]:
    """The interval widened, where needed, to hold the point estimate: posterior draws never reach an
    accuracy of exactly 0 or 1 (or a difference of exactly ±1), which the Jeffreys interval takes as
    its bound there."""
    return [float(min(interval[0], point)), float(max(interval[1], point))]


def _prompt_key(r: Mapping[str, Any]) -> str:
    key = r.get("metadata") or r.get("prompt")
    return key if isinstance(key, str) else json.dumps(key, sort_keys=True)


def paired_difference(
    results_a: Iterable[Mapping[str, Any]],
    results_b: Iterable[Mapping[str, Any]],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Score of ``a`` minus score of ``b`` on the same prompts and seeds, with a bootstrap interval.

    Why: "stage 3 no worse than stage 1" and "EMA no worse than raw weights" compare two models that
    drew images for the *same* prompts from the *same* noise, so their outcomes are paired and the
    difference is far better determined than two separate intervals suggest. Images are paired by
    (tag, prompt, sample index, seed); images present in only one run are left out (``pairs`` counts
    the rest). The bootstrap resamples prompts within each tag, then draws each drawn prompt's shares
    of the four outcome kinds (both right, only a, only b, both wrong) from their Jeffreys posterior,
    Dirichlet(counts + ½), as :func:`confidence_intervals` does for one run: two runs that agree on
    every image get a narrow interval around 0, not one of no width.

    Returns ``{"difference": overall_a − overall_b, "interval": [low, high], "tags": {tag:
    {"difference", "interval"}}, "pairs", "level", "n_boot"}``; ``difference`` is ``None`` without pairs.
    """
    _check_bootstrap(level, n_boot)

    def keyed(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, bool]:
        return {(r["tag"], _prompt_key(r), r.get("sample"), r.get("seed")): bool(r["correct"]) for r in rows}

    a, b = keyed(results_a), keyed(results_b)
    # per tag, per prompt: counts of (a right, b right), (a right, b wrong), (a wrong, b right), (both wrong)
    cells: dict[str, dict[str, list[int]]] = {}
    for key in a.keys() & b.keys():
        tag, prompt = key[:2]
        kind = {(True, True): 0, (True, False): 1, (False, True): 2, (False, False): 3}[(a[key], b[key])]
        cells.setdefault(tag, {}).setdefault(prompt, [0, 0, 0, 0])[kind] += 1
    out: dict[str, Any] = {"difference": None, "interval": None, "tags": {}, "pairs": 0, "level": level,
                           "n_boot": n_boot}
    if not cells:
        return out
    rng = np.random.default_rng(seed)
    order = tag_order(cells)
    points, draws = [], []
    for tag in order:
        counts = np.array(sorted(cells[tag].values()), dtype=np.int64)  # (prompts, 4)
        totals = counts.sum(axis=1)
        point = (counts[:, 1].sum() - counts[:, 2].sum()) / totals.sum()
        pick = rng.integers(0, len(counts), size=(n_boot, len(counts)))
        # Dirichlet draws via normalised Gamma(counts + ½) draws (numpy's dirichlet takes one alpha)
        gamma = rng.standard_gamma(counts[pick] + 0.5)
        shares = gamma / gamma.sum(axis=-1, keepdims=True)
        weights = totals[pick]
        diff = (weights * (shares[..., 1] - shares[..., 2])).sum(axis=1) / weights.sum(axis=1)
        points.append(point)
        draws.append(diff)
        out["tags"][tag] = {"difference": float(point), "interval": _holding(_percentile_interval(diff, level), point)}
        out["pairs"] += int(totals.sum())
    out["difference"] = float(np.mean(points))
    out["interval"] = _holding(_percentile_interval(np.mean(np.stack(draws), axis=0), level), out["difference"])
    return out
