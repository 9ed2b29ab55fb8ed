"""HFTextEncoder's folder handling (diffusers pipeline folders, missing or degenerate tokenizers) and its
truncation report; every caller (training, `lumina data cache`, sampling) goes through it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from lumina_lightning.encoders import HFTextEncoder, TextEncoderLoadError
from lumina_lightning.encoders.text import TOKENIZER_FILES, check_tokenizer
from training_utils import tiny_recipe, tiny_text_encoder


def _split_like_diffusers(tmp_path):
    """A diffusers pipeline folder: the model in text_encoder/, the tokenizer files in tokenizer/."""
    root = tmp_path / "pipe"
    (root / "text_encoder").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    for f in Path(tiny_text_encoder()).iterdir():
        is_tok = f.name in TOKENIZER_FILES or f.name == "special_tokens_map.json"
        shutil.copy(f, root / ("tokenizer" if is_tok else "text_encoder") / f.name)
    return root


def test_a_model_folder_without_tokenizer_files_is_refused_naming_the_folder(tmp_path):
    """transformers "loads" a tokenizer from a folder with only config.json + weights (a 5-entry Gemma
    tokenizer that maps every prompt to one token): training ran to the end on identical captions."""
    root = _split_like_diffusers(tmp_path)
    alone = tmp_path / "alone"
    shutil.copytree(root / "text_encoder", alone)
    with pytest.raises(TextEncoderLoadError, match=rf"text encoder {alone}: no tokenizer in {alone} \(looked for "
                                                   r"tokenizer.json"):
        HFTextEncoder(alone)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextEncoderLoadError, match=r"empty: no model config in .*empty \(looked for config.json\)"):
        HFTextEncoder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTextEncoder(tmp_path / "nope")
    # a diffusers root without tokenizer/ says where it looked
    shutil.rmtree(root / "tokenizer")
    with pytest.raises(TextEncoderLoadError, match=r"no tokenizer in .*text_encoder or .*pipe/tokenizer"):
        HFTextEncoder(root)


def test_a_diffusers_pipeline_folder_or_its_text_encoder_reads_the_sibling_tokenizer(tmp_path):
    root = _split_like_diffusers(tmp_path)
    for given in (root, root / "text_encoder"):
        enc = HFTextEncoder(given)
        assert enc.path == str(root / "text_encoder") and enc.tokenizer_path == str(root / "tokenizer")
        a, b = (enc.tokenizer(p)["input_ids"] for p in ("a red circle", "two blue squares"))
        assert a != b and len(a) > 1


def test_a_degenerate_tokenizer_is_refused(tmp_path):
    # a tokenizer_config.json naming a class whose vocabulary files are missing: a handful of entries
    folder = tmp_path / "deg"
    shutil.copytree(tiny_text_encoder(), folder)
    for name in TOKENIZER_FILES + ("special_tokens_map.json",):
        (folder / name).unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizerFast"}))
    with pytest.raises(TextEncoderLoadError, match=rf"text encoder {folder}: its tokenizer has only \d+ entries"):
        HFTextEncoder(folder)

    class Blind:  # a large vocabulary, but every prompt comes out the same
        all_special_ids = [0]
        unk_token_id = 1

        def __len__(self):
            return 1000

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [0, 7]}

    with pytest.raises(TextEncoderLoadError, match=r"text encoder /some/folder: its tokenizer .*cannot tell prompts apart"):
        check_tokenizer(Blind(), "/some/folder")

    class AllUnknown(Blind):
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [0] + [1] * len(text.split())}

    with pytest.raises(TextEncoderLoadError, match="cannot tell prompts apart"):
        check_tokenizer(AllUnknown(), "/some/folder")


def test_training_refuses_a_text_encoder_folder_without_its_tokenizer(tmp_path):
    """build_encoders (training; `lumina data cache` builds HFTextEncoder the same way) gets the check."""
    from lumina_lightning.training.recipe import load_recipe
    from lumina_lightning.training.run import build_encoders

    root = _split_like_diffusers(tmp_path)
    alone = tmp_path / "alone"
    shutil.copytree(root / "text_encoder", alone)
    cfg = load_recipe(tiny_recipe(tmp_path, text_encoder={"path": str(alone), "max_length": 32})).config
    with pytest.raises(TextEncoderLoadError, match=f"text encoder {alone}: no tokenizer"):
        build_encoders(cfg)
    # the pipeline root works as text_encoder.path, and the export records it as given
    cfg = load_recipe(tiny_recipe(tmp_path, "b.yaml", text_encoder={"path": str(root), "max_length": 32})).config
    te, _, spec = build_encoders(cfg)
    assert te.tokenizer_path == str(root / "tokenizer") and spec["text_encoder"]["path"] == str(root)


def test_truncation_warns_once_and_counts(caplog):
    enc = HFTextEncoder(tiny_text_encoder(), max_length=4, cache_size=0)
    long = ["a photo of a red circle left of a blue square", "two green stars above a yellow triangle"]
    with caplog.at_level(logging.WARNING, logger="lumina_lightning.encoders.text"):
        enc.encode(["a red", *long])
        enc.encode(long)
        enc.encode(["a red"])
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1  # once per encoder, not per batch
    assert "2 prompt(s) of this batch" in warnings[0] and "max_length=4" in warnings[0]
    assert "'a photo of a red circle left of a blue square'" in warnings[0]
    assert enc.truncated_count == 4
    assert enc.truncation_summary().startswith("4 prompt(s) longer than text_encoder max_length=4 tokens")
    # the example is the caption (not the system prompt every prompt starts with) and what it loses
    from lumina_lightning.encoders import build_prompt

    caplog.clear()
    templated = HFTextEncoder(tiny_text_encoder(), max_length=24)
    with caplog.at_level(logging.WARNING, logger="lumina_lightning.encoders.text"):
        templated.encode([build_prompt("a red circle left of a blue square and two green stars", "base")])
    (message,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert "'a red circle left of a blue square and two green stars' after the 'base' system prompt" in message
    assert "which loses '" in message and "green stars" in message.split("which loses")[1]
    quiet = HFTextEncoder(tiny_text_encoder(), max_length=64)
    quiet.encode(long)
    assert quiet.truncated_count == 0 and quiet.truncation_summary() is None


def test_a_max_length_that_is_no_multiple_of_the_padding_multiple_encodes():
    """transformers refuses truncation at a length that is no multiple of pad_to_multiple_of (8): every
    encode with text_encoder.max_length 30 failed, short prompts included."""
    enc = HFTextEncoder(tiny_text_encoder(), max_length=30, cache_size=0)
    feats, mask = enc.encode(["a red circle", "a red circle left of a blue square " * 5])
    assert mask.sum(1).tolist() == [len(enc.tokenizer("a red circle")["input_ids"]), 30]
    assert mask.shape[1] % 8 == 0  # the features are still padded to a multiple of 8
    ref = HFTextEncoder(tiny_text_encoder(), max_length=32, cache_size=0)
    short, _ = ref.encode(["a red circle"])
    n = int(mask[0].sum())
    assert (feats[0, :n] - short[0, :n]).abs().max() < 1e-5
