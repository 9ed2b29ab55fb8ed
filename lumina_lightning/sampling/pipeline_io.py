"""Saving, loading and exporting whole text-to-image pipelines.

Accepted by :func:`load_pipeline`:

1. **our pipeline folder** — ``pipeline.json`` + ``transformer/`` (``save_nextdit(fmt="lumina")``, with
   ``model_ema.safetensors`` beside it when EMA weights were given), written by :func:`save_pipeline`:

       {"format": "lumina-lightning/pipeline", "version": 1,
        "text_encoder": {"path": "minilm" | PATH, "max_length": 256, ...},
        "autoencoder": {"kind": "pixel"} | {"kind": "vae", "path": PATH, ...},
        "default_system": "real", "defaults": {sampler settings, e.g. "shift": 6.0}}

   Relative encoder paths are resolved against the folder first, then the working directory;
   ``"minilm"`` is the packaged all-MiniLM-L6-v2.
2. **a diffusers Lumina2 pipeline folder** — ``model_index.json`` with ``transformer/``, ``vae/``,
   ``text_encoder/``, ``tokenizer/`` (and ``scheduler/``, whose shift becomes the default shift of a
   call that names no preset; a named preset keeps its own shift, 6 for all three).
3. **a lumina-lightning training checkpoint** (a ``.ckpt`` file, or the ``*.ckpt/`` folder of an FSDP2,
   FSDP1 or DeepSpeed run) whose dict has a ``"lumina_pipeline"`` entry holding the same JSON as
   ``pipeline.json`` (a dict or its JSON text).
4. **a bare transformer checkpoint** in any layout ``load_nextdit`` reads, plus explicit
   ``text_encoder=`` and ``vae=`` (a path, or ``"pixel"``).

Explicit ``text_encoder=`` / ``vae=`` (paths or ready objects) override what a folder names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lumina_lightning.flow.convention import check_prediction
from lumina_lightning.encoders.autoencoder import (
    DiffusersVAE,
    PixelAutoencoder,
    autoencoder_from_path,
    build_autoencoder,
)
from lumina_lightning.encoders.text import SYSTEM_PROMPTS, HFTextEncoder, TextEncoderLoadError, resolve_text_encoder_path
from lumina_lightning.models.config import NextDiTConfig
from lumina_lightning.models.io import (
    detect_format,
    is_training_checkpoint,
    load_nextdit,
    read_checkpoint_meta,
    save_nextdit,
)
from lumina_lightning.models.nextdit import NextDiT
from lumina_lightning.sampling.pipeline import LuminaPipeline
from lumina_lightning.sampling.presets import SETTING_NAMES, resolve_settings

PIPELINE_FORMAT = "lumina-lightning/pipeline"
PIPELINE_JSON = "pipeline.json"
CKPT_KEY = "lumina_pipeline"
DIFFUSERS_INDEX = "model_index.json"
_TEXT_ENCODER_KEYS = ("max_length", "layer", "attn_implementation", "pad_to_multiple_of", "tokenizer_path")
# what a text-encoder override (--text-encoder: another place for the encoder) keeps from the record: how
# the prompts were encoded in training, not where the files were
_TEXT_ENCODER_SETTINGS = ("max_length", "layer", "attn_implementation", "pad_to_multiple_of")


class PipelineLoadError(ValueError):
    """A path that cannot be turned into a pipeline; the message says what is missing."""


# ------------------------------------------------------------------------------------------------
# pipeline.json
# ------------------------------------------------------------------------------------------------


def pipeline_spec(
    text_encoder_spec: dict[str, Any],
    autoencoder_spec: dict[str, Any],
    *,
    default_system: str | None = "real",
    defaults: dict[str, Any] | None = None,
    resolution: int | None = None,
    prediction: str = "velocity",
) -> dict[str, Any]:
    """The JSON-able dict stored as ``pipeline.json`` (and under ``"lumina_pipeline"`` in training ckpts).

    ``resolution``: the side the model was trained at (the last stage's ``data.resolution``), the
    default image size of ``lumina sample`` / ``eval`` / ``demo``; ``None`` when unknown.
    ``prediction``: what the transformer outputs (``objective.prediction``); files without the key
    are ``velocity``, like every official and diffusers checkpoint.
    """
    check_prediction(prediction)
    if "path" not in text_encoder_spec:
        raise ValueError("text_encoder_spec needs a 'path' (a local folder or 'minilm')")
    kind = autoencoder_spec.get("kind")
    if kind not in ("pixel", "vae", "conv"):
        raise ValueError(f"autoencoder_spec['kind'] must be 'pixel', 'vae' or 'conv', got {kind!r}")
    if kind in ("vae", "conv") and not autoencoder_spec.get("path"):
        raise ValueError(f"autoencoder_spec of kind {kind!r} needs a 'path'")
    if default_system is not None and default_system not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown default_system {default_system!r}; choose one of {sorted(SYSTEM_PROMPTS)}")
    unknown = sorted(set(defaults or {}) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(f"unknown sampler default(s) {unknown}; known: {list(SETTING_NAMES)}")
    if resolution is not None and (int(resolution) != resolution or resolution < 1):
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    te = {k: v for k, v in text_encoder_spec.items() if k == "path" or k in _TEXT_ENCODER_KEYS}
    te["path"] = str(te["path"])
    ae = {k: (str(v) if k == "path" else v) for k, v in autoencoder_spec.items()
          if k in ("kind", "path", "scaling_factor", "shift_factor", "weights_sha256")}
    return {
        "format": PIPELINE_FORMAT,
        "version": 1,
        "text_encoder": te,
        "autoencoder": ae,
        "default_system": default_system,
        "defaults": dict(defaults or {}),
        **({"resolution": int(resolution)} if resolution is not None else {}),
        "prediction": prediction,
    }


def source_spec(path: str | os.PathLike) -> dict[str, Any] | None:
    """The pipeline spec a source records (our pipeline folder's ``pipeline.json``, a training
    ``.ckpt``'s entry); ``None`` for sources that record none (official ``.pth``, diffusers, bare)."""
    p = Path(path)
    if p.is_dir() and (p / PIPELINE_JSON).is_file():
        return json.loads((p / PIPELINE_JSON).read_text())
    if is_training_checkpoint(p):
        return _read_ckpt_spec(p)
    return None


def source_prediction(path: str | os.PathLike) -> str:
    """What the transformer at ``path`` outputs: its ``pipeline.json`` / checkpoint spec says, and
    anything without one (official ``.pth``, diffusers folders, bare transformers) is ``velocity``."""
    return check_prediction((source_spec(path) or {}).get("prediction", "velocity"))


def latent_space_differences(recorded: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """How the autoencoder ``current`` (a pipeline spec's ``autoencoder``) differs from ``recorded`` in
    what defines the latent space: the kind, the latent scale and shift, and a conv autoencoder's
    weights. Paths are not compared (a moved folder is the same autoencoder). Empty: the same space,
    or nothing recorded to compare with."""
    import math

    if not recorded:
        return []
    if recorded.get("kind") != current.get("kind"):
        return [f"autoencoder kind {recorded.get('kind')!r} (recorded) vs {current.get('kind')!r}"]
    diffs = []
    for key in ("scaling_factor", "shift_factor"):
        a, b = recorded.get(key), current.get(key)
        if a is not None and b is not None and not math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9):
            diffs.append(f"{key} {float(a):g} (recorded) vs {float(b):g}")
    a, b = recorded.get("weights_sha256"), current.get("weights_sha256")
    if a and b and a != b:
        diffs.append(f"conv autoencoder weights sha256 {a} (recorded) vs {b} in {current.get('path')} (retrained since?)")
    return diffs


def check_same_latent_space(source: str | os.PathLike, autoencoder_spec: dict[str, Any], *,
                            key: str = "model.init_from", where: str = "this run") -> None:
    """Refuse to start from ``source`` when it was trained in another autoencoder latent space than
    ``autoencoder_spec`` (the run's pipeline-spec ``autoencoder``): its weights would denoise latents of
    another autoencoder, and nothing would fail, the model would only be worse. Sources that record no
    autoencoder (official ``.pth``, diffusers folders, bare transformers) are not checked."""
    diffs = latent_space_differences((source_spec(source) or {}).get("autoencoder"), autoencoder_spec)
    if diffs:
        raise ValueError(
            f"{key}={source} was trained in another autoencoder latent space than {where} uses: "
            + "; ".join(diffs) + f". Use the autoencoder it was trained with (see its pipeline.json `autoencoder`), "
            f"or train without {key}"
        )


def update_pipeline_defaults(path: str | os.PathLike, remove: tuple[str, ...] = (), **settings: Any) -> dict[str, Any]:
    """Set sampler defaults (``SamplerSettings`` names) in a pipeline folder's ``pipeline.json``, and
    drop the ``remove`` ones.

    The file is rewritten atomically (a reader never sees half of it). Returns the new defaults.
    """
    from lumina_lightning.fileio import atomic_write_text

    file = Path(path) / PIPELINE_JSON
    spec = json.loads(file.read_text())
    if spec.get("format") != PIPELINE_FORMAT:
        raise PipelineLoadError(f"{file}: not a lumina-lightning pipeline.json")
    defaults = {k: v for k, v in {**(spec.get("defaults") or {}), **settings}.items() if k not in remove}
    resolve_settings(None, defaults)  # validates the names and the values
    spec["defaults"] = defaults
    atomic_write_text(file, json.dumps(spec, indent=2))
    return defaults


def save_pipeline(
    path: str | os.PathLike,
    model: NextDiT | dict[str, torch.Tensor],
    *,
    text_encoder_spec: dict[str, Any],
    autoencoder_spec: dict[str, Any],
    config: NextDiTConfig | None = None,
    ema_state_dict: dict[str, torch.Tensor] | None = None,
    default_system: str | None = "real",
    defaults: dict[str, Any] | None = None,
    resolution: int | None = None,
    prediction: str = "velocity",
) -> Path:
    """Write our pipeline folder: ``transformer/`` (lumina layout, + EMA) and ``pipeline.json``.

    Args:
        model: a Next-DiT, or a state dict (official/our keys) together with ``config``.
        text_encoder_spec: ``{"path": ..., "max_length": ...}`` (``"minilm"`` allowed).
        autoencoder_spec: ``{"kind": "pixel"}`` or ``{"kind": "vae", "path": ...}``.
        ema_state_dict: EMA weights, loaded by default (``ema="auto"``).
        default_system, defaults: what callers get unless they say otherwise.
        resolution: the trained image side, the default size when sampling (``None``: unknown).
        prediction: what the transformer outputs, ``velocity`` or ``data`` (``objective.prediction``).
    """
    spec = pipeline_spec(text_encoder_spec, autoencoder_spec, default_system=default_system, defaults=defaults,
                         resolution=resolution, prediction=prediction)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(model, NextDiT):
        save_nextdit(model, path / "transformer", fmt="lumina", ema_state_dict=ema_state_dict)
    else:
        if config is None:
            raise ValueError("saving a state dict needs its NextDiTConfig (config=...)")
        save_nextdit(None, path / "transformer", fmt="lumina", state_dict=model, config=config,
                     ema_state_dict=ema_state_dict)
    tmp = path / (PIPELINE_JSON + ".tmp")
    tmp.write_text(json.dumps(spec, indent=2))
    os.replace(tmp, path / PIPELINE_JSON)
    return path


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


def _local(path: str, base: Path | None) -> str:
    if base is not None and not os.path.isabs(path) and (base / path).exists():
        return str(base / path)
    return path


def _text_encoder_from_spec(spec: dict[str, Any], base: Path | None) -> HFTextEncoder:
    path = resolve_text_encoder_path(_local(str(spec["path"]), base))
    kwargs = {k: spec[k] for k in _TEXT_ENCODER_KEYS if k in spec and spec[k] is not None}
    if "tokenizer_path" in kwargs:
        kwargs["tokenizer_path"] = _local(str(kwargs["tokenizer_path"]), base)
    return HFTextEncoder(path, **kwargs)


def _autoencoder_from_spec(spec: dict[str, Any], base: Path | None) -> Any:
    kind = spec.get("kind")
    if kind == "pixel":
        return PixelAutoencoder()
    extra = {k: spec[k] for k in ("scaling_factor", "shift_factor") if spec.get(k) is not None}
    return _same_weights(build_autoencoder(kind, _local(str(spec.get("path") or ""), base) or None, **extra), spec)


def _same_weights(autoencoder: Any, spec: dict[str, Any]) -> Any:
    """Refuse a conv autoencoder whose weights are not the ones the transformer was trained with
    (its folder retrained in place): its latents, and the saved statistics, would not match."""
    saved, current = spec.get("weights_sha256"), getattr(autoencoder, "weights_sha256", None)
    if saved and current and saved != current:
        raise PipelineLoadError(
            f"the conv autoencoder at {autoencoder.path} has other weights (sha256 {current}) than the one this "
            f"model was trained with ({saved}): it was retrained since. Use the autoencoder the model was trained "
            "with, or retrain the model on this one"
        )
    return autoencoder


_TEXT_ENCODER_FLAG = "text encoder (text_encoder= / --text-encoder)"
_VAE_FLAG = "VAE (vae= / --vae)"


class _NamedLoad:
    """Turns a loader's own error (transformers' "Couldn't instantiate the backend tokenizer", diffusers'
    "no file named ...") into a :class:`PipelineLoadError` that names the argument the path came from:
    the library messages do not say which of several paths was wrong."""

    def __init__(self, flag: str, value: Any, hint: str) -> None:
        self.flag, self.value, self.hint = flag, value, hint

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> bool:
        if err is None or isinstance(err, PipelineLoadError) or not isinstance(err, (OSError, ValueError, KeyError)):
            return False
        if isinstance(err, TextEncoderLoadError):  # HFTextEncoder's own check: already says what is missing
            raise PipelineLoadError(f"{self.flag} {self.value}: {err.problem}; {err.hint or self.hint}") from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PipelineLoadError(f"{self.flag} {self.value}: could not be loaded ({first}); {self.hint}") from None


def _check_folder(flag: str, value: Any, path: Path, need: dict[str, tuple[str, ...]], hint: str) -> None:
    """Refuse a folder that lacks one of ``need``'s files (what -> any of these names) before a library
    loader tries it and fails with a message about some file it looked for last."""
    if not path.is_dir():
        raise PipelineLoadError(f"{flag} {value}: {'no such folder' if not path.exists() else 'not a folder'}; {hint}")
    for what, names in need.items():
        if not any((path / n).is_file() for n in names):
            raise PipelineLoadError(f"{flag} {value}: no {what} in {path} (looked for {', '.join(names)}); {hint}")


def _override_text_encoder(value: Any, saved: dict[str, Any] | None = None) -> Any:
    """A text encoder given by the caller (a path, ``"minilm"`` or an object). A path is a new place for
    the encoder's files: where the source records the text encoder it was trained with (``saved``), its
    encoding settings (``max_length``, ``layer``, ``attn_implementation``, ``pad_to_multiple_of``) still
    apply, as the recorded latent scale and shift do for ``vae=``. HFTextEncoder resolves diffusers
    pipeline folders and refuses folders without tokenizer files."""
    if isinstance(value, (str, os.PathLike)):
        hint = ("give the transformers text-encoder folder the model was trained with (its model and tokenizer "
                "files), a diffusers pipeline folder, or 'minilm'")
        kwargs = {k: saved[k] for k in _TEXT_ENCODER_SETTINGS if saved and saved.get(k) is not None}
        with _NamedLoad(_TEXT_ENCODER_FLAG, value, hint):
            return HFTextEncoder(value, **kwargs)
    return value


def _override_vae(value: Any, saved: dict[str, Any] | None = None) -> Any:
    """An autoencoder given by the caller (a path, ``"pixel"`` or an object). Where the source records
    the autoencoder it was trained with (``saved``) and the path is of the same kind, the recorded
    latent scale and shift apply: they may be a recipe's overrides of the folder's config."""
    if isinstance(value, (str, os.PathLike)):
        if str(value) == "pixel":
            return PixelAutoencoder()
        from lumina_lightning.encoders.conv_autoencoder import is_conv_autoencoder

        hint = ("give a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors), a conv "
                "autoencoder folder that `lumina` trained, or 'pixel'")
        kind = "conv" if is_conv_autoencoder(value) else "vae"
        if kind == "vae":
            folder = Path(value)
            if (folder / "vae").is_dir():  # a diffusers pipeline folder: DiffusersVAE reads its vae/
                folder = folder / "vae"
            _check_folder(_VAE_FLAG, value, folder, {
                "config": ("config.json",),
                "weights": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                            "diffusion_pytorch_model.safetensors.index.json")}, hint)
        saved = saved if saved and saved.get("kind") == kind else {}
        extra = {k: saved[k] for k in ("scaling_factor", "shift_factor") if saved.get(k) is not None}
        with _NamedLoad(_VAE_FLAG, value, hint):
            ae = autoencoder_from_path(value, **extra)
        return _same_weights(ae, saved)
    return value


def _read_ckpt_spec(path: Path) -> dict[str, Any] | None:
    """The pipeline spec a training checkpoint (a ``.ckpt`` file, or an FSDP2, FSDP1 or DeepSpeed
    ``*.ckpt/`` folder) records, read weights-only (see ``models.io.read_checkpoint_meta``)."""
    try:
        ckpt = read_checkpoint_meta(path)
    except (OSError, ValueError) as err:
        raise PipelineLoadError((str(err).strip().splitlines() or [type(err).__name__])[0]) from None
    spec = ckpt.get(CKPT_KEY)
    if isinstance(spec, str):
        spec = json.loads(spec)
    return spec


def describe(path: str | os.PathLike) -> str:
    """Which kind of pipeline source ``path`` is: ``pipeline`` | ``diffusers`` | ``ckpt`` | ``transformer``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint or pipeline at {p}")
    if p.is_dir() and (p / PIPELINE_JSON).is_file():
        return "pipeline"
    if p.is_dir() and (p / DIFFUSERS_INDEX).is_file():
        return "diffusers"
    if is_training_checkpoint(p):
        return "ckpt"
    detect_format(p)  # raises a clear error for anything that is no checkpoint at all
    return "transformer"


def load_pipeline(
    path: str | os.PathLike,
    *,
    text_encoder: Any = None,
    vae: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    ema: bool | str = "auto",
    cast_weights: bool = True,
) -> LuminaPipeline:
    """Build a :class:`LuminaPipeline` from any supported source (see the module docstring).

    Args:
        path: pipeline folder, diffusers pipeline folder, training ``.ckpt`` or bare transformer checkpoint.
        text_encoder: a text-encoder folder (or ``"minilm"``, or a diffusers pipeline folder) or an object;
            required for bare transformer checkpoints, an override otherwise.
        vae: a VAE folder, ``"pixel"``, or an object; required for bare checkpoints, an override otherwise.
        device, dtype: see :class:`LuminaPipeline` (``dtype`` is the CUDA autocast dtype).
        cast_weights: hold the transformer in ``dtype`` on CUDA, as the official scripts do (the pipeline
            owns the model it loads); ``False`` keeps fp32 weights under autocast. No effect on CPU.
        ema: ``"auto"`` loads EMA weights where the checkpoint has them; ``True``/``False`` force.
    """
    path = Path(path)
    kind = describe(path)
    spec: dict[str, Any] | None = None
    base: Path | None = None
    defaults: dict[str, Any] = {}
    unnamed_preset_defaults: dict[str, Any] = {}
    default_system: str | None = "real"
    # a text-encoder path for a source that records its text encoder is built once that record is read
    # (its max_length and the other encoding settings apply)
    te_deferred = isinstance(text_encoder, (str, os.PathLike)) and kind in ("pipeline", "ckpt")
    te_obj = _override_text_encoder(text_encoder) if text_encoder is not None and not te_deferred else None
    # a VAE path for a source that records its autoencoder is built once that record is read (its
    # latent scale and shift apply)
    deferred = isinstance(vae, (str, os.PathLike)) and kind in ("pipeline", "ckpt")
    ae_obj = _override_vae(vae) if vae is not None and not deferred else None

    if kind == "pipeline":
        spec = json.loads((path / PIPELINE_JSON).read_text())
        if spec.get("format") != PIPELINE_FORMAT:
            raise PipelineLoadError(f"{path / PIPELINE_JSON}: not a lumina-lightning pipeline.json")
        base = path
        if te_deferred:
            te_obj = _override_text_encoder(text_encoder, spec.get("text_encoder"))
        model = load_nextdit(path / "transformer", ema=ema)
    elif kind == "diffusers":
        missing = [d for d in ("transformer", "vae", "text_encoder", "tokenizer") if not (path / d).is_dir()]
        if "transformer" in missing:
            raise PipelineLoadError(f"{path}: diffusers pipeline folder without transformer/")
        if te_obj is None and ("text_encoder" in missing or "tokenizer" in missing):
            raise PipelineLoadError(f"{path}: missing text_encoder/ or tokenizer/; pass text_encoder=PATH "
                                    "(--text-encoder PATH on the command line)")
        if ae_obj is None and "vae" in missing:
            raise PipelineLoadError(f"{path}: missing vae/; pass vae=PATH (or vae='pixel'; "
                                    "--vae on the command line)")
        model = load_nextdit(path, ema=False if ema == "auto" else ema)
        if te_obj is None:
            te_obj = HFTextEncoder(path / "text_encoder", tokenizer_path=path / "tokenizer")
        if ae_obj is None:
            ae_obj = DiffusersVAE(path / "vae")
        sched = path / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            cfg = json.loads(sched.read_text())
            # only where no preset is named: a scheduler config's shift is often diffusers' default 1.0,
            # not a choice about this model, and must not silently replace official's documented shift 6
            if not cfg.get("use_dynamic_shifting", False) and cfg.get("shift") is not None:
                unnamed_preset_defaults["shift"] = float(cfg["shift"])
    else:
        if kind == "ckpt":
            spec = _read_ckpt_spec(path)
            if te_deferred:
                te_obj = _override_text_encoder(text_encoder, (spec or {}).get("text_encoder"))
            if deferred:
                ae_obj = _override_vae(vae, (spec or {}).get("autoencoder"))
        model = load_nextdit(path, ema=ema)
        if spec is None and (te_obj is None or ae_obj is None):
            what = []
            if te_obj is None:
                what.append("text_encoder=PATH (--text-encoder: the text-encoder folder it was trained with, or 'minilm')")
            if ae_obj is None:
                what.append("vae=PATH (--vae: the VAE folder, or 'pixel' for the pixel autoencoder)")
            raise PipelineLoadError(
                f"{path} is a bare transformer checkpoint ({detect_format(path)} layout) that does not say which "
                f"text encoder and autoencoder go with it; pass " + " and ".join(what)
            )

    resolution: int | None = None
    prediction = "velocity"
    if spec is not None:
        defaults.update(spec.get("defaults") or {})
        default_system = spec.get("default_system", "real")
        resolution = spec.get("resolution")
        prediction = spec.get("prediction", "velocity")
        if te_obj is None:
            te_obj = _text_encoder_from_spec(spec["text_encoder"], base)
        if ae_obj is None:
            ae_obj = (_override_vae(vae, spec["autoencoder"]) if vae is not None
                      else _autoencoder_from_spec(spec["autoencoder"], base))
    elif kind == "diffusers":
        # diffusers records the trained size in latent pixels (128 for the released 1024 px model)
        tcfg = path / "transformer" / "config.json"
        sample_size = json.loads(tcfg.read_text()).get("sample_size") if tcfg.is_file() else None
        if isinstance(sample_size, int) and sample_size > 0:
            resolution = sample_size * int(getattr(ae_obj, "downsample", 8))
    model = model.float().eval().requires_grad_(False)
    return LuminaPipeline(model, te_obj, ae_obj, device=device, dtype=dtype, default_system=default_system,
                          defaults=defaults, unnamed_preset_defaults=unnamed_preset_defaults, resolution=resolution,
                          prediction=prediction, cast_weights=cast_weights)


# ------------------------------------------------------------------------------------------------
# diffusers export
# ------------------------------------------------------------------------------------------------


def export_diffusers_pipeline(pipe: LuminaPipeline, path: str | os.PathLike, *, shift: float = 6.0) -> Path:
    """Write a folder that ``diffusers.Lumina2Pipeline.from_pretrained(path)`` loads.

    transformer/ (``save_nextdit(fmt="diffusers")``), vae/, text_encoder/, tokenizer/ and
    scheduler/ (``FlowMatchEulerDiscreteScheduler`` with ``shift``, 6.0 like the official samplers).
    diffusers' ``Lumina2Pipeline`` hard-codes a VAE with 8× downsampling, so the pixel autoencoder
    (and any other non-VAE) is refused.
    """
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    if getattr(pipe, "prediction", "velocity") != "velocity":
        raise ValueError(
            f"cannot export to diffusers: this model predicts {pipe.prediction!r} (objective.prediction), but "
            "diffusers' Lumina2Pipeline treats the transformer output as a velocity"
        )
    ae = pipe.autoencoder
    if not isinstance(ae, DiffusersVAE):
        raise ValueError(
            f"cannot export to diffusers: the pipeline uses a {type(ae).__name__}, but diffusers' Lumina2Pipeline "
            "needs an AutoencoderKL VAE (the pixel and conv autoencoders have no diffusers equivalent)"
        )
    if ae.downsample != 8:
        raise ValueError(f"cannot export to diffusers: Lumina2Pipeline assumes 8x VAE downsampling, this VAE has {ae.downsample}x")
    te = pipe.text_encoder
    if not (hasattr(te, "model") and hasattr(te, "tokenizer")):
        raise ValueError(f"cannot export to diffusers: the text encoder {type(te).__name__} is not a transformers model")
    if getattr(te, "layer", -2) != -2:
        raise ValueError("cannot export to diffusers: Lumina2Pipeline always uses hidden_states[-2]")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_nextdit(pipe.model, path / "transformer", fmt="diffusers")
    if getattr(pipe, "resolution", None):
        # diffusers' record of the trained size, in latent pixels (what load_pipeline reads back)
        tcfg_file = path / "transformer" / "config.json"
        tcfg = json.loads(tcfg_file.read_text())
        tcfg["sample_size"] = max(1, int(pipe.resolution) // int(ae.downsample))
        tcfg_file.write_text(json.dumps(tcfg, indent=2))
    ae.vae.save_pretrained(path / "vae")
    vae_cfg_file = path / "vae" / "config.json"
    vae_cfg = json.loads(vae_cfg_file.read_text())
    vae_cfg["scaling_factor"], vae_cfg["shift_factor"] = ae.scaling_factor, ae.shift_factor
    vae_cfg_file.write_text(json.dumps(vae_cfg, indent=2))
    te.model.save_pretrained(path / "text_encoder")
    te.tokenizer.save_pretrained(path / "tokenizer")
    FlowMatchEulerDiscreteScheduler(shift=float(shift)).save_pretrained(path / "scheduler")
    index = {
        "_class_name": "Lumina2Pipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", type(te.model).__name__],
        "tokenizer": ["transformers", type(te.tokenizer).__name__],
        "transformer": ["diffusers", "Lumina2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / DIFFUSERS_INDEX).write_text(json.dumps(index, indent=2))
    return path
