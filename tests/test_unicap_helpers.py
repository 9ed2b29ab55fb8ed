"""Helpers shared by the UniCap tests (no tests here): a tiny offline Qwen2-VL, recipes, bad images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


from training_utils import tiny_synthetic, write_recipe

CACHE = Path(os.environ.get("LUMINA_TEST_CACHE", "/tmp/lumina-test-cache"))
# smaller than the tiny recipe's model: 32 px images -> 16 patches -> 4 image tokens
TINY_VLM = dict(hidden_size=32, num_layers=2, num_heads=4, vision_embed_dim=32, vision_depth=1, vision_heads=2,
                patch_size=8, image_size=32, vocab_size=384)


def tiny_vlm() -> str:
    """The test VLM folder, built once per machine (the name changes when its arguments do)."""
    from lumina_lightning.modules.tiny_vlm import ensure_tiny_vlm

    tag = "-".join(str(v) for v in TINY_VLM.values())
    return ensure_tiny_vlm(CACHE / f"tiny-qwen2vl-{tag}", **TINY_VLM)


def unicap_recipe(tmp: Path, name: str = "unicap.yaml", **sections: Any) -> Path:
    """A complete ``task: unicap`` recipe on the shared 16 px synthetic set; ``sections`` override keys."""
    synth = tiny_synthetic()
    recipe: dict[str, Any] = {
        "task": "unicap",
        "stage": "unicap_test",
        "seed": 0,
        "output_dir": str(tmp / "run"),
        "model": {"path": tiny_vlm(), "dtype": "fp32", "attn_implementation": "sdpa"},
        "data": {"path": str(synth / "train.jsonl"), "val_path": str(synth / "test.jsonl"), "val_samples": 8,
                 "batch_size": 8, "num_workers": 0, "max_length": 128,
                 "level_weights": {"short": 0.6, "tags": 0.2, "medium": 0.2}},
        "optim": {"lr": 5e-3, "warmup_steps": 2, "schedule": "constant", "loss_reduction": "sample"},
        "generation": {"max_new_tokens": 12},
        "validation": {"every_n_steps": 0, "eval_samples": 8, "n_captions": 2, "levels": ["short", "tags"],
                       "batch_size": 8},
        "trainer": {"max_steps": 4, "accelerator": "cpu", "devices": 1, "precision": "32-true",
                    "enable_progress_bar": False, "log_every_n_steps": 1, "checkpoint_every_n_steps": 1000},
        "tracking": {"enabled": False},
    }
    return write_recipe(tmp / name, recipe, sections)


def bad_images(folder: Path) -> tuple[Path, Path]:
    """A truncated PNG and a path that does not exist."""
    folder.mkdir(parents=True, exist_ok=True)
    src = tiny_synthetic() / "images" / "train_000000.png"
    broken = folder / "broken.png"
    broken.write_bytes(src.read_bytes()[:40])
    return broken, folder / "missing.png"
