"""The one place where strategies, sharding, activation checkpointing and compilation are applied.

Model files stay pure PyTorch; the LightningModule calls :func:`parallelize` from
``configure_model``. Strategies come from Lightning (we never write a distributed engine):

* ``auto`` / ``ddp``: Lightning's single-device / ``DDPStrategy`` (gloo on CPU, NCCL on GPUs).
* ``fsdp``: FSDP2 — ``fully_shard`` on every Next-DiT block, then the root — through Lightning's
  ``ModelParallelStrategy`` (runs on CPU with gloo too; distributed checkpoints, resume).
* ``fsdp1``: Lightning's ``FSDPStrategy`` with auto-wrap per block and per model, trained and EMA
  (GPUs only; Lightning refuses CPU).
* ``deepspeed_stage_2`` / ``deepspeed_stage_3``: Lightning's ``DeepSpeedStrategy`` (GPUs only).

The frozen text encoder and autoencoder are never handed to these wrappers: the module keeps them
outside its registered submodules, so they are neither sharded nor checkpointed.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from lumina_lightning.models.nextdit import JointTransformerBlock, NextDiT

log = logging.getLogger(__name__)

GPU_ONLY = {"fsdp1", "deepspeed_stage_2", "deepspeed_stage_3"}


def atomic_model_parallel() -> type:
    """``ModelParallelStrategy`` for FSDP2 over every rank, whose distributed checkpoints replace
    the previous one whole.

    Why: Lightning writes a distributed checkpoint's shards into the existing ``last.ckpt/`` folder,
    and its ``meta.pt`` last, so a run killed while saving left new weights beside the old loop state
    (a resume then trained on the same data twice). Here every rank writes into a fresh sibling
    folder and rank 0 swaps it in once all ranks are done, so a kill while writing leaves the previous
    checkpoint as it was. The swap is two renames (the old folder aside, the new one in); a kill
    between exactly those two leaves it as ``.last.ckpt.old``, which ``resume=auto`` also takes.
    """
    import os
    import shutil
    from pathlib import Path

    from lightning.pytorch.strategies import ModelParallelStrategy

    def remove(path: Path) -> None:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    class AtomicModelParallelStrategy(ModelParallelStrategy):
        def set_world_ranks(self) -> None:
            super().set_world_ranks()
            # FSDP2 across all ranks, no tensor parallelism (a 2.6B DiT needs none); Lightning's
            # "auto" would put a node's devices on the tensor-parallel axis. Sized from the world
            # size Lightning derived from its own parsing of devices (-1, "auto", "0,1", ...) and
            # num_nodes: called by the Trainer and again just before the device mesh is built.
            self._data_parallel_size = self.world_size
            self._tensor_parallel_size = 1

        def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
            if not self._save_distributed_checkpoint or "://" in str(filepath):
                return super().save_checkpoint(checkpoint, filepath, storage_options)
            target = Path(filepath)
            tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
            if self.is_global_zero:
                remove(tmp)
            self.barrier("atomic_checkpoint_start")
            super().save_checkpoint(checkpoint, tmp, storage_options)
            self.barrier("atomic_checkpoint_written")
            if self.is_global_zero:
                remove(old)
                if target.exists():
                    os.replace(target, old)
                os.replace(tmp, target)
                remove(old)
            self.barrier("atomic_checkpoint_done")

    return AtomicModelParallelStrategy


def build_strategy(name: str, *, accelerator: str, devices: Any, num_nodes: int, precision: str,
                   grad_clip: float) -> Any:
    """A Lightning strategy object (or the string ``"auto"``) for a recipe's ``trainer.strategy``."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    if name == "auto":
        return "auto"
    if name == "ddp":
        # every trainable parameter is used every step; unused detection would only cost time
        return DDPStrategy(find_unused_parameters=False)
    if name == "fsdp":
        # the mesh (all ranks data-parallel) is sized by the strategy from the Trainer's world size
        return atomic_model_parallel()(save_distributed_checkpoint=True)
    if name == "fsdp1":
        return FSDPStrategy(
            # NextDiT too: the trained model and its EMA copy are then each a unit of their own (their
            # embedders and final layer) above their blocks' units, sharded alike, so each rank's EMA
            # shard pairs with its model shard in ema_update. Left to the root unit, the two models'
            # non-block parameters shared one flat parameter split across the ranks wherever it fell
            # (a parameter's shard and its EMA twin's differed in size on 2+ ranks), and were whole
            # only inside the root's forward: not for the export or the validation / sample forwards,
            # which call the models directly.
            auto_wrap_policy={JointTransformerBlock, NextDiT},
            activation_checkpointing_policy=None,  # checkpointing is the model's per-block switch
            sharding_strategy="FULL_SHARD",
            use_orig_params=True,
            state_dict_type="sharded",
        )
    if name.startswith("deepspeed_stage_"):
        stage = int(name.rsplit("_", 1)[1])
        return DeepSpeedStrategy(stage=stage)
    raise ValueError(f"unknown strategy {name!r}")


def uses_fsdp2(strategy: Any) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def uses_deepspeed(strategy: Any) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)


def builds_partitioned(strategy: Any) -> bool:
    """True where ``configure_model`` runs inside DeepSpeed ZeRO-3's ``zero.Init``: every module's
    parameters are partitioned as soon as its own ``__init__`` returns, so whole-model
    initialisation and weight loading must run on gathered parameters (:func:`gathered`)."""
    return uses_deepspeed(strategy) and getattr(strategy, "zero_stage_3", False)


def gathered(strategy: Any, *modules: torch.nn.Module | None) -> Any:
    """A context in which the modules' parameters are whole and writable (rank 0's writes are
    broadcast and re-partitioned on exit under ZeRO-3; a no-op everywhere else)."""
    if not builds_partitioned(strategy):
        return contextlib.nullcontext()
    import deepspeed

    params = [p for m in modules if m is not None for p in m.parameters()]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def uses_fsdp1(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def clip_grad_norm(module: Any, params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
    """The total gradient norm over every rank and shard, clipping to ``max_norm`` (<= 0: no clip).

    Called from a LightningModule's ``configure_gradient_clipping`` for every strategy but
    DeepSpeed (whose engine clips). FSDP1 needs its root wrapper's ``clip_grad_norm_``, which
    reduces the norm over ranks (Lightning's ``FSDPPrecision`` refuses ``gradient_clip_algorithm=
    'norm'``, seen on a GPU). FSDP2 grads are DTensors whose norm is reduced by ``full_tensor``;
    DDP / single device grads are already whole.
    """
    clip = max_norm if max_norm and max_norm > 0 else None
    if uses_fsdp1(module.trainer.strategy):
        return module.trainer.model.clip_grad_norm_(clip if clip is not None else float("inf"))
    params = [p for p in params if p.grad is not None]
    if not params:
        return None
    total = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if hasattr(total, "full_tensor"):  # FSDP2: the norm over all shards
        total = total.full_tensor()
    if clip is not None:
        torch.nn.utils.clip_grads_with_norm_(params, clip, total, foreach=True)
    return total


def fsdp2_shard(model: NextDiT, mesh: Any, *, param_dtype: torch.dtype | None = None) -> NextDiT:
    """``fully_shard`` each transformer block, then the root (torchtitan's per-block pattern).

    The root is resharded after forward too (FSDP2 keeps a root's own parameters, here the
    embedders and the final layer, unsharded after forward by default, expecting the backward to
    come): the EMA copy and validation / sample rendering run no-grad forwards only, after which the
    root would stay whole, so the next EMA update would pair whole EMA tensors with the trained
    model's shards (a size error on several ranks; on one, updates written into a temporary copy).
    Costs one extra all-gather of those few small parameters per training step.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    if param_dtype is not None:
        # bf16 compute with fp32 gradient reduction, like the official FSDP set-up (spec §5)
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.blocks():
        fully_shard(block, **kwargs)
    fully_shard(model, reshard_after_forward=True, **kwargs)
    return model


def parallelize(
    model: NextDiT,
    *,
    strategy: Any,
    mesh: Any = None,
    gradient_checkpointing: bool = False,
    compile_blocks: bool = False,
    attention_backend: str = "auto",
    fsdp_param_dtype: torch.dtype | None = None,
) -> NextDiT:
    """Apply attention backend, activation checkpointing, compile and FSDP2 sharding, in that order.

    Checkpointing wraps each block call (the model's switch), compile goes per block (so the
    many identical blocks share one compiled graph), and ``fully_shard`` comes last, on blocks
    then root, as the FSDP2 docs prescribe for composing with checkpointing and compile.
    """
    model.set_attention_backend(attention_backend)
    model.set_gradient_checkpointing(gradient_checkpointing)
    if compile_blocks:
        for block in model.blocks():
            block.compile()
    if uses_fsdp2(strategy):
        if mesh is None:
            raise RuntimeError("FSDP2 sharding needs the strategy's device mesh")
        fsdp2_shard(model, mesh, param_dtype=fsdp_param_dtype)
    return model


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded) parameter this rank holds: DTensor shard, ZeRO-3 partition, or itself."""
    if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3 partitioned parameter
        return p.ds_tensor
    if hasattr(p, "to_local"):  # DTensor (FSDP2)
        return p.to_local()
    return p.data


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The complete, unsharded state dict on CPU (every rank must call it; rank 0 gets the values).

    Works for plain modules, FSDP2 (DTensor) and FSDP1 through torch's state-dict API, and for
    DeepSpeed ZeRO-3 by gathering the partitions.
    """
    params = list(model.parameters())
    if any(hasattr(p, "ds_tensor") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if any(hasattr(p, "to_local") for p in params) or _is_fsdp1(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # rank 0 gathers onto the CPU; not for FSDP1 parameters already there (CPU test runs), whose
        # "offload" aliases the gathered storage that FSDP then frees (torch FlatParamHandle.to_cpu): every
        # rank gets the values instead
        offload = not (_is_fsdp1(model) and all(p.device.type == "cpu" for p in params))
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _is_fsdp1(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
