"""Exponential moving average of the trainable Next-DiT weights.

The EMA copy is a registered, frozen submodule of the LightningModule, so every strategy saves,
shards and restores it with the model (DDP ignores frozen parameters; FSDP2/FSDP1/ZeRO-3 shard it
exactly like the model, so each rank averages only the shard it holds).

torch's ``AveragedModel`` is not used because it keeps its own copy outside the module's sharding
and calls ``deepcopy`` on the wrapped model, which breaks with DTensor/ZeRO-3 parameters.
"""

from __future__ import annotations

import torch

from lumina_lightning.training.parallelize import local_tensor


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float,
               shadow: list[torch.Tensor] | None = None) -> None:
    """``ema ← decay · ema + (1 − decay) · model`` for every parameter that is trained.

    Parameters that do not train (the unused ``norm_final``) are copied instead, so the two stay
    identical. With ``shadow`` (from :func:`fp32_shadow`) the average is kept in those fp32 tensors
    and the EMA parameters receive its rounded value.
    """
    ema_params = dict(ema.named_parameters())
    trained_ema, trained_src = [], []
    for name, p in model.named_parameters():
        target = ema_params[name]
        if p.requires_grad:
            trained_ema.append(local_tensor(target))
            trained_src.append(local_tensor(p))
        else:
            local_tensor(target).copy_(local_tensor(p))
    if not trained_ema:
        return
    if shadow is None:
        torch._foreach_lerp_(trained_ema, [s.to(t.dtype) for s, t in zip(trained_src, trained_ema)], 1.0 - decay)
        return
    torch._foreach_lerp_(shadow, [s.float() for s in trained_src], 1.0 - decay)
    for target, value in zip(trained_ema, shadow):
        target.copy_(value)


def trained_ema_params(ema: torch.nn.Module, model: torch.nn.Module) -> list[torch.Tensor]:
    """The EMA's parameters that average trained ones, in the model's order (whole, not local shards)."""
    ema_params = dict(ema.named_parameters())
    return [ema_params[n] for n, p in model.named_parameters() if p.requires_grad]


def is_low_precision(ema: torch.nn.Module, model: torch.nn.Module) -> bool:
    """Whether the trained EMA tensors are stored below fp32 (so the average needs an fp32 shadow)."""
    return not all(local_tensor(t).dtype in (torch.float32, torch.float64) for t in trained_ema_params(ema, model))


@torch.no_grad()
def fp32_shadow(ema: torch.nn.Module, model: torch.nn.Module) -> list[torch.Tensor] | None:
    """fp32 copies of the trained EMA tensors (this rank's shards) when they are stored in lower
    precision, else ``None``.

    DeepSpeed's bf16/fp16 modes cast the whole module to half precision, the frozen EMA copy
    included. An EMA step ``(1 − decay)·(model − ema)`` is then often smaller than half a unit in the
    last place of the weight (bf16 keeps 8 mantissa bits: 0.4 % relative) and is rounded away, so
    the average stalls. Averaging in fp32 and rounding only the stored copy avoids that.
    """
    if not is_low_precision(ema, model):
        return None
    return [local_tensor(t).float().clone() for t in trained_ema_params(ema, model)]


@torch.no_grad()
def ema_copy_(ema: torch.nn.Module, model: torch.nn.Module) -> None:
    """Make the EMA identical to the model (start of training / after ``init_from``)."""
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        local_tensor(ema_params[name]).copy_(local_tensor(p))
