"""The ``train`` verb: ``lumina train RECIPE [key=value ...]`` = ``lightning run RECIPE ...``.

Loads and validates the recipe (nothing heavy happens before that), builds the frozen encoders,
the data, the Lightning strategy, MLflow tracking and the Trainer, fits, and exports a pipeline
folder (``<output_dir>/export``: raw + EMA weights and ``pipeline.json``) that the next stage's
``model.init_from``, ``lumina sample``, ``lumina eval`` and the Gradio app all read.

Run folder (``output_dir``): ``config.yaml`` (the fully resolved recipe), ``checkpoints/``
(``last.ckpt`` + periodic), ``samples/`` (validation grids), ``export/``, ``run_info.json``
(the MLflow run id, so later stages can link to it as their parent run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("lumina_lightning.train")

from lumina_lightning.training.session import (  # noqa: F401  (re-exported for callers of this module)
    RUN_INFO,
    default_tracking_uri,
    find_run_info,
    flatten,
    local_rank_from_env,
)


@dataclasses.dataclass
class TrainResult:
    """What a finished (or stopped) run left behind."""

    output_dir: Path
    export_dir: Path | None
    last_checkpoint: Path | None
    mlflow_run_id: str | None
    tracking_uri: str | None
    global_step: int
    stopped_by_signal: str | None
    exit_code: int
    validation: dict[str, float]
    wall_time_s: float
    losses: list[float]
    indices: list[list[int]]
    module: Any = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lumina train",
        description="Train from a YAML recipe. Dotted overrides may follow, e.g. "
        "`lumina train recipes/tiny/stage1_lowres.yaml trainer.max_steps=100 data.batch_size=8`.",
    )
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    # default=[]: argparse marks a nargs="*" positional without a default as required, and its error
    # for a bare `lumina train` would then ask for the overrides too
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="key.subkey=value overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--validate-only", action="store_true", help="validate the recipe and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    from lumina_lightning.cli import parse_args_with_input
    from lumina_lightning.training.recipe import find_recipe

    args = parse_args_with_input(build_parser(), argv, "recipe", "recipe", find=find_recipe)
    from lumina_lightning.data.skips import SkipRateExceeded
    from lumina_lightning.training.recipe import RecipeError, load_recipe

    try:
        loaded = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"recipe error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(loaded.to_yaml())
        return 0
    if args.validate_only:
        print(f"{args.recipe}: valid ({len(loaded.files)} file(s): {', '.join(str(f) for f in loaded.files)})")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if loaded.task == "unicap":
        from lumina_lightning.training.unicap_run import train_unicap as run_task
    else:
        run_task = train
    try:
        result = run_task(loaded)
    except (OSError, ImportError, ValueError, SkipRateExceeded) as err:
        # a path or value in the recipe that does not hold up (missing encoder folder, unreadable
        # init_from, a bad manifest or data YAML, too many unreadable images): the user's to fix, so
        # the message and the usage-error code, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return result.exit_code


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_LAST_TEXT_ENCODER: dict[tuple, Any] = {}


def build_encoders(cfg: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(text encoder, autoencoder, pipeline spec) from a recipe's encoder sections."""
    import torch

    from lumina_lightning.encoders import HFTextEncoder, build_autoencoder, resolve_text_encoder_path
    from lumina_lightning.sampling.pipeline_io import pipeline_spec

    te, ae = cfg.text_encoder, cfg.autoencoder
    text_path = resolve_text_encoder_path(te.path)
    key = (os.path.abspath(text_path), te.max_length, te.attn_implementation, te.dtype, te.cache_size)
    text_encoder = _LAST_TEXT_ENCODER.get(key)
    if text_encoder is None:
        text_encoder = HFTextEncoder(
            text_path, max_length=te.max_length, attn_implementation=te.attn_implementation,
            dtype=getattr(torch, _DTYPES[te.dtype]), cache_size=te.cache_size,
        )
        # Stages run one after another in one process (`lumina pipeline`) reuse the frozen encoder
        # and its feature cache instead of reloading it and re-encoding every caption; only the
        # most recent one is kept, so a finished run holds no more than one encoder.
        _LAST_TEXT_ENCODER.clear()
        _LAST_TEXT_ENCODER[key] = text_encoder
    kwargs: dict[str, Any] = {}
    if ae.kind in ("vae", "conv"):
        kwargs = {"scaling_factor": ae.scaling_factor, "shift_factor": ae.shift_factor,
                  "dtype": getattr(torch, _DTYPES[ae.dtype])}
    autoencoder = build_autoencoder(ae.kind, ae.path, **kwargs)
    te_spec = {"path": te.path if te.path == "minilm" else os.path.abspath(text_path), "max_length": te.max_length,
               "attn_implementation": te.attn_implementation}
    ae_spec = {"kind": ae.kind}
    if ae.kind in ("vae", "conv"):
        ae_spec.update(path=os.path.abspath(ae.path), scaling_factor=autoencoder.scaling_factor,
                       shift_factor=autoencoder.shift_factor)
        if ae.kind == "conv":
            ae_spec["weights_sha256"] = autoencoder.weights_sha256
    spec = pipeline_spec(te_spec, ae_spec, default_system=cfg.objective.system, resolution=cfg.data.resolution,
                         prediction=cfg.objective.prediction)
    return text_encoder, autoencoder, spec


def data_config(cfg: Any, **changes: Any) -> Any:
    """The ``DataConfig`` part of the recipe's ``data`` section (loader-only fields removed)."""
    from lumina_lightning.data.config import DataConfig

    fields = {f.name for f in dataclasses.fields(DataConfig)}
    values = {k: getattr(cfg.data, k) for k in fields}
    values.update(changes)
    return DataConfig(**values)


def cache_prompt_id(cfg: Any) -> str:
    """The prompt id (``identity["prompt"]``) of the caches a recipe can train from.

    The run builds each prompt from the record's template, else ``data.system``, else
    ``objective.system`` (the image path: the dataset reports ``record.system or data.system`` and the
    module falls back to ``objective.system``); a cache holds the features of exactly those prompts
    when it was built with ``lumina data cache --prompt-template record --default-system <that name>``.
    """
    return f"record:{cfg.data.system or cfg.objective.system}"


def validation_batches(cfg: Any) -> list[dict[str, Any]]:
    """Fixed validation batches from ``data.val_path``: ``val_samples`` usable records, a fixed subset
    drawn by ``validation.seed`` (the loader's shuffled epoch 0), cut to exactly ``val_samples``.

    ``data.root`` is the base of the *training* manifest's relative paths only: the validation
    manifest's relative image paths resolve against its own folder (a data YAML's sources against
    their own ``root:`` or folder).
    """
    if not cfg.data.val_path:
        return []
    import torch

    from lumina_lightning.data.loader import build_dataloader

    dcfg = data_config(cfg, path=cfg.data.val_path, root=None, cache_dir=None, drop_last=False, strict_resume=False)
    loader = build_dataloader(dcfg, batch_size=min(cfg.data.batch_size, cfg.data.val_samples), seed=cfg.validation.seed,
                              rank=0, world_size=1, num_workers=0)
    batches, count = [], 0
    for batch in loader:
        keep = min(len(batch["indices"]), cfg.data.val_samples - count)
        if keep < len(batch["indices"]):
            # the loader's batches come whole: cut the last one to exactly val_samples records
            batch = {k: v[:keep] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()}
        batches.append(batch)
        count += keep
        if count >= cfg.data.val_samples:
            break
    return batches


def _built_on_rank_zero(ready: Callable[[], bool], build: Callable[[], None], what: str, wait_s: float,
                        lock: Path | None = None) -> None:
    """Rank 0 runs ``build`` (behind ``lock`` while it runs); the other ranks wait until ``ready()``."""
    rank = local_rank_from_env()  # RANK / LOCAL_RANK, or SLURM_PROCID under srun
    if rank != 0:
        for _ in range(int(wait_s / 0.5)):
            if ready() and (lock is None or not lock.exists()):
                return
            time.sleep(0.5)
        raise TimeoutError(f"waited {wait_s / 60:.0f} minutes for rank 0 to {what}")
    if lock is not None:
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.touch()
    try:
        build()
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)


def ensure_synthetic(cfg: Any) -> None:
    """Generate the synthetic dataset where ``data.synthetic`` asks for it and ``data.path`` is missing,
    its generation never finished, or it was generated with other arguments (``synth_config.json``
    differs from what ``data.synthetic`` asks for): a set a recipe or a pipeline made is regenerated,
    one ``lumina data synth`` made is refused, one of unknown origin is moved aside first
    (see :func:`~lumina_lightning.data.synth.regenerate_in_place`)."""
    from lumina_lightning.data.synth import (
        COMPLETE_MARKER,
        check_generation_target,
        generate_synthetic,
        regenerate_in_place,
        synthetic_differences,
        synthetic_origin,
    )
    from lumina_lightning.fileio import move_aside

    spec = cfg.data.synthetic
    if not spec or not cfg.data.path:
        return
    if not isinstance(spec, dict):
        raise ValueError(f"data.synthetic must be a mapping of generate_synthetic arguments (n, size, seed, ...), "
                         f"got {spec!r}")
    spec = dict(spec)
    folder = Path(cfg.data.path).parent
    try:
        differences = synthetic_differences(folder, spec)
    except (TypeError, ValueError) as err:
        raise ValueError(f"data.synthetic: {err}") from None

    def done() -> bool:
        # data.path alone may be left over from an interrupted generation: the marker is written last
        return Path(cfg.data.path).exists() and synthetic_differences(folder, spec) == {}

    if Path(cfg.data.path).exists() and differences == {}:
        return
    # e.g. a tiny recipe pointed at the user's own manifest: generating would write train.jsonl,
    # test.jsonl and images/ over theirs
    keep = "To train on that data as it is, set data.synthetic=null"
    check_generation_target(folder, "data.synthetic", keep, "data.path")
    set_aside = bool(differences) and not regenerate_in_place(folder, differences, "data.synthetic", keep, "data.path")
    # the same arguments (a file of the set went missing): the same bytes again, and the same maker, so a
    # user's set does not become the recipe's by being repaired
    origin = synthetic_origin(folder) if differences == {} else "recipe"

    def build() -> None:
        if set_aside:
            log.warning("moved the synthetic dataset in %s to %s (delete that if it is not yours)", folder,
                        move_aside(folder))
        log.info("generating the synthetic dataset into %s (%s)", folder, spec)
        # the old marker goes first: an interrupted regeneration must not pass for the old, complete set
        (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        try:
            generate_synthetic(folder, progress=True, origin=origin,
                               **{k: v for k, v in spec.items() if k != "progress"})
        except TypeError as err:
            raise ValueError(f"data.synthetic: {err}") from None

    _built_on_rank_zero(done, build, f"generate {cfg.data.path}", 300,
                        lock=folder.with_name(folder.name + ".generating"))
    if not Path(cfg.data.path).exists():
        raise FileNotFoundError(f"data.synthetic generated {folder} but data.path {cfg.data.path} is not among its files")


def ensure_autoencoder(cfg: Any) -> None:
    """Train the conv autoencoder where ``autoencoder.train`` asks for it and ``autoencoder.path`` is missing."""
    ae = cfg.autoencoder
    if ae.kind != "conv" or ae.train is None or not ae.path:
        return
    if Path(ae.path, "config.json").exists():
        from lumina_lightning.encoders.conv_autoencoder import check_train_settings

        # an existing folder is used as it is: changed autoencoder.train settings are named, not ignored
        # (recipe validation says so too; this covers a folder that appeared since)
        check_train_settings(ae.path, dict(ae.train))
        return
    from lumina_lightning.encoders.conv_autoencoder import train_from_manifest

    target, spec = Path(ae.path), dict(ae.train)

    def build() -> None:
        log.info("training the conv autoencoder into %s on %s (%s)", target, spec.get("manifest") or cfg.data.path,
                 spec)
        result = train_from_manifest(cfg.data.path, target, spec, root=cfg.data.root)
        log.info("conv autoencoder: %d images (%d unreadable, skipped), %d steps in %.0f s, held-out "
                 "reconstruction MSE %.4f, latent scale %.4f shift %.4f", result["images"], result["skipped"],
                 result["steps"], result["seconds"], result["recon_mse"], result["config"]["scaling_factor"],
                 result["config"]["shift_factor"])

    # config.json is written last (save_conv_autoencoder), so its presence means a complete folder
    _built_on_rank_zero(lambda: (target / "config.json").exists(), build,
                        f"train the autoencoder into {target}", 600)


class _DataModule:
    """Builds the training loader once ranks are known (inside ``fit``)."""

    def __new__(cls, cfg: Any, cache_identity: dict[str, Any] | None):
        import lightning.pytorch as pl

        class LuminaData(pl.LightningDataModule):
            def __init__(self) -> None:
                super().__init__()
                self.loader = None

            def train_dataloader(self):
                from lumina_lightning.data.loader import build_dataloader

                if self.loader is None:
                    trainer = self.trainer
                    self.loader = build_dataloader(
                        data_config(cfg), batch_size=cfg.data.batch_size, seed=cfg.seed,
                        rank=trainer.global_rank, world_size=trainer.world_size,
                        num_workers=cfg.data.num_workers, cache_identity=cache_identity,
                        progress=trainer.is_global_zero,
                    )
                    # a resume: load the loader's position now, so the length Lightning measures before
                    # restoring it already counts the restored epoch (another batch size / world size)
                    self.loader.restore_from_trainer(trainer)
                return self.loader

        return LuminaData()


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def train(loaded: Any, *, extra_callbacks: list | None = None, trainer_kwargs: dict[str, Any] | None = None) -> TrainResult:
    """Run a validated recipe (a :class:`~lumina_lightning.training.recipe.LoadedRecipe`)."""
    import torch

    from lumina_lightning.data.cache import cache_identity as make_cache_identity
    from lumina_lightning.models.io import read_state
    from lumina_lightning.modules.generation import NextDiTModule
    from lumina_lightning.training.parallelize import build_strategy, full_state_dict
    from lumina_lightning.training.session import (
        log_run_start,
        make_logger,
        make_trainer,
        prepare_run,
        resolve_resume,
    )

    from lumina_lightning.training.recipe import check_flash_host

    started = time.perf_counter()
    cfg = loaded.config
    check_flash_host(cfg, str(loaded.path))  # before anything is generated, built or tracked
    out, ckpt_dir = prepare_run(loaded)

    ensure_synthetic(cfg)
    ensure_autoencoder(cfg)
    text_encoder, autoencoder, spec = build_encoders(cfg)
    # the encoder (and its count) may be reused from the previous stage of `lumina pipeline`
    truncated_before = int(getattr(text_encoder, "truncated_count", 0) or 0)
    cache_identity = None
    if cfg.data.cache_dir:
        cache_identity = make_cache_identity(autoencoder, text_encoder, cfg.data.resolution, cfg.data.patch,
                                             cfg.data.max_aspect, prompt=cache_prompt_id(cfg))

    module = NextDiTModule(cfg, text_encoder=text_encoder, autoencoder=autoencoder, pipeline_spec=spec,
                           val_batches=validation_batches(cfg), output_dir=out)
    parent = None
    if cfg.model.init_from:
        from lumina_lightning.sampling.pipeline_io import check_same_latent_space, source_prediction

        parent_prediction = source_prediction(cfg.model.init_from)
        if parent_prediction != cfg.objective.prediction:
            raise ValueError(
                f"model.init_from={cfg.model.init_from} was trained with objective.prediction={parent_prediction!r} "
                f"but this recipe ({loaded.path}) sets {cfg.objective.prediction!r}: its outputs would be read as the "
                "wrong quantity; set objective.prediction to match"
            )
        # a parent trained on another autoencoder (kind, latent scale/shift, conv weights retrained in place)
        check_same_latent_space(cfg.model.init_from, spec["autoencoder"], where=f"this recipe ({loaded.path})")
        raw_state, _, fmt = read_state(cfg.model.init_from, ema=cfg.model.init_ema == "ema")
        ema_state = None
        if cfg.model.init_ema == "auto":
            ema_state, _, _ = read_state(cfg.model.init_from, ema="auto")
        log.info("initialising from %s (%s layout, %s weights)", cfg.model.init_from, fmt, cfg.model.init_ema)
        module.set_initial_weights(raw_state, ema_state)
        parent = find_run_info(cfg.model.init_from)

    strategy = build_strategy(cfg.trainer.strategy, accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
                              num_nodes=cfg.trainer.num_nodes, precision=cfg.trainer.precision,
                              grad_clip=cfg.optim.grad_clip)
    ckpt_path = resolve_resume(cfg.resume, ckpt_dir, cfg.trainer.strategy)
    logger, tracking_uri = make_logger(cfg, loaded, parent=parent, resume_from=ckpt_path, out=out)
    trainer, stop = make_trainer(cfg, strategy=strategy, logger=logger, out=out, ckpt_dir=ckpt_dir,
                                 extra_callbacks=extra_callbacks, trainer_kwargs=trainer_kwargs,
                                 grad_clip=cfg.optim.grad_clip)
    run_id = log_run_start(logger, trainer, loaded, out, tracking_uri=tracking_uri)

    trainer.fit(module, datamodule=_DataModule(cfg, cache_identity), ckpt_path=ckpt_path)

    # captions cut at text_encoder.max_length (HFTextEncoder warned at the first one): distinct captions
    # this rank encoded in this run; 0 where the features come from a cache (`lumina data cache` warns)
    truncated = int(getattr(text_encoder, "truncated_count", 0) or 0) - truncated_before
    if truncated:
        log.warning("%d caption(s) longer than text_encoder.max_length=%d tokens were truncated in this run",
                    truncated, cfg.text_encoder.max_length)
    if logger and trainer.is_global_zero:
        logger.experiment.log_metric(run_id, "data/captions_truncated", truncated, step=trainer.global_step)

    export_dir = None
    if stop.requested is None and trainer.state.finished:
        export_dir = out / "export"
        model_sd = full_state_dict(module.model)
        ema_sd = full_state_dict(module.ema_model) if module.ema_model is not None else None
        if trainer.is_global_zero:
            from lumina_lightning.sampling.pipeline_io import save_pipeline

            save_pipeline(export_dir, model_sd, config=module.nextdit_config, ema_state_dict=ema_sd,
                          text_encoder_spec=spec["text_encoder"], autoencoder_spec=spec["autoencoder"],
                          default_system=spec["default_system"], resolution=spec.get("resolution"),
                          prediction=spec["prediction"])
            if logger and cfg.tracking.log_checkpoints:
                logger.experiment.log_artifacts(run_id, str(export_dir), "export")
            if logger:
                _log_plots(logger, run_id, module)
    losses = [float(v) for v in getattr(module, "loss_history", [])]
    if logger:
        logger.finalize("success" if export_dir else "killed")
    return TrainResult(
        output_dir=out, export_dir=export_dir,
        last_checkpoint=(ckpt_dir / "last.ckpt") if (ckpt_dir / "last.ckpt").exists() else None,
        mlflow_run_id=run_id, tracking_uri=tracking_uri, global_step=trainer.global_step,
        stopped_by_signal=stop.requested.name if stop.requested is not None else None, exit_code=stop.exit_code,
        validation=dict(getattr(module, "last_validation", {}) or {}),
        wall_time_s=time.perf_counter() - started, losses=losses,
        indices=list(getattr(module, "index_history", [])), module=module,
    )


def _log_plots(logger: Any, run_id: str, module: Any) -> None:
    """Per-timestep-bin training loss and fixed-t validation loss, as figures in MLflow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = module.run_bins.means()
    if means:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = [(i + 0.5) / module.run_bins.n_bins for i in means]
        ax.plot(xs, list(means.values()), marker="o")
        ax.set_xlabel("t (0 = noise, 1 = data)")
        ax.set_ylabel("mean training loss")
        ax.set_title("training loss by timestep bin (whole run)")
        ax.set_yscale("log")
        fig.tight_layout()
        logger.experiment.log_figure(run_id, fig, "plots/loss_by_t.png")
        plt.close(fig)
    by_t = getattr(module, "last_validation_by_t", None)
    if by_t:
        from lumina_lightning.flow.objective import stratified_timesteps

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, per_t in by_t.items():
            ax.plot(stratified_timesteps(len(per_t)).tolist(), per_t, marker="o", label=f"{name} weights")
        ax.set_xlabel("t (0 = noise, 1 = data)")
        ax.set_ylabel("validation loss")
        ax.set_title("last validation loss at fixed timesteps")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        logger.experiment.log_figure(run_id, fig, "plots/val_loss_by_t.png")
        plt.close(fig)
