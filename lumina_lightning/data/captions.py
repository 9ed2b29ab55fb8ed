"""Caption-level choice: which of a record's captions (short/medium/long/tags/...) a sample uses.

The choice is a weighted draw over the levels the record has, made from a random stream keyed by
``(seed, epoch, sample index, copy)`` only, so it does not depend on worker count, rank or batch
composition and a resumed run makes the same choices. ``copy`` tells apart the listings of a record
that a source ``ratio`` >= 2 repeats within one epoch (see ``loader.BucketBatchSampler``).

Fallback order (documented contract): a level counts as *available* when its text is not blank.

1. If some levels named in ``weights`` (with weight > 0) are available, one of them is drawn with
   probability proportional to its weight (weights are renormalised over the available ones).
2. Otherwise the first available level in ``fallback`` is used (default order:
   ``DEFAULT_FALLBACK`` = long, medium, short, caption, prompt, tags).
3. Otherwise the alphabetically first available level is used (e.g. ``"long_de"``).
4. A record with no available level has an empty caption: a bad input, counted as an
   ``empty_caption`` skip by the loader.

With empty ``weights`` step 1 draws uniformly over all available levels.
Caption dropout (for classifier-free guidance) is *not* done here; it is the training module's job.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["DEFAULT_FALLBACK", "available_levels", "choose_caption", "caption_rng"]

DEFAULT_FALLBACK: tuple[str, ...] = ("long", "medium", "short", "caption", "prompt", "tags")
_CAPTION_SALT = 0xCA9


def caption_rng(seed: int, epoch: int, index: int, copy: int = 0) -> np.random.Generator:
    """The random stream of one sample's caption choice, keyed by ``(seed, epoch, index, copy)``."""
    # copy 0 keeps the key it had before copies existed, so data without repeats draws as before
    extra = [int(copy)] if copy else []
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), int(index), _CAPTION_SALT, *extra])


def available_levels(captions: Mapping[str, str]) -> list[str]:
    """The levels whose text is not blank, in the record's order."""
    return [level for level, text in captions.items() if isinstance(text, str) and text.strip()]


def choose_caption(
    captions: Mapping[str, str],
    weights: Mapping[str, float] | None,
    fallback: Sequence[str] = DEFAULT_FALLBACK,
    *,
    seed: int = 0,
    epoch: int = 0,
    index: int = 0,
    copy: int = 0,
) -> tuple[str, str] | None:
    """Pick ``(level, text)`` for one sample, or ``None`` if the record has no usable caption.

    See the module docstring for the rule and the fallback order. The returned text is stripped of
    surrounding whitespace and never includes a system prompt.
    """
    present = available_levels(captions)
    if not present:
        return None
    # Candidates are ordered by the weights mapping (or alphabetically), not by the record's key
    # order, so the same sample picks the same level whether it is read from images or a cache.
    if weights:
        have = set(present)
        names = [lvl for lvl, w in weights.items() if lvl in have and float(w) > 0.0]
        probs = np.array([float(weights[lvl]) for lvl in names], dtype=np.float64)
    else:
        names = sorted(present)
        probs = np.ones(len(names), dtype=np.float64)
    if names:
        if len(names) == 1:
            level = names[0]
        else:
            u = caption_rng(seed, epoch, index, copy).random()
            cdf = np.cumsum(probs / probs.sum())
            level = names[min(int(np.searchsorted(cdf, u, side="right")), len(names) - 1)]
    else:
        level = next((lvl for lvl in fallback if lvl in present), None) or sorted(present)[0]
    return level, captions[level].strip()
