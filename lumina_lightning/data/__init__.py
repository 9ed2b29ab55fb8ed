"""Data pipeline: records/manifests, caption levels, aspect buckets, resumable loading, caches, synthetic data.

Modules (import what you need; this package imports them lazily so ``lumina data synth`` does not
pay for torch/torchdata):

* ``records``  — :class:`Record`, JSONL/JSON manifests, image folders, data YAMLs (``META``).
* ``captions`` — caption-level choice with weights and a stated fallback order.
* ``buckets``  — the official crop-size list (spec §5) and best-fit bucket assignment.
* ``images``   — Pillow decoding, mode conversion, resize-to-cover + centre crop.
* ``dataset``  — the bucket plan and the image dataset (batch contract in its docstring).
* ``loader``   — :func:`build_dataloader`: bucket batch sampler with a global cursor + StatefulDataLoader.
* ``cache``    — offline latent / caption-feature cache (safetensors shards + JSON index).
* ``synth``    — the synthetic compositional dataset (GenEval-style metadata).
* ``skips``    — bad-input reasons, counter and skip-rate check.
* ``cli``      — ``lumina data synth|cache|inspect``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "config",
    "Record": "records",
    "RecordSet": "records",
    "ManifestError": "records",
    "load_records": "records",
    "read_manifest": "records",
    "read_folder": "records",
    "read_data_yaml": "records",
    "write_manifest": "records",
    "choose_caption": "captions",
    "crop_size_list": "buckets",
    "bucket_list": "buckets",
    "assign_bucket": "buckets",
    "SkipCounter": "skips",
    "SkipRateExceeded": "skips",
    "build_plan": "dataset",
    "DataPlan": "dataset",
    "ImageTextDataset": "dataset",
    "build_dataloader": "loader",
    "BucketBatchSampler": "loader",
    "LuminaDataLoader": "loader",
    "build_cache": "cache",
    "CachedDataset": "cache",
    "CacheIdentityError": "cache",
    "generate_synthetic": "synth",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lumina_lightning.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
