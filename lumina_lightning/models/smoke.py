"""``lumina smoke``: build a Next-DiT size and run one timed forward/backward on random inputs.

A quick check that an install works (and how fast a size runs here) before any data or weights.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lumina smoke", description=__doc__)
    p.add_argument("--size", default="NextDiT_tiny", help="a named size (see lumina_lightning.models.SIZES)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=32, help="latent side length (pixels / VAE factor)")
    p.add_argument("--caption-len", type=int, default=32)
    p.add_argument("--meta", action="store_true", help="only build on the meta device and count parameters")
    args = p.parse_args(argv)

    import torch

    from lumina_lightning.models import FACTORIES, config_for

    # refused here with a message, not by a KeyError or a shape error deep in the forward pass
    if args.size not in FACTORIES:
        p.error(f"--size {args.size!r} is not a named size; choose one of {', '.join(sorted(FACTORIES))}")
    for flag, value in (("--batch", args.batch), ("--caption-len", args.caption_len), ("--latent", args.latent)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    cfg = config_for(args.size)
    if args.latent % cfg.patch_size:
        p.error(f"--latent must be a multiple of the patch size {cfg.patch_size} of {args.size}, got {args.latent}")
    # the RoPE tables bound both (spec §1.4); the forward pass would only fail deep inside
    if args.caption_len > cfg.max_caption_len:
        p.error(f"--caption-len must be <= {cfg.max_caption_len} for {args.size}, got {args.caption_len}")
    max_latent = cfg.patch_size * min(cfg.axes_lens[1], cfg.axes_lens[2])
    if args.latent > max_latent:
        p.error(f"--latent must be <= {max_latent} for {args.size} (its RoPE tables), got {args.latent}")
    if args.meta:
        with torch.device("meta"):
            model = FACTORIES[args.size]()
        print(f"{args.size}: {model.parameter_count():,} parameters (meta device, nothing allocated)")
        return 0
    model = FACTORIES[args.size]()
    x = torch.randn(args.batch, cfg.in_channels, args.latent, args.latent)
    t = torch.rand(args.batch)
    feats = torch.randn(args.batch, args.caption_len, cfg.cap_feat_dim)
    mask = torch.ones(args.batch, args.caption_len, dtype=torch.bool)
    mask[0, args.caption_len // 2:] = False  # mixed caption lengths, like a real batch
    start = time.perf_counter()
    out = model(x, t, feats, mask)
    fwd = time.perf_counter() - start
    out.square().mean().backward()
    total = time.perf_counter() - start
    grads = sum(1 for q in model.parameters() if q.grad is not None)
    print(
        f"{args.size}: {model.parameter_count():,} params | output {tuple(out.shape)} | "
        f"forward {fwd * 1000:.1f} ms, forward+backward {total * 1000:.1f} ms | {grads} tensors got gradients"
    )
    return 0
