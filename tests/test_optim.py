"""`optim.name`: AdamW (official) or Muon on the transformer blocks' matrices with AdamW for the rest."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lumina_lightning.models import NextDiT, config_for
from lumina_lightning.training.config import OptimSection
from lumina_lightning.training.optim import MuonWithAdamW, build_optimizer, muon_split
from lumina_lightning.training.recipe import RecipeError, load_recipe
from lumina_lightning.training.run import train
from lumina_lightning.training.schedules import lambda_scheduler
from training_utils import tiny_recipe


def tiny_model(seed: int = 0) -> NextDiT:
    torch.manual_seed(seed)
    return NextDiT(config_for("NextDiT_debug"))


def fake_grads(model: NextDiT, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) if p.requires_grad else None


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny_model()
    muon, adamw = muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names, adamw_names = {names[id(p)] for p in muon}, {names[id(p)] for p in adamw}
    assert muon_names.isdisjoint(adamw_names)
    assert muon_names | adamw_names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.ndim == 2 for p in muon)
    for prefix in ("layers.", "noise_refiner.", "context_refiner."):
        assert any(n.startswith(prefix) and n.endswith("qkv.weight") for n in muon_names), prefix
    assert {"layers.0.feed_forward.w1.weight", "layers.0.adaLN_modulation.1.weight",
            "context_refiner.0.attention.out.weight"} <= muon_names
    # input and output layers, norm weights and biases are not for Muon
    assert {"x_embedder.weight", "cap_embedder.1.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight",
            "layers.0.attention_norm1.weight", "layers.0.adaLN_modulation.1.bias"} <= adamw_names
    assert "norm_final.weight" not in adamw_names  # frozen (kept only so official state dicts load)


def settings(**kw) -> OptimSection:
    return OptimSection(name="muon", lr=1e-3, muon_lr_scale=3.0, **kw)


def test_one_optimizer_steps_exactly_as_torch_muon_and_adamw_side_by_side():
    a, b = tiny_model(), tiny_model()
    joint = build_optimizer(a, settings())
    assert isinstance(joint, MuonWithAdamW) and [g["lr"] for g in joint.param_groups] == [3e-3, 1e-3]
    muon_b, adamw_b = muon_split(b)
    ref = [torch.optim.Muon(muon_b, lr=3e-3, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
           torch.optim.AdamW(adamw_b, lr=1e-3, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0, foreach=True)]
    for step in range(3):
        for model in (a, b):
            fake_grads(model, step)
        joint.step()
        for opt in ref:
            opt.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.layers[0].attention.qkv.weight, tiny_model().layers[0].attention.qkv.weight)


def test_state_dict_round_trip_continues_bitwise():
    """Save after 2 steps, load into a fresh optimizer on a copy, take 2 more: same as 4 straight."""
    a = tiny_model()
    opt = build_optimizer(a, settings())
    for step in range(2):
        fake_grads(a, step)
        opt.step()
    b = copy.deepcopy(a)
    saved = copy.deepcopy(opt.state_dict())
    assert [g["optimizer"] for g in saved["param_groups"]] == ["muon", "adamw"]
    assert len(saved["state"]) == sum(p.requires_grad for p in a.parameters())
    resumed = build_optimizer(b, settings())
    resumed.load_state_dict(saved)
    for step in range(2, 4):
        for model, o in ((a, opt), (b, resumed)):
            fake_grads(model, step)
            o.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_the_lr_schedule_scales_both_groups():
    model, cfg = tiny_model(), settings(warmup_steps=4)
    opt = build_optimizer(model, cfg)
    sched = lambda_scheduler(opt, cfg, max_steps=10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([3e-3 / 4, 1e-3 / 4])
    fake_grads(model, 0)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([3e-3 / 2, 1e-3 / 2])
    # the inner optimizers read the very same groups
    assert opt._inner["muon"].param_groups[0] is opt.param_groups[0]


def test_adamw_stays_the_default():
    opt = build_optimizer(tiny_model(), OptimSection(lr=1e-3))
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.9, 0.95)


def test_recipe_checks_name_strategy_and_muon_settings(tmp_path):
    recipe = tiny_recipe(tmp_path)
    with pytest.raises(RecipeError, match=r"optim.name.*'adamv'.*did you mean 'adamw'"):
        load_recipe(recipe, ["optim.name=adamv"])
    with pytest.raises(RecipeError, match=r"optim.name.*muon.*trainer.strategy='fsdp'.*whole weight matrices"):
        load_recipe(recipe, ["optim.name=muon", "trainer.strategy=fsdp"])
    with pytest.raises(RecipeError, match=r"optim.muon_lr_scale.*> 0"):
        load_recipe(recipe, ["optim.name=muon", "optim.muon_lr_scale=0"])
    with pytest.raises(RecipeError, match=r"optim.muon_momentum.*\[0, 1\)"):
        load_recipe(recipe, ["optim.name=muon", "optim.muon_momentum=1.5"])
    assert load_recipe(recipe, ["optim.name=muon", "trainer.strategy=ddp"]).config.optim.name == "muon"


def test_muon_training_resumes_to_the_straight_run(tmp_path: Path):
    """A Muon run through Lightning: N steps straight == N/2 + resume + N/2 (weights, EMA, optimizer state)."""
    def run(folder: str, steps: int, *extra: str):
        path = tiny_recipe(tmp_path / folder, output_dir=str(tmp_path / folder / "run"))
        return train(load_recipe(path, ["optim.name=muon", "optim.muon_lr_scale=3", f"trainer.max_steps={steps}",
                                        "trainer.checkpoint_every_n_steps=3", *extra]))

    straight = run("a", 6)
    first = run("b", 3)
    second = run("b", 6, "resume=auto")
    assert first.losses + second.losses == straight.losses
    a, b = straight.module, second.module
    assert isinstance(a.trainer.optimizers[0], MuonWithAdamW)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    for (name, p), q in zip(a.ema_model.state_dict().items(), b.ema_model.state_dict().values()):
        assert torch.equal(p, q), name
    sa, sb = a.trainer.optimizers[0].state_dict()["state"], b.trainer.optimizers[0].state_dict()["state"]
    assert sa.keys() == sb.keys() and any("momentum_buffer" in v for v in sa.values())
    assert all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])
