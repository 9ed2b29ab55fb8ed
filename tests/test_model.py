"""Unified Next-DiT: parity with diffusers, list inputs, padding, sizes, switches."""

from __future__ import annotations

import pytest
import torch
from diffusers import Lumina2Transformer2DModel

from lumina_lightning.models import (
    FACTORIES,
    NextDiT,
    NextDiT_2B_GQA_patch2_Adaln_Refiner,
    NextDiTConfig,
)
from lumina_lightning.models.convert import config_to_diffusers, official_to_diffusers
from lumina_lightning.models.nextdit import JointTransformerBlock, MultiAxisRope, apply_rope

# Several tiny shapes: GQA ratio 1 and 3, one and two refiner layers, patch 2 and 1.
TINY_CONFIGS = {
    "gqa2-ref2": dict(dim=64, n_heads=4, n_kv_heads=2, n_layers=2, n_refiner_layers=2, axes_dims=[4, 6, 6]),
    "gqa1-ref1": dict(dim=48, n_heads=3, n_kv_heads=3, n_layers=2, n_refiner_layers=1, axes_dims=[4, 6, 6]),
    "gqa3-ref1": dict(dim=96, n_heads=6, n_kv_heads=2, n_layers=3, n_refiner_layers=1, axes_dims=[4, 6, 6]),
    "gqa3-ref2-p1": dict(dim=72, n_heads=3, n_kv_heads=1, n_layers=1, n_refiner_layers=2, axes_dims=[8, 8, 8],
                         patch_size=1),
}


def make_config(**kw) -> NextDiTConfig:
    base = dict(patch_size=2, in_channels=4, multiple_of=16, cap_feat_dim=32, axes_lens=[300, 64, 64])
    return NextDiTConfig(**{**base, **kw})


def randomised(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Every weight random (the zero-init adaLN/final layer would make parity trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.ndim == 1 else 0.0) * 0.5)
    return model


def diffusers_twin(model: NextDiT) -> Lumina2Transformer2DModel:
    kwargs = {k: v for k, v in config_to_diffusers(model.config).items() if not k.startswith("_")}
    twin = Lumina2Transformer2DModel(**kwargs)
    twin.load_state_dict(official_to_diffusers(model.state_dict(), model.config), strict=True)
    return twin.eval()


def caption_batch(batch: int, length: int, dim: int, lengths: list[int], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, length, dim, generator=g)
    mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    return feats, mask


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_matches_diffusers_lumina2(name):
    model = randomised(NextDiT(make_config(**TINY_CONFIGS[name]))).eval()
    twin = diffusers_twin(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 12, generator=g)  # non-square latents
    t = torch.rand(3, generator=g)
    feats, mask = caption_batch(3, 9, 32, [9, 4, 1])  # mixed caption lengths, incl. BOS-only
    with torch.no_grad():
        ours = model(x, t, feats, mask)
        theirs = twin(x, t, feats, mask).sample
    assert ours.shape == x.shape
    assert theirs.abs().max().item() > 1.0  # a real signal, not a near-zero output
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_parity_with_equal_lengths_uses_no_mask_and_still_matches():
    """All captions full length: our fast path drops every mask; diffusers masks the refiner."""
    model = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])), std=0.05).eval()
    twin = diffusers_twin(model)
    x = torch.randn(2, 4, 6, 10)
    feats, mask = caption_batch(2, 7, 32, [7, 7])
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        diff = (model(x, t, feats, mask) - twin(x, t, feats, mask).sample).abs().max().item()
    assert diff <= 1e-5


def test_list_of_mixed_sizes_equals_per_sample_runs():
    model = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa3-ref1"]))).eval()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 8, 12, generator=g), torch.randn(4, 16, 4, generator=g), torch.randn(4, 6, 6, generator=g)]
    t = torch.tensor([0.1, 0.5, 0.95])
    feats, mask = caption_batch(3, 10, 32, [10, 2, 6])
    with torch.no_grad():
        out = model(xs, t, feats, mask)
        assert isinstance(out, list) and [o.shape for o in out] == [x.shape for x in xs]
        for i, x in enumerate(xs):
            n = int(mask[i].sum())
            alone = model(x[None], t[i : i + 1], feats[i : i + 1, :n], mask[i : i + 1, :n])[0]
            assert (out[i] - alone).abs().max().item() < 1e-5


def test_prepare_context_reuses_the_caption_half_bitwise():
    """A sampler's context (caption refiner, positions, RoPE computed once) changes no bit of the output."""
    model = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"]))).eval()
    g = torch.Generator().manual_seed(4)
    feats, mask = caption_batch(3, 9, 32, [9, 4, 1])
    calls = []
    hook = model.context_refiner[0].register_forward_hook(lambda *a: calls.append(1))
    context: dict = {}
    with torch.no_grad():
        for t in (0.1, 0.6, 0.9):  # sampler steps: new x and t, same captions
            x = torch.randn(3, 4, 8, 12, generator=g)
            tt = torch.full((3,), t)
            assert torch.equal(model(x, tt, feats, mask, context), model(x, tt, feats, mask))
        assert len(calls) == 1 + 3  # once for the context, then once per call without it
        # a mixed-size list gets its own geometry in the same context
        xs = [torch.randn(4, 8, 12, generator=g), torch.randn(4, 16, 4, generator=g), torch.randn(4, 6, 6, generator=g)]
        for a, b in zip(model(xs, tt, feats, mask, context), model(xs, tt, feats, mask)):
            assert torch.equal(a, b)
        assert len(calls) == 1 + 4
        with pytest.raises(ValueError, match="holds captions for 3 samples, not 1"):
            model(x[:1], tt[:1], feats[:1], mask[:1], context)
    hook.remove()


def test_padding_never_changes_real_tokens():
    """Extra caption padding (any values) leaves the output unchanged."""
    model = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"]))).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    feats, mask = caption_batch(2, 5, 32, [5, 3])
    padded = torch.cat([feats, 100 * torch.randn(2, 11, 32)], dim=1)
    padded[1, 3:5] = -50.0  # garbage in the already-padded slots too
    padded_mask = torch.cat([mask, torch.zeros(2, 11, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        a = model(x, t, feats, mask)
        b = model(x, t, padded, padded_mask)
    assert (a - b).abs().max().item() < 1e-5


def test_caption_mask_must_be_a_prefix():
    model = NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"]))
    feats = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="prefix"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([0.5]), feats, torch.tensor([[False, True, True, True]]))


def test_too_long_caption_and_odd_size_errors():
    model = NextDiT(make_config(dim=32, n_heads=2, n_kv_heads=1, n_layers=1, n_refiner_layers=1,
                                axes_dims=[4, 6, 6], axes_lens=[8, 64, 64]))
    with pytest.raises(ValueError, match="too long"):
        model(torch.randn(1, 4, 8, 8), 0.5, torch.randn(1, 8, 32), torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 4, 7, 8), 0.5, torch.randn(1, 3, 32), torch.ones(1, 3, dtype=torch.bool))


def test_time_and_caption_condition_the_output():
    model = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"]))).eval()
    x = torch.randn(1, 4, 8, 8)
    feats, mask = caption_batch(1, 4, 32, [4])
    with torch.no_grad():
        base = model(x, 0.2, feats, mask)
        assert not torch.allclose(base, model(x, 0.8, feats, mask))
        assert not torch.allclose(base, model(x, 0.2, feats + 1, mask))


def test_zero_init_outputs_zero_and_gates_closed():
    """Spec §1.6: zero adaLN and zero final projection -> the fresh model predicts exactly 0."""
    model = NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"]))
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2), *caption_batch(2, 4, 32, [4, 2]))
    assert torch.count_nonzero(out) == 0
    for block in model.layers:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0


def test_rope_is_interleaved_pairs_and_axis_split():
    rope = MultiAxisRope([4, 6, 6], [300, 64, 64])
    cis = rope(torch.tensor([[[3, 5, 7]]]))
    assert cis.shape == (1, 1, 8) and cis.dtype == torch.complex64
    # axis 0 frequencies use theta^(-(0,2)/4) at position 3; axis 1 theta^(-(0,2,4)/6) at 5, ...
    angles = torch.cat([3 * 10000.0 ** (-torch.arange(0, 4, 2) / 4), 5 * 10000.0 ** (-torch.arange(0, 6, 2) / 6),
                        7 * 10000.0 ** (-torch.arange(0, 6, 2) / 6)])
    assert torch.allclose(cis[0, 0].real, angles.cos(), atol=1e-6)
    assert torch.allclose(cis[0, 0].imag, angles.sin(), atol=1e-6)
    x = torch.zeros(1, 1, 1, 16)
    x[..., 0] = 1.0  # (x0, x1) = (1, 0) rotates to (cos, sin) in channels 0 and 1 — interleaved pairs
    out = apply_rope(x, cis)
    assert torch.allclose(out[0, 0, 0, :2], torch.stack([angles[0].cos(), angles[0].sin()]), atol=1e-6)
    assert torch.count_nonzero(out[0, 0, 0, 2:]) == 0
    # padded positions get zero factors
    zeroed = rope(torch.tensor([[[3, 5, 7]]]), valid=torch.tensor([[False]]))
    assert torch.count_nonzero(zeroed) == 0


def test_gradient_checkpointing_same_grads_and_less_memory_of_activations():
    cfg = make_config(**TINY_CONFIGS["gqa2-ref2"])
    a = randomised(NextDiT(cfg))
    b = randomised(NextDiT(cfg))
    b.set_gradient_checkpointing(True)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    feats, mask = caption_batch(2, 6, 32, [6, 2])
    saved, calls = {}, {}
    for m in (a, b):
        counts = calls[m] = {"forward": 0, "backward": 0}
        phase = "forward"

        def count(*_, counts=counts):
            counts[phase] += 1

        for block in m.blocks():
            # a pre-hook: a recomputation stops early, once it has what backward needs
            block.register_forward_pre_hook(count)
        sizes = []

        def pack(tensor, sizes=sizes):
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        # what autograd keeps for backward outside checkpointed regions (inside them, checkpoint's
        # own hooks keep nothing but the block inputs)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = m(x, t, feats, mask).square().mean()
        phase = "backward"
        loss.backward()
        saved[m] = sum(sizes)
    n_blocks = len(a.blocks())
    assert calls[a] == {"forward": n_blocks, "backward": 0}
    assert calls[b] == {"forward": n_blocks, "backward": n_blocks}  # every block recomputed in backward
    assert saved[b] < saved[a] / 2
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


def test_qk_reach_attention_in_vs_dtype_under_autocast(monkeypatch):
    """bf16-mixed keeps fp32 weights: the fp32 QK-norm weight must not leave q/k in fp32 beside a
    bf16 v, or flash-attn (fp16/bf16 only) is never chosen and backend="flash" refuses."""
    import lumina_lightning.models.nextdit as nextdit

    seen = []
    real = nextdit.attention

    def spy(q, k, v, mask, backend="auto"):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, mask, backend)

    monkeypatch.setattr(nextdit, "attention", spy)
    model = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"])))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    feats, mask = caption_batch(2, 6, 32, [6, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, feats, mask).float().square().mean().backward()
    assert len(seen) == len(model.blocks())
    assert set(seen) == {(torch.bfloat16,) * 3}
    seen.clear()
    model(x, t, feats, mask)  # fp32: nothing cast
    assert set(seen) == {(torch.float32,) * 3}


@pytest.mark.parametrize("single", [torch.tensor(0.4), torch.tensor([0.4]), 0.4])
def test_one_time_broadcasts_to_the_batch(single):
    model = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"]))).eval()
    x = torch.randn(3, 4, 8, 8)
    feats, mask = caption_batch(3, 6, 32, [6, 2, 4])
    with torch.no_grad():
        assert torch.equal(model(x, single, feats, mask), model(x, torch.full((3,), 0.4), feats, mask))
    with pytest.raises(ValueError, match="t has 2 values for a batch of 3"):
        model(x, torch.tensor([0.1, 0.2]), feats, mask)


def test_non_finite_caption_padding_never_reaches_real_tokens():
    model = randomised(NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"]))).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    feats, mask = caption_batch(2, 6, 32, [6, 3])
    bad = feats.clone()
    bad[1, 3:, 0] = float("nan")
    bad[1, 4, 1] = float("inf")
    with torch.no_grad():
        assert torch.equal(model(x, t, bad, mask), model(x, t, feats, mask))


def test_attention_backends_agree_and_flash_is_optional():
    from lumina_lightning.models import attention as attn

    q, k, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    out = attn.attention(q, k, v, mask, backend="auto")
    # reference: explicit softmax with repeat-interleaved KV heads (query head h -> KV head h // 2)
    kr, vr = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("blhd,bmhd->bhlm", q, kr) / 8**0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ref = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), vr)
    assert torch.allclose(out, ref, atol=1e-5)
    if not (attn.HAS_FLASH_ATTN and torch.cuda.is_available()):
        with pytest.raises(RuntimeError, match="flash"):
            attn.attention(q, k, v, mask, backend="flash")


@pytest.mark.gpu
def test_flash_matches_sdpa_on_cuda():
    from lumina_lightning.models import attention as attn

    pytest.importorskip("flash_attn")
    q = torch.randn(2, 64, 4, 32, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 64, 2, 32, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 64, 2, 32, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    mask[1, 40:] = False
    a = attn.attention(q, k, v, mask, backend="flash")
    b = attn.attention(q, k, v, mask, backend="sdpa")
    assert (a[mask] - b[mask]).abs().max().item() < 2e-2


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------

EXPECTED_PARAMS = {
    # spec §1.1: 26 × 87,312,576 (modulated) + 2 × 87,312,576 + 2 × 77,866,176 + embedders/final/norm_final
    "NextDiT_2B_GQA_patch2_Adaln_Refiner": 2_609_771_456,
    # ours by the same arithmetic, for the unreleased sizes of the official models/model.py
    "NextDiT_3B_GQA_patch2_Adaln_Refiner": 3_734_828_912,
    "NextDiT_4B_GQA_patch2_Adaln_Refiner": 4_792_618_496,
    "NextDiT_7B_GQA_patch2_Adaln_Refiner": 8_247_662_336,
    "NextDiT_debug": 87_280,
    "NextDiT_mini": 1_083_856,
    "NextDiT_tiny": 1_928_208,
    "NextDiT_small": 10_020_240,
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_parameter_count_on_meta_device(name):
    with torch.device("meta"):
        model = FACTORIES[name]()
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    assert model.parameter_count() == EXPECTED_PARAMS[name]


def test_released_block_sizes_match_spec():
    with torch.device("meta"):
        model = NextDiT_2B_GQA_patch2_Adaln_Refiner()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.layers[0]) == 87_312_576
    assert count(model.noise_refiner[0]) == 87_312_576
    assert count(model.context_refiner[0]) == 77_866_176
    assert model.config.ffn_hidden_dim == 9216
    assert model.layers[0].attention.qkv.weight.shape == (3840, 2304)
    assert isinstance(model.layers[0], JointTransformerBlock)


def test_norm_final_is_kept_but_frozen():
    model = NextDiT(make_config(**TINY_CONFIGS["gqa2-ref2"]))
    assert "norm_final.weight" in model.state_dict()
    assert not model.norm_final.weight.requires_grad


def test_factory_overrides_and_bad_config_messages():
    with torch.device("meta"):
        m = NextDiT_2B_GQA_patch2_Adaln_Refiner(cap_feat_dim=384)
    assert m.cap_embedder[1].weight.shape == (2304, 384)
    with pytest.raises(ValueError, match="axes_dims"):
        NextDiTConfig(dim=64, n_heads=4, axes_dims=[4, 4, 4])
    with pytest.raises(ValueError, match="unknown NextDiTConfig field"):
        NextDiTConfig.from_dict({"dimm": 3})


@pytest.mark.parametrize("argv, message", [
    (["--caption-len", "300"], "--caption-len must be <= 299 for NextDiT_tiny, got 300"),
    (["--latent", "258"], "--latent must be <= 256 for NextDiT_tiny (its RoPE tables), got 258"),
])
def test_smoke_refuses_sizes_beyond_the_rope_tables(argv, message, capsys):
    """`lumina smoke` checks what the model would only refuse deep in its forward pass."""
    from lumina_lightning.models.smoke import main

    with pytest.raises(SystemExit) as exit_:
        main(["--size", "NextDiT_tiny", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
