"""Aspect buckets: the official crop-size list (spec §5) and best-fit assignment."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lumina_lightning.data.buckets import assign_bucket, bucket_list, coverage, crop_size_list
from lumina_lightning.data.images import resize_cover_center_crop


def _official_pick(width, height, sizes):
    """The official var_center_crop choice with random_top_k=1, written independently."""
    rem = [min(cw / width, ch / height) / max(cw / width, ch / height) for cw, ch in sizes]
    return sorted(zip(rem, sizes), reverse=True)[0][1]


def test_1024_list_matches_spec():
    sizes = crop_size_list(1024)
    assert len(sizes) == 51
    for example in [(1024, 1024), (1360, 768), (2048, 512), (1984, 528), (768, 1360), (512, 2048)]:
        assert example in sizes
    assert len(set(sizes)) == len(sizes)
    # ordered from widest to tallest, like the official staircase walk
    ratios = [w / h for w, h in sizes]
    assert ratios == sorted(ratios, reverse=True)


@pytest.mark.parametrize("resolution", [32, 64, 128, 256, 512, 1024])
def test_list_properties(resolution):
    sizes = crop_size_list(resolution)
    budget = round((resolution / 16) ** 2)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % 16 == 0 and h % 16 == 0
        assert (w // 16) * (h // 16) <= budget  # area cap
        assert max(w, h) / min(w, h) <= 4.0
    if resolution >= 128:  # the official side rule (spec §5): side mod 64 in {0, 16}
        assert all(w % 64 in (0, 16) and h % 64 in (0, 16) for w, h in sizes)


def test_max_aspect_and_patch_parameters():
    assert all(max(w, h) / min(w, h) <= 2.0 for w, h in crop_size_list(512, max_aspect=2.0))
    sizes = crop_size_list(512, patch=32)
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in sizes)
    with pytest.raises(ValueError):
        crop_size_list(512, max_aspect=0.5)


def test_bucket_list_is_cached_and_immutable():
    a, b = bucket_list(256), bucket_list(256)
    assert a is b and isinstance(a, tuple)
    assert list(a) == crop_size_list(256)


def test_every_image_lands_in_its_best_bucket():
    rng = np.random.default_rng(0)
    buckets = bucket_list(256)
    for _ in range(500):
        w, h = (int(x) for x in rng.integers(8, 4000, size=2))
        b = assign_bucket(w, h, buckets)
        assert b in buckets
        assert b == _official_pick(w, h, list(buckets))
        assert coverage(w, h, b) == max(coverage(w, h, c) for c in buckets)


def test_official_examples_assign_exactly():
    buckets = bucket_list(1024)
    assert assign_bucket(1024, 1024, buckets) == (1024, 1024)
    assert assign_bucket(4000, 4000, buckets) == (1024, 1024)
    assert assign_bucket(1360, 768, buckets) == (1360, 768)
    assert assign_bucket(1920, 1080, buckets) == _official_pick(1920, 1080, list(buckets))
    assert assign_bucket(4096, 1024, buckets) == (2048, 512)
    assert assign_bucket(1024, 4096, buckets) == (512, 2048)
    assert assign_bucket(10000, 100, buckets) == (2048, 512)  # beyond 4:1 clamps to the widest


@pytest.mark.parametrize("size", [(300, 200), (64, 64), (40, 90), (1000, 250)])
def test_resize_cover_center_crop_gives_the_bucket(size):
    buckets = bucket_list(128)
    img = Image.new("RGB", size, (10, 20, 30))
    b = assign_bucket(*size, buckets)
    out = resize_cover_center_crop(img, b)
    assert out.size == b
    assert np.asarray(out).reshape(-1, 3).tolist()[0] == [10, 20, 30]


def test_center_crop_keeps_the_middle():
    arr = np.zeros((64, 192, 3), np.uint8)
    arr[:, 64:128] = 255  # white middle third
    out = np.asarray(resize_cover_center_crop(Image.fromarray(arr), (64, 64)))
    assert out.mean() > 250  # the crop is the centre


@pytest.mark.parametrize("resolution", [40, 56, 24])
def test_resolution_not_a_multiple_of_patch_is_refused(resolution):
    # 40 px used to give only 64x16/16x64 strips and 56 px an empty list, silently
    with pytest.raises(ValueError, match=f"resolution {resolution} is not a multiple of patch 16"):
        crop_size_list(resolution)
    from lumina_lightning.data.config import DataConfig

    with pytest.raises(ValueError, match=rf"data.resolution \({resolution}\) must be a multiple of data.patch \(16"):
        DataConfig(resolution=resolution)
    assert (48, 48) in crop_size_list(48) and DataConfig(resolution=48, patch=16).resolution == 48
