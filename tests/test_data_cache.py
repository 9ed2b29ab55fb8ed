"""Offline cache: round trip with the real tiny encoders, batch contract, identity refusal, append."""

from __future__ import annotations

import json

import pytest
import torch

from lumina_lightning.data.cache import CacheIdentityError, CachedDataset, build_cache, read_index
from lumina_lightning.data.config import DataConfig
from lumina_lightning.data.images import load_image, resize_cover_center_crop, to_tensor
from lumina_lightning.data.loader import build_dataloader
from lumina_lightning.data.records import read_manifest
from lumina_lightning.data.synth import generate_synthetic

encoders = pytest.importorskip("lumina_lightning.encoders")


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny Gemma runs ~20x faster single-threaded on 2-core machines (thread spin overhead).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    synth = generate_synthetic(root / "synth", 16, size=32, seed=0, n_test=6, aspects=(1.0, 4.0))
    text = encoders.HFTextEncoder(encoders.build_tiny_text_encoder(root / "tiny_te"))
    return root, synth, text


def _cfg(path, **kw):
    return DataConfig(path=str(path), resolution=32, **kw)


def test_round_trip_and_batch_contract(setup, tmp_path):
    root, synth, text = setup
    vae = encoders.PixelAutoencoder()
    index_path = build_cache(_cfg(synth.train), tmp_path / "c", autoencoder=vae, text_encoder=text,
                             batch_size=8, shard_size=10, feature_dtype="float32")
    index = read_index(tmp_path / "c")
    assert index_path.name == "index.json" and len(index["items"]) == 16 and len(index["shards"]) >= 2
    ident = index["identity"]
    assert ident["autoencoder"] == vae.identity() and ident["text_encoder"]["kind"] == "hf"
    assert (ident["resolution"], ident["patch"], ident["prompt"]) == (32, 16, "caption")

    records = read_manifest(synth.train)
    ds = CachedDataset(tmp_path / "c", _cfg(synth.train, caption_weights={"long": 1.0}))
    item = index["items"][3]
    rec = next(r for r in records if r.image == item["image"])
    # latents are exactly the (identity) encoding of the bucketed pixels
    batch = ds[(0, 3)]
    pixels = to_tensor(resize_cover_center_crop(load_image(rec.image), tuple(item["bucket"])))
    assert torch.equal(batch["latents"][0], pixels)
    # caption features equal a fresh encoding of the chosen caption, padding removed
    assert batch["levels"] == ["long"] and batch["captions"] == [rec.captions["long"]]
    feats, mask = text.encode([rec.captions["long"]])
    n = int(mask[0].sum())
    assert batch["cap_mask"][0].sum() == n == item["cap_len"]["long"]
    assert torch.allclose(batch["cap_feats"][0, :n], feats[0, :n])

    loader = build_dataloader(_cfg(synth.train, cache_dir=str(tmp_path / "c"),
                                   caption_weights={"short": 0.5, "tags": 0.5}), batch_size=4, seed=0,
                              cache_identity={"autoencoder": vae.identity(), "text_encoder": text.identity()})
    seen = []
    for b in loader:
        B = len(b["indices"])
        assert b["latents"].shape[:2] == (B, 3) and b["latents"].shape[2:] == (b["bucket"][1], b["bucket"][0])
        assert b["cap_feats"].shape[:2] == b["cap_mask"].shape and b["cap_feats"].shape[0] == B
        assert b["cap_mask"].dtype == torch.bool and b["cap_mask"][:, 0].all()
        assert set(b["levels"]) <= {"short", "tags"} and "pixels" not in b
        seen += b["indices"].tolist()
    assert len(seen) == len(set(seen)) >= 12


def test_identity_mismatch_is_refused(setup, tmp_path):
    root, synth, text = setup
    build_cache(_cfg(synth.train), tmp_path / "c", autoencoder=encoders.PixelAutoencoder(), text_encoder=text)
    other_vae = {"kind": "vae", "path": "/somewhere/flux", "latent_channels": 16}
    with pytest.raises(CacheIdentityError, match="autoencoder"):
        CachedDataset(tmp_path / "c", expected_identity={"autoencoder": other_vae})
    with pytest.raises(CacheIdentityError, match="resolution"):
        build_dataloader(DataConfig(cache_dir=str(tmp_path / "c"), resolution=64), batch_size=2, seed=0)

    class OtherText:  # a stand-in with another identity, to test the append refusal only
        def identity(self):
            return {"kind": "hf", "path": "/other/encoder"}

    with pytest.raises(CacheIdentityError, match="text_encoder"):
        build_cache(_cfg(synth.test), tmp_path / "c", autoencoder=encoders.PixelAutoencoder(),
                    text_encoder=OtherText(), append=True)
    with pytest.raises(FileExistsError, match="append"):
        build_cache(_cfg(synth.test), tmp_path / "c", autoencoder=encoders.PixelAutoencoder(), text_encoder=text)


def test_append_with_the_same_identity(setup, tmp_path):
    root, synth, text = setup
    vae = encoders.PixelAutoencoder()
    build_cache(_cfg(synth.train), tmp_path / "c", autoencoder=vae, text_encoder=text, levels=["short"])
    build_cache(_cfg(synth.test), tmp_path / "c", autoencoder=vae, text_encoder=text, levels=["short"], append=True)
    build_cache(_cfg(synth.test), tmp_path / "c", autoencoder=vae, text_encoder=text, levels=["short"], append=True)
    index = read_index(tmp_path / "c")
    assert len(index["items"]) == 16 + 6  # the repeated append added nothing
    assert [s["stop"] - s["start"] for s in index["sources"]] == [16, 6]
    assert all(set(it["captions"]) == {"short"} for it in index["items"])
    assert len({it["key"] for it in index["items"]}) == 22


def test_bad_images_are_skipped_and_recorded(setup, tmp_path):
    root, synth, text = setup
    rows = [json.loads(line) for line in synth.train.read_text().splitlines()[:8]]
    for row in rows:
        row["image"] = str(synth.root / row["image"])
    rows.append({"image": str(tmp_path / "gone.png"), "caption": "missing", "width": 32, "height": 32})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_cache(_cfg(manifest, max_skip_rate=0.5), tmp_path / "c", autoencoder=encoders.PixelAutoencoder(),
                text_encoder=text)
    index = read_index(tmp_path / "c")
    assert len(index["items"]) == 8
    assert index["skips"]["skipped"] == {"missing_file": 1} and index["skips"]["seen"] == 9


def test_cli_cache_and_inspect(setup, tmp_path, capsys):
    from lumina_lightning.data.cli import main

    root, synth, text = setup
    rc = main(["cache", "--data", str(synth.test), "--out", str(tmp_path / "c"), "--resolution", "32",
               "--text-encoder", str(root / "tiny_te"), "--prompt-template", "record", "--default-system", "base",
               "--levels", "short,long", "--feature-dtype", "float32"])
    assert rc == 0
    index = read_index(tmp_path / "c")
    assert index["identity"]["prompt"] == "record:base" and len(index["items"]) == 6
    assert main(["inspect", "--cache", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "6 records" in out and "short" in out


class _HashText:
    """A deterministic stand-in text encoder: the features are a hash of the prompt."""

    def identity(self):
        return {"kind": "hash-test"}

    def encode(self, prompts):
        import hashlib

        rows = [torch.tensor(list(hashlib.sha256(p.encode()).digest()[:8]), dtype=torch.float32).reshape(4, 2)
                for p in prompts]
        return torch.stack(rows), torch.ones(len(prompts), 4, dtype=torch.bool)


def test_append_reencodes_changed_images_and_captions(tmp_path):
    import os

    from PIL import Image

    def manifest(captions):
        (tmp_path / "m.jsonl").write_text("".join(
            json.dumps({"image": f"{k}.png", "caption": c}) + "\n" for k, c in enumerate(captions)))

    for k in range(3):
        Image.new("RGB", (32, 32), (10 * k, 0, 0)).save(tmp_path / f"{k}.png")
    manifest(["red", "b", "c"])
    cfg, vae, text = _cfg(tmp_path / "m.jsonl"), encoders.PixelAutoencoder(), _HashText()
    build_cache(cfg, tmp_path / "c", autoencoder=vae, text_encoder=text, feature_dtype="float32")
    # image 0 is re-exported with other pixels (its mtime moves on), caption 1 is corrected
    Image.new("RGB", (32, 32), (0, 200, 0)).save(tmp_path / "0.png")
    st = os.stat(tmp_path / "0.png")
    os.utime(tmp_path / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    manifest(["green", "b fixed", "c"])
    build_cache(cfg, tmp_path / "c", autoencoder=vae, text_encoder=text, feature_dtype="float32", append=True)
    index = read_index(tmp_path / "c")
    assert len(index["items"]) == 3
    ds = CachedDataset(tmp_path / "c", cfg)
    for pos, item in enumerate(index["items"]):
        batch = ds[(0, pos)]
        fresh = to_tensor(resize_cover_center_crop(load_image(item["image"]), tuple(item["bucket"])))
        assert torch.equal(batch["latents"][0], fresh), item["image"]
        want = {"0.png": "green", "1.png": "b fixed", "2.png": "c"}[item["image"].rsplit("/", 1)[-1]]
        assert batch["captions"] == [want]
        assert torch.equal(batch["cap_feats"][0], text.encode([want])[0][0])
    assert all(it["fingerprint"] for it in index["items"])
    # an unchanged append adds nothing; a cache written before fingerprints is re-encoded once
    build_cache(cfg, tmp_path / "c", autoencoder=vae, text_encoder=text, feature_dtype="float32", append=True)
    assert read_index(tmp_path / "c")["items"] == index["items"]
    for it in index["items"]:
        del it["fingerprint"]
    (tmp_path / "c" / "index.json").write_text(json.dumps(index))
    build_cache(cfg, tmp_path / "c", autoencoder=vae, text_encoder=text, feature_dtype="float32", append=True)
    again = read_index(tmp_path / "c")
    assert len(again["items"]) == 3 and all(it["fingerprint"] for it in again["items"])
    assert [s["stop"] - s["start"] for s in again["sources"]] == [3]


def test_append_with_other_levels_keeps_the_cached_items_whole(tmp_path):
    from PIL import Image

    rows = []
    for k in range(3):
        Image.new("RGB", (32, 32), (10 * k, 0, 0)).save(tmp_path / f"{k}.png")
        rows.append({"image": f"{k}.png", "captions": {"short": f"s{k}", "long": f"a long caption {k}"}})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, vae, text = _cfg(tmp_path / "m.jsonl"), encoders.PixelAutoencoder(), _HashText()
    build_cache(cfg, tmp_path / "c", autoencoder=vae, text_encoder=text, feature_dtype="float32")
    Image.new("RGB", (32, 32), (0, 0, 90)).save(tmp_path / "3.png")
    rows.append({"image": "3.png", "captions": {"short": "s3", "long": "a long caption 3"}})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_cache(cfg, tmp_path / "c", autoencoder=vae, text_encoder=text, feature_dtype="float32", append=True,
                levels=["short"])
    levels = {it["image"].rsplit("/", 1)[-1]: sorted(it["captions"]) for it in read_index(tmp_path / "c")["items"]}
    assert levels == {"0.png": ["long", "short"], "1.png": ["long", "short"], "2.png": ["long", "short"],
                      "3.png": ["short"]}
