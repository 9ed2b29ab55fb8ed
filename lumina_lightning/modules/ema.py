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
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema ← decay · ema + (1 − decay) · model`` for every parameter that is trained.

    Parameters that do not train (the unused ``norm_final``) are copied instead, so the two stay identical.
    """
    ema_params = dict(ema.named_parameters())
    trained_ema, trained_src = [], []
    for name, p in model.named_parameters():
        target = ema_params[name]
        if p.requires_grad:
            trained_ema.append(local_tensor(target))
            trained_src.append(local_tensor(p).to(target.dtype))
        else:
            local_tensor(target).copy_(local_tensor(p))
    if trained_ema:
        torch._foreach_lerp_(trained_ema, trained_src, 1.0 - decay)


@torch.no_grad()
def ema_copy_(ema: torch.nn.Module, model: torch.nn.Module) -> None:
    """Make the EMA identical to the model (start of training / after ``init_from``)."""
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        local_tensor(ema_params[name]).copy_(local_tensor(p))
