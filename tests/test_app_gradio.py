"""The demo served on loopback and driven through gradio_client, plus the ``lumina demo`` verb's wiring."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from app_helpers import TrackedPipe, build_pipeline_folder, start_server
from lumina_lightning.sampling.cli import read_png_settings
from lumina_lightning.serving import REQUEST_FIELDS, DemoService, ServeConfig

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

QUICK = dict(solver="euler", steps=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.set_num_threads(1)
    return build_pipeline_folder(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def served(folder):
    config = ServeConfig(resolution=64, max_pixels=128 * 128, max_images=3, checkpoint=str(folder))
    service = DemoService.from_checkpoint(folder, config=config)
    demo, url = start_server(service)
    client = Client(url, verbose=False)
    yield service, client
    client.close()
    demo.close()
    service.close()


def generate(client, **values):
    """Call /generate by keyword; unnamed fields keep the page's defaults (official preset, 64x64)."""
    return client.predict(**{"prompt": "a red circle", "randomize_seed": False, "seed": 7, **values},
                          api_name="/generate")


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_api_names_the_request_fields(served):
    _, client = served
    api = client.view_api(print_info=False, return_format="dict")
    params = api["named_endpoints"]["/generate"]["parameters"]
    assert [p["parameter_name"] for p in params] == list(REQUEST_FIELDS)
    assert [r["label"] for r in api["named_endpoints"]["/generate"]["returns"]][:1] == ["Images"]


def test_generate_size_metadata_and_determinism(served, folder):
    gallery, files, summary, info, seed = generate(client := served[1], width=64, height=48, num_images=2)
    assert len(gallery) == 2 and len(files) == 2 and seed == 7
    assert [g["caption"] for g in gallery] == ["seed 7", "seed 8"]
    for item, expected_seed in zip(gallery, (7, 8)):
        with Image.open(item["image"]) as im:
            assert im.size == (64, 48) and im.format == "PNG"
        record = read_png_settings(item["image"])
        assert record["prompt"] == "a red circle" and record["seed"] == expected_seed
        assert (record["width"], record["height"]) == (64, 48)
        assert record["solver"] == "midpoint" and record["steps"] == 17 and record["cfg_scale"] == 4.0
        assert record["checkpoint"] == str(folder) and record["nfe"] == 34
        assert record["ema"] is False  # the folder holds raw weights only: what was served, not "auto"
    assert read_png_settings(files[1])["seed"] == 8  # the download list carries the same metadata
    assert info["seeds"] == [7, 8] and info["nfe"] == 34 and info["passes_per_image"] == 68
    assert "seeds 7, 8 (fixed" in summary and "34 transformer calls" in summary and "**Time:**" in summary
    # the same request gives the same pixels
    again = generate(client, width=64, height=48, num_images=2)
    for a, b in zip(again[0], gallery):
        assert np.array_equal(pixels(a["image"]), pixels(b["image"]))
    # image k uses seed + k whatever the batch around it (batched float sums may move a pixel by one level)
    alone = generate(client, width=64, height=48, seed=8)
    diff = np.abs(pixels(alone[0][0]["image"]).astype(int) - pixels(gallery[1]["image"]).astype(int))
    assert diff.max() <= 1
    other = generate(client, width=64, height=48, seed=9)
    diff = np.abs(pixels(other[0][0]["image"]).astype(int) - pixels(gallery[1]["image"]).astype(int))
    assert diff.mean() > 5


def test_random_seed_is_shown_and_reproduces(served):
    client = served[1]
    gallery, _, summary, info, seed = generate(client, randomize_seed=True, **QUICK)
    assert info["seeds"] == [seed] and f"seed {seed} (random" in summary
    fixed = generate(client, seed=seed, **QUICK)
    assert np.array_equal(pixels(fixed[0][0]["image"]), pixels(gallery[0]["image"]))


def test_fast_preset_through_the_api(served):
    service, client = served
    assert client.predict("fast", api_name="/fill_preset") == tuple(service.preset_values("fast").values())
    _, _, summary, info, _ = generate(client, preset="fast", **service.preset_values("fast"))
    assert info["nfe"] == 20 < info["official_nfe"] == 34
    assert info["passes_per_image"] < info["official_passes_per_image"] and "fewer passes" in summary
    assert info["settings"]["preset"] == "fast" and info["settings"]["cfg_trunc"] == 0.25


def test_a_preset_alone_runs_that_preset_through_the_api(served):
    """Controls a client leaves out take the named preset's values, not the page's initial (official) ones."""
    service, client = served
    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    assert {p["parameter_name"]: p["parameter_default"] for p in params if p["parameter_name"] in
            service.preset_values("fast")} == dict.fromkeys(service.preset_values("fast"))
    _, _, _, info, _ = generate(client, preset="fast", width=16, height=16)
    fast = service.preset_values("fast")
    assert {k: info["settings"][k] for k in fast} == fast and info["settings"]["preset"] == "fast"
    assert info["nfe"] == 20
    _, _, _, info, _ = generate(client, preset="fast", steps=3, width=16, height=16)
    assert (info["settings"]["solver"], info["settings"]["steps"], info["nfe"]) == ("dpm", 3, 3)


def test_snapped_size_and_truncated_prompt_are_reported(served):
    client = served[1]
    gallery, _, summary, info, _ = generate(client, width=70, height=50, **QUICK)
    assert Image.open(gallery[0]["image"]).size == (64, 48)
    assert "70x50 is not supported; using 64x48" in summary and len(info["notices"]) == 1
    long_prompt = "a red circle left of a blue square " * 60
    gallery, _, summary, info, _ = generate(client, prompt=long_prompt, **QUICK)
    assert "the text encoder reads at most 256, so it was truncated" in summary
    record = read_png_settings(gallery[0]["image"])
    assert record["prompt_truncated"] is True and record["prompt_tokens"] > 256


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(prompt=""), "Please enter a prompt"),
        (dict(width=256, height=256), "over this server's budget"),
        (dict(steps="abc"), "steps must be a whole number, got 'abc'"),
        (dict(steps=5000), "steps must be between 1 and 100, got 5000"),
        (dict(cfg_scale="high"), "CFG scale must be a number, got 'high'"),
        (dict(cfg_trunc=-0.5), "CFG-Truncation must be between 0 and 1"),
        (dict(teacache="off"), "TeaCache threshold must be a number, got 'off'"),
        (dict(num_images=99), "number of images must be between 1 and 3"),
        (dict(seed=-3), "seed must be between -1 and"),
        (dict(width="wide"), "width must be a whole number, got 'wide'"),
        (dict(solver="heun"), "solver must be one of euler, midpoint, dpm"),
        (dict(prompt="<b>x</b>", steps="<script>"), "steps must be a whole number, got '&lt;script&gt;'"),
    ],
)
def test_bad_input_gets_a_message_and_the_server_keeps_serving(served, values, message):
    client = served[1]
    with pytest.raises(AppError) as err:
        generate(client, **values)
    assert message in str(err.value)
    gallery, *_ = generate(client, **QUICK)
    assert len(gallery) == 1


def test_concurrent_requests_are_queued(served):
    client = served[1]
    jobs = [client.submit(prompt=f"shape {i}", randomize_seed=False, seed=100 + i, api_name="/generate", **QUICK)
            for i in range(3)]
    results = [job.result(timeout=60) for job in jobs]
    assert [r[3]["seeds"] for r in results] == [[100], [101], [102]]


def test_a_cancelled_job_stops_and_concurrency_holds(served, monkeypatch):
    """gradio frees a cancelled job's queue slot at once while a plain function's thread keeps
    sampling: the next request used to run beside it, past --concurrency 1, until all 60 steps were done."""
    service, client = served
    tracked = TrackedPipe(service.pipe, delay=0.05)
    monkeypatch.setattr(service, "pipe", tracked)
    job = client.submit(prompt="a red circle", randomize_seed=False, seed=1, solver="euler", steps=60,
                        api_name="/generate")
    tracked.wait(lambda: tracked.calls and tracked.calls[0]["steps"] >= 1)
    assert job.cancel()
    at_cancel = tracked.calls[0]["steps"]
    gallery, *_ = client.submit(prompt="a blue square", randomize_seed=False, seed=2, api_name="/generate",
                                **QUICK).result(timeout=120)
    assert len(gallery) == 1
    first = tracked.calls[0]
    assert first["done"] and first["error"] == "GenerationCancelled"
    assert first["steps"] <= at_cancel + 2 < 60  # stopped at its next step
    assert tracked.max_active == 1 and len(tracked.calls) == 2


def test_demo_verb_binds_loopback_without_analytics_or_share(folder, monkeypatch, capsys):
    """``lumina demo`` wiring: the launch is replaced, so no second server starts."""
    import lumina_lightning.ui.gradio_app as ui
    from lumina_lightning.app import main

    calls = []

    def fake_launch(demo, service, **kw):
        calls.append((demo, service, kw, service.output_dir))  # the real launch creates the PNG folder too

    monkeypatch.setattr(ui, "launch", fake_launch)
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")
    assert main(["--ckpt", str(folder), "--device", "cpu", "--resolution", "32", "--max-pixels", "4096"]) == 0
    demo, service, kw, output_dir = calls[-1]
    assert kw == {"host": "127.0.0.1", "port": 7860, "share": False, "block": True}
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and demo.analytics_enabled is False
    assert service.config.max_pixels == 4096 and service.base_resolution() == 32
    assert not output_dir.exists()  # created for the server, removed when it stops

    assert main(["--ckpt", str(folder), "--listen", "--share", "--port", "7999", "--concurrency", "2"]) == 0
    assert calls[-1][2] == {"host": "0.0.0.0", "port": 7999, "share": True, "block": True}
    assert calls[-1][1].config.concurrency == 2  # the service enforces --concurrency too
    err = capsys.readouterr().err
    assert "needs internet access" in err and "reachable from other machines" in err
    # --listen only changes the default: an explicit --host is what gets bound
    assert main(["--ckpt", str(folder), "--listen", "--host", "10.0.0.1", "--device", "cpu"]) == 0
    assert calls[-1][2]["host"] == "10.0.0.1"
    assert main(["--ckpt", str(folder), "--concurrency", "0"]) == 2
    assert "--concurrency must be positive" in capsys.readouterr().err


def test_demo_verb_reports_unloadable_checkpoints(tmp_path, folder, capsys):
    from lumina_lightning.app import main

    bogus = tmp_path / "weights.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    assert main(["--ckpt", str(bogus)]) == 2
    assert f"cannot load {bogus}" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--ckpt", str(folder), "--device", "cuda"]) == 2
        assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert main(["--ckpt", str(folder), "--port", "0"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
    with socket.socket() as taken:  # a port in use is reported, not a traceback
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--ckpt", str(folder), "--port", str(port)]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
