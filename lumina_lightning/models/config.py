"""Configuration of the Unified Next-DiT and its named sizes.

Field names follow the official ``NextDiT.__init__`` (spec §1.1) so that a factory call such as
``NextDiT_2B_GQA_patch2_Adaln_Refiner(in_channels=16, qk_norm=True, cap_feat_dim=2304)`` reads the
same as in the official repository. Mapping to diffusers' ``Lumina2Transformer2DModel`` config
names lives in :mod:`lumina_lightning.models.convert`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden width: ``multiple_of * ceil(int(mult * 4 * dim) / multiple_of)`` (spec §1.2 FFN).

    The official ``FeedForward`` starts from ``4 * dim`` and (unlike LLaMA) does *not* apply the
    2/3 factor; 2304 -> 9216 for the released model.
    """
    hidden = 4 * dim
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class NextDiTConfig:
    """Hyper-parameters of a Unified Next-DiT.

    Defaults are the released Lumina-Image 2.0 (2.6B) model, *including* the values its training
    script passes on the command line (``in_channels=16``, ``qk_norm=True``, ``cap_feat_dim=2304``);
    the official ``NextDiT`` class defaults (4 / False / 5120) are for older models.
    """

    patch_size: int = 2
    in_channels: int = 16
    dim: int = 2304
    n_layers: int = 26
    n_refiner_layers: int = 2
    n_heads: int = 24
    n_kv_heads: int = 8
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    qk_norm: bool = True
    # Official q/k norms are built as ``RMSNorm(head_dim)`` without eps: 1e-5 with apex (its
    # FusedRMSNorm default, and what diffusers uses), 1e-6 with the fallback class. 1e-5 matches the
    # released checkpoints as run by the official code with apex and by diffusers (spec §1.2).
    qk_norm_eps: float = 1e-5
    cap_feat_dim: int = 2304
    axes_dims: list[int] = field(default_factory=lambda: [32, 32, 32])
    axes_lens: list[int] = field(default_factory=lambda: [300, 512, 512])
    rope_theta: float = 10000.0
    frequency_embedding_size: int = 256
    final_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.axes_dims = [int(a) for a in self.axes_dims]
        self.axes_lens = [int(a) for a in self.axes_lens]
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        elif sum(self.axes_dims) != self.head_dim:
            problems.append(f"axes_dims={self.axes_dims} must sum to head_dim={self.head_dim} (dim // n_heads)")
        if any(a % 2 for a in self.axes_dims):
            problems.append(f"every RoPE axis dim must be even, got axes_dims={self.axes_dims}")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            problems.append("axes_dims and axes_lens need 3 entries (caption/sequence, row, column)")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if problems:
            raise ValueError("invalid NextDiTConfig: " + "; ".join(problems))

    # derived sizes -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def t_embed_dim(self) -> int:
        """Width of the timestep embedding / adaLN input: ``min(dim, 1024)`` (spec §1.2)."""
        return min(self.dim, 1024)

    @property
    def ffn_hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def qkv_split(self) -> tuple[int, int, int]:
        """Row sizes of the fused ``qkv`` weight: (q, k, v). Used by the diffusers converter."""
        hd = self.head_dim
        return self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd

    @property
    def max_caption_len(self) -> int:
        """Image tokens sit at axis-0 position ``cap_len``, so captions must be < axes_lens[0] (spec §1.4)."""
        return self.axes_lens[0] - 1

    # serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NextDiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown NextDiTConfig field(s): {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def replace(self, **overrides: Any) -> "NextDiTConfig":
        return NextDiTConfig.from_dict({**self.to_dict(), **overrides})


# ------------------------------------------------------------------------------------------------
# Named sizes. The official names build the official shapes (spec §1.1); the debug sizes are ours.
# ------------------------------------------------------------------------------------------------

_OFFICIAL = dict(in_channels=16, qk_norm=True, cap_feat_dim=2304, axes_lens=[300, 512, 512])

SIZES: dict[str, dict[str, Any]] = {
    # the released 2.6B model
    "NextDiT_2B_GQA_patch2_Adaln_Refiner": dict(
        _OFFICIAL, patch_size=2, dim=2304, n_layers=26, n_heads=24, n_kv_heads=8, axes_dims=[32, 32, 32]
    ),
    # sizes defined (not released) in the official models/model.py
    "NextDiT_3B_GQA_patch2_Adaln_Refiner": dict(
        _OFFICIAL, patch_size=2, dim=2592, n_layers=30, n_heads=24, n_kv_heads=8, axes_dims=[36, 36, 36]
    ),
    "NextDiT_4B_GQA_patch2_Adaln_Refiner": dict(
        _OFFICIAL, patch_size=2, dim=2880, n_layers=32, n_heads=24, n_kv_heads=8, axes_dims=[40, 40, 40]
    ),
    "NextDiT_7B_GQA_patch2_Adaln_Refiner": dict(
        _OFFICIAL, patch_size=2, dim=3840, n_layers=32, n_heads=32, n_kv_heads=8, axes_dims=[40, 40, 40]
    ),
    # debug / CPU sizes (ours). Same architecture, small widths; in_channels and cap_feat_dim are
    # usually overridden by the recipe (pixel autoencoder -> 3 channels, MiniLM -> 384 features).
    "NextDiT_debug": dict(
        patch_size=2, in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=1,
        multiple_of=16, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[300, 64, 64],
    ),
    "NextDiT_mini": dict(
        patch_size=2, in_channels=4, dim=96, n_layers=4, n_refiner_layers=1, n_heads=3, n_kv_heads=1,
        multiple_of=32, cap_feat_dim=384, axes_dims=[8, 12, 12], axes_lens=[300, 128, 128],
    ),
    "NextDiT_tiny": dict(
        patch_size=2, in_channels=4, dim=128, n_layers=4, n_refiner_layers=1, n_heads=4, n_kv_heads=2,
        multiple_of=64, cap_feat_dim=384, axes_dims=[8, 12, 12], axes_lens=[300, 128, 128],
    ),
    "NextDiT_small": dict(
        patch_size=2, in_channels=4, dim=256, n_layers=6, n_refiner_layers=1, n_heads=8, n_kv_heads=4,
        multiple_of=64, cap_feat_dim=384, axes_dims=[8, 12, 12], axes_lens=[300, 256, 256],
    ),
}


def config_for(name: str, **overrides: Any) -> NextDiTConfig:
    """The config of a named size, with field overrides (e.g. ``cap_feat_dim=384``)."""
    if name not in SIZES:
        import difflib

        close = difflib.get_close_matches(name, SIZES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown Next-DiT size {name!r}.{hint} Known sizes: {sorted(SIZES)}")
    return NextDiTConfig.from_dict({**SIZES[name], **overrides})
