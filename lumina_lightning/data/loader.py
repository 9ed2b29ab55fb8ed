"""Resumable, rank-aware loading: a bucket batch sampler with a global cursor + StatefulDataLoader.

How the order is made (deterministic from the seed, independent of the number of ranks):

1. ``DataPlan.epoch_schedule`` cuts epoch ``e`` into a *global* list of one-bucket micro-batches.
2. With ``world_size = W``, step ``s`` of the epoch gives rank ``r`` micro-batch ``cursor + r``
   and advances the global ``cursor`` by ``W`` (all ranks take the same number of steps; the
   last ``len % W`` micro-batches of an epoch are left out so no rank waits on another).
3. The sampler's ``state_dict`` stores ``(epoch, cursor)`` — a position in the global list, not a
   per-rank slice — so a checkpoint taken with 2 ranks resumes on 1 rank (or 4) with exactly the
   micro-batches not yet consumed, in the same order: none lost, none repeated.
4. If the per-rank batch size changes on resume, the rest of the epoch is re-cut into batches of
   the new size, keeping each bucket's remaining samples in their order (no sample lost or
   repeated; with ``drop_last`` each bucket's last partial batch is dropped as usual).
5. A source ``ratio`` >= 2 (or the random extra of a ratio between 1 and 2) lists a record more
   than once per epoch. Each key carries a *copy* number, the listing's rank among that record's
   listings in the epoch order (0 for the first), so that the per-sample random draws keyed by
   the sample (caption level here, dropout/t/noise in training) differ between the listings; it
   follows from the schedule and the position, so a resume gives the same copies.

Every bucket holds about the same number of pixels (the crop-size list is area-capped, spec §5),
so a step costs about the same on every rank whichever bucket each one draws.

Lightning saves and restores a ``StatefulDataLoader``'s ``state_dict`` in checkpoints
automatically (environment notes §8); the loader's state includes this sampler's state (torchdata
snapshots it when each batch index is handed to a worker, so prefetching does not skew it) and
the running skip counts. Use ``Trainer(use_distributed_sampler=False)``: the loader shards itself.

torchdata's own state is laid out per worker, so it only loads with the same ``num_workers``. The
loader therefore also saves the sampler position as of the last *delivered* batch (each batch's key
list carries the position right after it; the sampler object itself runs ahead while workers
prefetch) and the ``num_workers`` it ran with. Resuming with another worker count (e.g. on another
host) restores that position and the skip counts and starts torchdata afresh: the same batches
follow as in the uninterrupted run.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Iterator

import numpy as np
from torchdata.stateful_dataloader import StatefulDataLoader

from .config import DataConfig
from .dataset import DataPlan, ImageTextDataset, build_plan
from .records import RecordSet, load_records
from .skips import SkipCounter

log = logging.getLogger("lumina_lightning.data")

__all__ = ["BucketBatchSampler", "LuminaDataLoader", "build_dataloader", "copy_numbers", "regroup"]

_STATE_VERSION = 1


def regroup(batches: list[np.ndarray], batch_size: int, bucket_ids: np.ndarray, drop_last: bool) -> list[np.ndarray]:
    """Re-cut a list of one-bucket batches into batches of ``batch_size``, keeping sample order.

    Samples keep their order within each bucket; a new batch is placed where its first sample was
    in the old order. Used when a run resumes with a different per-rank batch size.
    """
    flat = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    positions = np.arange(len(flat))
    out: list[tuple[int, np.ndarray]] = []
    bids = bucket_ids[flat]
    for b in np.unique(bids):
        sel = bids == b
        members, pos = flat[sel], positions[sel]
        full = len(members) // batch_size
        for k in range(full):
            out.append((int(pos[k * batch_size]), members[k * batch_size : (k + 1) * batch_size]))
        if not drop_last and len(members) % batch_size:
            out.append((int(pos[full * batch_size]), members[full * batch_size :]))
    out.sort(key=lambda t: t[0])
    return [chunk for _, chunk in out]


def copy_numbers(batches: list[np.ndarray], listed: np.ndarray | None = None) -> list[np.ndarray]:
    """For each sample of ``batches`` (in order), how many listings of its record come before it:
    those earlier in ``batches`` plus ``listed[record]`` (listings already consumed), if given."""
    if not batches:
        return []
    flat = np.concatenate(batches)
    order = np.argsort(flat, kind="stable")  # a record's listings stay in their order
    ordered = flat[order]
    ranks = np.empty(len(flat), dtype=np.int64)
    ranks[order] = np.arange(len(flat)) - np.searchsorted(ordered, ordered, side="left")
    if listed is not None:
        ranks += listed[flat]
    return np.split(ranks, np.cumsum([len(b) for b in batches])[:-1])


class _Keys(list):
    """One batch's ``(epoch, index, copy)`` keys plus ``position``: the sampler state right after it.

    The dataset copies ``position`` into the batch so the loader knows which position a *delivered*
    batch corresponds to (see ``LuminaDataLoader.state_dict``).
    """

    position: dict[str, Any] | None = None


class BucketBatchSampler:
    """Yields, for one rank, lists of ``(epoch, record index, copy)`` keys; each list is one bucket.

    Implements ``set_epoch`` (called by Lightning each epoch) and ``state_dict`` /
    ``load_state_dict`` (the torchdata ``Stateful`` protocol), with the global cursor semantics
    described in the module docstring.
    """

    def __init__(
        self,
        plan: DataPlan,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        strict_resume: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.plan = plan
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.strict_resume = strict_resume
        self.epoch = 0
        self.cursor = 0  # global micro-batches of the current schedule consumed by all ranks together
        # Steps this rank took in the current epoch, as the training loop counts them: cursor / world_size
        # unless the batch size or world size changed on a resume within the epoch (see __len__).
        self.steps = 0
        self._change_detail = ""  # what changed in the data since a checkpoint (set by the loader)
        # Earlier (batch_size, cursor) segments of this epoch when the batch size changed on resume.
        self.segments: list[tuple[int, int]] = []
        self._cache: tuple[Any, list[np.ndarray], list[np.ndarray] | None] | None = None
        self._len_cache: tuple[Any, int] | None = None
        self._generation = 0

    # --- schedule -------------------------------------------------------------------------------
    def schedule(self) -> list[np.ndarray]:
        """The global micro-batch list that ``cursor`` indexes for the current epoch."""
        key = (self.epoch, tuple(self.segments), self.batch_size)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        sizes = [b for b, _ in self.segments] + [self.batch_size]
        sched = self.plan.epoch_schedule(self.seed, self.epoch, sizes[0], self.drop_last)
        # Only a ratio above 1 lists a record twice in an epoch; otherwise every copy number is 0.
        repeats = any(src.ratio > 1 for src in self.plan.records.sources)
        listed = np.zeros(len(self.plan), dtype=np.int64) if repeats else None
        for (_, cursor), size in zip(self.segments, sizes[1:]):
            if listed is not None and cursor:
                listed += np.bincount(np.concatenate(sched[:cursor]), minlength=len(listed))
            sched = regroup(sched[cursor:], size, self.plan.bucket_ids, self.drop_last)
        self._cache = (key, sched, copy_numbers(sched, listed) if repeats else None)
        return sched

    def copies(self) -> list[np.ndarray] | None:
        """For each batch of :meth:`schedule`, the copy number of each sample (module docstring,
        item 5); ``None`` when no record is listed twice in an epoch (all copies 0)."""
        self.schedule()
        return self._cache[2]

    def full_len(self, epoch: int | None = None) -> int:
        """Steps (batches for this rank) in a whole epoch (default: the current one) from its start
        with the current settings."""
        epoch = self.epoch if epoch is None else int(epoch)
        key = (epoch, self.batch_size)
        if self._len_cache is None or self._len_cache[0] != key:
            total = len(self.plan.epoch_schedule(self.seed, epoch, self.batch_size, self.drop_last))
            self._len_cache = (key, total)
        return self._len_cache[1] // self.world_size

    def _used_up(self) -> bool:
        """Whether the epoch in progress has no step left (the next iteration starts the next one)."""
        return (self.cursor > 0 or bool(self.segments)) and self.cursor + self.world_size > len(self.schedule())

    def __len__(self) -> int:
        """Steps of the epoch that the next (or current) iteration delivers, as a training loop counts them.

        Normally :meth:`full_len`; once the epoch is used up, the next epoch's. After a state load
        with another batch size or world size within the epoch: the steps already taken (in the old
        units, as Lightning restores its batch count) plus :meth:`steps_left`, so that Lightning's
        epoch ends where the data epoch ends — or the full length where that is larger, so that the
        later, full epochs are not cut short (Lightning fixes the length once per ``fit``; an epoch
        that is shorter ends when its data runs out).
        """
        if self._used_up():
            return self.full_len(self.epoch + 1)
        base = self.full_len()
        if not self.segments and self.steps == self.cursor // self.world_size:
            return base
        return max(self.steps + self.steps_left(), base)

    def steps_left(self) -> int:
        """Steps this rank still has in the current epoch from the current cursor."""
        return max(0, (len(self.schedule()) - self.cursor) // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning, unless it is the epoch already in progress.

        Keeping the cursor for the current epoch is what makes a restored mid-epoch position
        survive Lightning calling ``set_epoch`` again after loading a checkpoint.
        """
        if int(epoch) != self.epoch:
            self.epoch, self.cursor, self.segments, self.steps = int(epoch), 0, [], 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        self._generation += 1
        generation = self._generation
        sched = self.schedule()
        if self.cursor + self.world_size > len(sched) and (self.cursor > 0 or self.segments):
            # The epoch in progress is used up: a new iteration starts the next epoch (what
            # Lightning's set_epoch(epoch + 1) does too, so calling both is harmless).
            self.epoch, self.cursor, self.segments, self.steps = self.epoch + 1, 0, [], 0
            sched = self.schedule()
        epoch = self.epoch
        while self.cursor + self.world_size <= len(sched):
            if generation != self._generation:
                return  # a newer iterator (or a state load) took over this sampler
            batch = sched[self.cursor + self.rank]
            copies = self.copies()
            copies = copies[self.cursor + self.rank] if copies is not None else np.zeros(len(batch), dtype=np.int64)
            # Advance before yielding: torchdata snapshots the state right after an index is
            # drawn, and that batch must count as consumed in the snapshot.
            self.cursor += self.world_size
            self.steps += 1
            keys = _Keys((epoch, int(i), int(c)) for i, c in zip(batch, copies))
            keys.position = self.state_dict()
            yield keys

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Global position: ``epoch``, ``cursor`` (micro-batches of all ranks), the batch size it
        counts in, earlier segments of the epoch, and what the order depends on (for checks)."""
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "segments": [list(s) for s in self.segments],
            "seed": self.seed,
            "fingerprint": self.plan.fingerprint,
            "num_records": len(self.plan),
            "drop_last": self.drop_last,
            "world_size": self.world_size,  # informational: the cursor is world-size independent
        }

    def samples_consumed(self) -> int:
        """Samples of the current epoch consumed by all ranks together."""
        sizes = [b for b, _ in self.segments] + [self.batch_size]
        cursors = [c for _, c in self.segments] + [self.cursor]
        sched = self.plan.epoch_schedule(self.seed, self.epoch, sizes[0], self.drop_last)
        done = 0
        for j, cursor in enumerate(cursors):
            done += sum(len(b) for b in sched[:cursor])
            if j + 1 < len(cursors):
                sched = regroup(sched[cursor:], sizes[j + 1], self.plan.bucket_ids, self.drop_last)
        return done

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (possibly with another world size)."""
        problems = []
        if int(state.get("seed", self.seed)) != self.seed:
            problems.append(f"seed {state.get('seed')} -> {self.seed}")
        if int(state.get("fingerprint", self.plan.fingerprint)) != self.plan.fingerprint:
            problems.append(self._change_detail or (
                f"records/buckets/ratios changed ({state.get('num_records')} records -> {len(self.plan)} records)"))
        if bool(state.get("drop_last", self.drop_last)) != self.drop_last:
            problems.append("drop_last changed")
        if problems:
            message = "the data loader state in the checkpoint does not match this run: " + "; ".join(problems)
            if self.strict_resume:
                raise ValueError(message + ". Resume with the same data and seed, or set data.strict_resume=false "
                                 "to continue from the same position in the new order.")
            warnings.warn(message + "; continuing from the saved position in the new order", stacklevel=2)
        self.epoch = int(state["epoch"])
        segments = [tuple(int(x) for x in s) for s in state.get("segments", [])]
        saved_bs, cursor = int(state["batch_size"]), int(state["cursor"])
        saved_ws = max(1, int(state.get("world_size", self.world_size)))
        # states written before "steps" existed: the steps of the last segment (exact without resumes
        # that changed the geometry within the epoch)
        self.steps = int(state.get("steps", cursor // saved_ws))
        if saved_bs == self.batch_size:
            self.segments, self.cursor = segments, cursor
        else:
            log.info("batch size changed from %d to %d on resume; re-cutting the rest of epoch %d",
                     saved_bs, self.batch_size, self.epoch)
            self.segments, self.cursor = segments + [(saved_bs, cursor)], 0
        self._cache = None
        self._generation += 1


def _passthrough(batch: Any) -> Any:
    """Collate function: the dataset's ``__getitems__`` already builds the batch dict."""
    return batch


class _CheckedIterator:
    """Wraps the torchdata iterator: merges each batch's skip report and enforces the skip rate."""

    def __init__(self, loader: "LuminaDataLoader", inner: Iterator):
        self._loader = loader
        self._inner = inner

    def __iter__(self) -> "_CheckedIterator":
        return self

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __next__(self) -> dict[str, Any]:
        # Batches are never empty (the dataset falls back to another record), so none is dropped
        # here and every rank yields exactly len(loader) batches.
        batch = next(self._inner)
        position = batch.pop("position", None)
        if position is not None:
            self._loader._delivered = position
        try:
            self._loader.account(batch.get("skips"))
        except Exception:
            # Stop worker processes now rather than whenever the iterator is collected.
            shutdown = getattr(self._inner, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            raise
        return batch


class LuminaDataLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` that also keeps the run's skip counts and enforces ``max_skip_rate``.

    ``skips`` (runtime, merged from the per-batch reports sent by workers) and ``plan_skips``
    (samples excluded when the loader was built) are both :class:`SkipCounter` objects. The
    runtime counts are part of ``state_dict`` so the rate covers the whole run across resumes.
    """

    def __init__(self, dataset, *, batch_sampler: BucketBatchSampler, cfg: DataConfig, **kwargs: Any):
        with warnings.catch_warnings():
            # torchdata 0.11 calls the deprecated torch.set_vital in __init__; not our concern.
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=_passthrough, **kwargs)
        self.cfg = cfg
        self.plan: DataPlan = batch_sampler.plan
        self.plan_skips: SkipCounter = batch_sampler.plan.skips
        self.skips = SkipCounter()
        self._next_log = 1
        # Sampler state as of the last batch handed to the caller (or the last state loaded).
        self._delivered: dict[str, Any] = batch_sampler.state_dict()

    def __iter__(self):
        return _CheckedIterator(self, super().__iter__())

    def account(self, report: dict[str, Any] | None) -> None:
        """Merge one batch's skip report, log new skips, and raise when the rate is too high."""
        if not report:
            return
        self.skips.merge(report)
        if self.skips.num_skipped >= self._next_log:
            log.warning("data: %s", self.skips.summary())
            self._next_log = self.skips.num_skipped * 10  # 1st, 10th, 100th ... skip
        self.skips.check(self.cfg.max_skip_rate, self.cfg.skip_check_min_samples, where="data loader")

    def state_dict(self) -> dict[str, Any]:
        return {"loader": super().state_dict(), "skips": self.skips.state_dict(),
                "sampler": dict(self._delivered), "num_workers": self.num_workers,
                "plan": {"bucket_ids": self.plan.packed_bucket_ids}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "loader" not in state_dict:  # a plain StatefulDataLoader state
            super().load_state_dict(state_dict)
            return
        self._reconcile_plan(state_dict)
        if "sampler" in state_dict:
            # at once, not when torchdata next iterates: len(loader) must count the restored epoch
            # (steps taken + steps left) as soon as the state is loaded (Lightning asks right after)
            self.batch_sampler.load_state_dict(state_dict["sampler"])
        self.skips.load_state_dict(state_dict.get("skips") or {})
        saved_workers = state_dict.get("num_workers")
        if "sampler" in state_dict and saved_workers is not None and int(saved_workers) != self.num_workers:
            # torchdata's state is per worker and will not load with another worker count; the
            # delivered sampler position alone says which batches come next.
            log.info("data.num_workers changed from %s to %d on resume: restoring the sampler position only",
                     saved_workers, self.num_workers)
        else:
            super().load_state_dict(state_dict["loader"])
        if "sampler" in state_dict:
            self._delivered = dict(state_dict["sampler"])

    def restore_from_trainer(self, trainer: Any) -> bool:
        """Load now the loader state that a Lightning ``trainer`` resuming from a checkpoint will load.

        Call it in ``train_dataloader`` before returning the loader (``lumina train`` does). Lightning
        measures ``len(loader)`` *before* it restores the loader's state and never lets the length grow
        after that, so a resume with another batch size or world size that leaves more steps in the
        epoch than a fresh epoch has would otherwise end Lightning's epoch before the data epoch ends.
        Loading the same state again later (as Lightning does) changes nothing. Returns whether a state
        was loaded.
        """
        fit_loop = getattr(trainer, "fit_loop", None)
        states = getattr(fit_loop, "_combined_loader_states_to_load", None)
        if not states or not getattr(fit_loop, "restarting", False):
            return False
        state = states[0]
        if not isinstance(state, dict) or "loader" not in state:
            return False
        self.load_state_dict(state)
        return True

    def _reconcile_plan(self, state_dict: dict[str, Any]) -> None:
        """Compare this loader's plan with the one the checkpoint was taken with (``state["plan"]``).

        Records that were usable then and are excluded now (a file deleted, a header now unreadable,
        ...) keep their place in the schedule, so the resume stays exact: they fail when loaded and
        are replaced by substitutes like any sample that fails at run time (counted as skips). Any
        other change is described for the error message (which records changed how).
        """
        sampler: BucketBatchSampler = self.batch_sampler
        saved = state_dict.get("sampler") or {}
        if "fingerprint" not in saved or int(saved["fingerprint"]) == self.plan.fingerprint:
            return
        old = DataPlan.unpack_bucket_ids((state_dict.get("plan") or {}).get("bucket_ids"))
        new = self.plan.bucket_ids
        records = self.plan.records.records
        if old is None or len(old) != len(new):
            return  # no detail (an older checkpoint) or other records: the sampler's generic message
        diff = np.flatnonzero(old != new)
        lost = diff[(old[diff] >= 0) & (new[diff] < 0)]
        moved = diff[new[diff] >= 0]

        def names(ids: np.ndarray, how) -> str:
            shown = "; ".join(how(int(i)) for i in ids[:5])
            return shown + (f"; ... ({len(ids) - 5} more)" if len(ids) > 5 else "")

        def reason(i: int) -> str:
            why = self.plan.excluded.get(i)
            return f"{records[i].image} ({why[0]}: {why[1]})" if why else records[i].image

        if len(moved) == 0 and len(lost):
            patched = new.copy()
            patched[lost] = old[lost]
            if self.plan.fingerprint_of(patched) == int(saved["fingerprint"]):
                log.warning(
                    "resume: %d record(s) usable when the checkpoint was taken are unusable now: %s. They keep "
                    "their place in the data order (the resume stays exact) and are replaced by other samples "
                    "of their bucket when loaded, counted as skips.", len(lost), names(lost, reason))
                self.plan.bucket_ids[lost] = old[lost]
                self.plan._reset_caches()
                sampler._cache, sampler._len_cache = None, None
                return
        parts = []
        if len(lost):
            parts.append(f"{len(lost)} record(s) usable at the checkpoint are unusable now: {names(lost, reason)}")
        back = moved[old[moved] < 0]
        if len(back):
            parts.append(f"{len(back)} record(s) unusable at the checkpoint are usable now: "
                         f"{names(back, lambda i: records[i].image)}")
        other = moved[old[moved] >= 0]
        if len(other):
            buckets = self.plan.buckets

            def bucket_change(i: int) -> str:
                (ow, oh), (nw, nh) = buckets[old[i]] if old[i] < len(buckets) else (0, 0), buckets[new[i]]
                return f"{records[i].image} ({ow}x{oh} -> {nw}x{nh})"

            parts.append(f"{len(other)} record(s) changed bucket (image size): {names(other, bucket_change)}")
        if not parts:
            parts.append("the sources' ratios or the bucket list changed")
        sampler._change_detail = "the data changed since the checkpoint: " + "; ".join(parts)

    @property
    def sampler_state(self) -> dict[str, Any]:
        """The batch sampler's current state (global epoch/cursor), for logs and tests."""
        return self.batch_sampler.state_dict()


def build_dataloader(
    cfg: DataConfig,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    records: RecordSet | None = None,
    cache_identity: dict[str, Any] | None = None,
    progress: bool = False,
    multiprocessing_context: str | None = None,
) -> LuminaDataLoader:
    """Build the training loader described in the module docstring.

    Args:
        cfg: the data config (``cfg.path`` for images, or ``cfg.cache_dir`` for an offline cache).
        batch_size: samples per batch on this rank.
        seed: global seed; the order and caption choices depend only on it (and the data).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        num_workers: decoding worker processes (0 = in the main process).
        records: use these records instead of reading ``cfg.path``.
        cache_identity: with ``cfg.cache_dir``, the encoders' identity this run expects; a cache
            made by other encoders (or another resolution) is refused.
        progress: show a progress bar while image headers are read.
        multiprocessing_context: e.g. ``"spawn"``; default is the platform's.

    Raises:
        SkipRateExceeded: when more than ``cfg.max_skip_rate`` of the records are unusable.
        ValueError: when an epoch has fewer batches than ranks.
    """
    if cfg.cache_dir:
        from .cache import CachedDataset

        dataset = CachedDataset.for_training(cfg, seed=seed, expected_identity=cache_identity)
        plan = dataset.plan
    else:
        if records is None:
            if not cfg.path:
                raise ValueError("data config needs `path` (manifest, folder or data YAML) or `cache_dir`")
            records = load_records(cfg.path, root=cfg.root, system=None)
        plan = build_plan(records, cfg, progress=progress)
        dataset = ImageTextDataset(plan, cfg, seed)
    # The plan's rate is exact (every record was looked at), so no minimum count applies.
    plan.skips.check(cfg.max_skip_rate, 1, where=f"data {cfg.cache_dir or cfg.path}")
    sampler = BucketBatchSampler(plan, batch_size, seed, rank, world_size, cfg.drop_last, cfg.strict_resume)
    steps = len(sampler)
    if steps == 0:
        total = len(plan.epoch_schedule(seed, 0, batch_size, cfg.drop_last))
        raise ValueError(
            f"the data gives {total} batches of {batch_size} per epoch (one bucket each) for {world_size} rank(s): "
            f"too few. Use more data, a smaller batch size, or drop_last=false. Buckets: {plan.bucket_counts()}"
        )
    if cfg.drop_last:
        small = plan.small_buckets(batch_size, seed, 0)
        if small:
            log.warning(
                "data: %d record(s) in %d bucket(s) with fewer than batch_size=%d samples per epoch are never "
                "trained on (drop_last drops each bucket's partial batch): %s. Use data.drop_last=false, a smaller "
                "batch size, or more images of those shapes.", sum(small.values()), len(small), batch_size,
                ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(small.items(), key=lambda kv: kv[1])))
    kwargs: dict[str, Any] = {
        "num_workers": num_workers,
        "pin_memory": cfg.pin_memory,
        "snapshot_every_n_steps": cfg.snapshot_every_n_steps,
    }
    if num_workers > 0:
        kwargs.update(prefetch_factor=cfg.prefetch_factor, persistent_workers=cfg.persistent_workers)
        if multiprocessing_context:
            kwargs["multiprocessing_context"] = multiprocessing_context
    loader = LuminaDataLoader(dataset, batch_sampler=sampler, cfg=cfg, **kwargs)
    log.info(
        "data: %d usable records in %d buckets, %d steps/epoch on rank %d/%d (batch %d)",
        int((plan.bucket_ids >= 0).sum()), len(plan.bucket_counts()), steps, rank, world_size, batch_size,
    )
    return loader

