"""Learning-rate schedules, as the multiplier of the base LR at an optimizer step (a pure function
shared by the generation and UniCap modules; wrapped in ``torch.optim.lr_scheduler.LambdaLR``)."""

from __future__ import annotations

import math
from typing import Any

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(step: int, *, total: int, warmup: int = 0, schedule: str = "constant", min_ratio: float = 0.0) -> float:
    """LR multiplier at 0-based ``step``: a linear warm-up over ``warmup`` steps ((step + 1)/warmup),
    then ``constant`` (1), or a ``cosine`` / ``linear`` decay from 1 to ``min_ratio`` at step ``total``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; choose one of {SCHEDULES}")
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1 - min_ratio) * shape


def lambda_scheduler(optimizer: Any, optim: Any, max_steps: int) -> Any:
    """``LambdaLR`` over :func:`lr_factor` from a recipe's ``optim`` section (``warmup_steps``,
    ``schedule``, ``min_lr_ratio``) and ``trainer.max_steps``."""
    import torch

    total, warmup = max(1, max_steps), max(0, optim.warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total=total, warmup=warmup, schedule=optim.schedule, min_ratio=optim.min_lr_ratio))
