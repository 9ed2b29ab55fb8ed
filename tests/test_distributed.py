"""Strategies on CPU: DDP equivalence, FSDP2 train/checkpoint/resume, FSDP1/DeepSpeed construction.

Multi-process runs are separate scripts in fresh interpreters (Lightning's DDP re-executes the
command line, and a second process group in one pytest process fails), each on its own port.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from training_utils import ROOT, run_script, tiny_recipe

SCRIPTS = ROOT / "tests" / "scripts"


def test_ddp_two_processes_equal_one_process_over_the_combined_batch(tmp_path):
    recipe = tiny_recipe(tmp_path, trainer={"max_steps": 2, "accelerator": "cpu", "devices": 1})
    for mode, port in (("single", 29611), ("ddp", 29612)):
        out = run_script(SCRIPTS / "ddp_equivalence.py", mode, str(tmp_path / "out"), str(recipe), port=port)
        assert out.returncode == 0, out.stderr[-4000:]
    out = tmp_path / "out"
    single = json.loads((out / "losses_single_rank0.json").read_text())
    ranks = [json.loads((out / f"losses_ddp_rank{r}.json").read_text()) for r in (0, 1)]
    for k in range(2):  # equal halves: the combined loss is the mean of the ranks' losses
        assert single[k] == pytest.approx((ranks[0][k] + ranks[1][k]) / 2, rel=1e-5, abs=1e-6)
    a = torch.load(out / "weights_single.pt")
    b = torch.load(out / "weights_ddp.pt")
    moved = 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=2e-6, rtol=1e-5), name
        moved += int(not torch.equal(a[name], torch.zeros_like(a[name])))
    assert moved > 0


def test_fsdp2_trains_checkpoints_and_resumes_to_the_ddp_weights(tmp_path):
    """FSDP2 on 2 ranks, stopped and resumed, equals DDP: losses, weights and EMA. Validation and
    sample rendering run every step: the EMA's forwards are no-grad only, so a root left unsharded
    after them (FSDP2's default for the root) broke the next EMA update."""
    common = ["trainer.devices=2", "trainer.accelerator=cpu", "trainer.checkpoint_every_n_steps=2",
              "validation.every_n_steps=1", "validation.sample_every_n_steps=1", 'validation.prompts=["a red circle"]',
              "validation.steps=2"]
    ddp = tiny_recipe(tmp_path / "ddp", output_dir=str(tmp_path / "ddp/run"))
    out = run_script(SCRIPTS / "strategy_run.py", str(ddp), str(tmp_path / "ddp.pt"), *common,
                     "trainer.strategy=ddp", "trainer.max_steps=4", port=29621)
    assert out.returncode == 0, out.stderr[-4000:]
    fsdp = tiny_recipe(tmp_path / "fsdp", output_dir=str(tmp_path / "fsdp/run"))
    out = run_script(SCRIPTS / "strategy_run.py", str(fsdp), str(tmp_path / "half.pt"), *common,
                     "trainer.strategy=fsdp", "trainer.max_steps=2", port=29622)
    assert out.returncode == 0, out.stderr[-4000:]
    last = tmp_path / "fsdp/run/checkpoints/last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file()  # a distributed (sharded) checkpoint
    out = run_script(SCRIPTS / "strategy_run.py", str(fsdp), str(tmp_path / "fsdp.pt"), *common,
                     "trainer.strategy=fsdp", "trainer.max_steps=4", "resume=auto", port=29623)
    assert out.returncode == 0, out.stderr[-4000:]
    a, b = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "fsdp.pt")
    assert a["step"] == b["step"] == 4
    assert len(b["losses"]) == 2  # the resumed run did only the remaining steps
    assert a["losses"][2:] == pytest.approx(b["losses"], rel=1e-4)
    for key in ("weights", "ema"):
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            assert torch.allclose(value, b[key][name], atol=1e-5, rtol=1e-4), (key, name)
    export = tmp_path / "fsdp/run/export"
    assert (export / "pipeline.json").is_file()
    assert (tmp_path / "fsdp/run/samples").is_dir() and any((tmp_path / "fsdp/run/samples").iterdir())

    # the run's distributed last.ckpt/ loads (no process group) to the weights it exported
    from lumina_lightning.models.io import detect_format, load_nextdit

    assert detect_format(last) == "lightning"
    for ema in (False, True):
        exported = load_nextdit(export, ema=ema).state_dict()
        loaded = load_nextdit(last, ema=ema).state_dict()
        assert loaded.keys() == exported.keys()
        for name, value in exported.items():
            assert torch.equal(loaded[name], value), (ema, name)


def test_fsdp2_checkpoint_killed_while_writing_keeps_the_previous_one(tmp_path):
    """A distributed ``last.ckpt`` is replaced whole: a save cut short leaves the previous checkpoint
    (weights and loop state together), and ``resume=auto`` continues from it."""
    import hashlib

    recipe = tiny_recipe(tmp_path, output_dir=str(tmp_path / "run"))
    common = ["trainer.devices=1", "trainer.accelerator=cpu", "trainer.strategy=fsdp", "trainer.checkpoint_every_n_steps=2"]
    out = run_script(SCRIPTS / "strategy_run.py", str(recipe), str(tmp_path / "two.pt"), *common, "trainer.max_steps=2",
                     port=29624)
    assert out.returncode == 0, out.stderr[-4000:]
    last = tmp_path / "run/checkpoints/last.ckpt"

    def digest() -> dict:
        return {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in sorted(last.iterdir())}

    before = digest()
    out = run_script(SCRIPTS / "interrupted_save_run.py", str(recipe), *common, "trainer.max_steps=4", "resume=auto",
                     port=29625)
    assert out.returncode == 0 and "interrupted: killed while writing" in out.stdout, (out.stdout, out.stderr[-4000:])
    assert digest() == before  # no shard of the new step mixed into the old checkpoint
    assert torch.load(last / "meta.pt", weights_only=False)["global_step"] == 2
    out = run_script(SCRIPTS / "strategy_run.py", str(recipe), str(tmp_path / "four.pt"), *common, "trainer.max_steps=4",
                     "resume=auto", port=29626)
    assert out.returncode == 0, out.stderr[-4000:]
    assert torch.load(tmp_path / "four.pt")["step"] == 4 and len(torch.load(tmp_path / "four.pt")["losses"]) == 2
    assert not any(p.name.startswith(".last.ckpt") for p in last.parent.iterdir())


def test_fsdp1_auto_wrap_wraps_every_block_and_not_the_encoders(tmp_path):
    """Lightning's FSDPStrategy refuses CPU, so apply the same policy with torch FSDP1 on a 1-rank gloo group."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lumina_lightning.models.nextdit import JointTransformerBlock
    from lumina_lightning.modules.generation import NextDiTModule
    from lumina_lightning.training.parallelize import build_strategy
    from lumina_lightning.training.recipe import load_recipe
    from lumina_lightning.training.run import build_encoders

    strategy = build_strategy("fsdp1", accelerator="cpu", devices=1, num_nodes=1, precision="32-true", grad_clip=2.0)
    policy = strategy.kwargs["auto_wrap_policy"] if "auto_wrap_policy" in strategy.kwargs else strategy.auto_wrap_policy
    cfg = load_recipe(tiny_recipe(tmp_path)).config
    text_encoder, autoencoder, _ = build_encoders(cfg)
    module = NextDiTModule(cfg, text_encoder=text_encoder, autoencoder=autoencoder)
    module.configure_model()
    # the frozen encoders are not submodules: no strategy ever sees (shards, checkpoints) them
    assert not any(m is text_encoder or m is autoencoder for m in module.modules())
    assert {k.split(".")[0] for k in module.state_dict()} == {"model", "ema_model"}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = FSDP(module, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True)
        units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
        blocks = [m for m in module.modules() if isinstance(m, JointTransformerBlock)]
        inner = [u for u in units if isinstance(u.module, JointTransformerBlock)]
        assert len(inner) == len(blocks) == 2 * len(module.model.blocks())  # model + EMA, every block
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_strategy_construction_and_cpu_refusal(tmp_path, stage):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lumina_lightning.training.parallelize import build_strategy
    from lumina_lightning.training.recipe import load_recipe
    from lumina_lightning.training.run import train

    strategy = build_strategy(f"deepspeed_stage_{stage}", accelerator="gpu", devices=8, num_nodes=4,
                              precision="bf16-mixed", grad_clip=2.0)
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == stage
    if torch.cuda.is_available():
        pytest.skip("the CPU refusal only applies without CUDA")
    with pytest.raises(ValueError, match="CUDA GPUs only"):
        train(load_recipe(tiny_recipe(tmp_path), [f"trainer.strategy=deepspeed_stage_{stage}"]))


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["auto", "fsdp1", "deepspeed_stage_2", "deepspeed_stage_3", "fsdp"])
def test_gpu_strategies_train(tmp_path, strategy):
    n = torch.cuda.device_count()
    recipe = tiny_recipe(tmp_path, trainer={"accelerator": "gpu", "devices": min(n, 2), "max_steps": 4,
                                            "strategy": strategy, "precision": "bf16-mixed"})
    out = run_script(SCRIPTS / "strategy_run.py", str(recipe), str(tmp_path / "w.pt"), port=29631)
    assert out.returncode == 0, out.stderr[-4000:]
    result = torch.load(tmp_path / "w.pt")
    assert result["step"] == 4 and all(math.isfinite(v) for v in result["losses"])
    # the zero-initialised adaLN projections moved, in the weights and in their EMA (which
    # moves on each rank's own shard under FSDP/ZeRO-3)
    gates = [k for k in result["weights"] if "adaLN_modulation" in k and k.endswith("weight")]
    assert gates and all(result["weights"][k].abs().sum() > 0 for k in gates)
    assert all(result["ema"][k].abs().sum() > 0 for k in gates)
    assert any(not torch.equal(result["ema"][k].float(), result["weights"][k].float()) for k in gates)


@pytest.mark.slow  # DeepSpeed JIT-builds its CPU comm op on first use (about a minute)
def test_zero3_partitioned_construction_initialises_and_loads_like_a_plain_build(tmp_path, monkeypatch):
    """Under ZeRO-3 ``configure_model`` runs inside ``zero.Init``: parameters are partitioned as
    each submodule is built, so the spec init and ``init_from`` weights are applied gathered."""
    import types

    import deepspeed
    import torch.distributed as dist

    from lumina_lightning.models import NextDiT
    from lumina_lightning.modules.generation import NextDiTModule
    from lumina_lightning.training.parallelize import build_strategy, builds_partitioned
    from lumina_lightning.training.recipe import load_recipe
    from lumina_lightning.training.run import build_encoders

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29641", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    strategy = build_strategy("deepspeed_stage_3", accelerator="gpu", devices=1, num_nodes=1,
                              precision="32-true", grad_clip=1.0)
    assert builds_partitioned(strategy)
    cfg = load_recipe(tiny_recipe(tmp_path)).config
    text_encoder, autoencoder, _ = build_encoders(cfg)
    zero = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        def build(init_state=None):
            module = NextDiTModule(cfg, text_encoder=text_encoder, autoencoder=autoencoder)
            module._trainer = types.SimpleNamespace(strategy=strategy)
            if init_state is not None:
                module.set_initial_weights(init_state, None)
            torch.manual_seed(0)
            with deepspeed.zero.Init(config_dict_or_path=zero):
                module.configure_model()
            p = next(module.model.parameters())
            assert p.ds_tensor is not None and p.numel() == 0  # really partitioned
            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                return {k: v.clone() for k, v in module.state_dict().items()}

        model_config = NextDiTModule(cfg, text_encoder=text_encoder, autoencoder=autoencoder).nextdit_config
        torch.manual_seed(0)
        plain = NextDiT(model_config).state_dict()
        built = build()
        for name, value in plain.items():
            assert torch.equal(built[f"model.{name}"], value), name
            assert torch.equal(built[f"ema_model.{name}"], value), name
        assert any(v.abs().sum() > 0 for k, v in plain.items() if "adaLN" not in k)
        start = {k: torch.randn_like(v) for k, v in plain.items()}
        loaded = build(start)
        for name, value in start.items():
            assert torch.equal(loaded[f"model.{name}"], value), name
            assert torch.equal(loaded[f"ema_model.{name}"], value), name
    finally:
        dist.destroy_process_group()


_SLURM = dict(SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_NODEID="0", SLURM_JOB_ID="1",
              SLURM_NTASKS_PER_NODE="2", SLURM_NODELIST="localhost")


@pytest.mark.parametrize("env, rank", [
    ({**_SLURM, "SLURM_JOB_NAME": "train"}, 1),  # srun: SLURM_PROCID is the global rank
    ({**_SLURM, "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0"}, 0),
    ({**_SLURM, "SLURM_JOB_NAME": "train", "RANK": "0"}, 0),  # torchrun inside an allocation: its RANK wins
    ({**_SLURM, "SLURM_JOB_NAME": "train", "LOCAL_RANK": "0"}, 0),
    ({**_SLURM, "SLURM_JOB_NAME": "bash"}, 0),  # interactive allocation: SLURM is not the launcher
    ({**_SLURM, "SLURM_JOB_NAME": "interactive"}, 0),
    ({"RANK": "3"}, 3),
    ({}, 0),
])
def test_rank_before_fit_follows_the_launcher_as_lightning_does(monkeypatch, env, rank):
    """Under ``srun`` only SLURM_PROCID says which task is rank 0: without it every task wrote the
    run's config.yaml, generated the synthetic data and trained the autoencoder into the same folders."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from lumina_lightning.training.session import local_rank_from_env

    for key in ("RANK", "LOCAL_RANK", "SLURM_JOB_NAME", *_SLURM):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert local_rank_from_env() == rank
    if "RANK" not in env and "LOCAL_RANK" not in env:  # Lightning's own view, once it sets up, agrees
        assert (SLURMEnvironment().global_rank() if SLURMEnvironment.detect() else 0) == rank


def _fake_checkpoint(path: Path, kind: str) -> Path:
    """The files of a checkpoint of each kind, with plain contents (resolve_resume reads them weights-only)."""
    if kind == "file":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": 2}, path)
    elif kind == "distributed":
        import warnings

        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"state_dict": {"model.w": torch.zeros(2)}}, checkpoint_id=path, no_dist=True)
        torch.save({"global_step": 2}, path / "meta.pt")
    else:  # DeepSpeed: <ckpt>/latest + <ckpt>/checkpoint/ with rank 0's model states and optimizer shard
        (path / "checkpoint").mkdir(parents=True)
        (path / "latest").write_text("checkpoint")
        torch.save({"module": {}, "global_step": 2}, path / "checkpoint" / "mp_rank_00_model_states.pt")
        torch.save({}, path / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return path


@pytest.mark.parametrize("kind, strategy, ok", [
    ("file", "auto", True), ("file", "ddp", True), ("file", "fsdp", False), ("file", "deepspeed_stage_2", False),
    ("distributed", "fsdp", True), ("distributed", "fsdp1", True), ("distributed", "auto", False),
    ("distributed", "ddp", False), ("deepspeed", "deepspeed_stage_3", True), ("deepspeed", "ddp", False),
])
def test_resume_refuses_a_checkpoint_of_another_strategy_family(tmp_path, kind, strategy, ok):
    """A DDP file checkpoint resumed with FSDP2 failed deep in torch (optimizer state matched by
    position), an FSDP2 folder resumed with DDP with a bare IsADirectoryError."""
    from lumina_lightning.training.session import resolve_resume

    ckpt_dir = tmp_path / "checkpoints"
    last = _fake_checkpoint(ckpt_dir / "last.ckpt", kind)
    for resume in ("auto", str(last)):
        if ok:
            assert resolve_resume(resume, ckpt_dir, strategy) == str(last)
            continue
        with pytest.raises(ValueError) as err:
            resolve_resume(resume, ckpt_dir, strategy)
        message = str(err.value)
        assert str(last) in message and f"trainer.strategy={strategy}" in message
        assert {"file": "single-file", "distributed": "distributed", "deepspeed": "DeepSpeed"}[kind] in message
        assert "same strategy family" in message or "strategy family that wrote" in message
        assert "model.init_from" in message
    assert resolve_resume(str(last), ckpt_dir) == str(last)  # no strategy given: no check
    (tmp_path / "junk.ckpt").mkdir()
    with pytest.raises(ValueError, match="no training checkpoint"):
        resolve_resume(str(tmp_path / "junk.ckpt"), ckpt_dir, strategy)


@pytest.mark.parametrize("kind, strategy", [("file", "fsdp"), ("distributed", "auto")])
def test_training_refuses_a_mismatched_resume_before_fit(tmp_path, kind, strategy):
    """Needs training/run.py to pass the strategy: ``resolve_resume(cfg.resume, ckpt_dir, cfg.trainer.strategy)``."""
    from lumina_lightning.training.recipe import load_recipe
    from lumina_lightning.training.run import train

    ckpt = _fake_checkpoint(tmp_path / "old" / "last.ckpt", kind)
    recipe = tiny_recipe(tmp_path, output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="strategy family"):
        train(load_recipe(recipe, [f"trainer.strategy={strategy}", f"resume={ckpt}"]))


# ------------------------------------------------------------------------------------------------
# FSDP1 on 2 ranks: this file run as a script (see the end) starts a 2-rank gloo group on the CPU and
# wraps NextDiTModule as Lightning's FSDPStrategy does (which refuses the CPU itself)
# ------------------------------------------------------------------------------------------------

_FSDP1_WORLD, _FSDP1_CLIP, _FSDP1_DECAY = 2, 0.05, 0.5


def _fsdp1_module(out: Path, tag: str, checkpointing: bool):
    from lumina_lightning.modules.generation import NextDiTModule
    from lumina_lightning.training.recipe import load_recipe
    from lumina_lightning.training.run import build_encoders

    class Driven(NextDiTModule):
        """A forward for the wrapper to run (Lightning redirects it to training_step)."""

        def forward(self, *inputs):
            return self.model(*inputs)

    recipe = tiny_recipe(out / f"recipe-{tag}", model={"gradient_checkpointing": checkpointing})
    cfg = load_recipe(recipe).config
    text_encoder, autoencoder, spec = build_encoders(cfg)
    torch.manual_seed(0)  # the same initial weights everywhere, as Lightning's seeding gives
    module = Driven(cfg, text_encoder=text_encoder, autoencoder=autoencoder, pipeline_spec=spec)
    module.configure_model()  # the model's activation-checkpointing switch, as in training
    return module


def _fsdp1_batch(ranks: list[int], step: int) -> list[torch.Tensor]:
    """(target, x, t, caption features, caption mask): one sample per rank, concatenated."""
    rows = []
    for rank in ranks:
        g = torch.Generator().manual_seed(1000 * step + rank)
        rows.append((torch.randn(1, 3, 16, 16, generator=g), torch.randn(1, 3, 16, 16, generator=g),
                     torch.rand(1, generator=g), torch.randn(1, 8, 32, generator=g), torch.ones(1, 8, dtype=torch.bool)))
    return [torch.cat(parts) for parts in zip(*rows)]


def _fsdp1_steps(module, call, optimizer, ranks: list[int], steps: range) -> list[float]:
    """Optimizer steps as NextDiTModule takes them (clip_grad_norm, step, ema_update), each followed by
    a no-grad forward of the EMA called directly, as validation and sample rendering call it."""
    from lumina_lightning.modules.ema import ema_update
    from lumina_lightning.training.parallelize import clip_grad_norm

    norms = []
    for step in steps:
        target, *inputs = _fsdp1_batch(ranks, step)
        (call(*inputs) - target).square().mean().backward()
        norms.append(float(clip_grad_norm(module, list(module.model.parameters()), _FSDP1_CLIP)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(module.ema_model, module.model, _FSDP1_DECAY)
        with torch.no_grad():
            module.ema_model(*_fsdp1_batch([0], 99)[1:])
    return norms


def _fsdp1_wrapped(out: Path, rank: int):
    """Module, FSDPStrategy and optimizer as the strategy sets them up, with device_id=cpu (Lightning
    passes None, which torch refuses on the CPU)."""
    import types

    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.trainer.states import TrainerFn
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lumina_lightning.training.parallelize import build_strategy

    module = _fsdp1_module(out, f"rank{rank}", checkpointing=True)
    strategy = build_strategy("fsdp1", accelerator="gpu", devices=_FSDP1_WORLD, num_nodes=1, precision="32-true",
                              grad_clip=_FSDP1_CLIP)
    environment = LightningEnvironment()
    environment.set_global_rank(rank)
    environment.set_world_size(_FSDP1_WORLD)
    strategy.cluster_environment = environment
    strategy.connect(module)
    strategy.model = FSDP(module, device_id=torch.device("cpu"), sharding_strategy=strategy.sharding_strategy,
                          **strategy.kwargs)
    optimizer = torch.optim.AdamW([p for p in strategy.model.parameters() if p.requires_grad], lr=1e-2)
    strategy.optimizers = [optimizer]
    # what clip_grad_norm and FSDPStrategy.load_checkpoint read from the trainer
    module._trainer = types.SimpleNamespace(strategy=strategy, model=strategy.model,
                                            state=types.SimpleNamespace(fn=TrainerFn.FITTING))
    return module, strategy, optimizer


def _fsdp1_rank(rank: int, out: str, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lumina_lightning.training.parallelize import full_state_dict, local_tensor

    torch.set_num_threads(1)
    out_dir = Path(out)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=_FSDP1_WORLD)
    module, strategy, optimizer = _fsdp1_wrapped(out_dir, rank)
    norms = _fsdp1_steps(module, strategy.model, optimizer, [rank], range(2))
    checkpoint = {"state_dict": strategy.lightning_module_state_dict(),
                  "optimizer_states": [strategy.optimizer_state(optimizer)], "global_step": 2, "epoch": 0}
    strategy.save_checkpoint(checkpoint, out_dir / "fsdp1.ckpt")
    # resumed into a fresh wrap, as fit(ckpt_path=...) loads a sharded checkpoint
    module, strategy, optimizer = _fsdp1_wrapped(out_dir, rank)
    strategy.load_checkpoint(out_dir / "fsdp1.ckpt")
    norms += _fsdp1_steps(module, strategy.model, optimizer, [rank], range(2, 3))
    local = sum(local_tensor(p).numel() for p in module.model.parameters())
    result = {"norms": norms, "weights": full_state_dict(module.model), "ema": full_state_dict(module.ema_model),
              "units": [isinstance(m, FSDP) for m in (module.model, module.ema_model)],
              "sharded": 0 < local < sum(v.numel() for v in module.model.state_dict().values())}
    if rank == 0:
        torch.save(result, out_dir / "fsdp1.pt")
    dist.barrier()
    dist.destroy_process_group()


def _fsdp1_main(out: str) -> None:
    """fsdp1.pt: 2 steps on 2 FSDP1 ranks, saved, resumed, 1 more; single.pt: the same 3 steps in one process."""
    import os
    import types

    torch.multiprocessing.spawn(_fsdp1_rank, args=(out, int(os.environ["MASTER_PORT"])), nprocs=_FSDP1_WORLD)
    module = _fsdp1_module(Path(out), "single", checkpointing=False)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    module._trainer = types.SimpleNamespace(strategy="auto", model=module)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    norms = _fsdp1_steps(module, module, optimizer, list(range(_FSDP1_WORLD)), range(3))
    torch.save({"norms": norms, "weights": module.model.state_dict(), "ema": module.ema_model.state_dict(),
                "initial": initial}, Path(out) / "single.pt")


def test_fsdp1_two_ranks_clip_resume_and_ema_equal_one_process(tmp_path):
    """FSDP1 FULL_SHARD on 2 ranks (block checkpointing on) equals one process over the combined batch:
    clipped gradient norms, weights and EMA, through a sharded save and resume. The trained model and
    its EMA are each an FSDP unit: under the root unit their embedders' shards differed in size and
    ema_update failed, and the export gathered only shards of them."""
    out = run_script(Path(__file__), str(tmp_path), port=29661, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    single, fsdp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "fsdp1.pt")
    assert fsdp["sharded"] and fsdp["units"] == [True, True]
    assert min(single["norms"]) > _FSDP1_CLIP  # clipping acted on every step
    assert fsdp["norms"] == pytest.approx(single["norms"], rel=1e-5)
    for key in ("weights", "ema"):
        assert fsdp[key].keys() == single[key].keys()
        for name, value in single[key].items():
            assert torch.allclose(fsdp[key][name], value, atol=2e-6, rtol=1e-5), (key, name)
    # the embedder's EMA (a non-block parameter) averaged: moved, and not equal to the weights
    name = "x_embedder.weight"
    assert not torch.equal(single["ema"][name], single["initial"][name])
    assert not torch.equal(single["ema"][name], single["weights"][name])


if __name__ == "__main__":
    import sys

    _fsdp1_main(sys.argv[1])
