"""Training checkpoints of the sharded strategies other than FSDP2 load like the others.

``fsdp1`` (Lightning's ``FSDPStrategy`` with sharded state dicts) writes a torch DCP folder whose module
state sits under ``model.*`` (FSDP2's under ``state_dict.*``); ``deepspeed_stage_{1,2,3}`` write
DeepSpeed's folder (``latest``, ``checkpoint/*_model_states.pt`` with Lightning's client state, ZeRO
optimizer shards). ``lumina sample`` (``load_pipeline``), ``lumina convert`` and ``model.init_from``
(``read_state``, ``source_spec``) must read both, raw and EMA weights.

The checkpoints are real: this file, run as a script, starts a 2-rank gloo group on the CPU that
trains one step with a real FSDP1 wrapper (FULL_SHARD over 2 ranks, so the state dict holds
ShardedTensors) and real DeepSpeed ZeRO-1/2/3 engines (ZeRO-3 partitions the parameters), and saves
through Lightning's own ``FSDPStrategy`` / ``DeepSpeedStrategy`` methods (``lightning_module_state_dict``,
``optimizer_state``, ``save_checkpoint``), which cannot run inside a CPU ``Trainer`` (Lightning refuses
both strategies without CUDA). The module is our ``NextDiTModule``, so ``on_save_checkpoint`` records
what a training run records.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from training_utils import run_script, tiny_recipe

WORLD = 2
STAGES = (1, 2, 3)
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs the deepspeed extra")


# ------------------------------------------------------------------------------------------------
# writing the checkpoints (one rank of the gloo group; see main)
# ------------------------------------------------------------------------------------------------


def _module(out: Path, rank: int):
    from lumina_lightning.modules.generation import NextDiTModule
    from lumina_lightning.training.recipe import load_recipe
    from lumina_lightning.training.run import build_encoders

    class Driven(NextDiTModule):
        """A forward for the wrappers to run; everything that is saved is NextDiTModule's own."""

        def forward(self, *inputs):
            return self.model(*inputs)

    cfg = load_recipe(tiny_recipe(out / f"recipe{rank}")).config
    text_encoder, autoencoder, spec = build_encoders(cfg)
    torch.manual_seed(0)  # the same initial weights on every rank, as Lightning's seeding gives
    module = Driven(cfg, text_encoder=text_encoder, autoencoder=autoencoder, pipeline_spec=spec)
    module.configure_model()
    return module


def _inputs(rank: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(rank)
    return (torch.randn(1, 3, 16, 16, generator=g), torch.rand(1, generator=g), torch.randn(1, 8, 32, generator=g),
            torch.ones(1, 8, dtype=torch.bool))


def _environment(strategy, rank: int) -> None:
    from lightning.fabric.plugins.environments import LightningEnvironment

    environment = LightningEnvironment()
    environment.set_global_rank(rank)
    environment.set_world_size(WORLD)
    strategy.cluster_environment = environment


def _write_fsdp1(out: Path, rank: int) -> tuple[dict, bool]:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lumina_lightning.modules.ema import ema_update
    from lumina_lightning.training.parallelize import build_strategy

    module = _module(out, rank)
    strategy = build_strategy("fsdp1", accelerator="gpu", devices=WORLD, num_nodes=1, precision="32-true",
                              grad_clip=1.0)
    _environment(strategy, rank)
    # wrapped as FSDPStrategy._setup_model wraps, with device_id=cpu (Lightning passes None, which torch refuses)
    strategy.model = FSDP(module, device_id=torch.device("cpu"), sharding_strategy=strategy.sharding_strategy,
                          **strategy.kwargs)
    optimizer = torch.optim.AdamW([p for p in strategy.model.parameters() if p.requires_grad], lr=1e-2)
    strategy.model(*_inputs(rank)).square().mean().backward()
    optimizer.step()
    ema_update(module.ema_model, module.model, 0.5)  # on each rank's shards of the two models
    checkpoint = {"state_dict": strategy.lightning_module_state_dict(),
                  "optimizer_states": [strategy.optimizer_state(optimizer)], "global_step": 1, "epoch": 0}
    sharded = any(isinstance(v, ShardedTensor) for v in checkpoint["state_dict"].values())
    module.on_save_checkpoint(checkpoint)
    strategy.save_checkpoint(checkpoint, out / "fsdp1.ckpt")
    with FSDP.summon_full_params(strategy.model, writeback=False):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}, sharded


def _write_deepspeed(out: Path, rank: int, stage: int) -> tuple[dict, bool]:
    import deepspeed

    from lumina_lightning.modules.ema import ema_update
    from lumina_lightning.training.parallelize import build_strategy

    module = _module(out, rank)
    strategy = build_strategy(f"deepspeed_stage_{stage}", accelerator="gpu", devices=WORLD, num_nodes=1,
                              precision="32-true", grad_clip=1.0)
    _environment(strategy, rank)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    # Lightning's own config for the stage; a torch AdamW (allowed by it) needs no JIT-built DeepSpeed op
    config = {**strategy.config, "train_micro_batch_size_per_gpu": 1}
    # ZeRO-3 keeps parameters under 1e5 elements whole on every rank (all of the tiny model's): partition
    # them all, as it does the 2.6B model's blocks
    config["zero_optimization"] = {**config["zero_optimization"], "stage3_param_persistence_threshold": 0}
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    strategy.model = engine  # DeepSpeedStrategy saves through its engine (strategy.deepspeed_engine)
    engine.backward(module.model(*_inputs(rank)).square().mean())
    engine.step()
    ema_update(module.ema_model, module.model, 0.5)
    partitioned = all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in module.parameters())
    checkpoint = {"state_dict": {}, "global_step": 1, "epoch": 0}
    module.on_save_checkpoint(checkpoint)
    strategy.save_checkpoint(dict(checkpoint), out / f"zero{stage}.ckpt")
    if stage == 2:  # the strategy's option to leave frozen parameters (the whole EMA) out
        strategy.exclude_frozen_parameters = True
        strategy.save_checkpoint(dict(checkpoint), out / "zero2-no-frozen.ckpt")
    with deepspeed.zero.GatheredParameters(list(module.parameters())):  # whole under ZeRO-3; no-op else
        return {k: v.detach().clone() for k, v in module.state_dict().items()}, partitioned


def _rank(rank: int, out: str, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    out_dir = Path(out)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    expected, facts = {}, {}
    expected["fsdp1"], facts["fsdp1_sharded"] = _write_fsdp1(out_dir, rank)
    if HAS_DEEPSPEED:
        import deepspeed.comm.torch  # noqa: F401

        # DeepSpeed JIT-compiles a shared-memory allreduce kernel for CPU ranks (about 100 s); gloo does without
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        for stage in STAGES:
            expected[f"zero{stage}"], facts[f"zero{stage}_partitioned"] = _write_deepspeed(out_dir, rank, stage)
    if rank == 0:
        torch.save(expected, out_dir / "expected.pt")
        (out_dir / "facts.json").write_text(json.dumps(facts))
    dist.barrier()
    dist.destroy_process_group()


def main(out: str) -> None:
    """Write fsdp1.ckpt/, zero{1,2,3}.ckpt/, zero2-no-frozen.ckpt/ and the trained weights (expected.pt)."""
    torch.multiprocessing.spawn(_rank, args=(out, int(os.environ["MASTER_PORT"])), nprocs=WORLD)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    result = run_script(Path(__file__), str(out), port=29691, timeout=300, env={"DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _assert_same(expected: dict, got: dict) -> None:
    assert set(expected) == set(got)
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k


KINDS = ["fsdp1", *(pytest.param(f"zero{s}", marks=needs_deepspeed) for s in STAGES)]


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_training_checkpoint_reads_the_trained_raw_and_ema_weights(written, kind):
    from lumina_lightning.models.io import detect_format, load_nextdit, read_checkpoint_meta, read_state

    path = written / f"{kind}.ckpt"
    facts = json.loads((written / "facts.json").read_text())
    if kind == "fsdp1":  # really sharded: ShardedTensors over both ranks' files, not the 1-rank full fallback
        assert facts["fsdp1_sharded"] and {p.name for p in path.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    else:
        assert len(list((path / "checkpoint").glob("*_optim_states.pt"))) == WORLD  # one ZeRO shard per rank
        assert facts[f"{kind}_partitioned"] == (kind == "zero3")  # ZeRO-3 held the parameters partitioned
    expected = torch.load(written / "expected.pt")[kind]
    assert detect_format(path) == "lightning"
    assert read_checkpoint_meta(path)["global_step"] == 1
    raw, config, fmt = read_state(path, ema=False)
    ema, _, _ = read_state(path, ema=True)
    assert fmt == "lightning" and config.n_layers > 0
    _assert_same(_part(expected, "model."), raw)
    _assert_same(_part(expected, "ema_model."), ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # two different sets of weights were read
    model = load_nextdit(path)  # ema=False: the raw weights, built
    _assert_same(_part(expected, "model."), model.state_dict())
    assert load_nextdit(path, ema="auto").weights_ema is True


@pytest.mark.parametrize("kind", ["fsdp1", pytest.param("zero3", marks=needs_deepspeed)])
def test_sample_convert_and_init_from_read_sharded_checkpoints(written, tmp_path, kind):
    from lumina_lightning.cli import main as lumina_main
    from lumina_lightning.models.io import load_nextdit
    from lumina_lightning.sampling.pipeline_io import (
        check_same_latent_space,
        describe,
        load_pipeline,
        source_prediction,
        source_spec,
    )

    path = written / f"{kind}.ckpt"
    expected = torch.load(written / "expected.pt")[kind]
    # lumina sample: a training checkpoint with its recorded encoders, EMA weights by default
    assert describe(path) == "ckpt"
    pipe = load_pipeline(path)
    _assert_same(_part(expected, "ema_model."), pipe.model.state_dict())
    # init_from reads the recorded prediction and latent space (a checkpoint read as recording none
    # would start a run in another latent space unchecked)
    assert source_spec(path)["autoencoder"] == {"kind": "pixel"} and source_prediction(path) == "velocity"
    with pytest.raises(ValueError, match="another autoencoder latent space"):
        check_same_latent_space(path, {"kind": "vae", "path": "some-vae"})
    # lumina convert
    assert lumina_main(["convert", str(path), str(tmp_path / "out"), "--to", "lumina", "--ema", "false"]) == 0
    _assert_same(_part(expected, "model."), load_nextdit(tmp_path / "out").state_dict())


@needs_deepspeed
def test_deepspeed_checkpoint_without_its_frozen_ema_says_so(written):
    from lumina_lightning.models.io import load_nextdit, read_state

    path = written / "zero2-no-frozen.ckpt"
    with pytest.raises(ValueError, match="holds none.*exclude_frozen_parameters.*--ema false"):
        read_state(path, ema="auto")
    raw = _part(torch.load(written / "expected.pt")["zero2"], "model.")
    # the unused, frozen norm_final is left out too: filled with its constant ones
    assert torch.equal(raw["norm_final.weight"], torch.ones_like(raw["norm_final.weight"]))
    _assert_same(raw, load_nextdit(path, ema=False).state_dict())


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@needs_deepspeed
def test_deepspeed_checkpoint_with_code_in_a_pickle_is_refused_unrun(written, tmp_path):
    """DeepSpeed's zero_to_fp32 unpickles with weights_only=False: each file is checked weights-only first."""
    from lumina_lightning.models.io import read_state

    path = shutil.copytree(written / "zero2.ckpt", tmp_path / "zero2.ckpt")
    shard = sorted((path / "checkpoint").glob("*_optim_states.pt"))[0]
    state = torch.load(shard, weights_only=False)
    marker = tmp_path / "code-ran"
    torch.save({**state, "extra": _RunsCode(marker)}, shard)
    with pytest.raises(ValueError, match=rf"{shard.name}: not a weights-only checkpoint"):
        read_state(path, ema=False)
    assert not marker.exists()


@needs_deepspeed
def test_deepspeed_checkpoint_whose_latest_names_a_missing_tag_is_named(written, tmp_path):
    from lumina_lightning.models.io import read_state

    path = shutil.copytree(written / "zero2.ckpt", tmp_path / "zero2.ckpt")
    (path / "latest").write_text("global_step9")
    with pytest.raises(ValueError, match="names the tag 'global_step9'.*no folder"):
        read_state(path)


if __name__ == "__main__":
    main(sys.argv[1])
