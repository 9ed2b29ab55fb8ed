"""State-dict and config mapping between the official, diffusers and our layouts (spec §2).

Our module names *are* the official ones, so "ours" and "official" share keys; diffusers renames
keys and splits the fused ``qkv``. Every rule here is an explicit table (no substring replacement),
the qkv split sizes come from the config (never the 2B's hard-coded 2304/768/768), and unknown keys
are errors, never silently dropped.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lumina_lightning.models.config import NextDiTConfig, ffn_hidden_dim

COMFY_PREFIX = "model.diffusion_model."

# top-level (non-block) keys: official -> diffusers
_TOP = {
    "x_embedder.weight": "x_embedder.weight",
    "x_embedder.bias": "x_embedder.bias",
    "t_embedder.mlp.0.weight": "time_caption_embed.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "time_caption_embed.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "time_caption_embed.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "time_caption_embed.timestep_embedder.linear_2.bias",
    "cap_embedder.0.weight": "time_caption_embed.caption_embedder.0.weight",
    "cap_embedder.1.weight": "time_caption_embed.caption_embedder.1.weight",
    "cap_embedder.1.bias": "time_caption_embed.caption_embedder.1.bias",
    "final_layer.adaLN_modulation.1.weight": "norm_out.linear_1.weight",
    "final_layer.adaLN_modulation.1.bias": "norm_out.linear_1.bias",
    "final_layer.linear.weight": "norm_out.linear_2.weight",
    "final_layer.linear.bias": "norm_out.linear_2.bias",
}

# per-block suffixes shared by both block kinds: official -> diffusers
_BLOCK_COMMON = {
    "attention.out.weight": "attn.to_out.0.weight",
    "attention.q_norm.weight": "attn.norm_q.weight",
    "attention.k_norm.weight": "attn.norm_k.weight",
    "feed_forward.w1.weight": "feed_forward.linear_1.weight",
    "feed_forward.w2.weight": "feed_forward.linear_2.weight",
    "feed_forward.w3.weight": "feed_forward.linear_3.weight",
    "attention_norm2.weight": "norm2.weight",
    "ffn_norm1.weight": "ffn_norm1.weight",
    "ffn_norm2.weight": "ffn_norm2.weight",
}
# modulated blocks (noise_refiner, layers): attention_norm1 lives inside diffusers' LuminaRMSNormZero
_BLOCK_MOD = {
    **_BLOCK_COMMON,
    "attention_norm1.weight": "norm1.norm.weight",
    "adaLN_modulation.1.weight": "norm1.linear.weight",
    "adaLN_modulation.1.bias": "norm1.linear.bias",
}
# unmodulated blocks (context_refiner): a plain RMSNorm named norm1
_BLOCK_CTX = {**_BLOCK_COMMON, "attention_norm1.weight": "norm1.weight"}
_QKV = "attention.qkv.weight"
_QKV_DIFFUSERS = ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight")
_BLOCK_RE = re.compile(r"^(noise_refiner|context_refiner|layers)\.(\d+)\.(.+)$")


class ConversionError(ValueError):
    """A state dict that does not fit the expected layout; the message lists the offending keys."""


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str = COMFY_PREFIX) -> dict[str, torch.Tensor]:
    """Drop a key prefix (ComfyUI all-in-one files use ``model.diffusion_model.``) where present."""
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _fail_unknown(unknown: list[str], layout: str) -> None:
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 20 else "")
        raise ConversionError(f"keys that are not part of the {layout} Next-DiT layout: {shown}")


def official_to_diffusers(state_dict: dict[str, torch.Tensor], config: NextDiTConfig) -> dict[str, torch.Tensor]:
    """Official/our keys -> diffusers ``Lumina2Transformer2DModel`` keys (spec §2.3)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    q, k, v = config.qkv_split
    for key, value in strip_prefix(state_dict).items():
        if key == "norm_final.weight":  # unused by the forward; diffusers drops it (spec §1.2)
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        m = _BLOCK_RE.match(key)
        if not m:
            unknown.append(key)
            continue
        group, idx, suffix = m.groups()
        table = _BLOCK_CTX if group == "context_refiner" else _BLOCK_MOD
        base = f"{group}.{idx}."
        if suffix == _QKV:
            if value.shape[0] != q + k + v:
                raise ConversionError(
                    f"{key} has {value.shape[0]} rows but the config expects q+k+v = {q}+{k}+{v} = {q + k + v}"
                )
            for name, part in zip(_QKV_DIFFUSERS, value.split([q, k, v], dim=0)):
                out[base + name] = part.clone()
        elif suffix in table:
            out[base + table[suffix]] = value
        else:
            unknown.append(key)
    _fail_unknown(unknown, "official")
    return out


def diffusers_to_official(
    state_dict: dict[str, torch.Tensor], config: NextDiTConfig, add_norm_final: bool = True
) -> dict[str, torch.Tensor]:
    """diffusers keys -> official/our keys; concatenates q/k/v back into ``qkv``.

    ``add_norm_final`` adds the unused ``norm_final.weight`` (ones) so strict official loading works.
    """
    inv_top = {v: k for k, v in _TOP.items()}
    inv_mod = {v: k for k, v in _BLOCK_MOD.items()}
    inv_ctx = {v: k for k, v in _BLOCK_CTX.items()}
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in strip_prefix(state_dict).items():
        if key in inv_top:
            out[inv_top[key]] = value
            continue
        m = _BLOCK_RE.match(key)
        if not m:
            unknown.append(key)
            continue
        group, idx, suffix = m.groups()
        base = f"{group}.{idx}."
        if suffix in _QKV_DIFFUSERS:
            qkv_parts.setdefault(base, {})[suffix] = value
            continue
        table = inv_ctx if group == "context_refiner" else inv_mod
        if suffix in table:
            out[base + table[suffix]] = value
        else:
            unknown.append(key)
    _fail_unknown(unknown, "diffusers")
    for base, parts in qkv_parts.items():
        missing = [n for n in _QKV_DIFFUSERS if n not in parts]
        if missing:
            raise ConversionError(f"{base}: cannot rebuild qkv, missing {[base + n for n in missing]}")
        out[base + _QKV] = torch.cat([parts[n] for n in _QKV_DIFFUSERS], dim=0)
    if add_norm_final and "norm_final.weight" not in out:
        ref = out.get("x_embedder.bias")
        dtype = ref.dtype if ref is not None else torch.float32
        out["norm_final.weight"] = torch.ones(config.dim, dtype=dtype)
    return out


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------

DIFFUSERS_CLASS = "Lumina2Transformer2DModel"


def config_to_diffusers(config: NextDiTConfig) -> dict[str, Any]:
    """Our config -> a diffusers ``config.json`` dict for ``Lumina2Transformer2DModel``.

    diffusers hard-codes what it cannot express (QK-norm always on with eps 1e-5, RoPE theta 1e4,
    256 frequency features, final LayerNorm eps 1e-6); a config that differs there has no diffusers
    equivalent and is refused rather than silently changed.
    """
    fixed = {"qk_norm": True, "qk_norm_eps": 1e-5, "rope_theta": 10000.0, "frequency_embedding_size": 256,
             "final_norm_eps": 1e-6}
    bad = {k: getattr(config, k) for k, v in fixed.items() if getattr(config, k) != v}
    if bad:
        raise ConversionError(f"diffusers' Lumina2Transformer2DModel cannot represent {bad} (it fixes {fixed})")
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": _diffusers_version(),
        "sample_size": 128,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "out_channels": None,
        "hidden_size": config.dim,
        "num_layers": config.n_layers,
        "num_refiner_layers": config.n_refiner_layers,
        "num_attention_heads": config.n_heads,
        "num_kv_heads": config.n_kv_heads,
        "multiple_of": config.multiple_of,
        "ffn_dim_multiplier": config.ffn_dim_multiplier,
        "norm_eps": config.norm_eps,
        "scaling_factor": 1.0,
        "axes_dim_rope": list(config.axes_dims),
        "axes_lens": list(config.axes_lens),
        "cap_feat_dim": config.cap_feat_dim,
    }


def config_from_diffusers(data: dict[str, Any]) -> NextDiTConfig:
    """A diffusers ``config.json`` dict -> our config (diffusers' class defaults fill missing fields)."""
    if data.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise ConversionError(f"not a Lumina2 transformer config: _class_name={data.get('_class_name')!r}")
    out_ch = data.get("out_channels")
    in_ch = data.get("in_channels", 16)
    if out_ch not in (None, in_ch):
        raise ConversionError(f"out_channels={out_ch} != in_channels={in_ch} is not supported (the official model ties them)")
    return NextDiTConfig(
        patch_size=data.get("patch_size", 2),
        in_channels=in_ch,
        dim=data.get("hidden_size", 2304),
        n_layers=data.get("num_layers", 26),
        n_refiner_layers=data.get("num_refiner_layers", 2),
        n_heads=data.get("num_attention_heads", 24),
        n_kv_heads=data.get("num_kv_heads", 8),
        multiple_of=data.get("multiple_of", 256),
        ffn_dim_multiplier=data.get("ffn_dim_multiplier"),
        norm_eps=data.get("norm_eps", 1e-5),
        qk_norm=True,
        qk_norm_eps=1e-5,
        # diffusers' class default is 1024, but the released config always sets it (spec §1.1)
        cap_feat_dim=data.get("cap_feat_dim", 1024),
        axes_dims=list(data.get("axes_dim_rope", (32, 32, 32))),
        axes_lens=list(data.get("axes_lens", (300, 512, 512))),
    )


def infer_config_from_official(
    state_dict: dict[str, torch.Tensor],
    base: NextDiTConfig | None = None,
    overrides: dict[str, Any] | None = None,
) -> NextDiTConfig:
    """Recover a config from official-layout shapes (for checkpoints without ``model_args.pth``).

    Widths, depths, heads and the FFN width are read off the tensors; what tensors cannot tell
    (patch size vs channels, RoPE axis split/lengths, eps) comes from ``overrides``, then ``base``,
    then the released defaults: patch 2 and an even three-way split of the head dim.
    """
    sd = strip_prefix(state_dict)
    overrides = dict(overrides or {})
    need = ["x_embedder.weight", "cap_embedder.1.weight", "layers.0.attention.qkv.weight",
            "layers.0.feed_forward.w1.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ConversionError(f"not an official Next-DiT state dict: missing {missing}")
    fields = (base or NextDiTConfig()).to_dict()
    fields.update({k: v for k, v in overrides.items() if k in ("patch_size", "n_heads", "multiple_of",
                                                               "ffn_dim_multiplier", "axes_dims")})
    dim, patch_feats = sd["x_embedder.weight"].shape
    patch = fields["patch_size"]
    qk_norm = "layers.0.attention.q_norm.weight" in sd
    # without a q_norm to read the head size from, trust the base/override head count
    head_dim = sd["layers.0.attention.q_norm.weight"].shape[0] if qk_norm else dim // fields["n_heads"]
    n_heads = dim // head_dim
    n_kv = (sd["layers.0.attention.qkv.weight"].shape[0] // head_dim - n_heads) // 2
    hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
    multiple_of, mult = fields["multiple_of"], fields["ffn_dim_multiplier"]
    if ffn_hidden_dim(dim, multiple_of, mult) != hidden:
        multiple_of, mult = next(
            ((m, None) for m in (256, 128, 64, 32, 16, 8, 4, 2, 1) if ffn_hidden_dim(dim, m, None) == hidden),
            # a width set by ffn_dim_multiplier: multiple_of = the width itself rounds int(mult·4·dim)
            # up to exactly it, where multiple_of 1 would keep a float-rounding shortfall (hidden − 1)
            (hidden, hidden / (4 * dim)),
        )
    axes = list(fields["axes_dims"])
    if sum(axes) != head_dim:
        if head_dim % 3 or (head_dim // 3) % 2:
            raise ConversionError(
                f"cannot infer the RoPE axis split for head_dim={head_dim}; pass axes_dims=[...] as an override"
            )
        axes = [head_dim // 3] * 3
    block_ids = lambda group: {int(m.group(2)) for k in sd if (m := _BLOCK_RE.match(k)) and m.group(1) == group}  # noqa: E731
    for group in ("layers", "noise_refiner", "context_refiner"):
        ids = block_ids(group)
        if ids != set(range(len(ids))):
            gaps = sorted(set(range(max(ids) + 1)) - ids)
            raise ConversionError(f"{group} blocks {gaps} are missing (the checkpoint has {group}.{max(ids)}): truncated "
                                  "or partial state dict")
    fields.update(
        in_channels=patch_feats // (patch * patch), dim=dim, n_layers=len(block_ids("layers")),
        n_refiner_layers=len(block_ids("noise_refiner")), n_heads=n_heads, n_kv_heads=n_kv,
        multiple_of=multiple_of, ffn_dim_multiplier=mult, qk_norm=qk_norm,
        cap_feat_dim=sd["cap_embedder.1.weight"].shape[1], axes_dims=axes,
    )
    fields.update(overrides)
    return NextDiTConfig.from_dict(fields)


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # diffusers is a dependency, but the key is informational only
        return "0.0.0"
