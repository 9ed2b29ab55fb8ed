"""The tiny conv autoencoder (``autoencoder.kind: conv``): shapes, I/O, training, loading by kind."""

from __future__ import annotations

import json

import pytest
import torch

from lumina_lightning.encoders import build_autoencoder
from lumina_lightning.encoders.conv_autoencoder import (
    ConvAutoencoder,
    ConvAutoencoderConfig,
    TinyConvAutoencoder,
    is_conv_autoencoder,
    load_conv_autoencoder,
    save_conv_autoencoder,
    train_conv_autoencoder,
)


def _shapes(n: int = 48, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Flat-coloured squares on a flat background: the kind of image the tiny pipeline renders."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, 3, size, size)
    for i in range(n):
        bg, fg = torch.rand(3, generator=g) * 2 - 1, torch.rand(3, generator=g) * 2 - 1
        x[i] = bg.view(3, 1, 1)
        a, b = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
        s = int(torch.randint(size // 4, size // 2, (1,), generator=g))
        x[i, :, a:a + s, b:b + s] = fg.view(3, 1, 1)
    return x


@pytest.mark.parametrize("downsample", [2, 4, 8])
def test_shapes_follow_the_downsampling(downsample):
    m = ConvAutoencoder(ConvAutoencoderConfig(channels=4, latent_channels=3, downsample=downsample))
    x = torch.randn(2, 3, 32, 48)
    z = m.encoder(x)
    assert z.shape == (2, 3, 32 // downsample, 48 // downsample)
    assert m.decoder(z).shape == x.shape


@pytest.mark.parametrize("bad", [1, 3, 6, 0])
def test_downsample_must_be_a_power_of_two(bad):
    with pytest.raises(ValueError, match="power of two"):
        ConvAutoencoderConfig(downsample=bad)


def test_save_load_roundtrip_and_mismatch_is_named(tmp_path):
    m = ConvAutoencoder(ConvAutoencoderConfig(channels=4, latent_channels=2, downsample=4, scaling_factor=0.5,
                                              shift_factor=0.1))
    save_conv_autoencoder(m, tmp_path / "ae")
    assert is_conv_autoencoder(tmp_path / "ae") and not is_conv_autoencoder(tmp_path)
    back = load_conv_autoencoder(tmp_path / "ae")
    assert back.config == m.config
    for (k, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    # a config that no longer matches the weights: the error lists the keys
    cfg = json.loads((tmp_path / "ae" / "config.json").read_text())
    cfg["downsample"] = 8
    (tmp_path / "ae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not match its config: missing \['decoder.10.bias'.*shape .*encoder.4.weight"):
        load_conv_autoencoder(tmp_path / "ae")


def test_wrapper_normalises_latents_and_is_frozen(tmp_path):
    m = ConvAutoencoder(ConvAutoencoderConfig(channels=4, latent_channels=2, downsample=4, scaling_factor=2.0,
                                              shift_factor=0.25))
    save_conv_autoencoder(m, tmp_path / "ae")
    ae = build_autoencoder("conv", str(tmp_path / "ae"), dtype=torch.bfloat16)  # dtype ignored: always fp32
    assert isinstance(ae, TinyConvAutoencoder)
    assert (ae.latent_channels, ae.downsample) == (2, 4)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = ae.encode(x)
    assert torch.allclose(z, (m.encoder(x) - 0.25) * 2.0, atol=1e-6)
    assert torch.allclose(ae.decode(z), m.decoder(z / 2.0 + 0.25).clamp(-1, 1), atol=1e-6)
    ae.train()
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    ident = ae.identity()
    assert ident["kind"] == "conv" and ident["scaling_factor"] == 2.0 and ident["shift_factor"] == 0.25
    with pytest.raises(ValueError, match="needs the local folder"):
        build_autoencoder("conv", None)


def test_training_learns_and_stores_the_latent_statistics(tmp_path):
    x = _shapes()
    untrained = ConvAutoencoder(ConvAutoencoderConfig(channels=8, latent_channels=4, downsample=4))
    with torch.no_grad():
        base = float((untrained(x[-6:]).clamp(-1, 1) - x[-6:]).pow(2).mean())
    losses = []
    res = train_conv_autoencoder(x, tmp_path / "ae", config=ConvAutoencoderConfig(channels=8, latent_channels=4,
                                                                                  downsample=4),
                                 steps=300, batch_size=8, lr=5e-3, warmup_steps=5, seed=0,
                                 log=lambda step, loss: losses.append(loss))
    assert len(losses) == 300
    assert sum(losses[-10:]) < 0.6 * sum(losses[:10])
    assert res["recon_mse"] < 0.5 * base
    ae = TinyConvAutoencoder(tmp_path / "ae")
    assert ae.scaling_factor == pytest.approx(1.0 / res["latent_std"])
    assert ae.shift_factor == pytest.approx(res["latent_mean"])
    # normalised training latents: mean ~0, std ~1
    z = ae.encode(x[:-6])
    assert abs(float(z.mean())) < 0.1 and float(z.std()) == pytest.approx(1.0, abs=0.1)
    # deterministic for a seed
    res2 = train_conv_autoencoder(x, tmp_path / "ae2", config=ConvAutoencoderConfig(channels=8, latent_channels=4,
                                                                                    downsample=4),
                                  steps=300, batch_size=8, lr=5e-3, warmup_steps=5, seed=0)
    assert res2["recon_mse"] == res["recon_mse"]


def test_training_rejects_sizes_that_do_not_divide(tmp_path):
    with pytest.raises(ValueError, match="multiple of downsample"):
        train_conv_autoencoder(torch.zeros(4, 3, 20, 20), tmp_path / "ae", steps=1)


def test_train_from_manifest_skips_and_counts_unreadable_images(tmp_path):
    from lumina_lightning.encoders.conv_autoencoder import train_from_manifest
    from training_utils import tiny_synthetic

    synth = tiny_synthetic()
    lines = (synth / "train.jsonl").read_text().splitlines()[:12]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = [json.loads(line) for line in lines]
    for r in records:
        r["image"] = str(synth / r["image"])
    records.append({"image": str(tmp_path / "broken.png"), "captions": {"short": "x"}})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    spec = {"steps": 2, "batch_size": 4, "channels": 4, "latent_channels": 2, "downsample": 4}
    res = train_from_manifest(tmp_path / "m.jsonl", tmp_path / "ae", spec)
    assert (res["images"], res["skipped"]) == (12, 1)
    assert is_conv_autoencoder(tmp_path / "ae")
    with pytest.raises(ValueError, match="unknown autoencoder.train key"):
        train_from_manifest(tmp_path / "m.jsonl", tmp_path / "ae2", {"step": 2})


def test_latent_run_trains_its_autoencoder_once_then_exports_a_pipeline_that_uses_it(tmp_path):
    from lumina_lightning.sampling.pipeline_io import load_pipeline
    from lumina_lightning.training.recipe import RecipeError, load_recipe
    from lumina_lightning.training.run import train
    from training_utils import tiny_recipe

    ae_dir = tmp_path / "ae"
    sections = dict(
        autoencoder={"kind": "conv", "path": str(ae_dir),
                     "train": {"steps": 3, "batch_size": 4, "channels": 4, "latent_channels": 4, "downsample": 4}},
        model={"size": "NextDiT_debug", "overrides": {"in_channels": 4, "cap_feat_dim": 32, "patch_size": 1}},
        data={"patch": 4},
    )
    recipe = tiny_recipe(tmp_path / "a", **sections)
    with pytest.raises(RecipeError, match=r"unknown key `autoencoder.train.step`.*did you mean `steps`"):
        load_recipe(recipe, ["autoencoder.train.step=3"])
    with pytest.raises(RecipeError, match="only for autoencoder.kind=conv"):
        load_recipe(recipe, ["autoencoder.kind=pixel"])
    result = train(load_recipe(recipe, ["trainer.max_steps=2"]))
    assert is_conv_autoencoder(ae_dir)
    stamp = (ae_dir / "model.safetensors").stat().st_mtime_ns
    spec = json.loads((result.export_dir / "pipeline.json").read_text())["autoencoder"]
    assert spec["kind"] == "conv" and spec["path"] == str(ae_dir.resolve())
    pipe = load_pipeline(result.export_dir)
    assert isinstance(pipe.autoencoder, TinyConvAutoencoder)
    out = pipe("a red circle", width=16, height=16, steps=2, solver="euler")
    assert out.latents.shape == (1, 4, 4, 4) and out.images[0].size == (16, 16)
    # a second stage finds the autoencoder and does not train it again
    train(load_recipe(tiny_recipe(tmp_path / "b", **sections), ["trainer.max_steps=1"]))
    assert (ae_dir / "model.safetensors").stat().st_mtime_ns == stamp
    # a VAE given explicitly keeps the latent scale and shift the export records (a recipe may
    # override the folder's), and a folder retrained in place is refused, not silently mis-scaled
    pipeline_json = result.export_dir / "pipeline.json"
    saved = json.loads(pipeline_json.read_text())
    saved["autoencoder"]["scaling_factor"] = 0.5
    pipeline_json.write_text(json.dumps(saved))
    assert load_pipeline(result.export_dir, vae=str(ae_dir)).autoencoder.scaling_factor == 0.5
    save_conv_autoencoder(load_conv_autoencoder(ae_dir), ae_dir / "copy")
    retrained = load_conv_autoencoder(ae_dir)
    with torch.no_grad():
        next(retrained.parameters()).add_(1.0)
    save_conv_autoencoder(retrained, ae_dir)
    from lumina_lightning.sampling.pipeline_io import PipelineLoadError

    for vae in (None, str(ae_dir)):
        with pytest.raises(PipelineLoadError, match="retrained since"):
            load_pipeline(result.export_dir, vae=vae)


def test_autoencoder_training_reads_images_relative_to_data_root(tmp_path):
    from lumina_lightning.encoders.conv_autoencoder import train_from_manifest
    from training_utils import tiny_synthetic

    synth = tiny_synthetic()
    (tmp_path / "m.jsonl").write_text("".join(line + "\n" for line in (synth / "train.jsonl").read_text().splitlines()[:8]))
    spec = {"steps": 1, "batch_size": 4, "channels": 4, "latent_channels": 2, "downsample": 4}
    with pytest.raises(ValueError, match="no readable images"):  # paths are relative to the synthetic folder
        train_from_manifest(tmp_path / "m.jsonl", tmp_path / "ae0", spec)
    assert train_from_manifest(tmp_path / "m.jsonl", tmp_path / "ae", spec, root=synth)["images"] == 8


def test_data_cache_cli_takes_a_conv_autoencoder_and_the_recipe_factors(tmp_path):
    from lumina_lightning.data.cache import read_index
    from lumina_lightning.data.cli import main
    from lumina_lightning.encoders.text import build_tiny_text_encoder
    from training_utils import tiny_synthetic

    save_conv_autoencoder(ConvAutoencoder(ConvAutoencoderConfig(channels=4, latent_channels=2, downsample=4)),
                          tmp_path / "ae")
    te = build_tiny_text_encoder(tmp_path / "te")
    synth = tiny_synthetic()
    assert main(["cache", "--data", str(synth / "train.jsonl"), "--out", str(tmp_path / "cache"), "--vae", str(tmp_path / "ae"),
                 "--text-encoder", te, "--resolution", "16", "--patch", "4", "--scaling-factor", "0.5"]) == 0
    ident = read_index(tmp_path / "cache")["identity"]["autoencoder"]
    assert ident["kind"] == "conv" and ident["scaling_factor"] == 0.5


def test_build_autoencoder_refuses_a_folder_of_the_other_kind(tmp_path):
    """kind vae on a conv autoencoder folder (or conv on a diffusers VAE) failed in the loader with a
    message about some weights file name; now the kind is named as not matching the folder."""
    from lumina_lightning.encoders import build_tiny_vae

    conv = save_conv_autoencoder(ConvAutoencoder(ConvAutoencoderConfig(channels=4, latent_channels=3)), tmp_path / "c")
    vae = build_tiny_vae(tmp_path / "v")
    with pytest.raises(ValueError, match=rf"'vae' but {conv} holds a conv autoencoder .*does not match the folder"):
        build_autoencoder("vae", conv)
    with pytest.raises(ValueError, match=rf"'conv' but {vae} holds a diffusers VAE .*does not match the folder"):
        build_autoencoder("conv", vae)
    assert build_autoencoder("conv", conv).downsample == 8 and build_autoencoder("vae", vae).downsample == 8


def test_changed_train_settings_for_an_existing_autoencoder_are_named(tmp_path):
    """autoencoder.train changes were ignored for an existing folder, and the error that followed (a
    latent-channel mismatch) told the user to undo them; now the stale folder and the settings are named."""
    from lumina_lightning.encoders.conv_autoencoder import TRAIN_SETTINGS_NAME, check_train_settings, train_from_manifest
    from lumina_lightning.training.recipe import RecipeError, load_recipe
    from training_utils import tiny_recipe, tiny_synthetic

    spec = {"steps": 1, "batch_size": 4, "channels": 4, "latent_channels": 2, "downsample": 4}
    ae = tmp_path / "ae"
    train_from_manifest(tiny_synthetic() / "train.jsonl", ae, spec)
    assert json.loads((ae / TRAIN_SETTINGS_NAME).read_text())["settings"]["latent_channels"] == 2
    check_train_settings(ae, spec)  # the same settings: nothing to say
    check_train_settings(ae, {**spec, "manifest": "other.jsonl"})  # other data for a later stage: fine
    with pytest.raises(ValueError, match=rf"autoencoder.path {ae} already holds a conv autoencoder trained with "
                                         r"seed=0, latent_channels=2, but `autoencoder.train` asks for "
                                         r"seed=1, latent_channels=8: .*never retrained"):
        check_train_settings(ae, {**spec, "latent_channels": 8, "seed": 1})
    # folders from before train_settings.json: their architecture (config.json) is compared
    (ae / TRAIN_SETTINGS_NAME).unlink()
    check_train_settings(ae, {**spec, "steps": 5})
    with pytest.raises(ValueError, match="trained with downsample=4, but .* asks for downsample=8"):
        check_train_settings(ae, {k: v for k, v in spec.items() if k != "downsample"})
    # a recipe says so when it is validated, before anything runs
    recipe = tiny_recipe(tmp_path, autoencoder={"kind": "conv", "path": str(ae), "train": {**spec, "latent_channels": 8}},
                         model={"size": "NextDiT_debug", "overrides": {"in_channels": 8, "cap_feat_dim": 32,
                                                                       "patch_size": 1}}, data={"patch": 4})
    with pytest.raises(RecipeError, match=rf"{recipe}.*{ae} already holds a conv autoencoder trained with latent_channels=2"):
        load_recipe(recipe)
