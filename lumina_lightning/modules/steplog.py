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


def log_step_rates(module: Any, started: float | None, batch_info: tuple[int, int] | None, tokens_name: str) -> None:
    """``train/images_per_s``, ``train/<tokens_name>`` (both over all ranks) and ``train/lr`` for the
    step that began at ``started`` (``time.perf_counter()``) and held ``batch_info = (images, tokens)``
    on this rank; only on Lightning's writing steps."""
    if not logging_step(module):
        return
    if started is not None and batch_info:
        dt = max(time.perf_counter() - started, 1e-9)
        images, tokens = batch_info
        world = module.trainer.world_size
        module.log("train/images_per_s", images * world / dt, on_step=True)
        module.log(f"train/{tokens_name}", tokens * world / dt, on_step=True)
    module.log("train/lr", module.optimizers().param_groups[0]["lr"], on_step=True)
