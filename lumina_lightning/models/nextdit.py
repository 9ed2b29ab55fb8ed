"""Unified Next-DiT (Lumina-Image 2.0), pure PyTorch.

Weight-compatible with the official ``NextDiT`` (module names and state-dict keys are the official
ones, spec §2.1) and numerically the same model as diffusers' ``Lumina2Transformer2DModel``.
Architecture: spec §1.2–§1.4. Time convention: :mod:`lumina_lightning.flow.convention` (t=0 noise,
t=1 data; the output is the velocity data − noise).

No Lightning, FSDP, DeepSpeed or ``torch.compile`` in this file: sharding, activation checkpointing
and compilation are applied from :mod:`lumina_lightning.training.parallelize`. The model only offers
the per-block gradient-checkpointing *switch* that place flips.

Deliberate implementation differences from the official code (same maths):

* RoPE tables are cached per device instead of rebuilt per call, and angles are computed in
  float64 like diffusers before rounding to complex64 (the official code rounds the angles to fp32
  first; diffusers multiplies in complex128; spec §1.2 "RoPE tables").
* Masks are dropped when nothing is padded (diffusers does the same for the joint sequence).
* GQA uses SDPA's ``enable_gqa`` instead of materialising repeated K/V (same head mapping h -> h//rep).
* The joint sequence is built and unpatchified with gathers instead of per-sample Python loops.
* Padded caption features are zeroed before the caption embedder (identical output on finite
  inputs; a NaN in padding no longer reaches real tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lumina_lightning.models.attention import attention
from lumina_lightning.models.config import NextDiTConfig, config_for

#################################################################################
#                               Basic layers                                    #
#################################################################################


class RMSNorm(nn.Module):
    """``y = x * rsqrt(mean(x²) + eps) * w``, normalised in fp32 and cast back before the weight (spec §1.2)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # same maths in one fused call (no cast to do): saves a kernel and its backward
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def modulate(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN scale-only modulation ``x * (1 + scale)``, broadcast over the sequence (no shift term)."""
    return x * (1 + scale.unsqueeze(1))


class TimestepEmbedder(nn.Module):
    """Raw t ∈ [0, 1] -> 256 sinusoidal features (cos first, max period 1e4) -> MLP (spec §1.2)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class FeedForward(nn.Module):
    """SwiGLU ``w2(silu(w1 x) * w3 x)`` without biases; hidden width from the multiple_of rule."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


#################################################################################
#                         Multi-axis RoPE ("M-RoPE")                            #
#################################################################################


class MultiAxisRope:
    """Per-axis RoPE tables for 3-axis positions (a0, a1, a2); spec §1.4.

    Head channels [0:d0) rotate with axis 0 (caption index / cap_len for image tokens), the next d1
    with the patch row and the last d2 with the patch column. Pairs (2k, 2k+1) form one complex
    number (interleaved convention, not rotate-half). A plain object like the official
    ``RopeEmbedder``: it owns no parameters or buffers, so state dicts stay official.
    """

    def __init__(self, axes_dims: list[int], axes_lens: list[int], theta: float = 10000.0) -> None:
        self.axes_dims = list(axes_dims)
        self.axes_lens = list(axes_lens)
        self.theta = theta
        self._cache: dict[torch.device, list[torch.Tensor]] = {}

    def tables(self, device: torch.device) -> list[torch.Tensor]:
        """complex64 ``exp(i·pos·freq)`` per axis, each (axes_len, axes_dim/2); built once per device.

        Angles are computed in float64 (like diffusers) before rounding the factors to complex64.
        """
        if device not in self._cache:
            tables = []
            for d, n in zip(self.axes_dims, self.axes_lens):
                freqs = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
                angles = torch.outer(torch.arange(n, dtype=torch.float64), freqs)
                tables.append(torch.polar(torch.ones_like(angles), angles).to(torch.complex64).to(device))
            self._cache[device] = tables
        return self._cache[device]

    def __call__(self, pos: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Gather the factors for positions ``pos`` (B, L, 3) -> (B, L, head_dim/2) complex64.

        Where ``valid`` is False the factors are zero (the official per-stream tables zero padded
        caption/image positions, which zeroes q and k there; those keys are masked anyway).
        """
        tables = self.tables(pos.device)
        cis = torch.cat([tables[a][pos[..., a].long()] for a in range(3)], dim=-1)
        if valid is not None:
            cis = cis * valid[..., None]
        return cis


def apply_rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` (B, L, H, D) by per-token factors; in fp32 (spec §1.2)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * cis.unsqueeze(2)).flatten(-2).type_as(x)


#################################################################################
#                               Transformer blocks                              #
#################################################################################


class JointAttention(nn.Module):
    """Fused-qkv GQA self-attention with per-head QK RMSNorm and multi-axis RoPE (spec §1.2)."""

    def __init__(self, cfg: NextDiTConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.split = cfg.qkv_split
        self.qkv = nn.Linear(cfg.dim, sum(self.split), bias=False)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.qk_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.qk_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.backend = "auto"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = self.q_norm(q.view(b, n, self.n_heads, self.head_dim))
        k = self.k_norm(k.view(b, n, self.n_kv_heads, self.head_dim))
        v = v.view(b, n, self.n_kv_heads, self.head_dim)
        # Spec §1.2: RoPE in fp32, then q and k are cast back to the qkv projection's dtype (v's).
        # Under autocast with fp32 weights (bf16-mixed) the norms' fp32 weights would otherwise
        # leave q/k in fp32 beside a bf16 v, and flash-attn (fp16/bf16 only) would never run.
        q, k = apply_rope(q, rope).to(v.dtype), apply_rope(k, rope).to(v.dtype)
        out = attention(q, k, v, mask, backend=self.backend)
        return self.out(out.flatten(2))


class JointTransformerBlock(nn.Module):
    """Sandwich-normed block; modulated (4-chunk scale-only adaLN, tanh gates) or not (spec §1.2)."""

    def __init__(self, cfg: NextDiTConfig, modulation: bool = True) -> None:
        super().__init__()
        self.modulation = modulation
        self.attention = JointAttention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.t_embed_dim, 4 * cfg.dim, bias=True))

    def modulation_chunks(self, adaln: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(scale_msa, gate_msa, scale_mlp, gate_mlp), in this order (spec §10 item 2)."""
        return self.adaLN_modulation(adaln).chunk(4, dim=1)

    def modulated_input(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        """``attention_norm1(x) * (1 + scale_msa)``: the attention input, also TeaCache's indicator."""
        return modulate(self.attention_norm1(x), self.modulation_chunks(adaln)[0])

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        rope: torch.Tensor,
        adaln: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.modulation:
            if adaln is None:
                raise ValueError("a modulated block needs the adaLN input")
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.modulation_chunks(adaln)
            h = self.attention(modulate(self.attention_norm1(x), scale_msa), mask, rope)
            # addcmul: x + tanh(gate) * norm(h) in one kernel
            x = torch.addcmul(x, gate_msa.unsqueeze(1).tanh(), self.attention_norm2(h))
            h = self.feed_forward(modulate(self.ffn_norm1(x), scale_mlp))
            return torch.addcmul(x, gate_mlp.unsqueeze(1).tanh(), self.ffn_norm2(h))
        x = x + self.attention_norm2(self.attention(self.attention_norm1(x), mask, rope))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class FinalLayer(nn.Module):
    """LayerNorm (no affine, eps 1e-6) x (1 + scale(c)), then Linear to p·p·C; no shift, no gate."""

    def __init__(self, cfg: NextDiTConfig) -> None:
        super().__init__()
        self.eps = cfg.final_norm_eps
        self.linear = nn.Linear(cfg.dim, cfg.patch_size**2 * cfg.out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.t_embed_dim, cfg.dim, bias=True))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (x.shape[-1],), eps=self.eps)
        return self.linear(modulate(x, self.adaLN_modulation(adaln)))


#################################################################################
#                                  Next-DiT                                     #
#################################################################################


@dataclass
class JointSequence:
    """Everything the main blocks and the output head need, built once per forward.

    Exposed so that inference accelerators (TeaCache) can run the stages separately:
    ``prepare`` -> ``run_layers`` -> ``finalize``.
    """

    hidden: torch.Tensor  # (B, L, D) [real caption tokens ; image tokens ; padding]
    mask: torch.Tensor | None  # (B, L) True on real tokens; None when nothing is padded
    rope: torch.Tensor
    adaln: torch.Tensor  # (B, t_embed_dim)
    cap_lens: torch.Tensor  # (B,) int64
    latent_sizes: list[tuple[int, int]]  # (H, W) per sample, in latent pixels
    is_tensor: bool
    out_dtype: torch.dtype


class NextDiT(nn.Module):
    """Unified Next-DiT: single-stream joint attention over [caption ; image] tokens.

    ``forward(x, t, cap_feats, cap_mask)`` keeps the official signature and convention:

    Args:
        x: latents, a (B, C, H, W) tensor or a list of (C, H_i, W_i) tensors of mixed sizes.
        t: flow time in [0, 1], **0 = noise, 1 = data** (see ``flow.convention``); (B,) or scalar.
        cap_feats: (B, L, cap_feat_dim) text-encoder features, right-padded.
        cap_mask: (B, L) bool/int, True on real tokens (a prefix of each row).

    Returns:
        The velocity (data − noise), same shape/type as ``x`` (tensor or list).
    """

    def __init__(self, config: NextDiTConfig | None = None, *, initialize: bool = True, **kwargs: Any) -> None:
        """``initialize=False`` skips the spec §1.6 initialisation, for callers that initialise or
        load the weights themselves (e.g. where the parameters are partitioned while they are
        built, as under DeepSpeed ZeRO-3, and must be gathered first)."""
        super().__init__()
        if config is None:
            config = NextDiTConfig(**kwargs)
        elif kwargs:
            config = config.replace(**kwargs)
        self.config = cfg = config
        self.patch_size = cfg.patch_size
        self.in_channels = self.out_channels = cfg.in_channels

        self.x_embedder = nn.Linear(cfg.patch_size**2 * cfg.in_channels, cfg.dim, bias=True)
        self.noise_refiner = nn.ModuleList(
            [JointTransformerBlock(cfg, modulation=True) for _ in range(cfg.n_refiner_layers)]
        )
        self.context_refiner = nn.ModuleList(
            [JointTransformerBlock(cfg, modulation=False) for _ in range(cfg.n_refiner_layers)]
        )
        self.t_embedder = TimestepEmbedder(cfg.t_embed_dim, cfg.frequency_embedding_size)
        self.cap_embedder = nn.Sequential(
            RMSNorm(cfg.cap_feat_dim, eps=cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim, bias=True)
        )
        self.layers = nn.ModuleList([JointTransformerBlock(cfg, modulation=True) for _ in range(cfg.n_layers)])
        # Created but never called by the official forward; kept (frozen) so official state dicts
        # load strictly and the parameter count matches the release (spec §1.2 "Unused parameter").
        self.norm_final = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.norm_final.weight.requires_grad_(False)
        self.final_layer = FinalLayer(cfg)

        self.rope = MultiAxisRope(cfg.axes_dims, cfg.axes_lens, cfg.rope_theta)
        self.gradient_checkpointing = False
        if initialize:
            self.initialize_weights()

    # -- construction helpers ----------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """Spec §1.6: xavier for projections, N(0, .02) time MLP, trunc-normal caption Linear,
        zero adaLN and zero final projection (every block starts as the identity)."""
        nn.init.xavier_uniform_(self.x_embedder.weight)
        nn.init.zeros_(self.x_embedder.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.trunc_normal_(self.cap_embedder[1].weight, std=0.02)
        nn.init.zeros_(self.cap_embedder[1].bias)
        for block in self.blocks():
            for lin in (block.attention.qkv, block.attention.out, block.feed_forward.w1,
                        block.feed_forward.w2, block.feed_forward.w3):
                nn.init.xavier_uniform_(lin.weight)
            if block.modulation:
                nn.init.zeros_(block.adaLN_modulation[1].weight)
                nn.init.zeros_(block.adaLN_modulation[1].bias)
        for lin in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()

    def blocks(self) -> list[JointTransformerBlock]:
        """Every transformer block (refiners + main): the unit of sharding and checkpointing."""
        return [*self.noise_refiner, *self.context_refiner, *self.layers]

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (non-reentrant) instead of storing them."""
        self.gradient_checkpointing = enabled

    def set_attention_backend(self, backend: str) -> None:
        """``auto`` | ``sdpa`` | ``flash`` for every block (see :mod:`.attention`)."""
        for block in self.blocks():
            block.attention.backend = backend

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward stages ----------------------------------------------------------------------------
    def _block(self, block: JointTransformerBlock, *args: Any) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def prepare(
        self,
        x: torch.Tensor | list[torch.Tensor],
        t: torch.Tensor | float,
        cap_feats: torch.Tensor,
        cap_mask: torch.Tensor,
        context: dict[Any, Any] | None = None,
    ) -> JointSequence:
        """Embed, refine and join: everything before the main blocks (spec §1.3 steps 1–3).

        ``context``: an optional dict, owned by the caller, for repeated calls with the *same*
        ``cap_feats`` / ``cap_mask`` (the steps of a sampler). The first call stores what depends
        only on the captions and the latent sizes — the caption embedder and context refiner
        output (the context refiner has no time modulation, spec §1.3), positions, RoPE tables,
        gather indices and masks — and later calls reuse it, so a step recomputes only the time
        embedding, the image tokens and the noise refiner. Results are bitwise identical to calls
        without it. For inference: a stored caption state carries no gradient history to reuse.
        """
        p = self.patch_size
        is_tensor = isinstance(x, torch.Tensor)
        images = list(x) if not is_tensor else None
        batch = x.shape[0] if is_tensor else len(images)
        device = cap_feats.device
        out_dtype = x.dtype if is_tensor else images[0].dtype
        w_dtype = self.x_embedder.weight.dtype
        if cap_feats.shape[0] != batch or cap_mask.shape[:2] != cap_feats.shape[:2]:
            raise ValueError(
                f"batch mismatch: x has {batch} samples, cap_feats {tuple(cap_feats.shape)}, cap_mask {tuple(cap_mask.shape)}"
            )

        # time ------------------------------------------------------------------------------------
        t = torch.as_tensor(t, device=device)
        if t.numel() == 1:  # one time for the whole batch, 0-d or (1,): broadcast like diffusers
            t = t.reshape(()).expand(batch)
        elif t.numel() != batch:
            raise ValueError(f"t has {t.numel()} values for a batch of {batch}: pass one per sample, or a single one")
        t = t.reshape(batch)
        adaln = self.t_embedder(t)

        # image tokens: patchify (features ordered (ph, pw, c), tokens row-major; spec §1.2)
        if is_tensor:
            sizes = [tuple(x.shape[-2:])] * batch
        else:
            sizes = [tuple(img.shape[-2:]) for img in images]
        geo_key = ("geometry", tuple(sizes))
        geo = context.get(geo_key) if context is not None else None
        if geo is None:
            for h, w in set(sizes):
                if h % p or w % p:
                    raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {p}")
        n_img = max((h // p) * (w // p) for h, w in sizes)
        if is_tensor:
            c = x.shape[1]
            tokens = x.view(batch, c, sizes[0][0] // p, p, sizes[0][1] // p, p).permute(0, 2, 4, 3, 5, 1)
            tokens = tokens.reshape(batch, n_img, p * p * c)
        else:
            tokens = x_pad = images[0].new_zeros(batch, n_img, p * p * images[0].shape[0])
            for i, img in enumerate(images):
                c, h, w = img.shape
                n = (h // p) * (w // p)
                x_pad[i, :n] = img.view(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0).reshape(-1, p * p * c)

        # captions (refined once per context) and the geometry of [caption ; image] ---------------
        cap = context.get("captions") if context is not None else None
        if cap is None:
            cap = self._caption_part(cap_feats, cap_mask)
            if context is not None:
                context["captions"] = cap
        cap_lens, cap_h = cap
        if cap_h.shape[0] != batch:
            raise ValueError(f"this context holds captions for {cap_h.shape[0]} samples, not {batch}: use one context "
                             "per set of captions")
        if geo is None:
            geo = self._geometry(cap_lens, cap_mask, sizes, device)
            if context is not None:
                context[geo_key] = geo

        # noise refiner ---------------------------------------------------------------------------
        img_h = self.x_embedder(tokens.to(w_dtype))
        for block in self.noise_refiner:
            img_h = self._block(block, img_h, geo["img_attn_mask"], geo["img_rope"], adaln)

        # joint sequence [real caption ; image ; pad] via one gather (spec §1.3 step 3)
        joint = torch.cat((cap_h, img_h), dim=1)
        joint = torch.gather(joint, 1, geo["src"][..., None].expand(-1, -1, joint.shape[-1]))
        # where(), not a multiply: a padded row may hold non-finite values (e.g. a caption row with
        # no real token attends to nothing) and 0 * nan would leak into masked keys' values.
        joint = torch.where(geo["valid"][..., None], joint, torch.zeros((), dtype=joint.dtype, device=joint.device))
        return JointSequence(
            hidden=joint,
            mask=geo["joint_mask"],
            rope=geo["joint_rope"],
            adaln=adaln,
            cap_lens=cap_lens,
            latent_sizes=sizes,
            is_tensor=is_tensor,
            out_dtype=out_dtype,
        )

    def _caption_part(self, cap_feats: torch.Tensor, cap_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(caption lengths, embedded and context-refined caption tokens): no dependence on x or t."""
        device = cap_feats.device
        # real tokens must be a right-padded prefix (official `cap_mask.sum(1)` semantics)
        cap_mask = cap_mask.bool()
        n_cap = cap_feats.shape[1]
        cap_lens = cap_mask.sum(dim=1)
        ar_cap = torch.arange(n_cap, device=device)
        if not torch.equal(cap_mask, ar_cap[None] < cap_lens[:, None]):
            raise ValueError("cap_mask must mark a prefix of each caption (right padding), like the tokenizer's mask")
        self._check_positions(int(cap_lens.max()), 0, 0)  # before the caption RoPE lookup
        # positions (spec §1.4): caption j -> (j, 0, 0); padding -> 0
        zeros = torch.zeros(cap_feats.shape[0], n_cap, dtype=torch.long, device=device)
        cap_pos = torch.stack((ar_cap[None].expand(cap_feats.shape[0], n_cap), zeros, zeros), dim=-1) * cap_mask[..., None]
        # Deviation from the official code (same result on finite inputs): padded caption rows are
        # zeroed first, so a NaN/inf there cannot reach real tokens through 0-weighted masked values.
        cap_feats = torch.where(cap_mask[..., None], cap_feats, torch.zeros((), dtype=cap_feats.dtype, device=device))
        cap_h = self.cap_embedder(cap_feats.to(self.x_embedder.weight.dtype))
        cap_attn_mask = None if cap_mask.all() else cap_mask
        cap_rope = self.rope(cap_pos, cap_mask)
        for block in self.context_refiner:
            cap_h = self._block(block, cap_h, cap_attn_mask, cap_rope)
        return cap_lens, cap_h

    def _geometry(
        self, cap_lens: torch.Tensor, cap_mask: torch.Tensor, sizes: list[tuple[int, int]], device: torch.device
    ) -> dict[str, Any]:
        """Positions, RoPE tables, masks and gather indices of the image and joint sequences."""
        p = self.patch_size
        batch, n_cap = cap_mask.shape[:2]
        grid_h = torch.tensor([h // p for h, _ in sizes], device=device)
        grid_w = torch.tensor([w // p for _, w in sizes], device=device)
        img_lens = grid_h * grid_w
        img_lens_list = img_lens.tolist()
        n_img = max(img_lens_list)
        self._check_positions(int(cap_lens.max()), int(grid_h.max()), int(grid_w.max()))
        # positions (spec §1.4): image token (r, c) -> (cap_len, r, c); padding -> 0
        ar_img = torch.arange(n_img, device=device)
        img_valid = ar_img[None] < img_lens[:, None]
        img_pos = torch.stack(
            (
                cap_lens[:, None].expand(batch, n_img),
                ar_img[None] // grid_w[:, None],
                ar_img[None] % grid_w[:, None],
            ),
            dim=-1,
        ) * img_valid[..., None]
        seq_lens = cap_lens + img_lens
        n_seq = int(seq_lens.max())
        ar_seq = torch.arange(n_seq, device=device)[None]
        is_cap = ar_seq < cap_lens[:, None]
        k = ar_seq - cap_lens[:, None]
        is_img = (k >= 0) & (k < img_lens[:, None])
        valid = is_cap | is_img
        kc = k.clamp(min=0)
        joint_pos = torch.stack(
            (
                torch.where(is_cap, ar_seq, cap_lens[:, None].expand(batch, n_seq)),
                torch.where(is_img, kc // grid_w[:, None], 0),
                torch.where(is_img, kc % grid_w[:, None], 0),
            ),
            dim=-1,
        ) * valid[..., None]
        return {
            "img_attn_mask": None if len(set(img_lens_list)) == 1 else img_valid,
            "img_rope": self.rope(img_pos, img_valid),
            "src": torch.where(is_cap, ar_seq, torch.where(is_img, n_cap + k, 0)),
            "valid": valid,
            "joint_mask": None if len(set(seq_lens.tolist())) == 1 else valid,
            "joint_rope": self.rope(joint_pos),
        }

    def _check_positions(self, max_cap_len: int, max_rows: int, max_cols: int) -> None:
        # Positions past a RoPE table would silently clamp/wrap; fail with the limit instead (spec §1.4).
        lens = self.config.axes_lens
        if max_cap_len >= lens[0]:
            raise ValueError(
                f"caption of {max_cap_len} tokens is too long: this model allows at most {lens[0] - 1} "
                f"(axes_lens[0]={lens[0]}; image tokens sit at position cap_len)"
            )
        if max_rows > lens[1] or max_cols > lens[2]:
            raise ValueError(
                f"latent grid of {max_rows}x{max_cols} patches exceeds the RoPE tables ({lens[1]}x{lens[2]} patches)"
            )

    def run_layers(self, hidden: torch.Tensor, seq: JointSequence) -> torch.Tensor:
        """The main joint blocks (spec §1.3 step 4)."""
        for block in self.layers:
            hidden = self._block(block, hidden, seq.mask, seq.rope, seq.adaln)
        return hidden

    def finalize(self, hidden: torch.Tensor, seq: JointSequence) -> torch.Tensor | list[torch.Tensor]:
        """Final layer on the image tokens and unpatchify (spec §1.3 step 5, §1.5)."""
        p, c = self.patch_size, self.out_channels
        sizes = seq.latent_sizes
        img_lens = [(h // p) * (w // p) for h, w in sizes]
        n_img = max(img_lens)
        # Only image tokens are projected: the caption rows would be discarded anyway.
        idx = seq.cap_lens[:, None] + torch.arange(n_img, device=hidden.device)[None]
        idx = idx.clamp(max=hidden.shape[1] - 1)
        img_h = torch.gather(hidden, 1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        out = self.final_layer(img_h, seq.adaln)
        if seq.is_tensor:
            h, w = sizes[0]
            out = out.view(-1, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(-1, c, h, w)
            return out.to(seq.out_dtype)
        return [
            out[i, : n].view(h // p, w // p, p, p, c).permute(4, 0, 2, 1, 3).reshape(c, h, w).to(seq.out_dtype)
            for i, (n, (h, w)) in enumerate(zip(img_lens, sizes))
        ]

    def forward(
        self,
        x: torch.Tensor | list[torch.Tensor],
        t: torch.Tensor | float,
        cap_feats: torch.Tensor,
        cap_mask: torch.Tensor,
        context: dict[Any, Any] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        seq = self.prepare(x, t, cap_feats, cap_mask, context)
        return self.finalize(self.run_layers(seq.hidden, seq), seq)


#################################################################################
#                       Size factories (official names)                        #
#################################################################################


def _factory(name: str):
    def build(**kwargs: Any) -> NextDiT:
        return NextDiT(config_for(name, **kwargs))

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"Build ``{name}``; keyword arguments override config fields (see ``NextDiTConfig``)."
    return build


NextDiT_2B_GQA_patch2_Adaln_Refiner = _factory("NextDiT_2B_GQA_patch2_Adaln_Refiner")
NextDiT_3B_GQA_patch2_Adaln_Refiner = _factory("NextDiT_3B_GQA_patch2_Adaln_Refiner")
NextDiT_4B_GQA_patch2_Adaln_Refiner = _factory("NextDiT_4B_GQA_patch2_Adaln_Refiner")
NextDiT_7B_GQA_patch2_Adaln_Refiner = _factory("NextDiT_7B_GQA_patch2_Adaln_Refiner")
NextDiT_debug = _factory("NextDiT_debug")
NextDiT_mini = _factory("NextDiT_mini")
NextDiT_tiny = _factory("NextDiT_tiny")
NextDiT_small = _factory("NextDiT_small")

FACTORIES = {
    f.__name__: f
    for f in (
        NextDiT_2B_GQA_patch2_Adaln_Refiner,
        NextDiT_3B_GQA_patch2_Adaln_Refiner,
        NextDiT_4B_GQA_patch2_Adaln_Refiner,
        NextDiT_7B_GQA_patch2_Adaln_Refiner,
        NextDiT_debug,
        NextDiT_mini,
        NextDiT_tiny,
        NextDiT_small,
    )
}
