"""UniCap fine-tuning sharded on 2 CPU ranks equals one process: ``fsdp1`` (full and LoRA) and ``fsdp``.

This file run as a script (see the end) starts a 2-rank gloo group and sets UniCapModule up as Lightning's
FSDPStrategy does with :func:`build_unicap_strategy`'s settings (Lightning refuses the CPU itself), or
shards it with ``configure_model`` as under FSDP2. Each rank trains on its half of every batch; in between
it runs what a validation runs (the caption loss and greedy captions, called on the module as
``run_validation`` calls them), and at the end it gathers and writes the export. One process then takes
the same steps over the whole batches. What used to break on 2+ ranks: FSDP1 left the VLM's embeddings,
lm_head and vision patch embedding / merger in the root unit, as shards outside its forward (the
validation forward and ``generate`` failed, the export held 1-D shards); ``generate`` runs the vision
encoder outside any forward (FSDP2 failed too); the optimizer saw every FSDP1 parameter as 1-D (no
weight decay); and peft found no adapter under FSDP1's units (a LoRA export without its adapters).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training_utils import run_script

_WORLD = 2
_HALF = 4  # samples per rank; one process takes both halves as one batch
_DECAY = 0.5  # weight decay on >= 2-D weights only: the split must see the shapes the model was built with
# case -> (trainer.strategy, model section)
_CASES = {
    "fsdp1": ("fsdp1", {"gradient_checkpointing": True}),
    "fsdp1_lora": ("fsdp1", {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0,
                                      "modules_to_save": ["merger"]}}),
    "fsdp2": ("fsdp", {}),
}


def _module(out: Path, case: str, tag: str):
    from test_unicap_helpers import unicap_recipe

    from lumina_lightning.modules.unicap import UniCapModule
    from lumina_lightning.training.recipe import load_recipe

    class Driven(UniCapModule):
        """A forward for the FSDP1 wrapper to run (Lightning redirects it to training_step)."""

        def forward(self, batch):
            return self.compute_loss(batch)

    strategy, model = _CASES[case]
    recipe = unicap_recipe(out / f"recipe-{case}-{tag}", model=model, trainer={"strategy": strategy},
                           optim={"warmup_steps": 0, "weight_decay": _DECAY, "loss_reduction": "sample"})
    torch.manual_seed(0)  # the same LoRA initialisation everywhere, as Lightning's seeding gives
    return Driven(load_recipe(recipe).config)


def _samples(module) -> list[dict]:
    """Two batches of 2 x _HALF training samples (levels drawn as in training), uncollated."""
    from lumina_lightning.modules.unicap_data import UniCapDataset
    from lumina_lightning.training.unicap_run import _records

    d = module.recipe.data
    dataset = UniCapDataset(_records(d.path, d.root)[: 4 * _HALF], module.table, level_weights=d.level_weights,
                            seed=0, max_image_side=d.max_image_side)
    items = [dataset[i] for i in range(len(dataset))]
    return [items[:2 * _HALF], items[2 * _HALF:]]


def _collate(module, items: list[dict]) -> dict:
    from lumina_lightning.modules.unicap_data import UniCapCollator

    d = module.recipe.data
    return UniCapCollator(module.processor, system=d.system_prompt, max_length=d.max_length, train=True)(items)


def _run(module, call, optimizer, ranks: list[int], out: Path, export: bool) -> dict:
    """Step, validate (caption loss + greedy captions), step, gather and export: what a run does."""
    from lumina_lightning.modules.unicap import build_val_batches, export_captioner
    from lumina_lightning.training.parallelize import full_state_dict
    from lumina_lightning.training.unicap_run import _records

    cfg = module.recipe
    val_records = _records(cfg.data.val_path, cfg.data.root)[: 2 * _HALF]
    module.val_batches = build_val_batches(val_records, module.processor, module.table, cfg)
    result: dict = {}
    for step, items in enumerate(_samples(module)):
        rows = [row for rank in ranks for row in items[rank * _HALF:(rank + 1) * _HALF]]
        call(_collate(module, rows)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            result["loss"] = module.validation_loss()
            result["captions"] = module.caption_records(val_records[:_HALF], cfg.validation.eval_level)[1]
    # a rank of a sharded run gathers the full weights (every rank takes part); one process has them whole
    state = full_state_dict(module.model) if len(ranks) < _WORLD else None
    if export:
        export_captioner(module.model, out, source_path=cfg.model.path, recipe=cfg, table=module.table,
                         state_dict=state)
    return result


def _wrapped(out: Path, case: str, rank: int):
    """(module, what the training forward calls, optimizer, strategy) on a rank: FSDP1 set up as Lightning's
    FSDPStrategy does (with device_id=cpu: Lightning passes None, which torch refuses on the CPU), FSDP2 by
    configure_model. The optimizer is built after the wrap, as Lightning builds it."""
    import contextlib
    import types

    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.trainer.states import TrainerFn
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lumina_lightning.training.unicap_run import build_unicap_strategy

    module = _module(out, case, f"rank{rank}")
    if module.recipe.trainer.strategy == "fsdp1":
        strategy = build_unicap_strategy("fsdp1", accelerator="gpu", devices=_WORLD, num_nodes=1, model=module.model)
        environment = LightningEnvironment()
        environment.set_global_rank(rank)
        environment.set_world_size(_WORLD)
        strategy.cluster_environment = environment
        strategy.connect(module)
        strategy.model = call = FullyShardedDataParallel(module, device_id=torch.device("cpu"),
                                                         sharding_strategy=strategy.sharding_strategy,
                                                         **strategy.kwargs)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (_WORLD,), mesh_dim_names=("data_parallel",))
        strategy = types.SimpleNamespace(_device_mesh=mesh, device_mesh=mesh)
        module._trainer = types.SimpleNamespace(strategy=strategy)
        module.configure_model()
        call = module
    optimizer = module.configure_optimizers()["optimizer"]
    strategy.optimizers = [optimizer]
    # what validation (2 ranks: generate steps them together; fp32) and checkpointing read from the trainer
    module._trainer = types.SimpleNamespace(
        world_size=_WORLD, precision_plugin=types.SimpleNamespace(forward_context=contextlib.nullcontext),
        strategy=strategy, model=call, state=types.SimpleNamespace(fn=TrainerFn.FITTING))
    return module, call, optimizer, strategy


def _resumes(module, strategy, out: Path, case: str, rank: int) -> bool:
    """Save a sharded checkpoint as a run does (on_save_checkpoint, then the strategy) and load it into a
    fresh wrap: the same weights. Partly frozen (LoRA) checkpoints used to lack keys the load needs."""
    from lumina_lightning.training.parallelize import full_state_dict

    checkpoint = {"state_dict": strategy.lightning_module_state_dict(),
                  "optimizer_states": [strategy.optimizer_state(strategy.optimizers[0])], "global_step": 2}
    module.on_save_checkpoint(checkpoint)
    strategy.save_checkpoint(checkpoint, out / f"{case}.ckpt")
    fresh, _, _, fresh_strategy = _wrapped(out, case, rank)
    fresh_strategy.load_checkpoint(out / f"{case}.ckpt")
    saved, loaded = full_state_dict(module.model), full_state_dict(fresh.model)
    return saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def _rank(rank: int, out: str, port: int) -> None:
    import torch.distributed as dist

    from lumina_lightning.training.parallelize import local_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=_WORLD)
    results = {}
    for case in _CASES:
        module, call, optimizer, strategy = _wrapped(Path(out), case, rank)
        local = sum(local_tensor(p).numel() for p in module.model.parameters())
        result = _run(module, call, optimizer, [rank], Path(out) / f"{case}-sharded", export=rank == 0)
        results[case] = {**result, "sharded": 0 < local < module.summary["total"]}
        if case == "fsdp1_lora":
            results[case]["resumes"] = _resumes(module, strategy, Path(out), case, rank)
    if rank == 0:
        torch.save(results, Path(out) / "sharded.pt")
    dist.barrier()
    dist.destroy_process_group()


def _main(out: str) -> None:
    import os

    torch.multiprocessing.spawn(_rank, args=(out, int(os.environ["MASTER_PORT"])), nprocs=_WORLD)
    results = {}
    for case in _CASES:
        module = _module(Path(out), case, "single")
        optimizer = module.configure_optimizers()["optimizer"]
        results[case] = _run(module, module, optimizer, list(range(_WORLD)), Path(out) / f"{case}-single",
                             export=True)
    torch.save(results, Path(out) / "single.pt")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (file,) = folder.glob("*.safetensors")  # model.safetensors, or adapter_model.safetensors for LoRA
    return load_file(file)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("unicap-sharded")
    done = run_script(Path(__file__), str(out), port=29671, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, torch.load(out / "sharded.pt"), torch.load(out / "single.pt")


@pytest.mark.parametrize("case", list(_CASES))
def test_two_sharded_ranks_validate_caption_and_export_as_one_process(runs, case):
    """2 sharded ranks (FSDP1 with checkpointing, FSDP1 + LoRA, FSDP2) equal one process over the combined
    batches: caption loss, greedy captions, and the exported weights after two AdamW steps (weight decay
    on the >= 2-D weights, which FSDP1 shows to the optimizer as 1-D shards)."""
    out, sharded, single = runs
    two, one = sharded[case], single[case]
    assert two["sharded"]  # the ranks held shards, not whole copies
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert len(one["captions"]) == _HALF and two["captions"] == one["captions"]
    exported, reference = _weights(out / f"{case}-sharded"), _weights(out / f"{case}-single")
    assert exported.keys() == reference.keys()
    for name, value in reference.items():
        assert exported[name].shape == value.shape, name
        assert torch.allclose(exported[name], value, atol=1e-6, rtol=1e-4), name


def test_fsdp1_lora_resumes_from_its_sharded_checkpoint(runs):
    """The checkpoint of a partly frozen FSDP1 run keeps the frozen weights: Lightning's sharded load
    (torch.distributed.checkpoint) needs every key, and failed on the ones on_save_checkpoint left out."""
    _, sharded, _ = runs
    assert sharded["fsdp1_lora"]["resumes"]


if __name__ == "__main__":
    import sys

    _main(sys.argv[1])
