"""The UniCap recipe schema (``task: unicap``): captioner fine-tuning, validated like generation recipes.

``load_recipe`` picks this schema when a recipe says ``task: unicap``; unknown keys and wrong types
are reported with the file and dotted key before anything loads, and :meth:`UniCapRecipe.check`
adds the semantic checks (choices, ranges, option combinations).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from lumina_lightning.training.config import TrackingSection
from lumina_lightning.training.schedules import SCHEDULES

STRATEGIES = ("auto", "ddp", "fsdp", "fsdp1", "deepspeed_stage_2", "deepspeed_stage_3")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true")
DTYPES = ("fp32", "bf16", "fp16")


# every q/k/v/o/gate/up/down projection outside the vision tower (``visual`` in Qwen2-VL / 2.5-VL)
LANGUAGE_MODEL_PROJECTIONS = r"^(?!.*\bvisual\b).*\.(q|k|v|o|gate|up|down)_proj$"


@dataclass
class LoraSection:
    """LoRA adapters through peft, instead of full fine-tuning.

    Attributes:
        enabled: train adapters only (the base model is frozen; ``model.freeze_*`` are ignored).
        r, alpha, dropout: LoRA rank, scaling numerator and dropout.
        target_modules: module names (suffixes) or one regex string (matched against whole module
            names). The default is the attention and MLP projections of the *language model*: a
            regex, not a list of names, because Qwen2.5-VL's vision blocks also name their MLP
            ``gate_proj``/``up_proj``/``down_proj`` and names alone would adapt the vision tower too.
            To adapt the vision tower, list its modules (Qwen2-VL: ``qkv``/``proj``/``fc1``/``fc2``).
        modules_to_save: modules trained in full next to the adapters (e.g. ``[merger]``).
        merge_on_export: export a merged full model instead of adapter + base path.
    """

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = LANGUAGE_MODEL_PROJECTIONS
    modules_to_save: list[str] = field(default_factory=list)
    merge_on_export: bool = False


@dataclass
class ModelSection:
    """The VLM to fine-tune.

    Attributes:
        path: a local transformers folder of an image-text-to-text model with its processor
            (e.g. Qwen2-VL-2B-Instruct); loaded with ``AutoModelForImageTextToText``/``AutoProcessor``.
        build_tiny: when ``path`` has no model yet, build the tiny offline Qwen2-VL there — arguments of
            :func:`lumina_lightning.modules.tiny_vlm.build_tiny_vlm` (``{}`` = its defaults).
        dtype: weight dtype at load (``fp32`` | ``bf16`` | ``fp16``). With ``bf16-mixed`` precision,
            FSDP keeps fp32 master weights only when loaded in fp32; DeepSpeed keeps its own.
        attn_implementation: ``sdpa`` | ``eager`` | ``flash_attention_2`` (null = transformers' default).
        freeze_vision_tower / freeze_language_model: full fine-tuning of the rest only.
        train_projector: keep the vision→text projector (Qwen2-VL's ``merger``) trainable even when
            the vision tower is frozen. Full fine-tuning only: with ``lora.enabled`` this and the
            ``freeze_*`` keys do not apply (the base model is frozen); list the projector in
            ``lora.modules_to_save`` (e.g. ``[merger]``) to train it next to the adapters.
        gradient_checkpointing: recompute activations in backward (transformers' non-reentrant mode).
    """

    path: str = "/models/Qwen2-VL-2B-Instruct"
    build_tiny: dict[str, Any] | None = None
    dtype: str = "bf16"
    attn_implementation: str | None = "sdpa"
    freeze_vision_tower: bool = False
    freeze_language_model: bool = False
    train_projector: bool = True
    gradient_checkpointing: bool = False
    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class DataSection:
    """Manifests and how their caption levels become instruction targets.

    Attributes:
        path: training manifest / data YAML / folder (``lumina_lightning.data.records.load_records``).
        root: base for relative image paths (default: the manifest's folder).
        val_path: held-out manifest: caption loss, logged captions and attribute accuracy.
        synthetic: generate the synthetic dataset into ``path``'s folder when ``path`` is missing
            (arguments of ``generate_synthetic``), as the tiny generation recipes do.
        batch_size: samples per rank per step.
        num_workers: decoding/processing worker processes per rank.
        level_weights: sampling weight per caption level (``{short: 2, long: 1, tags: 1}``); levels
            not listed are not trained; empty = uniform over every level with an instruction.
        instructions: level -> instruction (or list of paraphrases), merged over the defaults
            (``unicap_data.DEFAULT_INSTRUCTIONS``).
        language_template: instruction of a ``<level>_<lang>`` variant, from its base instruction.
        system_prompt: optional system turn of every conversation.
        max_length: longest sequence (prompt incl. image tokens + answer); answers are truncated.
        max_image_side: downscale images whose longer side exceeds this (bounds image tokens).
        val_samples: validation records used for the caption loss.
        max_skip_rate / skip_check_min_samples: stop when more than this fraction of samples is
            unusable, once this many were seen (unreadable images are replaced and counted).
    """

    path: str | None = None
    root: str | None = None
    val_path: str | None = None
    synthetic: dict[str, Any] | None = None
    batch_size: int = 8
    num_workers: int = 2
    level_weights: dict[str, float] = field(default_factory=dict)
    instructions: dict[str, Any] = field(default_factory=dict)
    language_template: str = "{instruction} Answer in {language}."
    system_prompt: str | None = None
    max_length: int = 2048
    max_image_side: int | None = None
    val_samples: int = 64
    max_skip_rate: float = 0.05
    skip_check_min_samples: int = 100


@dataclass
class OptimSection:
    """AdamW (no decay on 1-D parameters), linear warm-up, then constant or cosine to ``min_lr_ratio``.

    ``loss_reduction``: ``token`` = mean over every answer token of the batch (the model's own
    loss; long answers weigh more), ``sample`` = mean of per-sample means (each drawn level counts
    as much as ``data.level_weights`` say, however long its answers are).
    """

    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    loss_reduction: str = "token"


@dataclass
class GenerationSection:
    """Decoding settings of validation captions (and the defaults stored in the export for ``caption``)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    num_beams: int = 1
    repetition_penalty: float = 1.0


@dataclass
class ValidationSection:
    """Validation every ``every_n_steps`` optimizer steps (0 = only at the end; always at the end).

    Attributes:
        eval_samples: held-out records (from ``data.val_path``) captioned at ``eval_level``; their
            attribute accuracy is logged when they carry the synthetic generator's metadata.
        n_captions: how many of them are logged as text, also at every level of ``levels``.
        batch_size: generation batch size.
        seed: level draws of the validation-loss batches.
    """

    every_n_steps: int = 500
    eval_samples: int = 32
    eval_level: str = "short"
    n_captions: int = 4
    levels: list[str] = field(default_factory=lambda: ["short", "long", "tags"])
    batch_size: int = 16
    seed: int = 0


@dataclass
class TrainerSection:
    """Lightning Trainer settings (as in generation recipes; see ``training/config.py``).

    ``max_time`` (``"DD:HH:MM:SS"``) stops the run early, cleanly, with an export.
    """

    max_steps: int = 1000
    max_time: str | None = None
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "bf16-mixed"
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 1000
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 10
    enable_progress_bar: bool = True
    deterministic: bool = False
    num_threads: int | None = None
    find_unused_parameters: bool = False


@dataclass
class UniCapRecipe:
    """A whole UniCap fine-tuning recipe (``task: unicap``).

    Attributes:
        stage: run name (output folder, MLflow run name and ``stage`` tag).
        output_dir: checkpoints, resolved config, validation captions and ``export/`` (the captioner).
        resume: ``null`` | ``auto`` (the run's ``last.ckpt`` if any) | a checkpoint path.
    """

    task: str = "unicap"
    stage: str = "unicap"
    seed: int = 0
    output_dir: str = "runs/${stage}"
    resume: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def check(self) -> None:
        """Semantic checks that need no files; raises ``ValueError`` naming the key."""
        def choice(key: str, value: Any, options: tuple) -> None:
            if value not in options:
                close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"`{key}` = {value!r} is not one of {list(options)}{hint}")

        choice("task", self.task, ("unicap",))
        choice("model.dtype", self.model.dtype, DTYPES)
        choice("trainer.strategy", self.trainer.strategy, STRATEGIES)
        choice("trainer.precision", self.trainer.precision, PRECISIONS)
        choice("optim.schedule", self.optim.schedule, SCHEDULES)
        choice("optim.loss_reduction", self.optim.loss_reduction, ("token", "sample"))
        if not self.data.path:
            raise ValueError("`data.path` is required (a manifest, data YAML or image folder)")
        if self.data.batch_size < 1 or self.trainer.max_steps < 1:
            raise ValueError("`data.batch_size` and `trainer.max_steps` must be >= 1")
        if self.data.max_length < 16:
            raise ValueError(f"`data.max_length` must be >= 16, got {self.data.max_length}")
        for level, w in self.data.level_weights.items():
            if not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"`data.level_weights.{level}` must be a number >= 0, got {w!r}")
        if self.data.level_weights and not any(w > 0 for w in self.data.level_weights.values()):
            raise ValueError("`data.level_weights` needs at least one positive weight (or leave it empty)")
        for level, text in self.data.instructions.items():
            ok = isinstance(text, str) or (isinstance(text, list) and text and all(isinstance(t, str) for t in text))
            if not ok:
                raise ValueError(f"`data.instructions.{level}` must be a string or a non-empty list of strings")
        self._check_levels()
        if "{instruction}" not in self.data.language_template or "{language}" not in self.data.language_template:
            raise ValueError("`data.language_template` must contain {instruction} and {language}")
        if not 0.0 <= self.data.max_skip_rate <= 1.0:
            raise ValueError(f"`data.max_skip_rate` must be in [0, 1], got {self.data.max_skip_rate}")
        lora = self.model.lora
        if (lora.r < 1 or lora.alpha <= 0 or not 0.0 <= lora.dropout < 1.0):
            raise ValueError("`model.lora`: r >= 1, alpha > 0 and 0 <= dropout < 1 are required")
        if not isinstance(lora.target_modules, (str, list)) or not lora.target_modules:
            raise ValueError("`model.lora.target_modules` must be a non-empty list of names or a regex string")
        if not lora.enabled and self.model.freeze_vision_tower and self.model.freeze_language_model \
                and not self.model.train_projector:
            raise ValueError("every part is frozen (vision tower, language model and projector): nothing would train")
        if len(self.optim.betas) != 2:
            raise ValueError(f"`optim.betas` needs two numbers, got {self.optim.betas}")
        if not 0.0 <= self.optim.min_lr_ratio <= 1.0:
            raise ValueError("`optim.min_lr_ratio` must be in [0, 1]")
        g = self.generation
        if g.max_new_tokens < 1 or g.num_beams < 1 or g.temperature <= 0 or not 0.0 < g.top_p <= 1.0:
            raise ValueError("`generation`: max_new_tokens >= 1, num_beams >= 1, temperature > 0, 0 < top_p <= 1")
        v = self.validation
        if v.every_n_steps < 0 or v.eval_samples < 0 or v.n_captions < 0 or v.batch_size < 1:
            raise ValueError("`validation`: counts must be >= 0 and batch_size >= 1")
        if v.eval_samples and not self.data.val_path:
            raise ValueError("`validation.eval_samples` > 0 needs `data.val_path` (held-out records to caption)")
        if self.resume not in (None, "auto") and not str(self.resume):
            raise ValueError("`resume` must be null, 'auto' or a checkpoint path")

    def _check_levels(self) -> None:
        """Every caption level a recipe names must have an instruction (a typo would train or
        validate nothing for it: levels without an instruction are silently never drawn)."""
        from lumina_lightning.modules.unicap_data import InstructionTable

        table = InstructionTable.from_config(self.data.instructions, self.data.language_template)
        named = [("validation.eval_level", self.validation.eval_level)]
        named += [(f"validation.levels[{i}]", level) for i, level in enumerate(self.validation.levels)]
        named += [(f"data.level_weights.{level}", level) for level in self.data.level_weights]
        known = sorted(table.instructions)
        for key, level in named:
            if isinstance(level, str) and table.has(level):
                continue
            close = difflib.get_close_matches(str(level), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            languages = ", ".join(sorted(table.languages or {}))
            raise ValueError(
                f"`{key}` = {level!r} has no instruction{hint}: known levels are {known} and their "
                f"<level>_<lang> variants (lang one of {languages}, e.g. 'long_de'); "
                "add new levels to data.instructions"
            )
