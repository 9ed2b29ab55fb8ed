"""A rule-based object detector for the synthetic renderer (no weights; numpy + scipy only).

It stands in for GenEval's Mask2Former + CLIP colour classifier (peers notes §D.1/§D.4.2) on the
images of :mod:`lumina_lightning.data.synth`: flat, saturated shapes on a plain dark/muted background.
It is meant to read what a *tiny* diffusion model produces, so every step tolerates blurry edges,
slight colour shifts, speckle and JPEG-like noise:

1. **Background**: the per-channel median of a 2-pixel frame around the image (objects keep a
   1-px margin and cover little of the frame, so the median is the background colour, even when a
   model's background drifts from the palette's).
2. **Colour segmentation against the background**: a blurred or faded object pixel is a mix of its
   colour ``c`` and the background ``b``, i.e. it lies near the segment ``b → c`` in RGB. For every
   palette colour we project the pixel onto that segment, giving a mixing fraction ``alpha`` and a
   residual (distance to the segment). A pixel belongs to colour ``c`` when ``alpha >= 0.5`` (the
   half-way contour, which keeps an object's size unchanged under symmetric blur) and the residual
   is small; among several, the smallest residual wins. Nearest-colour labelling without the
   segment would turn the blurred rim of e.g. a yellow object on black into a red ring.
3. **Clean-up**: pixels with fewer than two same-colour 8-neighbours are dropped (speckle, 1-px
   lines), connected components (4-connectivity, so two objects touching only at a corner stay
   apart) smaller than ``min_area_frac`` of the image are discarded, and holes are filled (the
   renderer only draws solid shapes; holes are noise).
4. **Shape from the region**: the component's mask is compared, inside its own bounding box, with
   templates of every shape drawn at exactly that box size (circle = inscribed ellipse, square = the
   box, triangle = the renderer's apex-up triangle and its three rotations, cross with the
   renderer's arm width). The class is the best template and the score its IoU. This is the
   bounding-box fill-ratio idea (square 1.0, circle ≈ 0.785, cross ≈ 0.64, triangle 0.5) made
   exact at small sizes, where pixelation changes the ratios, plus the layout of the pixels, which
   separates e.g. a circle from a cross of similar fill. Templates softened by a Gaussian blur
   are tried too, and boxes more elongated than 1.5:1 lower the score (the renderer's shapes sit
   in square boxes). A component that fits poorly is also tried as several same-coloured objects
   joined by a thin neck. Components below ``min_score`` (blobs that look like none of the
   shapes) are not reported, like GenEval's confidence threshold.

Detections are dicts ``{"class", "color", "bbox": [x0, y0, x1, y1] (x1/y1 exclusive, as the
renderer's boxes), "area", "score"}``, sorted by score (GenEval takes the most confident first).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from lumina_lightning.data.synth import CROSS_ARM, PALETTE, SHAPES

__all__ = ["Detector", "detect", "estimate_background", "segment_colors", "shape_scores"]

_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
_EIGHT_NEIGHBOURS = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=np.int32)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    return arr.astype(np.float32)


def estimate_background(pixels: np.ndarray, frame: int = 2) -> np.ndarray:
    """Per-channel median of the ``frame``-pixel border: the renderer keeps a margin around objects."""
    h, w, _ = pixels.shape
    f = max(1, min(frame, h // 4, w // 4))
    border = np.concatenate([
        pixels[:f].reshape(-1, 3), pixels[-f:].reshape(-1, 3),
        pixels[f:-f, :f].reshape(-1, 3), pixels[f:-f, -f:].reshape(-1, 3),
    ])
    return np.median(border, axis=0)


def segment_colors(
    pixels: np.ndarray,
    background: np.ndarray,
    colors: np.ndarray,
    *,
    min_alpha: float = 0.5,
    max_residual: float = 64.0,
) -> np.ndarray:
    """Per-pixel colour index (into ``colors``) or -1 for background, by projection on ``b → c``.

    ``max_residual`` (RGB units) bounds how far a pixel may sit off the mixing segment: half the
    smallest distance between a pure palette colour and the segment of another colour over any of
    the renderer's backgrounds (≥ 80), rounded, leaves room for colour drift and noise without ever
    accepting a pixel that is closer to another colour's segment.
    """
    d = pixels - background  # (H, W, 3)
    v = colors - background  # (K, 3)
    vv = np.maximum((v * v).sum(1), 1e-6)  # (K,)
    dv = d @ v.T  # (H, W, K)
    alpha = dv / vv
    a = np.clip(alpha, 0.0, 1.0)
    # |d - a v|^2 expanded, so no (H, W, K, 3) array is built
    resid = np.sqrt(np.maximum((d * d).sum(-1, keepdims=True) - 2 * a * dv + a * a * vv, 0.0))
    resid = np.where((alpha >= min_alpha) & (resid <= max_residual), resid, np.inf)
    label = resid.argmin(axis=2)
    label[~np.isfinite(resid.min(axis=2))] = -1
    return label


def _draw_template(shape: str, w: int, h: int, variant: int) -> np.ndarray:
    """Boolean mask of ``shape`` filling a ``w × h`` box, drawn like ``synth.render_scene`` does."""
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    xr, yb = w - 1, h - 1  # Pillow boxes are inclusive
    if shape == "circle":
        draw.ellipse([0, 0, xr, yb], fill=1)
    elif shape == "square":
        draw.rectangle([0, 0, xr, yb], fill=1)
    elif shape == "triangle":
        # variant 0 is the renderer's apex-up triangle; 1-3 are the other orientations a model
        # might draw (still triangles to a human, and to GenEval's detector).
        corners = {
            0: [(xr / 2, 0), (xr, yb), (0, yb)],
            1: [(xr / 2, yb), (xr, 0), (0, 0)],
            2: [(0, yb / 2), (xr, 0), (xr, yb)],
            3: [(xr, yb / 2), (0, 0), (0, yb)],
        }[variant]
        draw.polygon(corners, fill=1)
    elif shape == "cross":
        aw, ah = max(1, round(w * CROSS_ARM)), max(1, round(h * CROSS_ARM))
        a0, b0 = (w - aw) // 2, (h - ah) // 2
        draw.rectangle([a0, 0, a0 + aw - 1, yb], fill=1)
        draw.rectangle([0, b0, xr, b0 + ah - 1], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(img, dtype=bool)


_VARIANTS = {"triangle": 4}
# Relative blur levels (Gaussian sigma / object side) of the softened templates: enough for a
# 2x down- and up-scaled 9-px object (the smallest the renderer draws at 32 px).
BLUR_LEVELS: tuple[float, ...] = (0.0, 0.06, 0.12)
_WELL_EXPLAINED = 0.95  # template IoU above which a component is not tried as several objects
_HI_RES = 64  # side of the high-resolution box the softened templates are drawn in


def _blurred_template(shape: str, w: int, h: int, variant: int, blur: float) -> np.ndarray:
    """What ``shape`` looks like after a Gaussian blur of ``blur`` × its side and the half-way
    threshold, cropped to its own box and stretched to ``w × h``.

    A blurred shape thresholded at 0.5 loses thin parts (a triangle's apex, a cross's arm ends)
    and rounds its corners, so its box shrinks and its fill ratio grows: a 7-px-wide blurred
    triangle has the fill of a circle. Matching against softened templates keeps such a blob a
    triangle (Gaussian blur does not move the half-way contour of a straight edge, only of corners).
    """
    bw = max(8, round(_HI_RES * w / max(w, h)))
    bh = max(8, round(_HI_RES * h / max(w, h)))
    sigma = blur * _HI_RES
    pad = int(np.ceil(3 * sigma)) + 1
    canvas = np.zeros((bh + 2 * pad, bw + 2 * pad), dtype=np.float32)
    canvas[pad:pad + bh, pad:pad + bw] = _draw_template(shape, bw, bh, variant)
    soft = ndimage.gaussian_filter(canvas, sigma) >= 0.5
    ys, xs = np.nonzero(soft)
    if ys.size == 0:
        return np.zeros((h, w), dtype=bool)
    crop = soft[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    small = Image.fromarray(crop * 255).resize((w, h), Image.Resampling.BOX)
    return np.asarray(small) >= 127.5


@lru_cache(maxsize=8192)
def _templates(shapes: tuple[str, ...], w: int, h: int) -> tuple[tuple[str, np.ndarray], ...]:
    out = []
    for shape in shapes:
        for variant in range(_VARIANTS.get(shape, 1)):
            # the sharp template is drawn at the box size directly: exact at any size, so a ground
            # truth render matches its class with IoU 1
            out.append((shape, _draw_template(shape, w, h, variant)))
            for blur in BLUR_LEVELS[1:]:
                out.append((shape, _blurred_template(shape, w, h, variant, blur)))
    return tuple(out)


def shape_scores(mask: np.ndarray, shapes: Sequence[str] = SHAPES) -> dict[str, float]:
    """IoU of a component mask (cropped to its bounding box) with each shape's template."""
    h, w = mask.shape
    area = mask.sum()
    best: dict[str, float] = {}
    for shape, tmpl in _templates(tuple(shapes), int(w), int(h)):
        inter = np.logical_and(mask, tmpl).sum()
        iou = float(inter / (area + tmpl.sum() - inter)) if area else 0.0
        best[shape] = max(best.get(shape, 0.0), iou)
    return best


class Detector:
    """Colour segmentation + connected components + template shape classification.

    Args:
        palette: colour name → RGB; default the renderer's :data:`~lumina_lightning.data.synth.PALETTE`.
            The vocabulary is fixed (like GenEval's 10 colours and 80 COCO classes), not the prompt's.
        shapes: shape classes to recognise; default all of :data:`~lumina_lightning.data.synth.SHAPES`.
        min_area_frac: smallest component kept, as a fraction of the image area (0.01 = a 3×3 blob at
            32², 6×6 at 64²; the renderer's smallest object is ≥ 9×9 px at 32²).
        min_score: smallest template IoU of a reported object (GenEval keeps boxes above 0.3
            confidence; our score is an IoU, and a blob matching no template better than 0.5 is not
            any of the shapes).
        max_objects: at most this many detections per class, most confident first (GenEval: 16).
        max_residual, min_alpha: see :func:`segment_colors`.
        max_split_erosion: erosions tried to split same-coloured objects joined by a neck (0 = never).
        max_side: larger images are first reduced (area averaging) to this longest side; boxes are
            reported in the input's pixels. The synthetic objects are large, so nothing is lost,
            and the cost stays at milliseconds for any input size.
        max_aspect: box elongation up to which the score is the plain template IoU (see :meth:`classify`).
    """

    def __init__(
        self,
        palette: Mapping[str, Sequence[int]] | None = None,
        shapes: Sequence[str] = SHAPES,
        *,
        min_area_frac: float = 0.01,
        min_score: float = 0.5,
        max_objects: int = 16,
        max_residual: float = 64.0,
        min_alpha: float = 0.5,
        max_split_erosion: int = 3,
        max_side: int = 256,
        max_aspect: float = 1.5,
    ) -> None:
        palette = dict(PALETTE if palette is None else palette)
        self.color_names = list(palette)
        self.colors = np.array([palette[c] for c in self.color_names], dtype=np.float32)
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; expected a subset of {SHAPES}")
        self.shapes = tuple(shapes)
        self.min_area_frac = float(min_area_frac)
        self.min_score = float(min_score)
        self.max_objects = int(max_objects)
        self.max_residual = float(max_residual)
        self.min_alpha = float(min_alpha)
        self.max_split_erosion = int(max_split_erosion)
        self.max_side = int(max_side)
        self.max_aspect = float(max_aspect)

    def config(self) -> dict[str, Any]:
        """JSON-able settings (recorded in results.json so a score says which detector made it)."""
        return {"palette": {c: [int(v) for v in rgb] for c, rgb in zip(self.color_names, self.colors)},
                "shapes": list(self.shapes), "min_area_frac": self.min_area_frac,
                "min_score": self.min_score, "max_objects": self.max_objects, "max_residual": self.max_residual,
                "min_alpha": self.min_alpha,
                "max_split_erosion": self.max_split_erosion, "max_side": self.max_side,
                "max_aspect": self.max_aspect}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Detector":
        """The detector a :meth:`config` dict describes (e.g. read back from ``results.json``)."""
        cfg = dict(config)
        palette = {k: tuple(v) for k, v in cfg.pop("palette", PALETTE).items()}
        shapes = tuple(cfg.pop("shapes", SHAPES))
        return cls(palette, shapes, **cfg)

    def __call__(self, image: Image.Image | np.ndarray) -> list[dict[str, Any]]:
        return self.detect(image)

    def classify(self, region: np.ndarray) -> tuple[str, float]:
        """``(shape, score)`` of a component mask cropped to its box.

        The score is the best template IoU, scaled down for boxes more elongated than
        ``max_aspect``: the renderer draws every shape in a square box, and a blurred triangle
        (apex lost) or a slightly squashed circle stays well within 1.5:1, whereas a 2:1 blob is
        two objects run together or no shape at all.
        """
        scores = shape_scores(region, self.shapes)
        shape = max(scores, key=scores.get)
        h, w = region.shape
        aspect = max(h, w) / max(1, min(h, w))
        return shape, scores[shape] * min(1.0, self.max_aspect / aspect)

    def _interpret(
        self, mask: np.ndarray, sl: tuple[slice, slice], min_area: int
    ) -> list[tuple[np.ndarray, list[int], str, float]]:
        """The component as one object, or as several when it is same-coloured objects joined by a
        thin bridge (blur fills the renderer's 2-px gaps at small sizes).

        Up to ``max_split_erosion`` erosions (stopping at the first that splits it) cut necks up
        to about twice as many pixels thick; each pixel then goes to the nearest surviving core.
        The split is kept only when its parts match the shape templates better, on average, than
        the whole blob does (the interpretation that explains the pixels best). Blobs that already
        match a template with IoU >= ``_WELL_EXPLAINED`` are never split.
        """
        y0, x0 = sl[0].start, sl[1].start
        whole = ndimage.binary_fill_holes(mask)

        def crop(m: np.ndarray) -> tuple[np.ndarray, list[int], str, float]:
            """(region cropped to its box, box in image pixels, shape, score)"""
            ys, xs = np.nonzero(m)
            box = [x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1]
            region = ndimage.binary_fill_holes(m[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
            return (region, box, *self.classify(region))

        single = [crop(whole)]
        score = single[0][3]
        if score >= _WELL_EXPLAINED:
            return single
        eroded, n = whole, 1
        for _ in range(self.max_split_erosion):
            eroded = ndimage.binary_erosion(eroded, _FOUR_CONNECTED)
            cores, n = ndimage.label(eroded, structure=_FOUR_CONNECTED)
            if n != 1:
                break
        if n < 2:
            return single
        core_sizes = np.bincount(cores.ravel(), minlength=n + 1)
        if (core_sizes[1:] < 2).any():
            return single
        _, (iy, ix) = ndimage.distance_transform_edt(cores == 0, return_indices=True)
        owner = np.where(whole, cores[iy, ix], 0)
        parts = [crop(owner == j) for j in range(1, n + 1)]
        if any(p[0].sum() < min_area for p in parts):
            return single
        if np.mean([p[3] for p in parts]) > score:
            return parts
        return single

    def detect(self, image: Image.Image | np.ndarray) -> list[dict[str, Any]]:
        """Objects in an RGB image (PIL, or a uint8 ``H × W × 3`` array), most confident first."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        full_w, full_h = image.size
        scale = 1.0
        if max(full_w, full_h) > self.max_side:
            scale = max(full_w, full_h) / self.max_side
            image = image.convert("RGB").resize((max(1, round(full_w / scale)), max(1, round(full_h / scale))),
                                                Image.Resampling.BOX)
        pixels = _as_array(image)
        h, w, _ = pixels.shape
        background = estimate_background(pixels)
        labels = segment_colors(pixels, background, self.colors, min_alpha=self.min_alpha,
                                max_residual=self.max_residual)
        min_area = max(2, int(round(self.min_area_frac * h * w)))
        found: list[dict[str, Any]] = []
        for k in np.unique(labels):
            if k < 0:
                continue
            mask = labels == k
            # speckle / 1-px line removal: a pixel needs >= 2 same-colour 8-neighbours
            mask &= ndimage.convolve(mask.astype(np.int32), _EIGHT_NEIGHBOURS, mode="constant") >= 2
            comp, n = ndimage.label(mask, structure=_FOUR_CONNECTED)
            if n == 0:
                continue
            sizes = np.bincount(comp.ravel(), minlength=n + 1)
            for idx, sl in enumerate(ndimage.find_objects(comp), start=1):
                if sl is None or sizes[idx] < min_area:
                    continue
                for region, box, shape, score in self._interpret(comp[sl] == idx, sl, min_area):
                    if score < self.min_score:
                        continue
                    found.append({
                        "class": shape,
                        "color": self.color_names[int(k)],
                        "bbox": box,
                        "area": int(region.sum()),
                        "score": round(score, 4),
                    })
        if scale != 1.0:
            for det in found:
                x0, y0, x1, y1 = det["bbox"]
                det["bbox"] = [int(np.floor(x0 * scale)), int(np.floor(y0 * scale)),
                               min(full_w, int(np.ceil(x1 * scale))), min(full_h, int(np.ceil(y1 * scale)))]
                det["area"] = int(round(det["area"] * scale * scale))
        found.sort(key=lambda d: -d["score"])
        per_class: dict[str, int] = {}
        kept = []
        for det in found:
            per_class[det["class"]] = per_class.get(det["class"], 0) + 1
            if per_class[det["class"]] <= self.max_objects:
                kept.append(det)
        return kept


_DEFAULT: Detector | None = None


def detect(image: Image.Image | np.ndarray, detector: Detector | None = None) -> list[dict[str, Any]]:
    """Detect with ``detector`` or a shared default :class:`Detector`."""
    global _DEFAULT
    if detector is None:
        if _DEFAULT is None:
            _DEFAULT = Detector()
        detector = _DEFAULT
    return detector.detect(image)
