"""The synthetic generator's canvas: the asked aspect ratio, at about ``size²`` pixels."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from lumina_lightning.data.cli import main as data_main
from lumina_lightning.data.synth import _canvas

SIZES = (16, 24, 32, 40, 48, 64, 96, 128, 256)
ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 2.0, 0.5, 4.0, 0.25)


def _independent(size: int, aspect: float) -> tuple[int, int]:
    """What the generator did before: each side snapped on its own (4:3 at 64 px became 80×48)."""
    w, h = size * math.sqrt(aspect), size / math.sqrt(aspect)
    if size % 16 == 0:
        return max(16, int(round(w / 16)) * 16), max(16, int(round(h / 16)) * 16)
    return max(8, int(round(w))), max(8, int(round(h)))


def _error(canvas: tuple[int, int], aspect: float) -> float:
    return abs(math.log(canvas[0] / canvas[1] / aspect))


def test_cli_four_by_three_at_64_px_writes_four_by_three_images(tmp_path, capsys):
    out = tmp_path / "d"
    assert data_main(["synth", "--out", str(out), "--n", "6", "--n-test", "6", "--size", "64", "--aspect", "4:3"]) == 0
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert {(r["width"], r["height"]) for r in rows} == {(64, 48)}
    with Image.open(out / rows[0]["image"]) as img:
        assert img.size == (64, 48)
    assert _canvas(64, 3 / 4) == (48, 64)


@pytest.mark.parametrize("size", SIZES)
def test_square_canvas_is_size_by_size(size):
    # the default synthetic set (data.synthetic and the pipeline's synthetic step) is square: unchanged
    assert _canvas(size, 1.0) == (size, size)


def test_canvas_is_snapped_and_never_further_from_the_aspect_than_before():
    for size in SIZES:
        step = 16 if size % 16 == 0 else 1
        for aspect in ASPECTS:
            w, h = _canvas(size, aspect)
            assert w % step == 0 and h % step == 0 and min(w, h) >= (16 if step == 16 else 8)
            assert _error((w, h), aspect) <= _error(_independent(size, aspect), aspect) + 1e-12, (size, aspect)
            assert 0.5 <= w * h / size**2 <= 2.0, (size, aspect, w, h)  # still about size² pixels


@pytest.mark.parametrize("size, aspect, canvas", [
    (64, 2.0, (96, 48)),  # already exact: unchanged
    (32, 4.0, (64, 16)),  # the aspects the loader/cache tests draw: unchanged
    (32, 0.25, (16, 64)),
    (48, 4 / 3, (64, 48)),  # was 48×48
    (128, 4 / 3, (128, 96)),  # was 144×112
])
def test_canvas_examples(size, aspect, canvas):
    assert _canvas(size, aspect) == canvas
