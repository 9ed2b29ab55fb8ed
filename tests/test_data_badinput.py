"""Bad input through the loader: every case is counted by reason, the run goes on, the rate is enforced."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumina_lightning.data.config import DataConfig
from lumina_lightning.data.loader import build_dataloader
from lumina_lightning.data.skips import SkipRateExceeded


def _good(root: Path, n: int, size=(32, 32)) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        path = root / f"good{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        rows.append({"image": path.name, "captions": {"short": f"good {i}"}})
    return rows


def _truncated(root: Path, name: str) -> Path:
    noise = np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / name)
    data = (root / name).read_bytes()
    (root / name).write_bytes(data[: len(data) // 2])
    return root / name


def _write(root: Path, rows) -> Path:
    path = root / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bad_rows(root: Path) -> list[dict]:
    Image.new("RGB", (8, 8), (0, 0, 0)).save(root / "tiny.png")
    (root / "junk.png").write_bytes(b"garbage")
    _truncated(root, "trunc.png")
    Image.new("RGB", (32, 32)).save(root / "nocap.png")
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    cmyk.save(root / "cmyk.jpg")
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    rgba.save(root / "rgba.png")
    Image.fromarray(np.full((32, 32), 65535, np.uint16)).save(root / "g16.png")
    return [
        {"image": "missing.png", "caption": "no file, found at plan time"},
        {"image": "missing_sized.png", "caption": "no file, sizes given", "width": 32, "height": 32},
        {"image": "junk.png", "caption": "unreadable header"},
        {"image": "trunc.png", "caption": "truncated data"},
        {"image": "nocap.png", "captions": {"short": "  ", "long": ""}},
        {"image": "tiny.png", "caption": "8x8, below the 32x32 bucket"},
        {"image": "cmyk.jpg", "caption": "cmyk is fine"},
        {"image": "rgba.png", "caption": "transparent is fine"},
        {"image": "g16.png", "caption": "16-bit is fine"},
    ]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_bad_case_is_counted_and_the_run_goes_on(tmp_path, num_workers):
    rows = _good(tmp_path, 15) + _bad_rows(tmp_path)
    cfg = DataConfig(path=str(_write(tmp_path, rows)), resolution=32, min_size_policy="skip", max_skip_rate=1.0,
                     skip_check_min_samples=0, drop_last=False)
    loader = build_dataloader(cfg, batch_size=4, seed=0, num_workers=num_workers)
    plan = loader.plan_skips
    assert dict(plan.skipped) == {"missing_file": 1, "unreadable_image": 1, "empty_caption": 1, "too_small": 1}
    assert plan.seen == len(rows)
    assert any("junk.png" in e for e in plan.examples["unreadable_image"])
    seen_ids, sizes = [], []
    for batch in loader:
        assert batch["pixels"].shape[1:] == (3, 32, 32)
        assert -1.0 <= batch["pixels"].min() and batch["pixels"].max() <= 1.0
        seen_ids += batch["indices"].tolist()
        sizes.append(len(batch["indices"]))
    # runtime failures (file vanished, truncated data) reached the main process, with reasons
    assert dict(loader.skips.skipped) == {"missing_file": 1, "unreadable_image": 1}
    assert any("trunc.png" in e for e in loader.skips.examples["unreadable_image"])
    # failed samples were replaced by others of the same bucket: batches kept their size
    assert sizes[:-1] == [4] * (len(sizes) - 1)
    names = {Path(rows[i]["image"]).name for i in seen_ids}
    assert {"cmyk.jpg", "rgba.png", "g16.png"} <= names
    assert not names & {"missing.png", "missing_sized.png", "junk.png", "trunc.png", "nocap.png", "tiny.png"}
    assert "2 of" in loader.skips.summary()


def test_tiny_images_are_upscaled_by_default(tmp_path):
    rows = _good(tmp_path, 7)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "tiny.png")
    rows.append({"image": "tiny.png", "caption": "small"})
    cfg = DataConfig(path=str(_write(tmp_path, rows)), resolution=32)
    loader = build_dataloader(cfg, batch_size=4, seed=0)
    ids = [i for b in loader for i in b["indices"].tolist()]
    assert 7 in ids and not loader.plan_skips.num_skipped
    assert loader.plan_skips.events["upscaled"] == 1 and loader.skips.events["upscaled"] == 1
    # a tolerance: with skip policy, small upscales up to max_upscale are still accepted
    cfg = DataConfig(path=cfg.path, resolution=32, min_size_policy="skip", max_upscale=4.0)
    assert not build_dataloader(cfg, batch_size=4, seed=0).plan_skips.num_skipped


def test_plan_time_skip_rate_fails_with_a_clear_message(tmp_path):
    rows = _good(tmp_path, 18) + [{"image": f"gone{i}.png", "caption": "x"} for i in range(2)]
    cfg = DataConfig(path=str(_write(tmp_path, rows)), resolution=32)  # default max_skip_rate 5%
    with pytest.raises(SkipRateExceeded) as err:
        build_dataloader(cfg, batch_size=4, seed=0)
    msg = str(err.value)
    assert "2 of 20" in msg and "missing_file: 2" in msg and "gone0.png" in msg and "max_skip_rate" in msg
    cfg.max_skip_rate = 0.2
    assert build_dataloader(cfg, batch_size=4, seed=0).plan_skips.num_skipped == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_runtime_skip_rate_fails_after_min_samples(tmp_path, num_workers):
    rows = _good(tmp_path, 14)
    for i in range(6):
        _truncated(tmp_path, f"t{i}.png")
        rows.append({"image": f"t{i}.png", "caption": "truncated"})
    cfg = DataConfig(path=str(_write(tmp_path, rows)), resolution=32, skip_check_min_samples=8, max_substitutes=0)
    loader = build_dataloader(cfg, batch_size=2, seed=0, num_workers=num_workers)
    with pytest.raises(SkipRateExceeded, match="unreadable_image") as err:
        for _ in loader:
            pass
    assert re.search(r"t\d\.png", str(err.value))  # names an offending file
    assert loader.skips.seen >= 8
    # under the threshold the same data trains through
    cfg.max_skip_rate = 0.5
    loader = build_dataloader(cfg, batch_size=2, seed=0, num_workers=num_workers)
    batches = list(loader)
    # every good image once; a batch whose two images both failed gets one fallback sample instead
    # of being dropped (its substitute attempts count as skips too)
    delivered = [i for b in batches for i in b["indices"].tolist()]
    assert len(batches) == len(loader) and set(range(14)) <= set(delivered)
    assert loader.skips.num_skipped >= 6 and loader.skips.skipped.keys() == {"unreadable_image"}


def test_all_bad_batch_falls_back_to_another_bucket_not_dropped(tmp_path):
    rows = []
    for i in range(4):
        _truncated(tmp_path, f"t{i}.png")
        rows.append({"image": f"t{i}.png", "caption": "truncated"})
    rows += _good(tmp_path, 4, size=(64, 32))  # another bucket at resolution 32
    cfg = DataConfig(path=str(_write(tmp_path, rows)), resolution=32, max_skip_rate=1.0, skip_check_min_samples=0)
    loader = build_dataloader(cfg, batch_size=4, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 2  # no batch dropped
    fallback = next(b for b in batches if b["bucket"] == (32, 32))
    # one good wide image, resized/cropped to the square bucket of the failed batch
    assert tuple(fallback["pixels"].shape) == (1, 3, 32, 32) and fallback["indices"].item() >= 4
    assert loader.skips.skipped.keys() == {"unreadable_image"} and loader.skips.num_skipped >= 4


def test_lone_bad_bucket_member_keeps_ranks_in_step(tmp_path):
    # The only member of its bucket has no substitute: the rank drawing it must still yield a batch,
    # or under DDP that rank would run one step short of the others.
    rows = _good(tmp_path, 7)
    noise = np.random.default_rng(0).integers(0, 255, (16, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "wide.png")
    data = (tmp_path / "wide.png").read_bytes()
    (tmp_path / "wide.png").write_bytes(data[:-100])  # header fine, pixels truncated
    rows.append({"image": "wide.png", "caption": "wide"})
    cfg = DataConfig(path=str(_write(tmp_path, rows)), resolution=32, max_skip_rate=1.0)
    counts = []
    for rank in range(2):
        loader = build_dataloader(cfg, batch_size=1, seed=0, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader) and all(len(b["indices"]) == 1 for b in batches)
        for b in batches:
            assert tuple(b["pixels"].shape[2:]) == (b["bucket"][1], b["bucket"][0])
        counts.append(len(batches))
    assert counts[0] == counts[1] == 4


def test_no_readable_record_at_all_is_a_clear_error(tmp_path):
    rows = []
    for i in range(2):
        _truncated(tmp_path, f"t{i}.png")
        rows.append({"image": f"t{i}.png", "caption": "truncated"})
    cfg = DataConfig(path=str(_write(tmp_path, rows)), resolution=32, max_skip_rate=1.0)
    with pytest.raises(RuntimeError, match="no readable sample left"):
        list(build_dataloader(cfg, batch_size=1, seed=0))


def test_memory_cache_still_counts_every_skip_and_upscale(tmp_path):
    """Cached pixels carry their upscale event; failed images are never cached, so every visit
    counts them again, exactly as without the cache."""
    rows = _good(tmp_path, 15) + _bad_rows(tmp_path)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "half.png")
    rows.append({"image": "half.png", "caption": "16x16, upscaled into the 32x32 bucket"})
    counts = []
    for mb in (0, 16):
        cfg = DataConfig(path=str(_write(tmp_path, rows)), resolution=32, max_skip_rate=1.0,
                         skip_check_min_samples=0, drop_last=False, memory_cache_mb=mb)
        loader = build_dataloader(cfg, batch_size=4, seed=0)
        epochs = [[b["indices"].tolist() for b in loader] for _ in range(2)]
        counts.append((epochs, dict(loader.skips.skipped), dict(loader.skips.events)))
    assert counts[0] == counts[1]
    epochs, skipped, events = counts[1]
    assert skipped == {"missing_file": 2, "unreadable_image": 2} and events["upscaled"] >= 4
