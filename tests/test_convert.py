"""Checkpoint layouts: exact round trips ours <-> official <-> diffusers, detection, errors, CLI."""

from __future__ import annotations

import argparse

import pytest
import torch
from diffusers import Lumina2Transformer2DModel
from safetensors.torch import save_file

from lumina_lightning.cli import main as lumina_main
from lumina_lightning.models import CheckpointMismatchError, NextDiT, detect_format, load_nextdit, save_nextdit
from lumina_lightning.models.convert import (
    COMFY_PREFIX,
    ConversionError,
    config_to_diffusers,
    diffusers_to_official,
    infer_config_from_official,
    official_to_diffusers,
)
from lumina_lightning.models.io import read_state
from test_model import TINY_CONFIGS, caption_batch, make_config, randomised


@pytest.fixture(params=["gqa2-ref2", "gqa3-ref1"])
def model(request) -> NextDiT:
    model = randomised(NextDiT(make_config(**TINY_CONFIGS[request.param]))).eval()
    # norm_final is never used, so it is never trained and stays at its init (ones) in real
    # checkpoints; diffusers drops it and the way back refills ones (spec §1.2, §2.3).
    torch.nn.init.ones_(model.norm_final.weight)
    return model


def assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trip_ours_official_diffusers_is_exact(model, tmp_path):
    ours = tmp_path / "ours.safetensors"
    save_nextdit(model, ours, "lumina")
    m1 = load_nextdit(ours)
    assert m1.config == model.config
    save_nextdit(m1, tmp_path / "official", "official")
    m2 = load_nextdit(tmp_path / "official")
    save_nextdit(m2, tmp_path / "diffusers", "diffusers")
    m3 = load_nextdit(tmp_path / "diffusers")
    save_nextdit(m3, tmp_path / "back", "lumina")
    m4 = load_nextdit(tmp_path / "back")
    for m in (m1, m2, m3, m4):
        assert_same_weights(model.state_dict(), m.state_dict())
    assert m4.config == model.config


def test_key_maps_are_inverse_with_config_derived_split(model):
    sd = model.state_dict()
    diff = official_to_diffusers(sd, model.config)
    q, k, v = model.config.qkv_split
    assert diff["layers.0.attn.to_q.weight"].shape[0] == q and diff["layers.0.attn.to_k.weight"].shape[0] == k
    assert "context_refiner.0.norm1.weight" in diff and "layers.0.norm1.norm.weight" in diff
    back = diffusers_to_official(diff, model.config)
    assert_same_weights(sd, back)


def test_diffusers_loads_our_diffusers_export(model, tmp_path):
    save_nextdit(model, tmp_path / "d", "diffusers")
    twin = Lumina2Transformer2DModel.from_pretrained(tmp_path / "d").eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.25, 0.75])
    feats, mask = caption_batch(2, 6, 32, [6, 3])
    with torch.no_grad():
        assert (model(x, t, feats, mask) - twin(x, t, feats, mask).sample).abs().max() <= 1e-5


def test_load_diffusers_save_pretrained_folder_and_pipeline_layout(model, tmp_path):
    save_nextdit(model, tmp_path / "d", "diffusers")
    twin = Lumina2Transformer2DModel.from_pretrained(tmp_path / "d")
    twin.save_pretrained(tmp_path / "pipe" / "transformer")  # a Lumina2Pipeline folder's layout
    assert detect_format(tmp_path / "pipe") == "diffusers"
    assert_same_weights(model.state_dict(), load_nextdit(tmp_path / "pipe").state_dict())


def test_comfyui_prefixed_single_file_official_and_diffusers_keys(model, tmp_path):
    sd = {COMFY_PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "comfy.safetensors")
    assert detect_format(tmp_path / "comfy.safetensors") == "official"
    loaded = load_nextdit(tmp_path / "comfy.safetensors", axes_dims=model.config.axes_dims)
    assert_same_weights(model.state_dict(), loaded.state_dict())
    diff = {COMFY_PREFIX + k: v for k, v in official_to_diffusers(model.state_dict(), model.config).items()}
    save_file(diff, tmp_path / "diff.safetensors")
    assert detect_format(tmp_path / "diff.safetensors") == "diffusers"
    loaded = load_nextdit(tmp_path / "diff.safetensors", axes_dims=model.config.axes_dims,
                          multiple_of=model.config.multiple_of)
    assert_same_weights(model.state_dict(), loaded.state_dict())


def test_official_pth_without_model_args_infers_config(tmp_path):
    model = randomised(NextDiT(make_config(dim=96, n_heads=6, n_kv_heads=2, n_layers=2, n_refiner_layers=1,
                                           axes_dims=[4, 6, 6], multiple_of=16, cap_feat_dim=40)))
    torch.save(model.state_dict(), tmp_path / "consolidated.00-of-01.pth")
    _, cfg, fmt = read_state(tmp_path, overrides={"axes_dims": [4, 6, 6], "axes_lens": [300, 64, 64]})
    assert fmt == "official"
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.n_refiner_layers, cfg.cap_feat_dim,
            cfg.in_channels, cfg.ffn_hidden_dim) == (96, 6, 2, 2, 1, 40, 4, model.config.ffn_hidden_dim)
    loaded = load_nextdit(tmp_path, axes_dims=[4, 6, 6], axes_lens=[300, 64, 64])
    assert_same_weights(model.state_dict(), loaded.state_dict())


def test_official_model_args_namespace_is_read_safely(tmp_path, model):
    save_nextdit(model, tmp_path / "o", "official", ema_state_dict=model.state_dict())
    args = torch.load(tmp_path / "o" / "model_args.pth", weights_only=False)
    assert isinstance(args, argparse.Namespace) and args.qk_norm is True
    # an official-style Namespace without our exact config: factory name + shapes
    torch.save(argparse.Namespace(model="NextDiT_debug", qk_norm=True), tmp_path / "o" / "model_args.pth")
    assert load_nextdit(tmp_path / "o", ema=True).config.dim == model.config.dim


def test_ema_selection(model, tmp_path):
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    save_nextdit(model, tmp_path / "m.safetensors", "lumina", ema_state_dict=ema)
    raw = load_nextdit(tmp_path / "m.safetensors")
    avg = load_nextdit(tmp_path / "m.safetensors", ema="auto")
    assert torch.equal(raw.x_embedder.weight, model.x_embedder.weight)
    assert torch.equal(avg.x_embedder.weight, model.x_embedder.weight + 1)
    save_nextdit(model, tmp_path / "plain.safetensors", "lumina")
    with pytest.raises(FileNotFoundError, match="EMA"):
        load_nextdit(tmp_path / "plain.safetensors", ema=True)


def test_partial_checkpoint_lists_missing_unexpected_and_mismatched_keys(model, tmp_path):
    sd = dict(model.state_dict())
    del sd["layers.1.feed_forward.w2.weight"]
    sd["layers.0.attention.bogus"] = torch.zeros(3)
    sd["final_layer.linear.bias"] = torch.zeros(5)
    save_nextdit(None, tmp_path / "bad.safetensors", "lumina", state_dict=sd, config=model.config)
    with pytest.raises(CheckpointMismatchError) as err:
        load_nextdit(tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "missing keys (1)" in msg and "layers.1.feed_forward.w2.weight" in msg
    assert "unexpected keys (1)" in msg and "layers.0.attention.bogus" in msg
    assert "final_layer.linear.bias: (5,) vs (16,)" in msg


def test_wrong_config_override_is_refused_not_half_loaded(model, tmp_path):
    save_nextdit(model, tmp_path / "m.safetensors", "lumina")
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_nextdit(tmp_path / "m.safetensors", cap_feat_dim=64)


def test_unknown_keys_fail_conversion(model):
    sd = dict(model.state_dict())
    sd["something.else"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="something.else"):
        official_to_diffusers(sd, model.config)


def test_detect_format_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no known Next-DiT checkpoint"):
        detect_format(tmp_path / "empty")


def test_convert_cli_round_trip_and_dtype(model, tmp_path, capsys):
    save_nextdit(model, tmp_path / "src.safetensors", "lumina")
    assert lumina_main(["convert", str(tmp_path / "src.safetensors"), str(tmp_path / "off"), "--to", "official"]) == 0
    assert lumina_main(["convert", str(tmp_path / "off"), str(tmp_path / "diff"), "--to", "diffusers"]) == 0
    assert lumina_main(["convert", str(tmp_path / "diff"), str(tmp_path / "bf16.safetensors"), "--to", "lumina",
                        "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "converted" in out and "parameters" in out
    back = load_nextdit(tmp_path / "bf16.safetensors")
    assert back.x_embedder.weight.dtype == torch.bfloat16
    assert torch.equal(back.x_embedder.weight, model.x_embedder.weight.to(torch.bfloat16))


def test_interrupted_save_keeps_previous_file(model, tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    save_nextdit(model, target, "lumina")
    before = target.read_bytes()
    import lumina_lightning.models.io as io

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_nextdit(model, target, "lumina")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left behind


def test_convert_refuses_data_prediction_models_for_velocity_layouts(model, tmp_path, capsys):
    from lumina_lightning.sampling.pipeline_io import save_pipeline

    src = save_pipeline(tmp_path / "pipe", model, text_encoder_spec={"path": "minilm"},
                        autoencoder_spec={"kind": "pixel"}, prediction="data")
    for to in ("official", "diffusers"):
        assert lumina_main(["convert", str(src), str(tmp_path / to), "--to", to]) == 2
        assert "predicts 'data'" in capsys.readouterr().err and not (tmp_path / to).exists()
    assert lumina_main(["convert", str(src), str(tmp_path / "ours.safetensors"), "--to", "lumina"]) == 0
    assert "note:" in capsys.readouterr().err
    assert torch.equal(load_nextdit(tmp_path / "ours.safetensors").x_embedder.weight, model.x_embedder.weight)


def test_ffn_width_from_a_multiplier_is_inferred_exactly():
    # 0.34 · 4 · 176 = 239.36 -> 240 with multiple_of 16; no power-of-two multiple_of without the
    # multiplier gives 240, and int(240 / 704 · 704) rounds to 239 in floating point
    cfg = make_config(dim=176, n_heads=11, n_kv_heads=1, n_layers=1, n_refiner_layers=1, axes_dims=[4, 6, 6],
                      ffn_dim_multiplier=0.34, multiple_of=16)
    assert cfg.ffn_hidden_dim == 240
    state = NextDiT(cfg).state_dict()
    inferred = infer_config_from_official(state, overrides={"axes_dims": [4, 6, 6]})
    assert inferred.ffn_hidden_dim == 240
    NextDiT(inferred).load_state_dict(state)


def test_official_file_with_ema_requested_and_truncated_checkpoints(tmp_path):
    cfg = make_config(**TINY_CONFIGS["gqa2-ref2"])
    raw, ema = randomised(NextDiT(cfg), seed=1), randomised(NextDiT(cfg), seed=2)
    folder = tmp_path / "official"
    folder.mkdir()
    torch.save(raw.state_dict(), folder / "consolidated.00-of-01.pth")
    # a file given with ema=True: its EMA sibling, or an error, never the raw weights silently
    with pytest.raises(FileNotFoundError, match="EMA weights requested"):
        read_state(folder / "consolidated.00-of-01.pth", ema=True, overrides={"axes_dims": [4, 6, 6]})
    torch.save(ema.state_dict(), folder / "consolidated_ema.00-of-01.pth")
    state, _, _ = read_state(folder / "consolidated.00-of-01.pth", ema=True, overrides={"axes_dims": [4, 6, 6]})
    assert torch.equal(state["x_embedder.weight"], ema.state_dict()["x_embedder.weight"])
    state, _, _ = read_state(folder / "consolidated.00-of-01.pth", ema="auto", overrides={"axes_dims": [4, 6, 6]})
    assert torch.equal(state["x_embedder.weight"], raw.state_dict()["x_embedder.weight"])  # the file named

    # the last main block lost: model_args.pth names the size, so its depth is known
    debug = NextDiT(make_config(dim=32, n_heads=2, n_kv_heads=1, n_layers=2, n_refiner_layers=1, axes_dims=[4, 6, 6],
                                cap_feat_dim=32, axes_lens=[300, 64, 64]))
    cut = tmp_path / "cut"
    cut.mkdir()
    torch.save({k: v for k, v in debug.state_dict().items() if not k.startswith("layers.1.")},
               cut / "consolidated.00-of-01.pth")
    torch.save(argparse.Namespace(model="NextDiT_debug", qk_norm=True), cut / "model_args.pth")
    with pytest.raises(ValueError, match="holds 1 main and 1 refiner blocks.*names a model with 2 and 1"):
        load_nextdit(cut)
    # a block missing in the middle is caught from the tensors alone
    deeper = NextDiT(debug.config.replace(n_layers=3))
    gap = {k: v for k, v in deeper.state_dict().items() if not k.startswith("layers.1.")}
    with pytest.raises(ConversionError, match=r"layers blocks \[1\] are missing"):
        infer_config_from_official(gap, overrides={"axes_dims": [4, 6, 6]})


def test_convert_cli_refuses_a_pickle_that_is_not_weights_only(tmp_path, capsys):
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"weights": torch.zeros(2), "code": argparse.ArgumentParser}, folder / "consolidated.00-of-01.pth")
    assert lumina_main(["convert", str(folder), str(tmp_path / "out"), "--to", "lumina"]) == 2
    err = capsys.readouterr().err
    assert "not a weights-only checkpoint" in err and "Traceback" not in err


def test_loaded_models_say_whether_they_hold_the_ema_weights(tmp_path):
    """``ema="auto"`` picks EMA weights where a checkpoint has them; the model records which it got,
    for every layout that can hold both (and diffusers, which holds one)."""
    model = NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"]))
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    for fmt in ("lumina", "official"):
        save_nextdit(model, tmp_path / fmt, fmt=fmt, ema_state_dict=ema)
        assert load_nextdit(tmp_path / fmt, ema="auto").weights_ema is True
        assert load_nextdit(tmp_path / fmt, ema=False).weights_ema is False
        plain = tmp_path / f"{fmt}_plain"
        save_nextdit(model, plain, fmt=fmt)
        assert load_nextdit(plain, ema="auto").weights_ema is False
    save_nextdit(model, tmp_path / "diffusers", fmt="diffusers")
    assert load_nextdit(tmp_path / "diffusers", ema="auto").weights_ema is False


@pytest.mark.parametrize("fmt, target", [("lumina", "folder"), ("lumina", "m.safetensors"), ("official", "folder")])
def test_saving_without_ema_over_an_earlier_save_removes_its_ema(tmp_path, fmt, target, caplog):
    """ema="auto" (conversion's and pipeline loading's default) must not load an earlier run's EMA file."""
    old = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])), seed=1)
    new = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])), seed=2)
    path = tmp_path / target
    save_nextdit(old, path, fmt, ema_state_dict=old.state_dict())
    assert load_nextdit(path, ema="auto").weights_ema is True
    save_nextdit(new, path, fmt)
    loaded = load_nextdit(path, ema="auto")
    assert loaded.weights_ema is False
    assert_same_weights(new.state_dict(), loaded.state_dict())
    assert "EMA weights of an earlier save" in caplog.text


def test_diffusers_save_over_a_sharded_folder_replaces_its_shards(model, tmp_path):
    """The old shard index would win over the new single file, for us and for diffusers."""
    folder = tmp_path / "transformer"
    old = randomised(NextDiT(model.config), seed=5)
    kwargs = {k: v for k, v in config_to_diffusers(old.config).items() if not k.startswith("_")}
    twin = Lumina2Transformer2DModel(**kwargs)
    twin.load_state_dict(official_to_diffusers(old.state_dict(), old.config))
    twin.save_pretrained(folder, max_shard_size="200KB")  # sharded, like the released folder
    shards = list(folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    save_nextdit(model, folder, "diffusers")
    assert not any(p.exists() for p in shards)
    assert_same_weights(model.state_dict(), load_nextdit(folder).state_dict())
    theirs = Lumina2Transformer2DModel.from_pretrained(folder)
    assert torch.equal(theirs.x_embedder.weight, model.x_embedder.weight)
    assert torch.equal(theirs.layers[0].attn.to_q.weight, official_to_diffusers(model.state_dict(), model.config)[
        "layers.0.attn.to_q.weight"])


@pytest.mark.parametrize("first, sharded", [("diffusers", False), ("diffusers", True), ("lumina", False)])
def test_official_save_over_another_layout_replaces_it(tmp_path, first, sharded, caplog):
    """The earlier save's config.json would win detection over the official files just written (and
    load the old weights): the official save removes it and its weights."""
    old = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])), seed=1)
    new = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])), seed=2)
    torch.nn.init.ones_(new.norm_final.weight)
    folder = tmp_path / "ckpt"
    if sharded:
        kwargs = {k: v for k, v in config_to_diffusers(old.config).items() if not k.startswith("_")}
        twin = Lumina2Transformer2DModel(**kwargs)
        twin.load_state_dict(official_to_diffusers(old.state_dict(), old.config))
        twin.save_pretrained(folder, max_shard_size="200KB")
    else:
        save_nextdit(old, folder, first, ema_state_dict=old.state_dict() if first == "lumina" else None)
    save_nextdit(new, folder, "official")
    assert detect_format(folder) == "official"
    assert sorted(p.name for p in folder.iterdir()) == ["consolidated.00-of-01.pth", "model_args.pth"]
    assert_same_weights(new.state_dict(), load_nextdit(folder, ema="auto").state_dict())
    assert f"removing the {first} checkpoint of an earlier save" in caplog.text
    # a config.json that is neither ours nor diffusers' is not ours to remove
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "something else"}')
    save_nextdit(new, other, "official")
    assert (other / "config.json").is_file() and detect_format(other) == "official"


@pytest.mark.parametrize("src_kind, dst_of", [
    ("folder", lambda src: src),
    ("folder", lambda src: src / "."),
    ("pipeline", lambda src: src / "transformer"),
    ("pipeline", lambda src: src),
    ("folder", lambda src: src / "model.safetensors"),
    ("file", lambda src: src),
    ("file", lambda src: src.parent),
])
def test_convert_refuses_to_write_over_its_source(tmp_path, capsys, src_kind, dst_of):
    """In place, --ema auto wrote the EMA weights into model.safetensors and then deleted
    model_ema.safetensors as stale: both weight sets gone. Refused before anything is read."""
    raw = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])), seed=1)
    ema = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])), seed=2)
    if src_kind == "file":
        src = tmp_path / "m" / "m.safetensors"
        save_nextdit(raw, src, "lumina", ema_state_dict=ema.state_dict())
    else:
        src = tmp_path / "src"
        save_nextdit(raw, src / "transformer" if src_kind == "pipeline" else src, "lumina",
                     ema_state_dict=ema.state_dict())
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    dst = dst_of(src)
    to = "lumina" if str(dst).endswith(".safetensors") or src_kind != "file" else "official"
    assert lumina_main(["convert", str(src), str(dst), "--to", to, "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "converting in place would overwrite" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    # a destination beside the source is fine
    assert lumina_main(["convert", str(src), str(tmp_path / "elsewhere"), "--to", "lumina"]) == 0


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("layout", ["lumina-folder", "lumina-ema", "lumina-file", "diffusers", "diffusers-sharded",
                                    "corrupt-header"])
def test_corrupt_safetensors_is_named_by_every_load_and_the_clis(tmp_path, capsys, layout):
    model = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])))
    src = tmp_path / "src"
    if layout in ("lumina-folder", "lumina-ema", "corrupt-header"):
        save_nextdit(model, src, "lumina", ema_state_dict=model.state_dict())
        bad = src / ("model_ema.safetensors" if layout == "lumina-ema" else "model.safetensors")
    elif layout == "lumina-file":
        src = tmp_path / "m.safetensors"
        save_nextdit(model, src, "lumina")
        bad = src
    elif layout == "diffusers":
        save_nextdit(model, src, "diffusers")
        bad = src / "diffusion_pytorch_model.safetensors"
    elif layout == "diffusers-sharded":
        kwargs = {k: v for k, v in config_to_diffusers(model.config).items() if not k.startswith("_")}
        twin = Lumina2Transformer2DModel(**kwargs)
        twin.load_state_dict(official_to_diffusers(model.state_dict(), model.config))
        twin.save_pretrained(src, max_shard_size="200KB")
        bad = sorted(src.glob("diffusion_pytorch_model-*.safetensors"))[-1]
    if layout == "corrupt-header":
        bad.write_bytes(b"\xff" * 64)
    else:
        _truncate(bad)
    with pytest.raises(ValueError, match=f"{bad.name} is not a readable .safetensors file"):
        load_nextdit(src, ema="auto")
    assert lumina_main(["convert", str(src), str(tmp_path / "out"), "--to", "official"]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not a readable .safetensors file" in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("lumina")] == [err.strip().splitlines()[-1]]
    from training_utils import tiny_text_encoder

    code = lumina_main(["sample", "--ckpt", str(src), "--vae", "pixel", "--text-encoder", tiny_text_encoder(),
                        "a red circle", "--out", str(tmp_path / "samples")])
    err = capsys.readouterr().err
    assert code != 0 and f"{bad.name} is not a readable .safetensors file" in err and "Traceback" not in err


def test_training_checkpoint_files_load_weights_only(tmp_path):
    """A Lightning .ckpt of ours (loop, callback and scheduler state, our entries) needs no unpickling
    of arbitrary objects; one that does is refused, never run."""
    model = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt = {"epoch": 0, "global_step": 3, "pytorch-lightning_version": "2.5", "state_dict": state,
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1}}}},
            "callbacks": {"ModelCheckpoint{'monitor': 'step'}": {"best_model_path": "/x/step=3.ckpt"}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]}],
            "lr_schedulers": [{"last_epoch": 3}], "nextdit_config": model.config.to_dict(), "nextdit_prefix": "model.",
            "nextdit_ema_prefix": None}
    torch.save(ckpt, tmp_path / "ok.ckpt")
    assert detect_format(tmp_path / "ok.ckpt") == "lightning"
    assert_same_weights(model.state_dict(), load_nextdit(tmp_path / "ok.ckpt").state_dict())
    torch.save({**ckpt, "hyper_parameters": {"parser": argparse.ArgumentParser}}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="not a weights-only checkpoint"):
        load_nextdit(tmp_path / "evil.ckpt")


def test_a_checkpoint_missing_its_recorded_ema_says_so_and_blames_deepspeed_only_for_deepspeed(tmp_path):
    model = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])))
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 1,
                "nextdit_config": model.config.to_dict(), "nextdit_prefix": "model.",
                "nextdit_ema_prefix": "ema_model."}, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="holds none") as err:
        load_nextdit(tmp_path / "last.ckpt", ema=True)
    assert "incomplete or edited checkpoint" in str(err.value) and "DeepSpeed" not in str(err.value)
    assert_same_weights(model.state_dict(), load_nextdit(tmp_path / "last.ckpt", ema=False).state_dict())


def _distributed_checkpoint(folder, model, ema):
    """A folder laid out as Lightning's ModelParallelStrategy (FSDP2) writes it: torch DCP shards of
    {"state_dict": ..., "optimizer_states": ...} (.metadata, *.distcp) and the rest in meta.pt."""
    import warnings

    import torch.distributed.checkpoint as dcp

    state = {**{f"model.{k}": v for k, v in model.state_dict().items()},
             **{f"ema_model.{k}": v for k, v in ema.state_dict().items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = {"optimizer_0": {"state": {"0": {"step": torch.tensor(3.0)}}}}
        dcp.save({"state_dict": state, "optimizer_states": optimizer}, checkpoint_id=folder, no_dist=True)
    torch.save({"global_step": 3, "nextdit_config": model.config.to_dict(), "nextdit_prefix": "model.",
                "nextdit_ema_prefix": "ema_model.", "loops": {}, "callbacks": {}}, folder / "meta.pt")
    return folder


def test_distributed_training_checkpoint_folder_loads_and_converts(tmp_path, capsys):
    """FSDP2 runs write last.ckpt/ and step=*.ckpt/ as DCP folders: sampling, conversion and
    init_from read them like a .ckpt file (no process group needed)."""
    from lumina_lightning.models.io import is_distributed_checkpoint, read_checkpoint_meta

    raw = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])), seed=1)
    ema = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])), seed=2)
    last = _distributed_checkpoint(tmp_path / "last.ckpt", raw, ema)
    assert (last / ".metadata").is_file() and is_distributed_checkpoint(last)
    assert detect_format(last) == "lightning"
    assert read_checkpoint_meta(last)["global_step"] == 3
    assert_same_weights(raw.state_dict(), load_nextdit(last, ema=False).state_dict())
    loaded = load_nextdit(last, ema="auto")
    assert loaded.weights_ema is True
    assert_same_weights(ema.state_dict(), loaded.state_dict())
    state, config, fmt = read_state(last, ema=True)
    assert fmt == "lightning" and config == raw.config
    assert lumina_main(["convert", str(last), str(tmp_path / "out"), "--to", "lumina", "--ema", "false"]) == 0
    assert_same_weights(raw.state_dict(), load_nextdit(tmp_path / "out").state_dict())
    # sampling sees a training checkpoint too (and reads its recorded prediction for init_from)
    from lumina_lightning.sampling.pipeline_io import describe, source_prediction

    assert describe(last) == "ckpt" and source_prediction(last) == "velocity"
    # a folder named .ckpt without the DCP metadata is still no checkpoint
    (tmp_path / "empty.ckpt").mkdir()
    with pytest.raises(ValueError, match="no known Next-DiT checkpoint"):
        detect_format(tmp_path / "empty.ckpt")


class _Planted:
    """Unpickling this runs code (os.system-like): stands in for a tampered checkpoint's payload."""
    ran = False

    def __reduce__(self):
        return (_plant, ())


def _plant():
    _Planted.ran = True
    return {}


def test_distributed_checkpoint_metadata_holding_code_is_refused_unrun(tmp_path):
    """torch reads a DCP folder's .metadata with a plain pickle.load: a downloaded last.ckpt/ folder
    could run code as soon as `lumina sample` / `convert` / init_from opens it. It is checked first."""
    import pickle

    from lumina_lightning.models.io import read_checkpoint_meta

    model = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])), seed=1)
    good = _distributed_checkpoint(tmp_path / "good.ckpt", model, model)
    assert_same_weights(model.state_dict(), load_nextdit(good, ema=False).state_dict())  # a real one passes

    evil = _distributed_checkpoint(tmp_path / "evil.ckpt", model, model)
    with open(evil / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own file: safe to read here
    metadata.storage_data["planted"] = _Planted()
    with open(evil / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    assert read_checkpoint_meta(evil)["global_step"] == 3  # meta.pt itself is fine (weights-only)
    with pytest.raises(ValueError, match=r"not a plain distributed-checkpoint metadata file.*names .*_plant"):
        load_nextdit(evil, ema=False)
    assert not _Planted.ran
    assert lumina_main(["convert", str(evil), str(tmp_path / "out"), "--to", "lumina"]) != 0
    assert not _Planted.ran and not (tmp_path / "out").exists()


def test_a_resume_checkpoint_holding_code_is_refused_before_lightning_unpickles_it(tmp_path):
    """`resume: <downloaded last.ckpt>` goes to Lightning, torch's DCP reader or DeepSpeed, which unpickle
    fully: resolve_resume checks the files first (a folder by content, also `.last.ckpt.old`)."""
    import pickle

    from lumina_lightning.training.session import resolve_resume

    model = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])), seed=1)
    good = _distributed_checkpoint(tmp_path / "good.ckpt", model, model)
    assert resolve_resume(str(good), tmp_path, strategy="fsdp") == str(good)
    evil = _distributed_checkpoint(tmp_path / "ckpts" / ".last.ckpt.old", model, model)
    with open(evil / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    metadata.storage_data["planted"] = _Planted()
    with open(evil / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    (tmp_path / "ckpts" / "last.ckpt").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="not a plain distributed-checkpoint metadata file"):
        resolve_resume("auto", tmp_path / "ckpts", strategy="fsdp")
    with pytest.raises(ValueError, match="not a plain distributed-checkpoint metadata file"):
        resolve_resume(str(evil), tmp_path, strategy="fsdp")
    assert not _Planted.ran
    file = tmp_path / "evil_file.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "hyper_parameters": {"parser": argparse.ArgumentParser}}, file)
    with pytest.raises(ValueError, match="not a weights-only checkpoint"):
        resolve_resume(str(file), tmp_path, strategy="auto")


def test_convert_set_values_are_typed_as_recipe_overrides_are(tmp_path, capsys):
    """`--set norm_eps=1e-6` is a number, as in a recipe (PyYAML's YAML 1.1 reads it as a string, which
    reached config.json as "1e-6"); a value of the wrong type is refused before the read."""
    import json

    model = randomised(NextDiT(make_config(dim=96, n_heads=6, n_kv_heads=2, n_layers=2, n_refiner_layers=1,
                                           axes_dims=[4, 6, 6], multiple_of=16, cap_feat_dim=40)))
    (tmp_path / "src").mkdir()
    torch.save(model.state_dict(), tmp_path / "src" / "consolidated.00-of-01.pth")
    argv = ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "lumina", "--set", "axes_dims=[4, 6, 6]",
            "--set", "axes_lens=[300,64,64]"]
    assert lumina_main([*argv, "--set", "norm_eps=1e-6"]) == 0
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["norm_eps"] == 1e-6 and written["axes_dims"] == [4, 6, 6]
    assert lumina_main([*argv, "--set", "norm_eps=tiny"]) == 2
    assert "--set norm_eps: expected a number > 0, got 'tiny'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [[], ["--transformer-only"]])
def test_a_training_checkpoint_converts_to_its_transformer_alone_and_says_so(tmp_path, capsys, flag):
    """--transformer-only picks the transformer over a whole Lumina2Pipeline for a pipeline folder; a
    training checkpoint is read weights-only, so it converts to its transformer alone with or without
    the flag, and the summary line says so (and where a whole pipeline comes from)."""
    import json

    model = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])))
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 1,
                "nextdit_config": model.config.to_dict(), "nextdit_prefix": "model.", "nextdit_ema_prefix": None},
               tmp_path / "last.ckpt")
    assert lumina_main(["convert", str(tmp_path / "last.ckpt"), str(tmp_path / "out"), "--to", "diffusers", *flag]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["_class_name"] == "Lumina2Transformer2DModel"
    assert not (tmp_path / "out" / "model_index.json").exists()
    out = capsys.readouterr().out
    assert "(diffusers: the transformer alone, a Lumina2Transformer2DModel folder;" in out
    assert "a pipeline folder (a run's export/) converts to a whole Lumina2Pipeline" in out
