"""``lumina data ...``: synthetic data, offline caches, and manifest inspection.

    lumina data synth   --out DIR --n 10000 --size 64 [--aspect 1:1,4:3] --seed 0 [--holdout red:triangle,...]
    lumina data cache   --data train.jsonl --out CACHE --resolution 64 --vae pixel --text-encoder PATH
    lumina data inspect train.jsonl|folder|data.yaml|--cache CACHE [--resolution 256] [--weights short=0.5,long=0.5]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def _aspects(text: str) -> tuple[float, ...]:
    """``"1:1,4:3,0.75"`` -> (1.0, 1.333.., 0.75)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if ":" in part:
            w, h = part.split(":", 1)
            out.append(float(w) / float(h))
        else:
            out.append(float(part))
    if not out or any(a <= 0 for a in out):
        raise argparse.ArgumentTypeError(f"bad aspect list {text!r}; use e.g. 1:1,4:3,3:4")
    return tuple(out)


def _weights(text: str) -> dict[str, float]:
    """``"short=0.5,long=0.5"`` -> {"short": 0.5, "long": 0.5}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"bad weight {part!r}; use level=weight, e.g. short=0.5")
        key, value = part.split("=", 1)
        out[key.strip()] = float(value)
    return out


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lumina data", description="Dataset tools: synthetic data, caches, manifests.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{synth,cache,inspect}")

    p = sub.add_parser("synth", help="render the synthetic compositional dataset (GenEval-style metadata)")
    p.add_argument("--out", required=True, help="output directory (images/, train.jsonl, test.jsonl, test_geneval.jsonl)")
    p.add_argument("--n", type=int, default=10000, help="training images (default 10000)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default max(6, n/10))")
    p.add_argument("--size", type=int, default=64, help="about size×size pixels per image (default 64)")
    p.add_argument("--aspect", type=_aspects, default=(1.0,), help="aspect ratios w:h to draw from, e.g. 1:1,4:3,3:4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", default=None,
                   help="colour:shape pairs never seen in training, e.g. red:triangle,green:circle; 'none' for no "
                        "hold-out (default: red:triangle,green:circle,blue:square)")
    p.add_argument("--tags", type=_csv, default=None, help="subset of GenEval tags (default: all six)")
    p.add_argument("--shapes", type=_csv, default=None, help="shapes (default circle,square,triangle; also cross)")
    p.add_argument("--workers", type=int, default=0, help="render with this many processes (output is identical)")

    p = sub.add_parser("cache", help="encode a manifest with a frozen autoencoder + text encoder into a cache")
    p.add_argument("--data", required=True, help="manifest (.jsonl/.json), image folder, or data YAML")
    p.add_argument("--root", default=None, help="base directory for relative image paths (relative to the current directory)")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--resolution", type=int, required=True, help="stage resolution (buckets, spec §5)")
    p.add_argument("--patch", type=int, default=16, help="VAE factor × DiT patch size (default 16)")
    p.add_argument("--max-aspect", type=float, default=4.0)
    p.add_argument("--vae", default="pixel",
                   help="'pixel' (identity), a local AutoencoderKL folder (e.g. FLUX vae) or a conv autoencoder folder")
    p.add_argument("--scaling-factor", type=float, default=None,
                   help="latent scale instead of the autoencoder config's (a recipe's autoencoder.scaling_factor)")
    p.add_argument("--shift-factor", type=float, default=None,
                   help="latent shift instead of the autoencoder config's (a recipe's autoencoder.shift_factor)")
    p.add_argument("--text-encoder", required=True, help="local model folder (e.g. gemma-2-2b) or 'minilm'")
    p.add_argument("--max-length", type=int, default=256, help="text encoder token cap (official 256)")
    p.add_argument("--prompt-template", default="none",
                   help="'none' = encode the caption alone (default); 'record' = prepend each record's system "
                        "template (else --default-system); or a template name (real, align, base, ...) for all")
    p.add_argument("--default-system", default="align",
                   help="template for records without one (with 'record'); a recipe trains from the cache when "
                        "this is its data.system, else its objective.system (default align, the recipe default)")
    p.add_argument("--levels", type=_csv, default=None, help="caption levels to encode (default: all present)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=512, help="items per safetensors shard")
    p.add_argument("--append", action="store_true", help="add to an existing cache (same encoders required)")
    p.add_argument("--feature-dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--latent-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-size-policy", default="upscale", choices=("upscale", "skip"))
    p.add_argument("--max-skip-rate", type=float, default=0.05)

    p = sub.add_parser("inspect", help="counts per bucket, caption level, source and skip reason")
    p.add_argument("data", nargs="?", help="manifest (.jsonl/.json), image folder, or data YAML")
    p.add_argument("--cache", default=None, help="inspect a cache directory instead")
    p.add_argument("--root", default=None)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--max-aspect", type=float, default=4.0)
    p.add_argument("--weights", type=_weights, default={}, help="caption weights, e.g. short=0.5,long=0.5")
    p.add_argument("--min-size-policy", default="upscale", choices=("upscale", "skip"))
    p.add_argument("--decode", action="store_true", help="also decode every image (finds truncated files)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="per-rank batch size to check for buckets that never fill a batch (default 16, the recipe "
                        "default; with drop_last their records are never trained on)")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _cmd_synth(args: argparse.Namespace) -> int:
    import time

    from .synth import DEFAULT_HOLDOUT, DEFAULT_SHAPES, TAGS, generate_synthetic

    from lumina_lightning.cli import check_output

    check_output(args.out, "--out")
    start = time.perf_counter()
    out = generate_synthetic(
        args.out, args.n, args.size, args.seed, n_test=args.n_test, aspects=args.aspect,
        holdout=DEFAULT_HOLDOUT if args.holdout is None else args.holdout, tags=args.tags or TAGS,
        shapes=args.shapes or DEFAULT_SHAPES, workers=args.workers, progress=True,
        origin="cli",  # the user's set: a recipe's data.synthetic never regenerates it (ensure_synthetic)
    )
    took = time.perf_counter() - start
    print(f"wrote {out.n_train} train + {out.n_test} test images to {out.root} in {took:.1f} s")
    print(f"  train manifest: {out.train}\n  test manifest:  {out.test}\n  GenEval prompts: {out.test_geneval}")
    return 0


def _prompt_fn(template: str, default_system: str):
    from lumina_lightning.encoders.text import build_prompt, system_prompt

    if template == "none":
        return None, "caption"
    if template == "record":
        def record_prompt(caption: str, system: str | None) -> str:
            return build_prompt(caption, system or default_system)

        return record_prompt, f"record:{default_system}"
    system_prompt(template)  # validates the name

    def fixed_prompt(caption: str, system: str | None) -> str:
        return build_prompt(caption, template)

    return fixed_prompt, f"fixed:{template}"


def _cmd_cache(args: argparse.Namespace) -> int:
    from lumina_lightning.encoders.autoencoder import autoencoder_from_path
    from lumina_lightning.encoders.text import HFTextEncoder, resolve_text_encoder_path

    from lumina_lightning.cli import check_input, check_output
    from lumina_lightning.sampling.cli import resolve_device

    from .cache import INDEX_NAME, build_cache
    from .config import DataConfig

    # the inputs and the device before the encoders load (minutes for a large text encoder)
    check_input(args.data, "--data", kind=None)
    check_output(args.out, "--out")
    for flag, value in (("--batch-size", args.batch_size), ("--shard-size", args.shard_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if (Path(args.out) / INDEX_NAME).exists() and not args.append:  # build_cache says so too, after the loads
        raise ValueError(f"--out {args.out} already holds a cache; pass --append to add to it, or choose another --out")
    args.device = resolve_device(args.device)
    cfg = DataConfig(path=args.data, root=args.root, resolution=args.resolution, patch=args.patch,
                     max_aspect=args.max_aspect, min_size_policy=args.min_size_policy,
                     max_skip_rate=args.max_skip_rate)
    # a recipe's autoencoder.scaling_factor / shift_factor are part of the cache identity it checks
    factors = {k: v for k, v in (("scaling_factor", args.scaling_factor), ("shift_factor", args.shift_factor))
               if v is not None}
    vae = autoencoder_from_path(args.vae, **factors)
    vae.to(args.device)
    text = HFTextEncoder(resolve_text_encoder_path(args.text_encoder), max_length=args.max_length).to(args.device)
    prompt_fn, prompt_id = _prompt_fn(args.prompt_template, args.default_system)
    index = build_cache(cfg, args.out, autoencoder=vae, text_encoder=text, batch_size=args.batch_size,
                        prompt_fn=prompt_fn, prompt_id=prompt_id, levels=args.levels, shard_size=args.shard_size,
                        append=args.append, feature_dtype=args.feature_dtype, latent_dtype=args.latent_dtype,
                        device=args.device, progress=True)
    from .cache import read_index

    info = read_index(index.parent)
    print(f"cache {index.parent}: {len(info['items'])} items in {len(info['shards'])} shard(s)")
    skipped = info["skips"].get("skipped", {})
    if skipped:
        print("  skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    return 0


def _table(title: str, rows: list[tuple[str, Any]]) -> None:
    print(title)
    if not rows:
        print("  (none)")
        return
    width = max(len(str(k)) for k, _ in rows)
    for key, value in rows:
        print(f"  {str(key).ljust(width)}  {value}")


def _cmd_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from .captions import available_levels, choose_caption
    from .config import DataConfig
    from .dataset import build_plan
    from .skips import SkipCounter

    if args.cache:
        from .cache import CachedDataset

        ds = CachedDataset(args.cache)
        plan, cfg = ds.plan, ds.cfg
        cfg.caption_weights = dict(args.weights)
        print(f"cache {args.cache}: identity {ds.identity}")
    else:
        if not args.data:
            print("lumina data inspect: give a manifest/folder/data YAML or --cache DIR", file=sys.stderr)
            return 2
        from .records import load_records

        cfg = DataConfig(path=args.data, root=args.root, resolution=args.resolution, patch=args.patch,
                         max_aspect=args.max_aspect, caption_weights=dict(args.weights),
                         min_size_policy=args.min_size_policy, max_skip_rate=1.0)
        plan = build_plan(load_records(args.data, root=args.root), cfg, progress=True)
    records = plan.records
    print(f"{len(records)} records from {len(records.sources)} source(s) at resolution {cfg.resolution}")
    def per_epoch(size: int, ratio: float) -> int:  # as RecordSet.epoch_indices lists them
        whole = int(np.floor(ratio)) if ratio > 0 else 0
        return whole * size + (int(round((ratio - whole) * size)) if ratio > 0 else 0)

    _table("sources (records, ratio, per-epoch samples):",
           [(s.name, f"{s.size} x {s.ratio:g} = {per_epoch(s.size, s.ratio)}") for s in records.sources])
    counts = plan.bucket_counts()
    total = max(1, sum(counts.values()))
    _table("buckets (w x h: records):",
           [(f"{w}x{h}", f"{n} ({n / total:.1%})") for (w, h), n in sorted(counts.items(), key=lambda kv: -kv[1])])
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    small = plan.small_buckets(args.batch_size, args.seed, 0)
    _table(f"buckets with fewer than --batch-size {args.batch_size} samples per epoch (never trained on with "
           f"drop_last: {sum(small.values())} records):",
           [(f"{w}x{h}", f"{n} records") for (w, h), n in sorted(small.items(), key=lambda kv: kv[1])])
    have: Counter = Counter()
    chosen: Counter = Counter()
    for i, rec in enumerate(records.records):
        have.update(available_levels(rec.captions))
        if plan.bucket_ids[i] >= 0:
            pick = choose_caption(rec.captions, cfg.caption_weights, cfg.caption_fallback, seed=args.seed, index=i)
            if pick:
                chosen[pick[0]] += 1
    _table("caption levels (records that have it):", sorted(have.items(), key=lambda kv: -kv[1]))
    _table(f"caption level chosen in epoch 0 (weights {cfg.caption_weights or 'uniform'}):",
           sorted(chosen.items(), key=lambda kv: -kv[1]))
    skips = SkipCounter()
    skips.merge(plan.skips.report())
    if args.decode and not args.cache:
        from .dataset import ImageTextDataset
        from .skips import BadSample

        ds = ImageTextDataset(plan, cfg, args.seed)
        runtime = SkipCounter()
        from tqdm import tqdm

        # each record on its own (no substitutes, no fallback to other records), at its own bucket
        for i in tqdm(np.flatnonzero(plan.bucket_ids >= 0).tolist(), desc="decoding", unit="img"):
            try:
                ds._load_one(0, i, plan.buckets[int(plan.bucket_ids[i])], runtime)
            except BadSample as err:
                runtime.add(err.reason, str(err), seen=False)
        # the plan already counted every record as seen and each upscale from the header sizes
        skips.merge({"skipped": dict(runtime.skipped), "examples": runtime.examples})
    _table("skipped (reason: count, example):",
           [(r, f"{n}  e.g. {skips.examples.get(r, ['?'])[0]}") for r, n in skips.skipped.most_common()])
    _table("events:", sorted(skips.events.items()))
    print(skips.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lumina data``; returns a process exit code."""
    args = build_parser().parse_args(argv)
    from .records import ManifestError
    from .skips import SkipRateExceeded

    handlers = {"synth": _cmd_synth, "cache": _cmd_cache, "inspect": _cmd_inspect}
    try:
        return handlers[args.command](args)
    except (ManifestError, SkipRateExceeded, OSError, ImportError, ValueError, KeyError, RuntimeError) as err:
        # OSError: also what transformers / diffusers raise for a --vae / --text-encoder folder without
        # its config or weights; their message names the folder and the missing file
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lumina data {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
