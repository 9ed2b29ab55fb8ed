"""Tiny random pipelines for tests, benchmarks and CPU debugging (no downloads).

A fresh Next-DiT outputs exactly 0 (zero-initialised adaLN and final layer, spec §1.6), which would
make every sampler test pass trivially; :func:`randomize_` gives every parameter random values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lumina_lightning.encoders.autoencoder import DiffusersVAE, PixelAutoencoder, build_tiny_vae
from lumina_lightning.encoders.text import HFTextEncoder, build_tiny_text_encoder
from lumina_lightning.models.config import config_for
from lumina_lightning.models.nextdit import NextDiT
from lumina_lightning.sampling.pipeline import LuminaPipeline


_TEXT_ENCODERS: dict[str, str] = {}


def tiny_text_encoder(directory: str | os.PathLike) -> str:
    """Path of a tiny random Gemma-2 text encoder, built under ``directory`` once per process.

    Later calls (from any directory) reuse the first build while it still exists, so a test session
    pays for the tokenizer training once.
    """
    cached = _TEXT_ENCODERS.get("tiny")
    if cached and Path(cached, "config.json").exists():
        return cached
    path = build_tiny_text_encoder(Path(directory) / "text_encoder")
    _TEXT_ENCODERS["tiny"] = path
    return path


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Every parameter ~ N(0, std²), deterministically from ``seed``; returns the model."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
    return model


def tiny_model(size: str = "NextDiT_debug", *, in_channels: int = 4, cap_feat_dim: int = 32, std: float = 0.1,
               seed: int = 0, **overrides: Any) -> NextDiT:
    """A randomised Next-DiT of a named size with the given channels / caption width."""
    model = NextDiT(config_for(size, in_channels=in_channels, cap_feat_dim=cap_feat_dim, **overrides))
    return randomize_(model, std=std, seed=seed).eval()


def build_tiny_pipeline(
    directory: str | os.PathLike,
    *,
    autoencoder: str = "pixel",
    size: str = "NextDiT_debug",
    std: float = 0.1,
    seed: int = 0,
    text_encoder_path: str | os.PathLike | None = None,
    **overrides: Any,
) -> LuminaPipeline:
    """A pipeline of a tiny random Gemma-2 (hidden 32), a pixel autoencoder or a tiny random VAE
    (``autoencoder="vae"``, 4 latent channels, factor 8) and a randomised Next-DiT.

    Component folders are written under ``directory`` (``vae/``; the text encoder is built once per
    process, see :func:`tiny_text_encoder`); pass ``text_encoder_path`` to use another one.
    """
    directory = Path(directory)
    te_path = text_encoder_path or tiny_text_encoder(directory)
    te = HFTextEncoder(te_path)
    if autoencoder == "pixel":
        ae: Any = PixelAutoencoder()
    elif autoencoder == "vae":
        vae_dir = directory / "vae"
        if not (vae_dir / "config.json").exists():
            build_tiny_vae(vae_dir, latent_channels=4)
        ae = DiffusersVAE(vae_dir)
    else:
        raise ValueError(f"autoencoder must be 'pixel' or 'vae', got {autoencoder!r}")
    model = tiny_model(size, in_channels=ae.latent_channels, cap_feat_dim=te.hidden_size, std=std, seed=seed, **overrides)
    return LuminaPipeline(model, te, ae)
