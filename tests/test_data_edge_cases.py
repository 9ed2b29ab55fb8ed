"""Data edge cases: a cache appended with another source mix, buckets smaller than the batch, exact
resume after an image went missing, `inspect --decode` on broken files, data YAML type / nesting /
ratio errors, Lightning's epochs after a resume with another batch size or world size."""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import pytest
import torch

from lumina_lightning.data.cli import main as data_main
from lumina_lightning.data.config import DataConfig
from lumina_lightning.data.loader import build_dataloader
from lumina_lightning.data.records import ManifestError, load_records
from lumina_lightning.data.synth import generate_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("rv") / "s", 24, size=32, seed=0, n_test=6)


def _counting_encoders(encoders, tmp_path):
    """A tiny text encoder and the pixel autoencoder, whose encode calls (image counts) are recorded."""
    text = encoders.HFTextEncoder(encoders.build_tiny_text_encoder(tmp_path / "te"))
    vae = encoders.PixelAutoencoder()
    calls = []
    real_encode = vae.encode
    vae.encode = lambda x: calls.append(len(x)) or real_encode(x)
    return text, vae, calls


def _checkpoint(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# --- cache --append takes the current sources and ratios --------------------------------


def test_cache_append_rebuilds_sources_with_the_current_ratios(synth, tmp_path, one_thread):
    encoders = pytest.importorskip("lumina_lightning.encoders")
    from lumina_lightning.data.cache import CachedDataset, build_cache, read_index

    text, vae, calls = _counting_encoders(encoders, tmp_path)
    cache = tmp_path / "c"
    build_cache(DataConfig(path=str(synth.train), resolution=32), cache, autoencoder=vae, text_encoder=text)
    first = sum(calls)
    assert first == 24
    build_cache(DataConfig(path=str(synth.hq_data), resolution=32), cache, autoencoder=vae, text_encoder=text,
                append=True)
    assert sum(calls) == first  # every HQ image was cached already: nothing encoded again
    index = read_index(cache)
    got = [(os.path.basename(s["name"]), s["stop"] - s["start"], s["ratio"]) for s in index["sources"]]
    n_hq = sum(1 for _ in open(synth.root / "train_hq.jsonl"))
    assert got == [("train_hq.jsonl", n_hq, 1.0), ("train.jsonl", 24, 0.5)]
    ds = CachedDataset(cache, DataConfig(cache_dir=str(cache), resolution=32))
    mix = load_records(str(synth.hq_data))
    assert len(ds.plan.records.epoch_indices(0, 0)) == len(mix.epoch_indices(0, 0))
    # each image counted once however often it was looked at (the append re-read all 24)
    assert index["skips"]["seen"] == 24 and index["skips"]["skipped"] == {}

    # a ratio edited in the YAML and appended again: the new ratio applies
    y = tmp_path / "mix.yaml"
    y.write_text(f"META:\n  - path: {synth.train}\n    ratio: 3.0\n")
    build_cache(DataConfig(path=str(y), resolution=32), tmp_path / "c2", autoencoder=vae, text_encoder=text)
    y.write_text(f"META:\n  - path: {synth.train}\n    ratio: 1.0\n")
    build_cache(DataConfig(path=str(y), resolution=32), tmp_path / "c2", autoencoder=vae, text_encoder=text,
                append=True)
    assert [(s["stop"] - s["start"], s["ratio"]) for s in read_index(tmp_path / "c2")["sources"]] == [(24, 1.0)]


def test_cache_keeps_items_the_appended_data_does_not_list_and_encodes_a_twice_listed_record_once(
        synth, tmp_path, one_thread):
    encoders = pytest.importorskip("lumina_lightning.encoders")
    from lumina_lightning.data.cache import build_cache, read_index

    text, vae, calls = _counting_encoders(encoders, tmp_path)
    rows = [json.loads(line) for line in open(synth.train)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, part in ((a, rows[:10]), (b, rows[10:])):
        path.write_text("".join(json.dumps({**r, "image": str(synth.root / r["image"])}) + "\n" for r in part))
    twice = tmp_path / "twice.yaml"
    twice.write_text(f"META:\n  - path: {a}\n  - path: {a}\n    ratio: 0.5\n    name: again\n")
    build_cache(DataConfig(path=str(twice), resolution=32), tmp_path / "c", autoencoder=vae, text_encoder=text)
    assert sum(calls) == 10  # listed by two sources, encoded once
    index = read_index(tmp_path / "c")
    assert [(s["stop"] - s["start"], s["ratio"]) for s in index["sources"]] == [(10, 1.0), (10, 0.5)]
    assert len({(it["shard"], it["key"]) for it in index["items"]}) == 10
    build_cache(DataConfig(path=str(b), resolution=32), tmp_path / "c", autoencoder=vae, text_encoder=text,
                append=True)
    index = read_index(tmp_path / "c")
    # a.jsonl's items keep their sources (an append adds); b.jsonl comes with its own
    assert [(s["stop"] - s["start"], s["ratio"]) for s in index["sources"]] == [(10, 1.0), (10, 0.5), (14, 1.0)]
    assert index["skips"]["seen"] == 24


# --- a bucket smaller than the batch size ------------------------------------------------------


@pytest.fixture(scope="module")
def small_bucket(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    s = generate_synthetic(root / "s", 120, size=32, seed=0, n_test=6, aspects=(1.0, 4.0))
    rows = [json.loads(line) for line in open(s.train)]
    square = [r for r in rows if r["width"] == r["height"]][:40]
    wide = [r for r in rows if r["width"] > r["height"]][:3]
    path = root / "s" / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in square + wide))
    return path


def test_a_bucket_smaller_than_the_batch_is_reported(small_bucket, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="lumina_lightning.data"):
        loader = build_dataloader(DataConfig(path=str(small_bucket), resolution=32), batch_size=4, seed=0)
    assert loader.plan.small_buckets(4) == {(64, 16): 3}
    assert "3 record(s) in 1 bucket(s) with fewer than batch_size=4" in caplog.text and "64x16 (3)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lumina_lightning.data"):
        build_dataloader(DataConfig(path=str(small_bucket), resolution=32, drop_last=False), batch_size=4, seed=0)
    assert "never trained on" not in caplog.text
    assert data_main(["inspect", str(small_bucket), "--resolution", "32", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "fewer than --batch-size 4 samples per epoch" in out and "64x16  3 records" in out


# --- a file missing on resume ------------------------------------------------------------------


def _nosize_manifest(root, synth_dir):
    rows = [json.loads(line) for line in open(synth_dir / "train.jsonl")]
    path = root / "nosize.jsonl"
    path.write_text("".join(json.dumps({"image": str(synth_dir / r["image"]), "captions": r["captions"]}) + "\n"
                            for r in rows))
    return path, rows


def test_resume_with_a_newly_missing_file_stays_exact(tmp_path, caplog):
    s = generate_synthetic(tmp_path / "s", 40, size=32, seed=0, n_test=6)
    manifest, rows = _nosize_manifest(tmp_path, s.root)
    cfg = DataConfig(path=str(manifest), resolution=32)
    straight = [b["indices"].tolist() for b in build_dataloader(cfg, batch_size=4, seed=0)]
    loader = build_dataloader(cfg, batch_size=4, seed=0)
    it = iter(loader)
    head = [next(it)["indices"].tolist() for _ in range(2)]
    state = _checkpoint(loader.state_dict())
    gone = straight[5][0]  # a record of a batch still to come
    os.remove(s.root / rows[gone]["image"])
    again = build_dataloader(cfg, batch_size=4, seed=0)
    with caplog.at_level(logging.WARNING, logger="lumina_lightning.data"):
        again.load_state_dict(state)
    assert "1 record(s) usable when the checkpoint was taken are unusable now" in caplog.text
    assert rows[gone]["image"].split("/")[-1] in caplog.text and "missing_file" in caplog.text
    rest = list(again)
    assert len(head) + len(rest) == len(straight)
    # the same batches in the same order; the missing record's slot holds a substitute
    for want, got in zip(straight[2:], rest):
        got_ids = got["indices"].tolist()
        assert got_ids == want or (gone in want and gone not in got_ids and len(got_ids) == len(want))
    assert again.skips.skipped["missing_file"] == 1


def test_resume_after_an_image_changed_size_names_it(tmp_path):
    from PIL import Image

    s = generate_synthetic(tmp_path / "s", 40, size=32, seed=0, n_test=6)
    manifest, rows = _nosize_manifest(tmp_path, s.root)
    cfg = DataConfig(path=str(manifest), resolution=32)
    loader = build_dataloader(cfg, batch_size=4, seed=0)
    next(iter(loader))
    state = _checkpoint(loader.state_dict())
    Image.new("RGB", (128, 32)).save(s.root / rows[3]["image"])
    again = build_dataloader(cfg, batch_size=4, seed=0)
    with pytest.raises(ValueError, match=r"1 record\(s\) changed bucket .*train_000003.png \(32x32 -> 64x16\)"):
        again.load_state_dict(state)


# --- inspect --decode -------------------------------------------------------------------------


def test_inspect_decode_counts_each_broken_file_once(tmp_path, capsys):
    from PIL import Image

    for k in range(3):
        p = tmp_path / f"img{k}.png"
        Image.new("RGB", (16, 16), (k * 80, 10, 10)).save(p)  # 16 px in a 32 px bucket: upscaled
        if k < 2:
            data = p.read_bytes()
            p.write_bytes(data[: len(data) // 2])
        (tmp_path / f"img{k}.txt").write_text(f"picture {k}")
    assert data_main(["inspect", str(tmp_path), "--resolution", "32", "--decode"]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 samples skipped" in out and "upscaled  3" in out
    (tmp_path / "img2.png").unlink()
    (tmp_path / "img2.txt").unlink()
    assert data_main(["inspect", str(tmp_path), "--resolution", "32", "--decode"]) == 0  # no RuntimeError
    assert "2 of 2 samples skipped" in capsys.readouterr().out


def test_inspect_reports_per_epoch_samples_as_the_loader_lists_them(synth, tmp_path, capsys):
    y = tmp_path / "m.yaml"
    y.write_text(f"META:\n  - path: {synth.train}\n    ratio: 0.3\n")  # 24 * 0.3 = 7.2 -> 7 listed
    assert data_main(["inspect", str(y), "--resolution", "32"]) == 0
    assert len(load_records(str(y)).epoch_indices(0, 0)) == 7
    assert "24 x 0.3 = 7" in capsys.readouterr().out
    y.write_text(f"META:\n  - path: {synth.train}\n    ratio: 1.9\n")  # 24 + round(21.6) = 46; int(45.6) = 45
    assert data_main(["inspect", str(y), "--resolution", "32"]) == 0
    assert len(load_records(str(y)).epoch_indices(0, 0)) == 46
    assert "24 x 1.9 = 46" in capsys.readouterr().out


# --- data YAML type, nesting, bad ratio --------------------------------------------------


def test_data_yaml_type_decides_the_manifest_format(tmp_path):
    rows = [{"image": f"img{i}.png", "caption": f"c{i}"} for i in range(3)]
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "list.jsonl").write_text(json.dumps(rows, indent=1))
    for name, kind in (("lines.json", "jsonl"), ("list.jsonl", "json")):
        (tmp_path / "d.yaml").write_text(f"META:\n  - path: {name}\n    type: {kind}\n")
        assert len(load_records(tmp_path / "d.yaml")) == 3


def test_nested_data_yaml_multiplies_ratios(synth, tmp_path):
    outer = tmp_path / "outer.yaml"
    outer.write_text(f"META:\n  - path: {synth.hq_data}\n    ratio: 2.0\n    system: base\n"
                     f"  - path: {synth.train}\n")
    rs = load_records(outer)
    inner = load_records(str(synth.hq_data))
    assert [(s.size, s.ratio) for s in rs.sources] == [(s.size, 2.0 * s.ratio) for s in inner.sources] + [(24, 1.0)]
    assert {r.system for r in rs.records[: len(inner)]} == {"base"} and rs.records[-1].system is None
    loop = tmp_path / "loop.yaml"
    loop.write_text("META:\n  - path: loop.yaml\n")
    with pytest.raises(ManifestError, match="in a loop"):
        load_records(loop)


@pytest.mark.parametrize("ratio", ["", "abc", "true", "-1"])
def test_a_bad_ratio_names_the_source(synth, tmp_path, ratio, capsys):
    y = tmp_path / "bad.yaml"
    y.write_text(f"META:\n  - path: {synth.train}\n    ratio: {ratio}\n")
    with pytest.raises(ManifestError, match=r"bad.yaml: META\[0\]: 'ratio' must be"):
        load_records(y)
    assert data_main(["inspect", str(y), "--resolution", "32"]) == 2
    assert "META[0]: 'ratio'" in capsys.readouterr().err


# --- len(loader) after a resume with another batch size / world size -------------------------


def test_len_after_a_resume_counts_the_old_steps_plus_the_steps_left(synth):
    cfg = DataConfig(path=str(synth.train), resolution=32)
    loader = build_dataloader(cfg, batch_size=2, seed=3)  # 12 steps per epoch
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = _checkpoint(loader.state_dict())
    bigger = build_dataloader(cfg, batch_size=4, seed=3)  # 6 per fresh epoch; 14 samples left = 3 steps
    assert len(bigger) == 6
    bigger.load_state_dict(state)
    assert bigger.batch_sampler.steps_left() == 3 and len(bigger) == 5 + 3
    assert len(list(bigger)) == 3
    assert len(bigger) == 6  # used up: the next epoch's length
    smaller = build_dataloader(cfg, batch_size=1, seed=3)
    smaller.load_state_dict(state)
    assert smaller.batch_sampler.steps_left() == 14 and len(smaller) == 24  # a full epoch is longer than 5 + 14
    two = build_dataloader(cfg, batch_size=2, seed=3, rank=0, world_size=2)
    two.load_state_dict(state)
    assert two.batch_sampler.steps_left() == 3 and len(two) == 5 + 3


L = pytest.importorskip("lightning")


class _Recorder(L.LightningModule):
    def __init__(self, cfg, batch_size):
        super().__init__()
        self.cfg, self.bs = cfg, batch_size
        self.net = torch.nn.Linear(3, 1)
        self.seen: list[tuple[int, int, int]] = []

    def train_dataloader(self):
        loader = build_dataloader(self.cfg, batch_size=self.bs, seed=11)
        loader.restore_from_trainer(self.trainer)
        return loader

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, int(batch["epoch"]), len(batch["indices"])))
        return self.net(batch["pixels"].mean(dim=(2, 3))).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("old_bs,new_bs,save_at", [(2, 4, 6), (4, 2, 3)])
def test_lightning_epochs_follow_the_data_epochs_after_a_batch_size_change(synth, tmp_path, one_thread, old_bs,
                                                                          new_bs, save_at):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(max_steps, callbacks=()):
        return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                         default_root_dir=str(tmp_path), callbacks=list(callbacks))

    cfg = DataConfig(path=str(synth.train), resolution=32)  # 24 records
    first = _Recorder(cfg, old_bs)
    trainer(save_at, [ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=save_at)]).fit(first)
    resumed = _Recorder(cfg, new_bs)
    per_epoch = 24 // new_bs
    left = (24 - save_at * old_bs) // new_bs
    trainer(save_at + left + per_epoch + 1).fit(resumed, ckpt_path=str(next((tmp_path / "ck").glob("*.ckpt"))))
    assert [(e, d) for e, d, _ in resumed.seen] == [(0, 0)] * left + [(1, 1)] * per_epoch + [(2, 2)]
    assert sum(n for _, d, n in resumed.seen if d == 0) + save_at * old_bs == 24


def test_cache_cli_default_system_is_the_recipe_default():
    """`lumina data cache --prompt-template record` with no --default-system makes the cache that a recipe with
    the default objective.system (align) and no data.system expects (run.cache_prompt_id)."""
    import types

    from lumina_lightning.data.cli import _prompt_fn, build_parser
    from lumina_lightning.training.config import DataSection, ObjectiveSection
    from lumina_lightning.training.run import cache_prompt_id

    args = build_parser().parse_args(["cache", "--data", "x.jsonl", "--out", "c", "--resolution", "32",
                                      "--text-encoder", "minilm", "--prompt-template", "record"])
    recipe = types.SimpleNamespace(data=DataSection(), objective=ObjectiveSection())
    assert _prompt_fn(args.prompt_template, args.default_system)[1] == cache_prompt_id(recipe) == "record:align"
    recipe.data.system = "real"
    assert cache_prompt_id(recipe) == "record:real"
