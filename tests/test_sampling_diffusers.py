"""A pipeline exported to the diffusers layout gives the same images in ``diffusers.Lumina2Pipeline``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lumina_lightning.sampling import export_diffusers_pipeline, load_pipeline
from lumina_lightning.sampling.testing import build_tiny_pipeline

PROMPTS = ["a red circle left of a blue square", "two green stars"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("diffusers")
    pipe = build_tiny_pipeline(base, autoencoder="vae")  # tiny Gemma-2, tiny VAE (factor 8), random Next-DiT
    return pipe, export_diffusers_pipeline(pipe, base / "exported")


@pytest.mark.parametrize("steps,trunc_ratio,renorm", [(6, 0.5, True), (5, 1.0, False)])
def test_same_image_in_diffusers_lumina2_pipeline(exported, steps, trunc_ratio, renorm):
    from diffusers import Lumina2Pipeline

    pipe, folder = exported
    theirs = Lumina2Pipeline.from_pretrained(folder)
    width, height = 48, 32  # width != height: orientation must agree too
    noise = pipe.make_noise([1, 2], width, height)
    ours = pipe(PROMPTS, width=width, height=height, preset="diffusers", steps=steps, cfg_scale=4.0,
                renorm=1.0 if renorm else 0.0, cfg_trunc=trunc_ratio, latents=noise)
    common = dict(prompt=PROMPTS, width=width, height=height, num_inference_steps=steps, guidance_scale=4.0,
                  cfg_trunc_ratio=trunc_ratio, cfg_normalization=renorm)
    with torch.no_grad():
        lat = theirs(**common, latents=noise.clone(), output_type="latent").images
        img = theirs(**common, latents=noise.clone(), output_type="np").images
    assert lat.shape == ours.latents.shape
    assert (lat - ours.latents).abs().max() < 1e-4
    assert ours.latents.abs().max() > 0.5  # a real, non-trivial sample
    mine = np.stack([np.asarray(im, dtype=np.float32) for im in ours.images])
    theirs_u8 = np.round(img * 255)
    assert mine.shape == theirs_u8.shape == (2, height, width, 3)
    assert np.abs(mine - theirs_u8).max() <= 1.0
    expected_guided = sum(1 for i in range(steps) if (i + 1) / steps <= trunc_ratio)
    assert ours.stats["guided_calls"] == expected_guided


def test_load_exported_folder_and_refuse_pixel(exported, tmp_path):
    pipe, folder = exported
    loaded = load_pipeline(folder)
    assert loaded.unnamed_preset_defaults["shift"] == 6.0 and loaded.resolve().shift == 6.0
    assert loaded.resolution == 128 * 8  # diffusers' default sample_size (latent px) x the VAE factor
    pipe.resolution = 64  # a trained size known to our pipeline travels as diffusers' sample_size
    try:
        again = export_diffusers_pipeline(pipe, tmp_path / "sized")
    finally:
        pipe.resolution = None
    assert json.loads((again / "transformer" / "config.json").read_text())["sample_size"] == 8
    assert load_pipeline(again).resolution == 64
    a = pipe("two green stars", width=32, height=16, seed=0, steps=3, solver="euler")
    b = loaded("two green stars", width=32, height=16, seed=0, steps=3, solver="euler")
    assert torch.allclose(a.latents, b.latents, atol=1e-5)
    pixel = build_tiny_pipeline(tmp_path)
    with pytest.raises(ValueError, match="needs an AutoencoderKL VAE"):
        export_diffusers_pipeline(pixel, tmp_path / "nope")


def test_scheduler_shift_is_the_default_only_when_no_preset_is_named(exported, tmp_path):
    """A diffusers folder's scheduler shift (often diffusers' default 1.0) used to replace the shift of
    every preset, the named ones included: `--preset official` then sampled without official's shift 6."""
    pipe, _ = exported
    loaded = load_pipeline(export_diffusers_pipeline(pipe, tmp_path / "shift3", shift=3.0))
    assert loaded.resolve().shift == 3.0 and "shift" not in loaded.defaults  # no preset named: the folder's
    for preset in ("official", "fast", "diffusers"):
        assert loaded.resolve(preset).shift == 6.0  # a named preset keeps its documented shift
    assert loaded.resolve("official", shift=2.0).shift == 2.0 and loaded.resolve(shift=2.0).shift == 2.0
    # the call records the shift it used, so its settings reproduce it either way
    r = loaded("two green stars", width=16, height=16, seed=0, steps=2, solver="euler")
    assert r.settings["shift"] == 3.0 and r.settings["preset"] == "official"
    assert loaded("two green stars", width=16, height=16, seed=0, steps=2, solver="euler",
                  preset="official").settings["shift"] == 6.0


def test_convert_cli_turns_a_pipeline_folder_into_a_lumina2_pipeline(exported, tmp_path, capsys):
    """`lumina convert PIPELINE DST --to diffusers` writes what `Lumina2Pipeline.from_pretrained` loads, with
    the same weights; a pipeline diffusers cannot represent is refused with the way out."""
    from diffusers import Lumina2Pipeline

    from lumina_lightning.cli import main as lumina_main
    from lumina_lightning.sampling.pipeline_io import save_pipeline

    pipe, _ = exported
    src = save_pipeline(tmp_path / "ours", pipe.model, text_encoder_spec={"path": str(pipe.text_encoder.path)},
                        autoencoder_spec={"kind": "vae", "path": str(pipe.autoencoder.path)},
                        defaults={"shift": 3.0})
    assert lumina_main(["convert", str(src), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert "Lumina2Pipeline" in capsys.readouterr().out
    theirs = Lumina2Pipeline.from_pretrained(tmp_path / "d")
    assert theirs.scheduler.config.shift == 3.0  # the pipeline's default shift travels
    ours_state = pipe.model.state_dict()
    back = load_pipeline(tmp_path / "d").model.state_dict()
    # (norm_final is never called, spec §1.2, and diffusers has no such key: it comes back as ones)
    assert [k for k in ours_state if not torch.equal(ours_state[k], back[k])] == ["norm_final.weight"]
    # --transformer-only: the transformer folder alone, as for a bare checkpoint
    assert lumina_main(["convert", str(src), str(tmp_path / "t"), "--to", "diffusers", "--transformer-only"]) == 0
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    # a pixel-space pipeline has no diffusers equivalent: refused, no traceback, the flag named
    pixel = save_pipeline(tmp_path / "pixel", pipe.model.__class__(pipe.model.config.replace(in_channels=3)),
                          text_encoder_spec={"path": str(pipe.text_encoder.path)}, autoencoder_spec={"kind": "pixel"})
    capsys.readouterr()
    assert lumina_main(["convert", str(pixel), str(tmp_path / "p"), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert "AutoencoderKL" in err and "--transformer-only" in err and "Traceback" not in err
    assert lumina_main(["convert", str(tmp_path / "missing"), str(tmp_path / "m"), "--to", "lumina"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
