"""parallelize(): activation checkpointing and compile land on exactly the blocks; the FSDP2 mesh size."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lumina_lightning.models import NextDiT
from lumina_lightning.models.nextdit import JointTransformerBlock
from lumina_lightning.training.parallelize import build_strategy, parallelize
from test_model import TINY_CONFIGS, caption_batch, make_config, randomised


def _inputs():
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    return (x, t, *caption_batch(2, 6, 32, [6, 2]))


@pytest.mark.parametrize("enabled", [True, False])
def test_parallelize_checkpoints_every_block_and_nothing_else(monkeypatch, enabled):
    import lumina_lightning.models.nextdit as nextdit

    checkpointed = []
    real = nextdit.checkpoint

    def recording_checkpoint(fn, *args, **kwargs):
        checkpointed.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(nextdit, "checkpoint", recording_checkpoint)
    model = parallelize(randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"]))), strategy="auto",
                        gradient_checkpointing=enabled)
    model(*_inputs()).square().mean().backward()
    blocks = model.blocks()
    assert len(blocks) == 2 + 2 + 2  # noise refiner, context refiner, main layers
    # each block (refiners and main, modulated or not) once per forward, and no other module
    assert Counter(map(id, checkpointed)) == (Counter(map(id, blocks)) if enabled else Counter())
    checkpointed.clear()
    with torch.no_grad():  # inference never checkpoints, whatever the switch
        model(*_inputs())
    assert checkpointed == []


@pytest.mark.parametrize("compile_blocks", [True, False])
def test_parallelize_compiles_each_block_only_when_configured(monkeypatch, compile_blocks):
    # Record torch.compile's targets instead of compiling (that costs minutes on CPU); nn.Module.compile
    # hands it the module's bound _call_impl.
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: compiled.append(getattr(fn, "__self__", fn)) or fn)
    model = parallelize(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])), strategy="auto",
                        compile_blocks=compile_blocks)
    blocks = [m for m in model.modules() if isinstance(m, JointTransformerBlock)]
    assert len(blocks) == 6
    assert Counter(map(id, compiled)) == (Counter(map(id, blocks)) if compile_blocks else Counter())


@pytest.mark.parametrize("trainer_devices", [1, 2, "2"])
@pytest.mark.parametrize("recipe_devices", [-1, "auto", "0,1"])
def test_fsdp2_mesh_is_sized_from_the_trainers_world_size(trainer_devices, recipe_devices):
    """The FSDP2 mesh puts every rank on the data-parallel axis, however ``devices`` was spelt:
    Lightning's parsing (here of a CPU Trainer's devices; -1, "auto" and "0,1" resolve on a GPU
    node) is the one source of truth, not a guess from what build_strategy was given."""
    from lightning.pytorch import Trainer

    strategy = build_strategy("fsdp", accelerator="gpu", devices=recipe_devices, num_nodes=1,
                              precision="bf16-mixed", grad_clip=1.0)
    Trainer(accelerator="cpu", devices=trainer_devices, strategy=strategy, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False)
    assert strategy.world_size == int(trainer_devices)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (int(trainer_devices), 1)


def test_fsdp2_root_is_resharded_after_no_grad_forwards(tmp_path):
    """The EMA copy (and validation, sample rendering) only runs no-grad forwards. FSDP2 leaves a root's
    own parameters (embedders, final layer) whole after forward by default, so the EMA's stayed whole
    while the trained model's were sharded: the next EMA update failed on 2 ranks (size mismatch) and
    on 1 rank wrote into temporary copies that FSDP2 then dropped (the EMA lost those updates)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lumina_lightning.modules.ema import ema_update
    from lumina_lightning.training.parallelize import fsdp2_shard, full_state_dict

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        config = make_config(**TINY_CONFIGS["gqa2-ref2"])
        torch.manual_seed(0)
        model, ema = randomised(NextDiT(config), seed=1), randomised(NextDiT(config), seed=2)
        trained = {k for k, p in model.named_parameters() if p.requires_grad}  # not the frozen norm_final
        expected = {k: torch.lerp(v, model.state_dict()[k], 0.5) if k in trained else model.state_dict()[k]
                    for k, v in ema.state_dict().items()}
        fsdp2_shard(model, mesh)
        fsdp2_shard(ema, mesh)
        with torch.no_grad():
            ema(*_inputs())
            model(*_inputs())
        for name, p in [*model.named_parameters(), *ema.named_parameters()]:
            assert isinstance(p, DTensor), f"{name} left unsharded after a no-grad forward"
        ema_update(ema, model, 0.5)
        got = full_state_dict(ema)
        for name, value in expected.items():
            assert torch.allclose(got[name], value, atol=1e-6), name
    finally:
        dist.destroy_process_group()
