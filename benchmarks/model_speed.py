"""Our Next-DiT vs diffusers' Lumina2Transformer2DModel: same config, same weights, same inputs.

Measures, in one run and side by side:
* forward and forward+backward wall time (median of timed repeats after warm-up, the two models
  called alternately so both see the same machine state), CPU fp32 always, CUDA bf16 where a GPU exists;
* on CUDA, the achieved TFLOP/s of each model's forward+backward (FLOPs counted once with
  ``torch.utils.flop_counter.FlopCounterMode``: matmuls and attention, 3x the forward for the step);
* activation memory kept for backward (bytes of tensors autograd saves, counted with
  ``torch.autograd.graph.saved_tensors_hooks``), with and without gradient checkpointing — a
  device-independent measure of what checkpointing saves; on CUDA also peak allocated memory.

Prints the command line that reproduces the run (to paste under a table made from it), a table and
the ratios diffusers/ours (speed) and plain/checkpointed (memory). The table's ``padded_tokens`` says
how many caption tokens of each sample are padding ("mixed" captions; see ``caption_padding``).

    python benchmarks/model_speed.py                 # default mid-size config
    python benchmarks/model_speed.py --preset 2b-2layers --latent 64
    python benchmarks/model_speed.py --preset tiny --batch 16 --latent 16 --cap-len 32 --threads 1
    python benchmarks/model_speed.py --preset 2b --devices cuda --batch 2 --latent 64 --cap-len 128

On CPU, glibc's malloc returns large freed blocks to the OS and page-faults them back on the next
step, which costs both models 20-40% at these sizes and makes ratios noisy; we run with
``MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000`` (or jemalloc/tcmalloc preloaded).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lumina_lightning.models import NextDiT, NextDiTConfig
from lumina_lightning.models.convert import config_to_diffusers, official_to_diffusers

PRESETS = {
    # the CPU training regime of the tiny recipes (NextDiT_tiny widths, 16 latent channels)
    "tiny": dict(dim=128, n_layers=4, n_refiner_layers=1, n_heads=4, n_kv_heads=2, multiple_of=64,
                 cap_feat_dim=384, in_channels=16, axes_dims=[8, 12, 12]),
    # a width where matmuls dominate on CPU, 8 blocks, GQA 2:1
    "mid": dict(dim=512, n_layers=8, n_refiner_layers=2, n_heads=8, n_kv_heads=4, multiple_of=64,
                cap_feat_dim=256, in_channels=16, axes_dims=[20, 22, 22]),
    # the released block shapes (2304 wide, 24/8 heads) with few layers, to fit a CPU benchmark
    "2b-2layers": dict(dim=2304, n_layers=2, n_refiner_layers=1, n_heads=24, n_kv_heads=8, multiple_of=256,
                       cap_feat_dim=2304, in_channels=16, axes_dims=[32, 32, 32]),
    # the released NextDiT_2B_GQA_patch2_Adaln_Refiner (GPU only: --devices cuda)
    "2b": dict(dim=2304, n_layers=26, n_refiner_layers=2, n_heads=24, n_kv_heads=8, multiple_of=256,
               cap_feat_dim=2304, in_channels=16, axes_dims=[32, 32, 32]),
}


def build_pair(cfg: NextDiTConfig, device: str, dtype: torch.dtype):
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):  # a 2.6B pair is built on the GPU directly, not in host memory first
        ours = NextDiT(cfg)
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0, 0.02)
        kwargs = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
        theirs = Lumina2Transformer2DModel(**kwargs)
    theirs.load_state_dict(official_to_diffusers(ours.state_dict(), cfg))
    return ours.to(device, dtype), theirs.to(device, dtype)


def caption_padding(batch: int, cap_len: int) -> list[int]:
    """Padding tokens of each sample in the "mixed captions" batch.

    Sample i loses i/(2*batch) of its caption, so the first keeps all ``cap_len`` tokens (the batch's
    padded length is its longest caption's) and the others differ. A batch of one has no second
    length to differ from: its caption loses half, or "mixed" would silently re-measure "equal".
    """
    if batch == 1:
        return [cap_len // 2]
    return [(i * cap_len) // (2 * batch) for i in range(batch)]


def padding_label(pads: list[int], cap_len: int) -> str:
    """``0/16/32/48 of 64`` (one number where every sample has the same): the table's record of
    what a row's captions were."""
    return ("/".join(map(str, pads)) if len(set(pads)) > 1 else str(pads[0])) + f" of {cap_len}"


def inputs(cfg: NextDiTConfig, batch: int, latent: int, cap_len: int, device: str, dtype: torch.dtype, padded: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(device, dtype)
    t = torch.rand(batch, generator=g).to(device, dtype)
    feats = torch.randn(batch, cap_len, cfg.cap_feat_dim, generator=g).to(device, dtype)
    mask = torch.ones(batch, cap_len, dtype=torch.bool, device=device)
    if padded:  # realistic batch: caption lengths differ (right padding, as the tokenizer's mask)
        for i, pad in enumerate(caption_padding(batch, cap_len)):
            mask[i, cap_len - pad:] = False
    return x, t, feats, mask


def call(model, args, is_ours: bool):
    out = model(*args)
    return out if is_ours else out.sample


def timed_ab(fns: list, repeats: int, warmup: int, device: str) -> list[float]:
    """Median wall time of each function, timed **interleaved** (A, B, A, B, ...).

    Timing one model's repeats and then the other's lets drift between the two windows (CPU
    frequency, neighbours on a shared host, allocator state) decide the ratio; alternating the
    calls exposes both models to the same conditions.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            acc.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def saved_activation_bytes(model, args, is_ours: bool) -> int:
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call(model, args, is_ours)
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return total


def set_checkpointing(model, is_ours: bool, enabled: bool) -> None:
    if is_ours:
        model.set_gradient_checkpointing(enabled)
    elif enabled:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()


def forward_flops(model, args, is_ours: bool) -> int:
    """FLOPs of one forward (matmuls + attention), as torch's flop counter sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        call(model, args, is_ours)
    return counter.get_total_flops()


def bench(device: str, dtype: torch.dtype, cfg: NextDiTConfig, a) -> list[dict]:
    ours, theirs = build_pair(cfg, device, dtype)
    rows = []
    for padded in (False, True):
        args = inputs(cfg, a.batch, a.latent, a.cap_len, device, dtype, padded)
        with torch.no_grad():
            diff = (call(ours, args, True).float() - call(theirs, args, False).float()).abs().max().item()
        # the same useful work for both, counted on diffusers' model: torch's flop counter has no
        # formula for SDPA's enable_gqa (ours) before torch 2.12, and diffusers repeats K/V instead
        flops = forward_flops(theirs, args, False) if device == "cuda" else 0
        pair = (("ours", ours, True), ("diffusers", theirs, False))

        def fwd_fn(model, is_ours):
            def fwd():
                with torch.no_grad():
                    call(model, args, is_ours)
            return fwd

        def step_fn(model, is_ours):
            def step():
                call(model, args, is_ours).float().square().mean().backward()
                model.zero_grad(set_to_none=True)
            return step

        fwd_s = timed_ab([fwd_fn(m, o) for _, m, o in pair], a.repeats, a.warmup, device)
        step_s = timed_ab([step_fn(m, o) for _, m, o in pair], a.repeats, a.warmup, device)
        for (name, model, is_ours), f_s, s_s in zip(pair, fwd_s, step_s):
            pads = caption_padding(a.batch, a.cap_len) if padded else [0] * a.batch
            row = dict(device=device, dtype=str(dtype).replace("torch.", ""), captions="mixed" if padded else "equal",
                       padded_tokens=padding_label(pads, a.cap_len), model=name, fwd_ms=1000 * f_s,
                       step_ms=1000 * s_s, max_abs_diff=diff)
            if flops:
                row["step_TFLOPs"] = 3 * flops / s_s / 1e12
            for ckpt in (False, True):
                set_checkpointing(model, is_ours, ckpt)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                row[f"act_MB_ckpt={ckpt}"] = saved_activation_bytes(model, args, is_ours) / 2**20
                if device == "cuda":
                    row[f"peak_MB_ckpt={ckpt}"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                set_checkpointing(model, is_ours, False)
            rows.append(row)
    return rows


# environment variables that change these timings (see the module docstring), repeated in the command line
TIMING_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "OMP_NUM_THREADS")


def command_line(argv: list[str] | None) -> str:
    """See :func:`lumina_lightning.cli.reproducing_command`."""
    from lumina_lightning.cli import reproducing_command

    return reproducing_command(__file__, argv, TIMING_ENV)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mid", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--latent", type=int, default=32, help="latent side (tokens = (latent/2)^2)")
    p.add_argument("--cap-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--devices", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CPU fp32, plus CUDA bf16 where a GPU exists")
    a = p.parse_args(argv)
    print(command_line(argv))
    if a.devices == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--devices cuda: no CUDA GPU here")
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = NextDiTConfig(**PRESETS[a.preset])
    print(f"config {a.preset}: dim={cfg.dim} layers={cfg.n_layers}+2x{cfg.n_refiner_layers} heads={cfg.n_heads}/"
          f"{cfg.n_kv_heads}; batch {a.batch}, {(a.latent // 2) ** 2} image + {a.cap_len} caption tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    rows = bench("cpu", torch.float32, cfg, a) if a.devices in ("auto", "cpu") else []
    if a.devices == "cuda" or (a.devices == "auto" and torch.cuda.is_available()):
        rows += bench("cuda", torch.bfloat16, cfg, a)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")
    print()
    for i in range(0, len(rows), 2):
        o, d = rows[i], rows[i + 1]
        print(f"{o['device']}/{o['dtype']}/{o['captions']} captions: diffusers/ours forward "
              f"{d['fwd_ms'] / o['fwd_ms']:.2f}x, fwd+bwd {d['step_ms'] / o['step_ms']:.2f}x; "
              f"checkpointing keeps {o['act_MB_ckpt=True'] / o['act_MB_ckpt=False']:.1%} of our activation memory "
              f"(diffusers {d['act_MB_ckpt=True'] / d['act_MB_ckpt=False']:.1%}); max |ours-diffusers| {o['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
