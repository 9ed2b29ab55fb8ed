"""Resumable loading: deterministic order, one bucket per batch, rank sharding, resume across world sizes."""

from __future__ import annotations

import io

import pytest
import torch

from lumina_lightning.data.config import DataConfig
from lumina_lightning.data.loader import build_dataloader
from lumina_lightning.data.synth import generate_synthetic


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    # square and 4:1 / 1:4 canvases -> three buckets at resolution 32: 64x16, 32x32, 16x64
    out = generate_synthetic(root, 96, size=32, seed=0, n_test=6, aspects=(1.0, 4.0, 0.25))
    return str(out.train)


def _cfg(path, **kw):
    return DataConfig(path=path, resolution=32, caption_weights={"short": 0.5, "long": 0.5}, **kw)


def _ids(batches):
    return [b["indices"].tolist() for b in batches]


def _checkpoint(state):
    """Round-trip a state through torch.save/load, as a Lightning checkpoint does."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_deterministic_one_bucket_batches(data):
    loader = build_dataloader(_cfg(data), batch_size=4, seed=7)
    batches = list(loader)
    assert len(batches) == len(loader) > 10
    plan = loader.plan
    assert len(plan.bucket_counts()) == 3
    for b in batches:
        bucket_ids = {int(plan.bucket_ids[i]) for i in b["indices"].tolist()}
        assert len(bucket_ids) == 1
        w, h = plan.buckets[bucket_ids.pop()]
        assert b["pixels"].shape == (4, 3, h, w) and b["bucket"] == (w, h)
        assert len(b["captions"]) == len(b["levels"]) == len(b["systems"]) == 4
        assert set(b["levels"]) <= {"short", "long"}
        assert all("<Prompt Start>" not in c for c in b["captions"])
    ids = [i for b in _ids(batches) for i in b]
    assert len(ids) == len(set(ids))  # an epoch never repeats a sample
    again = list(build_dataloader(_cfg(data), batch_size=4, seed=7))
    assert _ids(again) == _ids(batches)
    assert [b["captions"] for b in again] == [b["captions"] for b in batches]
    assert _ids(build_dataloader(_cfg(data), batch_size=4, seed=8)) != _ids(batches)


def test_epochs_advance_and_differ(data):
    loader = build_dataloader(_cfg(data), batch_size=4, seed=0)
    first, second = _ids(loader), _ids(loader)
    assert first != second and sorted(map(tuple, first)) != sorted(map(tuple, second))
    assert loader.sampler_state["epoch"] == 1
    loader.batch_sampler.set_epoch(1)  # what Lightning does: no reset of the epoch in progress
    assert loader.sampler_state["cursor"] == len(second)
    loader.batch_sampler.set_epoch(0)
    assert _ids(loader) == first


def test_ranks_are_disjoint_and_balanced(data):
    full = _ids(build_dataloader(_cfg(data), batch_size=4, seed=1))
    per_rank = [_ids(build_dataloader(_cfg(data), batch_size=4, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(full) // 2
    seen = [set(i for b in r for i in b) for r in per_rank]
    assert not seen[0] & seen[1]
    # round-robin over the global (world-size independent) order
    interleaved = [b for pair in zip(*per_rank) for b in pair]
    assert interleaved == full[: len(interleaved)]


@pytest.mark.parametrize("saved_workers, resumed_workers", [(0, 0), (2, 2), (2, 0), (0, 2)])
def test_resume_mid_epoch_one_rank(data, saved_workers, resumed_workers):
    # With another worker count torchdata's own (per-worker) state cannot load: the saved sampler
    # position of the last *delivered* batch (workers prefetch ahead of it) must give exactly the
    # rest of the uninterrupted run.
    reference = _ids(build_dataloader(_cfg(data), batch_size=4, seed=3))
    loader = build_dataloader(_cfg(data), batch_size=4, seed=3, num_workers=saved_workers)
    it = iter(loader)
    taken = [next(it)["indices"].tolist() for _ in range(5)]
    state = _checkpoint(loader.state_dict())
    del it
    resumed = build_dataloader(_cfg(data), batch_size=4, seed=3, num_workers=resumed_workers)
    resumed.load_state_dict(state)
    rest = _ids(resumed)
    assert taken + rest == reference
    assert resumed.skips.seen == 4 * len(reference)  # skip counts carried across the resume
    assert state["num_workers"] == saved_workers and state["sampler"]["cursor"] == 5  # delivered, not prefetched


def test_resume_from_two_ranks_on_one(data):
    reference = _ids(build_dataloader(_cfg(data), batch_size=4, seed=5))
    ranks = [build_dataloader(_cfg(data), batch_size=4, seed=5, rank=r, world_size=2) for r in range(2)]
    iters = [iter(r) for r in ranks]
    taken = []
    for _ in range(3):
        taken += [next(it)["indices"].tolist() for it in iters]
    state = _checkpoint(ranks[0].state_dict())  # Lightning saves rank 0's loader state
    assert state["loader"]["_index_sampler_state"]["cursor"] == 6
    single = build_dataloader(_cfg(data), batch_size=4, seed=5, rank=0, world_size=1)
    single.load_state_dict(state)
    rest = _ids(single)
    assert taken + rest == reference  # nothing lost, nothing repeated, same order


def test_resume_from_one_rank_on_two(data):
    reference = _ids(build_dataloader(_cfg(data), batch_size=4, seed=5))
    loader = build_dataloader(_cfg(data), batch_size=4, seed=5)
    it = iter(loader)
    taken = [next(it)["indices"].tolist() for _ in range(3)]
    state = _checkpoint(loader.state_dict())
    ranks = [build_dataloader(_cfg(data), batch_size=4, seed=5, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    rest = [b for pair in zip(_ids(ranks[0]), _ids(ranks[1])) for b in pair]
    assert taken + rest == reference[: len(taken) + len(rest)]
    assert len(reference) - len(taken) - len(rest) <= 1  # only an odd tail batch is left for the epoch


def test_resume_with_another_batch_size_loses_nothing(data):
    cfg = _cfg(data, drop_last=False)
    reference = _ids(build_dataloader(cfg, batch_size=4, seed=2))
    loader = build_dataloader(cfg, batch_size=4, seed=2)
    it = iter(loader)
    taken = [next(it)["indices"].tolist() for _ in range(4)]
    state = _checkpoint(loader.state_dict())
    smaller = build_dataloader(cfg, batch_size=3, seed=2)
    smaller.load_state_dict(state)
    rest = _ids(smaller)
    assert all(len(b) <= 3 for b in rest)
    flat = lambda bs: [i for b in bs for i in b]  # noqa: E731
    assert sorted(flat(taken) + flat(rest)) == sorted(flat(reference))
    # within each bucket the remaining samples keep their order
    plan = smaller.plan
    remaining = flat(reference)[len(flat(taken)):]
    for bucket in set(int(plan.bucket_ids[i]) for i in remaining):
        assert [i for i in flat(rest) if plan.bucket_ids[i] == bucket] == \
            [i for i in remaining if plan.bucket_ids[i] == bucket]
    # and the new position can be saved and resumed again
    second = build_dataloader(cfg, batch_size=3, seed=2)
    second.load_state_dict(state)
    it = iter(second)
    assert next(it)["indices"].tolist() == rest[0]
    state2 = _checkpoint(second.state_dict())
    again = build_dataloader(cfg, batch_size=3, seed=2)
    again.load_state_dict(state2)
    assert _ids(again) == rest[1:]


def _keys(batches):
    return [list(zip(b["indices"].tolist(), b["copies"].tolist(), b["levels"])) for b in batches]


@pytest.mark.parametrize("resumed_batch_size", [4, 3])
def test_a_ratio_two_source_numbers_each_listing_and_resumes_them(data, tmp_path, resumed_batch_size):
    """Ratio 2 lists every record twice per epoch. Each listing is a distinct sample: (index, copy)
    keys never repeat, so the caption choice (and the training draws keyed the same way) can
    differ; a resume, also with another batch size, continues with the same copy numbers."""
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"META:\n  - path: {data}\n    ratio: 2.0\n")
    cfg = _cfg(str(mix), drop_last=False)
    reference = [k for b in _keys(build_dataloader(cfg, batch_size=4, seed=3)) for k in b]
    assert sorted((i, c) for i, c, _ in reference) == [(i, c) for i in range(96) for c in (0, 1)]
    levels = {(i, c): level for i, c, level in reference}
    assert any(levels[(i, 0)] != levels[(i, 1)] for i in range(96))  # copies choose their captions apart
    loader = build_dataloader(cfg, batch_size=4, seed=3)
    it = iter(loader)
    taken = [k for _ in range(5) for k in _keys([next(it)])[0]]
    state = _checkpoint(loader.state_dict())
    resumed = build_dataloader(cfg, batch_size=resumed_batch_size, seed=3)
    resumed.load_state_dict(state)
    rest = [k for b in _keys(resumed) for k in b]
    if resumed_batch_size == 4:
        assert taken + rest == reference
    else:  # re-cut batches: the same samples, each still with its own copy number and caption
        assert sorted(taken + rest) == sorted(reference)


def test_resume_refuses_changed_data(data):
    loader = build_dataloader(_cfg(data), batch_size=4, seed=5)
    next(iter(loader))
    state = _checkpoint(loader.state_dict())
    other = build_dataloader(_cfg(data), batch_size=4, seed=6)
    with pytest.raises(ValueError, match="seed 5 -> 6"):  # raised when the state is loaded
        other.load_state_dict(state)
        next(iter(other))
    lenient = build_dataloader(_cfg(data, strict_resume=False), batch_size=4, seed=6)
    with pytest.warns(UserWarning, match="does not match"):
        lenient.load_state_dict(state)
        next(iter(lenient))


def test_too_little_data_is_a_clear_error(data):
    with pytest.raises(ValueError, match="too few"):
        build_dataloader(_cfg(data), batch_size=200, seed=0)


def test_memory_cache_serves_the_same_batches_without_decoding_again(data, monkeypatch):
    """``data.memory_cache_mb``: later epochs read decoded pixels from memory, bitwise the same."""
    import lumina_lightning.data.dataset as dataset_mod

    decodes = []
    real = dataset_mod.load_image
    monkeypatch.setattr(dataset_mod, "load_image", lambda path: decodes.append(path) or real(path))
    plain = build_dataloader(_cfg(data), batch_size=4, seed=3)
    cached = build_dataloader(_cfg(data, memory_cache_mb=64), batch_size=4, seed=3)
    want = [list(plain), list(plain)]
    decodes.clear()
    got = [list(cached)]
    first_epoch = len(decodes)
    got.append(list(cached))
    seen = [{i for b in _ids(epoch) for i in b} for epoch in got]
    # drop_last leaves a different remainder out of each epoch: only those are new in the second
    assert first_epoch == len(seen[0]) and len(decodes) == first_epoch + len(seen[1] - seen[0]) < 2 * first_epoch
    for we, ge in zip(want, got):
        assert _ids(we) == _ids(ge)
        for w, g in zip(we, ge):
            assert torch.equal(w["pixels"], g["pixels"]) and w["captions"] == g["captions"]
    # a batch is a copy: editing it in place leaves the cache (and the next epoch) untouched
    got[0][0]["pixels"].zero_()
    cached.batch_sampler.set_epoch(0)
    assert torch.equal(next(iter(cached))["pixels"], want[0][0]["pixels"])


def test_memory_cache_keeps_to_its_budget(data):
    cfg = _cfg(data, memory_cache_mb=0.05)  # 52 kB: four 32x32 float images (12 kB each), not five
    loader = build_dataloader(cfg, batch_size=4, seed=0)
    list(loader)
    ds = loader.dataset
    assert 0 < len(ds._pixels) and ds._pixel_bytes <= 0.05 * 2**20
    assert ds._pixel_bytes == sum(p.nbytes for p, _ in ds._pixels.values())
    with pytest.raises(ValueError, match="memory_cache_mb"):
        _cfg(data, memory_cache_mb=-1)
