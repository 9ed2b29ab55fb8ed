"""``lumina convert SRC DST --to lumina|official|diffusers``: convert Next-DiT checkpoints."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

import yaml

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lumina convert",
        description="Convert a Next-DiT checkpoint between our layout, the official .pth layout and diffusers. "
        "The source layout is detected from the path. A pipeline folder (one with pipeline.json, as training "
        "exports) converted --to diffusers becomes a whole diffusers Lumina2Pipeline folder (transformer, VAE, "
        "text encoder, tokenizer, scheduler); --to lumina/official write its transformer.",
    )
    p.add_argument("src", help="checkpoint file or folder (ours, official .pth, diffusers, ComfyUI, training .ckpt)")
    p.add_argument("dst", help="output: a .safetensors file or a folder (lumina), a folder (official, diffusers)")
    p.add_argument("--to", required=True, choices=["lumina", "official", "diffusers"], help="output layout")
    p.add_argument("--ema", default="auto", choices=["auto", "true", "false"],
                   help="which weights to read where the source has raw and EMA weights (default: EMA where present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights (default: keep the source dtype)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="config field the source cannot tell, e.g. --set axes_dims=[4,6,6] (repeatable)")
    p.add_argument("--transformer-only", action="store_true",
                   help="from a pipeline folder --to diffusers: write the transformer alone, not a Lumina2Pipeline "
                        "(every other source converts to its transformer alone anyway)")
    return p


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


# What each NextDiTConfig field type accepts from --set: (description, check). The config itself only
# checks how fields fit together (axes sum to the head size, ...); a string where a number belongs would
# otherwise fail deep in the read with a message naming neither the field nor the flag, or be written
# into config.json as is.
_FIELD_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "float": ("a number > 0", _is_positive_number),
    "float | None": ("a number > 0 or null", lambda v: v is None or _is_positive_number(v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "list[int]": ("a list of 3 integers >= 1", lambda v: isinstance(v, list) and len(v) == 3
                  and all(_is_int(a) and a >= 1 for a in v)),
}
# integer fields where 0 is a size the config can describe
_ZERO_OK = {"n_refiner_layers"}


def _value_check(key: str, field_type: str) -> tuple[str, Callable[[Any], bool]]:
    """(what ``--set key=...`` expects, its check); a field of a type not listed takes anything."""
    if key in _ZERO_OK:
        return "an integer >= 0", lambda v: _is_int(v) and v >= 0
    return _FIELD_TYPES.get(field_type, ("", lambda v: True))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` items as config overrides, each value read as YAML (as recipe overrides
    are: ``1e-6`` is a number) and checked against its :class:`NextDiTConfig` field's type; a
    ``ValueError`` naming ``--set FIELD`` and the expected type otherwise."""
    import dataclasses
    import difflib

    from lumina_lightning.models.config import NextDiTConfig
    from lumina_lightning.training.recipe import load_yaml

    fields = {f.name: str(f.type) for f in dataclasses.fields(NextDiTConfig)}
    overrides: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        key, raw = (part.strip() for part in item.split("=", 1))
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"--set {key}: not a Next-DiT config field{hint}; fields: {', '.join(sorted(fields))}")
        try:
            value = load_yaml(raw)
        except yaml.YAMLError:
            value = raw  # refused below, shown as typed
        expected, ok = _value_check(key, fields[key])
        if not ok(value):
            default = getattr(NextDiTConfig(), key)
            example = f" (e.g. {key}=[{','.join(map(str, default))}])" if isinstance(default, list) else ""
            raise ValueError(f"--set {key}: expected {expected}{example}, got {value!r}")
        overrides[key] = value
    return overrides


def _export_pipeline(args: argparse.Namespace, ema: bool | str) -> int:
    """A pipeline folder -> a diffusers ``Lumina2Pipeline`` folder (what ``from_pretrained`` loads)."""
    import torch

    from lumina_lightning.sampling.pipeline_io import export_diffusers_pipeline, load_pipeline

    if args.overrides:
        print("lumina convert: --set is for bare checkpoints; a pipeline folder's config is in its transformer",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    pipe = load_pipeline(args.src, ema=ema)
    if args.dtype:
        pipe.model.to(getattr(torch, DTYPES[args.dtype]))
    try:
        out = export_diffusers_pipeline(pipe, args.dst, shift=float(pipe.defaults.get("shift", 6.0)))
    except ValueError as err:
        print(f"lumina convert: {args.src}: {err}. Add --transformer-only to write its transformer alone "
              "(a diffusers Lumina2Transformer2DModel folder).", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in pipe.model.parameters())
    print(f"converted {args.src} (pipeline) -> {out} (diffusers Lumina2Pipeline: transformer {n:,} parameters, vae, "
          f"text_encoder, tokenizer, scheduler) in {time.perf_counter() - start:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lumina_lightning.models.io import CheckpointMismatchError

    try:
        return _convert(args)
    except (OSError, ImportError, ValueError, KeyError, CheckpointMismatchError) as err:
        # a missing or wrong source is the user's to fix: the message (which lists mismatched keys), no traceback
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lumina convert: {message}", file=sys.stderr)
        return 2


def _overwrites_source(src: str, dst: str, dst_is_file: bool) -> str | None:
    """Why writing ``dst`` would clobber the checkpoint read from ``src`` (``None`` where it would not):
    the same file or folder, the source's ``transformer/`` folder, the folder that holds the source
    file, or a file inside the source folder."""
    from pathlib import Path

    from lumina_lightning.models.io import transformer_folder

    source = Path(src).resolve()
    if not source.exists():
        return None  # reading fails with its own message
    target = Path(dst).resolve()
    model_dir = transformer_folder(source).resolve()
    if target == source:
        return "is the source"
    if source.is_dir():
        if target == model_dir:
            return f"is the source's transformer folder ({model_dir})"
        if dst_is_file and target.parent in (source, model_dir):
            return f"is a file in the source folder ({target.parent})"
        return None
    if not dst_is_file and target == source.parent:
        return f"is the folder that holds the source file ({source.name})"
    return None


def _convert(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from lumina_lightning.models.io import read_state, save_nextdit

    overrides = parse_overrides(args.overrides)  # before the (slow) read
    ema = {"auto": "auto", "true": True, "false": False}[args.ema]
    from lumina_lightning.cli import check_output

    # save_nextdit writes a file only for `--to lumina X.safetensors`, a folder otherwise: refuse the
    # other kind already there before the (slow) read
    dst_is_file = args.to == "lumina" and args.dst.endswith(".safetensors")
    check_output(args.dst, "DST", "file" if dst_is_file else "dir")
    clash = _overwrites_source(args.src, args.dst, dst_is_file)
    if clash:
        print(f"lumina convert: DST {args.dst} {clash}: converting in place would overwrite or delete the weights "
              "being read (e.g. raw weights replaced by EMA ones, the EMA file removed as stale). Write to a new "
              "folder or file, then move it.", file=sys.stderr)
        return 2
    from lumina_lightning.sampling.pipeline_io import describe, source_prediction

    kind = describe(args.src)  # a missing or unknown source is named here, before the progress bar
    prediction = source_prediction(args.src)  # "velocity" for anything without a pipeline spec
    if prediction != "velocity":
        # the weights themselves do not say what they output; official and diffusers code read a velocity
        if args.to != "lumina":
            print(f"lumina convert: {args.src} predicts {prediction!r} (objective.prediction), but {args.to} code "
                  "treats the transformer output as a velocity; refusing to write a checkpoint that would sample "
                  "wrongly there", file=sys.stderr)
            return 2
        print(f"lumina convert: note: {args.src} predicts {prediction!r}; the written transformer does not record "
              "that; sample it through a pipeline folder whose pipeline.json says so", file=sys.stderr)
    if args.to == "diffusers" and not args.transformer_only and kind == "pipeline":
        return _export_pipeline(args, ema)
    start = time.perf_counter()
    with tqdm(total=3, desc="convert", unit="step") as bar:
        bar.set_postfix_str("reading")
        state, config, fmt = read_state(args.src, ema=ema, overrides=overrides)
        bar.update()
        if args.dtype:
            dtype = getattr(torch, DTYPES[args.dtype])
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        # Build-and-check before writing: a partial or mismatched source fails here, listing keys.
        from lumina_lightning.models.io import build_from_state

        build_from_state(config, state, source=args.src)
        bar.update()
        bar.set_postfix_str(f"writing {args.to}")
        out = save_nextdit(None, args.dst, args.to, state_dict=state, config=config, progress=True)
        bar.update()
    n = sum(v.numel() for v in state.values())
    print(f"converted {args.src} ({fmt}) -> {out} ({_written(args.to, kind)}): {n:,} parameters in "
          f"{time.perf_counter() - start:.1f}s")
    return 0


def _written(to: str, kind: str) -> str:
    """What a transformer conversion wrote. --to diffusers writes a whole Lumina2Pipeline from a pipeline
    folder only; every other source (a training checkpoint too, which records its text encoder and
    autoencoder but is read weights-only) gives the transformer alone, so --transformer-only changes
    nothing there, and the line says what was written rather than leave it to be guessed."""
    if to != "diffusers":
        return to
    text = "diffusers: the transformer alone, a Lumina2Transformer2DModel folder"
    if kind == "ckpt":
        text += ("; a training checkpoint is read weights-only, a pipeline folder (a run's export/) converts to a "
                 "whole Lumina2Pipeline")
    return text
