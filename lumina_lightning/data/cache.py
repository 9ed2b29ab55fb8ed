"""Offline cache: run the frozen autoencoder and text encoder once, train from stored features.

Layout of a cache directory::

    index.json                 format, version, identity, dtypes, sources, items, skip report
    shard-00000.safetensors    tensors "<item>/latent" (C×h×w) and "<item>/cap/<level>" (L×D)
    shard-00001.safetensors    ...

Each item is one image: its latent at its bucket size, and for every caption level the features of
``prompt_fn(caption, system)`` with padding removed (the valid tokens only; ``cap_len`` in the index
is the mask length). Items are listed in record order, with per-source ranges and ratios, so a data
YAML's sampling ratios still apply when training from the cache (after ``--append`` too: the sources
given last are listed with their current ratios; a record listed by two sources is encoded once and
listed by both). ``skipped_images`` in the index names each skipped image once, so that the skip
report counts images, not visits.

The cache records an *identity* — the autoencoder's and text encoder's ``identity()``, the
resolution/patch/max_aspect of the buckets, and the prompt template — and refuses to mix: reading
it with another expected identity, or appending with other encoders, raises
:class:`CacheIdentityError`.

``CachedDataset`` returns batches with ``latents`` (B×C×h×w), ``cap_feats`` (B×L×D, zero-padded
to the longest caption in the batch), ``cap_mask`` (B×L bool) and the same ``captions``,
``levels``, ``systems``, ``indices``, ``copies``, ``epoch``, ``bucket``, ``skips`` as the image dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .buckets import bucket_list, cover_scale
from .config import DataConfig
from .dataset import DataPlan, _BatchDatasetBase, _warn, build_plan
from .captions import available_levels
from .images import load_image, resize_cover_center_crop, to_tensor
from .records import Record, RecordSet, SourceInfo, load_records
from .skips import EMPTY_CAPTION, TOO_SMALL, UNREADABLE_CACHE, UPSCALED, BadSample, SkipCounter

log = logging.getLogger("lumina_lightning.data")

__all__ = ["CacheIdentityError", "CachedDataset", "build_cache", "read_index", "cache_identity", "check_identity"]

INDEX_NAME = "index.json"
FORMAT = "lumina-lightning-cache"
VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

PromptFn = Callable[[str, "str | None"], str]


class CacheIdentityError(ValueError):
    """The cache was made by other encoders / another resolution than the ones asked for."""


def _identity_prompt(caption: str, system: str | None) -> str:
    """Default ``prompt_fn``: the caption alone (no system template)."""
    return caption


def _normalise(value: Any) -> Any:
    """JSON round trip, so tuples/lists and int/float spellings compare equal."""
    return json.loads(json.dumps(value, sort_keys=True))


def cache_identity(
    autoencoder: Any, text_encoder: Any, resolution: int, patch: int = 16, max_aspect: float = 4.0,
    prompt: str = "caption",
) -> dict[str, Any]:
    """The identity dict a cache made with these encoders and settings carries."""
    return _normalise({
        "autoencoder": autoencoder.identity(),
        "text_encoder": text_encoder.identity(),
        "resolution": int(resolution),
        "patch": int(patch),
        "max_aspect": float(max_aspect),
        "prompt": prompt,
    })


def check_identity(stored: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Raise :class:`CacheIdentityError` unless every key of ``expected`` equals ``stored``'s."""
    stored, expected = _normalise(dict(stored)), _normalise(dict(expected))
    diffs = [f"{key}: cache has {stored.get(key)!r}, expected {value!r}"
             for key, value in expected.items() if stored.get(key) != value]
    if diffs:
        hint = ""
        wanted = str(expected.get("prompt", ""))
        if stored.get("prompt") != expected.get("prompt") and wanted.startswith("record:"):
            hint = (f" A training run builds each prompt from the record's template, else data.system, else "
                    f"objective.system: build its cache with `--prompt-template record --default-system "
                    f"{wanted.split(':', 1)[1]}`.")
        raise CacheIdentityError(
            f"{where}: the cache was made with different encoders or settings and cannot be mixed with this run:\n  "
            + "\n  ".join(diffs)
            + "\nBuild a new cache (`lumina data cache ...`) for these encoders/settings." + hint
        )


def read_index(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check a cache's ``index.json``."""
    path = Path(cache_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{cache_dir}: not a cache directory (no {INDEX_NAME}); build one with `lumina data cache`")
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != FORMAT or int(index.get("version", 0)) > VERSION:
        raise ValueError(f"{path}: unsupported cache format {index.get('format')!r} version {index.get('version')}")
    return index


def _write_index(cache_dir: Path, index: dict[str, Any]) -> Path:
    path = cache_dir / INDEX_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written index
    return path


def _load_pixels(record: Record, bucket: tuple[int, int], cfg: DataConfig, report: SkipCounter) -> torch.Tensor:
    img = load_image(record.image)
    scale = cover_scale(img.width, img.height, bucket)
    if scale > 1.0 + 1e-9:
        if cfg.min_size_policy == "skip" and scale > cfg.max_upscale + 1e-9:
            raise BadSample(TOO_SMALL, f"{record.image}: {img.width}x{img.height} is smaller than bucket {bucket}")
        report.events[UPSCALED] += 1
    return to_tensor(resize_cover_center_crop(img, bucket))


def _fit_latent(latent: torch.Tensor, stored: tuple[int, int], bucket: tuple[int, int]) -> torch.Tensor:
    """Resize a ``C×h×w`` latent cached at bucket ``stored`` to cover ``bucket`` and centre-crop it,
    the latent-space analogue of :func:`resize_cover_center_crop`."""
    f = stored[0] / latent.shape[-1]  # pixels per latent cell
    tw, th = round(bucket[0] / f), round(bucket[1] / f)
    scale = max(tw / latent.shape[-1], th / latent.shape[-2])
    nw, nh = max(tw, round(latent.shape[-1] * scale)), max(th, round(latent.shape[-2] * scale))
    out = torch.nn.functional.interpolate(latent[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    top, left = (nh - th) // 2, (nw - tw) // 2
    return out[:, top : top + th, left : left + tw].contiguous()


def _prompts(record: Record, levels: Sequence[str] | None, prompt_fn: PromptFn, system: str | None) -> dict[str, str]:
    """The encoder input per caption level that ``build_cache`` encodes for ``record``."""
    wanted = [lvl for lvl in available_levels(record.captions) if levels is None or lvl in levels]
    return {lvl: prompt_fn(record.captions[lvl].strip(), record.system or system) for lvl in wanted}


def _fingerprint(record: Record, prompts: Mapping[str, str]) -> str | None:
    """What an item's tensors depend on: the file (size + mtime_ns, a stat, not a read of every
    image on each append) and the exact text encoded; ``None`` when the file cannot be stat'ed."""
    try:
        st = os.stat(record.image)
    except OSError:
        return None
    data = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "system": record.system, "prompts": dict(prompts),
            "captions": {lvl: record.captions[lvl].strip() for lvl in prompts}}
    return hashlib.sha1(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _drop_items(items: list[dict[str, Any]], sources: list[dict[str, Any]], drop: set[int]):
    """Remove items by position, keeping the per-source ranges consistent."""
    kept: list[dict[str, Any]] = []
    new_sources = []
    for src in sources:
        start = len(kept)
        kept.extend(items[j] for j in range(src["start"], src["stop"]) if j not in drop)
        if len(kept) > start:
            new_sources.append({**src, "start": start, "stop": len(kept)})
    return kept, new_sources


@torch.no_grad()
def build_cache(
    cfg: DataConfig,
    out_dir: str | os.PathLike,
    *,
    autoencoder: Any,
    text_encoder: Any,
    batch_size: int = 8,
    prompt_fn: PromptFn | None = None,
    prompt_id: str | None = None,
    levels: Sequence[str] | None = None,
    shard_size: int = 512,
    append: bool = False,
    feature_dtype: str = "bfloat16",
    latent_dtype: str = "float32",
    device: str | torch.device = "cpu",
    records: RecordSet | None = None,
    progress: bool = False,
) -> Path:
    """Encode the images and captions of ``cfg.path`` (or ``records``) into a cache at ``out_dir``.

    Args:
        cfg: data config: ``path``/``root`` (the source), ``resolution``/``patch``/``max_aspect``
            (buckets), ``min_size_policy``/``max_upscale`` and ``max_skip_rate`` (bad input).
        autoencoder: frozen, ``encode(B×3×H×W in [−1,1]) -> B×C×H/f×W/f`` + ``identity()``.
        text_encoder: frozen, ``encode(list[str]) -> (B×L×D, B×L bool)`` + ``identity()``.
        batch_size: images per autoencoder call (one bucket per call).
        prompt_fn: ``prompt_fn(caption, system) -> str`` that builds the encoder input, e.g.
            prepends the record's system template; default: the caption alone.
        prompt_id: a name for ``prompt_fn`` stored in the identity (default: its ``__name__``).
        levels: caption levels to encode (default: every non-empty level of each record).
        shard_size: items per safetensors shard.
        append: add records to an existing cache (same identity required; images already in the
            cache with the same file size/mtime and encoded text are skipped, changed ones are
            re-encoded and replace their old item). The sources of the data given now are listed
            with their current ratios over their cached or new items, so the data YAML's mix applies
            as it does to the images; cached items that it does not list keep their earlier source.
        feature_dtype, latent_dtype: storage dtypes (``float32``, ``float16``, ``bfloat16``).
        device: where the encoders run (they must already be there).

    Returns:
        The path of ``index.json``. Bad images are skipped, counted, logged, and stored in the
        index's ``skips``; the build fails with :class:`SkipRateExceeded` above ``max_skip_rate``.
    """
    from safetensors.torch import save_file

    if feature_dtype not in _DTYPES or latent_dtype not in _DTYPES:
        raise ValueError(f"dtypes must be one of {sorted(_DTYPES)}")
    prompt_fn = prompt_fn or _identity_prompt
    prompt_id = prompt_id or ("caption" if prompt_fn is _identity_prompt else getattr(prompt_fn, "__name__", "custom"))
    identity = cache_identity(autoencoder, text_encoder, cfg.resolution, cfg.patch, cfg.max_aspect, prompt_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    old_items: list[dict[str, Any]] = []
    old_sources: list[dict[str, Any]] = []
    shards: list[str] = []
    old_skips: dict[str, Any] = {}
    old_skipped_images: dict[str, list[str]] = {}
    index: dict[str, Any] | None = None
    if (out / INDEX_NAME).exists():
        if not append:
            raise FileExistsError(f"{out} already holds a cache; pass append=True (--append) to add to it")
        index = read_index(out)
        check_identity(index["identity"], identity, f"appending to {out}")
        feature_dtype, latent_dtype = index["dtypes"]["features"], index["dtypes"]["latents"]
        old_items, old_sources, shards = index["items"], index["sources"], index["shards"]
        old_skips = index.get("skips", {})
        old_skipped_images = dict(index.get("skipped_images") or {})

    if records is None:
        if not cfg.path:
            raise ValueError("build_cache needs cfg.path (manifest, folder or data YAML) or records")
        records = load_records(cfg.path, root=cfg.root)
    plan = build_plan(records, cfg, progress=progress)
    plan.skips.check(cfg.max_skip_rate, 1, where=f"cache source {cfg.path}")
    report = SkipCounter()
    f_dtype, l_dtype = _DTYPES[feature_dtype], _DTYPES[latent_dtype]

    usable = np.flatnonzero(plan.bucket_ids >= 0).tolist()
    prompts = {i: _prompts(records.records[i], levels, prompt_fn, cfg.system) for i in usable}
    # over every level a record has, not just the `levels` asked for now: an append with other
    # levels must not take every cached item for changed (and re-encode it with fewer levels)
    fingerprints = {i: _fingerprint(records.records[i], _prompts(records.records[i], None, prompt_fn, cfg.system))
                    for i in usable}
    # An item is current when a record has the same image *and* fingerprint; an item whose image is
    # still listed but with another fingerprint (file or text changed) is stale: it is dropped and
    # its record re-encoded. Items of caches made before fingerprints existed have none, so they
    # count as stale and are re-encoded once (safe: their file or text may have changed since).
    current = {(records.records[i].image, fingerprints[i]) for i in usable}
    listed = {records.records[i].image for i in usable}
    stale = {j for j, item in enumerate(old_items)
             if item["image"] in listed and (item["image"], item.get("fingerprint")) not in current}
    if stale:
        unmarked = sum(1 for j in stale if old_items[j].get("fingerprint") is None)
        log.warning("cache %s: re-encoding %d items whose image or caption text changed%s", out, len(stale),
                    f" ({unmarked} from a cache without fingerprints, treated as changed)" if unmarked else "")
        old_items, old_sources = _drop_items(old_items, old_sources, stale)
    done = {(item["image"], item.get("fingerprint")) for item in old_items}

    # Work list: usable record ids per bucket, in record order; a record listed twice (by two
    # sources, with the same image and text) is encoded once and its item listed by both sources.
    todo, queued = [], set()
    for i in usable:
        key = (records.records[i].image, fingerprints[i])
        if key not in done and key not in queued:
            queued.add(key)
            todo.append(i)
    by_bucket: dict[int, list[int]] = {}
    for i in todo:
        by_bucket.setdefault(int(plan.bucket_ids[i]), []).append(i)

    new_items: dict[int, dict[str, Any]] = {}
    decode_failed: dict[int, tuple[str, str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    next_key = max((item["key"] for item in old_items), default=-1) + 1
    shard_items: list[dict[str, Any]] = []

    def flush() -> None:
        if not tensors:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / name), metadata={"format": FORMAT})
        for item in shard_items:
            item["shard"] = name
        shards.append(name)
        tensors.clear()
        shard_items.clear()

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="caching", unit="img")
    for bucket_id, ids in by_bucket.items():
        bucket = plan.buckets[bucket_id]
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            pixels, kept = [], []
            for i in chunk:
                rec = records.records[i]
                report.seen += 1
                try:
                    wanted = list(prompts[i])
                    if not wanted:
                        raise BadSample(EMPTY_CAPTION, f"{rec.image}: none of the levels {list(levels or [])} present")
                    pixels.append(_load_pixels(rec, bucket, cfg, report))
                    kept.append((i, wanted))
                except BadSample as err:
                    report.add(err.reason, str(err), seen=False)
                    decode_failed[i] = (err.reason, str(err))
                    _warn(err.reason, str(err))
            if bar:
                bar.update(len(chunk))
            if not kept:
                continue
            latents = autoencoder.encode(torch.stack(pixels).to(device)).to("cpu", l_dtype)
            batch_prompts, owners = [], []
            for slot, (i, wanted) in enumerate(kept):
                for lvl in wanted:
                    batch_prompts.append(prompts[i][lvl])
                    owners.append((slot, lvl))
            feats, mask = text_encoder.encode(batch_prompts)
            feats, mask = feats.to("cpu"), mask.to("cpu").bool()
            per_item: dict[int, dict[str, int]] = {}
            for row, (slot, lvl) in enumerate(owners):
                key = next_key + slot
                valid = feats[row][mask[row]].to(f_dtype)
                tensors[f"{key}/cap/{lvl}"] = valid
                per_item.setdefault(slot, {})[lvl] = int(valid.shape[0])
            for slot, (i, wanted) in enumerate(kept):
                rec = records.records[i]
                key = next_key + slot
                tensors[f"{key}/latent"] = latents[slot]
                item = {
                    "key": key, "shard": None, "image": rec.image, "source": rec.source, "system": rec.system,
                    "bucket": list(bucket), "size": [int(x) for x in plan.sizes[i]],
                    "captions": {lvl: rec.captions[lvl].strip() for lvl in wanted}, "cap_len": per_item[slot],
                    "meta": rec.meta, "fingerprint": fingerprints[i],
                }
                new_items[i] = item
                shard_items.append(item)
            next_key += len(kept)
            if len(shard_items) >= shard_size:
                flush()
        report.check(cfg.max_skip_rate, cfg.skip_check_min_samples, where=f"caching {cfg.path}")
    flush()
    if bar:
        bar.close()
    if report.num_skipped:
        log.warning("cache: %s", report.summary())
    report.check(cfg.max_skip_rate, 1, where=f"caching {cfg.path}")

    items, sources = _arrange(records, plan, fingerprints, old_items, old_sources, new_items, out)
    skips, skipped_images = _skip_report(records, plan, items, old_skipped_images, old_skips, decode_failed, report,
                                         legacy=bool(old_items) and "skipped_images" not in (index or {}))
    index = {
        "format": FORMAT,
        "version": VERSION,
        "identity": identity,
        "dtypes": {"features": feature_dtype, "latents": latent_dtype},
        "latent_channels": int(getattr(autoencoder, "latent_channels", 0)),
        "downsample": int(getattr(autoencoder, "downsample", 0)),
        "shards": shards,
        "sources": sources,
        "items": items,
        "skips": skips.report(),
        "skipped_images": skipped_images,
    }
    if not items:
        log.warning("cache %s holds no items", out)
    return _write_index(out, index)


def _arrange(records: RecordSet, plan: DataPlan, fingerprints: Mapping[int, str | None],
             old_items: list[dict[str, Any]], old_sources: list[dict[str, Any]], new_items: Mapping[int, dict[str, Any]],
             out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The index's items and per-source ranges after a build or an append.

    Every source of ``records`` (the data given now) lists the items of its usable records, cached
    earlier or just encoded, with its *current* ratio: the data YAML's mix applies to the cache
    exactly as to the images, whatever was cached before. Cached items that the data given now
    does not list keep their earlier source and ratio (an append adds to a cache).
    """
    by_key: dict[tuple[str, str | None], dict[str, Any]] = {}
    for item in old_items:
        by_key.setdefault((item["image"], item.get("fingerprint")), item)
    for i, item in new_items.items():
        by_key[(records.records[i].image, fingerprints[i])] = item
    current: list[tuple[SourceInfo, list[dict[str, Any]]]] = []
    used: set[tuple[str, str | None]] = set()
    for src in records.sources:
        listed = []
        for i in range(src.start, src.stop):
            if plan.bucket_ids[i] < 0:
                continue
            key = (records.records[i].image, fingerprints[i])
            item = by_key.get(key)
            if item is not None:  # None: it failed to decode (counted in the skip report)
                used.add(key)
                listed.append({**item, "source": src.name})
        current.append((src, listed))
    items: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    kept = 0
    for src in old_sources:
        start = len(items)
        items.extend(it for it in old_items[src["start"]:src["stop"]] if (it["image"], it.get("fingerprint")) not in used)
        if len(items) > start:
            sources.append({**src, "start": start, "stop": len(items)})
            kept += len(items) - start
    if kept:
        log.info("cache %s: %d cached items that %s does not list keep their earlier sources and ratios", out, kept,
                 "the data given now")
    for src, listed in current:
        if listed:
            sources.append({"name": src.name, "start": len(items), "stop": len(items) + len(listed),
                            "ratio": src.ratio})
            items.extend(listed)
    return items, sources


def _skip_report(records: RecordSet, plan: DataPlan, items: list[dict[str, Any]],
                 old_skipped: Mapping[str, Sequence[str]], old_skips: Mapping[str, Any],
                 decode_failed: Mapping[int, tuple[str, str]], report: SkipCounter,
                 legacy: bool) -> tuple[SkipCounter, dict[str, list[str]]]:
    """The cache's skip report over images: each image counts once however often it was looked at.

    ``skipped_images`` (image -> ``[reason, message]``) is kept in the index so that an append
    neither counts a record twice nor forgets earlier skips. ``events`` count what was encoded
    (an upscale happens once per encoded image).
    """
    skipped: dict[str, list[str]] = {k: list(v) for k, v in old_skipped.items()}
    for i, (reason, message) in list(plan.excluded.items()) + list(decode_failed.items()):
        skipped[records.records[i].image] = [reason, message]
    cached = {it["image"] for it in items}
    for image in cached:
        skipped.pop(image, None)
    counter = SkipCounter()
    counter.seen = len(cached | set(skipped))
    for reason, message in skipped.values():
        counter.add(reason, message, seen=False)
    if legacy:  # a cache made before skipped_images existed: its earlier skips are known as counts only
        counter.skipped.update({k: int(v) for k, v in (old_skips.get("skipped") or {}).items()})
        counter.seen += sum(int(v) for v in (old_skips.get("skipped") or {}).values())
    counter.events.update({k: int(v) for k, v in (old_skips.get("events") or {}).items()})
    counter.events.update(report.events)
    return counter, skipped


class CachedDataset(_BatchDatasetBase):
    """Reads a cache made by :func:`build_cache`; same sampler, same batch keys as the image dataset.

    Args:
        cache_dir: the cache directory.
        cfg: data config (its ``resolution``/``patch``/``max_aspect`` must match the cache's, and
            its caption weights/fallback choose the level); default: one matching the cache.
        seed: seed of the caption choice.
        expected_identity: keys that must match the cache's identity (e.g. the run's
            ``{"autoencoder": vae.identity(), "text_encoder": te.identity()}``).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        cfg: DataConfig | None = None,
        seed: int = 0,
        expected_identity: Mapping[str, Any] | None = None,
    ):
        self.cache_dir = Path(cache_dir)
        index = read_index(self.cache_dir)
        ident = index["identity"]
        if cfg is None:
            cfg = DataConfig(cache_dir=str(cache_dir), resolution=ident["resolution"], patch=ident["patch"],
                             max_aspect=ident["max_aspect"])
        check_identity(ident, {"resolution": cfg.resolution, "patch": cfg.patch, "max_aspect": cfg.max_aspect},
                       str(self.cache_dir))
        if expected_identity:
            check_identity(ident, expected_identity, str(self.cache_dir))
        self.index = index
        self.identity = ident
        items = index["items"]
        self.items = items
        records = [Record(image=it["image"], captions=dict(it["captions"]), meta=it.get("meta") or {},
                          source=it.get("source", ""), system=it.get("system"), width=it["size"][0],
                          height=it["size"][1]) for it in items]
        sources = [SourceInfo(s["name"], s["start"], s["stop"], float(s["ratio"])) for s in index["sources"]]
        buckets = bucket_list(cfg.resolution, cfg.patch, cfg.max_aspect)
        lookup = {b: i for i, b in enumerate(buckets)}
        bucket_ids = np.array([lookup[tuple(it["bucket"])] for it in items], dtype=np.int32)
        sizes = np.array([it["size"] for it in items], dtype=np.int32).reshape(-1, 2)
        plan = DataPlan(RecordSet(records, sources), buckets, bucket_ids, sizes)
        plan.skips.merge(index.get("skips", {}))
        super().__init__(plan, cfg, seed)
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()

    @classmethod
    def for_training(
        cls, cfg: DataConfig, seed: int, expected_identity: Mapping[str, Any] | None = None
    ) -> "CachedDataset":
        """The dataset ``build_dataloader`` uses when ``cfg.cache_dir`` is set."""
        return cls(cfg.cache_dir, cfg, seed, expected_identity)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not travel to worker processes
        return state

    def _tensor(self, shard: str, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if os.getpid() != self._pid:  # forked worker: reopen files in this process
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(str(self.cache_dir / shard), framework="pt")
            self._handles[shard] = handle
        return handle.get_tensor(key)

    def _load_one(self, epoch: int, index: int, bucket: tuple[int, int], report: SkipCounter,
                  copy: int = 0) -> dict[str, Any]:
        item = self.items[index]
        chosen = self._caption(item["captions"], epoch, index, copy)
        if chosen is None:
            raise BadSample(EMPTY_CAPTION, f"{item['image']}: no cached caption")
        level, text = chosen
        try:
            latent = self._tensor(item["shard"], f"{item['key']}/latent").float()
            feats = self._tensor(item["shard"], f"{item['key']}/cap/{level}").float()
        except Exception as err:  # a damaged shard must not kill the run either
            raise BadSample(UNREADABLE_CACHE, f"{item['image']}: cannot read cached tensors ({err})") from err
        if tuple(item["bucket"]) != tuple(bucket):
            # Only a batch's last-resort fallback (dataset._fallback) asks for another bucket.
            latent = _fit_latent(latent, tuple(item["bucket"]), bucket)
        return {"latent": latent, "feats": feats, "caption": text, "level": level,
                "system": item.get("system") or self.cfg.system, "index": index}

    def _collate(self, items: list[dict[str, Any]], bucket: tuple[int, int]) -> dict[str, Any]:
        length = max(1, max(it["feats"].shape[0] for it in items))
        dim = items[0]["feats"].shape[-1]
        feats = torch.zeros(len(items), length, dim)
        mask = torch.zeros(len(items), length, dtype=torch.bool)
        for k, it in enumerate(items):
            n = it["feats"].shape[0]
            feats[k, :n] = it["feats"]
            mask[k, :n] = True
        return {
            "latents": torch.stack([it["latent"] for it in items]),
            "cap_feats": feats,
            "cap_mask": mask,
            "captions": [it["caption"] for it in items],
            "levels": [it["level"] for it in items],
            "systems": [it["system"] for it in items],
            "indices": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }
