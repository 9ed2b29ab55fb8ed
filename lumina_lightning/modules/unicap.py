"""``UniCapModule``: fine-tunes an image-text-to-text VLM (Qwen2-VL / Qwen2.5-VL family) as a captioner.

UniCap (spec §7) re-captions images with hierarchical, multi-granularity, multilingual captions; its
weights were never released, so this module fine-tunes one from an open VLM:

* the model and processor are loaded from a local folder through transformers' Auto classes
  (``AutoModelForImageTextToText`` / ``AutoProcessor``), so any image-text-to-text model with a chat
  template works; Qwen2-VL is what the tiny recipe and the tests build;
* full fine-tuning, optionally with the vision tower and/or the language model frozen (the
  vision→text projector stays trainable unless asked otherwise), or LoRA adapters through peft;
  gradient checkpointing; bf16 through the Trainer precision; the same strategies as the
  generation module (DDP, FSDP2, FSDP1, DeepSpeed ZeRO-2/3), wrapping the model's own
  ``_no_split_modules`` (decoder layers, vision blocks);
* the loss is the model's causal-LM loss on answer tokens only (see ``unicap_data``);
* validation: the caption loss on held-out records, a few generated captions logged as text
  (MLflow artifacts and ``<output_dir>/captions/``), and the attribute accuracy of generated
  captions against the synthetic generator's metadata when the records carry it
  (``unicap_eval``).

The export folder (:func:`export_captioner`) is what ``lumina caption --model`` reads: a
transformers ``save_pretrained`` folder (or a LoRA adapter + its base path) with the processor
files and ``unicap.json`` (the instruction table and generation defaults).
"""

from __future__ import annotations

import importlib.util
import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch

from lumina_lightning.data.records import Record
from lumina_lightning.data.skips import BadSample, SkipCounter
from lumina_lightning.modules.steplog import log_step_rates, log_validation, step_started
from lumina_lightning.modules.unicap_data import (
    IGNORE_INDEX,
    PROMPT_TOO_LONG,
    InstructionTable,
    UniCapCollator,
    UniCapDataset,
    model_inputs,
    resize_max_side,
)

log = logging.getLogger(__name__)

__all__ = [
    "UNICAP_META",
    "DTYPES",
    "load_processor",
    "load_vlm",
    "vision_and_language_parts",
    "configure_trainable",
    "trainable_summary",
    "wrap_classes",
    "Captioner",
    "load_captioner",
    "generate_captions",
    "answer_loss",
    "export_captioner",
    "UniCapModule",
]

UNICAP_META = "unicap.json"  # written into every export folder
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# names under which VLMs keep their parts (Qwen2-VL: model.visual / model.language_model / lm_head;
# LLaVA-style: vision_tower / multi_modal_projector / language_model)
_VISION_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder", "image_encoder")
_PROJECTOR_NAMES = ("merger", "multi_modal_projector", "mm_projector", "connector", "projector")
_LANGUAGE_NAMES = ("language_model", "text_model", "lm_head", "embed_tokens")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


def load_processor(path: str | os.PathLike) -> Any:
    """``AutoProcessor.from_pretrained(path)``, also where torchvision is missing.

    transformers 5 builds Qwen2-VL-style processors with a video processor that needs torchvision
    even when only images are processed. Without torchvision the same processor class is assembled
    from the tokenizer, the (PIL-backend) image processor and the chat template, with no video
    processor — captioning never passes videos.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(path))
    except ImportError as err:
        if importlib.util.find_spec("torchvision") is not None or "orchvision" not in str(err):
            raise
        return _image_only_processor(Path(path))


def _image_only_processor(path: Path) -> Any:
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    name = None
    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = path / fname
        if f.is_file():
            name = json.loads(f.read_text()).get("processor_class") or name
            if name:
                break
    if not name or not hasattr(transformers, name):
        raise ImportError(f"{path}: cannot build its processor without torchvision (processor class {name!r} unknown)")
    base = getattr(transformers, name)

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        """The model's processor class with the video processor left out (no torchvision here)."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return type(None)
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnlyProcessor.__name__ = name
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    template = None
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text()
    elif (path / "chat_template.json").is_file():
        template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
    template = template or getattr(tokenizer, "chat_template", None)
    kwargs: dict[str, Any] = {"image_processor": AutoImageProcessor.from_pretrained(str(path)), "tokenizer": tokenizer,
                              "chat_template": template}
    import inspect

    if "video_processor" in inspect.signature(base.__init__).parameters:
        kwargs["video_processor"] = None
    return ImageOnlyProcessor(**kwargs)


def load_vlm(path: str | os.PathLike, *, dtype: str = "fp32", attn_implementation: str | None = None) -> Any:
    """``AutoModelForImageTextToText.from_pretrained`` from a local folder (never downloads)."""
    from transformers import AutoModelForImageTextToText

    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path {path} is not a local model folder")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)


# ------------------------------------------------------------------------------------------------
# what trains
# ------------------------------------------------------------------------------------------------


def vision_and_language_parts(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter names of the vision tower, the projector and the language model (incl. embeddings/head).

    Resolved by the submodule names transformers uses for VLMs; the projector is matched first, so
    Qwen2-VL's ``visual.merger`` counts as projector, not vision tower. Parameters that fit none of
    the groups are ``other``.
    """
    parts: dict[str, list[str]] = {"vision": [], "projector": [], "language": [], "other": []}
    for name, _ in model.named_parameters():
        pieces = name.split(".")
        if any(p in _PROJECTOR_NAMES for p in pieces):
            parts["projector"].append(name)
        elif any(p in _VISION_NAMES for p in pieces):
            parts["vision"].append(name)
        elif any(p in _LANGUAGE_NAMES for p in pieces):
            parts["language"].append(name)
        else:
            parts["other"].append(name)
    return parts


def configure_trainable(model: torch.nn.Module, mcfg: Any) -> torch.nn.Module:
    """Apply the recipe's freezing or LoRA choice; returns the model to train (a ``PeftModel`` with LoRA).

    * full fine-tuning: every parameter trains, except the vision tower with
      ``freeze_vision_tower`` and the language model (embeddings and head included) with
      ``freeze_language_model``; the projector follows ``train_projector``;
    * LoRA (``lora.enabled``): the base model is frozen and adapters are added to
      ``lora.target_modules``; ``lora.modules_to_save`` lists modules trained in full next to them.
    """
    lora = mcfg.lora
    if lora.enabled:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, modules_to_save=list(lora.modules_to_save) or None,
                            bias="none")
        model = get_peft_model(model, config)
        log.info("LoRA: the base model is frozen (model.freeze_* and train_projector do not apply); modules "
                 "trained in full: %s", list(lora.modules_to_save) or "none (set lora.modules_to_save, e.g. [merger])")
        return model
    parts = vision_and_language_parts(model)
    frozen = set()
    if mcfg.freeze_vision_tower:
        frozen.update(parts["vision"])
    if mcfg.freeze_language_model:
        frozen.update(parts["language"])
    if not mcfg.train_projector:
        frozen.update(parts["projector"])
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing left to train: every parameter is frozen (check model.freeze_* / train_projector)")
    return model


def trainable_summary(model: torch.nn.Module) -> dict[str, int]:
    """Trainable / total parameter counts, overall and per part (for logs, MLflow and tests)."""
    named = dict(model.named_parameters())
    parts = vision_and_language_parts(model)
    out = {"total": sum(p.numel() for p in named.values()),
           "trainable": sum(p.numel() for p in named.values() if p.requires_grad)}
    for part, names in parts.items():
        out[f"trainable_{part}"] = sum(named[n].numel() for n in names if named[n].requires_grad)
    return out


def wrap_classes(model: torch.nn.Module) -> set[type]:
    """The module classes to shard/wrap one by one: the model's ``_no_split_modules`` (decoder layers,
    vision blocks), found on the model and its sub-models."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "token") -> torch.Tensor:
    """Next-token cross-entropy on the label positions that are not -100.

    ``logits[:, t]`` predicts ``labels[:, t + 1]`` (transformers' convention: labels are aligned with
    the inputs and shifted here). ``token`` = mean over all answer tokens of the batch; ``sample`` =
    mean over samples of each sample's mean (samples without answer tokens are left out).
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                  shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                                  reduction="none").view(shift_labels.shape)
    mask = (shift_labels != IGNORE_INDEX).to(per_token.dtype)
    if reduction == "token":
        return (per_token * mask).sum() / mask.sum().clamp_min(1.0)
    counts = mask.sum(1)
    has = counts > 0
    per_sample = (per_token * mask).sum(1)[has] / counts[has]
    return per_sample.mean() if per_sample.numel() else per_token.sum() * 0.0


# ------------------------------------------------------------------------------------------------
# generation and the export folder
# ------------------------------------------------------------------------------------------------


@dataclass
class Captioner:
    """A loaded captioner: model + processor + the instructions it was trained with."""

    model: Any
    processor: Any
    table: InstructionTable
    system: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    max_image_side: int | None = None
    path: str = ""
    base_path: str | None = None  # the base model folder of a LoRA adapter export

    def caption(self, images: Sequence[Any], level: str, **generation: Any) -> list[str]:
        """Captions of ``images`` (PIL) at caption ``level`` (see :func:`generate_captions`)."""
        instruction = self.table.instruction(level)
        images = [resize_max_side(img, self.max_image_side) for img in images]
        settings = {**self.generation, **{k: v for k, v in generation.items() if v is not None}}
        return generate_captions(self.model, self.processor, images, [instruction] * len(images),
                                 system=self.system, **settings)


def _eos_ids(model: Any, processor: Any) -> list[int]:
    """Token ids that end an answer: the generation config's EOS plus the chat template's end-of-turn."""
    from lumina_lightning.modules.unicap_data import answer_suffix

    tok = getattr(processor, "tokenizer", processor)
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.extend(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    suffix_ids = tok(answer_suffix(processor), add_special_tokens=False)["input_ids"]
    if len(suffix_ids) == 1:
        ids.append(int(suffix_ids[0]))
    if tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    return sorted(set(int(i) for i in ids))


@torch.no_grad()
def generate_captions(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    instructions: Sequence[str],
    *,
    system: str | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
    synced_gpus: bool = False,
    autocast: Any = None,
) -> list[str]:
    """Generate one answer per (image, instruction) with left-padded batched ``generate``.

    Greedy unless ``do_sample``; the model is put in eval mode for the call and restored after.
    ``synced_gpus`` keeps sharded ranks (ZeRO-3, FSDP) stepping together; ``autocast`` is a context
    manager factory wrapped around the call (the Trainer's precision context during training).
    """
    if not images:
        return []
    collator = UniCapCollator(processor, system=system, train=False)
    batch = collator([{"image": img, "instruction": ins} for img, ins in zip(images, instructions)])
    device = next(model.parameters()).device
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in model_inputs(batch).items()}
    tok = collator.tokenizer
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample),
                              "num_beams": int(num_beams), "pad_token_id": collator.pad_id,
                              "eos_token_id": _eos_ids(model, processor)}
    # Every knob is passed explicitly: generate() merges kwargs into the checkpoint's
    # generation_config.json, and Qwen2-VL-Instruct ships top_k=1 / top_p=0.001 (which would make
    # "sampling" greedy) and Qwen2.5-VL repetition_penalty=1.05 (which a recipe's 1.0 must undo).
    if do_sample:
        kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)  # top_k 0 = no top-k cut
    else:
        # greedy: silence the "temperature is set but do_sample=False" warnings of Instruct configs
        kwargs.update(temperature=None, top_p=None, top_k=None)
    kwargs["repetition_penalty"] = float(repetition_penalty)
    if synced_gpus:
        kwargs["synced_gpus"] = True
    was_training = model.training
    model.eval()
    try:
        ctx = autocast() if autocast is not None else contextlib.nullcontext()
        with ctx, _unit_params_whole(model):
            out = model.generate(**inputs, **kwargs)
    finally:
        model.train(was_training)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


def _unit_params_whole(model: Any) -> Any:
    """A context in which a sharded model's own (root-unit) parameters are whole; a no-op for others.

    ``generate`` is the wrapped model's method: it calls that model's forward, not the FSDP1 unit's,
    and transformers runs the vision encoder before any forward at all (the multimodal encoder
    outputs are prepared up front), so the unit's own parameters (embeddings, lm_head, the vision
    patch embedding and merger) would stay shards on 2+ ranks: flat 1-D views under FSDP1, DTensors
    under FSDP2 (where a ``PeftModel`` root's hooks never run either). They are gathered for the
    call (every rank takes part, as in validation); the decoder-layer and vision-block units inside
    gather theirs in their own forwards.
    """
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False)
    if isinstance(model, FSDPModule):
        return _fsdp2_unsharded(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp2_unsharded(model: Any) -> Any:
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


# a model's own files: an adapter folder must not hold them, or transformers takes it for a full model
_MODEL_FILES = ("config.json", "generation_config.json")


def _copy_side_files(src: Path, dst: Path, *, skip: Sequence[str] = ()) -> None:
    """Copy the processor/tokenizer/template files of ``src`` that ``dst`` lacks (never weights, nor ``skip``)."""
    if not src.is_dir():
        return
    for f in src.iterdir():
        if not f.is_file() or f.name.endswith(_WEIGHT_SUFFIXES) or f.name.endswith(".index.json") or f.name in skip:
            continue
        target = dst / f.name
        if not target.exists():
            shutil.copy2(f, target)


def export_captioner(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    *,
    source_path: str | os.PathLike,
    recipe: Any,
    table: InstructionTable,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the captioner folder ``lumina caption --model`` reads.

    * full fine-tuning: ``save_pretrained`` of the model (``state_dict`` = the gathered full
      weights under sharded strategies);
    * LoRA: the adapter (``adapter_config.json`` + weights, base = ``source_path``), or — with
      ``lora.merge_on_export`` — the merged full model, built from the base on CPU;
    * in every case the processor files of ``source_path`` and :data:`UNICAP_META`.
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mcfg = recipe.model
    fmt = "full"
    if mcfg.lora.enabled and _in_fsdp1_units(model):
        model, state_dict = _peft_copy(source_path, mcfg, state_dict), None
    if mcfg.lora.enabled and mcfg.lora.merge_on_export:
        merged = _merged_copy(model, source_path, mcfg, state_dict)
        merged.save_pretrained(tmp)
    elif mcfg.lora.enabled:
        fmt = "lora"
        model.save_pretrained(tmp, state_dict=state_dict)
        # the base as an absolute path: transformers / peft load the adapter folder from anywhere
        adapter_config = tmp / "adapter_config.json"
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = str(Path(source_path).resolve())
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    else:
        model.save_pretrained(tmp, state_dict=state_dict)
    # an adapter folder gets the processor files but not the base's config.json / generation_config.json:
    # with them, AutoModelForImageTextToText.from_pretrained(folder) looks for full weights and fails
    _copy_side_files(Path(source_path), tmp, skip=_MODEL_FILES if fmt == "lora" else ())
    meta = {
        "format": fmt,
        "base_model": str(Path(source_path).resolve()),
        "stage": recipe.stage,
        "system": recipe.data.system_prompt,
        "max_image_side": recipe.data.max_image_side,
        "generation": _generation_dict(recipe.generation),
        "level_weights": dict(recipe.data.level_weights),
        **table.to_dict(),
    }
    (tmp / UNICAP_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _in_fsdp1_units(model: torch.nn.Module) -> bool:
    return any("_fsdp_wrapped_module" in name for name, _ in model.named_modules())


def _peft_copy(source_path: str | os.PathLike, mcfg: Any, state_dict: dict[str, torch.Tensor] | None) -> Any:
    """The LoRA model rebuilt on CPU from the base and an FSDP1-wrapped one's gathered weights.

    peft picks the adapter weights out of a state dict by the module names of the model it is given
    and strips only a leading ``_fsdp_wrapped_module.``: under FSDP1's per-layer units (names such as
    ``layers.0._fsdp_wrapped_module.self_attn.q_proj.lora_A``) it found no adapter at all, and the
    export held the ``modules_to_save`` alone.
    """
    if state_dict is None:
        raise ValueError("exporting an FSDP1-wrapped LoRA model needs its gathered weights "
                         "(state_dict=full_state_dict(model), every rank taking part)")
    fresh = configure_trainable(load_vlm(source_path, dtype=mcfg.dtype, attn_implementation=mcfg.attn_implementation),
                                mcfg)
    fresh.load_state_dict(state_dict)
    return fresh


def _merged_copy(model: torch.nn.Module, source_path: str | os.PathLike, mcfg: Any,
                 state_dict: dict[str, torch.Tensor] | None) -> Any:
    """A merged full model from the base weights + the trained adapters, built on CPU."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    adapters = get_peft_model_state_dict(model, state_dict=state_dict)
    base = load_vlm(source_path, dtype=mcfg.dtype, attn_implementation=mcfg.attn_implementation)
    fresh = configure_trainable(base, mcfg)
    set_peft_model_state_dict(fresh, adapters)
    return fresh.merge_and_unload()


def _generation_dict(gen: Any) -> dict[str, Any]:
    return {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample, "temperature": gen.temperature,
            "top_p": gen.top_p, "num_beams": gen.num_beams, "repetition_penalty": gen.repetition_penalty}


def load_captioner(
    path: str | os.PathLike,
    *,
    device: str = "auto",
    dtype: str = "auto",
    base_model: str | None = None,
    attn_implementation: str | None = None,
) -> Captioner:
    """Load an export folder (full model or LoRA adapter + base), a run folder (its ``export/``), or
    any local image-text-to-text model folder (then the default instruction table is used).

    ``dtype`` ``auto`` = bf16 on CUDA, fp32 on CPU. A LoRA adapter is merged into its base for speed.
    """
    p = Path(path)
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file() and (p / "export").is_dir():
        p = p / "export"
    if not p.is_dir():
        raise FileNotFoundError(f"--model {path}: not a captioner folder")
    meta = json.loads((p / UNICAP_META).read_text()) if (p / UNICAP_META).is_file() else {}
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bf16" if str(device).startswith("cuda") else "fp32"
    if (p / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = base_model or meta.get("base_model")
        if not base_path:
            base_path = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_path or not Path(base_path).is_dir():
            raise FileNotFoundError(f"{p}: LoRA adapter whose base model {base_path!r} is not a local folder; "
                                    "pass --base-model")
        base = load_vlm(base_path, dtype=dtype, attn_implementation=attn_implementation)
        model = PeftModel.from_pretrained(base, str(p)).merge_and_unload()
        base_path = str(Path(base_path).resolve())
    else:
        base_path = None
        model = load_vlm(p, dtype=dtype, attn_implementation=attn_implementation)
    processor = load_processor(p)
    model.to(device).eval()
    table = InstructionTable(meta.get("instructions") or InstructionTable.from_config().instructions,
                             meta.get("language_template") or InstructionTable.from_config().language_template,
                             meta.get("languages"))
    return Captioner(model=model, processor=processor, table=table, system=meta.get("system"),
                     generation=dict(meta.get("generation") or {}), max_image_side=meta.get("max_image_side"),
                     path=str(p.resolve()), base_path=base_path)


# ------------------------------------------------------------------------------------------------
# the LightningModule
# ------------------------------------------------------------------------------------------------


class UniCapModule(pl.LightningModule):
    """Fine-tunes a VLM captioner from a validated ``UniCapRecipe`` (``training/unicap_config.py``).

    Args:
        recipe: the recipe.
        model, processor: already loaded ones (tests); default: loaded from ``recipe.model.path``.
        val_batches: collated validation batches (caption loss).
        eval_records: held-out records to caption at each validation (attribute accuracy when
            their ``meta`` has the synthetic generator's ``objects``; text logging either way).
        output_dir: the run folder (validation captions go to ``captions/``).
    """

    def __init__(
        self,
        recipe: Any,
        *,
        model: Any = None,
        processor: Any = None,
        val_batches: list[dict[str, Any]] | None = None,
        eval_records: Sequence[Record] | None = None,
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.recipe = recipe
        mcfg = recipe.model
        self.processor = processor if processor is not None else load_processor(mcfg.path)
        base = model if model is not None else load_vlm(mcfg.path, dtype=mcfg.dtype,
                                                        attn_implementation=mcfg.attn_implementation)
        self.model = configure_trainable(base, mcfg)
        # from_pretrained returns eval mode; training needs dropout (LoRA's included) active
        self.model.train()
        if mcfg.gradient_checkpointing:
            # non-reentrant: works with frozen inputs (LoRA, frozen embeddings) without input-grad hooks
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(self.model, "config"):
                self.model.config.use_cache = False
        self.table = InstructionTable.from_config(recipe.data.instructions, recipe.data.language_template)
        self.val_batches = val_batches or []
        self.eval_records = list(eval_records or [])
        self.unreadable_eval_images: set[str] = set()
        self.output_dir = Path(output_dir) if output_dir else None
        self.skips = SkipCounter()
        self.loss_history: list[float] = []
        self.val_history: list[dict[str, float]] = []
        self.last_validation: dict[str, float] = {}
        self.last_captions: list[dict[str, Any]] = []
        self.nonfinite_in_a_row = 0
        self._sharded = False
        self._pending_rng: tuple[Any, Any] | None = None  # RNG states of a loaded checkpoint, set at its first batch
        self._step_started: float | None = None
        self._batch_info: tuple[int, int] | None = None
        # checkpoints of LoRA / partly frozen runs hold only what trains (the rest is model.path)
        self.strict_loading = all(p.requires_grad for p in self.model.parameters())
        self._one_dim = {n for n, p in self.model.named_parameters() if p.ndim < 2}  # see configure_optimizers
        self.summary = trainable_summary(self.model)
        log.info("UniCap: %s trainable of %s parameters (vision %s, projector %s, language %s)",
                 f"{self.summary['trainable']:,}", f"{self.summary['total']:,}",
                 f"{self.summary['trainable_vision']:,}", f"{self.summary['trainable_projector']:,}",
                 f"{self.summary['trainable_language']:,}")

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """FSDP2 (``fsdp``): ``fully_shard`` every decoder layer / vision block, then the root."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        mesh = getattr(strategy, "_device_mesh", None) if strategy is not None else None
        if mesh is None or self._sharded:
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {"mesh": strategy.device_mesh["data_parallel"]}
        if "bf16" in str(self.recipe.trainer.precision):
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        classes = tuple(wrap_classes(self.model))
        for m in list(self.model.modules()):
            if classes and isinstance(m, classes):
                fully_shard(m, **kwargs)
        # the root too is resharded after a forward: validation and caption generation run no-grad
        # forwards, after which FSDP2 would otherwise keep the root's parameters (embeddings, lm_head) whole
        fully_shard(self.model, reshard_after_forward=True, **kwargs)
        self._sharded = True

    def configure_optimizers(self) -> Any:
        o = self.recipe.optim
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                # no weight decay on biases and norm scales (1-D), the usual AdamW practice; by the shapes
                # the model was built with: Lightning's FSDPStrategy (fsdp1) calls this after wrapping, when
                # on 2+ ranks every parameter is a 1-D view of its shard and would have gone undecayed
                (no_decay if _unwrapped_name(name) in self._one_dim else decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        from lumina_lightning.training.schedules import lambda_scheduler

        schedule = lambda_scheduler(optimizer, o, self.recipe.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        meta = batch.get("meta", {})
        for reason, example in meta.get("skipped", []):
            # a bad image was replaced by a substitute (one more sample seen); an over-long prompt
            # is a sample of this batch that trains nothing (already among the n below)
            self.skips.add(reason, example, seen=reason != PROMPT_TOO_LONG)
        n = len(meta.get("indices", [])) or int(batch["input_ids"].shape[0])
        self.skips.seen += n
        d = self.recipe.data
        self.skips.check(d.max_skip_rate, min_seen=d.skip_check_min_samples, where="unicap data")

        loss = self.compute_loss(batch)
        bad = self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss.detach())), all=False)
        if bad:
            self.nonfinite_in_a_row += 1
            limit = self.recipe.trainer.max_nonfinite_steps
            log.warning("non-finite loss at step %d: step skipped (%d in a row, limit %d)",
                        self.global_step, self.nonfinite_in_a_row, limit)
            if self.nonfinite_in_a_row >= limit:
                raise RuntimeError(f"{self.nonfinite_in_a_row} non-finite losses in a row; stopping "
                                   "(lower optim.lr or use 32-true precision to find the cause)")
            return None
        self.nonfinite_in_a_row = 0
        self.loss_history.append(float(loss.detach()))
        answer_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
        self._batch_info = (n, answer_tokens)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, batch_size=n)
        if self.skips.num_skipped:
            self.log("data/skipped", float(self.skips.num_skipped), on_step=True, rank_zero_only=True)
        return loss

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The answer-token loss of a batch, reduced per ``optim.loss_reduction``.

        ``token``: the model's own causal-LM loss, a mean over every answer token of the batch
        (long answers weigh more). ``sample``: each sample's mean token loss, then the mean over
        samples — so ``data.level_weights`` are the share of the loss each level gets.
        """
        inputs = model_inputs(batch)
        if self.recipe.optim.loss_reduction == "token":
            return self.model(**inputs).loss
        labels = inputs.pop("labels")
        logits = self.model(**inputs).logits
        return answer_loss(logits, labels, reduction="sample")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        from lumina_lightning.training.parallelize import clip_grad_norm, uses_deepspeed

        if uses_deepspeed(self.trainer.strategy):
            # DeepSpeed clips inside its engine (the Trainer's gradient_clip_val is set for it)
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        total = clip_grad_norm(self, list(self.model.parameters()), self.recipe.optim.grad_clip)
        if total is not None:
            self.log("train/grad_norm", total.detach().float(), on_step=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._restore_rng()
        self._step_started = step_started(self)  # also notes the LR this step uses, for train/lr
        self._step_at_start = self.global_step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if outputs is None:
            return
        log_step_rates(self, self._step_started, self._batch_info, "answer_tokens_per_s")
        # whether this batch ended an optimizer step: (batch_idx + 1) % accumulate misses the step that
        # Lightning takes on an epoch's last, incomplete window
        stepped = self.global_step != getattr(self, "_step_at_start", self.global_step)
        v = self.recipe.validation
        step = self.global_step
        last = step >= self.trainer.max_steps
        if stepped and (last or (v.every_n_steps and step % v.every_n_steps == 0)):
            self.run_validation()

    # ------------------------------------------------------------------------------------------
    # validation: caption loss, generated captions (text), attribute accuracy
    # ------------------------------------------------------------------------------------------
    def _autocast(self) -> Any:
        trainer = self._trainer
        if trainer is None:
            return None
        return trainer.precision_plugin.forward_context

    def _synced(self) -> bool:
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return False
        name = self.recipe.trainer.strategy
        return name in ("fsdp", "fsdp1", "deepspeed_stage_3")

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Mean answer-token loss over the fixed validation batches (token-weighted)."""
        if not self.val_batches:
            return None
        was_training = self.model.training
        self.model.eval()
        total, tokens = 0.0, 0
        ctx = self._autocast()
        try:
            for batch in self.val_batches:
                inputs = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
                          for k, v in model_inputs(batch).items()}
                with (ctx() if ctx else contextlib.nullcontext()):
                    loss = self.model(**inputs).loss
                n = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
                total += float(loss) * n
                tokens += n
        finally:
            self.model.train(was_training)
        return total / max(tokens, 1)

    @torch.no_grad()
    def caption_records(self, records: Sequence[Record], level: str,
                        batch_size: int | None = None) -> tuple[list[Record], list[str]]:
        """Greedy/sampled captions (``recipe.generation``) of ``records`` at ``level``.

        Returns the records that were captioned and their captions: an unreadable held-out image is
        named in a warning (once) and left out, never failing the run at its last validation, which
        comes after all the training and before the export.
        """
        from lumina_lightning.data.images import load_image

        bs = batch_size or self.recipe.validation.batch_size
        instruction = self.table.instruction(level)
        kept: list[Record] = []
        images: list[Any] = []
        for r in records:
            try:
                images.append(resize_max_side(load_image(r.image), self.recipe.data.max_image_side))
            except BadSample as err:
                if r.image not in self.unreadable_eval_images:
                    self.unreadable_eval_images.add(r.image)
                    log.warning("validation: leaving out %s (%s)", r.image, err)
                continue
            kept.append(r)
        out: list[str] = []
        for start in range(0, len(images), bs):
            chunk = images[start:start + bs]
            out.extend(generate_captions(
                self.model, self.processor, chunk, [instruction] * len(chunk), system=self.recipe.data.system_prompt,
                synced_gpus=self._synced(), autocast=self._autocast(), **_generation_dict(self.recipe.generation)))
        return kept, out

    def run_validation(self) -> dict[str, float]:
        """Caption loss + generated captions of the held-out records; logs metrics and text."""
        from lumina_lightning.modules.unicap_eval import attribute_accuracy

        v = self.recipe.validation
        results: dict[str, float] = {}
        loss = self.validation_loss()
        if loss is not None:
            results["val/loss"] = loss
        records = self.eval_records[: v.eval_samples]
        captions: list[dict[str, Any]] = []
        if records:
            records, generated = self.caption_records(records, v.eval_level)
            for r, text in zip(records, generated):
                captions.append({"image": r.image, "level": v.eval_level, "generated": text,
                                 "reference": r.captions.get(v.eval_level, "")})
            scored = [(text, r.meta) for text, r in zip(generated, records) if r.meta.get("objects")]
            if scored:
                acc = attribute_accuracy(scored, level=v.eval_level)
                for key in ("color", "shape", "count", "binding", "all"):
                    results[f"val/acc_{key}"] = acc[key]
            shown = records[: v.n_captions]
            for level in v.levels:
                if level == v.eval_level or not self.table.has(level):
                    continue
                for r, text in zip(*self.caption_records(shown, level)):
                    captions.append({"image": r.image, "level": level, "generated": text,
                                     "reference": r.captions.get(level, "")})
        if self._trainer is not None and self.trainer.training:
            log_validation(self, results)
        elif self._trainer is not None and self.trainer.is_global_zero:
            # after fit (e.g. a max_time stop): Lightning's self.log is closed, log to the loggers directly
            for lg in self.loggers:
                lg.log_metrics(dict(results), step=self.global_step)
        results["step"] = float(self.global_step)
        self.last_validation = results
        self.val_history.append(dict(results))
        self.last_captions = captions
        if captions and self.trainer.is_global_zero:
            self._write_captions(captions, v.n_captions)
        return results

    def _write_captions(self, captions: list[dict[str, Any]], n_show: int) -> None:
        shown = [c for c in captions if c["level"] != self.recipe.validation.eval_level] + \
            [c for c in captions if c["level"] == self.recipe.validation.eval_level][:n_show]
        lines = [f"step {self.global_step}"]
        for c in sorted(shown, key=lambda c: (c["image"], c["level"])):
            lines.append(f"\n[{Path(c['image']).name}] {c['level']}\n  generated: {c['generated']}\n"
                         f"  reference: {c['reference']}")
        text = "\n".join(lines) + "\n"
        name = f"captions/step_{self.global_step:07d}.txt"
        if self.output_dir is not None:
            (self.output_dir / "captions").mkdir(parents=True, exist_ok=True)
            (self.output_dir / name).write_text(text)
        for lg in self.loggers:
            if hasattr(lg, "experiment") and getattr(lg, "run_id", None):
                lg.experiment.log_text(lg.run_id, text, name)

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lumina_lightning.training.parallelize import uses_deepspeed, uses_fsdp1

        checkpoint["unicap_skips"] = self.skips.state_dict()
        checkpoint["unicap_source"] = str(Path(self.recipe.model.path).resolve())
        # dropout (LoRA's included) draws from these: a resumed run continues the straight run's streams
        checkpoint["lumina_torch_rng"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["lumina_cuda_rng"] = torch.cuda.get_rng_state()
        state = checkpoint.get("state_dict")
        # FSDP1 checkpoints keep every key too: Lightning loads them with torch.distributed.checkpoint, which
        # fails on any key the model has and the checkpoint lacks (a LoRA run could not resume)
        strategy = self.trainer.strategy
        if self._sharded or state is None or uses_deepspeed(strategy) or uses_fsdp1(strategy):
            return
        # frozen weights are model.path's, unchanged: leave them out (a LoRA checkpoint is MBs, not GBs)
        frozen = {f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad}
        for key in [k for k in state if k in frozen]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        source = checkpoint.get("unicap_source")
        if source is not None:
            now = Path(self.recipe.model.path).resolve()
            if Path(source).resolve() != now:
                # frozen weights are not in the checkpoint (LoRA, frozen parts): they would come from
                # another model, and the trained ones would be applied to it
                raise ValueError(f"the checkpoint was trained from model.path {source}, this run's model.path is "
                                 f"{now}; resume with the model it was trained from (or start a new run)")
        if "unicap_skips" in checkpoint:
            self.skips.load_state_dict(checkpoint["unicap_skips"])
        # applied at the first training batch: the data loader's iterator, created after the restore,
        # draws a seed from the torch RNG where the straight run drew none
        self._pending_rng = (checkpoint.get("lumina_torch_rng"), checkpoint.get("lumina_cuda_rng"))

    def _restore_rng(self) -> None:
        pending, self._pending_rng = getattr(self, "_pending_rng", None), None
        if pending is None:
            return
        cpu, cuda = pending
        if cpu is not None:
            torch.set_rng_state(cpu)
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)


def _unwrapped_name(name: str) -> str:
    """A parameter name without the FSDP1 wrappers' ``_fsdp_wrapped_module.`` pieces (as built)."""
    return name.replace("_fsdp_wrapped_module.", "")


def build_val_batches(records: Sequence[Record], processor: Any, table: InstructionTable,
                      recipe: Any) -> list[dict[str, Any]]:
    """Fixed validation batches (levels drawn with the validation seed) for the caption loss."""
    d = recipe.data
    ds = UniCapDataset(records, table, level_weights=d.level_weights, seed=recipe.validation.seed,
                       max_image_side=d.max_image_side)
    collate = UniCapCollator(processor, system=d.system_prompt, max_length=d.max_length, train=True)
    batches = []
    for start in range(0, len(ds), d.batch_size):
        batches.append(collate([ds[i] for i in range(start, min(len(ds), start + d.batch_size))]))
    return batches

