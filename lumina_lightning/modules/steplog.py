"""Per-step metrics shared by the LightningModules (Next-DiT generation and UniCap).

Lightning keeps only the last value of an ``on_step`` metric between two writes to the loggers
(every ``trainer.log_every_n_steps``), and each ``self.log`` call moves its whole result collection
(~1-2 ms on CPU with ~30 keys: a few percent of a tiny-recipe step). Metrics the progress bar does
not show are therefore logged on the writing steps only, which leaves the written values unchanged.
"""

from __future__ import annotations

import time
from typing import Any


def logging_step(module: Any) -> bool:
    """Whether Lightning writes this step's metrics (its own predicate; ``True`` where it is missing,
    e.g. another Lightning version, so that nothing is lost)."""
    try:
        return bool(module.trainer._logger_connector.should_update_logs)
    except (AttributeError, RuntimeError):
        return True


def logger_step(module: Any) -> int:
    """The step Lightning writes this batch's training metrics under (``global_step - 1`` in
    ``on_train_batch_end`` after an optimizer step), for metrics sent to the loggers directly."""
    try:
        return int(module.trainer.fit_loop.epoch_loop._batches_that_stepped)
    except (AttributeError, RuntimeError):
        return max(module.global_step - 1, 0)


def log_validation(module: Any, metrics: dict[str, float]) -> None:
    """Validation metrics computed in a training hook, for both tasks.

    ``self.log`` from a training hook reaches the loggers only on Lightning's logging steps
    (``log_every_n_steps``), which a validation step need not be (the final one included): the
    metrics go to the loggers directly, at the step of this batch's training metrics, and
    ``self.log`` keeps them in ``callback_metrics`` for callbacks (a monitor, the progress bar).
    """
    module.log_dict(metrics, logger=False, rank_zero_only=True)
    if module.trainer.is_global_zero:
        for lg in module.loggers:
            lg.log_metrics(dict(metrics), step=logger_step(module))


def step_started(module: Any) -> float:
    """Call from ``on_train_batch_start``: notes the LR this step's optimizer update uses, for
    ``train/lr`` (Lightning steps the scheduler before ``on_train_batch_end``, where the optimizer
    already holds the next step's LR), and returns the start time for :func:`log_step_rates`."""
    module._step_lr = module.optimizers().param_groups[0]["lr"]
    return time.perf_counter()


def log_step_rates(module: Any, started: float | None, batch_info: tuple[int, int] | None, tokens_name: str) -> None:
    """``train/images_per_s``, ``train/<tokens_name>`` (both over all ranks) and ``train/lr`` for the
    step that began at ``started`` (``time.perf_counter()``) and held ``batch_info = (images, tokens)``
    on this rank; only on Lightning's writing steps. ``train/lr`` is the LR noted by
    :func:`step_started` (else the optimizer's current LR, which is already the next step's)."""
    if not logging_step(module):
        return
    if started is not None and batch_info:
        dt = max(time.perf_counter() - started, 1e-9)
        images, tokens = batch_info
        world = module.trainer.world_size
        module.log("train/images_per_s", images * world / dt, on_step=True)
        module.log(f"train/{tokens_name}", tokens * world / dt, on_step=True)
    lr = getattr(module, "_step_lr", None)
    module.log("train/lr", lr if lr is not None else module.optimizers().param_groups[0]["lr"], on_step=True)
