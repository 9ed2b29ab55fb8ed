"""Frozen encoders: the text encoder (Gemma-2 / any AutoModel) and the autoencoders (FLUX VAE, pixel)."""

from lumina_lightning.encoders.autoencoder import (
    Autoencoder,
    DiffusersVAE,
    PixelAutoencoder,
    build_autoencoder,
    build_tiny_vae,
)
from lumina_lightning.encoders.text import (
    SYSTEM_PROMPTS,
    HFTextEncoder,
    TextEncoder,
    TextEncoderLoadError,
    build_prompt,
    build_tiny_text_encoder,
    minilm_path,
    resolve_text_encoder_path,
    system_prompt,
)

__all__ = [
    "SYSTEM_PROMPTS",
    "Autoencoder",
    "DiffusersVAE",
    "HFTextEncoder",
    "PixelAutoencoder",
    "TextEncoder",
    "TextEncoderLoadError",
    "build_autoencoder",
    "build_prompt",
    "build_tiny_text_encoder",
    "build_tiny_vae",
    "minilm_path",
    "resolve_text_encoder_path",
    "system_prompt",
]
