"""Data-loading speed vs. what a tiny training step consumes (not a test).

Measures images/s of

* the image path: PNG decode → bucket (resize-to-cover + centre crop) → one-bucket batch, with
  0 and 2 worker processes, on the synthetic dataset at 64 px and 256 px;
* the cached path: the same batches read from an offline cache (latents + caption features): at
  64 px made with the pixel autoencoder (the tiny pixel-space recipe), at 256 px with a tiny random
  FLUX-shaped VAE (factor 8, 16 channels), so the cached latents have the real shapes;
* a tiny training step: forward + backward + AdamW step of the smallest Next-DiT factory
  (``NextDiT_debug``; a clearly labelled stand-in transformer if the model package is missing),
  at 64 px in pixel space (pixel autoencoder) and at "256 px" as 16×32×32 VAE-like latents (the VAE
  itself is not timed, which favours the training side).

and prints the loader/step ratio (the target is ≥ 5×). Every figure is the best of ``--repeats``
runs, because shared CPU machines are noisy. On a 2-core machine the loader workers and the
training step share the same cores, so the ratio is an upper bound of the real headroom. The first
line printed is the command line that reproduces the run (to paste under a table made from it).

``--recipe-step`` adds the step the tiny recipes really train (``NextDiT_mini``, patch 4, MiniLM
features, 16 and 32 px) and its ratios to the 64 px loaders; the default consumer above is
``NextDiT_debug`` at 64 px, which is not what those recipes train.

    python benchmarks/data_speed.py [--quick] [--batch-size 16] [--workdir DIR] [--recipe-step]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lumina_lightning.data.config import DataConfig
from lumina_lightning.data.loader import build_dataloader
from lumina_lightning.data.synth import generate_synthetic


def _loader_rate(cfg: DataConfig, batch_size: int, workers: int, batches: int,
                 warm: bool = False) -> tuple[float, float]:
    """(images/s after the first batch, seconds to the first batch); ``warm``: after one full epoch
    (what ``data.memory_cache_mb`` serves from memory)."""
    loader = build_dataloader(cfg, batch_size=batch_size, seed=0, num_workers=workers)
    if warm:
        for _ in loader:
            pass
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += len(batch["indices"])
    rate = n / (time.perf_counter() - start)
    shutdown = getattr(it, "_shutdown_workers", None)  # do not leave idle workers behind
    if shutdown is not None:
        shutdown()
    return rate, first


def _tiny_model(in_channels: int, cap_dim: int):
    try:
        from lumina_lightning.models import NextDiT_debug

        return NextDiT_debug(in_channels=in_channels, cap_feat_dim=cap_dim), "NextDiT_debug"
    except ImportError:
        return _StandIn(in_channels, cap_dim), "STAND-IN 2-layer transformer (lumina_lightning.models missing)"


class _StandIn(torch.nn.Module):
    """A 2-layer transformer over 2×2 patches + caption tokens, used only if NextDiT is unavailable."""

    def __init__(self, in_channels: int, cap_dim: int, dim: int = 32):
        super().__init__()
        self.inp = torch.nn.Linear(4 * in_channels, dim)
        self.cap = torch.nn.Linear(cap_dim, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, 2, 4 * dim, batch_first=True)
        self.body = torch.nn.TransformerEncoder(layer, 2)
        self.out = torch.nn.Linear(dim, 4 * in_channels)

    def forward(self, x, t, cap_feats, cap_mask):
        b, c, h, w = x.shape
        p = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)
        seq = torch.cat([self.cap(cap_feats), self.inp(p)], dim=1)
        y = self.out(self.body(seq)[:, cap_feats.shape[1]:])
        return y.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# what recipes/base/tiny.yaml trains: NextDiT_mini, patch 4 on pixels, MiniLM features (384-d, 64 tokens)
RECIPE_MODEL = dict(in_channels=3, cap_feat_dim=384, patch_size=4)
RECIPE_CAP_LEN = 64


def _recipe_model():
    from lumina_lightning.models import NextDiT_mini

    return NextDiT_mini(**RECIPE_MODEL), "NextDiT_mini patch 4, the tiny recipes' model"


def _step_rate(in_channels: int, side: int, batch_size: int, steps: int, recipe: bool = False) -> tuple[float, str]:
    """Images/s consumed by forward+backward+AdamW of the tiny model on B×C×side×side inputs;
    ``recipe``: of the tiny recipes' own model and caption shape instead (``--recipe-step``)."""
    torch.manual_seed(0)
    model, name = _recipe_model() if recipe else _tiny_model(in_channels, 32)
    cap_dim, cap_len = (RECIPE_MODEL["cap_feat_dim"], RECIPE_CAP_LEN) if recipe else (32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, in_channels, side, side)
    cap = torch.randn(batch_size, cap_len, cap_dim)
    mask = torch.ones(batch_size, cap_len, dtype=torch.bool)

    def step():
        t = torch.rand(batch_size)
        loss = (model(x, t, cap, mask) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - start), name


def _vae_rate(vae_dir: Path, side: int, batch_size: int, steps: int) -> tuple[float, str]:
    """Images/s of the tiny VAE's encode (what an on-the-fly training step adds for pixel batches)."""
    from lumina_lightning.encoders import DiffusersVAE

    vae = DiffusersVAE(vae_dir)
    x = torch.rand(batch_size, 3, side, side) * 2 - 1
    vae.encode(x)
    start = time.perf_counter()
    for _ in range(steps):
        vae.encode(x)
    return batch_size * steps / (time.perf_counter() - start), ""


def _cache(train: Path, out: Path, resolution: int, workdir: Path) -> float:
    from lumina_lightning.data.cache import build_cache
    from lumina_lightning.encoders import (
        DiffusersVAE,
        HFTextEncoder,
        PixelAutoencoder,
        build_tiny_text_encoder,
        build_tiny_vae,
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny Gemma is much faster single-threaded on 2 cores
    try:
        te_dir = workdir / "tiny_te"
        if not te_dir.exists():
            build_tiny_text_encoder(te_dir)
        if resolution <= 64:
            vae = PixelAutoencoder()
        else:
            vae_dir = workdir / "tiny_vae"
            if not vae_dir.exists():
                build_tiny_vae(vae_dir, latent_channels=16)
            vae = DiffusersVAE(vae_dir)
        start = time.perf_counter()
        build_cache(DataConfig(path=str(train), resolution=resolution), out, autoencoder=vae,
                    text_encoder=HFTextEncoder(str(te_dir)), batch_size=32, levels=["short", "long"])
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def command_line(argv: list[str] | None) -> str:
    """See :func:`lumina_lightning.cli.reproducing_command`."""
    from lumina_lightning.cli import reproducing_command

    return reproducing_command(__file__, argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and batches")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workdir", default=None, help="keep generated data here (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many runs")
    parser.add_argument("--recipe-step", action="store_true",
                        help="also time the step the tiny recipes train (NextDiT_mini, patch 4, 16 and 32 px)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in this process (default 1: on small shared machines two "
                             "spin-waiting threads make timings swing by 10x or more)")
    args = parser.parse_args(argv)
    print(command_line(argv))
    torch.set_num_threads(args.threads)
    bs = args.batch_size
    n64, n256 = (512, 128) if args.quick else (1024, 256)
    batches = {64: 10 if args.quick else 40, 256: 4 if args.quick else 12}
    best = lambda fn: max((fn() for _ in range(args.repeats)), key=lambda r: r[0])  # noqa: E731
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lumina_data_speed_"))
    workdir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{load:.2f}; batch size {bs}; best of {args.repeats}; workdir {workdir}")
    rows: list[tuple[str, str, float, str]] = []
    rates: dict[tuple[int, str], float] = {}
    try:
        sets = {}
        for res, n in ((64, n64), (256, n256)):
            start = time.perf_counter()
            sets[res] = generate_synthetic(workdir / f"synth{res}", n, size=res, seed=0, n_test=6).train
            rows.append((f"synth render {res}px", "-", n / (time.perf_counter() - start), ""))
        for res in (64, 256):
            for workers in (0, 2):
                cfg = DataConfig(path=str(sets[res]), resolution=res)
                rate, first = best(lambda: _loader_rate(cfg, bs, workers, batches[res]))
                rates[(res, f"images w{workers}")] = rate
                rows.append((f"decode→bucket→batch {res}px", str(workers), rate, f"first batch {first:.2f}s"))
            # the same after one epoch with the decoded-image memory cache (data.memory_cache_mb)
            cfg = DataConfig(path=str(sets[res]), resolution=res, memory_cache_mb=1024)
            rate, _ = best(lambda: _loader_rate(cfg, bs, 0, batches[res], warm=True))
            rates[(res, "memory w0")] = rate
            rows.append((f"decode→bucket→batch {res}px, memory cache", "0", rate, "second epoch on"))
        for res in (64, 256):
            cache_dir = workdir / f"cache{res}"
            if cache_dir.exists():
                shutil.rmtree(cache_dir)
            took = _cache(sets[res], cache_dir, res, workdir)
            n = n64 if res == 64 else n256
            kind = "pixel AE" if res <= 64 else "tiny 16-ch VAE"
            rows.append((f"cache build {res}px ({kind}, tiny Gemma)", "-", n / took, ""))
            for workers in (0, 2):
                cfg = DataConfig(cache_dir=str(cache_dir), resolution=res)
                rate, first = best(lambda: _loader_rate(cfg, bs, workers, batches[res]))
                rates[(res, f"cached w{workers}")] = rate
                rows.append((f"cached latents+features {res}px", str(workers), rate, f"first batch {first:.2f}s"))
        steps = {64: 2 if args.quick else 5, 256: 5 if args.quick else 20}
        step64, name = best(lambda: _step_rate(3, 64, bs, steps[64]))
        step256, _ = best(lambda: _step_rate(16, 32, bs, steps[256]))
        vae256, _ = best(lambda: _vae_rate(workdir / "tiny_vae", 256, bs, 2 if args.quick else 4))
        onthefly256 = 1.0 / (1.0 / vae256 + 1.0 / step256)
        rows.append((f"train step 64px pixel space ({name})", "-", step64, "fwd+bwd+AdamW"))
        rows.append((f"train step 256px on 16x32x32 latents ({name})", "-", step256, "fwd+bwd+AdamW (cached path)"))
        rows.append(("tiny 16-ch VAE encode 256px", "-", vae256, "on-the-fly encode of pixel batches"))
        rows.append(("train step 256px from pixels (VAE encode + step)", "-", onthefly256, "(image path)"))
        recipe_steps = {}
        for side in (16, 32) if args.recipe_step else ():
            recipe_steps[side], recipe_name = best(lambda side=side: _step_rate(3, side, bs, steps[256], recipe=True))
            rows.append((f"train step {side}px pixel space ({recipe_name})", "-", recipe_steps[side], "fwd+bwd+AdamW"))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    print(f"\n{'path'.ljust(width)}  workers  images/s  note")
    for name_, workers, rate, note in rows:
        print(f"{name_.ljust(width)}  {workers:>7}  {rate:8.0f}  {note}")
    print("\nloader / tiny-step ratio (target >= 5x); the image path at 256 px feeds a step that must also run")
    print("the VAE, the cached path a step on latents; at 64 px the pixel autoencoder is the identity:")
    consumers = {(64, "images"): step64, (64, "cached"): step64, (256, "images"): onthefly256, (256, "cached"): step256,
                 (64, "memory"): step64, (256, "memory"): onthefly256}
    for res in (64, 256):
        for key in ("images w0", "images w2", "memory w0", "cached w0", "cached w2"):
            ratio = rates[(res, key)] / consumers[(res, key.split()[0])]
            verdict = "ok" if ratio >= 5 else "BELOW 5x"
            print(f"  {res:>3}px {key:<10} {ratio:6.1f}x  {verdict}")
    if recipe_steps:
        # the tiny recipes decode the same 64 px PNGs (0 workers, memory cache on) and bucket them
        # smaller, which is cheaper: the 64 px loader's rate is a lower bound of theirs
        print("\nthe tiny recipes' own step against the 64 px image loaders (a lower bound: they bucket to 16/32 px):")
        for side, rate in recipe_steps.items():
            for key in ("images w0", "memory w0"):
                ratio = rates[(64, key)] / rate
                print(f"  {side:>3}px {key:<10} {ratio:6.1f}x  {'ok' if ratio >= 5 else 'BELOW 5x'}")
    if "STAND-IN" in name:
        print("\nNOTE: the training step was timed with a STAND-IN model, not NextDiT.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
