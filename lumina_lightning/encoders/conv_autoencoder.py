"""A small convolutional autoencoder for CPU-size runs, trained on the run's own images.

The real recipes learn in the latent space of the pretrained FLUX VAE (spec §4). Tiny CPU runs have
no pretrained VAE to download, and the pixel "autoencoder" makes a 1M-parameter Next-DiT draw every
edge of every 4×4 patch itself — the samples of the pixel-space tiny pipeline are clusters of
patches rather than shapes. This module gives those runs a latent space of their own: an 8×
down-sampling encoder/decoder (a 64 px image → an 8×8×C latent) trained in about a minute on the
synthetic renders, after which the Next-DiT only has to place and colour latent cells and the decoder
draws the outlines.

Why not diffusers: at the smallest configurations that reconstruct these renders, diffusers'
``AutoencoderKL`` (GroupNorm ResNet blocks at full resolution) trains at 0.87 s per batch of 32 on
2 CPU cores and ``AutoencoderTiny`` (TAESD; equal widths at every scale) at 0.36 s; this plain
strided-conv network takes 0.15 s, which is what fits the tiny pipeline's 15-minute budget. It is
pure PyTorch with a ``config.json`` + ``model.safetensors`` folder; :class:`TinyConvAutoencoder`
wraps it with the same ``encode``/``decode`` contract as the other autoencoders.

Latents are normalised like the FLUX VAE's: ``z = (E(x) − shift)·scale``, with shift and scale the
mean and 1/std of the training latents, measured after training and stored in the config.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "lumina-conv-autoencoder"


@dataclass
class ConvAutoencoderConfig:
    channels: int = 32          # width at full resolution; 2x after the first down-sampling
    latent_channels: int = 8
    downsample: int = 8         # a power of two >= 2
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        d = self.downsample
        if d < 2 or d & (d - 1):
            raise ValueError(f"downsample must be a power of two >= 2, got {d}")
        if self.channels < 1 or self.latent_channels < 1:
            raise ValueError(f"channels ({self.channels}) and latent_channels ({self.latent_channels}) must be >= 1")


class ConvAutoencoder(nn.Module):
    """Strided-conv encoder (k4 s2 per factor 2), transposed-conv decoder; SiLU; no normalisation.

    Pixels in [-1, 1] -> raw latents (B, C, H/f, W/f) -> pixels (unclamped).
    """

    def __init__(self, config: ConvAutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        w, c, levels = config.channels, config.latent_channels, int(math.log2(config.downsample))
        widths = [w] + [2 * w] * (levels - 1)  # width at 1/2, 1/4, ... 1/downsample of the resolution
        enc: list[nn.Module] = []
        for i in range(levels):
            enc += [nn.Conv2d(3 if i == 0 else widths[i - 1], widths[i], 4, 2, 1), nn.SiLU()]
        enc += [nn.Conv2d(widths[-1], widths[-1], 3, 1, 1), nn.SiLU(), nn.Conv2d(widths[-1], c, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(c, widths[-1], 3, 1, 1), nn.SiLU(),
                                nn.Conv2d(widths[-1], widths[-1], 3, 1, 1), nn.SiLU()]
        for i in range(levels - 1, -1, -1):
            dec += [nn.ConvTranspose2d(widths[i], widths[i - 1] if i > 0 else w, 4, 2, 1), nn.SiLU()]
        dec += [nn.Conv2d(w, 3, 3, 1, 1)]
        self.decoder = nn.Sequential(*dec)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(pixels))


def save_conv_autoencoder(model: ConvAutoencoder, out_dir: str | os.PathLike) -> str:
    """Write ``config.json`` + ``model.safetensors`` to ``out_dir`` (atomically per file)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, out / WEIGHTS_NAME)
    cfg_tmp = out / (CONFIG_NAME + ".tmp")
    cfg_tmp.write_text(json.dumps({"format": FORMAT, **asdict(model.config)}, indent=2) + "\n")
    os.replace(cfg_tmp, out / CONFIG_NAME)
    return str(out)


def weights_digest(path: str | os.PathLike) -> str:
    """SHA-256 (first 16 hex digits) of a conv autoencoder folder's weights file."""
    import hashlib

    return hashlib.sha256((Path(path) / WEIGHTS_NAME).read_bytes()).hexdigest()[:16]


def is_conv_autoencoder(path: str | os.PathLike) -> bool:
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def load_conv_autoencoder(path: str | os.PathLike) -> ConvAutoencoder:
    """Load a folder written by :func:`save_conv_autoencoder`; mismatched keys are listed."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_conv_autoencoder(path):
        raise FileNotFoundError(f"{path} is not a conv autoencoder folder ({CONFIG_NAME} with format {FORMAT!r}); "
                                "a recipe's `autoencoder.train` section trains one there on first use")
    raw = json.loads((path / CONFIG_NAME).read_text())
    raw.pop("format")
    model = ConvAutoencoder(ConvAutoencoderConfig(**raw))
    state = load_file(str(path / WEIGHTS_NAME))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                    if k in state and state[k].shape != v.shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{path / WEIGHTS_NAME} does not match its config: missing {missing}, unexpected "
                         f"{unexpected}, shape (file vs config) {shapes}")
    model.load_state_dict(state)
    return model


class TinyConvAutoencoder(nn.Module):
    """A frozen :class:`ConvAutoencoder` with its latent shift and scale (``kind: conv``)."""

    def __init__(self, path: str | os.PathLike, *, scaling_factor: float | None = None,
                 shift_factor: float | None = None) -> None:
        super().__init__()
        self.path = str(Path(path).resolve())
        self.ae = load_conv_autoencoder(path)
        self.ae.requires_grad_(False).eval()
        cfg = self.ae.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else cfg.scaling_factor)
        self.shift_factor = float(shift_factor if shift_factor is not None else cfg.shift_factor)
        self.latent_channels = cfg.latent_channels
        self.downsample = cfg.downsample
        # which trained weights these are: an export and a latent cache record it, so a folder
        # retrained in place (new weights, new latent statistics) is refused instead of used
        self.weights_sha256 = weights_digest(path)

    def train(self, mode: bool = True) -> "TinyConvAutoencoder":
        return super().train(False)  # frozen

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return ((self.ae.encoder(pixels.float()) - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.ae.decoder(latents.float() / self.scaling_factor + self.shift_factor).clamp(-1, 1)

    def identity(self) -> dict[str, Any]:
        return {"kind": "conv", "path": self.path, "latent_channels": self.latent_channels,
                "downsample": self.downsample, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "weights_sha256": self.weights_sha256}


def train_conv_autoencoder(
    images: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    config: ConvAutoencoderConfig | None = None,
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 2e-3,
    warmup_steps: int = 50,
    latent_noise: float = 0.1,
    seed: int = 0,
    threads: int | None = None,
    log: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train a :class:`ConvAutoencoder` on ``images`` (N, 3, H, W in [-1, 1]) and save it.

    Loss: MSE + 0.5·L1 on the reconstruction. Gaussian noise (``latent_noise`` × the batch's latent
    std) is added to the latents before decoding, so the decoder also maps slightly-off latents —
    what a diffusion model samples — to clean images. A 1e-4 L2 penalty keeps the latents bounded.
    AdamW with linear warm-up and cosine decay; deterministic for a given ``seed``.

    Returns the measured reconstruction MSE (held-out last 1/8 of ``images``), latent statistics and
    wall time.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    config = config or ConvAutoencoderConfig()
    if images.shape[-1] % config.downsample or images.shape[-2] % config.downsample:
        raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of downsample {config.downsample}")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ConvAutoencoder(config)
        n_val = max(1, len(images) // 8)
        train, val = images[:-n_val], images[-n_val:]
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=True)
        start = time.perf_counter()
        model.train()
        for step in range(steps):
            scale = min(1.0, (step + 1) / max(1, warmup_steps)) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            x = train[torch.randint(0, len(train), (batch_size,), generator=gen)]
            z = model.encoder(x)
            noise = torch.randn(z.shape, generator=gen) * (latent_noise * z.detach().std())
            rec = model.decoder(z + noise)
            loss = (rec - x).pow(2).mean() + 0.5 * (rec - x).abs().mean() + 1e-4 * z.pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log is not None:
                log(step, float(loss.detach()))
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            lat = torch.cat([model.encoder(train[i:i + 256]) for i in range(0, min(len(train), 2048), 256)])
            mean, std = float(lat.mean()), float(lat.std())
            rec = torch.cat([model(val[i:i + 256]).clamp(-1, 1) for i in range(0, len(val), 256)])
            mse = float((rec - val).pow(2).mean())
        model.config.scaling_factor = 1.0 / max(std, 1e-6)
        model.config.shift_factor = mean
        save_conv_autoencoder(model, out_dir)
        return {"path": str(out_dir), "recon_mse": mse, "latent_mean": mean, "latent_std": std,
                "seconds": seconds, "steps": steps, "config": asdict(model.config)}
    finally:
        torch.set_num_threads(old_threads)


# keys of a recipe's `autoencoder.train` section (training/config.py: AutoencoderSection)
TRAIN_KEYS = ("steps", "batch_size", "lr", "latent_noise", "seed", "channels", "latent_channels", "downsample",
              "manifest")


TRAIN_SETTINGS_NAME = "train_settings.json"  # the autoencoder.train settings a folder was trained with
_ARCH_KEYS = ("channels", "latent_channels", "downsample")
# compared with a later recipe's: not ``manifest`` (later stages may train on other data with the same
# autoencoder, which is the point of reusing it)
_COMPARED_KEYS = ("steps", "batch_size", "lr", "latent_noise", "seed", *_ARCH_KEYS)


def effective_train_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """An ``autoencoder.train`` section with every compared key, the defaults filled in."""
    import inspect

    params = inspect.signature(train_conv_autoencoder).parameters
    arch = asdict(ConvAutoencoderConfig())
    return {k: spec[k] if k in spec else (arch[k] if k in _ARCH_KEYS else params[k].default) for k in _COMPARED_KEYS}


def train_settings_differences(path: str | os.PathLike, spec: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (the folder's value, spec's value)}`` where the conv autoencoder in ``path`` was trained
    with other ``autoencoder.train`` settings than ``spec`` asks for. Folders trained before
    ``train_settings.json`` was written are compared on their architecture (``config.json``) only."""
    folder = Path(path)
    asked = effective_train_settings(spec)
    recorded: dict[str, Any] = {}
    try:
        recorded = dict(json.loads((folder / TRAIN_SETTINGS_NAME).read_text()).get("settings") or {})
    except (OSError, ValueError, AttributeError):
        try:
            cfg = json.loads((folder / CONFIG_NAME).read_text())
            recorded = {k: cfg[k] for k in _ARCH_KEYS if k in cfg}
        except (OSError, ValueError):
            return {}
    return {k: (recorded[k], asked[k]) for k in _COMPARED_KEYS if k in recorded and recorded[k] != asked[k]}


def check_train_settings(path: str | os.PathLike, spec: dict[str, Any], key: str = "autoencoder.train") -> None:
    """Refuse a recipe whose ``autoencoder.train`` differs from what the existing autoencoder at ``path``
    was trained with: an existing folder is used as it is, never retrained, so the changed settings
    would be silently ignored (and a latent-channel change then reported as a model mismatch)."""
    diffs = train_settings_differences(path, spec)
    if not diffs:
        return
    was = ", ".join(f"{k}={old!r}" for k, (old, _) in diffs.items())
    now = ", ".join(f"{k}={new!r}" for k, (_, new) in diffs.items())
    raise ValueError(
        f"autoencoder.path {path} already holds a conv autoencoder trained with {was}, but `{key}` asks for "
        f"{now}: an existing autoencoder is used as it is, never retrained. To train one with the new settings, "
        f"set autoencoder.path to a new folder (or remove {path}; models trained on it then no longer load with "
        f"it); to use this one, set {key} back to its settings"
    )


def train_from_manifest(manifest: str | os.PathLike, out_dir: str | os.PathLike, spec: dict[str, Any],
                        threads: int | None = None, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train into ``out_dir`` on the images of a run's data (a recipe's ``autoencoder.train``).

    ``manifest``: anything ``data.path`` accepts (JSONL manifest, data YAML, folder), read with the
    data pipeline's own reader; ``spec["manifest"]`` overrides it. Images are used at their stored
    size (all must share it); a record whose image cannot be read is skipped and counted, as in
    the training data pipeline. ``root`` is the run's ``data.root`` (relative image paths), used
    for ``manifest`` as the run's own loader uses it.
    """
    from lumina_lightning.data.images import BadSample, load_image, to_tensor
    from lumina_lightning.data.records import load_records

    unknown = sorted(set(spec) - set(TRAIN_KEYS))
    if unknown:
        raise ValueError(f"unknown autoencoder.train key(s) {unknown}; known: {list(TRAIN_KEYS)}")
    if spec.get("manifest"):
        manifest, root = spec["manifest"], None
    tensors, skipped = [], 0
    for record in load_records(manifest, root=root).records:
        try:
            tensors.append(to_tensor(load_image(record.image)))
        except BadSample:
            skipped += 1
    if not tensors:
        raise ValueError(f"no readable images in {manifest}")
    sizes = sorted({tuple(t.shape[1:]) for t in tensors})
    if len(sizes) != 1:
        raise ValueError(f"autoencoder.train needs images of one size; {manifest} has {sizes[:4]}")
    images = torch.stack(tensors)
    # what it is trained with, written first: a folder whose training did not finish has no config.json
    # and is trained again, rewriting this
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / TRAIN_SETTINGS_NAME).write_text(
        json.dumps({"settings": effective_train_settings(spec), "manifest": str(manifest)}, indent=2) + "\n")
    arch = {k: spec[k] for k in ("channels", "latent_channels", "downsample") if k in spec}
    kwargs = {k: spec[k] for k in ("steps", "batch_size", "lr", "latent_noise", "seed") if k in spec}
    result = train_conv_autoencoder(images, out_dir, config=ConvAutoencoderConfig(**arch), threads=threads, **kwargs)
    result.update(images=len(tensors), skipped=skipped, manifest=str(manifest))
    return result
