"""``evaluate``: generate images for a GenEval-format prompt set, score them, write the results.

Layout of ``out_dir`` (GenEval's own image layout under ``images/``, so GenEval's scripts and
:func:`score_folder` read it back):

* ``images/<idx:05d>/metadata.jsonl`` — the prompt's GenEval spec (one JSON line);
* ``images/<idx:05d>/samples/<k:04d>.png`` — its images, with prompt, seed and sampler settings in
  the PNG text chunks (the ``lumina_settings`` record that ``lumina sample`` writes too);
* ``results.jsonl`` — one line per image in GenEval's output format (``filename``, ``tag``,
  ``prompt``, ``correct``, ``reason``, ``metadata``, ``details``) plus the raw detections;
* ``results.json`` — summary: per-tag accuracy, overall, counts, settings, timings, detector
  validation, validation loss, sampler PSNR/SSIM;
* ``report.md`` / ``report.html`` with ``plots/`` and ``grids/`` (see :mod:`.report`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from lumina_lightning.encoders.autoencoder import PixelAutoencoder
from lumina_lightning.eval.detector import Detector
from lumina_lightning.eval.geneval import (
    check_spec,
    confidence_intervals,
    evaluate_detections,
    group_detections,
    read_metadata,
    summarize,
)

__all__ = [
    "evaluate", "score_images", "score_folder", "read_results", "detector_for", "default_size", "check_manifest",
    "RESULTS_VERSION",
]

RESULTS_VERSION = 1
SETTINGS_KEY = "lumina_settings"  # same PNG text key as `lumina sample` (sampling/cli.py)


def detector_for(prompts_path: str | os.PathLike | None) -> Detector:
    """The detector with the vocabulary of the synthetic dataset the prompts come from.

    ``synth_config.json`` beside the prompt file names the shapes and palette the dataset was
    rendered with; like GenEval's detector, which knows the benchmark's classes, ours then only
    chooses among those shapes. Without a config it knows every shape the renderer can draw.
    """
    if prompts_path is not None:
        cfg_path = Path(prompts_path).parent / "synth_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            palette = cfg.get("palette") or None
            shapes = cfg.get("shapes")
            kwargs: dict[str, Any] = {}
            if shapes:
                kwargs["shapes"] = tuple(shapes)
            return Detector(palette={k: tuple(v) for k, v in palette.items()} if palette else None, **kwargs)
    return Detector()


def check_manifest(manifest: str | os.PathLike, *, ground_truth: bool = True) -> None:
    """Refuse a synthetic manifest (``test.jsonl``) the evaluation cannot use, naming ``file:line``.

    Why up front: the detector validation and the chance level read it only after every image was
    generated, and ``json.loads`` of one line reports "line 1" whichever line it is. Every line must be
    a JSON object; with ``ground_truth`` (the detector validation runs) at least one record needs
    GenEval metadata (``meta`` with a ``tag``, as ``synth`` writes), each such ``meta`` must be a spec
    the scorer reads right (:func:`~.geneval.check_spec`), and its image must exist or be re-renderable
    from the record (``width``, ``height``). Rows without a ``meta.tag`` are skipped, as the validation does.
    """
    from lumina_lightning.data.records import ManifestError, iter_jsonl

    path = Path(manifest)
    base = path.resolve().parent  # where validate_detector resolves relative image paths
    tagged = 0
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise ManifestError(f"{where}: not a JSON object (a manifest has one record object per line)")
        meta = row.get("meta")
        if not ground_truth or not (isinstance(meta, dict) and meta.get("tag")):
            continue
        check_spec(meta, f"{where}: meta")
        _check_ground_truth_image(row, base, where)
        tagged += 1
    if ground_truth and not tagged:
        raise ManifestError(f"{path}: no records with GenEval metadata ('meta' with a 'tag') to validate the "
                            "detector on; give the synthetic test.jsonl that `lumina data synth` writes")


def _check_ground_truth_image(row: dict[str, Any], base: Path, where: str) -> None:
    """The render of a manifest record exists, or can be drawn again from its metadata (metrics._load_gt)."""
    from lumina_lightning.data.records import ManifestError

    image = row.get("image")
    if not isinstance(image, str) or not image:
        raise ManifestError(f"{where}: 'image' must be the render's path, got {image!r}")
    file = Path(image) if Path(image).is_absolute() else base / image
    if file.is_file():
        return
    size_ok = all(isinstance(row.get(k), int) and not isinstance(row.get(k), bool) and row[k] > 0
                  for k in ("width", "height"))
    if not size_ok or not isinstance(row["meta"].get("objects"), list) or "background" not in row["meta"]:
        raise ManifestError(f"{where}: image {file} does not exist, and without 'width' and 'height' (and meta "
                            "'objects' and 'background') it cannot be drawn again")


def default_size(prompts_path: str | os.PathLike | None, manifest: str | os.PathLike | None) -> tuple[int, int]:
    """Evaluation size when none is given: the manifest's first image size, else the synthetic
    dataset's ``size`` (``synth_config.json`` beside the prompts), else 64 × 64."""
    if manifest is not None and Path(manifest).is_file():
        with open(manifest, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    if row.get("width") and row.get("height"):
                        return int(row["width"]), int(row["height"])
                    break
    if prompts_path is not None:
        cfg_path = Path(prompts_path).parent / "synth_config.json"
        if cfg_path.is_file():
            size = int(json.loads(cfg_path.read_text(encoding="utf-8")).get("size", 64))
            return size, size
    return 64, 64


def _details(dets: Sequence[dict[str, Any]]) -> str:
    """GenEval's ``details`` column: ``{class: [[x0, y0, x1, y1, score], ...]}`` as JSON."""
    return json.dumps({k: [[*d["bbox"], d["score"]] for d in v] for k, v in group_detections(dets).items()})


def score_images(
    images: Sequence[Image.Image],
    specs: Sequence[dict[str, Any]],
    detector: Detector | None = None,
    *,
    filenames: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Per-image GenEval-lite results (GenEval's ``results.jsonl`` rows + ``detections``)."""
    detector = detector or Detector()
    rows = []
    for k, (image, spec) in enumerate(zip(images, specs)):
        dets = detector.detect(image)
        ok, reason = evaluate_detections(dets, spec)
        rows.append({
            "filename": filenames[k] if filenames else str(k),
            "tag": spec["tag"],
            "prompt": spec["prompt"],
            "correct": bool(ok),
            "reason": reason,
            "metadata": json.dumps(spec),
            "details": _details(dets),
            "detections": dets,
        })
    return rows


def score_folder(image_dir: str | os.PathLike, detector: Detector | None = None) -> list[dict[str, Any]]:
    """Score a folder in GenEval's layout (``<idx>/metadata.jsonl`` + ``<idx>/samples/NNNN.png``),
    like GenEval's ``evaluate_images.py`` does; filenames are relative to ``image_dir``."""
    import re

    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}")
    rows = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_path = sub / "metadata.jsonl"
        if not meta_path.is_file():
            continue
        try:
            spec = json.loads(meta_path.read_text(encoding="utf-8").strip().splitlines()[0])
        except (json.JSONDecodeError, IndexError):
            raise ValueError(f"{meta_path}:1: not a GenEval metadata line (one JSON object)") from None
        check_spec(spec, f"{meta_path}:1")
        files = sorted(p for p in (sub / "samples").glob("*.png") if re.fullmatch(r"\d+\.png", p.name))
        images, seeds = [], []
        for p in files:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
                seed = getattr(im, "text", {}).get("seed", "")  # written by `lumina eval`; None from elsewhere
                seeds.append(int(seed) if seed.lstrip("-").isdigit() else None)
        scored = score_images(images, [spec] * len(images), detector,
                              filenames=[str(p.relative_to(root)) for p in files])
        # the same identity as rows of a generating run, so runs re-scored from folders pair with them
        # (paired_difference matches images by tag, prompt, sample index and seed)
        for row, p, seed in zip(scored, files, seeds):
            row.update(prompt_index=int(sub.name), sample=int(p.stem), seed=seed)
        rows += scored
    if not rows:
        raise ValueError(f"{root}: no images in GenEval layout (<idx>/metadata.jsonl + <idx>/samples/NNNN.png)")
    return rows


# what a run writes into its output folder besides images/ (see the module docstring)
_OUTPUT_FILES = ("results.json", "results.jsonl", "report.md", "report.html")
_OUTPUT_FOLDERS = ("grids", "plots")


def clear_outputs(out: Path, *, images: bool = True) -> None:
    """Remove an earlier run's results, reports, plots, grids and (``images``) prompt folders from ``out``.

    Why: a folder must never mix runs. Old prompt folders would be re-scored with the new ones, and
    an old ``results.json`` or report left beside new images (after a run that failed half-way)
    describes images that are no longer there. Only what a run writes is removed.
    """
    import shutil

    for name in _OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in _OUTPUT_FOLDERS:
        # only the PNGs a report writes there (--out may be a project folder with plots/ of its own)
        folder = out / name
        if folder.is_dir():
            for old in folder.glob("*.png"):
                old.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
    if images and (out / "images").is_dir():
        for old in (out / "images").iterdir():
            if old.is_dir() and old.name.isdigit():
                shutil.rmtree(old)


def _save_png(image: Image.Image, path: Path, record: dict[str, Any]) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", str(record.get("prompt", "")))
    info.add_text("seed", str(record.get("seed")))
    info.add_text(SETTINGS_KEY, json.dumps(record, sort_keys=True))
    image.save(path, pnginfo=info)


def _generate(
    pipe: Any,
    specs: Sequence[dict[str, Any]],
    *,
    preset: str | None,
    overrides: dict[str, Any],
    images_per_prompt: int,
    seed: int,
    width: int,
    height: int,
    batch_size: int,
    progress: bool,
    desc: str,
    on_batch: Callable[[list[tuple[int, int, int]], Any], None],
    counts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Images for every (prompt, sample) in batches, handed to ``on_batch(jobs, result)`` and not
    kept (memory stays bounded at any prompt count and size); see :func:`image_jobs` for the seeds
    (noise depends only on the seed, not on the batching)."""
    jobs = image_jobs(counts or [images_per_prompt] * len(specs), images_per_prompt, seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=desc, unit="img")
    nfe = rows = 0
    elapsed = 0.0
    settings: dict[str, Any] = {}
    try:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            result = pipe([specs[i]["prompt"] for i, _, _ in chunk], width=width, height=height,
                          num_images_per_prompt=1, seed=[s for _, _, s in chunk], preset=preset, **overrides)
            nfe = max(nfe, int(result.nfe))
            rows += int(result.rows)
            elapsed += float(result.elapsed)
            settings = result.settings
            on_batch(chunk, result)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return {"jobs": jobs, "nfe_per_batch": nfe, "rows": rows, "seconds": elapsed, "settings": settings}


def image_jobs(counts: Sequence[int], images_per_prompt: int, seed: int) -> list[tuple[int, int, int]]:
    """``(prompt i, sample k, seed)`` for ``counts[i]`` images of each prompt.

    Image ``k < images_per_prompt`` of prompt ``i`` gets seed ``seed + i * images_per_prompt + k`` (so
    these images do not depend on ``min_images_per_task``); the extra images of small tasks take the
    seeds after the last of those, in order.
    """
    jobs = []
    extra = seed + len(counts) * images_per_prompt
    for i, n in enumerate(counts):
        for k in range(n):
            if k < images_per_prompt:
                jobs.append((i, k, seed + i * images_per_prompt + k))
            else:
                jobs.append((i, k, extra))
                extra += 1
    return jobs


def images_per_spec(specs: Sequence[dict[str, Any]], images_per_prompt: int, min_images_per_task: int) -> list[int]:
    """Images to draw for each prompt: ``images_per_prompt``, raised for the prompts of a task with
    so few prompts that it would get fewer than ``min_images_per_task`` images (e.g. 3 held-out
    single-object prompts x 4 images: one image is 0.083 of the task's score)."""
    per_task: dict[Any, int] = {}
    for spec in specs:
        per_task[spec.get("tag")] = per_task.get(spec.get("tag"), 0) + 1
    return [max(images_per_prompt, -(-int(min_images_per_task) // per_task[spec.get("tag")])) for spec in specs]


def read_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-image results of an earlier ``evaluate`` (its ``results.jsonl``); a line that is not one
    raises :class:`~lumina_lightning.data.records.ManifestError` naming ``file:line``."""
    path = Path(folder) / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pair with the output folder of an earlier `lumina eval`")
    from lumina_lightning.data.records import ManifestError, iter_jsonl

    rows = []
    for lineno, row in iter_jsonl(path):  # a damaged line is named by its own number
        # the keys a paired comparison reads (geneval.paired_difference): refused now, not after generating
        if not isinstance(row, dict) or "tag" not in row or "correct" not in row:
            raise ManifestError(f"{path}:{lineno}: not a `lumina eval` result (no 'tag' and 'correct')")
        rows.append(row)
    return rows


def _load(pipe_or_path: Any, device: str | None, ema: bool | str, load_kwargs: dict[str, Any] | None) -> tuple[Any, str | None]:
    if isinstance(pipe_or_path, (str, os.PathLike)):
        import torch

        from lumina_lightning.sampling.pipeline_io import load_pipeline

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
        pipe = load_pipeline(pipe_or_path, device=dev, dtype=dtype, ema=ema, **(load_kwargs or {}))
        return pipe, str(pipe_or_path)
    return pipe_or_path, None


def evaluate(
    pipe_or_path: Any,
    prompts_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    preset: str | None = "official",
    images_per_prompt: int = 4,
    min_images_per_task: int = 0,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    manifest: str | os.PathLike | None = None,
    compare_to: str | None = None,
    max_prompts: int | None = None,
    max_per_tag: int | None = None,
    batch_size: int = 16,
    sampler_overrides: dict[str, Any] | None = None,
    progress: bool = True,
    detector: Detector | None = None,
    validate: bool | None = None,
    val_records: int = 64,
    device: str | None = None,
    ema: bool | str = "auto",
    load_kwargs: dict[str, Any] | None = None,
    report: bool = True,
    paired_with: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Mini-GenEval of a pipeline (or anything ``load_pipeline`` reads) on a GenEval-format prompt set.

    Args:
        pipe_or_path: a :class:`~lumina_lightning.sampling.pipeline.LuminaPipeline`, or a pipeline
            folder / training ``.ckpt`` / diffusers folder path (loaded with ``device``, ``ema`` and
            ``load_kwargs``, e.g. ``{"text_encoder": ..., "vae": ...}`` for bare checkpoints).
        prompts_path: GenEval ``evaluation_metadata.jsonl``-format file (``test_geneval.jsonl``).
        out_dir: where images, ``results.json(l)`` and the reports go (a previous run's prompt folders,
            results, reports, plots and grids there are removed, after every input is checked).
        preset, sampler_overrides: sampler preset and explicit settings (``steps``, ``cfg_scale``,
            ``solver``, ``shift``, ...; the names of ``SamplerSettings``).
        images_per_prompt, seed: image ``k`` of prompt ``i`` uses seed ``seed + i*images_per_prompt + k``.
        min_images_per_task: draw more images per prompt for tasks with few prompts, so that every
            task is scored on at least this many images (0: off; see :func:`images_per_spec`).
        width, height: image size; default: the resolution the checkpoint was trained at (recorded in
            its ``pipeline.json``), else the manifest's / ``synth_config.json``'s (64 × 64 otherwise).
        manifest: a synthetic ``test.jsonl``: enables the fixed-timestep validation loss (first
            ``val_records`` records), the detector validation on its ground-truth renders (at
            ``width × height``, the size the samples are judged at, with the native-size result
            under ``"native"`` when that differs) and the prompt-blind chance level (``results["prompt_blind"]``, see
            :func:`~lumina_lightning.eval.metrics.prompt_blind_baseline`).
        compare_to: a reference preset (e.g. ``official``): the same prompts and noise are sampled
            with it too; PSNR/SSIM to it and its GenEval-lite score go to ``results["compare"]``.
        max_prompts: evaluate only the first prompts (quick checks).
        max_per_tag: at most this many prompts of each task, in file order — keeps a budgeted run
            balanced when the prompt file has many more prompts of some tasks than of others.
        batch_size: images per pipeline call.
        detector: default :func:`detector_for` the prompt set.
        validate: run the detector validation (default: when ``manifest`` is given).
        report: write ``report.md`` / ``report.html`` (plots and grids).
        checkpoint: where the weights of an in-memory pipeline came from (e.g. its export folder), for
            ``results["checkpoint"]`` and the PNG records; default: the path loaded, else ``None``.
        ema: loading a path: ``True`` EMA weights, ``False`` raw, ``"auto"`` EMA where present. For any
            pipeline, ``settings["ema"]`` records the weights evaluated: the model's ``weights_ema``
            (set by ``load_nextdit``), else this argument when it is ``True``/``False``, else ``None``.
        paired_with: the output folder of an earlier evaluation of the same prompts and seeds (another
            checkpoint, sampler or recipe): ``results["paired"]`` gets this run's score minus that
            one's, paired image by image, with its 95 % interval
            (:func:`~lumina_lightning.eval.geneval.paired_difference`).

    Returns the results dict that is also written to ``out_dir/results.json``.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    other_rows = read_results(paired_with) if paired_with is not None else None  # before any work
    # -1 would silently drop the last prompt (specs[:-1]) and 0 evaluate nothing
    for name, value in (("max_prompts", max_prompts), ("max_per_tag", max_per_tag)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 (or not given: all prompts), got {value}")
    specs = read_metadata(prompts_path)
    if max_per_tag is not None:
        taken: dict[str, int] = {}
        kept = []
        for spec in specs:
            tag = spec.get("tag")
            if taken.get(tag, 0) < max_per_tag:
                taken[tag] = taken.get(tag, 0) + 1
                kept.append(spec)
        specs = kept
    if max_prompts is not None:
        specs = specs[:max_prompts]
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"images_per_prompt and batch_size must be >= 1, got {images_per_prompt}, {batch_size}")
    if min_images_per_task < 0:
        raise ValueError(f"min_images_per_task must be >= 0, got {min_images_per_task}")
    counts = images_per_spec(specs, images_per_prompt, min_images_per_task)
    detector = detector or detector_for(prompts_path)
    overrides = {k: v for k, v in (sampler_overrides or {}).items() if v is not None}

    if manifest is not None and not Path(manifest).is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    if validate and manifest is None:
        raise ValueError("detector validation needs the synthetic manifest (manifest=.../test.jsonl)")
    if manifest is not None:  # read after generation (validation, chance level): its errors come now
        check_manifest(manifest, ground_truth=validate is not False)

    t0 = time.perf_counter()
    pipe, ckpt = _load(pipe_or_path, device, ema, load_kwargs)
    load_s = time.perf_counter() - t0 if ckpt else 0.0
    if checkpoint is not None:
        ckpt = str(checkpoint)
    if width is None or height is None:
        # A model sampled far from its training size draws nothing it learned (the tiny 32 px
        # export scored 0.13 at the dataset's 64 px against 0.32 at 32 px), so its own size wins.
        trained = getattr(pipe, "resolution", None)
        dw, dh = (trained, trained) if trained else default_size(prompts_path, manifest)
        width, height = width or dw, height or dh
    pipe.check_size(width, height)
    settings = pipe.resolve(preset, **overrides)  # validates the settings before any work
    ref_settings = None
    if compare_to:
        from lumina_lightning.eval.metrics import check_fidelity_size

        ref_settings = pipe.resolve(compare_to)
        check_fidelity_size(width, height)  # SSIM of the reference comparison, before any image is drawn
    weights_ema = getattr(getattr(pipe, "model", None), "weights_ema", None)
    if weights_ema is None and isinstance(ema, bool):
        weights_ema = ema
    out.mkdir(parents=True, exist_ok=True)

    # -- generate, save, score ------------------------------------------------------------------
    # every input check is above: from here on the folder holds this run only
    clear_outputs(out)
    img_root = out / "images"
    for i, spec in enumerate(specs):
        sub = img_root / f"{i:05d}"
        (sub / "samples").mkdir(parents=True, exist_ok=True)
        (sub / "metadata.jsonl").write_text(json.dumps(spec) + "\n", encoding="utf-8")
    rows: list[dict[str, Any]] = []
    score_s = 0.0

    def save_and_score(chunk: list[tuple[int, int, int]], result: Any) -> None:
        nonlocal score_s
        base = {k: v for k, v in result.settings.items() if k not in ("prompts", "seeds")}
        files = []
        for (i, k, s), image in zip(chunk, result.images):
            rel = f"images/{i:05d}/samples/{k:04d}.png"
            record = {**base, "prompt": specs[i]["prompt"], "seed": s, "index": i, "sample": k,
                      "checkpoint": ckpt, "nfe": result.nfe}
            _save_png(image, out / rel, record)
            files.append(rel)
        t0 = time.perf_counter()
        scored = score_images(result.images, [specs[i] for i, _, _ in chunk], detector, filenames=files)
        score_s += time.perf_counter() - t0
        for row, (i, k, s) in zip(scored, chunk):
            row.update(prompt_index=i, sample=k, seed=s)
        rows.extend(scored)

    gen = _generate(pipe, specs, preset=preset, overrides=overrides, images_per_prompt=images_per_prompt, seed=seed,
                    width=width, height=height, batch_size=batch_size, progress=progress, desc="eval images",
                    on_batch=save_and_score, counts=counts)
    with open(out / "results.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    summary = summarize(rows)

    results: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "checkpoint": ckpt,
        "prompts_file": str(prompts_path),
        "manifest": str(manifest) if manifest else None,
        "overall": summary["overall"],
        "tags": {t: v["accuracy"] for t, v in summary["tags"].items()},
        "counts": {t: [v["correct"], v["total"]] for t, v in summary["tags"].items()},
        # 95 % intervals from resampling prompts, then drawing their accuracies: differences inside are sampling noise
        "ci95": confidence_intervals(rows, level=0.95, seed=seed),
        "absent_tags": summary["absent_tags"],
        "images": summary["images"],
        "prompts": summary["prompts"],
        "correct_images": summary["correct_images"],
        "correct_prompts": summary["correct_prompts"],
        "settings": {
            **settings.to_dict(), "preset": preset or "official", "width": width, "height": height,
            "images_per_prompt": images_per_prompt, "min_images_per_task": min_images_per_task,
            "seed": seed, "batch_size": batch_size, "ema": None if weights_ema is None else bool(weights_ema),
            "system": gen["settings"].get("system"), "max_prompts": max_prompts, "max_per_tag": max_per_tag,
            "nfe_per_image": gen["nfe_per_batch"],
        },
        "detector": detector.config(),
        "timings": {"load_s": load_s, "generate_s": gen["seconds"], "score_s": score_s,
                    "seconds_per_image": gen["seconds"] / max(1, len(rows)),
                    "detector_ms_per_image": 1000 * score_s / max(1, len(rows))},
        "environment": {"device": str(getattr(pipe, "device", "cpu")), "python": platform.python_version(),
                        "machine": platform.machine()},
        "detector_validation": None,
        "undersized": None,
        "prompt_blind": None,
        "val_loss": None,
        "compare": None,
        "paired": None,
    }
    if other_rows is not None:
        from lumina_lightning.eval.geneval import paired_difference

        results["paired"] = {"with": str(paired_with), **paired_difference(rows, other_rows, seed=seed)}

    # -- detector validation on ground-truth renders ------------------------------------------------
    if validate or (validate is None and manifest is not None):
        from lumina_lightning.eval.metrics import validate_detector

        t0 = time.perf_counter()
        # The detector is validated at the size it judges the generated images at: renders reduced
        # from 64 to 32 or 16 px lose detail, and its score there is the ceiling of the model's.
        dv = validate_detector(manifest, detector=detector, size=(width, height))
        if dv["resized"]:
            native = validate_detector(manifest, detector=detector)
            dv["native"] = {k: native[k] for k in ("overall", "tags", "min_tag", "passed", "images",
                                                   "object_recall", "object_precision")}
        if not isinstance(pipe.autoencoder, PixelAutoencoder):
            # A latent model can only draw what its decoder draws: the renders passed through the
            # autoencoder (encode -> decode) are the ceiling of its score, below the renders' own
            # when the decoder softens corners. (The pixel autoencoder is the identity: nothing to add.)
            recon = validate_detector(manifest, detector=detector, size=(width, height),
                                      transform=autoencoder_roundtrip(pipe.autoencoder))
            dv["autoencoder"] = {k: recon[k] for k in ("overall", "tags", "counts", "min_tag", "passed", "images")}
        results["detector_validation"] = dv
        results["timings"]["detector_validation_s"] = time.perf_counter() - t0
        if dv.get("min_object_area"):
            from lumina_lightning.eval.metrics import undersized_credits

            results["undersized"] = undersized_credits(rows, dv["min_object_area"])

    # -- chance level: a model that ignores the prompt (ground-truth renders of the task) ----------------
    if manifest is not None:
        from lumina_lightning.eval.metrics import prompt_blind_baseline

        t0 = time.perf_counter()
        results["prompt_blind"] = prompt_blind_baseline(specs, manifest, weights=counts, size=(width, height),
                                                        detector=detector)
        results["timings"]["prompt_blind_s"] = time.perf_counter() - t0

    # -- fixed-timestep validation loss ---------------------------------------------------------------
    if manifest is not None and val_records > 0:
        from lumina_lightning.eval.metrics import validation_loss

        t0 = time.perf_counter()
        results["val_loss"] = validation_loss(pipe, manifest, width=width, height=height, max_records=val_records,
                                              seed=seed)
        results["timings"]["val_loss_s"] = time.perf_counter() - t0

    # -- reference sampler: PSNR/SSIM from the same noise -----------------------------------------------
    if compare_to:
        from lumina_lightning.eval.metrics import image_fidelity

        psnr: list[float] = []
        ssim: list[float] = []
        ref_rows: list[dict[str, Any]] = []

        def compare_batch(chunk: list[tuple[int, int, int]], result: Any) -> None:
            ours = []
            for i, k, _ in chunk:  # the evaluated images, as saved (PNG is lossless)
                with Image.open(out / f"images/{i:05d}/samples/{k:04d}.png") as im:
                    ours.append(im.convert("RGB"))
            fid = image_fidelity(ours, result.images)
            psnr.extend(fid["psnr_per_image"])
            ssim.extend(fid["ssim_per_image"])
            ref_rows.extend(score_images(result.images, [specs[i] for i, _, _ in chunk], detector))

        ref = _generate(pipe, specs, preset=compare_to, overrides={}, images_per_prompt=images_per_prompt, seed=seed,
                        width=width, height=height, batch_size=batch_size, progress=progress,
                        desc=f"reference ({compare_to})", on_batch=compare_batch, counts=counts)
        fid = {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "images": len(psnr)}
        ref_summary = summarize(ref_rows)
        results["compare"] = {
            "reference_preset": compare_to,
            "reference_settings": ref_settings.to_dict(),
            "psnr": fid["psnr"],
            "ssim": fid["ssim"],
            "images": fid["images"],
            "reference_overall": ref_summary["overall"],
            "reference_tags": {t: v["accuracy"] for t, v in ref_summary["tags"].items()},
            "overall_delta": (summary["overall"] - ref_summary["overall"])
            if summary["overall"] is not None and ref_summary["overall"] is not None else None,
            "reference_nfe_per_image": ref["nfe_per_batch"],
            "reference_seconds": ref["seconds"],
            "speedup": ref["seconds"] / gen["seconds"] if gen["seconds"] > 0 else None,
        }
        results["timings"]["reference_generate_s"] = ref["seconds"]

    results["timings"]["total_s"] = time.perf_counter() - t_start
    results["files"] = {"results_jsonl": "results.jsonl", "images": "images"}
    if report:
        from lumina_lightning.eval.report import write_report

        results["files"].update(write_report(results, rows, out))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return results


def autoencoder_roundtrip(autoencoder: Any) -> Callable[[Image.Image], Image.Image]:
    """PIL image -> the same image encoded and decoded by ``autoencoder`` (what a latent model can draw)."""
    import torch

    from lumina_lightning.data.images import to_pil, to_rgb, to_tensor

    def roundtrip(image: Image.Image) -> Image.Image:
        device = next((p.device for p in autoencoder.parameters()), torch.device("cpu"))
        with torch.no_grad():
            y = autoencoder.decode(autoencoder.encode(to_tensor(to_rgb(image)).unsqueeze(0).to(device)))
        return to_pil(y[0])

    return roundtrip
