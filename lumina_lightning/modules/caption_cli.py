"""``lumina caption``: re-caption images with a fine-tuned UniCap captioner into a training manifest.

    lumina caption --model runs/tiny/unicap/export --input data/train.jsonl \\
        --output data/train_unicap.jsonl --levels short,long,tags [--eval]

* ``--model``: the captioner export folder a UniCap run writes (full model, or LoRA adapter + base
  path), a run folder holding ``export/``, or any local image-text-to-text model folder;
* ``--input``: a manifest (``.jsonl``/``.json``), a data YAML, or an image folder;
* ``--output``: a JSONL manifest in the data pipeline's record format (``image``, ``captions``
  with one entry per level, ``width``/``height``, the input's ``meta``) that generation recipes
  read as ``data.path``; image paths are relative to the manifest when the images lie below its
  folder, absolute otherwise.

Batched generation with a progress bar. Resumable: every batch is appended and flushed (fsync) at
once, and a rerun skips images already in the output (or already reported unreadable), so an
interrupted run continues where it stopped with no duplicates and the same batches. A torn last
line (killed mid-write) is dropped on restart. Unreadable images are skipped, listed in
``<output>.skipped.jsonl`` and summarised at the end (``--retry-skipped`` tries them again); a
rerun reports them apart from the records already done.

``<output>.caption.json`` records what the output is written with: the captioner (its resolved
folder, the base of a LoRA adapter, and a digest of the weight files' names, sizes and mtimes),
the levels, the generation settings and seed, ``--keep-captions``, ``--limit`` and the input. A
rerun with other settings is refused, naming what differs, unless ``--on-mismatch replace``: the
old output, its skip list and this file are then moved aside to ``<name>.replaced-<time>`` (never
deleted) and captioning starts afresh. An output without this file (an older version wrote it) is
resumed as before, with a warning.
A caption the captioner generated empty (blank) is left out of its record rather than written as
``""``: every reader treats a blank level as absent anyway (``data.captions``: training falls back to
another level). With ``--keep-captions`` a generated level still replaces the input's caption at that
level, blank or not, so ``--eval`` never scores the input's caption as the captioner's. Blank captions
are counted per level and named in one warning at the end and in the summary.
``--eval`` scores the written captions against the synthetic generator's metadata (attribute
accuracy of colours/shapes/counts; ``unicap_eval``) and writes ``<output>.eval.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lumina_lightning.fileio import atomic_write_text, content_digest, move_aside

log = logging.getLogger("lumina_lightning.caption")

__all__ = ["CaptionReport", "SettingsMismatch", "read_done", "caption_settings", "settings_path", "caption_manifest",
           "build_parser", "main"]

SETTINGS_VERSION = 1
BLANK_EXAMPLES = 5  # images a blank-caption warning names
ON_MISMATCH = ("refuse", "replace")
# generate_captions' defaults: what a setting the captioner's unicap.json and the flags leave out is
_GENERATION_DEFAULTS = {"max_new_tokens": 128, "do_sample": False, "temperature": 0.7, "top_p": 0.9, "num_beams": 1,
                        "repetition_penalty": 1.0}


@dataclass
class CaptionReport:
    """What one ``caption`` run did."""

    output: Path
    total: int  # records in the input (after --limit)
    already_done: int  # records found in the output at start
    written: int  # records written by this run
    skipped: list[dict[str, str]] = field(default_factory=list)  # this run's unreadable images
    batches: int = 0
    seconds: float = 0.0
    eval: dict[str, Any] | None = None
    previously_skipped: int = 0  # images an earlier run listed as unreadable (not retried without --retry-skipped)
    replaced: list[Path] = field(default_factory=list)  # where --on-mismatch replace moved the old files
    blank: dict[str, int] = field(default_factory=dict)  # this run's blank (left out) captions per level
    blank_images: list[str] = field(default_factory=list)  # the first few images with a blank caption
    uncaptioned: int = 0  # this run's records written with no caption level at all (training skips them)

    @property
    def blank_total(self) -> int:
        return sum(self.blank.values())

    def blank_summary(self) -> str:
        """``"5 blank caption(s) (short 3, tags 2)"``; empty when there are none."""
        if not self.blank_total:
            return ""
        levels = ", ".join(f"{level} {n}" for level, n in self.blank.items() if n)
        return f"{self.blank_total} blank caption(s) ({levels})"

    @property
    def complete(self) -> bool:
        return self.already_done + self.previously_skipped + self.written + len(self.skipped) >= self.total

    @property
    def records(self) -> int:
        """Records in the output now."""
        return self.already_done + self.written


class SettingsMismatch(ValueError):
    """The output was written with other settings than this run's (see ``--on-mismatch``)."""


def skipped_path(output: Path) -> Path:
    return output.with_name(output.name + ".skipped.jsonl")


def settings_path(output: Path) -> Path:
    return output.with_name(output.name + ".caption.json")


def captioner_identity(captioner: Any) -> dict[str, Any]:
    """The captioner's folder (resolved), a LoRA export's base folder, and their weight digests."""
    path = Path(captioner.path).resolve() if getattr(captioner, "path", "") else None
    base = getattr(captioner, "base_path", None)
    base = Path(base).resolve() if base else None
    return {"path": str(path) if path else None, "weights": content_digest(path) if path and path.is_dir() else None,
            "base_model": str(base) if base else None, "base_weights": content_digest(base) if base else None}


def caption_settings(captioner: Any, input_path: str | os.PathLike, levels: Sequence[str], *,
                     generation: dict[str, Any] | None = None, limit: int | None = None,
                     keep_captions: bool = False, seed: int = 0) -> dict[str, Any]:
    """What an output is written with (the content of ``<output>.caption.json``).

    The generation settings are the effective ones (the captioner's defaults with the overrides);
    greedy decoding records no temperature, top-p or seed, which do not change its captions.
    """
    gen = {**_GENERATION_DEFAULTS, **(getattr(captioner, "generation", None) or {}),
           **{k: v for k, v in (generation or {}).items() if v is not None}}
    gen = {k: gen[k] for k in _GENERATION_DEFAULTS}
    sampled = bool(gen["do_sample"])
    if not sampled:
        gen["temperature"] = gen["top_p"] = None
    return {"version": SETTINGS_VERSION, "captioner": captioner_identity(captioner), "levels": list(levels),
            "generation": gen, "seed": int(seed) if sampled else None, "keep_captions": bool(keep_captions),
            "limit": limit, "input": str(Path(input_path).resolve())}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key in ("captioner", "levels", "generation", "seed", "keep_captions", "limit", "input"):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    out.append(f"{key}.{sub} {a.get(sub)!r} then, {b.get(sub)!r} now")
        else:
            out.append(f"{key} {a!r} then, {b!r} now")
    return out


def _check_settings(out: Path, settings: dict[str, Any], on_mismatch: str) -> list[Path]:
    """Compare this run's settings with the output's; returns the files moved aside (``replace``).

    Raises:
        SettingsMismatch: the output was written with other settings and ``on_mismatch`` is ``refuse``.
    """
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch must be one of {list(ON_MISMATCH)}, got {on_mismatch!r}")
    sidecar = settings_path(out)
    existing = [p for p in (out, skipped_path(out)) if p.is_file() and p.stat().st_size]
    if not sidecar.is_file():
        if existing:
            log.warning("%s: no %s (written by an older version): resuming without checking that the model, "
                        "levels and generation settings are the same", out, sidecar.name)
        else:
            atomic_write_text(sidecar, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
        return []
    try:
        old = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        old = {}
    diffs = _differences(old, settings)
    if not diffs:
        return []
    if on_mismatch == "refuse":
        raise SettingsMismatch(
            f"{out} was written with other settings ({'; '.join(diffs)}): rerun with the same settings, "
            "choose another --output, or pass --on-mismatch replace to move the old output aside and start afresh")
    stamp = time.strftime("%Y%m%d-%H%M%S")  # one suffix for the files that belong together
    moved = [move_aside(p, stamp) for p in (out, skipped_path(out), sidecar, out.with_name(out.name + ".eval.json"))
             if p.exists()]
    log.warning("%s was written with other settings (%s): moved the old files aside to %s", out, "; ".join(diffs),
                ", ".join(str(m) for m in moved))
    atomic_write_text(sidecar, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    return moved


def _repair_tail(path: Path) -> None:
    """Drop a torn last line (a run killed mid-write) so appends continue from a whole record."""
    data = path.read_bytes()
    if not data:
        return
    keep = len(data)
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        last = data[: -1].rfind(b"\n") + 1
        try:
            json.loads(data[last:])
        except json.JSONDecodeError:
            keep = last
    if keep != len(data):
        log.warning("%s: dropping an incomplete last line left by an interrupted run", path)
        with open(path, "r+b") as fh:
            fh.truncate(keep)


def read_done(output: str | os.PathLike, include_skipped: bool = True) -> set[str]:
    """Absolute image paths already in ``output`` (and, by default, in its skip list)."""
    out = Path(output)
    done: set[str] = set()
    base = out.resolve().parent
    for path in ([out, skipped_path(out)] if include_skipped else [out]):
        if not path.is_file():
            continue
        _repair_tail(path)
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    image = json.loads(line)["image"]
                    done.add(os.path.abspath(image if os.path.isabs(image) else base / image))
    return done


def _append(path: Path, lines: list[str]) -> None:
    if not lines:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(lines))
        fh.flush()
        os.fsync(fh.fileno())


def caption_manifest(
    captioner: Any,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    levels: Sequence[str],
    *,
    batch_size: int = 16,
    generation: dict[str, Any] | None = None,
    limit: int | None = None,
    keep_captions: bool = False,
    retry_skipped: bool = False,
    seed: int = 0,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
    on_mismatch: str = "refuse",
) -> CaptionReport:
    """Caption every record of ``input_path`` at ``levels`` and append them to ``output`` (resumable).

    Args:
        captioner: a :class:`~lumina_lightning.modules.unicap.Captioner`.
        generation: decoding overrides (``max_new_tokens``, ``do_sample``, ``temperature``, ...).
        limit: only the first ``limit`` records of the input (the same ones on every rerun).
        keep_captions: keep the input's other caption levels too (a generated level replaces the input's, and a blank one removes it).
        retry_skipped: try images listed as unreadable by an earlier run again.
        seed: sampling seed; each batch reseeds from it and the batch's position, so a resumed
            sampled run draws what an uninterrupted one would.
        on_batch: called as ``on_batch(batch_number, records_written_so_far)`` after each batch
            is on disk (progress hooks, tests).
        on_mismatch: what to do when ``output`` was written with other settings (its
            ``<output>.caption.json``, see the module docstring): ``refuse`` (raise
            :class:`SettingsMismatch`) or ``replace`` (move the old files aside, start afresh).
    """
    import torch

    from lumina_lightning.data.images import load_image
    from lumina_lightning.data.records import Record, load_records, record_to_dict
    from lumina_lightning.data.skips import BadSample

    started = time.perf_counter()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if Path(input_path).resolve() == out.resolve():
        raise ValueError("--output must differ from --input")
    for level in levels:
        if not captioner.table.has(level):
            raise ValueError(f"the captioner has no instruction for level {level!r}; "
                             f"known: {sorted(captioner.table.instructions)} (+ <level>_<lang> variants)")
    records = list(load_records(input_path).records)
    seen_images: set[str] = set()
    unique = []
    for r in records:  # a manifest listing an image twice is captioned once
        if r.image not in seen_images:
            seen_images.add(r.image)
            unique.append(r)
    records = unique[:limit] if limit else unique
    settings = caption_settings(captioner, input_path, levels, generation=generation, limit=limit,
                                keep_captions=keep_captions, seed=seed)
    replaced = _check_settings(out, settings, on_mismatch)
    if retry_skipped and skipped_path(out).exists():
        skipped_path(out).unlink()
    written_before = read_done(out, include_skipped=False)
    done = read_done(out)
    pending = [(i, r) for i, r in enumerate(records) if os.path.abspath(r.image) not in done]
    in_output = sum(os.path.abspath(r.image) in written_before for r in records)
    report = CaptionReport(output=out, total=len(records), already_done=in_output, written=0,
                           previously_skipped=len(records) - len(pending) - in_output, replaced=replaced,
                           blank={level: 0 for level in levels})
    if report.already_done or report.previously_skipped:
        log.info("%s: %d of %d records already done, %d skipped earlier as unreadable; resuming", out,
                 report.already_done, len(records), report.previously_skipped)
    base = out.resolve().parent
    bar = None
    if progress and pending:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc="captioning", unit="img")
    settings = dict(generation or {})  # the overrides; the captioner applies its own defaults
    try:
        for b, start in enumerate(range(0, len(pending), batch_size)):
            chunk = pending[start:start + batch_size]
            good: list[tuple[Record, Any]] = []
            bad_lines = []
            for _, rec in chunk:
                try:
                    good.append((rec, load_image(rec.image)))
                except BadSample as err:
                    entry = {"image": rec.image, "reason": err.reason, "message": str(err)}
                    report.skipped.append(entry)
                    bad_lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
            texts: dict[str, list[str]] = {}
            if good:
                torch.manual_seed(seed * 1_000_003 + chunk[0][0])
                for level in levels:
                    texts[level] = captioner.caption([img for _, img in good], level, **settings)
            lines = []
            for k, (rec, img) in enumerate(good):
                captions = dict(rec.captions) if keep_captions else {}
                generated = {level: texts[level][k] for level in levels}
                for level in generated:  # a generated level replaces the input's, blank or not: --eval scores
                    captions.pop(level, None)  # what the captioner wrote, never the input's caption under its name
                captions.update(_non_blank(generated, rec.image, report))
                if not any(text.strip() for text in captions.values()):
                    report.uncaptioned += 1
                new = Record(image=rec.image, captions=captions, meta=dict(rec.meta), source=str(out),
                             system=rec.system, width=rec.width or img.width, height=rec.height or img.height)
                lines.append(json.dumps(record_to_dict(new, base), ensure_ascii=False) + "\n")
            _append(out, lines)  # the records first: a skip-list entry must never hide an unwritten record
            _append(skipped_path(out), bad_lines)
            report.written += len(lines)
            report.batches += 1
            if bar is not None:
                bar.update(len(chunk))
            if on_batch is not None:
                on_batch(b + 1, report.written)
    finally:
        if bar is not None:
            bar.close()
    if not out.exists():
        out.touch()  # an input whose images are all unreadable still yields a (empty) manifest
    report.seconds = time.perf_counter() - started
    _warn_blank(report)
    return report


def _non_blank(generated: dict[str, str], image: str, report: CaptionReport) -> dict[str, str]:
    """The generated captions that are not blank; the blank ones are counted in ``report``.

    A blank level is left out, not written as ``""``: readers treat the two alike (``data.captions``
    falls back to another level), but a ``""`` would overwrite the input's caption under
    ``--keep-captions`` and would look like a caption in the manifest.
    """
    blank = [level for level, text in generated.items() if not text.strip()]
    for level in blank:
        report.blank[level] = report.blank.get(level, 0) + 1
    if blank and len(report.blank_images) < BLANK_EXAMPLES:
        report.blank_images.append(image)
    return {level: text for level, text in generated.items() if level not in blank}


def _warn_blank(report: CaptionReport) -> None:
    """One warning at the end of a run that generated blank captions (not one per batch)."""
    if not report.blank_total:
        return
    none_left = (f"; {report.uncaptioned} record(s) have no caption at all and are skipped in training "
                 "(empty_caption)" if report.uncaptioned else "")
    log.warning("%s: the captioner generated %s, left out of their records, e.g. for %s%s. Check the captioner: an "
                "undertrained one can end its answer at once", report.output, report.blank_summary(),
                ", ".join(report.blank_images), none_left)


def _levels(text: str) -> list[str]:
    levels = [x.strip() for x in text.split(",") if x.strip()]
    if not levels:
        raise argparse.ArgumentTypeError("--levels needs at least one level, e.g. short,long,tags")
    return levels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lumina caption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="captioner export folder (or run folder, or a local VLM folder)")
    p.add_argument("--input", required=True, help="manifest (.jsonl/.json), data YAML or image folder")
    p.add_argument("--output", required=True, help="the JSONL manifest to write (appended to when resuming)")
    p.add_argument("--levels", type=_levels, default=["short", "long", "tags"],
                   help="comma-separated caption levels to generate (default: short,long,tags)")
    p.add_argument("--batch-size", type=int, default=16, help="images per generate call (default 16)")
    p.add_argument("--limit", type=int, default=None, help="caption only the first N input records")
    g = p.add_argument_group("generation (defaults: the captioner's unicap.json, else greedy, 128 tokens)")
    g.add_argument("--max-new-tokens", type=int, default=None)
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--sample", dest="do_sample", action="store_true", default=None,
                      help="sample (temperature/top-p)")
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--num-beams", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--base-model", default=None, help="base model folder of a LoRA adapter (default: the one it names)")
    p.add_argument("--keep-captions", action="store_true", help="keep the input's caption levels too")
    p.add_argument("--retry-skipped", action="store_true", help="retry images an earlier run found unreadable")
    p.add_argument("--on-mismatch", choices=ON_MISMATCH, default="refuse",
                   help="when --output was written with another model, levels or generation settings: refuse "
                        "(default) or replace (move the old output aside to <name>.replaced-<time>, start afresh)")
    p.add_argument("--eval", action="store_true",
                   help="score the output's captions against synthetic metadata (colour/shape/count accuracy)")
    p.add_argument("--eval-level", default=None,
                   help="caption level to score (default: short if generated, else the first)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # an --eval-level that is not generated has nothing to score (unless the input's own captions are kept)
    if args.eval_level is not None and args.eval_level not in args.levels and not args.keep_captions:
        parser.error(f"--eval-level {args.eval_level} is not among --levels {','.join(args.levels)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from lumina_lightning.cli import check_input, check_output
    from lumina_lightning.sampling.cli import resolve_device

    from lumina_lightning.data.records import ManifestError
    from lumina_lightning.modules.unicap import load_captioner
    from lumina_lightning.modules.unicap_eval import evaluate_manifest, format_accuracy, write_accuracy

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        # the paths and the device before the captioner loads (a VLM takes a while)
        check_input(args.model, "--model", kind="dir")
        check_input(args.input, "--input", kind=None)
        check_output(args.output, "--output", kind="file")
        device = resolve_device(None if args.device == "auto" else args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        captioner = load_captioner(args.model, device=device, dtype=args.dtype, base_model=args.base_model)
    except (OSError, ImportError, ValueError) as err:
        print(f"error: cannot load the captioner: {err}", file=sys.stderr)
        return 2
    generation = {k: getattr(args, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "num_beams",
                                                "repetition_penalty") if getattr(args, k) is not None}
    try:
        report = caption_manifest(captioner, args.input, args.output, args.levels, batch_size=args.batch_size,
                                  generation=generation, limit=args.limit, keep_captions=args.keep_captions,
                                  retry_skipped=args.retry_skipped, seed=args.seed, progress=not args.no_progress,
                                  on_mismatch=args.on_mismatch)
    except (ManifestError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report.replaced:
        print(f"moved the output written with other settings aside: {', '.join(str(p) for p in report.replaced)}")
    earlier = (f", {report.previously_skipped} skipped earlier as unreadable (--retry-skipped tries them again)"
               if report.previously_skipped else "")
    print(f"{report.output}: wrote {report.written} records in {report.seconds:.1f}s "
          f"({report.already_done} already done{earlier}, {len(report.skipped)} unreadable, "
          f"{report.total} in the input)")
    if report.blank_total:
        none_left = f"; {report.uncaptioned} record(s) left with no caption" if report.uncaptioned else ""
        print(f"  {report.blank_summary()} left out of the records (training falls back to another level){none_left}")
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable image(s), listed in {skipped_path(report.output)}:",
              file=sys.stderr)
        for entry in report.skipped[:5]:
            print(f"  {entry['reason']}: {entry['message']}", file=sys.stderr)
    if args.eval:
        level = args.eval_level or ("short" if "short" in args.levels else args.levels[0])
        result = evaluate_manifest(report.output, level)
        if result["n"] == 0:
            print("eval: no record carries synthetic object metadata (meta.objects); nothing to score")
        else:
            print(format_accuracy(result))
            path = write_accuracy(result, report.output.with_name(report.output.name + ".eval.json"))
            print(f"eval written to {path}")
    # the same answer on a rerun: records in the output, however many earlier runs wrote them
    return 0 if (report.records > 0 or report.total == 0) else 1
