"""The recipe schema: every key a training recipe may hold, typed, with defaults and their reasons.

A recipe YAML is validated against these dataclasses before anything loads (see ``recipe.py``).
Defaults follow the released training code and the paper (spec §5); every deliberate deviation is
marked "DEVIATION".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lumina_lightning.data.config import DataConfig


@dataclass
class ModelSection:
    """The trainable Next-DiT.

    Attributes:
        size: a named size (``NextDiT_2B_GQA_patch2_Adaln_Refiner``, ``NextDiT_tiny``, ...).
        overrides: config fields changed from the size (e.g. ``{in_channels: 3, cap_feat_dim: 384}``).
            ``in_channels`` and ``cap_feat_dim`` are checked against the autoencoder / text encoder.
        init_from: a checkpoint to start from (official ``.pth`` dir, diffusers folder, ours, a
            previous stage's ``export/`` folder or ``.ckpt``); weights only, optimizer state is fresh.
        init_ema: which weights of ``init_from`` to take: ``raw`` | ``ema`` | ``auto`` (EMA where present).
            The EMA copy starts from the same weights.
        attention_backend: ``auto`` (flash-attn on CUDA when installed, else SDPA) | ``sdpa`` | ``flash``.
        gradient_checkpointing: recompute each block in backward (official ``--checkpointing``).
        compile: ``torch.compile`` each block (costs ~95 s on the first CPU call; off by default).
    """

    size: str = "NextDiT_2B_GQA_patch2_Adaln_Refiner"
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    init_ema: str = "auto"
    attention_backend: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False


@dataclass
class TextEncoderSection:
    """Frozen text encoder (spec §3): ``path`` is a local folder (``minilm`` = the packaged MiniLM).

    ``dtype`` ``bf16`` matches the official scripts on GPUs; ``fp32`` is the CPU default.
    ``attn_implementation`` is pinned (``eager`` honours Gemma-2's soft-capping) for reproducible features.
    """

    path: str = "google/gemma-2-2b"
    max_length: int = 256
    attn_implementation: str = "eager"
    dtype: str = "fp32"
    cache_size: int = 4096


@dataclass
class AutoencoderSection:
    """Frozen autoencoder (spec §4): ``vae`` (diffusers AutoencoderKL from ``path``), ``pixel``, or
    ``conv`` (the small conv autoencoder of :mod:`lumina_lightning.encoders.conv_autoencoder`, for
    CPU-size latent runs).

    Attributes:
        train: ``kind: conv`` only — train the autoencoder into ``path`` on this run's training
            images when ``path`` does not exist yet (like ``data.synthetic``). Keys:
            ``steps``, ``batch_size``, ``lr``, ``latent_noise``, ``seed`` (of
            ``train_conv_autoencoder``), ``channels``, ``latent_channels``, ``downsample`` (of its
            config), and ``manifest`` (default ``data.path``; a manifest, data YAML or folder, whose images
            are used at their own size).
    """

    kind: str = "vae"
    path: str | None = None
    scaling_factor: float | None = None
    shift_factor: float | None = None
    dtype: str = "fp32"
    train: dict[str, Any] | None = None


@dataclass
class DataSection(DataConfig):
    """The data config (``DataConfig``) plus how batches are drawn on each rank.

    Attributes:
        batch_size: samples per batch per rank (global batch = batch_size × ranks × accumulation).
        num_workers: decoding worker processes per rank.
        val_path: manifest (or folder / data YAML) of the held-out records for the fixed-timestep
            validation loss (default: none, and then no validation loss is computed; the sample
            grids take their prompts from ``validation.prompts`` either way). Its relative image
            paths resolve against its own folder; ``root`` applies to ``path`` only.
        val_samples: how many validation records the loss uses: a fixed subset, the first
            ``val_samples`` usable records of the loader's shuffled epoch 0 drawn with ``validation.seed``.
        synthetic: generate the bundled synthetic compositional dataset into the folder of
            ``path`` when ``path`` does not exist yet — arguments of ``generate_synthetic``
            (``n``, ``size``, ``seed``, ``n_test``, ``holdout``, ...). Lets the tiny recipes run on a
            fresh checkout with no separate data step.
    """

    batch_size: int = 16
    num_workers: int = 2
    val_path: str | None = None
    val_samples: int = 64
    synthetic: dict[str, Any] | None = None


@dataclass
class ObjectiveSection:
    """Rectified-flow loss (spec §5).

    Attributes:
        timestep_sampler: ``lognorm`` (official script: logit-normal(0, 1)) or ``uniform``.
        shift: ``auto`` = the official resolution shift e^mu from the stage's image-token count;
            a number fixes the factor (1 = no shift).
        aux_loss: add the official unweighted loss on 4×-average-pooled latents (independent t
            and noise); skipped automatically where pooled latents are smaller than a patch.
        caption_dropout: probability of replacing the *whole* prompt (system template included)
            by "" — the unconditional input of CFG (official 0.1).
        system: template for records whose source names none (official: ``align`` for
            ``super_high_quality_caption`` records, ``base`` for ``path``+``prompt`` records).
        prediction: what the network outputs: ``velocity`` (official) or ``data`` (the clean sample,
            turned into a velocity for the loss and the samplers; a DEVIATION, see
            :mod:`lumina_lightning.flow.convention`). Recorded in every export.
    """

    timestep_sampler: str = "lognorm"
    lognorm_mean: float = 0.0
    lognorm_std: float = 1.0
    shift: Any = "auto"
    aux_loss: bool = True
    aux_pool: int = 4
    caption_dropout: float = 0.1
    system: str = "align"
    prediction: str = "velocity"


@dataclass
class OptimSection:
    """AdamW, constant LR (spec §5): betas (0.9, 0.95), eps 1e-15, no weight decay, clip 2.0.

    ``warmup_steps`` > 0 ramps the LR linearly, and ``schedule: cosine | linear`` decays it to
    ``min_lr_ratio`` × lr at ``trainer.max_steps`` (DEVIATIONS: the official code has neither; both
    off by default).

    ``name: muon`` (DEVIATION; ``training/optim.py``) trains the transformer blocks' weight matrices
    with ``torch.optim.Muon`` at ``muon_lr_scale`` × ``lr`` (Muon's update is scaled to an AdamW
    update's RMS, so 1 is a like-for-like start) and the rest with AdamW as above. Single device and
    DDP only: sharded strategies split the matrices Muon needs whole.
    """

    name: str = "adamw"
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-15
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 2.0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    muon_lr_scale: float = 1.0
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5


@dataclass
class EMASection:
    """EMA of the trainable weights, updated after every optimizer step.

    The official code uses decay 0.95 per step (a very short average); that is the default.
    """

    enabled: bool = True
    decay: float = 0.95


@dataclass
class ValidationSection:
    """Validation: fixed-timestep loss and a sample grid, both with fixed noise/seeds.

    Attributes:
        every_n_steps: run the validation loss every N optimizer steps and at the last step (0 = never).
        n_timesteps: stratified fixed timesteps (i + 0.5)/n for the validation loss.
        sample_every_n_steps: render the sample grid every N steps and at the last step (0 = never).
        prompts: fixed validation prompts (captions; the system template is added).
        seeds: one seed per prompt (repeated if shorter).
        preset / steps / cfg_scale: sampler settings for the grid (see ``sampling.presets``).
        width, height: grid image size (default: the stage resolution).
    """

    every_n_steps: int = 1000
    n_timesteps: int = 8
    seed: int = 0
    sample_every_n_steps: int = 1000
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    preset: str = "official"
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None


@dataclass
class TrainerSection:
    """Lightning Trainer settings.

    Attributes:
        strategy: ``auto`` | ``ddp`` | ``fsdp`` (FSDP2 ``fully_shard`` per block through
            ``ModelParallelStrategy``; runs on CPU too) | ``fsdp1`` (Lightning's ``FSDPStrategy``
            with auto-wrap per block; GPUs only) | ``deepspeed_stage_2`` | ``deepspeed_stage_3``.
        precision: ``32-true`` | ``bf16-mixed`` | ``16-mixed`` | ``bf16-true``.
        checkpoint_every_n_steps: periodic checkpoints (``last.ckpt`` is always kept up to date).
        keep_checkpoints: how many periodic checkpoints to keep (-1 = all).
        max_nonfinite_steps: stop with a clear error after this many optimizer steps in a row with
            a non-finite loss (each such step is skipped whole, all its accumulated micro-batches,
            and counted once).
        num_threads: torch CPU threads per process (``null`` = torch's default, all cores).
    """

    max_steps: int = 1000
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 1000
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 10
    enable_progress_bar: bool = True
    deterministic: bool = False
    num_threads: int | None = None


@dataclass
class TrackingSection:
    """MLflow tracking. Default store: ``sqlite:///mlruns.db`` + ``./mlartifacts`` in the working
    directory (no server); ``MLFLOW_TRACKING_URI`` or ``tracking_uri`` switch to any store/server.
    ``enabled: false`` turns tracking off (runs still write checkpoints and exports)."""

    enabled: bool = True
    tracking_uri: str | None = None
    artifact_location: str | None = None
    experiment: str = "lumina-lightning"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    log_checkpoints: bool = True


@dataclass
class RecipeConfig:
    """A whole training recipe.

    Attributes:
        task: ``generation`` (this schema) or ``unicap`` (captioner fine-tuning; its own schema).
        stage: stage name, used for the output folder, the MLflow run name and the ``stage`` tag.
        seed: global seed (data order, caption choice, noise, timesteps, dropout).
        output_dir: where checkpoints, the resolved config and the ``export/`` pipeline go.
        resume: ``null`` (fresh), ``auto`` (the run's ``last.ckpt`` when it exists) or a checkpoint path.
    """

    task: str = "generation"
    stage: str = "train"
    seed: int = 0
    output_dir: str = "runs/${stage}"
    resume: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    text_encoder: TextEncoderSection = field(default_factory=TextEncoderSection)
    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EMASection = field(default_factory=EMASection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
