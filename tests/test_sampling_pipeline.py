"""The text-to-image pipeline: seeds, sizes, settings, pipeline folders, checkpoints and the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lumina_lightning.models.io import save_nextdit
from lumina_lightning.sampling import (
    PipelineLoadError,
    kwargs_from_settings,
    load_pipeline,
    pipeline_spec,
    save_pipeline,
    snap_size,
    update_pipeline_defaults,
)
from lumina_lightning.sampling.cli import main as sample_main
from lumina_lightning.sampling.cli import build_parser, read_png_settings, read_prompts
from lumina_lightning.sampling.pipeline import LuminaPipeline
from lumina_lightning.sampling.pipeline_io import export_diffusers_pipeline, source_prediction
from lumina_lightning.sampling.testing import build_tiny_pipeline, randomize_
from lumina_lightning.sampling.timesteps import grid_for

FAST = dict(steps=3, solver="euler")
FAST_ARGS = ["--steps", "1", "--solver", "euler"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipe"))


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    """Our pipeline folder with the tiny model (pixel autoencoder) and its text encoder."""
    path = tmp_path_factory.mktemp("folder") / "pipeline"
    save_pipeline(path, pipe.model, text_encoder_spec={"path": pipe.text_encoder.path, "max_length": 256},
                  autoencoder_spec={"kind": "pixel"}, defaults={"shift": 3.0})
    return path


def test_seeds_are_per_image_and_deterministic(pipe):
    a = pipe(["a red circle", "two blue squares"], width=24, height=16, seed=10, num_images_per_prompt=2, **FAST)
    assert a.settings["seeds"] == [10, 11, 12, 13]
    b = pipe(["a red circle", "two blue squares"], width=24, height=16, seed=10, num_images_per_prompt=2, **FAST)
    assert torch.equal(a.latents, b.latents)
    assert [np.asarray(i).tolist() for i in a.images] == [np.asarray(i).tolist() for i in b.images]
    # image 3 (prompt 2, seed 13) does not change when the batch around it changes
    alone = pipe("two blue squares", width=24, height=16, seed=[13], **FAST)
    assert torch.allclose(alone.latents[0], a.latents[3], atol=1e-5)
    # different seeds differ; random seeds are recorded and reproduce
    assert not torch.allclose(a.latents[0], a.latents[1])
    r = pipe("a red circle", width=24, height=16, seed=None, **FAST)
    again = pipe("a red circle", width=24, height=16, seed=r.settings["seeds"], **FAST)
    assert torch.equal(r.latents, again.latents)
    with pytest.raises(ValueError, match="seeds"):
        pipe("a red circle", width=24, height=16, seed=[1, 2], **FAST)


def test_width_height_orientation(pipe):
    r = pipe("a red circle", width=40, height=16, seed=0, **FAST)
    assert r.images[0].size == (40, 16)  # PIL size is (width, height)
    assert tuple(r.latents.shape) == (1, 3, 16, 40)  # pixel autoencoder: (C, height, width)
    assert r.images[0].mode == "RGB"
    noise = pipe.make_noise([0], 40, 16)
    assert noise.shape == (1, 3, 16, 40)


def test_size_validation_and_snap(pipe, tmp_path):
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe("a red circle", width=33, height=16, seed=0, **FAST)
    assert pipe.snap_size(33, 16)[:2] == (34, 16) and pipe.snap_size(32, 16) == (32, 16, "")
    w, h, notice = snap_size(1000, 600, 16)
    assert (w, h) == (1008, 608) and "1008x608" in notice
    assert snap_size(4, 4, 16)[:2] == (16, 16)
    # the RoPE tables bound the size (NextDiT_debug: 64 patches per side)
    assert pipe.snap_size(10_000, 64)[0] == pipe.max_size[0] == 128
    with pytest.raises(ValueError, match="exceeds"):
        pipe("x", width=256, height=16, seed=0, **FAST)
    vae_pipe = build_tiny_pipeline(tmp_path, autoencoder="vae")
    assert vae_pipe.size_multiple == 16
    with pytest.raises(ValueError, match="multiples of 16"):
        vae_pipe("a red circle", width=40, height=32, seed=0, **FAST)


def test_settings_are_complete_and_json(pipe):
    r = pipe(["a red circle"], negative_prompt="blurry", system="align", width=24, height=16, seed=5, preset="fast",
             steps=4, progress=lambda i, n: None)
    s = json.loads(json.dumps(r.settings))
    for key in ("preset", "solver", "steps", "shift", "cfg_scale", "renorm", "cfg_trunc", "cfg_mode", "teacache",
                "teacache_version", "system", "seeds", "width", "height", "negative_prompt"):
        assert key in s
    assert s["preset"] == "fast" and s["solver"] == "dpm" and s["steps"] == 4 and s["system"] == "align"
    assert s["seeds"] == [5] and s["teacache"] > 0 and s["cfg_trunc"] == 0.25
    assert r.nfe == 4 and r.rows < 2 * r.nfe and r.elapsed > 0 and r.stats["guided_calls"] < 4
    # presets
    official = pipe.resolve("official")
    assert (official.solver, official.steps, official.shift, official.cfg_scale, official.renorm) == ("midpoint", 17, 6.0, 4.0, 1.0)
    diffusers = pipe.resolve("diffusers")
    assert (diffusers.solver, diffusers.steps, diffusers.cfg_mode) == ("euler", 30, "diffusers")
    with pytest.raises(ValueError, match="preset"):
        pipe.resolve("turbo")


def test_explicit_latents_and_negative_prompt(pipe):
    noise = pipe.make_noise([7], 24, 16)
    a = pipe("a red circle", width=24, height=16, latents=noise, **FAST)
    b = pipe("a red circle", width=24, height=16, seed=[7], **FAST)
    assert torch.equal(a.latents, b.latents) and a.settings["seeds"] == [None]
    c = pipe("a red circle", negative_prompt="a blue square", width=24, height=16, seed=[7], **FAST)
    assert not torch.allclose(c.latents, b.latents)
    with pytest.raises(ValueError, match="shape"):
        pipe("a red circle", width=24, height=16, latents=noise[:, :, :8], **FAST)


def test_validation_mode_is_restored(pipe):
    pipe.model.train()
    pipe("a red circle", width=16, height=16, seed=0, **FAST)
    assert pipe.model.training
    pipe.model.eval()


def test_pipeline_folder_round_trip(pipe, folder, tmp_path):
    spec = json.loads((folder / "pipeline.json").read_text())
    assert spec["autoencoder"] == {"kind": "pixel"} and spec["text_encoder"]["max_length"] == 256
    loaded = load_pipeline(folder)
    assert loaded.defaults == {"shift": 3.0} and loaded.resolve().shift == 3.0
    assert "resolution" not in spec and loaded.resolution is None  # not recorded: callers fall back
    a = pipe("a red circle", width=24, height=16, seed=1, shift=3.0, **FAST)
    b = loaded("a red circle", width=24, height=16, seed=1, **FAST)
    assert torch.equal(a.latents, b.latents)
    # EMA weights are preferred when present (ema="auto"), raw on request
    ema = randomize_(type(pipe.model)(pipe.model.config), seed=9).state_dict()
    save_pipeline(tmp_path / "with_ema", pipe.model, ema_state_dict=ema,
                  text_encoder_spec={"path": pipe.text_encoder.path}, autoencoder_spec={"kind": "pixel"})
    with_ema = load_pipeline(tmp_path / "with_ema")
    assert torch.equal(with_ema.model.x_embedder.weight, ema["x_embedder.weight"])
    raw = load_pipeline(tmp_path / "with_ema", ema=False)
    assert torch.equal(raw.model.x_embedder.weight, pipe.model.x_embedder.weight)


def test_cast_weights_only_on_cuda_in_a_lower_precision(pipe, folder):
    """``load_pipeline`` owns its model and asks for bf16 weights; they are cast only on CUDA with a
    dtype other than fp32, and the settings record which weights ran."""
    cpu = load_pipeline(folder, dtype=torch.bfloat16)
    assert cpu.cast_weights is False and next(cpu.model.parameters()).dtype == torch.float32
    r = cpu("a red circle", width=16, height=16, seed=1, **FAST)
    assert r.settings["weights_dtype"] == "float32" and r.settings["dtype"] == "bfloat16"
    with cpu.precision():  # no autocast on the CPU: the fp32 call is unchanged
        assert torch.is_autocast_enabled("cpu") is False
    assert LuminaPipeline(pipe.model, pipe.text_encoder, pipe.autoencoder, cast_weights=True).cast_weights is False


@pytest.mark.gpu
def test_cast_weights_on_cuda_match_fp32_weights_under_autocast(folder):
    """bf16-held weights (the official scripts' choice) against fp32 weights under bf16 autocast: the
    matmuls see the same bf16 weights, so the images agree to bf16 rounding."""
    plain = load_pipeline(folder, device="cuda", dtype=torch.bfloat16, cast_weights=False)
    cast = load_pipeline(folder, device="cuda", dtype=torch.bfloat16)
    assert cast.cast_weights and next(cast.model.parameters()).dtype == torch.bfloat16
    assert next(plain.model.parameters()).dtype == torch.float32
    for preset in ("official", "fast"):
        a = plain(["a red circle", "two blue squares"], width=32, height=32, seed=3, preset=preset)
        b = cast(["a red circle", "two blue squares"], width=32, height=32, seed=3, preset=preset)
        assert b.settings["weights_dtype"] == "bfloat16"
        assert (a.latents.float() - b.latents.float()).abs().max().item() < 0.05
    # the evaluation's validation loss calls the model directly, in the pipeline's precision
    from training_utils import tiny_synthetic

    from lumina_lightning.eval.metrics import validation_loss

    manifest = tiny_synthetic() / "test.jsonl"
    losses = [validation_loss(p, manifest, width=16, height=16, max_records=8, n_timesteps=2)["mean"] for p in (plain, cast)]
    assert np.isfinite(losses).all() and losses[1] == pytest.approx(losses[0], rel=0.05)


def test_trained_resolution_is_recorded_and_validated(pipe, tmp_path):
    folder = save_pipeline(tmp_path / "p", pipe.model, text_encoder_spec={"path": pipe.text_encoder.path},
                           autoencoder_spec={"kind": "pixel"}, resolution=32)
    assert json.loads((folder / "pipeline.json").read_text())["resolution"] == 32
    assert load_pipeline(folder).resolution == 32
    # `lumina sample` without --width/--height draws at that size
    rc = sample_main(["--ckpt", str(folder), "--prompt", "a red circle", "--out", str(tmp_path / "o"),
                      "--preset", "fast", "--steps", "1"])
    assert rc == 0
    [png] = (tmp_path / "o").glob("*.png")
    assert Image.open(png).size == (32, 32)


def test_data_prediction_is_recorded_and_sampled_as_a_velocity(pipe, folder, tmp_path):
    assert json.loads((folder / "pipeline.json").read_text())["prediction"] == "velocity"
    assert load_pipeline(folder).prediction == "velocity" and source_prediction(folder) == "velocity"
    data = save_pipeline(tmp_path / "data", pipe.model, text_encoder_spec={"path": pipe.text_encoder.path},
                         autoencoder_spec={"kind": "pixel"}, prediction="data")
    assert json.loads((data / "pipeline.json").read_text())["prediction"] == "data"
    loaded = load_pipeline(data)
    assert loaded.prediction == "data" and source_prediction(data) == "data"
    # the sampler integrates the velocity the output stands for: Euler by hand, unguided
    noise = pipe.make_noise([3], 16, 16)
    got = loaded("a red circle", width=16, height=16, latents=noise, cfg_scale=1.0, **FAST).latents
    (feats, mask), _ = loaded.encode_prompts(["a red circle"], None, loaded.default_system)
    grid = grid_for("euler", FAST["steps"], loaded.resolve(**FAST).shift).tolist()
    x = noise.clone()
    with torch.no_grad():
        for t, t_next in zip(grid[:-1], grid[1:]):
            x_hat = loaded.model(x, torch.full((1,), t), feats, mask)
            x = x + (t_next - t) * (x_hat - x) / max(1.0 - t, 0.05)
    assert torch.allclose(got, x, atol=1e-5)
    as_velocity = pipe("a red circle", width=16, height=16, latents=noise, cfg_scale=1.0, **FAST).latents
    assert not torch.allclose(got, as_velocity, atol=1e-3)
    with pytest.raises(ValueError, match="predicts 'data'"):
        export_diffusers_pipeline(loaded, tmp_path / "diffusers")
    with pytest.raises(ValueError, match="unknown prediction"):
        LuminaPipeline(pipe.model, pipe.text_encoder, pipe.autoencoder, prediction="noise")
    with pytest.raises(ValueError, match="unknown prediction"):
        pipeline_spec({"path": "minilm"}, {"kind": "pixel"}, prediction="x")


@pytest.mark.parametrize("teacache", [0.0, 0.3])
def test_captions_are_refined_once_per_run(pipe, teacache):
    """The context refiner runs once per set of captions, not once per step (and changes nothing)."""
    calls = []
    hook = pipe.model.context_refiner[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        res = pipe(["a red circle", "two blue squares"], width=16, height=16, seed=[1, 2], preset="fast", steps=6,
                   teacache=teacache)
    finally:
        hook.remove()
    assert res.stats["nfe"] == 6 and 0 < res.stats["guided_calls"] < 6  # guided steps, then conditional only
    assert len(calls) == 2  # [cond ; uncond] once, cond alone once
    # bitwise what a step-by-step recomputation gives
    noise = pipe.make_noise([1, 2], 16, 16)
    settings = pipe.resolve("fast", steps=6, teacache=teacache)
    (cond, uncond) = pipe.encode_prompts(["a red circle", "two blue squares"], ["", ""], pipe.default_system)
    from lumina_lightning.sampling.guidance import GuidedVelocity, truncation_time
    from lumina_lightning.sampling.solvers import nfe, solve
    from lumina_lightning.sampling.teacache import TeaCache

    model = pipe.model
    inner = (TeaCache(model, teacache, nfe("dpm", 6)) if teacache else
             (lambda x, t, f, m, rows: model(x, t, f, m)))
    grid = grid_for("dpm", 6, settings.shift)
    velocity = GuidedVelocity(lambda x, t, f, m, rows: inner(x, t, f, m, rows).float(), cond, uncond,
                              settings.guidance, truncation_time(settings.guidance, grid))
    with torch.no_grad():
        expected = solve("dpm", velocity, noise, grid)
    assert torch.equal(res.latents, expected)


def test_update_pipeline_defaults(pipe, tmp_path):
    folder = save_pipeline(tmp_path / "p", pipe.model, text_encoder_spec={"path": pipe.text_encoder.path},
                           autoencoder_spec={"kind": "pixel"}, defaults={"shift": 3.0})
    assert update_pipeline_defaults(folder, cfg_scale=2.0) == {"shift": 3.0, "cfg_scale": 2.0}
    s = load_pipeline(folder).resolve("fast")
    assert (s.cfg_scale, s.shift, s.solver) == (2.0, 3.0, "dpm")  # over every preset; the rest kept
    with pytest.raises(ValueError, match="unknown sampler setting"):
        update_pipeline_defaults(folder, guidance=2.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        update_pipeline_defaults(folder, steps=0)
    assert json.loads((folder / "pipeline.json").read_text())["defaults"] == {"shift": 3.0, "cfg_scale": 2.0}
    for bad in (0, -16, 31.5):
        with pytest.raises(ValueError, match="resolution must be a positive integer"):
            pipeline_spec({"path": "minilm"}, {"kind": "pixel"}, resolution=bad)


def test_calibrated_teacache_defaults_apply_only_where_teacache_is_on(pipe, tmp_path):
    """A pipeline's calibrated coefficients and threshold set TeaCache for `fast`, never switch it on
    for `official`, and `teacache=True` uses the calibrated threshold."""
    folder = save_pipeline(tmp_path / "p", pipe.model, text_encoder_spec={"path": pipe.text_encoder.path},
                           autoencoder_spec={"kind": "pixel"})
    coeffs = pipe.calibrate_teacache(["a red circle", "two blue squares"], width=16, height=16, seeds=(7,))
    assert len(coeffs) == 3 and np.polyval(coeffs, 0.0) >= 0
    update_pipeline_defaults(folder, teacache_version=coeffs, teacache=0.1)
    loaded = load_pipeline(folder)
    fast, official = loaded.resolve("fast"), loaded.resolve("official")
    assert fast.teacache == 0.1 and fast.teacache_version == tuple(coeffs)
    assert official.teacache == 0.0  # the exact preset stays exact
    assert loaded.resolve("official", teacache=True).teacache == 0.1
    assert loaded.resolve("fast", teacache=0.5).teacache == 0.5 and loaded.resolve("fast", teacache=0).teacache == 0
    assert pipe.resolve("official", teacache=True).teacache == 0.3  # no calibration: fast's threshold
    r = loaded("a red circle", width=16, height=16, seed=1, preset="fast", steps=6)
    assert r.settings["teacache"] == 0.1 and r.settings["teacache_version"] == list(coeffs)
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="default teacache threshold"):
            update_pipeline_defaults(folder, teacache=bad)


def test_training_ckpt_and_bare_checkpoint(pipe, tmp_path):
    spec = pipeline_spec({"path": pipe.text_encoder.path}, {"kind": "pixel"}, default_system="base")
    ckpt = {
        "nextdit_config": pipe.model.config.to_dict(),
        "state_dict": {"model." + k: v for k, v in pipe.model.state_dict().items()},
        "lumina_pipeline": spec,
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = load_pipeline(tmp_path / "last.ckpt")
    assert loaded.default_system == "base"
    a = pipe("a red circle", system="base", width=24, height=16, seed=1, **FAST)
    b = loaded("a red circle", width=24, height=16, seed=1, **FAST)
    assert torch.equal(a.latents, b.latents)

    bare = save_nextdit(pipe.model, tmp_path / "bare.safetensors")
    with pytest.raises(PipelineLoadError, match=r"text_encoder=PATH.*vae=PATH"):
        load_pipeline(bare)
    with pytest.raises(PipelineLoadError, match=r"vae=PATH"):
        load_pipeline(bare, text_encoder=pipe.text_encoder.path)
    c = load_pipeline(bare, text_encoder=pipe.text_encoder.path, vae="pixel")("a red circle", system="base", width=24,
                                                                            height=16, seed=1, **FAST)
    assert torch.equal(a.latents, c.latents)
    with pytest.raises(FileNotFoundError):
        load_pipeline(tmp_path / "nothing-here")


def test_cli_writes_pngs_with_settings_that_round_trip(pipe, folder, tmp_path, capsys):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "two green stars", "seed": 100}\n\n')
    rc = sample_main([
        "--ckpt", str(folder), "--prompt", "a red circle", "--prompts-file", str(prompts), "--out", str(out),
        "--width", "24", "--height", "16", "--preset", "fast", "--steps", "3", "--seed", "5", "--n-per-prompt", "2",
    ])
    assert rc == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 4
    records = [read_png_settings(f) for f in files]
    assert [r["seed"] for r in records] == [5, 6, 100, 101]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["two green stars"] * 2
    first = records[0]
    assert first["preset"] == "fast" and first["solver"] == "dpm" and first["steps"] == 3 and first["shift"] == 3.0
    assert first["width"] == 24 and first["height"] == 16 and first["system"] == "real"

    with Image.open(files[2]) as im:
        assert im.size == (24, 16) and im.text["prompt"] == "two green stars" and im.text["seed"] == "100"
        pixels = np.asarray(im.convert("RGB"))
    # the record reproduces the image exactly
    again = load_pipeline(folder)(**kwargs_from_settings(records[2]))
    assert np.array_equal(np.asarray(again.images[0]), pixels)
    assert len((out / "index.jsonl").read_text().splitlines()) == 4
    # rows_per_image is this image's share (what it costs alone), not the rows of its 2-image call
    assert "rows" not in records[2] and records[2]["rows_per_image"] == again.rows


def test_cli_one_side_given_draws_a_square_of_it(pipe, tmp_path):
    folder = save_pipeline(tmp_path / "p", pipe.model, text_encoder_spec={"path": pipe.text_encoder.path},
                           autoencoder_spec={"kind": "pixel"}, resolution=32)
    for flag in ("--width", "--height"):  # not the checkpoint's 32 on the other side
        out = tmp_path / flag.strip("-")
        assert sample_main(["--ckpt", str(folder), "a red circle", flag, "16", "--out", str(out), *FAST_ARGS]) == 0
        [png] = out.glob("*.png")
        assert Image.open(png).size == (16, 16)


def test_cli_second_run_into_the_same_folder_adds_files(folder, tmp_path):
    out = tmp_path / "out"
    args = ["--ckpt", str(folder), "a red circle", "--out", str(out), "--width", "16", "--height", "16"]
    assert sample_main([*args, "--solver", "euler", "--steps", "1"]) == 0
    [first] = out.glob("*.png")
    before = first.read_bytes()
    assert sample_main([*args, "--solver", "euler", "--steps", "2", "--n-per-prompt", "2"]) == 0
    files = sorted(out.iterdir())
    assert [f.name[:6] for f in files if f.suffix == ".png"] == ["00000_", "00001_", "00002_"]
    assert first.read_bytes() == before and len(files) == 4  # + index.jsonl, no temp files left
    umask = os.umask(0)
    os.umask(umask)
    # written through a temp file, yet with the mode a plain write gives (mkstemp's is 0600)
    assert {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~umask}
    lines = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [(r["file"], r["steps"]) for r in lines] == [(f.name, s) for f, s in zip(files[:3], (1, 2, 2))]
    assert [read_png_settings(f)["steps"] for f in files[:3]] == [1, 2, 2]
    # the seeds of a run do not depend on the files already there
    assert [r["seed"] for r in lines] == [0, 0, 1]


def test_cli_records_the_weights_it_loaded(pipe, tmp_path, monkeypatch):
    ema = {k: v + 0.05 * torch.randn_like(v) for k, v in pipe.model.state_dict().items()}
    save_pipeline(tmp_path / "p", pipe.model, text_encoder_spec={"path": pipe.text_encoder.path},
                  autoencoder_spec={"kind": "pixel"}, ema_state_dict=ema)
    monkeypatch.chdir(tmp_path)  # a relative --ckpt is recorded as an absolute path
    assert sample_main(["--ckpt", "p", "a red circle", "--ema", "false", "--vae", "pixel", "--out", "o",
                        "--width", "16", "--height", "16", *FAST_ARGS]) == 0
    [png] = (tmp_path / "o").glob("*.png")
    rec = read_png_settings(png)
    assert rec["checkpoint"] == str(tmp_path / "p") and rec["ema"] is False
    assert rec["vae"] == "pixel" and rec["text_encoder"] is None
    loaded = {k: rec[k] for k in ("ema", "text_encoder", "vae")}
    again = load_pipeline(rec["checkpoint"], **loaded)(**kwargs_from_settings(rec))
    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert np.array_equal(np.asarray(again.images[0]), pixels)
    default = load_pipeline(rec["checkpoint"])(**kwargs_from_settings(rec))  # ema="auto" loads the EMA weights
    assert not np.array_equal(np.asarray(default.images[0]), pixels)
    # the default --ema auto records which weights it picked (here the EMA ones), not "auto"
    assert sample_main(["--ckpt", "p", "a red circle", "--vae", "pixel", "--out", "auto",
                        "--width", "16", "--height", "16", *FAST_ARGS]) == 0
    [png] = (tmp_path / "auto").glob("*.png")
    rec = read_png_settings(png)
    assert rec["ema"] is True
    again = load_pipeline(rec["checkpoint"], ema=rec["ema"], vae="pixel")(**kwargs_from_settings(rec))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(Image.open(png).convert("RGB")))


def test_cli_cuda_without_a_gpu_is_a_message(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = sample_main(["--ckpt", str(folder), "x", "--device", "cuda", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--device cuda but no CUDA GPU is visible; use --device cpu" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_cli_prompts_from_arguments_flags_and_file_in_order(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("from the file\n\n")
    args = build_parser().parse_args(["a red circle", "two blue squares", "--ckpt", "x", "--prompt", "a flag",
                                      "--prompts-file", str(prompts)])
    assert [r["prompt"] for r in read_prompts(args)] == ["a red circle", "two blue squares", "a flag", "from the file"]


def test_cli_errors_are_readable(folder, tmp_path, capsys):
    rc = sample_main(["--ckpt", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "o")])
    assert rc == 2 and "no checkpoint or pipeline at" in capsys.readouterr().err
    rc = sample_main(["--ckpt", str(folder), "--prompt", "x", "--out", str(tmp_path / "o"), "--width", "25", "--height", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and "multiples of 2" in err and "Traceback" not in err
    rc = sample_main(["--ckpt", str(folder), "--out", str(tmp_path / "o")])
    assert rc == 2 and "no prompts" in capsys.readouterr().err


def test_a_broken_encoder_folder_is_named_by_its_argument(folder, tmp_path, capsys):
    """A --vae / --text-encoder folder that is not one used to fail with the library's message about
    some file it looked for last ("no file named diffusion_pytorch_model.bin"), or transformers' "Couldn't
    instantiate the backend tokenizer", neither saying which of the paths was wrong."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text("{}")
    (tmp_path / "garbage").mkdir()
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / "garbage" / name).write_text("not json")
    cases = [
        (dict(vae=tmp_path / "empty"), r"VAE \(vae= / --vae\) .*empty: no config in"),
        (dict(vae=tmp_path / "config_only"), r"VAE \(vae= / --vae\) .*config_only: no weights in"),
        (dict(vae=tmp_path / "nope"), r"VAE \(vae= / --vae\) .*nope: no such folder"),
        (dict(text_encoder=tmp_path / "empty"), r"text encoder \(text_encoder= / --text-encoder\) .*empty: no model config"),
        (dict(text_encoder=tmp_path / "config_only"), r"--text-encoder\) .*config_only: no tokenizer in"),
        (dict(text_encoder=tmp_path / "garbage"), r"--text-encoder\) .*garbage: could not be loaded \("),
    ]
    for kwargs, message in cases:
        with pytest.raises(PipelineLoadError, match=message):
            load_pipeline(folder, **kwargs)
    # a diffusers pipeline folder given as --vae is read through its vae/ subfolder, as before the checks
    from lumina_lightning.encoders.autoencoder import DiffusersVAE, build_tiny_vae
    from lumina_lightning.sampling.pipeline_io import _override_vae

    build_tiny_vae(tmp_path / "pipeline_folder" / "vae")
    assert isinstance(_override_vae(tmp_path / "pipeline_folder"), DiffusersVAE)
    # the command line says the same, as a one-line error with exit code 2
    assert sample_main(["--ckpt", str(folder), "a", "--vae", str(tmp_path / "config_only"),
                        "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--vae) " in err and "no weights in" in err and "Traceback" not in err


def test_a_fresh_model_samples_finite_latents_with_every_preset(pipe):
    """A freshly initialised Next-DiT outputs exactly zero velocities (zero-initialised output layer):
    CFG-Renorm then divided 0 by 0 and every preset's image was NaN."""
    from lumina_lightning.models.nextdit import NextDiT

    fresh = LuminaPipeline(NextDiT(pipe.model.config).eval(), pipe.text_encoder, pipe.autoencoder)
    for preset in ("official", "fast", "diffusers"):
        r = fresh("a red circle", width=16, height=16, seed=0, preset=preset, steps=2)
        assert torch.isfinite(r.latents).all(), preset
        assert "nonfinite_images" not in r.stats


def test_nonfinite_latents_warn_once_naming_their_prompts(pipe, caplog):
    import logging

    noise = torch.randn(3, *pipe.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    noise[1, 0, 0, 0] = float("nan")  # image 1 = prompt 0, image 1 (two images per prompt)
    noise[2, 0, 0, 0] = float("inf")
    with caplog.at_level(logging.WARNING, logger="lumina_lightning.sampling.pipeline"):
        r = pipe(["a red circle", "a blue square"], width=16, height=16, latents=torch.cat([noise, noise[:1]]),
                 num_images_per_prompt=2, **FAST)
    warnings = [rec.getMessage() for rec in caplog.records if "not finite" in rec.getMessage()]
    assert len(warnings) == 1  # once per call, not once per image
    assert "2 of 4 image(s)" in warnings[0] and "'a red circle'; 'a blue square'" in warnings[0]
    assert r.stats["nonfinite_images"] == [1, 2] and len(r.images) == 4  # decoded anyway, no crash
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lumina_lightning.sampling.pipeline"):
        pipe("a red circle", width=16, height=16, seed=0, **FAST)
    assert not [rec for rec in caplog.records if "not finite" in rec.getMessage()]


def _prompts_file(tmp_path, data: bytes | str, *extra):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return read_prompts(build_parser().parse_args(["--ckpt", "x", "--prompts-file", str(path), *extra])), path


def test_prompts_file_with_a_byte_order_mark(tmp_path):
    """UTF-8 with BOM (PowerShell 5's `Out-File -Encoding utf8`) turned line 1 into a literal prompt."""
    items, _ = _prompts_file(tmp_path, "\ufeff".encode() + b'{"prompt": "a red circle", "seed": 7}\nplain\n')
    assert items == [{"prompt": "a red circle", "seed": 7}, {"prompt": "plain"}]
    items, _ = _prompts_file(tmp_path, "\ufeffa red circle\n")
    assert items == [{"prompt": "a red circle"}]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "seed": "three"}', r":1: 'seed' must be a whole number like 7 .*got \"three\""),
    ('{"prompt": "a", "seed": 2.9}', r":1: 'seed' must be a whole number .*got 2.9"),
    ('{"prompt": "a", "seed": 3.0}', r":1: 'seed' must be a whole number .*got 3.0"),
    ('{"prompt": "a", "seed": true}', r":1: 'seed' must be a whole number .*got true"),
    ('{"prompt": "a", "seed": 18446744073709551616}', r":1: 'seed' must be between"),
    ('{"prompt": "a", "negative_prompt": 3}', r":1: 'negative_prompt' must be a string .*got 3"),
    ('{"prompt": "a", "negative": "blurry"}',
     r":1: unknown key\(s\) 'negative'; known: 'prompt', 'seed', 'negative_prompt'"),
    ('{"prompt": ""}', r":1: a JSONL line needs a non-empty string 'prompt', got an empty string"),
    ('{"seed": 1}', r":1: a JSONL line needs a non-empty string 'prompt', got nothing"),
    ('{red|blue} ball', r":1: a line starting with '\{' is read as a JSONL record, but this is not valid JSON "
                        r".*write the line as JSONL: \{\"prompt\": \"\{red\|blue\} ball\"\}"),
])
def test_prompts_file_records_are_checked_with_file_and_line(tmp_path, line, message):
    with pytest.raises(ValueError, match=message) as err:
        _prompts_file(tmp_path, line + "\n")
    assert str(err.value).startswith(str(tmp_path / "prompts.jsonl") + ":1: ")


def test_prompts_file_null_means_not_given(tmp_path):
    items, _ = _prompts_file(tmp_path, '{"prompt": "a cat", "seed": null, "negative_prompt": null}\n'
                                       '{"prompt": "a dog", "seed": 4, "negative_prompt": "blurry"}\n')
    assert items == [{"prompt": "a cat"}, {"prompt": "a dog", "seed": 4, "negative_prompt": "blurry"}]


def test_a_bad_prompts_file_line_fails_before_the_model_loads(folder, tmp_path, capsys, monkeypatch):
    import lumina_lightning.sampling.pipeline_io as pio

    monkeypatch.setattr(pio, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a red circle", "seed": 3}\n{"prompt": "a blue square", "seed": "three"}\n')
    rc = sample_main(["--ckpt", str(folder), "--prompts-file", str(path), "--out", str(tmp_path / "o"), *FAST_ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and f"{path}:2: 'seed' must be a whole number" in err and not (tmp_path / "o").exists()


def test_a_text_encoder_override_keeps_the_recorded_encoding_settings(pipe, tmp_path):
    """--text-encoder (another place for the encoder's files) used to drop the recorded max_length (and
    attn_implementation, layer, ...): prompts were then encoded with 256 tokens where training used 16."""
    import shutil

    path = tmp_path / "pipeline"
    save_pipeline(path, pipe.model, text_encoder_spec={"path": pipe.text_encoder.path, "max_length": 16,
                                                        "layer": -1, "pad_to_multiple_of": 4},
                  autoencoder_spec={"kind": "pixel"})
    moved = shutil.copytree(pipe.text_encoder.path, tmp_path / "moved_encoder")
    long = "a red circle left of a blue square " * 6
    for source in (path, tmp_path / "model.ckpt"):
        if source.suffix == ".ckpt":
            spec = json.loads((path / "pipeline.json").read_text())
            torch.save({"state_dict": {f"model.{k}": v for k, v in pipe.model.state_dict().items()},
                        "lumina_pipeline": spec, "nextdit_config": pipe.model.config.to_dict()}, source)
        te = load_pipeline(source, text_encoder=str(moved)).text_encoder
        assert te.path == str(moved) and (te.max_length, te.layer, te.pad_to_multiple_of) == (16, -1, 4), source
        assert int(te.encode([long])[1].sum()) == 16
    # a folder without its tokenizer files, given as --text-encoder, is refused naming the flag
    alone = tmp_path / "alone"
    alone.mkdir()
    for f in moved.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, alone / f.name)
    with pytest.raises(PipelineLoadError, match=r"--text-encoder\) .*alone: no tokenizer in"):
        load_pipeline(path, text_encoder=str(alone))


def test_a_source_trained_in_another_latent_space_is_named(pipe, tmp_path):
    """model.init_from took a parent trained on another autoencoder (a conv autoencoder retrained in
    place, other latent scale) without a word; training/run.py calls check_same_latent_space."""
    from lumina_lightning.sampling.pipeline_io import check_same_latent_space

    conv = {"kind": "conv", "path": "/ae", "scaling_factor": 2.0, "shift_factor": 0.1, "weights_sha256": "aaaa"}
    path = tmp_path / "parent"
    save_pipeline(path, pipe.model, text_encoder_spec={"path": "minilm"}, autoencoder_spec=conv)
    check_same_latent_space(path, {**conv, "path": "/moved/ae"})  # the same space, another place: fine
    with pytest.raises(ValueError, match=r"model.init_from=.*parent was trained in another autoencoder latent space "
                                         r"than this run uses: conv autoencoder weights sha256 aaaa \(recorded\) vs "
                                         r"bbbb in /ae \(retrained since\?\)"):
        check_same_latent_space(path, {**conv, "weights_sha256": "bbbb"})
    with pytest.raises(ValueError, match=r"scaling_factor 2 \(recorded\) vs 0.5"):
        check_same_latent_space(path, {**conv, "scaling_factor": 0.5})
    with pytest.raises(ValueError, match=r"autoencoder kind 'conv' \(recorded\) vs 'pixel'"):
        check_same_latent_space(path, {"kind": "pixel"})
    spec = json.loads((path / "pipeline.json").read_text())
    torch.save({"lumina_pipeline": spec, "state_dict": {}}, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="latent space"):
        check_same_latent_space(tmp_path / "last.ckpt", {"kind": "pixel"})
    check_same_latent_space(save_nextdit(pipe.model, tmp_path / "bare.safetensors"), {"kind": "pixel"})  # no record


def test_a_negative_prompt_without_guidance_is_recorded_as_unused_and_warned_about(folder, tmp_path, capsys):
    """At CFG scale 1 the negative prompt is never encoded: the image must not claim it (a reader would
    reproduce it with guidance on), and the CLI says once that the flag had no effect."""
    out = tmp_path / "out"
    args = ["--ckpt", str(folder), "a red circle", "--out", str(out), "--width", "16", "--height", "16",
            "--negative-prompt", "blurry", *FAST_ARGS]
    assert sample_main([*args, "--cfg", "1", "--n-per-prompt", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("the negative prompt has no effect") == 1
    for png in out.glob("*.png"):
        assert read_png_settings(png)["negative_prompt"] is None
        assert "negative_prompt" not in Image.open(png).text
    guided = tmp_path / "guided"
    assert sample_main([*args[:3], "--out", str(guided), *args[5:], "--cfg", "2"]) == 0
    assert "no effect" not in capsys.readouterr().err
    [png] = guided.glob("*.png")
    assert read_png_settings(png)["negative_prompt"] == "blurry" and Image.open(png).text["negative_prompt"] == "blurry"
