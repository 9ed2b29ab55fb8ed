"""How the tiny pipeline's scores scale with training compute (a benchmark, not a test).

Runs ``recipes/tiny/pipeline.yaml`` — the same stages, objective, sampler and mini-GenEval — at
several compute multiples side by side, one process per variant, and prints mini-GenEval per stage,
validation loss and wall times. It answers a question the 15-minute CPU pipeline cannot: whether the
recipe reaches issue 8's targets at all with more training, and at what multiple of the CPU budget.

A variant is named by ``_``-separated parts, each optional:

* ``kN``   every stage's step count (and its checkpoint / validation intervals) × N; warm-up unchanged;
* ``bN``   batch size N (the recipe's is 16);
* ``wide`` a wider, deeper Next-DiT: dim 192, 6 main blocks, 6 heads (3 KV heads); 5.7M parameters
  against the recipe's 1.1M.

e.g. ``k1`` is the pipeline as shipped, ``k4_b64`` four times the steps at four times the batch
(16× the images seen). Each variant writes ``OUT/<variant>/`` (its stages' runs, evaluation and
``summary.json``) and ``OUT/<variant>.log``; the table goes to stdout and ``OUT/scaling.md``. The
first line printed is the command line that reproduces the run (to paste under a table made from
it); under the table, the last lines of the log of each variant that did not finish.

Variants share one synthetic dataset (generated first, where the pipeline file says) and run with
MLflow tracking off (one sqlite store written by several processes at once would lock). Training
runs on ``--accelerator``; with ``gpu``, evaluation and TeaCache calibration run there too
(``eval.device=cuda``, still in fp32, so scores differ from a CPU run's by kernel rounding only).

Budget it: the tiny model's training step is bound by the host, not the GPU. Measured on one H100
(2026-11-27): the 5.7M-parameter ``wide`` model at batch 64 trains at 14 steps/s alone (8 in stage
2, whose pooled loss is a second forward); five variants side by side time-slice the GPU, and each
ran at 9-16 steps/s: the shipped recipe (``k1``) still trained in 193 s against 450 s on 2 CPU
cores, but a ``k4`` variant needs about 13 minutes that way.

Usage:  python benchmarks/pipeline_scaling.py --out DIR [--variants k1,k4,k1_b64,k4_b64]
            [--accelerator cpu|gpu] [--threads 2] [--text-encoder PATH] [--timeout S] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lumina_lightning.data.synth import TAGS

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "recipes" / "tiny" / "pipeline.yaml"
WIDE = {"dim": 192, "n_layers": 6, "n_heads": 6, "n_kv_heads": 3}
# a stage's step-count keys that scale with `kN` (warm-up does not: it is about the start of training)
STEP_KEYS = ("trainer.max_steps", "trainer.checkpoint_every_n_steps", "validation.every_n_steps",
             "validation.sample_every_n_steps")
LOG_TAIL = 15  # lines of a failed variant's log shown on the console: enough for a Python traceback's end


def parse_variant(name: str) -> dict[str, Any]:
    """``k4_b64_wide`` -> {"k": 4, "batch": 64, "wide": True}; unknown parts are an error."""
    spec: dict[str, Any] = {"k": 1.0, "batch": None, "wide": False}
    for part in name.split("_"):
        if m := re.fullmatch(r"k(\d+(?:\.\d+)?)", part):
            spec["k"] = float(m.group(1))
        elif m := re.fullmatch(r"b(\d+)", part):
            spec["batch"] = int(m.group(1))
        elif part == "wide":
            spec["wide"] = True
        else:
            raise SystemExit(f"variant {name!r}: unknown part {part!r} (use kN, bN, wide)")
    return spec


def stage_overrides(recipe: str, spec: dict[str, Any]) -> list[str]:
    """The dotted overrides that turn one stage of the shipped pipeline into the variant's (its step
    counts are the stage's own, hence per stage)."""
    from lumina_lightning.training.recipe import load_recipe

    cfg = load_recipe(recipe).config
    out = []
    if spec["k"] != 1.0:
        for key in STEP_KEYS:
            section, field = key.split(".")
            value = getattr(getattr(cfg, section), field)
            if value:
                out.append(f"{key}={max(1, round(value * spec['k']))}")
    if spec["batch"]:
        out.append(f"data.batch_size={spec['batch']}")
    if spec["wide"]:
        out += [f"model.overrides.{k}={v}" for k, v in WIDE.items()]
    return out


def common_overrides(args: argparse.Namespace) -> list[str]:
    """Recipe overrides every stage of every variant gets (the pipeline's ``stage_overrides``)."""
    out = [f"trainer.accelerator={args.accelerator}", "trainer.devices=1", "tracking.enabled=false",
           f"trainer.num_threads={args.threads}", "trainer.enable_progress_bar=false"]
    if args.accelerator != "cpu":
        out.append(f"data.num_workers={args.workers}")
    if args.text_encoder:
        out.append(f"text_encoder.path={args.text_encoder}")
    return out


def run_one(name: str, args: argparse.Namespace) -> int:
    """One variant, in this process: the shipped pipeline with the variant's stage overrides."""
    import torch

    from lumina_lightning.training.pipeline import load_pipeline_config, run_pipeline

    torch.set_num_threads(args.threads)
    spec = parse_variant(name)
    overrides = [f"name=scaling_{name}", f"output_dir={Path(args.out).resolve() / name}",
                 f"stage_overrides={json.dumps(common_overrides(args))}"]  # JSON is YAML: paths stay strings
    if args.accelerator == "gpu":
        overrides.append("eval.device=cuda")  # fp32 there too: scores differ from CPU ones by rounding only
    cfg = load_pipeline_config(PIPELINE, overrides, smoke=args.smoke)
    for stage in cfg.stages:
        stage.overrides = list(stage.overrides) + stage_overrides(stage.recipe, spec)
    print(json.dumps({"variant": name, **spec, "stages": [s.overrides for s in cfg.stages],
                      "every_stage": cfg.stage_overrides}), flush=True)
    summary = run_pipeline(cfg, smoke=args.smoke)
    return 0 if summary.get("ok") else 1


def _score(entry: dict[str, Any], label: str = "ema", tag: str | None = None) -> str:
    g = (entry.get("geneval") or {}).get(label) or {}
    value = g.get("overall") if tag is None else (g.get("tags") or {}).get(tag)
    return "–" if value is None else f"{value:.3f}"


def table(out: Path, names: list[str], walls: dict[str, float], codes: dict[str, int | None]) -> str:
    rows = ["| variant | steps (s1/s2/s3) | batch | train s | stage 1 / 2 / 3 mini-GenEval (EMA) | final raw | "
            "single / two / counting / colors / position / color attr (final EMA) | val loss s3 (EMA) | wall s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        path = out / name / "summary.json"
        spec = parse_variant(name)
        if not path.is_file():
            rows.append(f"| {name} | – | {spec['batch'] or 16} | – | did not finish (exit {codes.get(name)}) | | | | "
                        f"{walls.get(name, 0):.0f} |")
            continue
        s = json.loads(path.read_text())
        stages = s.get("stages", [])
        final = stages[-1] if stages else {}
        val = (final.get("val_loss") or {}).get("ema")
        rows.append(
            f"| {name} | {'/'.join(str(e.get('steps')) for e in stages)} | {spec['batch'] or 16} | "
            f"{sum(e.get('train_seconds') or 0 for e in stages):.0f} | "
            f"{' / '.join(_score(e) for e in stages)} | {_score(final, 'raw')} | "
            f"{' / '.join(_score(final, 'ema', t) for t in TAGS)} | "
            f"{'–' if val is None else f'{val:.4f}'} | {walls.get(name, 0):.0f} |")
    return "\n".join(rows)


def log_tail(path: Path, lines: int = LOG_TAIL) -> str:
    """The last ``lines`` lines of a variant's log, indented: why it failed, on the console."""
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"    (no log: {err})"
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:]) or "    (empty log)"


def failures(out: Path, codes: dict[str, int | None]) -> str:
    """Each failed variant's exit code and log tail (the table says only "did not finish")."""
    return "\n\n".join(f"{name}: exit {code}; last lines of {out / f'{name}.log'}:\n{log_tail(out / f'{name}.log')}"
                       for name, code in codes.items() if code != 0)


def command_line(argv: list[str] | None) -> str:
    """See :func:`lumina_lightning.cli.reproducing_command`."""
    from lumina_lightning.cli import reproducing_command

    return reproducing_command(__file__, argv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="k1,k4,k1_b64,k4_b64")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--threads", type=int, default=2, help="torch threads per variant")
    p.add_argument("--workers", type=int, default=2, help="data-loader workers per variant (GPU only)")
    p.add_argument("--text-encoder", default=None, help="text-encoder folder instead of the packaged MiniLM")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a variant is stopped")
    p.add_argument("--smoke", action="store_true", help="the pipeline's smoke overrides (seconds per variant)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return run_one(args.one, args)
    print(command_line(argv), flush=True)

    names = [n for n in args.variants.split(",") if n]
    for n in names:
        parse_variant(n)
    # absolute: the variants run with cwd=ROOT, this process reads their summaries from its own cwd
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # one synthetic dataset for all, written before the variants start (they would race to write it),
    # where they read it: relative data paths are relative to ROOT, their working folder
    from lumina_lightning.training.pipeline import _synthetic, load_pipeline_config

    synthetic = load_pipeline_config(PIPELINE, smoke=args.smoke).synthetic
    synthetic.out = str(ROOT / synthetic.out)
    _synthetic(synthetic)

    procs: dict[str, tuple[subprocess.Popen, float]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    passthrough = ["--accelerator", args.accelerator, "--threads", str(args.threads), "--workers", str(args.workers),
                   *(["--text-encoder", args.text_encoder] if args.text_encoder else []), *(["--smoke"] if args.smoke else [])]
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--one", name, *passthrough]
        with open(out / f"{name}.log", "w") as log:  # the child keeps its own handle
            procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), time.time())
    walls: dict[str, float] = {}
    codes: dict[str, int | None] = {}
    deadline = time.time() + args.timeout if args.timeout else None
    while procs:
        for name, (proc, start) in list(procs.items()):
            code = proc.poll()
            if code is None and deadline is not None and time.time() > deadline:
                proc.kill()
                code = proc.wait()
            if code is not None:
                walls[name], codes[name] = time.time() - start, code
                print(f"{name}: exit {code} after {walls[name]:.0f} s", flush=True)
                del procs[name]
        time.sleep(1.0)
    text = table(out, names, walls, codes)
    (out / "scaling.md").write_text(text + "\n")
    print(text)
    if failed := failures(out, codes):
        print("\n" + failed)
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
