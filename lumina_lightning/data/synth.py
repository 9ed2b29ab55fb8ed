"""Synthetic compositional dataset: flat coloured shapes with GenEval-style prompts and metadata.

Designed so a tiny diffusion model can learn it at 32–64 px on a CPU in minutes, and a rule-based
detector can score generated images without any downloaded model (see peers notes §D.4):

* a few *saturated, well separated* object colours (:data:`PALETTE`, pairwise RGB distance ≥ 116)
  on a plain background chosen from :data:`BACKGROUNDS` (dark/muted, ≥ 110 away from every
  object colour), drawn without anti-aliasing so every pixel is exactly one palette colour;
* large solid shapes (:data:`SHAPES`: circle, square, triangle, and cross, which stays
  recognisable at 32 px), 1–4 objects, placed on a grid so they never overlap;
* every image is one of GenEval's six task types (:data:`TAGS`) with a GenEval-style prompt and
  ``include``/``exclude`` metadata, plus multi-level captions (``short``, ``medium``, ``long``
  (dense: every object, colour, size, region, relation and the background), ``tags``,
  ``prompt``) and the ground-truth objects with bounding boxes;
* held-out compositions: colour–shape pairs in ``holdout`` never appear in the train split, and
  every test image contains at least one of them.

Everything is a pure function of ``(seed, split, image index)``, so output is byte-identical for
the same arguments (and the same Pillow/zlib), regardless of the number of worker processes.

The constants and :func:`sample_scene` / :func:`render_scene` are public so the evaluation code can
reuse the exact palette, shapes and layout rules.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from lumina_lightning.fileio import atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "PALETTE",
    "BACKGROUNDS",
    "SHAPES",
    "DEFAULT_SHAPES",
    "TAGS",
    "RELATIONS",
    "COUNT_WORDS",
    "PLURALS",
    "DEFAULT_HOLDOUT",
    "SceneObject",
    "Scene",
    "SyntheticDataset",
    "sample_scene",
    "render_scene",
    "scene_captions",
    "geneval_metadata",
    "generate_synthetic",
    "parse_holdout",
    "ORIGINS",
    "REGENERABLE_ORIGINS",
    "synthetic_origin",
    "check_generation_target",
    "holds_foreign_files",
    "regenerate_in_place",
]

# Object colours: saturated and far apart in RGB (min pairwise distance 116, blue–purple), all
# GenEval colour words, so nearest-palette-colour segmentation is trivial.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 50, 210),
    "white": (245, 245, 245),
}
# Backgrounds: muted/dark, never an object colour (each ≥ 113 away from every PALETTE entry).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (115, 115, 115),
    "brown": (100, 70, 45),
}
# Drawable shapes. Fill ratios of their boxes differ (square 1.0, circle ≈0.785, cross ≈0.64,
# triangle 0.5), which is what a rule-based classifier can use.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Shapes used unless asked otherwise: the three most distinct at 32 px.
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# GenEval's six task tags, in GenEval's order.
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# GenEval's relations; "A left of B" means A's centre is left of B's.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
# Colour–shape pairs never seen in training by default; each shape and colour still appears.
DEFAULT_HOLDOUT: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
CROSS_ARM = 0.4  # cross arm thickness as a fraction of its box side
_SPLIT_CODES = {"train": 0, "test": 1}


@dataclass
class SceneObject:
    """One drawn object; ``bbox`` is ``[x0, y0, x1, y1]`` in pixels, ``x1``/``y1`` exclusive."""

    shape: str
    color: str
    bbox: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def side(self) -> int:
        return self.bbox[2] - self.bbox[0]


@dataclass
class Scene:
    """A scene: GenEval task ``tag``, canvas size, background and objects.

    For ``position`` scenes ``relation`` holds "A <relation> B" with A = ``objects[0]`` and
    B = ``objects[1]``; other two-object scenes also record their layout relation there, so the
    dense caption can state it.
    """

    tag: str
    width: int
    height: int
    background: str
    objects: list[SceneObject] = field(default_factory=list)
    relation: str | None = None


@dataclass
class SyntheticDataset:
    """Paths written by :func:`generate_synthetic`."""

    root: Path
    images: Path
    train: Path
    test: Path
    test_geneval: Path
    config: Path
    n_train: int
    n_test: int
    train_hq: Path | None = None
    hq_data: Path | None = None
    train_single: Path | None = None
    single_mix: Path | None = None


# --------------------------------------------------------------------------------------------
# Scene sampling
# Tasks whose scenes hold several objects: the tiny pipeline's "high-quality" subset.
HQ_TAGS = ("two_object", "counting", "position", "color_attr")
# Tasks whose scenes hold one large object: recipes/tiny/shapes_pipeline.yaml learns shapes on these first.
SINGLE_TAGS = ("single_object", "colors")


# --------------------------------------------------------------------------------------------
def _grid_for(n: int, width: int, height: int, rng: np.random.Generator) -> tuple[int, int]:
    """Columns × rows for ``n`` objects, choosing the grid whose cells are closest to square."""
    if n == 1:
        return 1, 1
    options = [(n, 1), (1, n)] + ([(2, 2)] if n in (3, 4) else [])
    scores = [abs(math.log((width / c) / (height / r))) for c, r in options]
    best = min(scores)
    choices = [o for o, s in zip(options, scores) if s <= best + 1e-9]
    return choices[int(rng.integers(len(choices)))]


def _place_in_cells(
    rng: np.random.Generator, n: int, width: int, height: int, grid: tuple[int, int], lo: float, hi: float
) -> list[tuple[int, int, int, int]]:
    """One square box per object, each inside its own grid cell (so boxes never overlap)."""
    cols, rows = grid
    cells = [(c, r) for r in range(rows) for c in range(cols)]
    chosen = sorted(rng.choice(len(cells), size=n, replace=False).tolist()) if len(cells) > n else list(range(n))
    boxes = []
    cw, ch = width / cols, height / rows
    for k in chosen:
        c, r = cells[k]
        limit = max(3, int(min(cw, ch)) - 2)  # 1 px margin on each side
        side = int(np.clip(round(rng.uniform(lo, hi) * min(cw, ch)), 3, limit))
        x_lo, y_lo = int(math.ceil(c * cw)) + 1, int(math.ceil(r * ch)) + 1
        x_hi, y_hi = int((c + 1) * cw) - side - 1, int((r + 1) * ch) - side - 1
        x0 = int(rng.integers(x_lo, max(x_lo, x_hi) + 1))
        y0 = int(rng.integers(y_lo, max(y_lo, y_hi) + 1))
        boxes.append((x0, y0, x0 + side, y0 + side))
    return boxes


def _place_relation(rng: np.random.Generator, relation: str, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Boxes for "A <relation> B": A and B in opposite halves, sharing a band across the other axis.

    Keeping both centres in one band makes the relation unambiguous under GenEval's rule (the
    offset along the relation axis dominates the normalised offset).
    """
    horizontal = relation in ("left of", "right of")
    grid = (2, 1) if horizontal else (1, 2)
    cw, ch = width / grid[0], height / grid[1]
    side = [int(np.clip(round(rng.uniform(0.5, 0.8) * min(cw, ch)), 3, max(3, int(min(cw, ch)) - 2))) for _ in range(2)]
    boxes = []
    # Shared band centre on the other axis, with a small per-object jitter (≤ 4% of the canvas).
    if horizontal:
        band = rng.uniform(0.35, 0.65) * height
    else:
        band = rng.uniform(0.35, 0.65) * width
    for k in range(2):
        s = side[k]
        if horizontal:
            x_lo, x_hi = int(math.ceil(k * cw)) + 1, int((k + 1) * cw) - s - 1
            x0 = int(rng.integers(x_lo, max(x_lo, x_hi) + 1))
            cy = band + rng.uniform(-0.04, 0.04) * height
            y0 = int(np.clip(round(cy - s / 2), 1, height - s - 1))
        else:
            y_lo, y_hi = int(math.ceil(k * ch)) + 1, int((k + 1) * ch) - s - 1
            y0 = int(rng.integers(y_lo, max(y_lo, y_hi) + 1))
            cx = band + rng.uniform(-0.04, 0.04) * width
            x0 = int(np.clip(round(cx - s / 2), 1, width - s - 1))
        boxes.append((x0, y0, x0 + s, y0 + s))
    # boxes[0] is in the left/top half; A must be first in the scene.
    if relation in ("right of", "below"):
        boxes.reverse()
    return boxes


def _layout_relation(a: SceneObject, b: SceneObject) -> str:
    """The dominant relation of A to B from box centres (for captions of two-object scenes)."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def sample_scene(
    rng: np.random.Generator,
    tag: str,
    width: int,
    height: int,
    *,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    colors: Sequence[str] = tuple(PALETTE),
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
) -> Scene:
    """Draw a random scene of GenEval task ``tag`` (no hold-out filtering; see ``generate_synthetic``).

    * ``single_object`` / ``colors``: one large object;
    * ``two_object`` / ``color_attr``: two objects of different shapes (``color_attr``: different
      colours too), side by side or stacked;
    * ``counting``: 2–4 objects of one shape and one colour;
    * ``position``: two objects of different shapes in a random relation (A ``relation`` B).
    """
    if tag not in TAGS:
        raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")
    shapes, colors = list(shapes), list(colors)
    if tag in ("two_object", "color_attr", "position") and len(shapes) < 2:
        raise ValueError(f"tag {tag!r} needs at least two shapes")
    background = backgrounds[int(rng.integers(len(backgrounds)))]

    def pick(seq: list[str], exclude: Iterable[str] = ()) -> str:
        pool = [x for x in seq if x not in set(exclude)]
        return pool[int(rng.integers(len(pool)))]

    scene = Scene(tag, width, height, background)
    if tag in ("single_object", "colors"):
        (box,) = _place_in_cells(rng, 1, width, height, (1, 1), 0.45, 0.75)
        scene.objects = [SceneObject(pick(shapes), pick(colors), box)]
    elif tag == "counting":
        n = int(rng.integers(2, 5))
        grid = _grid_for(n, width, height, rng)
        boxes = _place_in_cells(rng, n, width, height, grid, 0.55, 0.85)
        shape, color = pick(shapes), pick(colors)
        scene.objects = [SceneObject(shape, color, b) for b in boxes]
    elif tag == "position":
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        boxes = _place_relation(rng, relation, width, height)
        sa = pick(shapes)
        sb = pick(shapes, [sa])
        scene.objects = [SceneObject(sa, pick(colors), boxes[0]), SceneObject(sb, pick(colors), boxes[1])]
        scene.relation = relation
    else:  # two_object, color_attr
        grid = _grid_for(2, width, height, rng)
        boxes = _place_in_cells(rng, 2, width, height, grid, 0.5, 0.8)
        if rng.integers(2):
            boxes.reverse()
        sa = pick(shapes)
        sb = pick(shapes, [sa])
        ca = pick(colors)
        cb = pick(colors, [ca]) if tag == "color_attr" else pick(colors)
        scene.objects = [SceneObject(sa, ca, boxes[0]), SceneObject(sb, cb, boxes[1])]
        scene.relation = _layout_relation(*scene.objects)
    return scene


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x0, y0, x1, y1 = obj.bbox
    fill = PALETTE[obj.color]
    xr, yb = x1 - 1, y1 - 1  # Pillow boxes are inclusive
    if obj.shape == "circle":
        draw.ellipse([x0, y0, xr, yb], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, xr, yb], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + xr) / 2, y0), (xr, yb), (x0, yb)], fill=fill)
    elif obj.shape == "cross":
        side = x1 - x0
        arm = max(1, round(side * CROSS_ARM))
        a0 = x0 + (side - arm) // 2
        b0 = y0 + (side - arm) // 2
        draw.rectangle([a0, y0, a0 + arm - 1, yb], fill=fill)
        draw.rectangle([x0, b0, xr, b0 + arm - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB image: flat colours, no anti-aliasing, objects in list order."""
    img = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_object(draw, obj)
    return img


# --------------------------------------------------------------------------------------------
# Captions and metadata
# --------------------------------------------------------------------------------------------
def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _phrase(obj: SceneObject) -> str:
    return _a(f"{obj.color} {obj.shape}")


def _region(obj: SceneObject, width: int, height: int) -> str:
    """Where an object is on a 3×3 grid: "in the center", "on the left", "at the top right", ..."""
    cx, cy = obj.center
    col = ("left", "", "right")[min(2, int(3 * cx / width))]
    row = ("top", "", "bottom")[min(2, int(3 * cy / height))]
    if not row and not col:
        return "in the center"
    if not row:
        return f"on the {col}"
    return f"at the {row} {col}".rstrip()


def _size_word(obj: SceneObject, width: int, height: int) -> str:
    frac = obj.side / min(width, height)
    return "large" if frac >= 0.45 else ("small" if frac < 0.25 else "medium-sized")


def _core(scene: Scene) -> str:
    objs = scene.objects
    if scene.tag == "counting":
        o = objs[0]
        return f"{COUNT_WORDS[len(objs)]} {o.color} {PLURALS[o.shape]}"
    if len(objs) == 1:
        return _phrase(objs[0])
    if scene.tag == "position":
        return f"{_phrase(objs[0])} {scene.relation} {_phrase(objs[1])}"
    return f"{_phrase(objs[0])} and {_phrase(objs[1])}"


def scene_captions(scene: Scene) -> dict[str, str]:
    """Multi-level captions: ``short``, ``medium``, ``long`` (dense), ``tags`` and ``prompt``.

    ``prompt`` is the GenEval-style prompt (see :func:`geneval_metadata`).
    """
    w, h = scene.width, scene.height
    objs = scene.objects
    short = _core(scene)
    medium = f"{short} on a {scene.background} background"
    n = len(objs)
    sentences = [f"A flat, simple picture of {COUNT_WORDS[n]} object{'s' if n > 1 else ''} on a plain "
                 f"{scene.background} background."]
    for obj in objs:
        sentences.append(f"{_a(_size_word(obj, w, h)).capitalize()} {obj.color} {obj.shape} is {_region(obj, w, h)}.")
    if scene.tag == "counting":
        sentences.append(f"All {COUNT_WORDS[n]} {PLURALS[objs[0].shape]} are {objs[0].color}.")
    if n == 2 and scene.relation:
        a, b = objs
        sentences.append(f"The {a.color} {a.shape} is {scene.relation} the {b.color} {b.shape}.")
    long = " ".join(sentences)
    groups: dict[tuple[str, str], int] = {}
    for obj in objs:
        groups[(obj.color, obj.shape)] = groups.get((obj.color, obj.shape), 0) + 1
    tags = [f"{c} {s}" if k == 1 else f"{k} {c} {PLURALS[s]}" for (c, s), k in groups.items()]
    tags += [f"{scene.background} background", f"{n} object{'s' if n > 1 else ''}"]
    if scene.tag == "position":
        tags.append(scene.relation or "")
    return {"short": short, "medium": medium, "long": long, "tags": ", ".join(tags),
            "prompt": geneval_metadata(scene)["prompt"]}


def geneval_metadata(scene: Scene) -> dict[str, Any]:
    """GenEval-format metadata: ``tag``, ``prompt``, ``include`` (and ``exclude`` for counting).

    Mirrors GenEval's ``evaluation_metadata.jsonl``: ``include`` lists ``{"class", "count",
    "color"?, "position"?: [relation, index]}``; for ``position`` the reference object comes first
    and the other carries ``["left of", 0]`` etc. Unlike GenEval, counting and position prompts
    name colours too (every object here has a colour; e.g. "a photo of two red circles").
    """
    objs = scene.objects
    tag = scene.tag
    out: dict[str, Any] = {"tag": tag}
    if tag == "single_object":
        o = objs[0]
        out["prompt"] = f"a photo of {_a(o.shape)}"
        out["include"] = [{"class": o.shape, "count": 1}]
    elif tag == "colors":
        o = objs[0]
        out["prompt"] = f"a photo of {_a(o.color + ' ' + o.shape)}"
        out["include"] = [{"class": o.shape, "count": 1, "color": o.color}]
    elif tag == "counting":
        o, n = objs[0], len(objs)
        out["prompt"] = f"a photo of {COUNT_WORDS[n]} {o.color} {PLURALS[o.shape]}"
        out["include"] = [{"class": o.shape, "count": n, "color": o.color}]
        out["exclude"] = [{"class": o.shape, "count": n + 1}]
    elif tag == "two_object":
        a, b = objs
        out["prompt"] = f"a photo of {_a(a.shape)} and {_a(b.shape)}"
        out["include"] = [{"class": a.shape, "count": 1}, {"class": b.shape, "count": 1}]
    elif tag == "color_attr":
        a, b = objs
        out["prompt"] = f"a photo of {_phrase(a)} and {_phrase(b)}"
        out["include"] = [{"class": a.shape, "count": 1, "color": a.color},
                          {"class": b.shape, "count": 1, "color": b.color}]
    else:  # position
        a, b = objs
        out["prompt"] = f"a photo of {_phrase(a)} {scene.relation} {_phrase(b)}"
        out["include"] = [{"class": b.shape, "count": 1, "color": b.color},
                          {"class": a.shape, "count": 1, "color": a.color, "position": [scene.relation, 0]}]
    return out


def _record(scene: Scene, image_rel: str, sample_id: str, split: str) -> dict[str, Any]:
    meta = geneval_metadata(scene)
    meta.update({
        "id": sample_id,
        "split": split,
        "objects": [{"class": o.shape, "color": o.color, "bbox": list(o.bbox)} for o in scene.objects],
        "background": scene.background,
    })
    if scene.relation:
        meta["relation"] = scene.relation
    return {"image": image_rel, "width": scene.width, "height": scene.height,
            "captions": scene_captions(scene), "meta": meta}


# --------------------------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------------------------
def parse_holdout(spec: str | Iterable[Sequence[str]] | None) -> tuple[tuple[str, str], ...]:
    """``"red:triangle,green:circle"`` (or pairs, or ``"none"``/``None``) → ``(("red", "triangle"), ...)``."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.lower() in ("", "none"):
            return ()
        pairs = []
        for part in spec.split(","):
            if ":" not in part:
                raise ValueError(f"hold-out pair {part!r} must look like colour:shape (e.g. red:triangle)")
            c, s = (x.strip() for x in part.split(":", 1))
            pairs.append((c, s))
        spec = pairs
    out = tuple((str(c), str(s)) for c, s in spec)
    for c, s in out:
        if c not in PALETTE or s not in SHAPES:
            raise ValueError(f"unknown hold-out pair {c}:{s}; colours {tuple(PALETTE)}, shapes {SHAPES}")
    return out


def _canvas(size: int, aspect: float) -> tuple[int, int]:
    """Canvas of about ``size²`` pixels with width/height ≈ ``aspect`` (multiples of 16 when ``size`` is).

    Width and height are not snapped independently: at 64 px that turned 4:3 into 80×48 (5:3). Of
    the snapped pairs next to the ideal ``size·√aspect × size/√aspect`` (each side rounded down or up,
    the other side fitted to it) and with at most twice or half ``size²`` pixels, the one closest in
    aspect is taken, then the one closest to ``size²`` in area: 4:3 at 64 px is 64×48. A square
    canvas is ``size×size`` as before. (The bucket list of ``data.buckets`` is no help here: at
    64 px, patch 16, it holds only the square.)
    """
    step, smallest = (16, 16) if size % 16 == 0 else (1, 8)
    ideal_w, ideal_h = size * math.sqrt(aspect), size / math.sqrt(aspect)

    def snap(x: float) -> int:
        return max(smallest, int(round(x / step)) * step)

    def around(x: float) -> set[int]:
        return {max(smallest, math.floor(x / step) * step), max(smallest, math.ceil(x / step) * step)}

    def area_error(pair: tuple[int, int]) -> float:
        return abs(math.log(pair[0] * pair[1] / size**2))

    pairs = {(snap(h * aspect), h) for h in around(ideal_h)} | {(w, snap(w / aspect)) for w in around(ideal_w)}
    # at most twice or half size² where there is such a pair: at 16 px, 4:1 as 64×16 would be 4 × the pixels
    near = [p for p in pairs if area_error(p) <= math.log(2) + 1e-9] or list(pairs)
    return min(near, key=lambda p: (abs(math.log(p[0] / p[1] / aspect)), area_error(p), p))


@dataclass
class _Job:
    root: str
    split: str
    start: int
    stop: int
    seed: int
    size: int
    aspects: tuple[float, ...]
    holdout: tuple[tuple[str, str], ...]
    tags: tuple[str, ...]
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    backgrounds: tuple[str, ...]


def _make_one(job: _Job, i: int) -> dict[str, Any]:
    rng = np.random.default_rng([job.seed & 0xFFFFFFFFFFFFFFFF, _SPLIT_CODES[job.split], i])
    tag = job.tags[i % len(job.tags)]  # exact balance over the tags
    width, height = _canvas(job.size, job.aspects[int(rng.integers(len(job.aspects)))])
    held = set(job.holdout)
    for _ in range(10_000):
        scene = sample_scene(rng, tag, width, height, shapes=job.shapes, colors=job.colors,
                             backgrounds=job.backgrounds)
        novel = any((o.color, o.shape) in held for o in scene.objects)
        if (job.split == "train" and not novel) or (job.split == "test" and (novel or not held)):
            break
    else:  # pragma: no cover - prevented by the checks in generate_synthetic
        raise RuntimeError(f"could not draw a {job.split} scene for tag {tag!r} under hold-out {job.holdout}")
    sample_id = f"{job.split}_{i:06d}"
    rel = f"images/{sample_id}.png"
    render_scene(scene).save(os.path.join(job.root, rel), format="PNG", optimize=False, compress_level=6)
    return _record(scene, rel, sample_id, job.split)


def _run_job(job: _Job) -> list[dict[str, Any]]:
    return [_make_one(job, i) for i in range(job.start, job.stop)]


def _check_holdout(holdout, shapes, colors) -> None:
    held = set(holdout)
    for s in shapes:
        if all((c, s) in held for c in colors):
            raise ValueError(f"hold-out removes every colour of shape {s!r} from training")
    if held and not any(s in shapes and c in colors for c, s in held):
        raise ValueError("no hold-out pair uses the selected shapes and colours; the test split could not be made")


COMPLETE_MARKER = "synth_config.json"


# Written first and removed after COMPLETE_MARKER: a folder holding it is a generation that was cut
# short, which may be redone; a folder with files and neither marker is someone's data, never written over.
INCOMPLETE_MARKER = "synth_incomplete"


def synthetic_incomplete(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a generation of ``generate_synthetic`` that did not finish."""
    return (Path(out_dir) / INCOMPLETE_MARKER).is_file()


def synthetic_complete(out_dir: str | os.PathLike) -> bool:
    """Whether ``generate_synthetic`` finished writing ``out_dir`` (its last file is there)."""
    return (Path(out_dir) / COMPLETE_MARKER).is_file()


# Who asked for a synthetic set, recorded in its COMPLETE_MARKER as "origin": a set that a recipe's
# ``data.synthetic`` or a pipeline's ``synthetic`` step made is theirs to regenerate when their settings
# change (it is a pure function of those settings); one that ``lumina data synth`` made is the user's
# (16,000 images asked for on purpose) and is never regenerated by a recipe.
ORIGINS = ("cli", "recipe", "pipeline")
REGENERABLE_ORIGINS = ("recipe", "pipeline")


def synthetic_origin(out_dir: str | os.PathLike) -> str | None:
    """Who made the complete set in ``out_dir`` (one of :data:`ORIGINS`); ``None`` for a set whose
    marker names none (written before origins were recorded, or by a caller that gave none)."""
    try:
        made = json.loads((Path(out_dir) / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    origin = made.get("origin") if isinstance(made, dict) else None
    return origin if origin in ORIGINS else None


def holds_foreign_files(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds files but no synthetic set (neither marker): someone's own data, which
    generating a set into it would write over."""
    folder = Path(folder)
    return folder.is_dir() and any(folder.iterdir()) and not synthetic_complete(folder) \
        and not synthetic_incomplete(folder)


def check_generation_target(folder: str | os.PathLike, asker: str, keep_hint: str, target: str) -> None:
    """Refuse to generate into a folder that holds files but no synthetic set (neither marker): it is
    the user's own data (a manifest, images), which generating would write over.

    ``asker`` names who would generate (``data.synthetic``, the pipeline's ``synthetic`` step),
    ``keep_hint`` how to use the folder as it is instead, ``target`` the setting that names the folder.
    """
    folder = Path(folder)
    if holds_foreign_files(folder):
        raise ValueError(
            f"{folder} holds files but no synthetic dataset (no {COMPLETE_MARKER}); {asker} would generate one "
            f"into it, over those files. {keep_hint}; to generate, point {target} into a new or empty folder")


def regenerate_in_place(folder: str | os.PathLike, differences: dict[str, tuple[Any, Any]], asker: str,
                        keep_hint: str, target: str) -> bool:
    """Whether the complete set in ``folder``, made with other arguments (``differences``: on disk ->
    asked for) than ``asker`` asks for, may be regenerated in place (``True``) or must be moved aside
    first (``False``).

    Only a set that a recipe's ``data.synthetic`` or a pipeline made is regenerated in place: it is a
    pure function of their settings. One that ``lumina data synth`` made is the user's and is refused
    (their 16,000 images must not become a recipe's 4,000). A set whose marker names no maker was
    written before makers were recorded, when the CLI and recipes wrote the same marker: it may be
    either, so it is kept (moved aside), not deleted.

    Raises:
        ValueError: the set was made by ``lumina data synth``; the message says how to keep it
            (``keep_hint``) or to generate elsewhere (``target``, see :func:`check_generation_target`).
    """
    named = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in differences.items())
    origin = synthetic_origin(folder)
    if origin in REGENERABLE_ORIGINS:
        log.warning("the synthetic dataset in %s was generated by a %s with other arguments (%s): regenerating it "
                    "for %s", folder, origin, named, asker)
        return True
    if origin is not None:
        raise ValueError(
            f"the synthetic dataset in {folder} was made by `lumina data synth` with other arguments than {asker} "
            f"asks for (on disk -> {asker}: {named}); {asker} would regenerate it over those images. {keep_hint}; "
            f"to generate {asker}'s set, point {target} into another folder (or delete {folder})")
    log.warning("the synthetic dataset in %s was generated with other arguments (%s), and its %s does not record "
                "whether `lumina data synth` or a recipe made it (earlier versions did not): moving it aside and "
                "generating %s's set", folder, named, COMPLETE_MARKER, asker)
    return False


def _config_dict(n, n_test, size, seed, aspects, held, tags, shapes, colors, backgrounds) -> dict[str, Any]:
    """What ``synth_config.json`` holds for these (normalised) arguments."""
    return {
        "n_train": n, "n_test": n_test, "size": size, "seed": seed, "aspects": list(aspects),
        "holdout": [list(p) for p in held], "tags": list(tags), "shapes": list(shapes), "colors": list(colors),
        "backgrounds": list(backgrounds), "palette": {c: list(PALETTE[c]) for c in colors},
        "background_palette": {b: list(BACKGROUNDS[b]) for b in backgrounds}, "cross_arm": CROSS_ARM,
    }


def synthetic_config(**spec: Any) -> dict[str, Any]:
    """The ``synth_config.json`` that ``generate_synthetic(out_dir, **spec)`` writes (JSON-normalised).

    Raises ``ValueError`` for a ``spec`` key that :func:`generate_synthetic` does not take."""
    import inspect

    params = inspect.signature(generate_synthetic).parameters
    # "origin" is not a dataset argument: whoever calls generate_synthetic says who it is
    unknown = sorted((set(spec) - set(params) - {"out_dir"}) | (set(spec) & {"origin"}))
    if unknown:
        allowed = [k for k in params if k not in ("out_dir", "progress", "origin")]
        raise ValueError(f"unknown synthetic dataset arguments {unknown}; allowed: {', '.join(allowed)}")
    bound = inspect.signature(generate_synthetic).bind("", **spec)
    bound.apply_defaults()
    a = bound.arguments
    n = int(a["n"])
    n_test = max(len(tuple(a["tags"])), n // 10) if a["n_test"] is None else int(a["n_test"])
    config = _config_dict(n, n_test, a["size"], a["seed"], tuple(float(x) for x in a["aspects"]),
                          parse_holdout(a["holdout"]), tuple(a["tags"]), tuple(a["shapes"]), tuple(a["colors"]),
                          tuple(a["backgrounds"]))
    return json.loads(json.dumps(config))


def synthetic_differences(out_dir: str | os.PathLike, spec: dict[str, Any]) -> dict[str, tuple[Any, Any]] | None:
    """How the complete synthetic dataset in ``out_dir`` differs from what ``generate_synthetic(**spec)``
    would write: ``{key: (on disk, wanted)}`` (empty when it matches); ``None`` when it is not complete.

    Raises ``ValueError`` for a ``spec`` key that ``generate_synthetic`` does not take."""
    wanted = synthetic_config(**spec)  # first: an unknown key is refused even before a first generation
    if not synthetic_complete(out_dir):
        return None
    try:
        made = json.loads((Path(out_dir) / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        made = {}
    if not isinstance(made, dict):
        made = {}
    return {k: (made.get(k), v) for k, v in wanted.items() if made.get(k) != v}


def generate_synthetic(
    out_dir: str | os.PathLike,
    n: int,
    size: int = 64,
    seed: int = 0,
    *,
    n_test: int | None = None,
    aspects: Sequence[float] = (1.0,),
    holdout: str | Iterable[Sequence[str]] | None = DEFAULT_HOLDOUT,
    tags: Sequence[str] = TAGS,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    colors: Sequence[str] = tuple(PALETTE),
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    workers: int = 0,
    progress: bool = False,
    origin: str | None = None,
) -> SyntheticDataset:
    """Render the synthetic dataset into ``out_dir`` and return the paths written.

    Writes ``images/{train,test}_NNNNNN.png``, ``train.jsonl`` and ``test.jsonl`` (manifests with
    width/height, captions and metadata), ``test_geneval.jsonl`` (one GenEval-format prompt per
    line: ``prompt``, ``tag``, ``include``, ``exclude``; unique prompts of the test split) and
    ``synth_config.json`` (the arguments, palette and hold-out).

    Args:
        n: number of training images; ``n_test`` test images (default ``max(len(tags), n // 10)``).
        size: images have about ``size²`` pixels (exactly ``size×size`` for aspect 1).
        seed: everything is a function of ``(seed, split, index)``: same seed, same bytes.
        aspects: width/height ratios to draw from, e.g. ``(1.0, 4/3, 3/4)``.
        holdout: colour–shape pairs kept out of training (``"red:triangle,..."``, pairs or None).
        tags, shapes, colors, backgrounds: subsets of :data:`TAGS`, :data:`SHAPES`,
            :data:`PALETTE`, :data:`BACKGROUNDS`.
        workers: processes to render with (0/1 = in this process; output is identical).
        origin: who asks for the set, recorded in ``synth_config.json`` (:data:`ORIGINS`):
            ``"cli"`` (``lumina data synth``), ``"recipe"`` (a recipe's ``data.synthetic``) or
            ``"pipeline"``. ``None`` (the default) records none, which ``ensure_synthetic`` reads as
            unknown: it sets such a set aside rather than regenerate it in place.
    """
    if origin is not None and origin not in ORIGINS:
        raise ValueError(f"origin must be one of {ORIGINS} or None, got {origin!r}")
    if n < 0 or size < 8:
        raise ValueError(f"need n >= 0 and size >= 8, got n={n}, size={size}")
    tags, shapes, colors, backgrounds = tuple(tags), tuple(shapes), tuple(colors), tuple(backgrounds)
    for name, got, allowed in (("tag", tags, TAGS), ("shape", shapes, SHAPES), ("colour", colors, tuple(PALETTE)),
                               ("background", backgrounds, tuple(BACKGROUNDS))):
        bad = [x for x in got if x not in allowed]
        if bad or not got:
            raise ValueError(f"unknown or empty {name} selection {bad or got}; choose from {allowed}")
    if any(a <= 0 for a in aspects):
        raise ValueError(f"aspect ratios must be positive, got {aspects}")
    held = parse_holdout(holdout)
    _check_holdout(held, shapes, colors)
    n_test = max(len(tags), n // 10) if n_test is None else int(n_test)
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / INCOMPLETE_MARKER, "generate_synthetic has not finished writing this folder\n")
    # the marker of a set generated before goes first: a regeneration interrupted half-way must not
    # pass for complete (old and new images mixed) on the next run
    (root / COMPLETE_MARKER).unlink(missing_ok=True)

    def jobs_for(split: str, count: int) -> list[_Job]:
        chunk = 500
        return [_Job(str(root), split, s, min(count, s + chunk), int(seed), int(size), tuple(float(a) for a in aspects),
                     held, tags, shapes, colors, backgrounds) for s in range(0, count, chunk)]

    jobs = jobs_for("train", n) + jobs_for("test", n_test)
    results: list[list[dict[str, Any]]]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n + n_test, desc="rendering", unit="img")
    if workers and workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        # "spawn", never "fork": a forked child inherits locks that the parent's other threads (torch's
        # thread pool, the allocator's background thread) may hold at that instant, and then waits on
        # them forever. That hung a CI run (the worker sat in a futex wait, the parent in pool.imap).
        with mp.get_context("spawn").Pool(workers) as pool:
            results = []
            for res in pool.imap(_run_job, jobs):
                results.append(res)
                if bar:
                    bar.update(len(res))
    else:
        results = []
        for job in jobs:
            results.append(_run_job(job))
            if bar:
                bar.update(len(results[-1]))
    if bar:
        bar.close()
    train = [r for res, job in zip(results, jobs) if job.split == "train" for r in res]
    test = [r for res, job in zip(results, jobs) if job.split == "test" for r in res]

    def dump(rows: list[dict[str, Any]], path: Path) -> None:
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

    dump(train, root / "train.jsonl")
    dump(test, root / "test.jsonl")

    def mix(path: Path, comment: str, sources: list[tuple[str, float]]) -> None:
        """A data YAML in the official META style (sources and per-epoch ratios)."""
        entries = "".join(f"  - path: {name}\n    ratio: {ratio}\n" for name, ratio in sources)
        atomic_write_text(path, f"# {comment}\nMETA:\n{entries}")

    # A stand-in for curated "high-quality" data (the HQ tuning stage, spec §5): the compositionally
    # rich scenes, whose dense captions carry the most, mixed with half of everything else.
    dump([r for r in train if r["meta"]["tag"] in HQ_TAGS], root / "train_hq.jsonl")
    mix(root / "hq.yaml", "HQ mix for the tiny HQ stage: multi-object scenes in full + a random half of all "
        "scenes each epoch", [("train_hq.jsonl", 1.0), ("train.jsonl", 0.5)])
    # One large object per scene: the subset on which a tiny model first learns to draw a shape at
    # all (stages 1 and 3 of recipes/tiny/shapes_pipeline.yaml; measured in docs/tiny_pipeline_experiments.md).
    dump([r for r in train if r["meta"]["tag"] in SINGLE_TAGS], root / "train_single.jsonl")
    mix(root / "single_mix.yaml", "every scene once + the one-object scenes again each epoch "
        "(recipes/tiny/shapes_pipeline.yaml, stage 2)", [("train_single.jsonl", 1.0), ("train.jsonl", 1.0)])
    prompts: dict[str, dict[str, Any]] = {}
    for row in test:
        meta = row["meta"]
        entry = {k: meta[k] for k in ("tag", "include", "exclude", "prompt") if k in meta}
        prompts.setdefault(meta["prompt"], entry)
    dump(list(prompts.values()), root / "test_geneval.jsonl")
    config = _config_dict(n, n_test, size, seed, aspects, held, tags, shapes, colors, backgrounds)
    if origin is not None:  # no key otherwise: the marker is byte-identical to an earlier version's
        config["origin"] = origin
    # Written last: its presence marks a complete dataset (see synthetic_complete).
    atomic_write_text(root / COMPLETE_MARKER, json.dumps(config, indent=2) + "\n")
    (root / INCOMPLETE_MARKER).unlink(missing_ok=True)
    return SyntheticDataset(root, root / "images", root / "train.jsonl", root / "test.jsonl",
                            root / "test_geneval.jsonl", root / "synth_config.json", n, n_test,
                            root / "train_hq.jsonl", root / "hq.yaml", root / "train_single.jsonl",
                            root / "single_mix.yaml")


def scene_from_meta(meta: dict[str, Any], width: int, height: int) -> Scene:
    """Rebuild a :class:`Scene` from a manifest record's ``meta`` (for re-rendering ground truth)."""
    objects = [SceneObject(o["class"], o["color"], tuple(o["bbox"])) for o in meta["objects"]]
    return Scene(meta["tag"], width, height, meta["background"], objects, meta.get("relation"))

