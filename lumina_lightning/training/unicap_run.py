"""``lumina train RECIPE`` / ``lightning run RECIPE`` for ``task: unicap`` recipes: captioner fine-tuning.

Same run layout and tracking as generation runs (``training/run.py``): ``<output_dir>/config.yaml``
(the resolved recipe), ``checkpoints/`` (``last.ckpt`` + periodic, atomic writes, SIGTERM/Ctrl-C
save-and-stop, ``resume: auto``), ``captions/`` (validation captions per validation step),
``run_info.json`` (MLflow run id), MLflow params = the flattened recipe, the recipe files as
artifacts, tag ``stage``; plus ``eval.json`` (the final attribute accuracy) and ``export/`` — the
captioner folder ``lumina caption --model`` reads (see ``modules/unicap.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("lumina_lightning.unicap")


@dataclasses.dataclass
class UniCapResult:
    """What a finished (or stopped) UniCap run left behind."""

    output_dir: Path
    export_dir: Path | None
    last_checkpoint: Path | None
    mlflow_run_id: str | None
    tracking_uri: str | None
    global_step: int
    stopped_by_signal: str | None
    exit_code: int
    validation: dict[str, float]
    metrics: dict[str, float]
    wall_time_s: float
    train_time_s: float
    losses: list[float]
    val_history: list[dict[str, float]]
    trainable: dict[str, int]
    module: Any = None


def build_unicap_strategy(name: str, *, accelerator: str, devices: Any, num_nodes: int, model: Any,
                          find_unused_parameters: bool = False) -> Any:
    """A Lightning strategy for the VLM: the generation strategies, with the VLM's own wrap units.

    ``fsdp`` (FSDP2 through ``ModelParallelStrategy``) is sharded by ``UniCapModule.configure_model``;
    ``fsdp1`` auto-wraps the model's ``_no_split_modules`` classes (decoder layers, vision blocks)
    with ``use_orig_params`` so frozen and trainable parameters may share a unit.
    """
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lumina_lightning.modules.unicap import wrap_classes
    from lumina_lightning.training.parallelize import build_strategy

    if name == "ddp":
        return DDPStrategy(find_unused_parameters=find_unused_parameters)
    if name == "fsdp1":
        return FSDPStrategy(auto_wrap_policy=wrap_classes(model), activation_checkpointing_policy=None,
                            sharding_strategy="FULL_SHARD", use_orig_params=True, state_dict_type="sharded")
    return build_strategy(name, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                          precision="32-true", grad_clip=0.0)


def _records(path: str | None, root: str | None) -> list:
    if not path:
        return []
    from lumina_lightning.data.records import load_records

    return list(load_records(path, root=root).records)


def ensure_model(cfg: Any) -> None:
    """Build the tiny offline Qwen2-VL into ``model.path`` when ``model.build_tiny`` asks and it is missing."""
    if cfg.model.build_tiny is None or (Path(cfg.model.path) / "config.json").is_file():
        return
    from lumina_lightning.modules.tiny_vlm import ensure_tiny_vlm

    log.info("building the tiny offline Qwen2-VL into %s (%s)", cfg.model.path, cfg.model.build_tiny)
    ensure_tiny_vlm(cfg.model.path, **cfg.model.build_tiny)


def _data_module(cfg: Any, records: list, collator: Any, table: Any) -> Any:
    import lightning.pytorch as pl

    class UniCapData(pl.LightningDataModule):
        """Builds the training loader once ranks are known (inside ``fit``); stateful for mid-epoch resume."""

        def __init__(self) -> None:
            super().__init__()
            self.loader = None

        def train_dataloader(self) -> Any:
            from torchdata.stateful_dataloader import StatefulDataLoader

            from lumina_lightning.modules.unicap_data import EpochShardSampler, UniCapDataset

            if self.loader is None:
                d = cfg.data
                dataset = UniCapDataset(records, table, level_weights=d.level_weights, seed=cfg.seed,
                                        max_image_side=d.max_image_side)
                sampler = EpochShardSampler(len(dataset), seed=cfg.seed, rank=self.trainer.global_rank,
                                            world_size=self.trainer.world_size)
                self.loader = StatefulDataLoader(dataset, batch_size=d.batch_size, sampler=sampler,
                                                 collate_fn=collator, num_workers=d.num_workers, drop_last=True)
            return self.loader

    return UniCapData()


def train_unicap(loaded: Any, *, extra_callbacks: list | None = None, trainer_kwargs: dict[str, Any] | None = None,
                 model: Any = None, processor: Any = None) -> UniCapResult:
    """Run a validated ``task: unicap`` recipe (a :class:`~lumina_lightning.training.recipe.LoadedRecipe`).

    ``model``/``processor`` replace the ones loaded from ``model.path`` (tests).
    """
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from lumina_lightning.modules.unicap import UniCapModule, build_val_batches, export_captioner, load_processor
    from lumina_lightning.modules.unicap_data import UniCapCollator
    from lumina_lightning.training.callbacks import AtomicCheckpointIO, GracefulStop
    from lumina_lightning.training.parallelize import GPU_ONLY, full_state_dict, uses_fsdp2
    from lumina_lightning.training.run import _write_run_info, default_tracking_uri, ensure_synthetic, flatten

    started = time.perf_counter()
    cfg = loaded.config
    out = Path(cfg.output_dir).resolve()
    ckpt_dir = out / "checkpoints"
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(loaded.to_yaml())
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    if cfg.trainer.strategy in GPU_ONLY and not torch.cuda.is_available():
        raise ValueError(f"trainer.strategy={cfg.trainer.strategy} runs on CUDA GPUs only (Lightning refuses CPU); "
                         "on CPU use `auto`, `ddp` or `fsdp` (FSDP2)")

    ensure_synthetic(cfg)
    ensure_model(cfg)
    records = _records(cfg.data.path, cfg.data.root)
    if not records:
        raise ValueError(f"data.path {cfg.data.path} holds no records")
    val_records = _records(cfg.data.val_path, cfg.data.root)
    processor = processor if processor is not None else load_processor(cfg.model.path)
    module = UniCapModule(cfg, model=model, processor=processor, output_dir=out,
                          eval_records=val_records[: cfg.validation.eval_samples])
    module.val_batches = build_val_batches(val_records[: cfg.data.val_samples], processor, module.table, cfg)
    collator = UniCapCollator(processor, system=cfg.data.system_prompt, max_length=cfg.data.max_length, train=True)

    strategy = build_unicap_strategy(cfg.trainer.strategy, accelerator=cfg.trainer.accelerator,
                                     devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes, model=module.model,
                                     find_unused_parameters=cfg.trainer.find_unused_parameters)
    logger: Any = False
    tracking_uri = None
    if cfg.tracking.enabled:
        from lightning.pytorch.loggers import MLFlowLogger

        tracking_uri = cfg.tracking.tracking_uri or default_tracking_uri()
        artifacts = cfg.tracking.artifact_location or Path("mlartifacts").resolve().as_uri()
        tags = {"stage": cfg.stage, "task": "unicap", "recipe": str(loaded.path), **cfg.tracking.tags}
        logger = MLFlowLogger(experiment_name=cfg.tracking.experiment, run_name=cfg.tracking.run_name or cfg.stage,
                              tracking_uri=tracking_uri, tags=tags, artifact_location=artifacts, log_model=False)

    stop = GracefulStop(ckpt_dir / "last.ckpt")
    checkpoints = ModelCheckpoint(
        dirpath=ckpt_dir, filename="step={step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=max(1, cfg.trainer.checkpoint_every_n_steps), save_top_k=cfg.trainer.keep_checkpoints,
        monitor="step", mode="max", save_last=True,
    )
    callbacks = [checkpoints, stop, *(extra_callbacks or [])]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    plugins = []
    if not uses_fsdp2(strategy) and not str(cfg.trainer.strategy).startswith("deepspeed"):
        plugins.append(AtomicCheckpointIO())
    engine_clips = cfg.trainer.strategy in ("fsdp1", "deepspeed_stage_2", "deepspeed_stage_3")
    kwargs = dict(
        max_steps=cfg.trainer.max_steps, max_time=cfg.trainer.max_time, accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes, strategy=strategy,
        precision=cfg.trainer.precision, accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        log_every_n_steps=cfg.trainer.log_every_n_steps, callbacks=callbacks, logger=logger,
        default_root_dir=str(out), plugins=plugins,
        gradient_clip_val=cfg.optim.grad_clip if engine_clips else None,
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
        enable_progress_bar=cfg.trainer.enable_progress_bar, enable_model_summary=False,
        deterministic=cfg.trainer.deterministic, max_epochs=-1,
    )
    kwargs.update(trainer_kwargs or {})
    trainer = pl.Trainer(**kwargs)

    ckpt_path = None
    if cfg.resume == "auto":
        last = ckpt_dir / "last.ckpt"
        ckpt_path = str(last) if last.exists() else None
        log.info("resume=auto: %s", f"resuming from {last}" if ckpt_path else "no last.ckpt yet, starting fresh")
    elif cfg.resume:
        if not Path(cfg.resume).exists():
            raise FileNotFoundError(f"resume checkpoint {cfg.resume} does not exist")
        ckpt_path = cfg.resume

    run_id = getattr(logger, "run_id", None) if logger else None
    if logger:
        params = flatten(loaded.resolved)
        params.update({f"model.params.{k}": v for k, v in module.summary.items()})
        logger.log_hyperparams(params)
        if trainer.is_global_zero:
            for f in loaded.files:
                logger.experiment.log_artifact(run_id, str(f), "recipe")
            logger.experiment.log_artifact(run_id, str(out / "config.yaml"), "recipe")
            _write_run_info(out, cfg, run_id, tracking_uri, logger)

    fit_started = time.perf_counter()
    trainer.fit(module, datamodule=_data_module(cfg, records, collator, module.table), ckpt_path=ckpt_path)
    train_time = time.perf_counter() - fit_started

    # a max_time stop skips the last-step validation: validate now so the result has final numbers
    if stop.requested is None and trainer.state.finished and module.last_validation.get("step") != trainer.global_step:
        module.run_validation()

    export_dir = None
    metrics = {k.split("/", 1)[1]: v for k, v in module.last_validation.items() if k.startswith("val/")}
    if stop.requested is None and trainer.state.finished:
        export_dir = out / "export"
        sharded = cfg.trainer.strategy in ("fsdp", "fsdp1", "deepspeed_stage_3") and trainer.world_size > 1
        state = full_state_dict(module.model) if sharded else None
        if trainer.is_global_zero:
            export_captioner(module.model, export_dir, source_path=cfg.model.path, recipe=cfg, table=module.table,
                             state_dict=state)
            (out / "eval.json").write_text(json.dumps({"step": trainer.global_step, **metrics,
                                                       "eval_level": cfg.validation.eval_level,
                                                       "eval_samples": len(module.eval_records),
                                                       "train_time_s": round(train_time, 1)}, indent=2) + "\n")
            if logger:
                logger.experiment.log_artifact(run_id, str(out / "eval.json"))
                if cfg.tracking.log_checkpoints:
                    logger.experiment.log_artifacts(run_id, str(export_dir), "export")
    if logger:
        logger.finalize("success" if export_dir else "killed")
    return UniCapResult(
        output_dir=out, export_dir=export_dir,
        last_checkpoint=(ckpt_dir / "last.ckpt") if (ckpt_dir / "last.ckpt").exists() else None,
        mlflow_run_id=run_id, tracking_uri=tracking_uri, global_step=trainer.global_step,
        stopped_by_signal=stop.requested.name if stop.requested is not None else None, exit_code=stop.exit_code,
        validation=dict(module.last_validation), metrics=metrics, wall_time_s=time.perf_counter() - started,
        train_time_s=train_time, losses=list(module.loss_history), val_history=list(module.val_history),
        trainable=dict(module.summary), module=module,
    )
