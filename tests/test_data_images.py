"""Image decoding: mode conversions (alpha, CMYK, 16-bit, palette), EXIF, errors, tensor range."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lumina_lightning.data.images import image_size, load_image, to_pil, to_tensor, to_rgb
from lumina_lightning.data.skips import MISSING_FILE, UNREADABLE_IMAGE, BadSample


def _pixel(img, xy=(0, 0)):
    return tuple(int(v) for v in img.getpixel(xy))


def test_rgba_and_la_are_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red ...
    rgba[0, 0, 3] = 0  # fully transparent
    rgba[0, 1, 3] = 128  # half transparent
    rgba[0, 2, 3] = 255  # opaque
    Image.fromarray(rgba).save(tmp_path / "a.png")
    img = load_image(str(tmp_path / "a.png"))
    assert img.mode == "RGB"
    assert _pixel(img, (0, 0)) == (255, 255, 255)  # not black
    assert _pixel(img, (2, 0)) == (255, 0, 0)
    r, g, b = _pixel(img, (1, 0))
    assert r == 255 and 120 <= g <= 135 and g == b
    la = Image.new("LA", (2, 2), (0, 0))  # black, fully transparent
    assert _pixel(to_rgb(la)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    out = load_image(str(tmp_path / "p.png"))
    assert _pixel(out, (0, 0)) == (255, 255, 255) and _pixel(out, (1, 1)) == (0, 200, 0)
    opaque = Image.new("P", (2, 2), 1)
    opaque.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert _pixel(to_rgb(opaque)) == (10, 20, 30)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(tmp_path, fmt):
    path = tmp_path / f"c.{fmt.lower()}"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, fmt)  # pure red in CMYK
    r, g, b = _pixel(load_image(str(path)))
    assert r > 230 and g < 25 and b < 25


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    img = load_image(str(tmp_path / "g16.png"))
    values = [_pixel(img, (x, 0))[0] for x in range(4)]
    assert values == [0, 64, 128, 255]
    assert all(len(set(_pixel(img, (x, 0)))) == 1 for x in range(4))  # gray stays gray


def test_other_modes():
    assert _pixel(to_rgb(Image.new("L", (2, 2), 77))) == (77, 77, 77)
    assert _pixel(to_rgb(Image.new("1", (2, 2), 1))) == (255, 255, 255)
    assert _pixel(to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32)))) == (128, 128, 128)
    assert to_rgb(Image.new("YCbCr", (2, 2))).mode == "RGB"


def test_exif_rotation_swaps_sizes(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert image_size(str(tmp_path / "r.jpg")) == (20, 40)
    assert load_image(str(tmp_path / "r.jpg")).size == (20, 40)


def test_missing_truncated_and_garbage(tmp_path):
    with pytest.raises(BadSample) as err:
        load_image(str(tmp_path / "nope.png"))
    assert err.value.reason == MISSING_FILE
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    assert image_size(str(tmp_path / "trunc.png")) == (64, 64)  # the header is intact ...
    with pytest.raises(BadSample) as err:
        load_image(str(tmp_path / "trunc.png"))  # ... but decoding fails
    assert err.value.reason == UNREADABLE_IMAGE and "trunc.png" in str(err.value)
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    for fn in (image_size, load_image):
        with pytest.raises(BadSample) as err:
            fn(str(tmp_path / "junk.png"))
        assert err.value.reason == UNREADABLE_IMAGE


def test_tensor_range_and_round_trip():
    arr = np.array([[[0, 128, 255]]], np.uint8)
    t = to_tensor(Image.fromarray(arr))
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32
    assert t.min() == -1.0 and t.max() == 1.0
    assert _pixel(to_pil(t)) == (0, 128, 255)
