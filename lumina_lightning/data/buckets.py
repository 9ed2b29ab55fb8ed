"""Aspect-ratio buckets: the official crop-size list and best-fit assignment (spec §5).

Lumina-Image 2.0 does not bucket in the usual sense: every image is centre-cropped to the entry of
``generate_crop_size_list`` that keeps the most of its area (``var_center_crop`` with
``random_top_k=1``). We reuse that list as our bucket list so that each training batch holds one
crop size, which is what the official code produces per image.
"""

from __future__ import annotations

import functools

__all__ = ["crop_size_list", "assign_bucket", "bucket_list", "coverage", "cover_scale"]


def crop_size_list(resolution: int, patch: int = 16, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """The official crop-size list for a stage resolution, as ``(width, height)`` pairs.

    Follows spec §5 ("Variable resolution / aspect ratio"):

    * the budget is ``round((resolution / patch) ** 2)`` patches of ``patch`` px (``patch`` is VAE
      downsampling × DiT patch size, 8 × 2 = 16 for the released model), i.e. about
      ``resolution²`` pixels;
    * the official staircase walk enumerates the *maximal* patch grids ``(wp, hp)`` with
      ``wp·hp ≤ budget``, starting at ``(budget, 1)`` and ending at ``(1, budget)``, keeping those
      whose aspect ratio is at most ``max_aspect``;
    * only sides with ``⌊side / 32⌋`` even are kept (side mod 64 ∈ {0, 16}); this is what gives
      the 51 sizes at 1024 (1024×1024, 1360×768, 2048×512, 1984×528, ...). For a general
      ``patch`` we apply the same rule in patch units (``(side/patch) mod 4 ∈ {0, 1}``), which is
      identical to the official rule for ``patch=16``.

    Deliberate deviation: when ``resolution`` is a multiple of ``patch`` but ``resolution/32`` is
    odd (e.g. 32 or 96 px), the filter above removes the square; the official recipe never
    trains at such sizes, but our tiny CPU recipes do, so the square ``resolution×resolution`` is
    added back in that case. At 256/512/1024 the list is exactly the official one.

    The list is ordered as the official code produces it: from widest to tallest.
    """
    if resolution <= 0 or patch <= 0:
        raise ValueError(f"resolution and patch must be positive, got {resolution} and {patch}")
    if max_aspect < 1.0:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    if resolution % patch:
        # Otherwise the walk below gives no square and, e.g. at 40 px with patch 16, only strips
        # (or nothing at 56 px): fail here instead of training on a silently wrong bucket list.
        raise ValueError(
            f"resolution {resolution} is not a multiple of patch {patch} (the pixel size of one token, "
            f"autoencoder downsampling x transformer patch): no usable bucket list. Use a resolution that is "
            f"a multiple of {patch}, e.g. {max(patch, resolution // patch * patch)} or {(resolution // patch + 1) * patch}"
        )
    budget = round((resolution / patch) ** 2)
    sizes: list[tuple[int, int]] = []
    wp, hp = budget, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_aspect and wp % 4 in (0, 1) and hp % 4 in (0, 1):
            sizes.append((wp * patch, hp * patch))
        if (hp + 1) * wp <= budget:
            hp += 1
        else:
            wp -= 1
    square = (resolution, resolution)
    if square not in sizes:
        # Deviation (see docstring): keep the square bucket for small, odd-multiple resolutions.
        sizes.append(square)
        sizes.sort(key=lambda s: (-s[0] / s[1]))
    return sizes


@functools.lru_cache(maxsize=64)
def _bucket_list_cached(resolution: int, patch: int, max_aspect: float) -> tuple[tuple[int, int], ...]:
    return tuple(crop_size_list(resolution, patch, max_aspect))


def bucket_list(resolution: int, patch: int = 16, max_aspect: float = 4.0) -> tuple[tuple[int, int], ...]:
    """The bucket list for a stage resolution, computed once per argument set and cached.

    This is the single place the rest of the code asks for buckets; it returns an immutable tuple
    so the cached value cannot be modified by a caller.
    """
    return _bucket_list_cached(int(resolution), int(patch), float(max_aspect))


def coverage(width: int, height: int, bucket: tuple[int, int]) -> float:
    """The official ``rem_percent`` of a crop size for an image: the fraction of the image kept.

    ``min(cw/w, ch/h) / max(cw/w, ch/h)``: after resizing the image to cover the crop, the crop keeps
    this fraction of the image area (1.0 when the aspect ratios match exactly).
    """
    cw, ch = bucket
    sx, sy = cw / width, ch / height
    return min(sx, sy) / max(sx, sy)


def assign_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    """The bucket that keeps most of an image's area (official ``var_center_crop``, ``random_top_k=1``).

    The official code sorts ``(rem_percent, (cw, ch))`` tuples in reverse and takes the first, so
    ties are broken in favour of the larger ``(cw, ch)`` tuple; we reproduce that exactly.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("empty bucket list")
    best = max(((coverage(width, height, b), tuple(b)) for b in buckets))
    return best[1]


def cover_scale(width: int, height: int, bucket: tuple[int, int]) -> float:
    """Resize factor that makes a ``width×height`` image just cover ``bucket`` (>1 means upscaling)."""
    return max(bucket[0] / width, bucket[1] / height)

