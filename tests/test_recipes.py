"""Every recipe loads against the code; bad recipes fail early with the file, key and a hint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lumina_lightning.training.config import RecipeConfig
from lumina_lightning.training.recipe import RecipeError, check_section, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
FULL = sorted(p for p in RECIPES.rglob("*.yaml") if "base" not in p.parts)
BASES = sorted((RECIPES / "base").glob("*.yaml"))


def global_batch(cfg: RecipeConfig) -> int:
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
    return cfg.data.batch_size * devices * cfg.trainer.num_nodes * cfg.trainer.accumulate_grad_batches


def is_pipeline(path: Path) -> bool:
    return "stages" in (yaml.safe_load(path.read_text()) or {})


@pytest.mark.parametrize("path", [p for p in FULL if not is_pipeline(p)], ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_loads(path):
    """Training recipes of every task (generation, unicap) validate against the code."""
    loaded = load_recipe(path)
    assert loaded.config.stage
    assert loaded.files[-1] == path.resolve()


@pytest.mark.parametrize("path", [p for p in FULL if is_pipeline(p)], ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_pipeline_file_loads_and_names_real_recipes(path):
    from lumina_lightning.training.pipeline import load_pipeline_config

    for smoke in (False, True):
        cfg = load_pipeline_config(path, smoke=smoke)
        for stage in cfg.stages:
            load_recipe(stage.recipe, stage.overrides)
        if cfg.unicap.recipe:
            assert Path(cfg.unicap.recipe).is_file() or not cfg.unicap.enabled


@pytest.mark.parametrize("path", BASES, ids=lambda p: p.name)
def test_every_base_file_fits_the_schema(path):
    check_section(yaml.safe_load(path.read_text()) or {}, RecipeConfig, str(path))


# paper Table 3: resolution, steps, global batch, lr (spec §5)
PAPER = {
    "stage1_lowres": (256, 144_000, 1024, 2e-4),
    "stage2_highres": (1024, 40_000, 512, 2e-4),
    "stage3_hq": (1024, 15_000, 512, 2e-4),
}


@pytest.mark.parametrize("stage", sorted(PAPER))
def test_real_recipes_carry_the_paper_settings(stage):
    cfg = load_recipe(RECIPES / f"{stage}.yaml").config
    resolution, steps, batch, lr = PAPER[stage]
    assert (cfg.data.resolution, cfg.trainer.max_steps, global_batch(cfg), cfg.optim.lr) == (resolution, steps, batch, lr)
    assert cfg.model.size == "NextDiT_2B_GQA_patch2_Adaln_Refiner"
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.eps == 1e-15 and cfg.optim.weight_decay == 0.0
    assert cfg.optim.grad_clip == 2.0 and cfg.objective.caption_dropout == 0.1
    assert cfg.autoencoder.kind == "vae" and cfg.text_encoder.max_length == 256


def test_stages_hand_off_and_tiny_mirrors_every_stage():
    s2 = load_recipe(RECIPES / "stage2_highres.yaml").config
    s3 = load_recipe(RECIPES / "stage3_hq.yaml").config
    s1 = load_recipe(RECIPES / "stage1_lowres.yaml").config
    assert s2.model.init_from == f"{s1.output_dir}/export" and s3.model.init_from == f"{s2.output_dir}/export"
    for stage in PAPER:
        tiny = load_recipe(RECIPES / "tiny" / f"{stage}.yaml").config
        assert tiny.trainer.accelerator == "cpu" and tiny.autoencoder.kind in ("pixel", "vae")
    t1 = load_recipe(RECIPES / "tiny" / "stage1_lowres.yaml").config
    t2 = load_recipe(RECIPES / "tiny" / "stage2_highres.yaml").config
    t3 = load_recipe(RECIPES / "tiny" / "stage3_hq.yaml").config
    assert t2.model.init_from == f"{t1.output_dir}/export" and t3.model.init_from == f"{t2.output_dir}/export"
    assert t2.data.resolution > t1.data.resolution
    assert t3.data.caption_weights.get("long", 0) == max(t3.data.caption_weights.values())


def test_unknown_key_names_file_key_and_closest_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_step: 10\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    msg = str(err.value)
    assert str(bad) in msg and "`trainer.max_step`" in msg and "did you mean `trainer.max_steps`" in msg


def test_bad_key_in_a_defaults_file_names_that_file(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  warmup_step: 10\n")
    (tmp_path / "top.yaml").write_text("defaults: [base]\nstage: x\nautoencoder: {kind: pixel}\n")
    with pytest.raises(RecipeError, match=r"base\.yaml: unknown key `optim.warmup_step`; did you mean `optim.warmup_steps`"):
        load_recipe(tmp_path / "top.yaml")


def test_wrong_type_names_the_expected_type(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("autoencoder: {kind: pixel}\ntrainer:\n  max_steps: lots\n")
    with pytest.raises(RecipeError, match=r"`trainer.max_steps` must be int, got 'lots' \(str\)"):
        load_recipe(bad)


def test_overrides_interpolation_and_semantic_checks(tmp_path):
    path = RECIPES / "tiny" / "stage1_lowres.yaml"
    cfg = load_recipe(path, ["trainer.max_steps=7", "data.batch_size=3", "stage=renamed"]).config
    assert cfg.trainer.max_steps == 7 and cfg.data.batch_size == 3
    assert cfg.output_dir == "runs/renamed" and cfg.tracking.run_name == "renamed"  # ${stage} interpolation
    with pytest.raises(RecipeError, match="command line .*unknown key `trainer.max_stepz`"):
        load_recipe(path, ["trainer.max_stepz=7"])
    with pytest.raises(RecipeError, match="model.size.*did you mean 'NextDiT_tiny'"):
        load_recipe(path, ["model.size=NextDiT_tinyy"])
    with pytest.raises(RecipeError, match="trainer.strategy"):
        load_recipe(path, ["trainer.strategy=horovod"])
    with pytest.raises(RecipeError, match="model.overrides.*unknown NextDiTConfig field"):
        load_recipe(path, ["model.overrides.dimm=3"])
    with pytest.raises(RecipeError, match="must look like"):
        load_recipe(path, ["trainer.max_steps"])


def test_defaults_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a]\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_print_config_and_validate_only_cli():
    out = subprocess.run([sys.executable, "-m", "lumina_lightning", "train", str(RECIPES / "stage2_highres.yaml"),
                          "--print-config", "trainer.max_steps=5"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["trainer"]["max_steps"] == 5 and printed["model"]["size"] == "NextDiT_2B_GQA_patch2_Adaln_Refiner"
    bad = subprocess.run([sys.executable, "-m", "lumina_lightning", "train", str(RECIPES / "stage1_lowres.yaml"),
                          "trainer.maxsteps=5"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "did you mean `trainer.max_steps`" in bad.stderr


def test_lightning_run_entry_point_trains(tmp_path):
    from training_utils import tiny_recipe

    recipe = tiny_recipe(tmp_path)
    out = subprocess.run(["lightning", "run", str(recipe), "trainer.max_steps=2"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "export" / "pipeline.json").is_file()


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-3` as a string; recipes read it as the number users mean."""
    path = tmp_path / "r.yaml"
    path.write_text("autoencoder: {kind: pixel}\noptim: {lr: 1e-3}\n")
    assert load_recipe(path).config.optim.lr == 1e-3
    assert load_recipe(path, ["optim.lr=5e-4"]).config.optim.lr == 5e-4


def test_pipeline_targets_are_validated(tmp_path):
    from lumina_lightning.training.pipeline import load_pipeline_config

    tiny = yaml.safe_load((RECIPES / "tiny" / "pipeline.yaml").read_text())
    cfg = load_pipeline_config(RECIPES / "tiny" / "pipeline.yaml")
    assert cfg.targets.scores == {"overall": 0.6, "single_object": 0.9, "colors": 0.8}
    for bad, message in (({"scores": {"colours": 0.8}}, "targets.scores.colours` is not a task"),
                         ({"scores": {"overall": 6}}, r"score in \[0, 1\]"),
                         ({"no_worse": ["stage3_vs_stage1"]}, "known comparisons")):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({**tiny, "targets": bad}))
        with pytest.raises(RecipeError, match=message) as err:
            load_pipeline_config(path)
        assert str(path) in str(err.value)


def test_pipeline_eval_device_is_validated(tmp_path):
    from lumina_lightning.training.pipeline import _sampling_device, load_pipeline_config

    tiny = RECIPES / "tiny" / "pipeline.yaml"
    assert load_pipeline_config(tiny).eval.device == "cpu"
    assert load_pipeline_config(tiny, ["eval.device=cuda:1"]).eval.device == "cuda:1"
    auto = load_pipeline_config(tiny, ["eval.device=auto"]).eval
    assert _sampling_device(auto) == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RecipeError, match="`eval.device` must be cpu, cuda, cuda:N or auto, got 'gpu'") as err:
        load_pipeline_config(tiny, ["eval.device=gpu"])
    assert str(tiny) in str(err.value)
    if not torch.cuda.is_available():  # refused before anything runs, not after training
        from lumina_lightning.training.pipeline import run_pipeline

        cfg = load_pipeline_config(tiny, ["eval.device=cuda", f"output_dir={tmp_path / 'out'}"])
        with pytest.raises(RecipeError, match="eval.device=cuda, but this host has no CUDA device"):
            run_pipeline(cfg)
        assert not (tmp_path / "out").exists()


def test_pipeline_stage_overrides_apply_to_every_stage_and_fail_fast(tmp_path, monkeypatch):
    from lumina_lightning.training import pipeline as pl

    tiny = RECIPES / "tiny" / "pipeline.yaml"
    cfg = pl.load_pipeline_config(tiny, ["stage_overrides=[trainer.accelerator=gpu, optim.lr=1e-4]",
                                         f"output_dir={tmp_path / 'out'}"])
    assert cfg.stage_overrides == ["trainer.accelerator=gpu", "optim.lr=1e-4"]
    seen = []

    def fake_train(loaded):  # records what each stage would train with, then stops the pipeline
        seen.append(loaded.config)
        raise KeyboardInterrupt

    monkeypatch.setattr("lumina_lightning.training.run.train", fake_train)
    monkeypatch.setattr(pl, "_synthetic", lambda step: tmp_path)
    with pytest.raises(KeyboardInterrupt):
        pl.run_pipeline(cfg)
    assert seen[0].trainer.accelerator == "gpu" and seen[0].optim.lr == 1e-4
    # a typo in any stage's overrides fails before anything runs (no synthetic data, no training)
    bad = pl.load_pipeline_config(tiny, ["stage_overrides=[trainer.acclerator=gpu]", f"output_dir={tmp_path / 'b'}"])
    with pytest.raises(RecipeError, match="stage .*stage1_lowres.yaml: .*did you mean `trainer.accelerator`"):
        pl.run_pipeline(bad)
    assert not (tmp_path / "b").exists()


def test_pipeline_teacache_calibration_is_validated(tmp_path):
    from lumina_lightning.training.pipeline import load_pipeline_config

    tiny = yaml.safe_load((RECIPES / "tiny" / "pipeline.yaml").read_text())
    c = load_pipeline_config(RECIPES / "tiny" / "pipeline.yaml").teacache_calibration
    assert c.enabled and c.threshold == 0.1 and c.prompts == 4 and c.seeds == [101, 102]
    for bad in ({"threshold": 0}, {"prompts": 0}, {"seeds": []}):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({**tiny, "teacache_calibration": {**tiny["teacache_calibration"], **bad}}))
        with pytest.raises(RecipeError, match="teacache_calibration needs") as err:
            load_pipeline_config(path)
        assert str(path) in str(err.value)
    path.write_text(yaml.safe_dump({**tiny, "teacache_calibration": {"enabled": False, "threshold": 0}}))
    assert load_pipeline_config(path).teacache_calibration.enabled is False  # off: nothing to check
    path.write_text(yaml.safe_dump({**tiny, "teacache_calibration": {"treshold": 0.1}}))
    with pytest.raises(RecipeError, match="treshold"):
        load_pipeline_config(path)


def test_pipeline_targets_are_judged_on_scores_and_paired_intervals():
    from lumina_lightning.training.pipeline import Targets, judge_targets

    summary = {
        "stages": [{"geneval": {"ema": {"overall": 0.62, "tags": {"colors": 0.75},
                                        "ci95": {"overall": [0.55, 0.70], "tags": {"colors": [0.6, 0.9]}}}}}],
        "comparisons": {
            "final_vs_stage1": {"a": "s3 (ema)", "b": "s1 (ema)", "difference": 0.1, "interval": [0.02, 0.2]},
            "ema_vs_raw": {"a": "s3 (ema)", "b": "s3 (raw)", "difference": -0.05, "interval": [-0.09, -0.01]},
        },
    }
    judged = judge_targets(Targets(scores={"overall": 0.6, "colors": 0.8, "counting": 0.5},
                                   no_worse=["final_vs_stage1", "ema_vs_raw"]), summary)
    assert [(t["name"], t["met"]) for t in judged] == [
        ("overall >= 0.6", True), ("colors >= 0.8", False), ("counting >= 0.5", None),
        ("s3 (ema) no worse than s1 (ema)", True),
        ("s3 (ema) no worse than s3 (raw)", False),  # the whole paired interval is below 0
    ]
    assert judged[0]["interval"] == [0.55, 0.70]
    summary["comparisons"]["ema_vs_raw"]["interval"] = [-0.09, 0.01]  # reaches 0: not measurably worse
    assert judge_targets(Targets(no_worse=["ema_vs_raw"]), summary)[0]["met"] is True


def test_latent_pipeline_is_the_pixel_pipeline_with_its_own_stages():
    """recipes/tiny/latent_pipeline.yaml inherits everything but its name and stages (pipeline `defaults`)."""
    from lumina_lightning.training.pipeline import load_pipeline_config

    pixel = load_pipeline_config(RECIPES / "tiny" / "pipeline.yaml")
    latent = load_pipeline_config(RECIPES / "tiny" / "latent_pipeline.yaml")
    assert latent.name == "tiny_latent" and latent.output_dir == "runs/tiny_latent"
    assert (latent.eval, latent.targets, latent.synthetic) == (pixel.eval, pixel.targets, pixel.synthetic)
    cfgs = [load_recipe(s.recipe).config for s in latent.stages]
    assert [Path(s.recipe).name for s in latent.stages] == [
        "latent_stage1_lowres.yaml", "latent_stage2_highres.yaml", "latent_stage3_hq.yaml"]
    for prev, nxt in zip(cfgs, cfgs[1:]):
        assert nxt.model.init_from == f"{prev.output_dir}/export"
    for cfg in cfgs:  # one autoencoder for every stage, trained by whichever runs first
        assert cfg.autoencoder.kind == "conv" and cfg.autoencoder.path == cfgs[0].autoencoder.path
        assert cfg.autoencoder.train == cfgs[0].autoencoder.train
        assert cfg.model.overrides["in_channels"] == cfg.autoencoder.train["latent_channels"]
        assert cfg.data.patch == 8 * cfg.model.overrides["patch_size"] and cfg.data.resolution == 64
    # the pixel recipes they extend are unchanged
    assert load_recipe(RECIPES / "tiny" / "stage2_highres.yaml").config.autoencoder.kind == "pixel"


def test_shapes_pipeline_learns_one_object_scenes_first():
    """recipes/tiny/shapes_pipeline.yaml: the pixel pipeline with stage 1 at 32 px on the one-object
    scenes, stage 2 on every scene plus those again, stage 3 on the one-object scenes for twice its
    steps, stages 2 and 3 without the pooled loss, Muon everywhere; the recipes themselves are unchanged."""
    from lumina_lightning.data.synth import SINGLE_TAGS
    from lumina_lightning.training.pipeline import load_pipeline_config

    pixel = load_pipeline_config(RECIPES / "tiny" / "pipeline.yaml")
    shapes = load_pipeline_config(RECIPES / "tiny" / "shapes_pipeline.yaml")
    assert shapes.name == "tiny_shapes" and shapes.output_dir == "runs/tiny_shapes"
    assert (shapes.eval, shapes.targets, shapes.synthetic) == (pixel.eval, pixel.targets, pixel.synthetic)
    assert [s.recipe for s in shapes.stages] == [s.recipe for s in pixel.stages]
    s1, s2, s3 = (load_recipe(s.recipe, s.overrides).config for s in shapes.stages)
    base1 = load_recipe(RECIPES / "tiny" / "stage1_lowres.yaml").config
    assert s1.data.path.endswith("/train_single.jsonl") and s1.data.resolution == 32 and s1.trainer.max_steps == 2500
    # Muon at 3x the LR in every stage; the recipes themselves keep the official AdamW
    assert all((s.optim.name, s.optim.muon_lr_scale) == ("muon", 3.0) for s in (s1, s2, s3))
    assert base1.optim.name == "adamw" and pixel.stage_overrides == shapes.stage_overrides == []
    assert base1.data.path.endswith("/train.jsonl") and base1.data.resolution == 16
    assert s2.data.path.endswith("/single_mix.yaml") and s2.model.init_from == f"{s1.output_dir}/export"
    assert s3.model.init_from == f"{s2.output_dir}/export"
    assert s2.trainer.max_steps == 320 and s3.data.path == s1.data.path and s3.trainer.max_steps == 640
    base3 = load_recipe(RECIPES / "tiny" / "stage3_hq.yaml").config
    assert base3.data.path.endswith("/hq.yaml") and base3.trainer.max_steps == 320
    assert (s1.objective.aux_loss, s2.objective.aux_loss, s3.objective.aux_loss) == (False, False, False)
    assert load_recipe(RECIPES / "tiny" / "stage2_highres.yaml").config.objective.aux_loss
    # the files it reads are the synthetic generator's, beside the training manifest
    assert Path(s1.data.path).parent == Path(base1.data.path).parent == Path(s2.data.path).parent
    assert set(SINGLE_TAGS) == {"single_object", "colors"}


def test_pipeline_defaults_cycle_is_an_error(tmp_path):
    from lumina_lightning.training.pipeline import load_pipeline_config

    (tmp_path / "a.yaml").write_text("defaults: [b]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a]\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_pipeline_config(tmp_path / "a.yaml")


def _stub_stages(monkeypatch, tmp_path):
    """Stub training; returns the list of (stage, output_dir, init_from, had last.ckpt) calls."""
    from training_utils import stub_stage_training

    return stub_stage_training(monkeypatch, tmp_path,
                               entry=lambda c, had: (c.stage, c.output_dir, c.model.init_from, had),
                               weights_text=lambda c, n: f"{c.stage} {c.optim.lr} call {n}")


def _two_stage_pipeline(path: Path, output_dir: Path) -> Path:
    path.write_text(f"name: two\noutput_dir: {json.dumps(str(output_dir))}\n"
                    f"stages:\n  - recipe: {RECIPES}/tiny/stage1_lowres.yaml\n"
                    f"  - recipe: {RECIPES}/tiny/stage2_highres.yaml\n"
                    "teacache_calibration: {enabled: false}\neval: {enabled: false}\n")
    return path


def test_pipeline_rerun_reuses_unchanged_stages_and_retrains_changed_ones(tmp_path, monkeypatch, capsys):
    from lumina_lightning.training import pipeline as pl

    calls = _stub_stages(monkeypatch, tmp_path)
    out = tmp_path / "out"
    path = _two_stage_pipeline(tmp_path / "p.yaml", out)
    first = pl.run_pipeline(pl.load_pipeline_config(path))
    assert [c[0] for c in calls] == ["tiny_stage1_lowres", "tiny_stage2_highres"]

    # unchanged: nothing trains, the summary says so and keeps the first run's numbers
    calls.clear()
    capsys.readouterr()
    again = pl.run_pipeline(pl.load_pipeline_config(path))
    assert calls == []
    assert all(e["reused"] for e in again["stages"])
    assert [e["loss_last"] for e in again["stages"]] == [e["loss_last"] for e in first["stages"]] == [0.75, 0.75]
    printed = capsys.readouterr().out
    assert printed.count("(reused, unchanged)") == 2 and "None → None" not in printed and "nan" not in printed

    # stage 1's recipe changed: its old folder is moved aside, and stage 2 retrains on the new export
    changed = ["stages=[{recipe: %s/tiny/stage1_lowres.yaml, overrides: [optim.lr=0.05]}, "
               "{recipe: %s/tiny/stage2_highres.yaml}]" % (RECIPES, RECIPES)]
    calls.clear()
    pl.run_pipeline(pl.load_pipeline_config(path, changed))
    assert [(c[0], c[3]) for c in calls] == [("tiny_stage1_lowres", False), ("tiny_stage2_highres", False)]
    assert calls[1][2] == str(out / "tiny_stage1_lowres" / "export")
    assert sorted(p.name.split(".")[0] for p in out.glob("*.replaced-*")) == ["tiny_stage1_lowres", "tiny_stage2_highres"]

    # an interrupted stage (record written, no export yet) with the same fingerprint resumes from its last.ckpt
    record = json.loads((out / "tiny_stage2_highres" / pl.STAGE_RECORD).read_text())
    (out / "tiny_stage2_highres" / pl.STAGE_RECORD).write_text(json.dumps({"fingerprint": record["fingerprint"]}))
    calls.clear()
    pl.run_pipeline(pl.load_pipeline_config(path, changed))
    assert [(c[0], c[3]) for c in calls] == [("tiny_stage2_highres", True)]
    assert len(list(out.glob("*.replaced-*"))) == 2


@pytest.mark.parametrize("what", ["manifest", "yaml_source", "val_manifest", "autoencoder"])
def test_pipeline_rerun_retrains_when_a_file_changed_in_place(tmp_path, monkeypatch, what):
    """A manifest edited (named by data.path, listed by a data YAML there, or the validation manifest),
    or a conv autoencoder retrained, in place keeps its path: its contents count."""
    from lumina_lightning.training import pipeline as pl

    calls = _stub_stages(monkeypatch, tmp_path)
    if what == "manifest":
        changed = tmp_path / "m.jsonl"
        over = [f"stage_overrides=[data.path={changed}]"]
    elif what == "yaml_source":
        changed = tmp_path / "m.jsonl"
        (tmp_path / "mix.yaml").write_text("META:\n  - path: m.jsonl\n    ratio: 2\n")
        over = [f"stage_overrides=[data.path={tmp_path / 'mix.yaml'}]"]
    elif what == "val_manifest":
        changed = tmp_path / "val.jsonl"
        over = [f"stage_overrides=[data.val_path={changed}]"]
    else:
        (tmp_path / "ae").mkdir()
        changed = tmp_path / "ae" / "model.safetensors"
        over = [f"stage_overrides=[autoencoder.kind=conv,autoencoder.path={changed.parent}]"]
    changed.write_text('{"image": "a.png", "caption": "a red circle"}\n')
    path = _two_stage_pipeline(tmp_path / "p.yaml", tmp_path / "out")
    pl.run_pipeline(pl.load_pipeline_config(path, over))
    calls.clear()
    pl.run_pipeline(pl.load_pipeline_config(path, over))
    assert calls == []
    changed.write_text('{"image": "b.png", "caption": "two blue squares"}\n')  # other size, as retrained weights
    pl.run_pipeline(pl.load_pipeline_config(path, over))
    assert [(c[0], c[3]) for c in calls] == [("tiny_stage1_lowres", False), ("tiny_stage2_highres", False)]


def test_a_vae_recipe_needs_its_path_even_with_a_cache(tmp_path):
    from training_utils import tiny_recipe

    recipe = tiny_recipe(tmp_path, autoencoder={"kind": "vae"}, data={"cache_dir": str(tmp_path / "cache")})
    with pytest.raises(RecipeError, match="autoencoder.path` is required"):
        load_recipe(recipe)


def test_pipeline_paths_with_hash_and_colon_reach_the_stages_whole(tmp_path, monkeypatch):
    from lumina_lightning.training import pipeline as pl

    calls = _stub_stages(monkeypatch, tmp_path)
    out = tmp_path / "exp #3" / "run: v2"
    pl.run_pipeline(pl.load_pipeline_config(_two_stage_pipeline(tmp_path / "p.yaml", out)))
    assert [c[1:3] for c in calls] == [(str(out / "tiny_stage1_lowres"), None),
                                       (str(out / "tiny_stage2_highres"), str(out / "tiny_stage1_lowres" / "export"))]


def test_pipeline_refuses_two_stages_with_one_name(tmp_path):
    from lumina_lightning.training.pipeline import load_pipeline_config

    path = tmp_path / "p.yaml"
    path.write_text(f"stages:\n  - recipe: {RECIPES}/tiny/stage3_hq.yaml\n    overrides: [data.batch_size=4]\n"
                    f"  - recipe: {RECIPES}/tiny/stage3_hq.yaml\n")
    with pytest.raises(RecipeError, match=r"stages\[0\] .* and stages\[1\] .* both train stage `tiny_stage3_hq`") as err:
        load_pipeline_config(path)
    assert str(path) in str(err.value)
    path.write_text(f"stages:\n  - recipe: {RECIPES}/tiny/stage3_hq.yaml\n    overrides: [stage=hq_a]\n"
                    f"  - recipe: {RECIPES}/tiny/stage3_hq.yaml\n")
    assert len(load_pipeline_config(path).stages) == 2  # renamed: two folders


def test_inherited_pipeline_reads_stage_recipes_beside_the_file_that_names_them(tmp_path):
    from lumina_lightning.training.pipeline import load_pipeline_config

    (tmp_path / "base").mkdir()
    for folder, name in ((tmp_path / "base", "base"), (tmp_path, "decoy")):
        (folder / "s.yaml").write_text(f"stage: {name}\n")
        (folder / "u.yaml").write_text(f"stage: {name}_unicap\n")
    (tmp_path / "base" / "pipe.yaml").write_text("stages:\n  - recipe: s.yaml\nunicap: {recipe: u.yaml}\n")
    (tmp_path / "child.yaml").write_text("defaults: [base/pipe]\nname: child\n")
    cfg = load_pipeline_config(tmp_path / "child.yaml")
    assert [s.recipe for s in cfg.stages] == [str(tmp_path / "base" / "s.yaml")]
    assert cfg.unicap.recipe == str(tmp_path / "base" / "u.yaml")


def test_pipeline_stage_entries_and_smoke_are_validated(tmp_path):
    from lumina_lightning.training.pipeline import load_pipeline_config

    stage = f"stages:\n  - recipe: {RECIPES}/tiny/stage1_lowres.yaml\n"
    path = tmp_path / "p.yaml"
    for text, message in ((stage + "    overides: [trainer.max_steps=5]\n",
                           r"unknown key `stages\[0\].overides`; did you mean `stages\[0\].overrides`"),
                          (stage + "smoke:\n  eval: {max_promts: 6}\n",
                           r"unknown key `smoke.eval.max_promts`; did you mean `smoke.eval.max_prompts`")):
        path.write_text(text)
        with pytest.raises(RecipeError, match=message) as err:
            load_pipeline_config(path)  # the smoke section is checked even without --smoke
        assert str(path) in str(err.value)
    path.write_text("name: mine\n" + stage)  # no output_dir: the schema's runs/${name}, resolved
    assert load_pipeline_config(path).output_dir == "runs/mine"


def test_task_is_read_through_defaults(tmp_path):
    path = tmp_path / "my_unicap.yaml"
    path.write_text(f"defaults: [{RECIPES}/tiny/unicap_finetune]\noptim: {{lr: 1.0e-3}}\n")
    loaded = load_recipe(path)
    assert loaded.task == "unicap" and loaded.config.optim.lr == 1.0e-3


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_pipeline_synthetic_step_regenerates_only_sets_it_may(tmp_path):
    """synthetic.out is reused when it holds the set asked for, regenerated in place when the pipeline
    (or a recipe) made it with other arguments, and never written over when it holds the user's data: a
    set `lumina data synth` made is refused, an earlier version's (maker unknown) moved aside."""
    from lumina_lightning.data.synth import generate_synthetic, synthetic_origin
    from lumina_lightning.training.pipeline import SyntheticStep, _synthetic

    out = tmp_path / "synth"

    def step(n: int, seed: int = 0) -> SyntheticStep:
        return SyntheticStep(out=str(out), n=n, n_test=8, size=16, seed=seed)

    _synthetic(step(20))
    assert synthetic_origin(out) == "pipeline" and _lines(out / "train.jsonl") == 20
    written = (out / "synth_config.json").stat().st_mtime_ns
    _synthetic(step(20))
    assert (out / "synth_config.json").stat().st_mtime_ns == written  # the same arguments: reused
    _synthetic(step(24, seed=1))
    assert _lines(out / "train.jsonl") == 24 and not list(tmp_path.glob("synth.*"))  # its own: in place

    generate_synthetic(out, 30, 16, 0, n_test=8, origin="cli")  # the user's, asked for on purpose
    with pytest.raises(ValueError, match=r"made by `lumina data synth`.*n_train 30 -> 24.*point synthetic.out"):
        _synthetic(step(24))
    assert _lines(out / "train.jsonl") == 30

    generate_synthetic(out, 30, 16, 0, n_test=8)  # as earlier versions wrote it: no maker recorded
    _synthetic(step(24))
    aside = list(tmp_path.glob("synth.replaced-*"))
    assert len(aside) == 1 and _lines(aside[0] / "train.jsonl") == 30  # kept, not deleted
    assert _lines(out / "train.jsonl") == 24 and synthetic_origin(out) == "pipeline"

    mine = tmp_path / "mine"  # the user's own data, no synthetic set
    mine.mkdir()
    (mine / "train.jsonl").write_text('{"image": "a.png", "caption": "mine"}\n')
    with pytest.raises(ValueError, match=r"holds files but no synthetic dataset.*point synthetic.out into a new"):
        _synthetic(SyntheticStep(out=str(mine), n=20, n_test=8, size=16, seed=0))
    assert (mine / "train.jsonl").read_text() == '{"image": "a.png", "caption": "mine"}\n'
    assert sorted(p.name for p in mine.iterdir()) == ["train.jsonl"]


@pytest.mark.parametrize("smoke", [False, True])
def test_pipeline_captioner_trains_under_the_pipeline_folder(tmp_path, monkeypatch, smoke):
    """`--smoke` with `unicap.enabled=true` must not train in (or resume) the real run's captioner folder."""
    import types

    from lumina_lightning.training import pipeline as pl

    seen = {}

    def fake_train_unicap(loaded):
        seen["output_dir"], seen["max_steps"] = loaded.config.output_dir, loaded.config.trainer.max_steps
        return types.SimpleNamespace(export_dir=tmp_path / "captioner", metrics={})

    def fake_caption(argv):
        seen["argv"] = argv
        return 0

    monkeypatch.setattr("lumina_lightning.training.unicap_run.train_unicap", fake_train_unicap)
    monkeypatch.setattr("lumina_lightning.modules.caption_cli.main", fake_caption)
    cfg = pl.load_pipeline_config(RECIPES / "tiny" / "pipeline.yaml", [f"output_dir={tmp_path / 'out'}"], smoke=smoke)
    pl._unicap(cfg, tmp_path, {}, smoke)
    assert seen["output_dir"] == str((tmp_path / "out" / "unicap").resolve())
    assert (seen["max_steps"] == 2) == smoke
    assert ("--limit" in seen["argv"]) == smoke


def _fake_captioner(monkeypatch, tmp_path, stop=False):
    """train_unicap / lumina caption stand-ins (an export with a weight file; one manifest line per
    call) that count their calls."""
    import types

    calls = {"train": 0, "caption": []}

    def fake_train_unicap(loaded):
        calls["train"] += 1
        out = Path(loaded.config.output_dir)
        if stop:
            return types.SimpleNamespace(export_dir=None, exit_code=143, stopped_by_signal="SIGTERM", metrics={})
        (out / "export").mkdir(parents=True, exist_ok=True)
        (out / "export" / "model.safetensors").write_bytes(b"w" * calls["train"])
        return types.SimpleNamespace(export_dir=out / "export", exit_code=0, stopped_by_signal=None,
                                     metrics={"acc": 0.5})

    def fake_caption(argv):
        args = dict(zip(argv[::2], argv[1::2]))
        calls["caption"].append(args)
        with open(args["--output"], "a") as fh:
            fh.write(json.dumps({"image": "a.png", "levels": args["--levels"]}) + "\n")
        return 0

    monkeypatch.setattr("lumina_lightning.training.unicap_run.train_unicap", fake_train_unicap)
    monkeypatch.setattr("lumina_lightning.modules.caption_cli.main", fake_caption)
    synth = tmp_path / "synth"
    synth.mkdir(exist_ok=True)
    (synth / "train.jsonl").write_text('{"image": "a.png", "caption": "a red circle"}\n')
    return calls, synth


def test_pipeline_stops_when_the_captioner_is_stopped(tmp_path, monkeypatch):
    """A SIGTERM during the captioner's training stops the pipeline (its last.ckpt resumes next time),
    instead of captioning with `--model None`."""
    from lumina_lightning.training import pipeline as pl

    calls, synth = _fake_captioner(monkeypatch, tmp_path, stop=True)
    monkeypatch.setattr(pl, "_synthetic", lambda step: synth)
    cfg = pl.load_pipeline_config(RECIPES / "tiny" / "pipeline.yaml", [f"output_dir={tmp_path / 'out'}",
                                                                       "unicap.enabled=true"])
    summary = pl.run_pipeline(cfg)
    assert not summary["ok"] and "UniCap" in summary["stopped"] and "SIGTERM" in summary["stopped"]
    assert summary["exit_code"] == 143  # what `lumina pipeline` exits with, as `lumina train` does
    assert calls["caption"] == [] and summary["stages"] == []
    record = json.loads((tmp_path / "out" / "unicap" / pl.STAGE_RECORD).read_text())
    assert set(record) == {"fingerprint"}  # the next run resumes it, not moves it aside


def test_pipeline_records_from_before_the_val_and_source_digests_are_kept(tmp_path, monkeypatch):
    """A stage record written before fingerprints covered data.val_path (the older formula) is reused,
    not retrained, while the validation manifest is older than it; edited after it, the stage retrains."""
    import os
    import time

    from lumina_lightning.training import pipeline as pl

    calls = _stub_stages(monkeypatch, tmp_path)
    val = tmp_path / "val.jsonl"
    val.write_text('{"image": "a.png", "caption": "a red circle"}\n')
    old = time.time() - 3600
    os.utime(val, (old, old))
    over = [f"stage_overrides=[data.val_path={val}]"]
    path = _two_stage_pipeline(tmp_path / "p.yaml", tmp_path / "out")
    current = pl._stage_fingerprint
    monkeypatch.setattr(pl, "_stage_fingerprint", lambda *a, **k: current(*a, **{**k, "legacy": True}))
    pl.run_pipeline(pl.load_pipeline_config(path, over))  # records as an older version wrote them
    monkeypatch.setattr(pl, "_stage_fingerprint", current)
    calls.clear()
    again = pl.run_pipeline(pl.load_pipeline_config(path, over))
    assert calls == [] and all(e["reused"] for e in again["stages"])
    assert not list((tmp_path / "out").glob("*.replaced-*"))
    # the records now hold today's fingerprint: an edit of the manifest retrains
    val.write_text('{"image": "b.png", "caption": "two blue squares"}\n')
    pl.run_pipeline(pl.load_pipeline_config(path, over))
    assert [c[0] for c in calls] == ["tiny_stage1_lowres", "tiny_stage2_highres"]


# ------------------------------------------------------------------------------------------------
# encoder settings the model or the autoencoder folder cannot honour fail at validation
# ------------------------------------------------------------------------------------------------


def test_a_text_encoder_max_length_past_the_caption_rope_axis_is_refused(tmp_path):
    """max_length 512 validated, then the run died at the first caption of >= 300 tokens (axes_lens[0])."""
    from training_utils import tiny_recipe

    recipe = tiny_recipe(tmp_path)
    with pytest.raises(RecipeError, match=rf"{recipe}.*`text_encoder.max_length` = 512 is more than the 299 caption "
                                          r"tokens model NextDiT_debug can place .*axes_lens\[0\] = 300"):
        load_recipe(recipe, ["text_encoder.max_length=512"])
    with pytest.raises(RecipeError, match=r"text_encoder.max_length.*<= 99"):
        load_recipe(recipe, ["text_encoder.max_length=100", "model.overrides.axes_lens=[100, 64, 64]"])
    assert load_recipe(recipe, ["text_encoder.max_length=299"]).config.text_encoder.max_length == 299
    with pytest.raises(RecipeError, match="`text_encoder.max_length` must be >= 1"):
        load_recipe(recipe, ["text_encoder.max_length=0"])


def test_an_autoencoder_kind_that_does_not_match_its_folder_is_refused(tmp_path):
    from training_utils import tiny_recipe

    from lumina_lightning.encoders import build_tiny_vae
    from lumina_lightning.encoders.conv_autoencoder import ConvAutoencoder, ConvAutoencoderConfig, save_conv_autoencoder

    conv = save_conv_autoencoder(ConvAutoencoder(ConvAutoencoderConfig(channels=4, latent_channels=3)), tmp_path / "conv")
    vae = build_tiny_vae(tmp_path / "vae", latent_channels=3)
    recipe = tiny_recipe(tmp_path)
    with pytest.raises(RecipeError, match=rf"{recipe}.*`autoencoder.kind` is 'vae' but {conv} holds a conv "
                                          r"autoencoder .*the kind does not match the folder; set autoencoder.kind=conv"):
        load_recipe(recipe, ["autoencoder.kind=vae", f"autoencoder.path={conv}"])
    with pytest.raises(RecipeError, match=rf"`autoencoder.kind` is 'conv' but {vae} holds a diffusers VAE .*"
                                          r"set autoencoder.kind=vae \(and drop autoencoder.train\)"):
        load_recipe(recipe, ["autoencoder.kind=conv", f"autoencoder.path={vae}", "autoencoder.train={steps: 1}"])
    # matching kinds (and a conv folder that autoencoder.train makes later) validate
    load_recipe(recipe, ["autoencoder.kind=vae", f"autoencoder.path={vae}", "data.patch=16", "data.resolution=32"])
    load_recipe(recipe, ["autoencoder.kind=conv", f"autoencoder.path={conv}", "data.patch=16", "data.resolution=32"])
    load_recipe(recipe, ["autoencoder.kind=conv", f"autoencoder.path={tmp_path / 'later'}",
                         "autoencoder.train={downsample: 4}", "data.patch=8"])


def test_data_patch_must_be_a_multiple_of_one_tokens_pixels(tmp_path):
    """data.patch is the bucket grid: with a x8 autoencoder and patch_size 2 a bucket side of 4 px
    multiples (data.patch 4) gives latents that do not divide into patches."""
    from training_utils import tiny_recipe

    from lumina_lightning.encoders import build_tiny_vae

    vae = build_tiny_vae(tmp_path / "vae", latent_channels=3)
    recipe = tiny_recipe(tmp_path)
    with pytest.raises(RecipeError, match=rf"`data.patch` = 4 is not a multiple of 16 pixels, the image side of one "
                                          rf"token \(the autoencoder in {vae} downsamples 8x, model.patch_size is 2\)"):
        load_recipe(recipe, ["autoencoder.kind=vae", f"autoencoder.path={vae}", "data.patch=4", "data.resolution=32"])
    with pytest.raises(RecipeError, match=r"`data.patch` = 3 is not a multiple of 2 pixels.*the pixel autoencoder.*set data.patch to 2"):
        load_recipe(recipe, ["data.patch=3", "data.resolution=18"])
    with pytest.raises(RecipeError, match=r"`data.patch` = 8 is not a multiple of 16.*autoencoder.train.downsample"):
        load_recipe(recipe, ["autoencoder.kind=conv", f"autoencoder.path={tmp_path / 'later'}",
                             "autoencoder.train={steps: 1}", "data.patch=8"])
    assert load_recipe(recipe, ["data.patch=4"]).config.data.patch == 4  # a multiple (coarser buckets) is fine


def test_a_pipeline_interrupted_after_training_leaves_no_finished_summary(tmp_path, monkeypatch):
    """Ctrl-C during an evaluation (or TeaCache calibration): summary.json must not keep the previous
    run's "ok": true."""
    from lumina_lightning.training import pipeline as pl

    _stub_stages(monkeypatch, tmp_path)
    out = tmp_path / "out"
    path = _two_stage_pipeline(tmp_path / "p.yaml", out)
    assert pl.run_pipeline(pl.load_pipeline_config(path))["ok"]
    assert json.loads((out / "summary.json").read_text())["ok"] is True

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pl, "_evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pl.run_pipeline(pl.load_pipeline_config(path, ["eval.enabled=true"]))
    assert json.loads((out / "summary.json").read_text())["ok"] is False


# -- a key given twice ---------------------------------------------------------------------------------
# YAML keeps the last of two equal keys and drops the first silently: a pasted second `optim:` section
# would train with half the settings. Every YAML a user writes is refused with the file, the key path
# and both lines instead.


def test_a_recipe_key_given_twice_names_the_file_key_and_both_lines(tmp_path):
    import re

    recipe = tmp_path / "dup.yaml"
    recipe.write_text("stage: x\nautoencoder: {kind: pixel}\noptim:\n  lr: 0.5\ntrainer:\n  max_steps: 3\n"
                      "optim:\n  weight_decay: 0.1\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(recipe))}: duplicate key `optim` at lines 3 and 7"):
        load_recipe(recipe)
    recipe.write_text("stage: x\nautoencoder: {kind: pixel}\ntrainer:\n  max_steps: 3\n  max_steps: 30\n")
    with pytest.raises(RecipeError, match=r"duplicate key `trainer.max_steps` at lines 4 and 5"):
        load_recipe(recipe)


def test_an_override_that_gives_a_key_twice_is_refused():
    with pytest.raises(RecipeError, match=r"command line: override 'optim=\{lr: 1, lr: 2\}' gives `optim.lr` twice"):
        load_recipe(RECIPES / "tiny" / "stage1_lowres.yaml", ["optim={lr: 1, lr: 2}"])


def test_a_key_given_twice_in_a_defaults_file_names_that_file(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    (tmp_path / "top.yaml").write_text("defaults: [base]\nstage: x\nautoencoder: {kind: pixel}\n")
    with pytest.raises(RecipeError, match=r"base\.yaml: duplicate key `optim.lr` at lines 2 and 3"):
        load_recipe(tmp_path / "top.yaml")


def test_a_unicap_recipe_key_given_twice_is_refused(tmp_path):
    recipe = tmp_path / "cap.yaml"
    recipe.write_text((RECIPES / "tiny" / "unicap_finetune.yaml").read_text() + "task: unicap\n")
    with pytest.raises(RecipeError, match=r"cap\.yaml: duplicate key `task` at lines \d+ and \d+"):
        load_recipe(recipe)


def test_a_pipeline_key_given_twice_is_refused(tmp_path):
    from lumina_lightning.training.pipeline import load_pipeline_config

    path = _two_stage_pipeline(tmp_path / "p.yaml", tmp_path / "out")
    path.write_text(path.read_text() + f"stages:\n  - recipe: {RECIPES}/tiny/stage3_hq.yaml\n")
    with pytest.raises(RecipeError, match=r"p\.yaml: duplicate key `stages` at lines 3 and 8"):
        load_pipeline_config(path)
    # inside a list item: the path says which
    path.write_text(f"name: two\nstages:\n  - recipe: {RECIPES}/tiny/stage1_lowres.yaml\n"
                    f"    recipe: {RECIPES}/tiny/stage2_highres.yaml\n")
    with pytest.raises(RecipeError, match=r"duplicate key `stages\[0\].recipe` at lines 3 and 4"):
        load_pipeline_config(path)


def test_yaml_merge_keys_and_equal_keys_in_other_mappings_are_no_duplicates():
    """A key that overrides a `<<:` merge is YAML's own rule, and `x` in two mappings is two keys."""
    from lumina_lightning.training.recipe import load_yaml

    assert load_yaml("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\nc: [{x: 1}, {x: 2}]\n") == {
        "a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}, "c": [{"x": 1}, {"x": 2}]}


def test_every_shipped_yaml_has_unique_keys():
    """What the checks above refuse must not be in a recipe, pipeline or data YAML we ship."""
    from lumina_lightning.training.recipe import load_yaml

    shipped = sorted([*RECIPES.rglob("*.yaml"), *(ROOT / "data").rglob("*.yaml")])
    assert shipped
    for path in shipped:
        load_yaml(path.read_text(encoding="utf-8"))
