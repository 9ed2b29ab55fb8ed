"""UniCap data: instruction table, level mixing statistics, exact label masking, bad images, sharding."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lumina_lightning.data.records import Record, load_records
from lumina_lightning.data.skips import MISSING_FILE, UNREADABLE_IMAGE
from lumina_lightning.modules.unicap import answer_loss, load_processor, load_vlm
from lumina_lightning.modules.unicap_data import (
    IGNORE_INDEX,
    PROMPT_TOO_LONG,
    EpochShardSampler,
    InstructionTable,
    UniCapCollator,
    UniCapDataset,
    answer_suffix,
    choose_level,
    level_rng,
    model_inputs,
)
from test_unicap_helpers import bad_images, tiny_vlm
from training_utils import tiny_synthetic


@pytest.fixture(scope="module")
def processor():
    return load_processor(tiny_vlm())


def _image(i: int = 0):
    from lumina_lightning.data.images import load_image

    return load_image(str(tiny_synthetic() / "images" / f"train_{i:06d}.png"))


# ------------------------------------------------------------------------------------------------
# instructions and mixing
# ------------------------------------------------------------------------------------------------


def test_instruction_table_levels_languages_and_overrides():
    table = InstructionTable.from_config({"tags": ["List tags.", "Tag this image."], "ocr": "Read the text."})
    assert table.instruction("short") == "Describe this image in one short sentence."
    assert table.instruction("long") == "Describe this image in detail."
    assert table.instruction("long_de") == "Describe this image in detail. Answer in German."
    assert table.instruction("short_zh") == "Describe this image in one short sentence. Answer in Chinese."
    assert table.instruction("ocr") == "Read the text."
    assert set(table.choices("tags")) == {"List tags.", "Tag this image."}
    assert set(table.choices("tags_de")) == {"List tags. Answer in German.", "Tag this image. Answer in German."}
    assert not table.has("long_xx") and not table.has("nonsense") and not table.has("_de")
    with pytest.raises(KeyError, match="data.instructions"):
        table.instruction("nonsense")
    german = InstructionTable.from_config(language_template="{instruction} (auf {language})")
    assert german.instruction("medium_de").endswith("(auf German)")


def test_level_mixing_statistics_follow_the_weights():
    table = InstructionTable.from_config()
    full = {"short": "s", "long": "l", "tags": "t", "long_de": "d", "medium": "m", "prompt": "p"}
    weights = {"short": 0.5, "long": 0.3, "tags": 0.2, "long_de": 0.0}
    n = 6000
    counts = Counter(choose_level(full, weights, table, level_rng(0, 0, i)) for i in range(n))
    assert set(counts) == {"short", "long", "tags"}  # zero weight and unlisted levels never train
    for level, w in (("short", 0.5), ("long", 0.3), ("tags", 0.2)):
        assert abs(counts[level] / n - w) < 0.025, counts
    # a record missing a level: the weights renormalise over what it has (0.5 : 0.2)
    partial = {"short": "s", "tags": "t", "long": "   "}
    counts = Counter(choose_level(partial, weights, table, level_rng(0, 0, i)) for i in range(n))
    assert set(counts) == {"short", "tags"} and abs(counts["short"] / n - 0.5 / 0.7) < 0.025
    # no weights: uniform over the levels with an instruction (an unknown level is not a target)
    counts = Counter(choose_level({"short": "s", "tags": "t", "weird": "w"}, {}, table, level_rng(0, 0, i))
                     for i in range(n))
    assert set(counts) == {"short", "tags"} and abs(counts["short"] / n - 0.5) < 0.025
    # nothing usable
    assert choose_level({"weird": "w", "short": ""}, weights, table, level_rng(0, 0, 0)) is None


def test_level_choice_is_keyed_by_seed_epoch_index_not_key_order():
    table = InstructionTable.from_config()
    a = {"short": "s", "long": "l", "tags": "t"}
    b = dict(reversed(list(a.items())))
    w = {"short": 1, "long": 1, "tags": 1}
    picks = [choose_level(a, w, table, level_rng(3, 1, i)) for i in range(50)]
    assert picks == [choose_level(b, w, table, level_rng(3, 1, i)) for i in range(50)]
    assert picks != [choose_level(a, w, table, level_rng(3, 2, i)) for i in range(50)]  # new epoch, new draws
    records = [Record(image="x.png", captions=a) for _ in range(200)]
    ds = UniCapDataset(records, table, level_weights=w, seed=3)
    assert [ds.level_for(i, 1)[0] for i in range(50)] == picks
    assert ds.level_for(0, 1)[1] == table.instruction(picks[0])


# ------------------------------------------------------------------------------------------------
# label masking
# ------------------------------------------------------------------------------------------------


def test_labels_cover_exactly_the_answer_and_end_of_turn(processor):
    tok = processor.tokenizer
    assert answer_suffix(processor) == "<|im_end|>"
    collate = UniCapCollator(processor, max_length=256)
    answers = ["a red circle", "two blue squares left of a green triangle, on a gray background"]
    samples = [{"image": _image(i), "instruction": ins, "answer": ans, "level": lvl, "index": i}
               for i, (ins, ans, lvl) in enumerate(zip(["Describe this image.", "List tags for this image."],
                                                       answers, ["caption", "tags"]))]
    batch = collate(samples)
    ids, labels, mask, types = batch["input_ids"], batch["labels"], batch["attention_mask"], batch["mm_token_type_ids"]
    assert ids.shape == labels.shape == mask.shape == types.shape
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assistant = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    grid = batch["image_grid_thw"]
    for b, answer in enumerate(answers):
        row, lab, m = ids[b].tolist(), labels[b].tolist(), mask[b].tolist()
        length = sum(m)
        assert m == [1] * length + [0] * (len(m) - length)  # right padding
        # the answer starts right after the generation prompt "<|im_start|>assistant\n"
        starts = [i for i in range(len(row)) if row[i:i + len(assistant)] == assistant]
        start = starts[-1] + len(assistant)
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [end_id]
        assert row[start:length] == answer_ids
        assert lab[:start] == [IGNORE_INDEX] * start  # prompt: chat template, image tokens, instruction
        assert lab[start:length] == answer_ids  # answer + end-of-turn, aligned with the inputs
        assert lab[length:] == [IGNORE_INDEX] * (len(lab) - length)  # padding
        assert row[length:] == [tok.pad_token_id] * (len(row) - length)
        assert tok.decode(lab[start:length]) == answer + "<|im_end|>"
        # image tokens: as many as the processor's grid says, and typed 1 for M-RoPE, text 0
        n_image = int(grid[b].prod()) // 4
        assert row.count(image_id) == n_image
        assert [i for i, t in enumerate(types[b].tolist()) if t == 1] == [i for i, t in enumerate(row) if t == image_id]
    assert batch["meta"]["levels"] == ["caption", "tags"]

    # the model's loss is the mean cross-entropy over exactly these tokens
    model = load_vlm(tiny_vlm())
    with torch.no_grad():
        out = model(**model_inputs(batch))
    assert torch.allclose(out.loss, answer_loss(out.logits, labels, "token"), atol=1e-5)
    shifted = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                           shifted.reshape(-1), reduction="none").view(shifted.shape)
    per_sample = [ce[b][shifted[b] != IGNORE_INDEX].mean() for b in range(2)]
    assert torch.allclose(answer_loss(out.logits, labels, "sample"), torch.stack(per_sample).mean(), atol=1e-5)


def test_long_answers_are_truncated_but_keep_prompt_and_end(processor):
    sample = {"image": _image(0), "instruction": "Describe this image in detail.",
              "answer": " ".join(["a red circle"] * 40)}
    n_prompt = UniCapCollator(processor, train=False)([sample])["input_ids"].shape[1]
    batch = UniCapCollator(processor, max_length=n_prompt + 8)([sample])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids.numel() == n_prompt + 8
    assert int(ids[-1]) == processor.tokenizer.convert_tokens_to_ids("<|im_end|>") == int(labels[-1])
    assert (ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == 4  # prompt intact
    assert (labels != IGNORE_INDEX).sum() == 8


def test_a_prompt_that_fills_max_length_trains_nothing_and_is_counted(processor):
    """A large image can make the prompt alone as long as max_length: training it on the end-of-turn
    token alone would teach the captioner to stop at once."""
    samples = [{"image": _image(i), "instruction": "Describe this image.", "answer": "a red circle",
                "path": f"img{i}.png"} for i in range(2)]
    n_prompt = UniCapCollator(processor, train=False)(samples[:1])["input_ids"].shape[1]
    batch = UniCapCollator(processor, max_length=n_prompt + 1)(samples)  # room for <|im_end|> only
    assert (batch["labels"] == IGNORE_INDEX).all()
    assert [(reason, text.split(":")[0]) for reason, text in batch["meta"]["skipped"]] == [
        (PROMPT_TOO_LONG, "img0.png"), (PROMPT_TOO_LONG, "img1.png")]
    assert "data.max_image_side" in batch["meta"]["skipped"][0][1]
    batch = UniCapCollator(processor, max_length=n_prompt + 2)(samples)  # one answer token + <|im_end|>
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) == 2).all() and not batch["meta"]["skipped"]


def test_generation_batches_are_left_padded_prompts(processor):
    collate = UniCapCollator(processor, train=False)
    batch = collate([{"image": _image(0), "instruction": "Describe this image."},
                     {"image": _image(1), "instruction": "List tags for this image, separated by commas."}])
    assert "labels" not in batch
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[1].all()  # the shorter prompt is padded on the left
    end = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row in batch["input_ids"].tolist():
        assert row[-len(end):] == end


# ------------------------------------------------------------------------------------------------
# bad images and sampling
# ------------------------------------------------------------------------------------------------


def test_bad_images_are_replaced_and_reported(tmp_path, processor):
    broken, missing = bad_images(tmp_path)
    good = load_records(tiny_synthetic() / "train.jsonl").records[:4]
    records = [Record(image=str(broken), captions={"short": "x"}), Record(image=str(missing), captions={"short": "y"}),
               Record(image=good[0].image, captions={"weird": "no instruction"}), *good]
    ds = UniCapDataset(records, InstructionTable.from_config(), level_weights={"short": 1.0})
    sample = ds[(0, 0)]
    assert sample["index"] == 3 and sample["answer"] == good[0].captions["short"]
    reasons = [r for r, _ in sample["skipped"]]
    assert reasons == [UNREADABLE_IMAGE, MISSING_FILE, "empty_caption"]
    batch = UniCapCollator(processor)([sample, ds[(0, 4)]])
    assert len(batch["meta"]["skipped"]) == 3 and batch["input_ids"].shape[0] == 2
    with pytest.raises(RuntimeError, match="unusable"):
        UniCapDataset(records[:2], InstructionTable.from_config(), max_substitutes=1)[0]


def test_epoch_shard_sampler_splits_ranks_and_reshuffles():
    shards = []
    for rank in range(3):
        s = EpochShardSampler(10, seed=1, rank=rank, world_size=3)
        shards.append([i for _, i in s])
        assert len(shards[-1]) == len(s) == 4
    flat = [i for sh in shards for i in sh]
    assert set(flat) == set(range(10)) and len(flat) == 12  # wrapped to equal lengths
    s = EpochShardSampler(10, seed=1)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert {e for e, _ in second} == {1} and [i for _, i in first] != [i for _, i in second]
    assert sorted(i for _, i in second) == list(range(10))
    assert np.array_equal([i for _, i in EpochShardSampler(5, shuffle=False)], np.arange(5))


def test_epoch_shard_sampler_state_restores_epoch_and_position():
    s = EpochShardSampler(10, seed=1, rank=1, world_size=2)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = s.state_dict()
    rest = list(it)
    fresh = EpochShardSampler(10, seed=1, rank=1, world_size=2)
    fresh.load_state_dict(state)
    fresh.set_epoch(2)  # Lightning calls it again after loading: the position stays
    assert list(fresh) == rest and {e for e, _ in head + rest} == {2}
    assert [k for _, k in list(fresh)] == [k for _, k in head + rest]  # the next pass is the whole epoch
    # saved after the epoch's last key: the next epoch, whether set_epoch comes before or after the load
    finished = fresh.state_dict()
    for set_first in (True, False):  # with workers torchdata applies the state after Lightning's set_epoch
        again = EpochShardSampler(10, seed=1, rank=1, world_size=2)
        if set_first:
            again.set_epoch(3)
        again.load_state_dict(finished)
        if not set_first:
            again.set_epoch(3)
        nxt = EpochShardSampler(10, seed=1, rank=1, world_size=2)
        nxt.set_epoch(3)
        assert list(again) == list(nxt) and len(list(nxt)) == 5
    with pytest.raises(ValueError, match="does not match"):
        EpochShardSampler(11, seed=1, rank=1, world_size=2).load_state_dict(state)


@pytest.mark.parametrize("size, before, after, drawn",
                         [(10, 2, 3, 2), (11, 3, 1, 1), (11, 1, 4, 7), (11, 2, 3, 2), (10, 2, 1, 5)])
def test_epoch_shard_sampler_reshards_the_rest_of_an_epoch_on_other_ranks(size, before, after, drawn):
    """A checkpoint saved with `before` ranks resumes on `after`: the rest of the epoch is dealt out
    over the new ranks, every record of the epoch trained exactly once (plus the padding that keeps
    ranks equal), in the same epoch, and the next epoch is an ordinary one on the new ranks."""
    olds = [EpochShardSampler(size, seed=3, rank=r, world_size=before, batch_size=1) for r in range(before)]
    consumed = []
    for s in olds:
        s.set_epoch(1)
        it = iter(s)
        consumed += [next(it) for _ in range(drawn)]
    state = olds[0].state_dict()  # Lightning saves rank 0's loader state; every rank loads it
    news = [EpochShardSampler(size, seed=3, rank=r, world_size=after, batch_size=1) for r in range(after)]
    rest = []
    for s in news:
        s.load_state_dict(state)
        s.set_epoch(1)
        rest.append(list(s))
    assert len({len(r) for r in rest}) == 1  # equal counts on every rank
    if drawn * before >= size:  # the epoch was finished: the next one starts, as with `after` ranks
        for r, s in enumerate(news):
            fresh = EpochShardSampler(size, seed=3, rank=r, world_size=after)
            fresh.set_epoch(2)
            assert rest[r] == list(fresh)
        return
    keys = consumed + [k for r in rest for k in r]
    assert {e for e, _ in keys} == {1}
    counts = Counter(i for _, i in keys)
    assert set(counts) == set(range(size))  # every record of the epoch, none skipped
    left = size - drawn * before
    assert sum(counts.values()) - size == -left % after  # repeats: only the wrap-around padding
    for r, s in enumerate(news):  # the next epoch: as on a run that always had `after` ranks
        s.set_epoch(2)
        fresh = EpochShardSampler(size, seed=3, rank=r, world_size=after)
        fresh.set_epoch(2)
        assert list(s) == list(fresh)


def test_epoch_shard_sampler_keeps_its_epoch_when_lightning_runs_ahead():
    """A max_steps / max_time stop saves Lightning's epoch as finished: set_epoch(epoch + k) right
    after the load continues the unfinished epoch, then the following epochs are the data's next ones."""
    ref = EpochShardSampler(12, seed=2, batch_size=4, drop_last=True)
    straight = []
    for epoch in range(3):
        ref.set_epoch(epoch)
        straight += list(ref)
    s = EpochShardSampler(12, seed=2, batch_size=4, drop_last=True)
    s.set_epoch(0)
    it = iter(s)
    got = [next(it) for _ in range(4)]
    for lightning_epoch in (1, 2):  # two stops between checkpoints: Lightning's count is 2 ahead
        state = s.state_dict()
        s = EpochShardSampler(12, seed=2, batch_size=4, drop_last=True)
        s.load_state_dict(state)
        s.set_epoch(lightning_epoch)
        it = iter(s)
        got += [next(it) for _ in range(2)]
    got += list(it)
    for lightning_epoch in (3, 4):
        s.set_epoch(lightning_epoch)
        got += list(s)
    assert got == straight


def test_generation_settings_override_the_checkpoint_generation_config(tmp_path):
    """Qwen2-VL-Instruct ships top_k=1, top_p=0.001 (and Qwen2.5-VL repetition_penalty=1.05) in its
    generation_config.json: a recipe's sampling and repetition settings must still be what runs."""
    import shutil

    from lumina_lightning.data.images import load_image
    from lumina_lightning.modules.unicap import generate_captions, load_processor, load_vlm
    from test_unicap_helpers import tiny_vlm
    from training_utils import tiny_synthetic

    plain = Path(tiny_vlm())
    instruct = tmp_path / "instruct"
    shutil.copytree(plain, instruct)
    gen = json.loads((instruct / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=0.01, top_p=0.001, top_k=1, repetition_penalty=1.5)
    (instruct / "generation_config.json").write_text(json.dumps(gen))
    img = load_image(str(tiny_synthetic() / "images" / "train_000000.png"))

    def captions(path, **kw):
        proc, model = load_processor(str(path)), load_vlm(str(path)).eval()
        out = []
        for seed in range(4):
            torch.manual_seed(seed)
            out.append(generate_captions(model, proc, [img], ["Describe this image."], max_new_tokens=10, **kw)[0])
        return out

    sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, repetition_penalty=1.0)
    sampled = captions(instruct, **sampling)
    assert len(set(sampled)) > 1, sampled  # top_k=1 from the file would make every sample the same
    # generate() merges its kwargs into the file's config: the recipe's 1.0 must be passed to undo 1.5
    proc, model = load_processor(str(instruct)), load_vlm(str(instruct)).eval()
    seen = {}
    generate = model.generate
    model.generate = lambda **kw: seen.update(kw) or generate(**kw)
    generate_captions(model, proc, [img], ["Describe this image."], max_new_tokens=2, **sampling)
    assert seen["repetition_penalty"] == 1.0 and seen["top_k"] == 0
