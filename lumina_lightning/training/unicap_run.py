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
    and the model itself, with ``use_orig_params`` so frozen and trainable parameters may share a unit.
    """
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lumina_lightning.modules.unicap import wrap_classes
    from lumina_lightning.training.parallelize import build_strategy

    if name == "ddp":
        return DDPStrategy(find_unused_parameters=find_unused_parameters)
    if name == "fsdp1":
        # the model (a PeftModel with LoRA) is a unit of its own, above its layers' and blocks' units: left
        # to the root unit (the LightningModule), its other parameters (embeddings, lm_head, the vision
        # patch embedding and merger) were one flat parameter sharded across the ranks and whole only
        # inside the root's forward, so validation forwards failed on 2+ ranks and the export gathered
        # 1-D shards. Generation bypasses even this unit's forward: see generate_captions.
        return FSDPStrategy(auto_wrap_policy=wrap_classes(model) | {type(model)}, activation_checkpointing_policy=None,
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
                                            world_size=self.trainer.world_size, batch_size=d.batch_size,
                                            drop_last=True)
                self.loader = StatefulDataLoader(dataset, batch_size=d.batch_size, sampler=sampler,
                                                 collate_fn=collator, num_workers=d.num_workers, drop_last=True)
            return self.loader

    return UniCapData()


def train_unicap(loaded: Any, *, extra_callbacks: list | None = None, trainer_kwargs: dict[str, Any] | None = None,
                 model: Any = None, processor: Any = None) -> UniCapResult:
    """Run a validated ``task: unicap`` recipe (a :class:`~lumina_lightning.training.recipe.LoadedRecipe`).

    ``model``/``processor`` replace the ones loaded from ``model.path`` (tests).
    """
    from lumina_lightning.modules.unicap import UniCapModule, build_val_batches, export_captioner, load_processor
    from lumina_lightning.modules.unicap_data import UniCapCollator
    from lumina_lightning.training.parallelize import full_state_dict
    from lumina_lightning.training.run import ensure_synthetic
    from lumina_lightning.training.session import (
        log_run_start,
        make_logger,
        make_trainer,
        prepare_run,
        resolve_resume,
    )

    started = time.perf_counter()
    cfg = loaded.config
    out, ckpt_dir = prepare_run(loaded)

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
    ckpt_path = resolve_resume(cfg.resume, ckpt_dir, cfg.trainer.strategy)
    logger, tracking_uri = make_logger(cfg, loaded, tags={"task": "unicap"}, resume_from=ckpt_path, out=out)
    trainer, stop = make_trainer(cfg, strategy=strategy, logger=logger, out=out, ckpt_dir=ckpt_dir,
                                 extra_callbacks=extra_callbacks, trainer_kwargs=trainer_kwargs,
                                 grad_clip=cfg.optim.grad_clip)
    run_id = log_run_start(logger, trainer, loaded, out, tracking_uri=tracking_uri,
                           extra_params={f"model.params.{k}": v for k, v in module.summary.items()})

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
        # sharded parameters stay sharded on one rank too (DTensors / ZeRO-3 partitions), so gather
        # whatever the world size; every rank takes part
        sharded = cfg.trainer.strategy in ("fsdp", "fsdp1", "deepspeed_stage_3")
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
