"""What every training task does around ``Trainer.fit`` (generation and UniCap alike).

Run folder and resolved config, seeding, MLflow logger and run start artefacts, checkpointing and
graceful-stop callbacks, the Trainer itself, and ``resume`` resolution — one implementation, so the
two tasks cannot drift apart in how they are tracked, saved and resumed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("lumina_lightning.train")

RUN_INFO = "run_info.json"
ENGINE_CLIPPED = ("deepspeed_stage_2", "deepspeed_stage_3")


def local_rank_from_env() -> int:
    """This process's rank before Lightning has set up: ``RANK`` / ``LOCAL_RANK`` (torchrun, Lightning's
    own launcher), else ``SLURM_PROCID`` where SLURM launched the tasks (``srun``), else 0.

    SLURM counts as the launcher exactly where Lightning's ``SLURMEnvironment`` does: ``SLURM_NTASKS``
    is set and the job is not an interactive one (job name ``bash`` / ``interactive``: an allocation in
    which processes are started by hand, where SLURM's ids say nothing about the training's ranks).
    """
    for key in ("RANK", "LOCAL_RANK"):
        if os.environ.get(key, "").strip():
            return int(os.environ[key])
    if slurm_launched() and os.environ.get("SLURM_PROCID", "").strip():
        return int(os.environ["SLURM_PROCID"])
    return 0


def slurm_launched() -> bool:
    """Whether SLURM (``srun``) launched this process, as Lightning's ``SLURMEnvironment.detect`` decides."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def prepare_run(loaded: Any) -> tuple[Path, Path]:
    """Create the run folder, write the resolved config, seed, set threads, refuse GPU-only strategies on CPU.

    Returns (output folder, checkpoint folder).
    """
    import lightning.pytorch as pl
    import torch

    from lumina_lightning.training.parallelize import GPU_ONLY

    cfg = loaded.config
    out = Path(cfg.output_dir).resolve()
    if local_rank_from_env() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(loaded.to_yaml())
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    if cfg.trainer.strategy in GPU_ONLY and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.strategy={cfg.trainer.strategy} runs on CUDA GPUs only (Lightning refuses CPU); on CPU use "
            "`auto`, `ddp` or `fsdp` (FSDP2 through ModelParallelStrategy)"
        )
    return out, out / "checkpoints"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else ``mlruns.db`` in the current folder; absolute either way."""
    return absolute_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlruns.db")


def absolute_tracking_uri(uri: str) -> str:
    """A local store's URI with its path made absolute against the current folder, once, when a command
    starts: ``sqlite:///mlruns.db``, ``file:./mlruns`` and ``./mlruns`` name a folder relative to
    wherever MLflow is called from, so the URI a run records (``run_info.json``, which resumes and
    ``lumina eval`` read back) would name another store from another folder. Servers, databases other
    than sqlite and absolute paths are returned as they are."""
    uri = str(uri)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and not path.startswith("/") and path != ":memory:":
            return f"sqlite:///{Path(path).resolve()}"
        return uri
    if uri in ("databricks", "databricks-uc", "uc"):  # MLflow's named stores, not folders
        return uri
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme == "file":
        rest = uri[len("file:"):]
        if rest.startswith("//"):  # file:///abs or file://host/...: already absolute
            return uri
        return Path(rest).resolve().as_uri()
    if not scheme or (len(scheme) == 1 and os.name == "nt"):  # a bare path (C:\... on Windows)
        return str(Path(uri).resolve())
    return uri


def resumed_run_id(out: Path, ckpt_path: str | None, tracking_uri: str) -> str | None:
    """The MLflow run a resumed training continues: the one its ``run_info.json`` names, where it was
    tracked at the same URI and the run still exists. ``None`` (a new run) otherwise, and on ranks
    other than 0, whose logger does not talk to MLflow."""
    if not ckpt_path or local_rank_from_env() != 0:
        return None
    try:
        info = json.loads((out / RUN_INFO).read_text())
    except (OSError, ValueError):
        return None
    run_id = info.get("mlflow_run_id")
    recorded = info.get("tracking_uri")
    if not run_id or not recorded or absolute_tracking_uri(recorded) != tracking_uri:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except MlflowException as err:
        log.warning("resuming, but MLflow run %s of %s is not readable (%s): starting a new run", run_id, out, err)
        return None
    return None if run.info.lifecycle_stage == "deleted" else run_id


def make_logger(cfg: Any, loaded: Any, *, tags: dict[str, str] | None = None,
                parent: dict[str, Any] | None = None, resume_from: str | None = None,
                out: Path | None = None) -> tuple[Any, str | None]:
    """An ``MLFlowLogger`` (or ``False`` when tracking is off) and the tracking URI it uses.

    ``parent`` is the ``run_info.json`` of the run this one starts from: its run becomes the
    MLflow parent, so stage lineages are browsable in ``mlflow ui``. ``resume_from`` (the checkpoint
    a run resumes from) and ``out`` (its folder): a resumed run goes on logging into its MLflow run,
    so an interrupted training is one run with one loss curve, not two halves.
    """
    if not cfg.tracking.enabled:
        return False, None
    from lightning.pytorch.loggers import MLFlowLogger

    from lumina_lightning.eval.tracking import is_tracking_server  # here: eval.tracking imports this module

    tracking_uri = absolute_tracking_uri(cfg.tracking.tracking_uri or default_tracking_uri())
    # local stores keep artifacts in ./mlartifacts; a tracking server decides for itself
    local = None if is_tracking_server(tracking_uri) else Path("mlartifacts").resolve().as_uri()
    artifacts = cfg.tracking.artifact_location or local
    all_tags = {"stage": cfg.stage, "recipe": str(loaded.path), **(tags or {}), **cfg.tracking.tags}
    if parent and parent.get("mlflow_run_id"):
        all_tags["lumina.init_from_run"] = parent["mlflow_run_id"]
        # nested in the UI only where the parent run is in this store: in another, the id names no run here
        # (records of earlier versions may hold a relative URI: compared made absolute)
        if not parent.get("tracking_uri") or absolute_tracking_uri(parent["tracking_uri"]) == tracking_uri:
            all_tags["mlflow.parentRunId"] = parent["mlflow_run_id"]
    run_id = resumed_run_id(out, resume_from, tracking_uri) if out is not None else None
    if run_id:
        log.info("resuming: continuing MLflow run %s", run_id)
    logger = MLFlowLogger(experiment_name=cfg.tracking.experiment, run_name=cfg.tracking.run_name or cfg.stage,
                          tracking_uri=tracking_uri, tags=all_tags, artifact_location=artifacts, log_model=False,
                          run_id=run_id)
    return logger, tracking_uri


def make_trainer(cfg: Any, *, strategy: Any, logger: Any, out: Path, ckpt_dir: Path,
                 extra_callbacks: list | None = None, trainer_kwargs: dict[str, Any] | None = None,
                 grad_clip: float | None = None) -> tuple[Any, Any]:
    """The Trainer with our checkpointing, graceful stop and progress reporting.

    Returns (trainer, the :class:`GracefulStop` callback, whose ``requested``/``exit_code`` tell
    whether a signal ended the run).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lumina_lightning.training.callbacks import AtomicCheckpointIO, ConsoleProgress, GracefulStop, StepCheckpoint
    from lumina_lightning.training.parallelize import uses_fsdp2

    t = cfg.trainer
    stop = GracefulStop(ckpt_dir / "last.ckpt")
    checkpoints = StepCheckpoint(
        dirpath=ckpt_dir, filename="step={step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=max(1, t.checkpoint_every_n_steps), save_top_k=t.keep_checkpoints,
        monitor="step", mode="max", save_last=True,
        # GracefulStop writes last.ckpt itself on SIGTERM / Ctrl-C; with the version counter on,
        # Lightning would then save later "last" checkpoints as last-v1.ckpt, last-v2.ckpt, ... and
        # last.ckpt, which resume=auto reads, would stay at the step of the stop for good
        enable_version_counter=False,
        saved_elsewhere=lambda step: stop.saved_at_step == step,
    )
    callbacks = [checkpoints, stop, *(extra_callbacks or [])]
    callbacks.append(TQDMProgressBar(refresh_rate=1) if t.enable_progress_bar else ConsoleProgress(t.log_every_n_steps))
    plugins = []
    # FSDP2 and DeepSpeed write sharded checkpoints themselves and do not use a CheckpointIO
    if not uses_fsdp2(strategy) and not str(t.strategy).startswith("deepspeed"):
        plugins.append(AtomicCheckpointIO())
    kwargs = dict(
        max_steps=t.max_steps, max_time=getattr(t, "max_time", None), accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=strategy, precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches, log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks, logger=logger, default_root_dir=str(out), plugins=plugins,
        # DeepSpeed clips inside its engine; the other strategies clip in the module (FSDP1 too:
        # Lightning's FSDPPrecision refuses norm clipping, see parallelize.clip_grad_norm)
        gradient_clip_val=grad_clip if t.strategy in ENGINE_CLIPPED else None,
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,  # our loaders shard themselves
        enable_progress_bar=t.enable_progress_bar, enable_model_summary=False,
        deterministic=t.deterministic, max_epochs=-1,
    )
    kwargs.update(trainer_kwargs or {})
    return pl.Trainer(**kwargs), stop


# What each strategy writes as a training checkpoint, and so the only kind it can resume from:
# Lightning's file checkpoint (auto, ddp), a torch distributed-checkpoint folder with .metadata
# (fsdp = FSDP2, fsdp1 with sharded state dicts) or a DeepSpeed checkpoint folder.
CHECKPOINT_KINDS = {
    "file": ("a single-file checkpoint", ("auto", "ddp")),
    "distributed": ("a distributed (sharded) checkpoint folder", ("fsdp", "fsdp1")),
    "deepspeed": ("a DeepSpeed checkpoint folder", ("deepspeed_stage_2", "deepspeed_stage_3")),
}


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``file`` | ``distributed`` | ``deepspeed`` (see :data:`CHECKPOINT_KINDS`) for an existing checkpoint;
    ``ValueError`` for a folder that is none of them."""
    p = Path(path)
    if not p.is_dir():
        return "file"
    if (p / ".metadata").is_file():
        return "distributed"
    if (p / "latest").is_file() or (p / "checkpoint").is_dir():  # DeepSpeed's save_checkpoint(tag="checkpoint")
        return "deepspeed"
    raise ValueError(f"resume checkpoint {path} is a folder but no training checkpoint (neither a distributed "
                     "checkpoint's .metadata nor a DeepSpeed checkpoint's 'latest' is in it)")


def check_resume_strategy(ckpt_path: str | os.PathLike, strategy: str) -> None:
    """Refuse (``ValueError``, before anything is built) to resume a checkpoint with a strategy of
    another family: Lightning would fail deep inside loading (a file checkpoint's optimizer state is
    matched to FSDP2 parameters by position; a folder is opened as a file), or worse, half-load."""
    kind = checkpoint_kind(ckpt_path)
    description, writers = CHECKPOINT_KINDS[kind]
    if strategy in writers or strategy not in {s for _, ws in CHECKPOINT_KINDS.values() for s in ws}:
        return
    raise ValueError(
        f"resume checkpoint {ckpt_path} is {description} (written by trainer.strategy={' or '.join(writers)}), but "
        f"this run uses trainer.strategy={strategy}: a run resumes only with the strategy family that wrote its "
        f"checkpoint. Resume with trainer.strategy={writers[0]}, or start a new run from its weights with "
        f"model.init_from={ckpt_path} (optimizer state and step count start afresh)"
    )


def resolve_resume(resume: str | None, ckpt_dir: Path, strategy: str | None = None) -> str | None:
    """``auto`` -> the run's ``last.ckpt`` when it exists; a path must exist; ``None`` -> fresh.

    With ``strategy`` (the recipe's ``trainer.strategy``), a checkpoint of another strategy family
    is refused with a clear message (:func:`check_resume_strategy`).
    """
    path = _resume_path(resume, ckpt_dir)
    if path is not None and strategy is not None:
        check_resume_strategy(path, strategy)
    if path is not None:
        from lumina_lightning.models.io import check_checkpoint_safe

        check_checkpoint_safe(path)  # Lightning unpickles it fully: a downloaded one could run code
    return path


def _resume_path(resume: str | None, ckpt_dir: Path) -> str | None:
    if resume == "auto":
        last = ckpt_dir / "last.ckpt"
        if not last.exists() and (ckpt_dir / ".last.ckpt.old").exists():
            # a distributed checkpoint swap killed between its two renames (parallelize.atomic_model_parallel)
            last = ckpt_dir / ".last.ckpt.old"
        log.info("resume=auto: %s", f"resuming from {last}" if last.exists() else "no last.ckpt yet, starting fresh")
        return str(last) if last.exists() else None
    if resume:
        if not Path(resume).exists():
            raise FileNotFoundError(f"resume checkpoint {resume} does not exist")
        return str(resume)
    return None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"a.b.c": value}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def log_run_start(logger: Any, trainer: Any, loaded: Any, out: Path, *, tracking_uri: str | None,
                  extra_params: dict[str, Any] | None = None) -> str | None:
    """Params (the flattened resolved config), the recipe files, and ``run_info.json``; returns the run id."""
    if not logger:
        return None
    run_id = logger.run_id
    params = {**flatten(loaded.resolved), **(extra_params or {})}
    if trainer.is_global_zero:
        # a resumed run already holds its params, and MLflow refuses to change a logged value: log
        # only the new ones, and tag the ones this resumption changed (e.g. a longer trainer.max_steps)
        logged = logger.experiment.get_run(run_id).data.params
        # compared as MLFlowLogger.log_hyperparams writes them: str(value)[:250]
        changed = sorted(k for k, v in params.items() if k in logged and str(v)[:250] != logged[k])
        params = {k: v for k, v in params.items() if k not in logged}
        if changed:
            log.warning("resumed with other values of %s than the MLflow run logged; its params keep the "
                        "first values (the resolved recipe of this run is in %s)", ", ".join(changed), out / "config.yaml")
            logger.experiment.set_tag(run_id, "lumina.resume_changed_params", ", ".join(changed)[:5000])
    logger.log_hyperparams(params)
    if trainer.is_global_zero:
        for f in loaded.files:
            logger.experiment.log_artifact(run_id, str(f), "recipe")
        logger.experiment.log_artifact(run_id, str(out / "config.yaml"), "recipe")
        info = {"stage": loaded.config.stage, "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
                "experiment": loaded.config.tracking.experiment, "experiment_id": logger.experiment_id}
        tmp = out / (RUN_INFO + ".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, out / RUN_INFO)
    return run_id


def find_run_info(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """``run_info.json`` of the run that produced ``path`` (the path, or up to two folders above)."""
    if not path:
        return None
    p = Path(path).resolve()
    for folder in (p, p.parent, p.parent.parent):
        info = folder / RUN_INFO
        if info.is_file():
            return json.loads(info.read_text())
    return None
