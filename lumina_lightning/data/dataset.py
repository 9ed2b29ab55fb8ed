"""The bucket plan and the image dataset that turns a batch of sample keys into a training batch.

``DataPlan`` is computed once per loader, in the main process: it knows each record's size and
bucket, which records are unusable before any decoding (missing file, unreadable header, empty
caption, too small), and how an epoch is cut into one-bucket micro-batches. The sampler
(``loader.py``) walks that schedule; the datasets here (and ``cache.CachedDataset``) decode it.

Batch contract (what the training module receives)::

    pixels    float32 B×3×H×W in [−1, 1], one bucket per batch
    captions  list[str]   chosen caption text, without any system prompt
    levels    list[str]   the caption level of each sample
    systems   list[str | None]  system-template name carried by each record
    indices   int64 B     record ids (global sample ids) actually delivered
    copies    int64 B     which listing of its record in the epoch each sample is (0 = first; a
                          source ``ratio`` >= 2 lists a record several times per epoch)
    epoch     int
    bucket    (width, height)
    skips     dict        per-batch bad-input report: {"seen", "skipped": {reason: n},
                          "events": {...}, "examples": {...}}; merged in the main process
"""

from __future__ import annotations

import abc
import functools
import itertools
import logging
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .buckets import assign_bucket, bucket_list, cover_scale
from .captions import available_levels, choose_caption
from .config import DataConfig
from .images import image_size, load_image, resize_cover_center_crop, to_array
from .records import Record, RecordSet
from .skips import EMPTY_CAPTION, TOO_SMALL, UPSCALED, BadSample, SkipCounter, SkipRateExceeded

log = logging.getLogger("lumina_lightning.data")

__all__ = ["DataPlan", "ImageTextDataset", "SampleKey", "build_plan"]

# A sample key as the sampler hands it to the dataset: (epoch, record index, copy), where copy
# numbers the listings of a record within the epoch; (epoch, record index) means copy 0.
SampleKey = tuple[int, int] | tuple[int, int, int]
_SCHEDULE_SALT = 0xB0C
_SUBSTITUTE_SALT = 0x5B5
_FALLBACK_SALT = 0xFA11


@dataclass
class DataPlan:
    """Per-record size and bucket, the plan-time skips, and the epoch schedule.

    Attributes:
        records: the record set (with per-source ratios).
        buckets: the bucket list ``(w, h)`` for the resolution.
        bucket_ids: int32 per record, index into ``buckets``; −1 = excluded (see ``skips``).
        sizes: int32 ``N×2`` displayed ``(width, height)``; 0 where unknown.
        skips: samples excluded before training, by reason.
        excluded: record index -> ``(reason, message)`` of each record excluded before training.
    """

    records: RecordSet
    buckets: tuple[tuple[int, int], ...]
    bucket_ids: np.ndarray
    sizes: np.ndarray
    skips: SkipCounter = field(default_factory=SkipCounter)
    excluded: dict[int, tuple[str, str]] = field(default_factory=dict)
    _members: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.bucket_ids)

    @functools.cached_property
    def fingerprint(self) -> int:
        """A checksum of everything the schedule depends on besides seed/epoch/batch size."""
        return self.fingerprint_of(self.bucket_ids)

    def fingerprint_of(self, bucket_ids: np.ndarray) -> int:
        """:attr:`fingerprint` as it would be with these ``bucket_ids``."""
        crc = zlib.crc32(np.ascontiguousarray(bucket_ids, dtype=np.int32).tobytes())
        ratios = ";".join(f"{s.start}:{s.stop}:{s.ratio!r}" for s in self.records.sources)
        crc = zlib.crc32(ratios.encode(), crc)
        return zlib.crc32(repr(self.buckets).encode(), crc)

    @functools.cached_property
    def packed_bucket_ids(self) -> str:
        """``bucket_ids`` compressed into a short ASCII string (kept in loader checkpoints, so that a
        resume can tell which records changed; see ``loader.LuminaDataLoader.load_state_dict``)."""
        import base64

        raw = np.ascontiguousarray(self.bucket_ids, dtype="<i2" if len(self.buckets) < 32767 else "<i4")
        return f"{raw.dtype.str}:" + base64.b64encode(zlib.compress(raw.tobytes(), 6)).decode("ascii")

    @staticmethod
    def unpack_bucket_ids(packed: Any) -> np.ndarray | None:
        """Inverse of :attr:`packed_bucket_ids`; ``None`` for anything unreadable."""
        import base64

        try:
            dtype, data = str(packed).split(":", 1)
            return np.frombuffer(zlib.decompress(base64.b64decode(data)), dtype=np.dtype(dtype)).astype(np.int32)
        except Exception:  # noqa: BLE001 - an old or damaged checkpoint entry: just no detail
            return None

    def epoch_listings(self, seed: int, epoch: int) -> dict[int, int]:
        """Samples per bucket id in epoch ``epoch`` (records listed by the source ratios, usable only)."""
        idx = self.records.epoch_indices(seed, epoch)
        ids, counts = np.unique(self.bucket_ids[idx][self.bucket_ids[idx] >= 0], return_counts=True)
        return {int(b): int(c) for b, c in zip(ids, counts)}

    def small_buckets(self, batch_size: int, seed: int = 0, epoch: int = 0) -> dict[tuple[int, int], int]:
        """Buckets with fewer than ``batch_size`` samples in epoch ``epoch``: ``{bucket: usable records}``.

        With ``drop_last`` such a bucket never fills a batch, so its records are never trained on
        (every epoch, not a different set each epoch as for a larger bucket's partial batch).
        """
        listed = self.epoch_listings(seed, epoch)
        counts = np.bincount(self.bucket_ids[self.bucket_ids >= 0], minlength=len(self.buckets))
        return {self.buckets[b]: int(counts[b]) for b in range(len(self.buckets))
                if counts[b] and listed.get(b, 0) < batch_size}

    def _reset_caches(self) -> None:
        """Forget what was derived from ``bucket_ids`` (after they were edited, see loader.py)."""
        self._members.clear()
        self.__dict__.pop("fingerprint", None)
        self.__dict__.pop("packed_bucket_ids", None)

    def members(self, bucket: int) -> np.ndarray:
        """Usable record ids in one bucket (used to find substitutes for undecodable images)."""
        if bucket not in self._members:
            self._members[bucket] = np.flatnonzero(self.bucket_ids == bucket)
        return self._members[bucket]

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Number of usable records per bucket (non-empty buckets only)."""
        ids, counts = np.unique(self.bucket_ids[self.bucket_ids >= 0], return_counts=True)
        return {self.buckets[i]: int(c) for i, c in zip(ids, counts)}

    def epoch_schedule(self, seed: int, epoch: int, batch_size: int, drop_last: bool) -> list[np.ndarray]:
        """The global list of one-bucket micro-batches of an epoch (independent of world size).

        Each source's records are taken according to its ratio, grouped by bucket, shuffled within
        the bucket, cut into ``batch_size`` chunks, and the chunks of all buckets are shuffled
        together. Ranks then deal this list round-robin (see ``BucketBatchSampler``), so every rank
        gets every bucket in about equal proportion.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        idx = self.records.epoch_indices(seed, epoch)
        idx = idx[self.bucket_ids[idx] >= 0]
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), _SCHEDULE_SALT])
        order = np.argsort(self.bucket_ids[idx], kind="stable")
        idx = idx[order]
        bids = self.bucket_ids[idx]
        chunks: list[np.ndarray] = []
        bounds = np.flatnonzero(np.diff(bids)) + 1
        for members in np.split(idx, bounds) if len(idx) else []:
            members = members[rng.permutation(len(members))]
            full = len(members) // batch_size
            chunks.extend(members[k * batch_size : (k + 1) * batch_size] for k in range(full))
            if not drop_last and len(members) % batch_size:
                chunks.append(members[full * batch_size :])
        return [chunks[i] for i in rng.permutation(len(chunks))]


def _plan_size(record, use_manifest_sizes: bool) -> tuple[int, int]:
    if use_manifest_sizes and record.width and record.height:
        return int(record.width), int(record.height)
    return image_size(record.image)


def build_plan(records: RecordSet, cfg: DataConfig, progress: bool = False) -> DataPlan:
    """Size every record, assign its bucket, and exclude what is unusable before training.

    Sizes come from the manifest when it states them (``cfg.use_manifest_sizes``), else from the
    image header (read with ``cfg.scan_threads`` threads). Exclusions are counted by reason in
    ``plan.skips`` and logged; the caller checks the rate.
    """
    buckets = bucket_list(cfg.resolution, cfg.patch, cfg.max_aspect)
    n = len(records.records)
    bucket_ids = np.full(n, -1, dtype=np.int32)
    sizes = np.zeros((n, 2), dtype=np.int32)
    skips = SkipCounter()
    excluded: dict[int, tuple[str, str]] = {}
    bucket_index = {b: i for i, b in enumerate(buckets)}

    def probe(i: int):
        rec = records.records[i]
        if not available_levels(rec.captions):
            return i, None, BadSample(EMPTY_CAPTION, f"{rec.image}: no non-empty caption")
        try:
            return i, _plan_size(rec, cfg.use_manifest_sizes), None
        except BadSample as err:
            return i, None, err

    iterator: Any
    if n > 256 and cfg.scan_threads > 1:
        pool = ThreadPoolExecutor(max_workers=cfg.scan_threads)
        iterator = pool.map(probe, range(n), chunksize=64)
    else:
        pool = None
        iterator = map(probe, range(n))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=n, desc="sizing images", unit="img")
    try:
        for i, size, err in iterator:
            skips.seen += 1
            if err is not None:
                skips.add(err.reason, str(err), seen=False)
                excluded[i] = (err.reason, str(err))
                continue
            w, h = size
            sizes[i] = (w, h)
            bucket = assign_bucket(w, h, buckets)
            if cover_scale(w, h, bucket) > 1.0 + 1e-9:
                if cfg.min_size_policy == "skip" and cover_scale(w, h, bucket) > cfg.max_upscale + 1e-9:
                    message = f"{records.records[i].image}: {w}x{h} is smaller than bucket {bucket[0]}x{bucket[1]}"
                    skips.add(TOO_SMALL, message, seen=False)
                    excluded[i] = (TOO_SMALL, message)
                    continue
                skips.events[UPSCALED] += 1
            bucket_ids[i] = bucket_index[bucket]
    finally:
        if pool is not None:
            pool.shutdown()
    if skips.num_skipped:
        log.warning("data plan: %s", skips.summary())
    return DataPlan(records, buckets, bucket_ids, sizes, skips, excluded)


class _WarnOnce:
    """Per-process rate limit for skip warnings: the first few per reason, then every 100th."""

    def __init__(self, first: int = 5, every: int = 100):
        self.first, self.every, self.counts = first, every, Counter()

    def __call__(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        c = self.counts[reason]
        if c <= self.first or c % self.every == 0:
            log.warning("skipping sample (%s, #%d in this process): %s", reason, c, message)


_warn = _WarnOnce()


class _BatchDatasetBase(Dataset, metaclass=abc.ABCMeta):
    """Shared logic: caption choice, substitutes for failed samples, the skip report."""

    def __init__(self, plan: DataPlan, cfg: DataConfig, seed: int):
        self.plan = plan
        self.cfg = cfg
        self.seed = int(seed)
        self.weights = dict(cfg.caption_weights)
        self.fallback = list(cfg.caption_fallback)

    def __len__(self) -> int:
        return len(self.plan)

    def _caption(self, captions, epoch: int, index: int, copy: int = 0):
        return choose_caption(captions, self.weights, self.fallback, seed=self.seed, epoch=epoch, index=index,
                              copy=copy)

    @abc.abstractmethod
    def _load_one(self, epoch: int, index: int, bucket: tuple[int, int], report: SkipCounter,
                  copy: int = 0) -> dict[str, Any]:
        """Load one sample (its caption chosen for listing ``copy``) or raise :class:`BadSample`."""

    def _substitutes(self, epoch: int, index: int, bucket_id: int):
        members = self.plan.members(bucket_id)
        if len(members) <= 1:
            return
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, int(epoch), int(index), _SUBSTITUTE_SALT])
        for _ in range(self.cfg.max_substitutes):
            cand = int(members[rng.integers(len(members))])
            if cand != index:
                yield cand

    def _fallback(self, epoch: int, index: int, bucket_id: int, failed: set[int], report: SkipCounter,
                  copy: int = 0) -> dict[str, Any]:
        """One readable sample for a batch whose every slot and substitute failed.

        Dropping the batch would leave this rank one step short of ``len(loader)`` and out of step
        with the other ranks under DDP, so the batch must hold something: first any other member of
        the same bucket, then any usable record fitted to this bucket's shape by ``_load_one``. The
        order is drawn from ``(seed, epoch, index)`` so a resumed run gets the same sample.
        """
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, int(epoch), int(index), _FALLBACK_SALT])
        same = self.plan.members(bucket_id)
        usable = np.flatnonzero(self.plan.bucket_ids >= 0)
        others = usable[self.plan.bucket_ids[usable] != bucket_id]
        bucket = self.plan.buckets[bucket_id]
        for candidate in itertools.chain(same[rng.permutation(len(same))], others[rng.permutation(len(others))]):
            if int(candidate) in failed:
                continue
            report.seen += 1
            try:
                return {**self._load_one(epoch, int(candidate), bucket, report, copy), "copy": copy}
            except BadSample as err:
                failed.add(int(candidate))
                report.add(err.reason, str(err), seen=False)
                _warn(err.reason, str(err))
        raise SkipRateExceeded(  # a RuntimeError: every record failed, the rate is 100%
            f"no readable sample left for a batch of bucket {bucket[0]}x{bucket[1]}: all {len(usable)} usable "
            f"records failed to load ({report.summary()}). Check that the data files exist and are readable."
        )

    @abc.abstractmethod
    def _collate(self, items: list[dict[str, Any]], bucket: tuple[int, int]) -> dict[str, Any]:
        """Stack loaded samples into the batch dict."""

    def __getitems__(self, keys: Sequence[SampleKey]) -> dict[str, Any]:
        """Build one batch from ``(epoch, record index[, copy])`` keys that share a bucket.

        A sample that fails to decode is counted by reason and replaced by another sample of the
        same bucket (chosen deterministically from ``(seed, epoch, index)``) so the batch keeps its
        size; a slot with no working substitute is dropped. A batch is never empty (see
        :meth:`_fallback`): every rank yields exactly the scheduled number of batches.
        """
        position = getattr(keys, "position", None)  # set by the loader's batch sampler (loader._Keys)
        keys = [(int(k[0]), int(k[1]), int(k[2]) if len(k) > 2 else 0) for k in keys]
        if not keys:
            raise ValueError("empty batch request")
        epoch = keys[0][0]
        bucket_id = int(self.plan.bucket_ids[keys[0][1]])
        if bucket_id < 0 or any(self.plan.bucket_ids[i] != bucket_id for _, i, _ in keys):
            raise ValueError("a batch must hold usable samples of a single bucket")
        bucket = self.plan.buckets[bucket_id]
        report = SkipCounter()
        items = []
        failed: set[int] = set()
        for _, index, copy in keys:
            # Substitutes are drawn lazily: only when the sample itself fails. A substitute takes
            # the slot's copy number: substitutes for two listings of one failed record still draw apart.
            for candidate in itertools.chain((index,), self._substitutes(epoch, index, bucket_id)):
                report.seen += 1
                try:
                    items.append({**self._load_one(epoch, candidate, bucket, report, copy), "copy": copy})
                    break
                except BadSample as err:
                    failed.add(candidate)
                    report.add(err.reason, str(err), seen=False)
                    _warn(err.reason, str(err))
        if not items:
            items.append(self._fallback(epoch, keys[0][1], bucket_id, failed, report, keys[0][2]))
        batch = self._collate(items, bucket)
        batch["copies"] = torch.tensor([it["copy"] for it in items], dtype=torch.long)
        batch["epoch"] = epoch
        batch["bucket"] = bucket
        batch["skips"] = report.report()
        if position is not None:
            batch["position"] = position
        return batch

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        """One sample as a batch of one (``key`` is ``(epoch, index)`` or an index for epoch 0)."""
        if isinstance(key, (int, np.integer)):
            key = (0, int(key))
        return self.__getitems__([key])


class ImageTextDataset(_BatchDatasetBase):
    """Decodes images from a :class:`DataPlan` into ``pixels`` batches (see the module docstring)."""

    def __init__(self, plan: DataPlan, cfg: DataConfig, seed: int):
        super().__init__(plan, cfg, seed)
        # (record index, bucket) -> (pixels, upscaled): ``data.memory_cache_mb``. Filled first come,
        # never evicted: an epoch visits every record once, so evicting would only thrash. Failed
        # images are never stored, so they are skipped and counted again on every visit.
        self._pixels: dict[tuple[int, tuple[int, int]], tuple[np.ndarray, bool]] = {}
        self._pixel_bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        # worker processes and checkpointed loader state start with an empty cache
        state = dict(self.__dict__)
        state["_pixels"], state["_pixel_bytes"] = {}, 0
        return state

    def _decode(self, record: Record, bucket: tuple[int, int]) -> tuple[np.ndarray, bool]:
        img = load_image(record.image)
        scale = cover_scale(img.width, img.height, bucket)
        upscaled = scale > 1.0 + 1e-9
        if upscaled and self.cfg.min_size_policy == "skip" and scale > self.cfg.max_upscale + 1e-9:
            raise BadSample(TOO_SMALL, f"{record.image}: {img.width}x{img.height} is smaller than bucket "
                            f"{bucket[0]}x{bucket[1]}")
        return to_array(resize_cover_center_crop(img, bucket)), upscaled

    def _load_one(self, epoch: int, index: int, bucket: tuple[int, int], report: SkipCounter,
                  copy: int = 0) -> dict[str, Any]:
        record = self.plan.records.records[index]
        chosen = self._caption(record.captions, epoch, index, copy)
        if chosen is None:
            raise BadSample(EMPTY_CAPTION, f"{record.image}: no non-empty caption")
        key = (index, tuple(bucket))
        hit = self._pixels.get(key)
        if hit is None:
            hit = self._decode(record, bucket)
            if self._pixel_bytes + hit[0].nbytes <= self.cfg.memory_cache_mb * 2**20:
                hit[0].setflags(write=False)  # batches are stacked copies; nobody may edit the cached one
                self._pixels[key] = hit
                self._pixel_bytes += hit[0].nbytes
        pixels, upscaled = hit
        if upscaled:
            report.events[UPSCALED] += 1
        level, text = chosen
        return {"pixels": pixels, "caption": text, "level": level, "system": record.system or self.cfg.system,
                "index": index}

    def _collate(self, items: list[dict[str, Any]], bucket: tuple[int, int]) -> dict[str, Any]:
        return {
            # numpy stack (single-threaded, see images.to_array), then a zero-copy tensor
            "pixels": torch.from_numpy(np.stack([it["pixels"] for it in items])),
            "captions": [it["caption"] for it in items],
            "levels": [it["level"] for it in items],
            "systems": [it["system"] for it in items],
            "indices": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }
