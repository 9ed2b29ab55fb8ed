"""A tiny Qwen2-VL captioner built offline: random weights, a BPE tokenizer trained on the spot.

Used by the UniCap tests and ``recipes/tiny/unicap_finetune.yaml``: the same loading code as a real
Qwen2-VL checkpoint (``AutoModelForImageTextToText`` / ``AutoProcessor`` on a local folder), no
download. The folder holds what a Hub checkpoint holds:

* ``config.json`` + ``model.safetensors`` (``Qwen2VLForConditionalGeneration``, ~0.3M parameters),
* ``tokenizer.json`` / ``tokenizer_config.json`` (byte-level BPE with Qwen's special tokens),
* ``chat_template.jinja`` (Qwen's ChatML layout, without the default system turn to keep
  sequences short on CPU),
* ``preprocessor_config.json`` (Qwen2-VL image processor with a small patch so a 64 px image is
  8×8 patches → 16 merged image tokens), ``video_preprocessor_config.json`` and
  ``processor_config.json``, so ``AutoProcessor`` builds a ``Qwen2VLProcessor`` wherever
  torchvision is installed (elsewhere :func:`lumina_lightning.modules.unicap.load_processor`
  builds it without the video part).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

__all__ = ["QWEN_SPECIAL_TOKENS", "TINY_CHAT_TEMPLATE", "tiny_corpus", "build_tiny_vlm", "ensure_tiny_vlm"]

# Qwen2-VL's special tokens (same strings, so processor code that looks them up by name works).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)

# Qwen2-VL's ChatML template, minus the implicit "You are a helpful assistant." system turn.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_corpus(n_scenes: int = 1500, seed: int = 0) -> list[str]:
    """Text the tiny tokenizer is trained on: synthetic-dataset captions (every level) + instructions.

    Captions come from the synthetic generator's own caption code on sampled (not rendered) scenes,
    so every caption word is a single or a few BPE tokens.
    """
    import numpy as np

    from lumina_lightning.data.synth import TAGS, sample_scene, scene_captions
    from lumina_lightning.modules.unicap_data import DEFAULT_INSTRUCTIONS, LANGUAGES

    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for i in range(n_scenes):
        scene = sample_scene(rng, TAGS[i % len(TAGS)], 64, 64, shapes=("circle", "square", "triangle", "cross"))
        texts.extend(scene_captions(scene).values())
    for value in DEFAULT_INSTRUCTIONS.values():
        texts.extend([value] if isinstance(value, str) else value)
    texts.extend(f"Answer in {name}." for name in LANGUAGES.values())
    return texts


def _build_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level like Qwen's tokenizer: any text (German, emoji) encodes, nothing becomes <unk>.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    # Qwen2-VL-Instruct: pad = <|endoftext|>, eos = <|im_end|> (the end of an assistant turn), no BOS.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_vlm(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_embed_dim: int = 64,
    vision_depth: int = 2,
    vision_heads: int = 4,
    patch_size: int = 8,
    image_size: int = 64,
    vocab_size: int = 512,
    seed: int = 0,
) -> str:
    """Write a tiny random Qwen2-VL captioner (model, tokenizer, processor files) to ``out_dir``.

    Images are resized to ``image_size``² pixels (min = max pixels), i.e. ``(image_size /
    patch_size)²`` patches and a quarter as many LLM image tokens (2×2 merge, as Qwen2-VL).

    Returns:
        ``out_dir`` as a string.
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if image_size % (2 * patch_size):
        raise ValueError(f"image_size ({image_size}) must be a multiple of 2 x patch_size ({patch_size})")
    if hidden_size % num_heads or (hidden_size // num_heads) % 4:
        raise ValueError(f"hidden_size/num_heads ({hidden_size}/{num_heads}) must be a multiple of 4 (M-RoPE)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(tiny_corpus(seed=seed), vocab_size)
    tokenizer.save_pretrained(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}

    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                               min_pixels=pixels, max_pixels=pixels)
    image_processor.save_pretrained(out)
    # Written by hand: Qwen2VLVideoProcessor needs torchvision to be instantiated, but the file lets
    # AutoProcessor assemble the full Qwen2VLProcessor wherever torchvision exists.
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": patch_size, "merge_size": 2,
             "temporal_patch_size": 2, "size": {"shortest_edge": pixels, "longest_edge": pixels},
             "image_mean": list(image_processor.image_mean), "image_std": list(image_processor.image_std)}
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}, indent=2) + "\n")

    head_dim = hidden_size // num_heads
    # M-RoPE splits head_dim/2 rotary frequencies into (temporal, height, width) sections.
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
            "num_key_value_heads": max(1, num_heads // 2), "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": vision_depth, "embed_dim": vision_embed_dim, "hidden_size": hidden_size,
            "num_heads": vision_heads, "mlp_ratio": 2, "patch_size": patch_size, "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    return str(out)


def ensure_tiny_vlm(path: str | os.PathLike, **kwargs: Any) -> str:
    """Build the tiny VLM into ``path`` unless a model is already there; safe against concurrent callers.

    The folder is written under a temporary name and renamed into place, so a half-built folder is
    never mistaken for a model (a second process building at the same time simply loses the rename).
    """
    out = Path(path)
    if (out / "config.json").is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        build_tiny_vlm(tmp, **kwargs)
        try:
            tmp.rename(out)
        except OSError:  # someone else finished first
            if not (out / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
