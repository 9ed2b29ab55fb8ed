"""``lumina eval``: mini-GenEval of a checkpoint on the synthetic compositional prompts.

Three modes:

* ``lumina eval --ckpt PATH --prompts DIR/test_geneval.jsonl --out OUT [...]`` — generate, score,
  report (``OUT/results.json``, ``report.md``, ``report.html``, ``images/``), log to MLflow;
* ``lumina eval --validate-detector --manifest DIR/test.jsonl`` (no ``--ckpt``) — only check the
  detector on the ground-truth renders (exit status 1 when a task is below 0.98);
* ``lumina eval --images OUT/images --out OUT2`` — re-score images already in GenEval's layout
  (with ``--manifest DIR/test.jsonl``, or ``--validate-detector`` and the manifest beside ``--prompts``,
  also the detector validation at the images' size and the prompt-blind chance level; the
  validation loss needs the model, so ``--val-records`` is refused there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from lumina_lightning.data.synth import TAGS
from lumina_lightning.eval.geneval import tag_order
from lumina_lightning.models.io import CheckpointMismatchError
from lumina_lightning.sampling.cli import teacache_version_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lumina eval",
        description="Mini-GenEval: generate images for GenEval-format prompts (the synthetic test split's "
        "test_geneval.jsonl), score them with the rule-based detector under GenEval's rules, and report "
        "per-task accuracy (single_object, two_object, counting, colors, position, color_attr) and their mean.",
    )
    p.add_argument("--ckpt", help="pipeline folder, training .ckpt, diffusers folder or bare transformer "
                   "checkpoint (then also --text-encoder and --vae)")
    p.add_argument("--text-encoder", help="text-encoder folder (or 'minilm'); overrides the checkpoint's")
    p.add_argument("--vae", help="VAE folder or 'pixel'; overrides the checkpoint's")
    p.add_argument("--prompts", help="GenEval-format prompts (default: test_geneval.jsonl beside --manifest)")
    p.add_argument("--out", default="eval_out", help="output folder (default: eval_out)")
    p.add_argument("--preset", choices=("official", "fast", "diffusers"), default="official",
                   help="sampler preset (default official)")
    p.add_argument("--solver", default=None, help="override the preset's solver (euler, midpoint, dpm, ...)")
    p.add_argument("--steps", type=int, default=None, help="solver steps (intervals)")
    p.add_argument("--shift", type=float, default=None, help="time shift")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (1 = no guidance)")
    p.add_argument("--renorm", type=float, default=None, help="CFG-Renorm factor (0 = off)")
    p.add_argument("--cfg-trunc", type=float, default=None, help="CFG truncation")
    p.add_argument("--cfg-mode", choices=("official", "diffusers"), default=None)
    p.add_argument("--teacache", type=float, default=None, help="TeaCache threshold (0 = off)")
    p.add_argument("--teacache-version", type=teacache_version_arg, default=None)
    p.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (GenEval: 4)")
    p.add_argument("--min-images-per-task", type=int, default=0,
                   help="score every task on at least this many images: tasks with few prompts get more images "
                        "per prompt (default 0: off)")
    p.add_argument("--seed", type=int, default=0, help="base seed: image k of prompt i gets seed + i*n + k")
    p.add_argument("--width", type=int, default=None,
                   help="default: the checkpoint's training resolution, else the manifest's / dataset's size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16, help="images per pipeline call")
    p.add_argument("--max-prompts", type=int, default=None, help="only the first N prompts")
    p.add_argument("--max-per-tag", type=int, help="at most N prompts of each task (balanced quick runs)")
    p.add_argument("--manifest", help="synthetic test.jsonl: fixed-timestep validation loss and detector validation")
    p.add_argument("--val-records", type=int, default=64, help="records for the validation loss (0 = skip)")
    p.add_argument("--compare-to-preset", choices=("official", "fast", "diffusers"), default=None,
                   help="also sample with this reference preset from the same noise: PSNR/SSIM and score delta")
    p.add_argument("--paired-with", metavar="DIR",
                   help="the --out folder of an earlier eval of the same prompts and seeds: print this run's score "
                        "minus that one's, paired image by image, with a 95 %% interval")
    p.add_argument("--validate-detector", action="store_true",
                   help="check the detector on the manifest's ground-truth renders (alone when no --ckpt)")
    p.add_argument("--images", help="re-score an existing folder in GenEval layout (<idx>/metadata.jsonl, "
                   "<idx>/samples/NNNN.png) instead of generating")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--ema", choices=("auto", "true", "false"), default="auto", help="use EMA weights (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on small busy CPUs)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the store the checkpoint's "
                   "training run logged to, where it is a local store that exists here)")
    p.add_argument("--track", action=argparse.BooleanOptionalAction, default=None,
                   help="--track: log to MLflow even without a URI (the checkpoint's recorded store, a server "
                   "included, else sqlite:///mlruns.db + ./mlartifacts); "
                   "--no-track: do not log at all (default: log where a store is known, see --tracking-uri)")
    p.add_argument("--experiment", default="lumina-lightning", help="MLflow experiment (default lumina-lightning)")
    p.add_argument("--run-name", default=None, help="MLflow run name (default eval-<preset>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _print_table(title: str, tags: dict[str, float], counts: dict[str, list[int]] | None, overall: float | None,
                 results: dict[str, Any] | None = None) -> None:
    """Per-task scores; with ``results`` also their 95 % intervals and prompt-blind chance levels."""
    ci = (results or {}).get("ci95") or {}
    blind = (results or {}).get("prompt_blind") or {}

    def extras(iv: list[float] | None, chance: float | None) -> str:
        text = f"  95 % [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else ""
        return text + (f"  chance {chance:.3f}" if chance is not None else "")

    print(title)
    # every task GenEval has (absent ones said so), then any other tag present: the rows the mean is over
    for tag in tag_order([*TAGS, *tags]):
        if tag in tags:
            extra = f"  ({counts[tag][0]} / {counts[tag][1]})" if counts else ""
            extra += extras((ci.get("tags") or {}).get(tag), (blind.get("tags") or {}).get(tag))
            print(f"  {tag:<14} {tags[tag]:.3f}{extra}")
        else:
            print(f"  {tag:<14} absent")
    if overall is not None:
        extra = extras(ci.get("overall"), blind.get("overall"))
        print(f"  {'overall':<14} {overall:.3f}  (mean of present tasks){extra}")
    if blind:
        print("  (chance = prompt-blind level: a random correct scene of the task, whatever the prompt)")


def _paired_text(paired: dict[str, Any]) -> str:
    if paired.get("difference") is None:
        return "no images in common (pairing needs the same prompts, sample indices and seeds)"
    low, high = paired["interval"]
    return (f"overall difference {paired['difference']:+.3f} [{low:+.3f}, {high:+.3f}] over {paired['pairs']} "
            "paired images (an interval containing 0 is no measurable difference)")


def _print_validation(dv: dict[str, Any]) -> None:
    at = f" at {dv['size'][0]}×{dv['size'][1]}, the evaluated size" if dv.get("resized") else ""
    _print_table(f"detector on ground-truth renders{at} ({dv['images']} images):", dv["tags"], dv["counts"],
                 dv["overall"])
    verdict = "passes" if dv["passed"] else "FAILS"
    boxes = (f"; object recall {dv['object_recall']:.3f}, precision {dv['object_precision']:.3f}"
             if dv.get("object_recall") is not None else "")
    print(f"  {verdict} the {dv['target']} bar in every task{boxes}; {dv['ms_per_image']:.2f} ms per image")
    native = dv.get("native")
    if native:
        print(f"  at their native size: {native['overall']:.3f} overall, min task {native['min_tag']:.3f} "
              f"({'passes' if native['passed'] else 'FAILS'}); the evaluated size is the ceiling of the model's score")
    recon = dv.get("autoencoder")
    if recon:
        print(f"  through the model's autoencoder (renders encoded and decoded): {recon['overall']:.3f} overall, "
              f"min task {recon['min_tag']:.3f}; the ceiling of a latent model's score")
    for f in dv["failures"][:5]:
        print(f"    fail {f['image']} [{f['tag']}] {f['prompt']}: {f['reason'].replace(chr(10), '; ')}")


def _manifest_and_prompts(args: argparse.Namespace) -> tuple[str | None, str | None]:
    manifest, prompts = args.manifest, args.prompts
    if manifest is None and prompts is not None and args.validate_detector:
        sibling = Path(prompts).parent / "test.jsonl"
        manifest = str(sibling) if sibling.is_file() else None
    if prompts is None and manifest is not None:
        sibling = Path(manifest).parent / "test_geneval.jsonl"
        prompts = str(sibling) if sibling.is_file() else None
    return manifest, prompts


# flags that only shape generation: with --images (re-scoring existing images) they would be ignored
_GENERATION_FLAGS = ("--ckpt", "--text-encoder", "--vae", "--preset", "--solver", "--steps", "--shift", "--cfg",
                     "--renorm", "--cfg-trunc", "--cfg-mode", "--teacache", "--teacache-version",
                     "--images-per-prompt", "--min-images-per-task", "--width", "--height", "--batch-size",
                     "--max-prompts", "--max-per-tag", "--compare-to-preset", "--ema",
                     "--val-records")  # the validation loss needs the model


def _check_paths(args: argparse.Namespace, manifest: str | None, prompts: str | None) -> None:
    """Refuse missing or wrong-kind paths and prompt limits under 1 (ValueError naming the flag) before
    any model loads."""
    from lumina_lightning.cli import check_input, check_output

    check_output(args.out, "--out")
    for flag, value in (("--prompts", prompts), ("--manifest", manifest)):
        if value is not None:
            check_input(value, flag)
    if manifest is not None:  # every mode validates the detector on it: a bad line is named before any work
        from lumina_lightning.eval.run import check_manifest

        check_manifest(manifest)
    if args.images:
        check_input(args.images, "--images", kind="dir")
    for flag, value in (("--max-prompts", args.max_prompts), ("--max-per-tag", args.max_per_tag)):
        if value is not None and value < 1:  # -1 would drop the last prompt, 0 evaluate nothing
            raise ValueError(f"{flag} must be >= 1 (or left out: all prompts), got {value}")
    if args.ckpt and not args.images:
        from lumina_lightning.sampling.cli import resolve_device

        # as `sample` and `demo` do: --device cuda without CUDA is a message, not torch's assertion
        args.device = resolve_device(args.device)


def _copy_scored(images: Path, rows: list[dict[str, Any]], out: Path) -> None:
    """Put exactly the scored images (and their prompts' metadata) in ``out/images``, the layout of a
    generating run, and make the rows' filenames relative to ``out``.

    Why a copy: the report and the MLflow artifacts are written from ``out``; pointing them at the
    scored folder would break when either folder moves, and ``out/images`` may hold another run's
    images. The copies are hard links where the file system allows (no second copy of a large
    GenEval folder on disk; a later run in ``out`` removes or replaces files, never writes into
    them). Re-scoring ``out/images`` itself copies nothing.
    """
    from lumina_lightning.eval.run import clear_outputs

    target = out / "images"
    in_place = target.resolve() == images.resolve()
    clear_outputs(out, images=not in_place)  # before anything is written: out holds this scoring only
    for row in rows:
        rel = Path(row["filename"])  # relative to the scored folder: <idx>/samples/NNNN.png
        if not in_place:
            (target / rel.parent).mkdir(parents=True, exist_ok=True)
            for name in (rel, rel.parent.parent / "metadata.jsonl"):
                if not (target / name).is_file():
                    _link_or_copy(images / name, target / name)
        row["filename"] = (Path("images") / rel).as_posix()


def _link_or_copy(src: Path, dst: Path) -> None:
    import shutil

    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def _log(results: dict[str, Any], out: str | Path, args: argparse.Namespace) -> dict[str, str] | None:
    """:func:`~.tracking.log_to_mlflow`, with MLflow's refusals as a one-line error (the results are
    written by then, so the message says where)."""
    from lumina_lightning.eval.tracking import log_to_mlflow

    try:
        info = log_to_mlflow(results, out, tracking_uri=args.tracking_uri, experiment=args.experiment,
                             run_name=args.run_name, track=args.track)
        if info is None and args.track is None:
            print("lumina eval: not logged to MLflow (MLFLOW_TRACKING_URI is unset, and the checkpoint's training run "
                  "was not tracked in a local store on this machine); --track logs to its recorded store or "
                  "sqlite:///mlruns.db, --tracking-uri elsewhere")
        return info
    except Exception as err:
        from mlflow.exceptions import MlflowException  # imported here: mlflow is loaded only when tracking

        if not isinstance(err, MlflowException):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"MLflow logging failed (results are in {out}): {first}") from None


def _ground_truth_checks(rows: list[dict[str, Any]], manifest: str, detector: Any, out: Path) -> dict[str, Any]:
    """What a generating run with ``--manifest`` adds that needs no model, for re-scored images: the
    detector validated on the manifest's ground-truth renders at the scored images' size (the ceiling of
    their score; the native-size result under ``"native"`` when that differs), the undersized credits and
    the prompt-blind chance level of the scored prompts."""
    from PIL import Image

    from lumina_lightning.eval.metrics import prompt_blind_baseline, undersized_credits, validate_detector

    sizes = set()
    for row in rows:
        with Image.open(out / row["filename"]) as im:
            sizes.add(im.size)
    # one size: the renders are judged at it, as in a generating run; mixed sizes: as the renders are
    size = next(iter(sizes)) if len(sizes) == 1 else None
    found: dict[str, Any] = {"detector_validation": None, "undersized": None, "prompt_blind": None}
    dv = validate_detector(manifest, detector=detector, size=size)
    if dv["resized"]:
        native = validate_detector(manifest, detector=detector)
        dv["native"] = {k: native[k] for k in ("overall", "tags", "min_tag", "passed", "images",
                                               "object_recall", "object_precision")}
    found["detector_validation"] = dv
    if dv.get("min_object_area"):
        found["undersized"] = undersized_credits(rows, dv["min_object_area"])
    specs: dict[int, dict[str, Any]] = {}
    counts: dict[int, int] = {}
    for row in rows:
        i = int(row["prompt_index"])
        specs.setdefault(i, json.loads(row["metadata"]))
        counts[i] = counts.get(i, 0) + 1
    order = sorted(specs)
    found["prompt_blind"] = prompt_blind_baseline([specs[i] for i in order], manifest,
                                                  weights=[counts[i] for i in order], size=size, detector=detector)
    return found


def run(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from lumina_lightning.eval.run import detector_for, evaluate, score_folder

    manifest, prompts = _manifest_and_prompts(args)
    _check_paths(args, manifest, prompts)
    progress = not args.no_progress

    if args.images:  # re-score existing images
        if args.validate_detector and manifest is None:
            print("lumina eval: error: --validate-detector needs --manifest DIR/test.jsonl (the ground-truth renders)",
                  file=sys.stderr)
            return 2
        from lumina_lightning.eval.detector import Detector
        from lumina_lightning.eval.geneval import summarize
        from lumina_lightning.eval.report import write_report

        previous = Path(args.images).parent / "results.json"
        if prompts is None and previous.is_file() and json.loads(previous.read_text()).get("detector"):
            detector = Detector.from_config(json.loads(previous.read_text())["detector"])  # as first scored
        else:
            detector = detector_for(prompts)
        from lumina_lightning.eval.run import read_results

        other_rows = read_results(args.paired_with) if args.paired_with else None  # before any work
        rows = score_folder(args.images, detector)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        _copy_scored(Path(args.images), rows, out)
        summary = summarize(rows)
        results = {"version": 1, "checkpoint": None, "prompts_file": None, "images_dir": str(args.images),
                   "overall": summary["overall"], "tags": {t: v["accuracy"] for t, v in summary["tags"].items()},
                   "counts": {t: [v["correct"], v["total"]] for t, v in summary["tags"].items()},
                   "absent_tags": summary["absent_tags"], "images": summary["images"], "prompts": summary["prompts"],
                   "correct_images": summary["correct_images"], "correct_prompts": summary["correct_prompts"],
                   "settings": {}, "detector": detector.config(), "timings": {}, "paired": None}
        if other_rows is not None:
            from lumina_lightning.eval.geneval import paired_difference

            results["paired"] = {"with": str(args.paired_with), **paired_difference(rows, other_rows, seed=args.seed)}
        if manifest is not None:
            results.update(manifest=str(manifest), **_ground_truth_checks(rows, manifest, detector, out))
        with open(out / "results.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        results["files"] = write_report(results, rows, out)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        _print_table(f"lumina eval: {results['images']} images in {args.images}:", results["tags"], results["counts"],
                     results["overall"], results)
        if results.get("detector_validation"):
            _print_validation(results["detector_validation"])
        if results.get("undersized"):
            from lumina_lightning.eval.report import undersized_text

            print(f"undersized credits: {undersized_text(results['undersized'])}")
        if results["paired"]:
            print(f"vs {results['paired']['with']}: {_paired_text(results['paired'])}")
        info = _log(results, out, args)
        if info:
            print(f"lumina eval: logged to MLflow run {info['run_id']} at {info['tracking_uri']}")
        return 0

    if not args.ckpt:
        if not args.validate_detector:
            print("lumina eval: error: give --ckpt (or --validate-detector with --manifest, or --images)", file=sys.stderr)
            return 2
        if manifest is None:
            print("lumina eval: error: --validate-detector needs --manifest DIR/test.jsonl", file=sys.stderr)
            return 2
        from lumina_lightning.eval.metrics import validate_detector

        dv = validate_detector(manifest, detector=detector_for(prompts or manifest))
        _print_validation(dv)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "detector_validation.json").write_text(json.dumps(dv, indent=2) + "\n", encoding="utf-8")
        return 0 if dv["passed"] else 1

    if prompts is None:
        print("lumina eval: error: give --prompts DIR/test_geneval.jsonl (or --manifest with one beside it)", file=sys.stderr)
        return 2
    overrides = {"solver": args.solver, "steps": args.steps, "shift": args.shift, "cfg_scale": args.cfg,
                 "renorm": args.renorm, "cfg_trunc": args.cfg_trunc, "cfg_mode": args.cfg_mode,
                 "teacache": args.teacache, "teacache_version": args.teacache_version}
    load_kwargs = {k: v for k, v in (("text_encoder", args.text_encoder), ("vae", args.vae)) if v}
    ema: bool | str = {"auto": "auto", "true": True, "false": False}[args.ema]
    results = evaluate(
        args.ckpt, prompts, args.out, preset=args.preset, images_per_prompt=args.images_per_prompt,
        min_images_per_task=args.min_images_per_task, seed=args.seed,
        width=args.width, height=args.height, manifest=manifest, compare_to=args.compare_to_preset,
        max_prompts=args.max_prompts, max_per_tag=args.max_per_tag, batch_size=args.batch_size, sampler_overrides=overrides, progress=progress,
        validate=True if args.validate_detector else None, val_records=args.val_records, device=args.device, ema=ema,
        paired_with=args.paired_with,
        load_kwargs=load_kwargs,
    )
    s = results["settings"]
    _print_table(f"lumina eval: {results['images']} images ({results['prompts']} prompts, {s['width']}x{s['height']}, "
                 f"{s['solver']} x{s['steps']}, cfg {s['cfg_scale']}):", results["tags"], results["counts"],
                 results["overall"], results)
    if results.get("detector_validation"):
        _print_validation(results["detector_validation"])
    if results.get("undersized"):
        from lumina_lightning.eval.report import undersized_text

        print(f"undersized credits: {undersized_text(results['undersized'])}")
    if results.get("val_loss"):
        from lumina_lightning.eval.report import val_loss_text

        print(f"validation loss: {val_loss_text(results['val_loss'])}")
    if results.get("compare"):
        c = results["compare"]
        print(f"vs {c['reference_preset']}: PSNR {c['psnr']:.2f} dB, SSIM {c['ssim']:.4f}, "
              f"reference overall {c['reference_overall']:.3f}")
    if results.get("paired"):
        print(f"vs {results['paired']['with']}: {_paired_text(results['paired'])}")
    info = _log(results, args.out, args)
    if info:
        print(f"lumina eval: logged to MLflow run {info['run_id']} (experiment {info['experiment']}) at {info['tracking_uri']}")
    print(f"lumina eval: wrote {Path(args.out) / 'results.json'}, report.md and report.html")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images:
        dests = {f: f[2:].replace("-", "_") for f in _GENERATION_FLAGS}
        given = [f for f, d in dests.items() if getattr(args, d) != parser.get_default(d)]
        if given:
            parser.error(f"--images re-scores existing images, so {', '.join(given)} would be ignored; "
                         "drop them (or drop --images to generate)")
    try:
        return run(args)
    except (OSError, ImportError, ValueError, KeyError, CheckpointMismatchError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"lumina eval: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
