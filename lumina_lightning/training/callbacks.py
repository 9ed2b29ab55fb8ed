"""Training callbacks Lightning does not provide in the form we need.

* :class:`AtomicCheckpointIO` — checkpoints are written to a temporary file in the same folder and
  renamed into place, so killing the process mid-save leaves the previous checkpoint intact.
  (Lightning's ``TorchCheckpointIO`` goes through an fsspec transaction whose local behaviour is not
  documented as atomic; we make the guarantee explicit and test it.)
* :class:`StepCheckpoint` — Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` also holds the final
  step of a run that ends between two periodic saves (Lightning writes "last" at the end only when
  no "last" was written during the run, so it lagged the final step by up to the save cadence).
* :class:`GracefulStop` — SIGTERM (schedulers, ``kill``) and the first Ctrl-C ask the run to stop at
  the next step boundary; a checkpoint is written there, and the run exits cleanly. A second
  Ctrl-C interrupts immediately. Lightning's own SIGTERM handling is replaced because it stops
  without saving, and a Ctrl-C in the middle of a step would lose that step's data position.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from lumina_lightning.fileio import atomic_write

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through :func:`lumina_lightning.fileio.atomic_write` (temp file, then one rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        target = Path(path)
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(target, lambda tmp: torch.save(checkpoint, tmp))


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that brings ``last.ckpt`` up to the final step when training ends.

    Lightning 2.6's ``on_train_end`` saves "last" only if no "last" was saved during the run, so a
    run whose ``max_steps`` (or ``max_time``) is not a multiple of the save cadence left ``last.ckpt``
    up to ``every_n_train_steps - 1`` steps behind its export: a later ``resume=auto`` (a raised
    ``max_steps``, a pipeline re-export) went back and retrained those steps. ``saved_elsewhere(step)``
    says whether another callback (:class:`GracefulStop`) already wrote ``last.ckpt`` at that step,
    so a stop on a scheduler's grace period does not write the same checkpoint twice.
    """

    def __init__(self, *args: Any, saved_elsewhere: Callable[[int], bool] = lambda step: False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._saved_elsewhere = saved_elsewhere

    @property
    def state_key(self) -> str:
        # the key Lightning stores this callback's state under names the class: keep ModelCheckpoint's,
        # so checkpoints written before this subclass resume with their checkpoint bookkeeping
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # _should_skip_saving_checkpoint is True where this callback already saved at this step
        if (not self.save_last or self._should_skip_saving_checkpoint(trainer)
                or self._saved_elsewhere(trainer.global_step)):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class GracefulStop(pl.Callback):
    """Stop at the next step boundary on SIGTERM / first Ctrl-C, saving ``last.ckpt`` first."""

    EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}

    def __init__(self, checkpoint_path: str | os.PathLike) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.requested: signal.Signals | None = None
        self.saved_to: Path | None = None
        self.saved_at_step: int | None = None
        self._previous: dict[int, Any] = {}

    # -- signal plumbing --------------------------------------------------------------------------
    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested is not None:
            # a second Ctrl-C: the user really wants out now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum)
        log.warning("received %s: finishing the current step, then saving a checkpoint "
                    "(press Ctrl-C again to abort immediately)", self.requested.name)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_start, not on_fit_start: Lightning registers its own SIGTERM handler between the two.
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    # -- stopping ---------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Only where an optimizer step has just completed: with gradient accumulation, stopping after
        # a micro-batch that has not stepped yet would record it as consumed and drop its gradient.
        # (Every rank steps on the same micro-batches, so all of them reach the collective below.)
        if trainer.global_step == getattr(self, "_step_at_start", None):
            return
        stop = trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False)
        if not stop:
            return
        if self.requested is None:  # another rank got the signal
            self.requested = signal.SIGTERM
        trainer.save_checkpoint(self.checkpoint_path)
        self.saved_to, self.saved_at_step = self.checkpoint_path, trainer.global_step
        trainer.should_stop = True
        if trainer.is_global_zero:
            log.warning("stopped by %s at step %d; checkpoint saved to %s — resume with `resume=auto`",
                        self.requested.name, trainer.global_step, self.checkpoint_path)

    @property
    def exit_code(self) -> int:
        return self.EXIT_CODES.get(self.requested, 0) if self.requested is not None else 0


class ConsoleProgress(pl.Callback):
    """Plain log lines every ``every`` steps: step, loss, speed, ETA.

    Used instead of the tqdm bar when ``trainer.enable_progress_bar`` is false (CI logs, batch
    jobs, files), so a long run is never silent.
    """

    def __init__(self, every: int = 10) -> None:
        self.every = max(1, every)
        self._start: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        self._start = time.perf_counter()
        self._first_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        import time

        step = trainer.global_step
        if not trainer.is_global_zero or step % self.every or self._start is None:
            return
        done = max(step - self._first_step, 1)
        rate = done / (time.perf_counter() - self._start)
        left = max(trainer.max_steps - step, 0) / rate if trainer.max_steps > 0 else float("nan")
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f"{float(loss):.4f}" if loss is not None else "-"
        print(f"step {step}/{trainer.max_steps}  loss {loss_text}  {rate:.2f} steps/s  ETA {left / 60:.1f} min",
              flush=True)
