"""Numbers besides GenEval-lite: detector validation, sampler fidelity and the validation loss.

* :func:`validate_detector` — the detector on the ground-truth renders of a synthetic split, scored
  with the same GenEval rules as generated images (peers notes §D.4.2: it must score ~100% there,
  so that a low score measures the model, not the detector), plus object-level recall/precision
  and the smallest object it finds per task.
* :func:`undersized_credits` — correct generated images whose prompt objects are all smaller than
  any ground-truth object of the task at that size (a fragment the detector reads as a shape).
* :func:`image_fidelity` — PSNR/SSIM of images against a reference sampler's images from the same
  noise (§D.4.7 acceleration parity), with torchmetrics on [0, 1] tensors.
* :func:`validation_loss` — the fixed-timestep velocity MSE on a manifest (§D.4.6): stratified
  timesteps, fixed noise, the pipeline's own autoencoder, text encoder and system template, so
  the number only moves when the weights do.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from lumina_lightning.data.synth import render_scene, scene_from_meta
from lumina_lightning.eval.detector import Detector
from lumina_lightning.eval.geneval import evaluate_detections, tag_order

__all__ = [
    "CAPTION_LEVELS",
    "VALIDATION_TARGET",
    "box_iou",
    "check_fidelity_size",
    "image_fidelity",
    "match_objects",
    "preferred_caption",
    "prompt_blind_baseline",
    "undersized_credits",
    "validate_detector",
    "validation_loss",
]

# The detector must reach this GenEval accuracy on ground-truth renders in every tag (issue #8).
VALIDATION_TARGET = 0.98
# Caption level used for the validation loss: the GenEval-style prompt (what eval samples from),
# else the dense and short captions.
CAPTION_LEVELS = ("prompt", "long", "short", "medium", "caption")


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x0, y0, x1, y1]`` boxes with exclusive ``x1``/``y1``."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def match_objects(
    detections: Sequence[dict[str, Any]], truth: Sequence[dict[str, Any]], iou: float = 0.5
) -> tuple[int, int, int]:
    """Greedy one-to-one matching of detections to ground-truth objects (same class and colour,
    box IoU ≥ ``iou``): ``(matched, n_detections, n_truth)``."""
    used: set[int] = set()
    matched = 0
    for obj in truth:
        best, best_iou = None, iou
        for k, det in enumerate(detections):
            if k in used or det["class"] != obj["class"] or det["color"] != obj["color"]:
                continue
            v = box_iou(det["bbox"], obj["bbox"])
            if v >= best_iou:
                best, best_iou = k, v
        if best is not None:
            used.add(best)
            matched += 1
    return matched, len(detections), len(truth)


def _load_gt(row: dict[str, Any], base: Path) -> Image.Image:
    """A record's image file, or the scene re-rendered from its metadata when the file is gone."""
    path = Path(row["image"])
    path = path if path.is_absolute() else base / path
    if path.is_file():
        with Image.open(path) as im:
            return im.convert("RGB")
    return render_scene(scene_from_meta(row["meta"], int(row["width"]), int(row["height"])))


def _read_manifest(manifest: str | os.PathLike | Iterable[dict[str, Any]], root: str | os.PathLike | None
                   ) -> tuple[list[dict[str, Any]], Path]:
    if isinstance(manifest, (str, os.PathLike)):
        path = Path(manifest)
        base = Path(root) if root is not None else path.resolve().parent
        from lumina_lightning.data.records import iter_jsonl

        rows = [row for _, row in iter_jsonl(path)]  # a bad line is named by file and line
    else:
        base = Path(root) if root is not None else Path.cwd()
        rows = list(manifest)
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("meta"), dict) and r["meta"].get("tag")], base


def validate_detector(
    manifest: str | os.PathLike | Iterable[dict[str, Any]],
    *,
    detector: Detector | None = None,
    max_records: int | None = None,
    transform: Callable[[Image.Image], Image.Image] | None = None,
    root: str | os.PathLike | None = None,
    failures: int = 10,
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """GenEval-lite accuracy of the detector on ground-truth renders of a synthetic manifest.

    Args:
        manifest: a ``test.jsonl`` written by ``synth.generate_synthetic`` (rows with ``image``,
            ``width``, ``height`` and GenEval ``meta`` incl. ``objects``), or its rows.
        transform: optional degradation applied to each image first (robustness checks).
        root: folder relative image paths are resolved against (default: the manifest's folder).
        failures: how many failing images to list (with reasons) in the result.
        size: ``(width, height)`` to bring every render to first, with the training transform (cover
            + centre crop): the size generated images are judged at. A 64 px render reduced to 32 or
            16 px loses what tells a small circle from a square, so the detector's ceiling there is
            below its score at the native size. ``None``: the renders as they are.

    Returns ``{"overall", "tags": {tag: accuracy}, "counts": {tag: [correct, total]}, "images",
    "size" ([w, h], or None for native), "resized" (how many renders ``size`` changed), "min_tag",
    "passed" (every tag ≥ 0.98), "object_recall", "object_precision", "failures", "ms_per_image"}``.
    Recall and precision match boxes in the render's own coordinates, so they are None once a render
    was resized. ``min_object_area`` is, per task, the smallest object (pixels) the detector found
    in the renders it judged correct: the smallest a real object of that task is at this size.
    """
    import time

    rows, base = _read_manifest(manifest, root)
    if max_records is not None:
        rows = rows[:max_records]
    if not rows:
        raise ValueError("no records with GenEval metadata ('meta' with a 'tag') to validate the detector on")
    detector = detector or Detector()
    if size is not None:
        from lumina_lightning.data.images import resize_cover_center_crop

        size = (int(size[0]), int(size[1]))
    per_tag: dict[str, list[bool]] = {}
    smallest: dict[str, int] = {}
    matched = n_det = n_truth = 0
    resized = 0
    listed: list[dict[str, Any]] = []
    seconds = 0.0
    for row in rows:
        image = _load_gt(row, base)
        if size is not None and image.size != size:
            image = resize_cover_center_crop(image, size)
            resized += 1
        if transform is not None:
            image = transform(image)
        start = time.perf_counter()
        dets = detector.detect(image)
        seconds += time.perf_counter() - start
        ok, reason = evaluate_detections(dets, row["meta"])
        per_tag.setdefault(row["meta"]["tag"], []).append(ok)
        if ok and dets:
            tag = row["meta"]["tag"]
            smallest[tag] = min(smallest.get(tag, 1 << 30), min(int(d["area"]) for d in dets))
        if "objects" in row["meta"] and not resized:
            m, d, t = match_objects(dets, row["meta"]["objects"])
            matched, n_det, n_truth = matched + m, n_det + d, n_truth + t
        if not ok and len(listed) < failures:
            listed.append({"image": str(row["image"]), "tag": row["meta"]["tag"], "prompt": row["meta"].get("prompt"),
                           "reason": reason, "detections": dets})
    order = tag_order(per_tag)
    tags = {t: float(np.mean(per_tag[t])) for t in order}
    return {
        "overall": float(np.mean(list(tags.values()))),
        "tags": tags,
        "counts": {t: [int(sum(per_tag[t])), len(per_tag[t])] for t in order},
        "images": len(rows),
        "size": list(size) if size is not None else None,
        "resized": resized,
        "min_tag": min(tags.values()),
        "passed": min(tags.values()) >= VALIDATION_TARGET,
        "target": VALIDATION_TARGET,
        "object_recall": matched / n_truth if n_truth and not resized else None,
        "object_precision": matched / n_det if n_det and not resized else None,
        "min_object_area": {t: smallest[t] for t in order if t in smallest},
        "failures": listed,
        "ms_per_image": 1000 * seconds / len(rows),
    }


def undersized_credits(rows: Iterable[dict[str, Any]], min_object_area: dict[str, int]) -> dict[str, Any]:
    """How many correct images were credited on objects smaller than any ground-truth object of their task.

    A correct image is *undersized* when, for some object the prompt asks for (class, and colour
    where given), even the largest matching detection is smaller than ``min_object_area[tag]`` — the
    smallest such object in the ground-truth renders at the same size (``validate_detector(...,
    size=...)["min_object_area"]``). A scattered sample is often credited on a patch of the right
    colour that happens to look like a small square; this counts those, without changing the score.

    Returns ``{"tags": {tag: {"undersized", "correct", "total"}}, "undersized", "correct",
    "share"`` (undersized / correct), ``"accuracy_without"`` (per-tag accuracy counting undersized
    images as failures, and its mean ``"overall_without"``)}; tasks without a reference area are
    left out.
    """
    per_tag: dict[str, dict[str, int]] = {}
    for row in rows:
        tag = row["tag"]
        if tag not in min_object_area:
            continue
        t = per_tag.setdefault(tag, {"undersized": 0, "correct": 0, "total": 0})
        t["total"] += 1
        if not row["correct"]:
            continue
        t["correct"] += 1
        spec = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
        for want in spec.get("include", []):
            areas = [d["area"] for d in row["detections"]
                     if d["class"] == want["class"] and ("color" not in want or d.get("color") == want["color"])]
            if areas and max(areas) < min_object_area[tag]:
                t["undersized"] += 1
                break
    order = tag_order(per_tag)
    undersized = sum(t["undersized"] for t in per_tag.values())
    correct = sum(t["correct"] for t in per_tag.values())
    without = {tag: (per_tag[tag]["correct"] - per_tag[tag]["undersized"]) / per_tag[tag]["total"] for tag in order}
    return {
        "tags": {tag: per_tag[tag] for tag in order},
        "undersized": undersized,
        "correct": correct,
        "share": undersized / correct if correct else None,
        "accuracy_without": without,
        "overall_without": float(np.mean(list(without.values()))) if without else None,
    }


def prompt_blind_baseline(
    specs: Sequence[dict[str, Any]],
    manifest: str | os.PathLike | Iterable[dict[str, Any]],
    *,
    weights: Sequence[float] | None = None,
    size: tuple[int, int] | None = None,
    detector: Detector | None = None,
    root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The mini-GenEval a model would get by ignoring the prompt: the chance level of each task.

    Why: "single object 0.70" means little until one knows what a model that draws *some* correct
    scene of the task scores — any circle passes a third of the single-object prompts. Such a model
    is emulated exactly with the ground-truth renders of the held-out split: prompt ``i`` of a task is
    scored against *every* ground-truth image of that task (one detection per image), so the result
    is the expected accuracy of drawing a uniformly random scene of the task, with no sampling noise.

    Args:
        specs: the GenEval metadata of the evaluated prompts (as :func:`~.geneval.read_metadata`).
        manifest: the synthetic ``test.jsonl`` (or its rows) whose renders stand for the task's scenes.
        weights: images per prompt in the evaluation (tags are averaged over images, as the score is);
            default 1 each.
        size: ``(width, height)`` the renders are brought to first (the evaluated size, so the
            detector sees what it sees on the model's images); default: as stored.
        root: folder relative image paths are resolved against (default: the manifest's folder).

    Returns ``{"overall", "tags": {tag: accuracy}, "images": {tag: renders used}, "missing_tags"}``;
    a tag of ``specs`` without renders in the manifest is listed in ``missing_tags`` and left out.
    """
    from lumina_lightning.data.images import resize_cover_center_crop

    specs = list(specs)
    weights = [1.0] * len(specs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(specs):
        raise ValueError(f"need one weight per prompt, got {len(weights)} for {len(specs)}")
    rows, base = _read_manifest(manifest, root)
    detector = detector or Detector()
    wanted = {spec.get("tag") for spec in specs}
    detections: dict[str, list[list[dict[str, Any]]]] = {}
    for row in rows:
        tag = row["meta"]["tag"]
        if tag not in wanted:
            continue
        image = _load_gt(row, base)
        if size is not None and image.size != tuple(size):
            image = resize_cover_center_crop(image, tuple(size))
        detections.setdefault(tag, []).append(detector.detect(image))
    sums: dict[str, list[float]] = {}
    for spec, w in zip(specs, weights):
        tag = spec.get("tag")
        dets = detections.get(tag)
        if not dets or w <= 0:
            continue
        acc = float(np.mean([evaluate_detections(d, spec)[0] for d in dets]))
        cell = sums.setdefault(tag, [0.0, 0.0])
        cell[0] += w * acc
        cell[1] += w
    order = tag_order(sums)
    tags = {t: sums[t][0] / sums[t][1] for t in order}
    return {
        "overall": float(np.mean(list(tags.values()))) if tags else None,
        "tags": tags,
        "images": {t: len(detections[t]) for t in order},
        "missing_tags": sorted(t for t in wanted if t not in detections and t is not None),
    }


def _to_unit(images: Sequence[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# SSIM's standard window (Wang et al., 2004): 11 × 11 px Gaussian, sigma 1.5
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_MIN_SIDE = 3  # the smallest window with a centre and a neighbour on each side


def _ssim_window(side: int) -> int:
    """The SSIM window for images whose shorter side is ``side``: 11 px, else the largest odd size
    that fits (torchmetrics pads by reflection, which needs the half-window below the side)."""
    return min(SSIM_WINDOW, side if side % 2 else side - 1)


def check_fidelity_size(width: int, height: int) -> None:
    """Refuse images too small for :func:`image_fidelity`'s SSIM (before any image is generated)."""
    if min(width, height) < SSIM_MIN_SIDE:
        raise ValueError(f"SSIM needs images of at least {SSIM_MIN_SIDE} × {SSIM_MIN_SIDE} px, got "
                         f"{width} × {height}: compare samplers at a larger size")


def image_fidelity(images: Sequence[Image.Image], reference: Sequence[Image.Image]) -> dict[str, Any]:
    """Mean PSNR (dB, data range 1) and SSIM of ``images`` against ``reference``, pair by pair.

    Identical pairs have infinite PSNR; they are capped at 100 dB so the mean stays finite (JSON
    and MLflow cannot store infinity). SSIM uses the standard 11-px Gaussian window (sigma 1.5),
    shrunk for images under 11 px to the largest odd size ``k`` that fits, with sigma scaled to
    ``1.5 k / 11`` so that the window keeps its shape. (torchmetrics sizes a Gaussian window from
    sigma alone, as ``2 int(3.5 sigma + 0.5) + 1``, and ignores ``kernel_size``: with sigma 1.5
    every image got the 11-px window, too large for images under 6 px.) Images under 3 px are refused.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if len(images) != len(reference) or not images:
        raise ValueError(f"need equally many images and references, got {len(images)} and {len(reference)}")
    a, b = _to_unit(images), _to_unit(reference)
    if a.shape != b.shape:
        raise ValueError(f"image size {tuple(a.shape[2:])} differs from the reference's {tuple(b.shape[2:])}")
    check_fidelity_size(a.shape[3], a.shape[2])
    psnr = []
    for x, y in zip(a, b):
        if torch.equal(x, y):
            psnr.append(100.0)
        else:
            psnr.append(min(100.0, float(peak_signal_noise_ratio(x[None], y[None], data_range=1.0))))
    window = _ssim_window(min(a.shape[2:]))
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, sigma=SSIM_SIGMA * window / SSIM_WINDOW,
                                               kernel_size=window, reduction="none")
    ssim = ssim.reshape(-1).tolist()
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "psnr_per_image": psnr,
            "ssim_per_image": [float(s) for s in ssim], "images": len(psnr)}


def preferred_level(captions: dict[str, str]) -> str:
    """The caption level a record is judged by: the first of ``CAPTION_LEVELS`` it has, else its first."""
    for level in CAPTION_LEVELS:
        if captions.get(level):
            return level
    if captions:
        return next(iter(captions))
    raise ValueError("a validation record has no caption")


def preferred_caption(captions: dict[str, str]) -> str:
    """A record's caption at :func:`preferred_level`."""
    return captions[preferred_level(captions)]


@torch.no_grad()
def validation_loss(
    pipe: Any,
    manifest: str | os.PathLike,
    *,
    width: int,
    height: int,
    max_records: int = 64,
    n_timesteps: int = 8,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Mean velocity MSE of ``pipe.model`` on the first ``max_records`` records of a manifest.

    Images are resized to ``width × height`` (cover + centre crop, the training transform) and
    encoded with the pipeline's autoencoder; captions (the ``prompt`` level if present, else long,
    short, ...) get the pipeline's default system template and its text encoder. At each of
    ``n_timesteps`` stratified times ``(i + 0.5)/n`` the noise is drawn from a generator seeded by
    ``(seed, timestep, batch)``, so two checkpoints are compared on exactly the same inputs.
    Returns ``{"mean", "per_t", "timesteps", "records", "caption_level"}``.
    """
    from lumina_lightning.data.images import load_image, resize_cover_center_crop, to_tensor
    from lumina_lightning.data.records import read_manifest
    from lumina_lightning.encoders.text import build_prompt
    from lumina_lightning.flow import (
        interpolate,
        per_sample_mse,
        stratified_timesteps,
        velocity_from_output,
        velocity_target,
    )

    records = read_manifest(manifest)[:max_records]
    if not records:
        raise ValueError(f"{manifest}: no records for the validation loss")
    device = getattr(pipe, "device", torch.device("cpu"))
    model = pipe.model
    # the pipeline's own precision (bf16 autocast on CUDA, which its bf16-held weights need)
    precision = getattr(pipe, "precision", contextlib.nullcontext)
    batches = []
    levels: dict[str, int] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        pixels = torch.stack([to_tensor(resize_cover_center_crop(load_image(r.image), (width, height))) for r in chunk])
        latents = pipe.autoencoder.encode(pixels.to(device)).float()
        texts = []
        for r in chunk:
            level = preferred_level(r.captions)
            levels[level] = levels.get(level, 0) + 1
            texts.append(build_prompt(r.captions[level], pipe.default_system))
        feats, mask = pipe.text_encoder.encode(texts)
        batches.append((latents, feats.to(device), mask.to(device)))
    ts = stratified_timesteps(n_timesteps)
    per_t = []
    was_training = model.training
    model.eval()
    try:
        for k, t in enumerate(ts.tolist()):
            total, count = 0.0, 0
            for b, (latents, feats, mask) in enumerate(batches):
                g = torch.Generator().manual_seed(int(seed) * 1_000_003 + k * 1009 + b)
                x0 = torch.randn(latents.shape, generator=g).to(latents)
                tt = torch.full((latents.shape[0],), t, device=latents.device)
                xt = interpolate(x0, latents, tt)
                with precision():
                    out = model(xt, tt, feats, mask)
                pred = velocity_from_output(out.float(), xt, tt, getattr(pipe, "prediction", "velocity"))
                total += float(per_sample_mse(pred, velocity_target(x0, latents)).sum())
                count += latents.shape[0]
            per_t.append(total / count)
    finally:
        model.train(was_training)
    return {"mean": float(np.mean(per_t)), "per_t": per_t, "timesteps": ts.tolist(), "records": len(records),
            "caption_level": max(levels, key=levels.get) if levels else None}
