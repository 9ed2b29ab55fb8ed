"""`lumina train --validate-only` (``load_recipe``) refuses what would only fail mid-run: sample-grid
settings the first grid cannot use, a pipeline file given as a stage recipe; and a recipe copied on its
own takes the bases it composes from the installed copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lumina_lightning.training.recipe import RecipeError, load_recipe, packaged_recipes_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "stage1_lowres.yaml"  # pixel space, patch 4: one token is 4 px; data.resolution 16


def refused(*overrides: str) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, list(overrides))
    message = str(err.value)
    assert str(TINY) in message  # names the recipe file
    return message


def test_an_unknown_grid_preset_is_refused_with_the_closest_name():
    message = refused("validation.preset=fastt")
    assert "`validation.preset` = 'fastt' is not one of" in message and "did you mean 'fast'" in message


@pytest.mark.parametrize("key", ["width", "height"])
def test_a_grid_side_that_does_not_divide_into_tokens_is_refused(key):
    message = refused(f"validation.{key}=30")
    assert f"`validation.{key}` = 30 is not a positive multiple of 4 pixels" in message
    assert "the pixel autoencoder downsamples 1x, model.patch_size is 4" in message
    # the other side is data.resolution (16); the nearest valid size comes from the sampler's snap_size
    assert ("nearest valid grid size: 32x16" if key == "width" else "nearest valid grid size: 16x32") in message


def test_a_negative_grid_side_and_one_past_the_position_tables_are_refused():
    assert "`validation.width` = -16 is not a positive multiple of 4 pixels" in refused("validation.width=-16")
    # NextDiT_mini's RoPE tables hold 128 tokens a side: 512 px at 4 px per token
    assert "`validation.height` = 516 is more than the 512 pixels" in refused("validation.height=516")


@pytest.mark.parametrize("steps", [0, -3])
def test_grid_steps_below_one_are_refused(steps):
    message = refused(f"validation.steps={steps}")
    assert f"`validation.steps` must be >= 1 or null (the preset's own: 17 for 'official'), got {steps}" in message


def test_no_seeds_for_the_grid_prompts_is_refused_only_where_a_grid_is_drawn():
    message = refused("validation.seeds=[]")
    assert "`validation.seeds` is empty but the sample grid draws 4 validation.prompts" in message
    # no grid, no seeds needed: render_samples returns before it reads them
    assert load_recipe(TINY, ["validation.seeds=[]", "validation.sample_every_n_steps=0"]).config.validation.seeds == []
    assert load_recipe(TINY, ["validation.seeds=[]", "validation.prompts=[]"]).config.validation.prompts == []


def test_valid_grid_settings_still_pass():
    v = load_recipe(TINY, ["validation.preset=fast", "validation.steps=4", "validation.width=32",
                           "validation.height=512", "validation.cfg_scale=2.0", "validation.seeds=[7]"]).config.validation
    assert (v.preset, v.steps, v.width, v.height, v.seeds) == ("fast", 4, 32, 512, [7])
    # null (and 0, which render_samples reads as null) = data.resolution; null steps = the preset's
    v = load_recipe(TINY, ["validation.width=0", "validation.steps=null"]).config.validation
    assert v.width == 0 and v.steps is None


def test_validate_only_refuses_a_bad_grid_setting(capsys):
    from lumina_lightning.training.run import main

    assert main([str(TINY), "validation.steps=0", "--validate-only"]) == 2
    assert "`validation.steps` must be >= 1" in capsys.readouterr().err


def test_a_pipeline_file_given_to_train_says_to_run_lumina_pipeline(capsys):
    from lumina_lightning.training.run import main

    for name in ("pipeline.yaml", "latent_pipeline.yaml"):  # the latter names its stages through `defaults`
        path = ROOT / "recipes" / "tiny" / name
        with pytest.raises(RecipeError, match=rf"{path} is a pipeline file .*`stages`.*run it with `lumina pipeline {path}`"):
            load_recipe(path)
    assert main([str(ROOT / "recipes" / "tiny" / "pipeline.yaml"), "--validate-only"]) == 2
    assert "lumina pipeline" in capsys.readouterr().err


def test_a_recipe_copied_alone_takes_its_bases_from_the_installed_recipes(tmp_path, capsys):
    shipped = packaged_recipes_dir()
    copy = tmp_path / "recipes" / "tiny" / "stage1_lowres.yaml"
    copy.parent.mkdir(parents=True)
    shutil.copy(TINY, copy)
    loaded = load_recipe(copy)
    assert loaded.files == [(shipped / "base" / "common.yaml").resolve(), (shipped / "base" / "tiny.yaml").resolve(),
                            copy.resolve()]
    assert loaded.resolved == load_recipe(TINY).resolved
    err = capsys.readouterr().err
    assert f"`defaults` entry '../base/common' is not beside it ({copy.parent / '../base/common.yaml'})" in err
    assert f"using the copy installed with lumina-lightning, {(shipped / 'base' / 'common.yaml').resolve()}" in err
    # a local base wins over the installed one
    (tmp_path / "recipes" / "base").mkdir()
    for name in ("common.yaml", "tiny.yaml"):
        shutil.copy(shipped / "base" / name, tmp_path / "recipes" / "base" / name)
    assert load_recipe(copy).files[0] == (tmp_path / "recipes" / "base" / "common.yaml").resolve()


def test_a_recipe_outside_a_recipes_folder_names_the_missing_base_and_the_installed_copy(tmp_path):
    copy = tmp_path / "mine" / "stage1_lowres.yaml"
    copy.parent.mkdir()
    shutil.copy(TINY, copy)
    with pytest.raises(RecipeError) as err:
        load_recipe(copy)
    message = str(err.value)
    assert f"`defaults` entry '../base/common' not found (looked for {copy.parent / '../base/common'}, " in message
    assert f"the recipes installed with lumina-lightning are in {packaged_recipes_dir()}" in message


def test_the_data_readme_cache_example_builds_a_cache_the_tiny_stage_1_recipe_reads():
    """Checked flag by flag against what the run compares (cache identity: resolution, patch, max_aspect,
    text_encoder.max_length, the prompt id `record:<system>`); built and trained from by hand once."""
    import shlex

    from lumina_lightning.data.cli import build_parser

    text = (ROOT / "data" / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    (line,) = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("lumina data cache ")]
    args = build_parser().parse_args(shlex.split(line)[2:])
    cfg = load_recipe(TINY).config
    assert (args.resolution, args.patch, args.max_aspect) == (cfg.data.resolution, cfg.data.patch, cfg.data.max_aspect)
    assert (args.vae, args.text_encoder, args.max_length) == (cfg.autoencoder.kind, cfg.text_encoder.path,
                                                             cfg.text_encoder.max_length)
    assert (args.prompt_template, args.default_system) == ("record", cfg.data.system or cfg.objective.system)


def test_flash_attention_with_32_bit_or_cpu_training_is_refused_up_front():
    assert "needs a 16-bit `trainer.precision`" in refused("model.attention_backend=flash")
    assert "needs CUDA, but trainer.accelerator is 'cpu'" in refused(
        "model.attention_backend=flash", "trainer.precision=bf16-mixed", "trainer.accelerator=cpu")
    load_recipe(TINY, ["model.attention_backend=flash", "trainer.precision=bf16-mixed", "trainer.accelerator=gpu"])


def test_flash_attention_on_a_host_that_cannot_run_it_stops_before_the_run_starts(tmp_path, capsys):
    """Valid on a login node, refused by `lumina train` on a host without flash-attn or CUDA before any
    data is generated or an MLflow run opened (it used to crash at the first forward, run marked FAILED)."""
    import torch

    from lumina_lightning.models.attention import HAS_FLASH_ATTN
    from lumina_lightning.training.run import main

    if HAS_FLASH_ATTN and torch.cuda.is_available():
        pytest.skip("this host can run flash-attn")
    out = tmp_path / "run"
    code = main([str(TINY), "model.attention_backend=flash", "trainer.precision=bf16-mixed",
                 "trainer.accelerator=gpu", f"output_dir={out}", f"data.path={tmp_path / 'synth' / 'train.jsonl'}",
                 "tracking.enabled=false"])
    assert code == 2
    assert "`model.attention_backend` = 'flash', but" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "synth").exists()


def test_grid_settings_are_not_checked_where_no_grid_is_drawn():
    off = ["validation.sample_every_n_steps=0"]
    for bad in ("validation.width=15", "validation.preset=fastt", "validation.steps=0"):
        load_recipe(TINY, [bad, *off])
        load_recipe(TINY, [bad, "validation.prompts=[]"])
