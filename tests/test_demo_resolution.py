"""`lumina demo --resolution` is refused, not snapped, where the model cannot draw it, with the same
message `lumina sample --width` gives (LuminaPipeline.check_size)."""

from __future__ import annotations

import pytest
import torch

from app_helpers import build_pipeline_folder, build_tiny_pipe
from lumina_lightning.serving import DemoService, ServeConfig


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_pipe(tmp_path_factory.mktemp("demo_res"))  # pixel space, patch 16: sides in multiples of 16


def test_a_resolution_off_the_models_grid_is_refused_like_lumina_sample(pipe):
    service = DemoService(pipe, ServeConfig(resolution=30))
    with pytest.raises(ValueError) as err:
        service.check_resolution()
    with pytest.raises(ValueError) as sample_err:
        pipe.check_size(30, 30)  # what `lumina sample --width 30` runs
    assert str(err.value) == f"--resolution 30: {sample_err.value}"
    assert "multiples of 16" in str(err.value) and "nearest valid size: 32x32" in str(err.value)


def test_a_resolution_on_the_grid_passes_and_opens_at_that_size(pipe):
    for side in (32, 48):
        service = DemoService(pipe, ServeConfig(resolution=side))
        service.check_resolution()
        assert service.base_resolution() == side
    DemoService(pipe, ServeConfig()).check_resolution()  # no --resolution: the model's own size, nothing to refuse


def test_lumina_demo_exits_with_the_message_before_serving(tmp_path, capsys, monkeypatch):
    import lumina_lightning.ui.gradio_app as gradio_app
    from lumina_lightning.app import main

    def no_server(*args, **kwargs):  # a refusal never gets here; without it the test would serve forever
        raise AssertionError("lumina demo went on to build and serve the app")

    monkeypatch.setattr(gradio_app, "build_demo", no_server)
    folder = build_pipeline_folder(tmp_path)
    assert main(["--ckpt", str(folder), "--resolution", "30", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "lumina demo: error: --resolution 30: image size 30x30 is not supported" in err
    assert "nearest valid size: 32x32" in err and "starting the server" not in err


def test_a_resolution_over_the_pixel_budget_is_refused_naming_max_pixels(pipe):
    service = DemoService(pipe, ServeConfig(resolution=64, max_pixels=48 * 48))
    with pytest.raises(ValueError, match=r"--resolution 64: 64x64 is 4,096 pixels, more than the per-image budget "
                                         r"--max-pixels 2,304; .*use --resolution 48"):
        service.check_resolution()
    DemoService(pipe, ServeConfig(resolution=48, max_pixels=48 * 48)).check_resolution()
