"""benchmarks/pipeline_scaling.py: variant names and the stage overrides they become (no training)."""

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("pipeline_scaling", ROOT / "benchmarks" / "pipeline_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variant_names(scaling):
    assert scaling.parse_variant("k1") == {"k": 1.0, "batch": None, "wide": False}
    assert scaling.parse_variant("k4_b64_wide") == {"k": 4.0, "batch": 64, "wide": True}
    assert scaling.parse_variant("k1.5") == {"k": 1.5, "batch": None, "wide": False}
    with pytest.raises(SystemExit, match="unknown part 'x2'"):
        scaling.parse_variant("k2_x2")


def test_stage_overrides_scale_steps_and_load(scaling):
    from lumina_lightning.training.recipe import load_recipe

    recipe = str(ROOT / "recipes" / "tiny" / "stage2_highres.yaml")
    args = argparse.Namespace(accelerator="gpu", threads=3, workers=2, text_encoder="/models/minilm")
    overrides = scaling.stage_overrides(recipe, scaling.parse_variant("k4_b64_wide")) + scaling.common_overrides(args)
    base = load_recipe(recipe).config
    cfg = load_recipe(recipe, overrides).config  # every override is a valid recipe key
    assert cfg.trainer.max_steps == 4 * base.trainer.max_steps
    assert cfg.validation.every_n_steps == 4 * base.validation.every_n_steps
    assert cfg.optim.warmup_steps == base.optim.warmup_steps  # warm-up is not scaled
    assert cfg.data.batch_size == 64 and cfg.data.num_workers == 2
    assert cfg.model.overrides["dim"] == 192 and cfg.model.overrides["patch_size"] == 4  # merged, not replaced
    assert (cfg.trainer.accelerator, cfg.tracking.enabled, cfg.text_encoder.path) == ("gpu", False, "/models/minilm")
    plain = scaling.stage_overrides(recipe, scaling.parse_variant("k1")) + scaling.common_overrides(
        argparse.Namespace(accelerator="cpu", threads=2, workers=2, text_encoder=None))
    assert not any(o.startswith(("trainer.max_steps", "data.", "model.", "text_encoder.")) for o in plain)


def test_relative_out_and_shared_dataset_are_where_the_variants_look(scaling, tmp_path, monkeypatch):
    """The variants run with cwd=ROOT: a relative --out and the dataset must not depend on the caller's cwd."""
    import lumina_lightning.training.pipeline as pl

    monkeypatch.chdir(tmp_path)
    made, children = [], []
    monkeypatch.setattr(pl, "_synthetic", lambda step: made.append(step.out))

    class FakeProc:
        def __init__(self, cmd, stdout, stderr, env, cwd):
            children.append(cmd[cmd.index("--out") + 1])

        def poll(self):
            return 0

    monkeypatch.setattr(scaling.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(scaling.time, "sleep", lambda s: None)
    scaling.main(["--out", "scal", "--variants", "k1"])
    assert children == [str(tmp_path / "scal")]
    assert made == [str(ROOT / "runs" / "tiny" / "synthetic")]
    assert (tmp_path / "scal" / "scaling.md").is_file()
