"""Helpers for the training tests: a tiny offline text encoder, a tiny synthetic dataset, recipes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
_CACHE = Path(os.environ.get("LUMINA_TEST_CACHE", "/tmp/lumina-test-cache"))


def tiny_text_encoder() -> str:
    """A tiny random Gemma-2 + offline BPE tokenizer, built once per machine (a few seconds)."""
    from lumina_lightning.encoders.text import build_tiny_text_encoder

    out = _CACHE / "tiny-gemma-32"
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + f".{os.getpid()}")
        build_tiny_text_encoder(tmp, hidden_size=32)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race
            pass
    return str(out)


def tiny_synthetic(size: int = 16, n: int = 96, n_test: int = 16) -> Path:
    """A small synthetic compositional dataset (train/test manifests), built once per machine."""
    from lumina_lightning.data.synth import generate_synthetic

    out = _CACHE / f"synth-{size}-{n}-{n_test}"
    if not (out / "test.jsonl").exists():
        tmp = out.with_name(out.name + f".{os.getpid()}")
        generate_synthetic(tmp, n, size, 0, n_test=n_test)
        try:
            tmp.rename(out)
        except OSError:
            pass
    return out


def tiny_recipe(tmp: Path, name: str = "recipe.yaml", **sections: dict[str, Any]) -> Path:
    """Write a complete recipe for a NextDiT_debug in pixel space; ``sections`` override keys."""
    synth = tiny_synthetic()
    recipe: dict[str, Any] = {
        "stage": "test",
        "seed": 0,
        "output_dir": str(tmp / "run"),
        "resume": None,
        "model": {"size": "NextDiT_debug", "overrides": {"in_channels": 3, "cap_feat_dim": 32, "patch_size": 2}},
        "text_encoder": {"path": tiny_text_encoder(), "max_length": 32},
        "autoencoder": {"kind": "pixel"},
        "data": {"path": str(synth / "train.jsonl"), "resolution": 16, "patch": 2, "batch_size": 4,
                 "num_workers": 0, "val_path": str(synth / "test.jsonl"), "val_samples": 4,
                 "caption_weights": {"short": 1.0}},
        "objective": {"system": "base", "aux_loss": False},
        "optim": {"lr": 1e-3},
        "ema": {"decay": 0.9},
        "validation": {"every_n_steps": 0, "sample_every_n_steps": 0, "prompts": []},
        "trainer": {"max_steps": 4, "accelerator": "cpu", "devices": 1, "checkpoint_every_n_steps": 2,
                    "enable_progress_bar": False, "log_every_n_steps": 1},
        "tracking": {"enabled": False},
    }
    return write_recipe(tmp / name, recipe, sections)


def write_recipe(path: Path, recipe: dict[str, Any], sections: dict[str, Any]) -> Path:
    """Write ``recipe`` with ``sections`` merged over it (dict sections key by key) as YAML."""
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_script(script: Path, *args: str, port: int, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a helper script in a fresh interpreter (Lightning's DDP re-executes the command line)."""
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": python_path,
                "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("LOCAL_RANK", None)
    full_env.pop("RANK", None)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=str(ROOT))


def stub_stage_training(monkeypatch: Any, synthetic_dir: Path, entry: Any, weights_text: Any,
                        pipeline_json: bool = False) -> list:
    """Stand in for ``training.run.train`` in pipeline-orchestration tests (real training has its own
    tests): each call writes a last.ckpt and an export whose weights file reads ``weights_text(config,
    n)`` (differing per call, as a real retraining's would) and appends ``entry(config, had_last_ckpt)``
    to the returned list; the pipeline's synthetic step returns ``synthetic_dir``."""
    import json
    import types

    from lumina_lightning.sampling.pipeline_io import PIPELINE_FORMAT, PIPELINE_JSON
    from lumina_lightning.training import pipeline as pl

    calls: list = []

    def fake_train(loaded: Any) -> Any:
        c = loaded.config
        out = Path(c.output_dir)
        calls.append(entry(c, (out / "checkpoints" / "last.ckpt").exists()))
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints" / "last.ckpt").write_text("ckpt")
        (out / "export" / "transformer").mkdir(parents=True, exist_ok=True)
        (out / "export" / "transformer" / "model.safetensors").write_text(weights_text(c, len(calls)))
        if pipeline_json:
            (out / "export" / PIPELINE_JSON).write_text(json.dumps({"format": PIPELINE_FORMAT, "defaults": {}}))
        return types.SimpleNamespace(exit_code=0, global_step=2, losses=[1.0, 0.5], validation={"ema": 0.25},
                                     export_dir=out / "export", mlflow_run_id=None, tracking_uri=None,
                                     stopped_by_signal=None)

    monkeypatch.setattr("lumina_lightning.training.run.train", fake_train)
    monkeypatch.setattr(pl, "_synthetic", lambda step: synthetic_dir)
    return calls
