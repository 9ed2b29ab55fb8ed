"""UniCap data: caption levels → instruction-conditioned targets, batches with answer-only labels.

Every caption level of a manifest record (``short``, ``medium``, ``long``, ``tags``, ``prompt``,
``caption``, and per-language variants such as ``long_de``) becomes one possible training target:

* the **instruction** comes from a table (:data:`DEFAULT_INSTRUCTIONS`, extended or overridden by
  the recipe); a level ``<base>_<lang>`` whose language code is in :data:`LANGUAGES` uses the
  instruction of ``<base>`` plus ``language_template`` ("… Answer in German.");
* which level a sample trains on is a weighted draw (``level_weights``) over the levels the record
  has, from a random stream keyed by ``(seed, epoch, record index)`` only — independent of workers,
  ranks and resumes, like the generation loader's caption choice;
* the **labels** are the answer tokens (plus the chat template's end-of-turn token, so the model
  learns to stop); the prompt (chat template, image tokens, instruction) and padding are -100.

The prompt is rendered by the processor's own chat template and tokenised by the processor (which
expands the image placeholder to the right number of image tokens); the answer is tokenised on its
own and appended, so the prompt/answer boundary is exact, with no re-tokenisation across it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from lumina_lightning.data.images import load_image
from lumina_lightning.data.records import Record
from lumina_lightning.data.skips import EMPTY_CAPTION, BadSample

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "DEFAULT_INSTRUCTIONS",
    "LANGUAGES",
    "DEFAULT_LANGUAGE_TEMPLATE",
    "InstructionTable",
    "level_rng",
    "choose_level",
    "UniCapDataset",
    "EpochShardSampler",
    "UniCapCollator",
    "answer_suffix",
    "prompt_text",
    "model_inputs",
    "resize_max_side",
]

IGNORE_INDEX = -100  # transformers' cross-entropy ignore value

# Caption level -> instruction (a list = paraphrases, one drawn per sample).
DEFAULT_INSTRUCTIONS: dict[str, str | list[str]] = {
    "short": "Describe this image in one short sentence.",
    "medium": "Describe this image in one sentence, including the background.",
    "long": "Describe this image in detail.",
    "dense": "Describe this image in detail.",
    "tags": "List tags for this image, separated by commas.",
    "prompt": "Write a text-to-image prompt for this image.",
    "caption": "Describe this image.",
}
# Language suffixes of caption levels (``long_de``) -> the language named in the instruction.
LANGUAGES: dict[str, str] = {
    "en": "English", "de": "German", "zh": "Chinese", "ja": "Japanese", "ru": "Russian", "fr": "French",
    "es": "Spanish", "it": "Italian", "ko": "Korean", "pt": "Portuguese",
}
DEFAULT_LANGUAGE_TEMPLATE = "{instruction} Answer in {language}."
_LEVEL_SALT = 0x0C47


@dataclass
class InstructionTable:
    """Instruction for each caption level (see the module docstring for per-language levels).

    Attributes:
        instructions: level -> instruction or list of paraphrases.
        language_template: how a language variant extends its base instruction; ``{instruction}``
            and ``{language}`` are filled in.
        languages: language code -> language name.
    """

    instructions: dict[str, str | list[str]]
    language_template: str = DEFAULT_LANGUAGE_TEMPLATE
    languages: dict[str, str] | None = None

    @classmethod
    def from_config(cls, overrides: Mapping[str, str | list[str]] | None = None,
                    language_template: str = DEFAULT_LANGUAGE_TEMPLATE) -> "InstructionTable":
        """The default table updated with ``overrides`` (a recipe's ``data.instructions``)."""
        table = dict(DEFAULT_INSTRUCTIONS)
        table.update(dict(overrides or {}))
        return cls(table, language_template, dict(LANGUAGES))

    def choices(self, level: str) -> list[str]:
        """Every instruction ``level`` may be trained with (empty when the level has none)."""
        value = self.instructions.get(level)
        if value is None:
            base, _, code = level.rpartition("_")
            language = (self.languages or LANGUAGES).get(code)
            if not base or language is None or base not in self.instructions:
                return []
            return [self.language_template.format(instruction=text, language=language)
                    for text in self.choices(base)]
        return [value] if isinstance(value, str) else [str(v) for v in value]

    def has(self, level: str) -> bool:
        return bool(self.choices(level))

    def instruction(self, level: str, rng: np.random.Generator | None = None) -> str:
        """The instruction for ``level`` (a paraphrase drawn with ``rng`` when there are several)."""
        options = self.choices(level)
        if not options:
            raise KeyError(f"no instruction for caption level {level!r}; add it to data.instructions")
        if len(options) == 1 or rng is None:
            return options[0]
        return options[int(rng.integers(len(options)))]

    def to_dict(self) -> dict[str, Any]:
        return {"instructions": dict(self.instructions), "language_template": self.language_template,
                "languages": dict(self.languages or LANGUAGES)}


def level_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample's level (and paraphrase) choice."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), int(index), _LEVEL_SALT])


def choose_level(
    captions: Mapping[str, str],
    weights: Mapping[str, float] | None,
    table: InstructionTable,
    rng: np.random.Generator,
) -> str | None:
    """Draw the level one sample trains on, or ``None`` when the record has no usable level.

    Usable = non-blank text and an instruction in ``table``. With ``weights``, only levels with a
    positive weight are candidates, drawn proportionally to their weights renormalised over the
    levels this record has; without weights, uniformly. Candidates are ordered by the weights
    mapping (else alphabetically), so the draw does not depend on the manifest's key order.
    """
    present = {lvl for lvl, text in captions.items() if isinstance(text, str) and text.strip() and table.has(lvl)}
    if weights:
        names = [lvl for lvl, w in weights.items() if lvl in present and float(w) > 0.0]
        probs = np.array([float(weights[lvl]) for lvl in names], dtype=np.float64)
    else:
        names = sorted(present)
        probs = np.ones(len(names), dtype=np.float64)
    if not names:
        return None
    u = rng.random()  # always drawn, so the paraphrase draw that follows uses the same stream position
    if len(names) == 1:
        return names[0]
    cdf = np.cumsum(probs / probs.sum())
    return names[min(int(np.searchsorted(cdf, u, side="right")), len(names) - 1)]


def resize_max_side(img: Any, max_side: int | None) -> Any:
    """Downscale a PIL image so its longer side is at most ``max_side`` (aspect kept; never upscales)."""
    if not max_side or max(img.size) <= max_side:
        return img
    from PIL import Image

    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, resample=Image.Resampling.BICUBIC)


class UniCapDataset(torch.utils.data.Dataset):
    """Records → ``{image, instruction, answer, level, index}`` samples (map-style).

    Keys are ``(epoch, index)`` pairs (from :class:`EpochShardSampler`) or plain indices (epoch 0).
    An unreadable image is replaced by the next record(s) (up to ``max_substitutes``), so batches
    keep their size on every rank; each replacement is reported in the sample's ``skipped`` list
    (reason, message) for the module's :class:`~lumina_lightning.data.skips.SkipCounter`.
    ``fixed_level`` trains every record on that one level instead of the weighted draw (records
    without it count as unusable).
    """

    def __init__(
        self,
        records: Sequence[Record],
        table: InstructionTable,
        *,
        level_weights: Mapping[str, float] | None = None,
        seed: int = 0,
        max_image_side: int | None = None,
        max_substitutes: int = 8,
        fixed_level: str | None = None,
    ) -> None:
        self.records = list(records)
        self.table = table
        self.level_weights = dict(level_weights or {})
        self.seed = int(seed)
        self.max_image_side = max_image_side
        self.max_substitutes = max_substitutes
        self.fixed_level = fixed_level

    def __len__(self) -> int:
        return len(self.records)

    def level_for(self, index: int, epoch: int = 0) -> tuple[str, str] | None:
        """``(level, instruction)`` record ``index`` trains on in ``epoch``, or ``None`` if it has none."""
        rec = self.records[index]
        rng = level_rng(self.seed, epoch, index)
        if self.fixed_level is not None:
            text = rec.captions.get(self.fixed_level, "")
            if not text.strip() or not self.table.has(self.fixed_level):
                return None
            level = self.fixed_level
        else:
            level = choose_level(rec.captions, self.level_weights, self.table, rng)
            if level is None:
                return None
        return level, self.table.instruction(level, rng)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        skipped: list[tuple[str, str]] = []
        n = len(self.records)
        for attempt in range(self.max_substitutes + 1):
            i = (int(index) + attempt) % n
            rec = self.records[i]
            choice = self.level_for(i, epoch)
            if choice is None:
                skipped.append((EMPTY_CAPTION, f"{rec.image}: no caption level with an instruction"))
                continue
            try:
                img = resize_max_side(load_image(rec.image), self.max_image_side)
            except BadSample as err:
                skipped.append((err.reason, str(err)))
                continue
            level, instruction = choice
            return {"image": img, "instruction": instruction, "answer": rec.captions[level].strip(),
                    "level": level, "index": i, "path": rec.image, "skipped": skipped}
        raise RuntimeError(
            f"{self.max_substitutes + 1} records in a row from index {index} are unusable "
            f"(e.g. {skipped[0][1] if skipped else '?'}); check the manifest"
        )


class EpochShardSampler(torch.utils.data.Sampler):
    """Shuffled ``(epoch, index)`` keys, a disjoint shard per rank, reshuffled every epoch.

    Lightning calls :meth:`set_epoch` at each epoch start. Every rank yields the same number of
    keys (the permutation is padded by wrapping), so collective ops stay in step.

    Stateful (the torchdata protocol): the state is the epoch and the position in it. Like the
    generation loader's global cursor, the position is one in the epoch's *global* permutation
    (rank ``r`` of ``W`` takes keys ``r, r + W, ...``; after every rank drew ``d`` keys the first
    ``d * W`` are consumed), so a checkpoint saved with ``W`` ranks resumes on ``W'`` ranks: the rest
    of the epoch is dealt out again over the new ranks, every remaining record exactly once (plus
    the wrap-around padding that keeps ranks equal).

    Epoch numbers after a resume: a run that stops at ``max_steps`` or ``max_time`` between periodic
    checkpoints saves ``last.ckpt`` with Lightning's epoch already counted as finished, although
    the data epoch is not — and each such stop adds one. So once a state is loaded, the sampler
    keeps its own epoch count: :meth:`set_epoch` then continues an unfinished epoch and starts
    the next one after a finished epoch, whatever number Lightning announces. (torchdata re-creates
    the iterator while restoring the loader — before Lightning's ``set_epoch`` without workers,
    after it with workers — so both orders are handled.) A sampler that was never loaded follows
    ``set_epoch`` as usual.

    Args:
        size: records; seed, shuffle: the permutation of each epoch.
        rank, world_size: this rank and the number of data-parallel ranks.
        batch_size, drop_last: the loader's per-rank batching; with ``drop_last`` a position at the
            last whole batch of an epoch counts as the end of that epoch.
    """

    def __init__(self, size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 batch_size: int = 1, drop_last: bool = False) -> None:
        if size <= 0:
            raise ValueError("no records to sample from")
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle
        self.batch_size, self.drop_last = max(1, int(batch_size)), bool(drop_last)
        self.epoch = 0
        self.base = 0  # keys of the epoch's permutation consumed before this segment (a resume on other ranks)
        self.drawn = 0  # keys of the current segment's shard handed out so far
        self._resume_at: int | None = None
        self._own_epochs = False  # True once a state is loaded: the epoch count is the sampler's own
        self._generation = 0

    def _segment_len(self) -> int:
        """Keys per rank from ``base`` to the end of the epoch."""
        return math.ceil(max(0, self.size - self.base) / self.world_size)

    def _usable(self) -> int:
        """Keys per rank of the current segment that make whole batches (all of them without drop_last)."""
        n = self._segment_len()
        return n - n % self.batch_size if self.drop_last else n

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.base, self.drawn, self._resume_at = int(epoch), 0, 0, None

    def set_epoch(self, epoch: int) -> None:
        if not self._own_epochs:
            # the epoch a restored state is in keeps its position: Lightning calls set_epoch again
            if int(epoch) != self.epoch:
                self._start_epoch(epoch)
            return
        # after a load: Lightning's number may be ahead of the data epoch (see the class docstring)
        if self.drawn >= self._usable() and self._resume_at is None:
            self._start_epoch(self.epoch + 1)

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        self._generation += 1
        generation = self._generation
        start, self._resume_at = (self._resume_at or 0), None
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 0x5EED]).permutation(self.size)
        else:
            order = np.arange(self.size)
        order = order[self.base:]
        n = self._segment_len()
        total = n * self.world_size
        order = np.resize(order, total) if len(order) else order  # wraps around: equal counts on every rank
        shard = order[self.rank:total:self.world_size]
        epoch = self.epoch
        self.drawn = start
        for i in shard[start:]:
            if generation != self._generation:
                return  # a newer iterator (or a state load) took over this sampler
            # count before yielding: torchdata snapshots the state right after a key is drawn
            self.drawn += 1
            yield (epoch, int(i))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "drawn": self.drawn, "base": self.base, "size": self.size, "seed": self.seed,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("size", self.size)) != self.size or int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"the data loader state in the checkpoint does not match this run: {state.get('size')} records "
                f"(seed {state.get('seed')}) then, {self.size} records (seed {self.seed}) now"
            )
        epoch, drawn, base = int(state["epoch"]), int(state["drawn"]), int(state.get("base", 0))
        saved_world = int(state.get("world_size", self.world_size))
        if saved_world != self.world_size:
            # every rank drew `drawn` keys of the interleaved shards: the first base + drawn * W of the
            # epoch's permutation are consumed; the rest is dealt out over the new ranks
            consumed = min(self.size, base + drawn * saved_world)
            log.info("data: %d rank(s) then, %d now: re-sharding the rest of epoch %d (%d of %d records left)",
                     saved_world, self.world_size, epoch, self.size - consumed, self.size)
            base, drawn = consumed, 0
        self.epoch, self.base, self.drawn = epoch, base, drawn
        if self.drawn >= self._usable():
            # saved at the last (whole) batch of an epoch: resume at the start of the next one
            self._start_epoch(self.epoch + 1)
        self._resume_at = self.drawn
        self._own_epochs = True
        self._generation += 1


def prompt_text(processor: Any, instruction: str, system: str | None = None) -> str:
    """The chat-template prompt (image first, then the instruction) ending where the answer starts."""
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]})
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answer_suffix(processor: Any) -> str:
    """What the chat template puts right after an assistant answer, e.g. ``<|im_end|>`` for Qwen.

    Found by rendering a conversation with a probe answer, so any chat template works; trailing
    whitespace (the newline between turns) is dropped because generation stops at the end-of-turn
    token. Falls back to the tokenizer's EOS token when the template does not render that way.
    """
    tok = getattr(processor, "tokenizer", processor)
    probe = "UNICAPPROBEANSWER"
    user = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    try:
        head = processor.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        reply = {"role": "assistant", "content": [{"type": "text", "text": probe}]}
        full = processor.apply_chat_template(user + [reply], tokenize=False)
        if full.startswith(head) and probe in full:
            suffix = full[full.index(probe, len(head)) + len(probe):].rstrip()
            if suffix:
                return suffix
    except Exception as err:  # a template that cannot render this probe: use EOS
        log.debug("answer_suffix: chat template probe failed (%s); using the EOS token", err)
    return tok.eos_token or ""


# a skip reason (plain string, like those of lumina_lightning.data.skips): the prompt alone fills max_length
PROMPT_TOO_LONG = "prompt_too_long"

# keys of a processor output that have one value per text token (spliced with the answer tokens)
_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class UniCapCollator:
    """Samples → a model batch; training batches carry ``labels`` (answer tokens only).

    Args:
        processor: the VLM's processor (chat template, tokenizer, image processor).
        system: optional system prompt.
        max_length: longest training sequence; the *answer* is truncated to fit (the prompt,
            with its image tokens, must stay whole).
        train: ``True`` → right padding + labels; ``False`` → left padding (for ``generate``).
    """

    def __init__(self, processor: Any, *, system: str | None = None, max_length: int = 2048,
                 train: bool = True) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.system = system
        self.max_length = max_length
        self.train = train
        self.suffix = answer_suffix(processor)
        self.end_ids = self.tokenizer(self.suffix, add_special_tokens=False)["input_ids"] if self.suffix else []
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    # -- pieces ------------------------------------------------------------------------------
    def encode_prompts(self, images: list[Any],
                       instructions: list[str]) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
        """Per-sample unpadded token rows of the prompts, and the batch-level image tensors."""
        texts = [prompt_text(self.processor, ins, self.system) for ins in instructions]
        enc = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        ids = enc["input_ids"]
        mask = enc.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        rows, extras = [], {}
        for key, value in enc.items():
            if key in _TOKEN_KEYS and isinstance(value, torch.Tensor) and value.shape == ids.shape:
                continue
            extras[key] = value
        for b in range(ids.shape[0]):
            keep = mask[b].bool()
            rows.append({key: enc[key][b][keep] for key in _TOKEN_KEYS
                         if key in enc and isinstance(enc[key], torch.Tensor) and enc[key].shape == ids.shape})
        return rows, extras

    def encode_answer(self, answer: str, room: int) -> torch.Tensor:
        """Token ids of ``answer`` + end-of-turn, truncated to ``room`` tokens (end-of-turn kept)."""
        body = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        end = self.end_ids
        room = max(len(end), room)
        if len(body) + len(end) > room:
            body = body[: room - len(end)]
        return torch.tensor(body + end, dtype=torch.long)

    def pad(self, rows: list[dict[str, torch.Tensor]], side: str) -> dict[str, torch.Tensor]:
        """Stack rows, padding with the pad id (ids), 0 (masks/types) and -100 (labels)."""
        length = max(r["input_ids"].numel() for r in rows)
        out: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            fill = self.pad_id if key == "input_ids" else (IGNORE_INDEX if key == "labels" else 0)
            dtype = rows[0][key].dtype
            stacked = torch.full((len(rows), length), fill, dtype=dtype)
            for b, r in enumerate(rows):
                n = r[key].numel()
                if side == "right":
                    stacked[b, :n] = r[key]
                else:
                    stacked[b, length - n:] = r[key]
            out[key] = stacked
        return out

    # -- batches -----------------------------------------------------------------------------
    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images = [s["image"] for s in samples]
        rows, extras = self.encode_prompts(images, [s["instruction"] for s in samples])
        too_long: list[tuple[str, str]] = []
        if self.train:
            for row, sample in zip(rows, samples):
                n_prompt = row["input_ids"].numel()
                if self.max_length - n_prompt <= len(self.end_ids):
                    # No room for one answer token: training it would teach "stop at once" on large
                    # images. It keeps its prompt, but no label, and is counted as a skip.
                    row["labels"] = torch.full((n_prompt,), IGNORE_INDEX, dtype=torch.long)
                    too_long.append((PROMPT_TOO_LONG, (
                        f"{sample.get('path', 'an image')}: its prompt, image tokens included, is {n_prompt} tokens, "
                        f"no room for the answer within data.max_length={self.max_length} (set data.max_image_side "
                        "or raise data.max_length)")))
                    continue
                answer = self.encode_answer(sample["answer"], self.max_length - n_prompt)
                zeros = torch.zeros(answer.numel(), dtype=row["input_ids"].dtype)
                # answer tokens: attended to (mask 1), text modality (type ids 0)
                appended = {"input_ids": answer, "attention_mask": torch.ones_like(zeros)}
                for key in list(row):
                    row[key] = torch.cat([row[key], appended.get(key, zeros).to(row[key].dtype)])
                row["labels"] = torch.cat([torch.full((n_prompt,), IGNORE_INDEX, dtype=torch.long), answer])
        batch: dict[str, Any] = dict(self.pad(rows, "right" if self.train else "left"))
        batch.update(extras)
        batch["meta"] = {
            "indices": [s.get("index") for s in samples],
            "levels": [s.get("level") for s in samples],
            "answers": [s.get("answer") for s in samples],
            "instructions": [s["instruction"] for s in samples],
            "skipped": [item for s in samples for item in s.get("skipped", [])] + too_long,
        }
        return batch


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors of a collated batch that go to the model (drops the ``meta`` bookkeeping)."""
    return {k: v for k, v in batch.items() if k != "meta"}
