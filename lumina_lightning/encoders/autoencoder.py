"""Frozen autoencoders between pixels in [-1, 1] and the latents the Next-DiT models (spec §4).

* :class:`DiffusersVAE` wraps diffusers' ``AutoencoderKL`` from a local folder — the FLUX VAE for
  real recipes: ``z = (mode(E(x)) − shift)·scale`` and ``x = D(z/scale + shift)`` with
  scale 0.3611, shift 0.1159 read from its config (training uses the posterior mode, not a sample).
* :class:`PixelAutoencoder` is the identity on pixels, for tiny CPU runs where a random VAE would
  only add noise: the model then learns directly in (down-sampled) pixel space.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch


class Autoencoder(Protocol):
    latent_channels: int
    downsample: int

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def identity(self) -> dict[str, Any]: ...


class PixelAutoencoder(torch.nn.Module):
    """Identity autoencoder: latents are the [-1, 1] pixels themselves (3 channels, factor 1)."""

    latent_channels = 3
    downsample = 1

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)

    def identity(self) -> dict[str, Any]:
        return {"kind": "pixel"}


class DiffusersVAE(torch.nn.Module):
    """A frozen diffusers ``AutoencoderKL`` with Lumina's latent shift and scale.

    Args:
        path: local folder of the VAE (``config.json`` + weights), or a pipeline folder with ``vae/``.
        scaling_factor, shift_factor: override the config's values (FLUX: 0.3611 / 0.1159).
        dtype: compute dtype (the official code runs the VAE in bf16 on GPUs).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"VAE path {path} does not exist; autoencoders are loaded from local folders only")
        if (path / "vae").is_dir():
            path = path / "vae"
        self.path = str(path)
        self.vae = AutoencoderKL.from_pretrained(self.path, torch_dtype=dtype)
        self.vae.requires_grad_(False).eval()
        cfg = self.vae.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else cfg.scaling_factor)
        shift = shift_factor if shift_factor is not None else getattr(cfg, "shift_factor", None)
        self.shift_factor = float(shift or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.dtype = dtype

    def train(self, mode: bool = True) -> "DiffusersVAE":
        return super().train(False)  # frozen

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        mode = self.vae.encode(pixels.to(self.dtype)).latent_dist.mode()
        return ((mode - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.float().clamp(-1, 1)

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "vae",
            "path": os.path.abspath(self.path),
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }


def autoencoder_folder_info(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """What an autoencoder folder holds, from its ``config.json`` alone (no weights are read):
    ``{"kind": "conv" | "vae" | "unknown", "downsample": int | None, "latent_channels": int | None,
    "config": the config file, "what": a few words for messages}``; ``None`` where there is no
    ``config.json`` (yet) or it is no JSON object. A diffusers pipeline folder is read through its ``vae/``."""
    import json

    if not path:
        return None
    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    file = folder / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    from lumina_lightning.encoders.conv_autoencoder import FORMAT

    if cfg.get("format") == FORMAT:
        down = cfg.get("downsample", 8)
        return {"kind": "conv", "downsample": int(down), "latent_channels": cfg.get("latent_channels"),
                "config": str(file), "what": f"a conv autoencoder (config.json format {FORMAT!r})"}
    blocks = cfg.get("block_out_channels")
    if "AutoencoderKL" in str(cfg.get("_class_name", "")) or (isinstance(blocks, list) and "latent_channels" in cfg):
        down = 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else None
        return {"kind": "vae", "downsample": down, "latent_channels": cfg.get("latent_channels"),
                "config": str(file),
                "what": f"a diffusers VAE (config.json _class_name {cfg.get('_class_name', 'AutoencoderKL')!r})"}
    name = cfg.get("_class_name") or cfg.get("model_type") or cfg.get("format")
    return {"kind": "unknown", "downsample": None, "latent_channels": None, "config": str(file),
            "what": f"no autoencoder config ({name!r})" if name else "no autoencoder config"}


def check_autoencoder_kind(kind: str, path: str | os.PathLike | None, key: str = "autoencoder.kind") -> None:
    """Refuse a ``vae`` kind for a conv autoencoder folder and a ``conv`` kind for a diffusers VAE folder
    (each loader would otherwise fail on some file name, or read the folder wrongly). A folder that does
    not exist yet (``autoencoder.train`` makes it) or says nothing is left to the loader."""
    if kind not in ("vae", "conv"):
        return
    info = autoencoder_folder_info(path)
    if info is None or info["kind"] == "unknown" or info["kind"] == kind:
        return
    raise ValueError(
        f"`{key}` is {kind!r} but {path} holds {info['what']}: the kind does not match the folder; set "
        f"{key}={info['kind']}" + (" (and drop autoencoder.train)" if kind == "conv" else "")
        + " or point autoencoder.path at a " + ("diffusers AutoencoderKL folder" if kind == "vae"
                                               else "conv autoencoder folder")
    )


def build_autoencoder(kind: str, path: str | None = None, **kwargs: Any) -> torch.nn.Module:
    """``pixel`` -> :class:`PixelAutoencoder`; ``vae`` -> :class:`DiffusersVAE` from ``path``;
    ``conv`` -> the tiny trained :class:`~lumina_lightning.encoders.conv_autoencoder.TinyConvAutoencoder`.
    A ``path`` whose ``config.json`` is of the other kind is refused (:func:`check_autoencoder_kind`)."""
    if kind == "pixel":
        return PixelAutoencoder()
    check_autoencoder_kind(kind, path)
    if kind == "vae":
        if not path:
            raise ValueError("autoencoder kind 'vae' needs a local path (e.g. the FLUX.1-dev `vae` folder)")
        return DiffusersVAE(path, **kwargs)
    if kind == "conv":
        from lumina_lightning.encoders.conv_autoencoder import TinyConvAutoencoder

        if not path:
            raise ValueError("autoencoder kind 'conv' needs the local folder of a trained conv autoencoder")
        kwargs.pop("dtype", None)  # always fp32: it is tiny
        return TinyConvAutoencoder(path, **kwargs)
    raise ValueError(f"unknown autoencoder kind {kind!r}; choose 'pixel', 'vae' or 'conv'")


def autoencoder_from_path(value: str | os.PathLike, **kwargs: Any) -> torch.nn.Module:
    """``"pixel"``, a conv autoencoder folder (its ``config.json`` says so) or a diffusers VAE folder;
    ``kwargs`` (``scaling_factor``, ``shift_factor``, ``dtype``) go to :func:`build_autoencoder`."""
    if str(value) == "pixel":
        return PixelAutoencoder()
    from lumina_lightning.encoders.conv_autoencoder import is_conv_autoencoder

    return build_autoencoder("conv" if is_conv_autoencoder(value) else "vae", str(value), **kwargs)


def build_tiny_vae(out_dir: str | os.PathLike, latent_channels: int = 4, seed: int = 0) -> str:
    """Write a tiny random ``AutoencoderKL`` (factor 8, like FLUX) to ``out_dir``; return the path.

    For tests of the VAE code path and the diffusers interop (its pipeline hard-codes factor 8).
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159,
    )
    vae.save_pretrained(out_dir)
    return str(out_dir)
