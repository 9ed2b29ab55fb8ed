"""Image decoding with Pillow: mode conversion, resize-to-cover + centre crop, tensor conversion.

No torchvision: decoding and resizing use Pillow, the tensor conversion numpy + torch.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from .buckets import cover_scale
from .skips import MISSING_FILE, UNREADABLE_IMAGE, BadSample

# Truncated files must raise, not be silently padded with grey (the Pillow default is already
# False; we pin it because other libraries flip this global).
ImageFile.LOAD_TRUNCATED_IMAGES = False

WHITE = (255, 255, 255)
_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that transpose width and height


def image_size(path: str) -> tuple[int, int]:
    """``(width, height)`` as displayed (after EXIF rotation), reading only the file header.

    Raises :class:`BadSample` with reason ``missing_file`` or ``unreadable_image``.
    """
    if not os.path.exists(path):
        raise BadSample(MISSING_FILE, f"{path}: file not found")
    try:
        with Image.open(path) as img:
            width, height = img.size
            try:
                orientation = img.getexif().get(_ORIENTATION_TAG)
            except Exception:  # a broken EXIF block must not make the image unusable
                orientation = None
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
        raise BadSample(UNREADABLE_IMAGE, f"{path}: cannot read image header ({type(err).__name__}: {err})") from err
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return width, height


def _high_bit_to_8bit(img: Image.Image) -> Image.Image:
    """Grayscale 16-bit ("I;16*"), 32-bit int ("I") or float ("F") to 8-bit "L", scaled correctly.

    16-bit images span 0..65535, so they are divided by 257 (65535/255), not clipped (clipping is
    the classic bug that turns 16-bit PNGs white). Pillow opens 16-bit PNGs as "I;16"; an "I"
    image whose values exceed 255 is taken to be 16-bit too. Float images in [0, 1] are scaled by
    255, otherwise clipped to [0, 255].
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = arr.astype(np.float32) / 257.0
    elif img.mode == "I":
        out = arr.astype(np.float32)
        if out.max(initial=0) > 255:
            out = out / 257.0
    else:  # "F"
        out = arr.astype(np.float32)
        if out.max(initial=0) <= 1.0:
            out = out * 255.0
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """CMYK to RGB through the embedded ICC profile when there is one, else Pillow's formula."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
        except Exception:  # a broken or unsupported profile: fall back to the plain conversion
            pass
    return img.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB "properly".

    * transparency (RGBA, LA, PA, RGBa, La, palette or RGB/L with a ``transparency`` key) is
      composited over white, so transparent pixels do not turn black;
    * CMYK goes through its ICC profile when present;
    * 16-bit / 32-bit / float grayscale is rescaled to 8 bits (see :func:`_high_bit_to_8bit`);
    * palette, 1-bit, L, YCbCr, LAB and HSV images use Pillow's conversion.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        img = _high_bit_to_8bit(img)
        mode = img.mode
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    has_alpha = "A" in mode or "a" in mode or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str) -> Image.Image:
    """Decode an image fully, apply EXIF orientation, and return it as 8-bit RGB.

    Raises :class:`BadSample` (``missing_file`` / ``unreadable_image``) instead of the many
    exception types Pillow can raise, so one bad file never kills a run.
    """
    if not os.path.exists(path):
        raise BadSample(MISSING_FILE, f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            # Pillow's warnings (palette transparency notes, EXIF quirks) are noise here; real
            # problems raise and become a BadSample below.
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                img.load()  # raises on truncated data
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except BadSample:
        raise
    except Exception as err:
        raise BadSample(UNREADABLE_IMAGE, f"{path}: cannot decode image ({type(err).__name__}: {err})") from err


def resize_cover_center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize ``img`` to cover ``size=(w, h)`` and cut out the centre, as the official pipeline does.

    Spec §5: while the image is at least twice the crop in both sides it is halved with a BOX
    filter (cheap and alias-free), then resized with BICUBIC so that it just covers the crop, then
    centre-cropped (the official ``center_crop``; ``random_top_k=1`` so no random choice of size).
    """
    cw, ch = size
    while img.width >= 2 * cw and img.height >= 2 * ch:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = cover_scale(img.width, img.height, size)
    new_w = max(cw, round(img.width * scale))
    new_h = max(ch, round(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    left = (img.width - cw) // 2
    top = (img.height - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def to_array(img: Image.Image) -> np.ndarray:
    """8-bit RGB image to a float32 ``3×H×W`` numpy array in [−1, 1].

    Done in numpy on purpose: it is single-threaded, whereas torch element-wise ops use the
    intra-op thread pool, which on small, busy CPU machines spin-waits and can be 10× slower.
    """
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {arr.shape}")
    out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.float32)
    np.multiply(arr.transpose(2, 0, 1), np.float32(1 / 127.5), out=out, casting="unsafe")
    out -= np.float32(1.0)
    return out


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB image to a float32 ``3×H×W`` tensor in [−1, 1]."""
    return torch.from_numpy(to_array(img))


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Inverse of :func:`to_tensor` for one ``3×H×W`` tensor in [−1, 1] (for previews and tests)."""
    arr = ((tensor.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())
