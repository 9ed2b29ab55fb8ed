"""Flow-matching core against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from lumina_lightning.flow import (
    PREDICTIONS,
    TimestepBins,
    flow_matching_loss,
    image_seq_len,
    interpolate,
    per_sample_mse,
    pool_latents,
    sample_timesteps,
    shift_mu,
    sigma_to_t,
    stratified_timesteps,
    t_to_sigma,
    time_shift,
    training_shift,
    velocity_from_output,
    velocity_target,
    velocity_to_sigma_flow,
)


def test_interpolant_endpoints_and_midpoint():
    x0, x1 = torch.full((2, 3), -2.0), torch.full((2, 3), 4.0)
    assert torch.equal(interpolate(x0, x1, torch.tensor([0.0, 0.0])), x0)  # t = 0 is noise
    assert torch.equal(interpolate(x0, x1, torch.tensor([1.0, 1.0])), x1)  # t = 1 is data
    # t = 0.25: 0.25·4 + 0.75·(−2) = −0.5
    assert torch.allclose(interpolate(x0, x1, torch.tensor([0.25, 0.25])), torch.full((2, 3), -0.5))


def test_velocity_target_is_data_minus_noise_and_sigma_conversions():
    x0, x1 = torch.tensor([1.0]), torch.tensor([3.0])
    assert velocity_target(x0, x1).item() == 2.0
    assert t_to_sigma(0.2) == pytest.approx(0.8) and sigma_to_t(0.8) == pytest.approx(0.2)
    assert velocity_to_sigma_flow(torch.tensor([2.0])).item() == -2.0
    # d x_t / d t = x1 − x0: one Euler step of size 1 from noise with the exact target lands on data
    assert torch.equal(x0 + 1.0 * velocity_target(x0, x1), x1)


def test_velocity_from_output_hand_values():
    assert PREDICTIONS == ("velocity", "data")
    x0, x1 = torch.tensor([[1.0, -1.0]]), torch.tensor([[3.0, 5.0]])
    out = torch.tensor([[7.0, 8.0]])
    xt = interpolate(x0, x1, torch.tensor([0.5]))  # [2, 2]
    # velocity: the output is the velocity
    assert torch.equal(velocity_from_output(out, xt, torch.tensor([0.5]), "velocity"), out)
    # data: an exact x1 gives the exact velocity x1 − x0 = [2, 6]: (x1 − x_t)/(1 − t) = ([3, 5] − [2, 2]) / 0.5
    v = velocity_from_output(x1, xt, torch.tensor([0.5]), "data")
    assert torch.allclose(v, torch.tensor([[2.0, 6.0]]))
    # per-row t: row 0 at t = 0 (x_t = x0, gap 1), row 1 at t = 0.75 (gap 0.25)
    x1b, x0b = torch.tensor([[4.0], [4.0]]), torch.tensor([[0.0], [0.0]])
    tb = torch.tensor([0.0, 0.75])
    xtb = interpolate(x0b, x1b, tb)  # [[0], [3]]
    assert torch.allclose(velocity_from_output(x1b, xtb, tb, "data"), torch.tensor([[4.0], [4.0]]))
    # 1 − t is clipped at 0.05 (JiT): at t = 0.99, (x̂ − x_t) / 0.05, not / 0.01
    t = torch.tensor([0.99])
    xt = torch.tensor([[1.0, 1.0]])
    assert torch.allclose(velocity_from_output(torch.tensor([[2.0, 0.0]]), xt, t, "data"), torch.tensor([[20.0, -20.0]]))
    # a scalar t works too (the samplers pass per-row tensors, tests and tools may pass floats)
    assert torch.allclose(velocity_from_output(torch.tensor([[2.0]]), torch.tensor([[1.0]]), 0.5, "data"), torch.tensor([[2.0]]))
    with pytest.raises(ValueError, match="unknown prediction 'eps'"):
        velocity_from_output(out, xt, t, "eps")


def test_time_shift_hand_values():
    # t' = t / (t + s(1 − t)); s = 3, t = 0.5: 0.5 / (0.5 + 1.5) = 0.25 (toward noise)
    assert time_shift(0.5, 3.0) == pytest.approx(0.25)
    assert time_shift(0.5, 1.0) == pytest.approx(0.5)
    t = torch.tensor([0.0, 1.0])
    assert torch.equal(time_shift(t, 6.0), t)  # endpoints fixed
    # σ form: σ' = sσ/(1 + (s−1)σ); σ = 0.5, s = 3 -> 1.5/2 = 0.75 = 1 − 0.25
    assert 1 - time_shift(0.5, 3.0) == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    with pytest.raises(ValueError):
        time_shift(0.5, 0.0)


def test_resolution_shift_mu_hand_values():
    assert shift_mu(256) == pytest.approx(0.5)
    assert shift_mu(4096) == pytest.approx(1.15)
    # halfway in tokens: 0.5 + 0.65 · (2176 − 256)/3840 = 0.825
    assert shift_mu(2176) == pytest.approx(0.825)
    assert image_seq_len(1024, 8, 2) == 4096 and image_seq_len(256, 8, 2) == 256
    assert training_shift(1024) == pytest.approx(math.exp(1.15))
    assert training_shift(256) == pytest.approx(math.exp(0.5))


def test_timestep_samplers_statistics():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(200_000, "lognorm", generator=g)
    assert 0 < t.min() and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.01)  # sigmoid(N(0,1)) has median 0.5
    # P(t < sigmoid(1)) = P(u < 1) = Φ(1) ≈ 0.8413
    assert (t < torch.sigmoid(torch.tensor(1.0))).float().mean().item() == pytest.approx(0.8413, abs=0.005)
    shifted = sample_timesteps(100_000, "lognorm", mean=1.0, generator=g)
    assert shifted.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01)
    u = sample_timesteps(100_000, "uniform", generator=g)
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="unknown timestep sampler"):
        sample_timesteps(3, "cosine")


def test_per_sample_mse_and_lists():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert torch.allclose(per_sample_mse(pred, target), torch.tensor([2.5, 12.5]))
    lists = per_sample_mse([torch.ones(2, 2), torch.zeros(3)], [torch.zeros(2, 2), torch.full((3,), 2.0)])
    assert torch.allclose(lists, torch.tensor([1.0, 4.0]))


def test_flow_matching_loss_is_zero_for_the_exact_velocity():
    x1 = torch.randn(4, 3, 2, 2)
    x0 = torch.randn(4, 3, 2, 2)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    oracle = lambda xt, tt: x1 - x0  # noqa: E731
    assert torch.allclose(flow_matching_loss(oracle, x1, t, noise=x0), torch.zeros(4))
    zero = lambda xt, tt: torch.zeros_like(xt)  # noqa: E731
    assert torch.allclose(flow_matching_loss(zero, x1, t, noise=x0), (x1 - x0).square().flatten(1).mean(1))


def test_pool_latents_four_times():
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    pooled = pool_latents(x, 4)
    assert pooled.shape == (1, 1, 2, 2)
    # top-left 4×4 block: rows 0–3, cols 0–3 -> mean = (0+3)/2 + 8·(0+3)/2 = 1.5 + 12 = 13.5
    assert pooled[0, 0, 0, 0].item() == pytest.approx(13.5)


def test_stratified_timesteps_and_bins():
    assert torch.allclose(stratified_timesteps(4), torch.tensor([0.125, 0.375, 0.625, 0.875]))
    bins = TimestepBins(4)
    bins.update(torch.tensor([0.1, 0.2, 0.9, 1.0]), torch.tensor([1.0, 3.0, 5.0, 7.0]))
    assert bins.means() == {0: 2.0, 3: 6.0}  # t = 1.0 falls in the last bin
    assert bins.labels()[0] == "0.00-0.25"
    bins.reset()
    assert bins.means() == {}


@pytest.mark.parametrize("prediction, expected", [("velocity", [0.25, 0.25]), ("data", [4.0, 16.0])])
def test_training_loss_by_hand(tmp_path, prediction, expected):
    """``NextDiTModule.flow_losses`` (what training_step optimises) for a Next-DiT whose output is
    the constant 1: its final projection is zero-initialised (spec §1.6), so a bias of 1 is the
    whole output. Data 2, noise 0.5, so the target velocity x1 - x0 is 1.5 everywhere.

    velocity: the output is v = 1; (1 - 1.5)² = 0.25 at any t.
    data: the output is x̂1 = 1; x_t = 2t + 0.5(1 - t) is 1.25 at t = 0.5 and 1.625 at t = 0.75;
    v = (x̂1 - x_t) / (1 - t) = -0.5 and -2.5; (v - 1.5)² = 4 and 16.
    The auxiliary loss sees the 4×-pooled latents, which are the same constants: the same values.
    """
    from training_utils import tiny_recipe

    from lumina_lightning.models.nextdit import NextDiT
    from lumina_lightning.modules.generation import NextDiTModule
    from lumina_lightning.training.recipe import load_recipe
    from lumina_lightning.training.run import build_encoders

    cfg = load_recipe(tiny_recipe(tmp_path, objective={"prediction": prediction, "aux_loss": True})).config
    text_encoder, autoencoder, _ = build_encoders(cfg)
    module = NextDiTModule(cfg, text_encoder=text_encoder, autoencoder=autoencoder)
    model = NextDiT(module.nextdit_config)
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(1.0)
    latents = torch.full((2, 3, 8, 8), 2.0)
    feats, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    t = torch.tensor([0.5, 0.75])
    draws = {"t": t, "noise": torch.full_like(latents, 0.5), "t_aux": t, "noise_aux": torch.full((2, 3, 2, 2), 0.5)}
    with torch.no_grad():
        main, aux = module.flow_losses(model, latents, feats, mask, draws)
    assert main.tolist() == pytest.approx(expected)
    assert aux.tolist() == pytest.approx(expected)
