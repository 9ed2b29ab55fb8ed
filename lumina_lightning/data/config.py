"""``DataConfig``: the ``data:`` section of a training recipe.

Every field is typed, has a default, and is documented, so recipes can be validated against this
dataclass (``DataConfig.from_dict`` rejects unknown keys with a suggestion; it also works with
``OmegaConf.structured``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

from .captions import DEFAULT_FALLBACK

__all__ = ["DataConfig", "MIN_SIZE_POLICIES"]

MIN_SIZE_POLICIES = ("upscale", "skip")


@dataclass
class DataConfig:
    """Where the data is and how it becomes batches.

    Attributes:
        path: a JSONL/JSON manifest, an image folder (same-name ``.txt``/``.json`` captions), or a
            data YAML with a ``META`` list of sources and ratios (official style). Required unless
            ``cache_dir`` is set.
        root: base directory for relative image paths in ``path`` (default: the manifest's folder);
            a relative ``root`` is relative to the current directory, for a manifest and for a data
            YAML alike (only a ``root:`` written inside a data YAML is relative to the YAML's folder).
        system: system-prompt template name for records that carry none (``None`` leaves the
            choice to the training module); the dataset only reports it, it never prepends it.
        cache_dir: read an offline latent/caption-feature cache (``lumina data cache``) instead of
            images; batches then hold ``latents``/``cap_feats``/``cap_mask`` instead of ``pixels``.
        resolution: stage resolution, a multiple of ``patch``; the buckets are the official crop sizes for it (spec §5).
        patch: pixels per latent patch (VAE downsampling × DiT patch size; 8 × 2 = 16 officially).
        max_aspect: largest bucket aspect ratio (official 4.0).
        caption_weights: sampling weight per caption level, e.g. ``{"short": 0.5, "medium": 0.3,
            "long": 0.2}``; empty = uniform over the levels each record has.
        caption_fallback: order of levels used when a record has none of the weighted levels
            (then the alphabetically first available level; see ``captions.py``).
        min_size_policy: what to do with an image smaller than its bucket: ``"upscale"`` it
            (counted as an ``upscaled`` event) or ``"skip"`` it (a ``too_small`` skip).
        max_upscale: with ``"skip"``, the largest upscale factor still accepted (1.0 = none).
        max_skip_rate: stop the run with a clear error when more than this fraction of samples is
            skipped (missing, unreadable, empty caption, too small).
        skip_check_min_samples: samples to see before the runtime skip rate is checked (the
            rate over the manifest itself, known before training, is checked at once).
        drop_last: drop each bucket's last partial batch per epoch (in a bucket with at least a
            batch of samples it is a different set of samples each epoch because of the shuffle; a
            bucket with fewer samples per epoch than the batch size never fills a batch, so its
            records are never trained on: the loader warns and names those buckets, and
            ``lumina data inspect --batch-size N`` lists them). With ``False`` batches can be smaller.
        use_manifest_sizes: trust ``width``/``height`` stated in the manifest instead of
            reading every image header when the loader is built.
        scan_threads: threads used to read image headers when sizes are not in the manifest.
        max_substitutes: when an image fails at decode time, how many other images of the same
            bucket to try in its place so batches keep their size.
        strict_resume: refuse to resume when the data (records, buckets, ratios) or the seed
            changed since the checkpoint; ``False`` only warns.
        prefetch_factor: batches prefetched per worker (ignored with ``num_workers=0``).
        persistent_workers: keep worker processes between epochs.
        pin_memory: pin batches in page-locked memory (GPU hosts).
        snapshot_every_n_steps: how often workers snapshot their state (StatefulDataLoader).
        memory_cache_mb: keep decoded, resized images in memory, up to this many MB per loader
            process (0 = off). Exact: a sample's pixels depend only on its image and bucket. It pays
            where decoding is a visible share of a step, i.e. small images and small models on CPU
            with ``num_workers=0``; a worker's cache lives as long as the worker (set
            ``persistent_workers`` to keep it across epochs).
    """

    path: str | None = None
    root: str | None = None
    system: str | None = None
    cache_dir: str | None = None
    resolution: int = 256
    patch: int = 16
    max_aspect: float = 4.0
    caption_weights: dict[str, float] = field(default_factory=dict)
    caption_fallback: list[str] = field(default_factory=lambda: list(DEFAULT_FALLBACK))
    min_size_policy: str = "upscale"
    max_upscale: float = 1.0
    max_skip_rate: float = 0.05
    skip_check_min_samples: int = 100
    drop_last: bool = True
    use_manifest_sizes: bool = True
    scan_threads: int = 8
    max_substitutes: int = 4
    strict_resume: bool = True
    prefetch_factor: int = 2
    persistent_workers: bool = False
    pin_memory: bool = False
    snapshot_every_n_steps: int = 1
    memory_cache_mb: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a readable message for out-of-range values."""
        problems = []
        if self.resolution <= 0 or self.patch <= 0:
            problems.append(f"resolution ({self.resolution}) and patch ({self.patch}) must be positive")
        elif self.resolution < self.patch:
            problems.append(f"resolution ({self.resolution}) must be at least patch ({self.patch})")
        elif self.resolution % self.patch:
            # The buckets are patch grids (spec §5): any other resolution gives a wrong or empty list.
            problems.append(
                f"data.resolution ({self.resolution}) must be a multiple of data.patch ({self.patch}, the pixel size "
                f"of one token = autoencoder downsampling x transformer patch), e.g. "
                f"{self.resolution // self.patch * self.patch} or {(self.resolution // self.patch + 1) * self.patch}"
            )
        if self.max_aspect < 1.0:
            problems.append(f"max_aspect must be >= 1, got {self.max_aspect}")
        if self.min_size_policy not in MIN_SIZE_POLICIES:
            problems.append(f"min_size_policy must be one of {MIN_SIZE_POLICIES}, got {self.min_size_policy!r}")
        if self.max_upscale < 1.0:
            problems.append(f"max_upscale must be >= 1, got {self.max_upscale}")
        if not 0.0 <= self.max_skip_rate <= 1.0:
            problems.append(f"max_skip_rate must be in [0, 1], got {self.max_skip_rate}")
        for level, weight in dict(self.caption_weights).items():
            if not isinstance(weight, (int, float)) or weight < 0:
                problems.append(f"caption_weights[{level!r}] must be a number >= 0, got {weight!r}")
        if self.caption_weights and not any(float(w) > 0 for w in dict(self.caption_weights).values()):
            problems.append("caption_weights needs at least one positive weight (or leave it empty)")
        if self.prefetch_factor < 1 or self.snapshot_every_n_steps < 1:
            problems.append("prefetch_factor and snapshot_every_n_steps must be >= 1")
        if self.scan_threads < 1 or self.max_substitutes < 0 or self.skip_check_min_samples < 0:
            problems.append("scan_threads must be >= 1, max_substitutes and skip_check_min_samples >= 0")
        if not self.memory_cache_mb >= 0:
            problems.append(f"memory_cache_mb must be >= 0, got {self.memory_cache_mb}")
        if problems:
            raise ValueError("invalid data config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "DataConfig":
        """Build from a mapping (a recipe's ``data:`` section); unknown keys are an error."""
        data = dict(data or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, names, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown data config keys: {', '.join(hints)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for logging hyper-parameters)."""
        return dataclasses.asdict(self)
