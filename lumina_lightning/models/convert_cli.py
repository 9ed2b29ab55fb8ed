"""``lumina convert SRC DST --to lumina|official|diffusers``: convert Next-DiT checkpoints."""

from __future__ import annotations

import argparse
import sys
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lumina convert",
        description="Convert a Next-DiT checkpoint between our layout, the official .pth layout and diffusers. "
        "The source layout is detected from the path.",
    )
    p.add_argument("src", help="checkpoint file or folder (ours, official .pth, diffusers, ComfyUI, training .ckpt)")
    p.add_argument("dst", help="output: a .safetensors file or a folder (lumina), a folder (official, diffusers)")
    p.add_argument("--to", required=True, choices=["lumina", "official", "diffusers"], help="output layout")
    p.add_argument("--ema", default="auto", choices=["auto", "true", "false"],
                   help="which weights to read where the source has raw and EMA weights (default: EMA where present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights (default: keep the source dtype)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="config field the source cannot tell, e.g. --set axes_dims=[4,6,6] (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    import yaml
    from tqdm.auto import tqdm

    from lumina_lightning.models.io import read_state, save_nextdit

    overrides = {}
    for item in args.overrides:
        if "=" not in item:
            print(f"lumina convert: --set expects FIELD=VALUE, got {item!r}", file=sys.stderr)
            return 2
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    ema = {"auto": "auto", "true": True, "false": False}[args.ema]
    from lumina_lightning.sampling.pipeline_io import source_prediction

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
    print(f"converted {args.src} ({fmt}) -> {out} ({args.to}): {n:,} parameters in {time.perf_counter() - start:.1f}s")
    return 0
