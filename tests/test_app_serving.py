"""The demo's logic without a server: validation, presets, sizes, seeds, PNGs, refusals (lumina_lightning.serving)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from app_helpers import TrackedPipe, build_pipeline_folder, build_tiny_pipe
from lumina_lightning.sampling.cli import read_png_settings
from lumina_lightning.sampling.pipeline import kwargs_from_settings
from lumina_lightning.serving import (
    APP_PRESETS,
    MAX_SEED,
    REQUEST_FIELDS,
    CancelFlag,
    DemoService,
    GenerationCancelled,
    RequestError,
    ServeConfig,
    no_checkpoint_message,
)

ROOT = Path(__file__).resolve().parents[1]
QUICK = dict(solver="euler", steps=2)  # cheapest valid sampler settings for checks that need images


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_pipe(tmp_path_factory.mktemp("serve"))  # sides in multiples of 16, like the 2B model


@pytest.fixture(scope="module")
def service(pipe):
    svc = DemoService(pipe, ServeConfig(resolution=64, max_pixels=128 * 128, max_images=3, checkpoint="tiny"))
    yield svc
    svc.close()


def request(**values):
    return {"prompt": "a red circle", "randomize_seed": False, "seed": 3, **values}


def test_defaults_cover_every_field_and_presets_fill_the_controls(service):
    d = service.defaults()
    assert set(d) == set(REQUEST_FIELDS)
    assert (d["width"], d["height"]) == (64, 64) and d["preset"] == "official" and d["system"] == "real"
    assert service.preset_values("official") == {
        "solver": "midpoint", "steps": 17, "cfg_scale": 4.0, "renorm": 1.0, "cfg_trunc": 1.0, "teacache": 0.0}
    assert service.preset_values("fast") == {
        "solver": "dpm", "steps": 20, "cfg_scale": 4.0, "renorm": 1.0, "cfg_trunc": 0.25, "teacache": 0.3}
    assert APP_PRESETS == ("official", "fast")
    with pytest.raises(RequestError, match="preset must be one of official, fast"):
        service.preset_values("turbo")
    assert [v for _, v in service.solver_choices] == ["euler", "midpoint", "dpm"]
    assert "real" in service.system_choices and "4grid" in service.system_choices
    assert "multiples of 16" in service.describe()


def test_resolution_presets_keep_the_area_multiple_and_budget(service, pipe):
    presets = service.resolution_presets()
    assert presets[0] == ("1:1  (64x64)", 64, 64)
    assert {label.split()[0] for label, _, _ in presets} >= {"1:1", "4:3", "3:4", "16:9", "9:16"}
    for label, w, h in presets:
        assert w % 16 == 0 and h % 16 == 0 and w * h <= 128 * 128
        assert service.size_for(label) == (w, h)
    with pytest.raises(RequestError, match="unknown resolution preset"):
        service.size_for("5:4 (1x1)")
    # automatic base size: 16 tokens a side in pixel space (256 px at 16 px/token), within the budget
    assert DemoService(pipe, ServeConfig()).base_resolution() == 256
    assert DemoService(pipe, ServeConfig(max_pixels=200 * 200)).base_resolution() == 192
    # ... and 64 tokens a side for latent models: 1024 px with the FLUX VAE (8x) and patch 2
    latent = SimpleNamespace(text_encoder=None, size_multiple=16, max_size=(4096, 4096),
                             autoencoder=SimpleNamespace(downsample=8))
    assert DemoService(latent, ServeConfig()).base_resolution() == 1024
    # a checkpoint that records its training size (pipeline.json) opens at that size; the
    # server's --resolution still wins
    trained = SimpleNamespace(**vars(latent), resolution=512)
    assert DemoService(trained, ServeConfig()).base_resolution() == 512
    assert DemoService(trained, ServeConfig(resolution=256)).base_resolution() == 256


def test_defaults_are_always_a_valid_request(pipe):
    low = DemoService(pipe, ServeConfig(resolution=32, max_steps=10))
    assert low.preset_values("official")["steps"] == 10
    r = low.validate({**low.defaults(), "prompt": "a red circle"})
    assert (r.steps, r.width, r.height, r.cfg_trunc) == (10, 32, 32, 1.0) and r.seed_was_random


def test_valid_request_normalises_values(service):
    r = service.validate(request(width="64", height=48.0, steps="5", cfg_scale=1, cfg_trunc=0.5, num_images=2))
    assert (r.width, r.height, r.steps, r.cfg_scale, r.cfg_trunc, r.num_images) == (64, 48, 5, 1.0, 0.5, 2)
    assert r.seeds == [3, 4] and not r.seed_was_random and r.notices == []
    assert r.system == "real" and r.negative_prompt == ""
    # 1 = never truncate, kept as 1.0 (None would mean "the preset's value"); "empty" = no template
    r = service.validate(request(cfg_trunc=1, system="empty", negative_prompt="  blurry "))
    assert r.cfg_trunc == 1.0 and r.system is None and r.negative_prompt == "blurry"


def test_never_truncate_overrides_a_truncating_preset(service):
    """The slider at 1.0 must beat fast's (or a checkpoint's) truncation at 0.25, in the run and the record."""
    fast = {**service.preset_values("fast"), "steps": 4, "teacache": 0.0}
    truncated = service.generate(request(preset="fast", width=16, height=16, **fast))
    assert truncated.stats["guided_calls"] < truncated.nfe  # the preset alone truncates
    never = service.generate(request(preset="fast", width=16, height=16, **{**fast, "cfg_trunc": 1.0}))
    assert never.stats["guided_calls"] == never.nfe == 4
    assert never.settings["cfg_trunc"] == 1.0 and read_png_settings(never.files[0])["cfg_trunc"] == 1.0
    assert "CFG on 4 of 4 calls, never truncated" in never.summary
    assert "truncated at 0.25" in truncated.summary


def test_a_preset_alone_fills_the_controls_it_leaves_out(service, pipe, monkeypatch):
    """An API request naming only a preset runs that preset (not official's values), the way the page does."""
    r = service.validate({"prompt": "a red circle", "preset": "fast"})
    assert {k: getattr(r, k) for k in service.preset_values("fast")} == service.preset_values("fast")
    # None (what the endpoint receives for a field left out) also means "the preset's value"; given values win
    r = service.validate({"prompt": "a red circle", "preset": "fast", "solver": None, "steps": 3})
    assert (r.solver, r.steps, r.teacache) == ("dpm", 3, 0.3)
    r = service.validate({"prompt": "a red circle"})
    assert (r.preset, r.solver, r.steps, r.teacache) == ("official", "midpoint", 17, 0.0)
    # ... after the checkpoint's own defaults, as the preset radio fills them
    monkeypatch.setattr(pipe, "defaults", {"steps": 8})
    assert service.validate({"prompt": "a red circle", "preset": "fast"}).steps == 8 == service.preset_values("fast")["steps"]


def test_sizes_snap_with_a_notice_and_the_budget_is_enforced(service):
    r = service.validate(request(width=70, height=50))
    assert (r.width, r.height) == (64, 48)
    assert len(r.notices) == 1 and "70x50 is not supported; using 64x48" in r.notices[0]
    assert "multiples of 16" in r.notices[0]
    with pytest.raises(RequestError, match=r"256x256 is 0.07 megapixels, over this server's budget of 0.02") as err:
        service.validate(request(width=256, height=256))
    assert "try 128x128" in str(err.value) and "--max-pixels" in str(err.value)
    # beyond the model's position tables: clamped first (with the notice), then over budget
    with pytest.raises(RequestError, match=r"100000x64 \(snapped to 1024x64\)"):
        service.validate(request(width=100_000, height=64))


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(prompt=""), "Please enter a prompt"),
        (dict(prompt="   \n "), "Please enter a prompt"),
        (dict(prompt=None), "Please enter a prompt"),
        (dict(prompt=42), "prompt must be text, got int"),
        (dict(steps="abc"), "steps must be a whole number, got 'abc'"),
        (dict(steps=2.5), "steps must be a whole number, got 2.5"),
        (dict(steps=0), "steps must be between 1 and 100, got 0"),
        (dict(steps=10_000), "steps must be between 1 and 100, got 10000"),
        (dict(steps=True), "steps must be a whole number, got True"),
        (dict(cfg_scale="nan"), "CFG scale must be a finite number"),
        (dict(cfg_scale=[4]), "CFG scale must be a number, got a list"),
        (dict(cfg_scale=50), "CFG scale must be between 1 and 20, got 50"),
        (dict(renorm=-1), "CFG-Renorm must be between 0 and 10"),
        (dict(cfg_trunc=1.5), "CFG-Truncation must be between 0 and 1"),
        (dict(teacache="inf"), "TeaCache threshold must be a finite number"),
        (dict(num_images=0), "number of images must be between 1 and 3"),
        (dict(num_images=50), "number of images must be between 1 and 3"),
        (dict(width=None), "width must be a whole number, got None"),
        (dict(width=-64), "width must be at least 1, got -64"),
        (dict(height="tall"), "height must be a whole number, got 'tall'"),
        (dict(seed="lucky"), "seed must be a whole number"),
        (dict(seed=-5), "seed must be between -1 and"),
        (dict(seed=MAX_SEED, num_images=2), "seed must be at most"),
        # valid JSON integers beyond float range
        (dict(seed=10**400), "seed must be between -1 and 2147483647, got about 1e400"),
        (dict(steps=-(10**400)), "steps must be between 1 and 100, got about -1e400"),
        (dict(width=10**400), "width is out of range, got about 1e400"),
        (dict(solver="heun"), "solver must be one of euler, midpoint, dpm; got 'heun'"),
        (dict(preset="diffusers"), "preset must be one of official, fast"),
        (dict(system="pirate"), "system prompt must be one of"),
        (dict(randomize_seed="maybe"), "randomize seed must be true or false"),
        (dict(colour="red"), "unknown request field"),
    ],
)
def test_bad_values_get_a_clear_message(service, values, message):
    with pytest.raises(RequestError) as err:
        service.validate(request(**values))
    assert message in str(err.value)


def test_seed_modes(service):
    a = service.validate(request(randomize_seed=True))
    b = service.validate(request(randomize_seed=True))
    assert a.seed_was_random and 0 <= a.seed <= MAX_SEED and a.seed != b.seed
    for random_seed in (-1, None, ""):
        assert service.validate(request(seed=random_seed)).seed_was_random
    r = service.validate(request(randomize_seed="false", seed="12", num_images=3))
    assert not r.seed_was_random and r.seeds == [12, 13, 14]


def test_too_long_prompt_is_truncated_with_a_warning(service):
    text = "a red circle left of a blue square " * 60
    r = service.validate(request(prompt=text))
    assert r.prompt_truncated and r.prompt_tokens > 256
    notice = r.notices[0]
    assert f"The prompt is {r.prompt_tokens} tokens" in notice and "reads at most 256" in notice
    assert "'real' system template" in notice and "ignored" in notice
    r = service.validate(request(negative_prompt="blurry " * 400))
    assert not r.prompt_truncated and "The negative prompt is" in r.notices[0]
    # absurd API payloads are cut before tokenizing
    r = service.validate(request(prompt="x" * 50_000))
    assert any("only the first 20000" in n for n in r.notices)


def test_generate_writes_pngs_with_reproducible_metadata(service, pipe):
    steps = []
    gen = service.generate(request(num_images=2, width=48, height=32, **QUICK),
                           progress=lambda done, total, desc: steps.append((done, total, desc)))
    assert gen.seeds == [3, 4] and len(gen.files) == 2
    assert steps[0][2] == "encoding the prompt" and (2, 2) in [s[:2] for s in steps]
    assert any(s[2] == "sampling: step 1/2" for s in steps)
    for path, seed in zip(gen.files, gen.seeds):
        assert path.suffix == ".png" and path.exists()
        with Image.open(path) as im:
            assert im.size == (48, 32) and im.text["prompt"] == "a red circle" and im.text["seed"] == str(seed)
        record = read_png_settings(path)
        assert record["seed"] == seed and record["solver"] == "euler" and record["steps"] == 2
        assert record["width"] == 48 and record["checkpoint"] == "tiny" and record["nfe"] == gen.nfe == 2
        assert record["source"] == "lumina demo" and record["prompt_truncated"] is False
        assert record["ema"] is None  # the fixture's model was built in memory, not loaded
        # per image: 2 guided Euler calls of 2 rows (cond + uncond), not the 8 rows of the whole batch
        assert record["rows_per_image"] == 4 and "rows" not in record
    # the metadata alone reproduces the image
    again = pipe(**kwargs_from_settings(read_png_settings(gen.files[1])))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(Image.open(gen.files[1]).convert("RGB")))
    assert gen.gallery == [(str(gen.files[0]), "seed 3"), (str(gen.files[1]), "seed 4")]
    info = gen.info()
    assert info["seeds"] == [3, 4] and info["nfe"] == 2 and info["width"] == 48 and info["notices"] == []
    assert "seeds 3, 4 (fixed" in gen.summary and "**Model forwards:** 2 transformer calls" in gen.summary


def test_demo_png_records_the_checkpoint_and_encoders_that_reproduce_it(tmp_path, monkeypatch):
    """A bare transformer served with --text-encoder / --vae, the checkpoint given as a relative path:
    the PNG used to record the relative path and no encoders, so its metadata reproduced nothing."""
    import os

    from lumina_lightning.encoders.text import minilm_path
    from lumina_lightning.sampling.cli import loaded_record
    from lumina_lightning.sampling.pipeline_io import load_pipeline

    build_pipeline_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    encoder = os.path.relpath(minilm_path(), tmp_path)  # a relative encoder folder, too
    svc = DemoService.from_checkpoint("pipeline/transformer", text_encoder=encoder, vae="pixel",
                                      config=ServeConfig(resolution=32, output_dir=str(tmp_path / "out")))
    gen = svc.generate(request(**QUICK))
    rec = read_png_settings(gen.files[0])
    assert rec["checkpoint"] == str(tmp_path / "pipeline" / "transformer")
    assert rec["text_encoder"] == str(Path(minilm_path()).resolve()) and rec["vae"] == "pixel" and rec["ema"] is False
    # the same record `lumina sample` writes (one helper), and the page still shows what was given
    assert {k: rec[k] for k in ("checkpoint", "ema", "text_encoder", "vae")} == loaded_record(
        "pipeline/transformer", svc.pipe.model, text_encoder=encoder, vae="pixel")
    assert "`pipeline/transformer`" in svc.describe()
    monkeypatch.chdir(tmp_path / "out")  # reloads from anywhere
    loaded = {k: rec[k] for k in ("ema", "text_encoder", "vae")}
    again = load_pipeline(rec["checkpoint"], **loaded)(**kwargs_from_settings(rec))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(Image.open(gen.files[0]).convert("RGB")))
    svc.close()


def test_fast_preset_shows_fewer_forwards_than_official(service):
    official = service.generate(request(**service.preset_values("official")))
    fast = service.generate(request(preset="fast", **service.preset_values("fast")))
    assert official.nfe == 34 and official.passes_per_image == 68 == official.baseline_passes_per_image
    assert fast.nfe == 20 and fast.passes_per_image < 40
    assert "fewer passes" in fast.summary and "fewer passes" not in official.summary
    assert "TeaCache skipped" in fast.summary and "CFG on" in fast.summary


def test_parallel_generations_share_the_pipeline(service):
    """--concurrency > 1 runs requests in threads on one pipeline (and one text-encoder cache)."""
    from concurrent.futures import ThreadPoolExecutor

    service.set_concurrency(4)
    prompts = [f"{n} red circles" for n in ("one", "two", "three", "four")]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda p: service.generate(request(prompt=p, **QUICK)), prompts))
    for prompt, gen in zip(prompts, parallel):
        alone = service.generate(request(prompt=prompt, **QUICK))
        assert read_png_settings(gen.files[0])["prompt"] == prompt
        assert np.array_equal(np.asarray(Image.open(gen.files[0])), np.asarray(Image.open(alone.files[0])))
    service.set_concurrency(1)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_concurrency_bounds_the_pipeline_calls(pipe, tmp_path, monkeypatch, concurrency):
    """The service holds a slot around each pipeline call: --concurrency is a bound whatever the queue does."""
    from concurrent.futures import ThreadPoolExecutor

    svc = DemoService(pipe, ServeConfig(resolution=32, output_dir=str(tmp_path), concurrency=concurrency))
    tracked = TrackedPipe(svc.pipe, delay=0.1)  # >= 0.2 s a call: parallel calls overlap where allowed
    monkeypatch.setattr(svc, "pipe", tracked)
    with ThreadPoolExecutor(4) as pool:
        gens = list(pool.map(lambda seed: svc.generate(request(seed=seed, **QUICK)), range(4)))
    assert [g.seeds for g in gens] == [[0], [1], [2], [3]]
    assert tracked.max_active == concurrency
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        ServeConfig(concurrency=0)


def test_a_cancelled_request_stops_at_its_next_step(service, monkeypatch):
    tracked = TrackedPipe(service.pipe)
    monkeypatch.setattr(service, "pipe", tracked)
    flag = CancelFlag()

    def progress(done, total, desc):
        if done == 2 and desc.startswith("sampling"):
            flag.set()  # as the server does when the client cancels, from another thread

    before = set(service.output_dir.rglob("*.png"))
    with pytest.raises(GenerationCancelled, match="cancelled"):
        service.generate(request(solver="euler", steps=20), progress=progress, cancel=flag)
    [call] = tracked.calls
    assert call["steps"] == 3 and call["error"] == "GenerationCancelled" and call["done"]
    assert set(service.output_dir.rglob("*.png")) == before  # no PNGs for a cancelled request
    # cancelled before it starts (e.g. while waiting for a slot): the pipeline never runs
    with pytest.raises(GenerationCancelled):
        service.generate(request(**QUICK), cancel=flag)
    assert len(tracked.calls) == 1
    # the slots were given back: the next request runs
    assert service.generate(request(**QUICK), cancel=CancelFlag()).seeds == [3]


def test_cancelling_the_awaiting_task_sets_the_cancel_flag(service, monkeypatch):
    """What the Gradio app runs: agenerate in the event loop, generate in a worker thread."""
    import asyncio
    import time

    tracked = TrackedPipe(service.pipe, delay=0.05)
    monkeypatch.setattr(service, "pipe", tracked)

    async def cancel_mid_run():
        task = asyncio.ensure_future(service.agenerate(request(solver="euler", steps=60)))
        while not (tracked.calls and tracked.calls[0]["steps"] >= 1):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return tracked.calls[0]["steps"]

    at_cancel = asyncio.run(cancel_mid_run())
    tracked.wait(lambda: tracked.calls[0]["done"])
    call = tracked.calls[0]
    assert call["error"] == "GenerationCancelled" and call["steps"] <= at_cancel + 2 < 60


def test_model_failures_become_messages(service, monkeypatch):
    class Broken:
        def __init__(self, pipe):
            self._pipe = pipe

        def __getattr__(self, name):
            return getattr(self._pipe, name)

        def __call__(self, *args, **kwargs):
            raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(service, "pipe", Broken(service.pipe))
    with pytest.raises(RequestError, match="generation failed: RuntimeError: CUDA out of memory"):
        service.generate(request(**QUICK))


def test_old_outputs_are_pruned(pipe, tmp_path):
    svc = DemoService(pipe, ServeConfig(resolution=32, output_dir=str(tmp_path), keep_outputs_s=0))
    first = svc.generate(request(**QUICK)).files[0]
    second = svc.generate(request(**QUICK)).files[0]
    assert not first.exists() and second.exists()
    svc.close()  # a configured folder is the user's: it stays
    assert tmp_path.exists()


def test_serve_config_rejects_nonsense():
    with pytest.raises(ValueError, match="max_pixels must be >= 1"):
        ServeConfig(max_pixels=0)


def test_no_checkpoint_refusal_points_at_the_tiny_recipe(capsys):
    from lumina_lightning.app import main

    text = no_checkpoint_message()
    assert "lightning run recipes/tiny/stage1_lowres.yaml" in text
    assert "lumina demo --ckpt runs/tiny_stage1_lowres/export" in text
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint given (--ckpt PATH)" in err and "recipes/tiny/stage1_lowres.yaml" in err
    assert main(["--ckpt", "does/not/exist"]) == 2
    assert "no checkpoint or pipeline at does/not/exist" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["-m", "lumina_lightning", "demo"], ["apps/gradio_app.py"]])
def test_commands_refuse_without_checkpoint(command):
    proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "lumina demo --ckpt runs/tiny_stage1_lowres/export" in proc.stderr
