"""The text-to-image pipeline used by the CLI, the training module's validation grids and the app.

``prompt(s) + negative prompt + system template → text features → per-image seeded noise →
solver (+ CFG / renorm / truncation / TeaCache) → decode → PIL images``, returning the settings used.

Conventions (spec §1.5, §3, §4, §6):

* Prompts get the system template (``build_prompt(caption, system)``; ``real`` by default, the official
  and diffusers default). The unconditional input is ``""`` with no template; a user negative prompt
  gets the template, as in the official ``sample.py``.
* Noise is drawn per image on the CPU from ``torch.Generator().manual_seed(seed_i)`` with shape
  (C, height/f, width/f), so an image depends only on its own seed (not on the batch around it, nor
  on the device). Deliberate deviation: the official ``sample.py`` draws (C, width/8, height/8),
  transposing non-square images (spec §6.1); here width and height are the right way round.
* The state is fp32; on CUDA the transformer runs under autocast in ``dtype`` (bf16 in the official
  scripts). A pipeline that owns its model (``load_pipeline``: the CLI, the app, ``lumina eval``) holds
  the transformer in ``dtype`` on CUDA instead (``cast_weights``), as the official scripts do: half the
  memory (5.2 instead of 10.4 GB for the 2.6B model), and autocast no longer re-casts every weight on
  every call (about 15 GB of memory traffic per call of the 2.6B model). The training module's
  validation grids sample its live fp32 model and keep ``cast_weights=False``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from lumina_lightning.flow.convention import check_prediction, velocity_from_output
from lumina_lightning.encoders.text import build_prompt, system_prompt
from lumina_lightning.models.nextdit import NextDiT
from lumina_lightning.sampling.guidance import GuidedVelocity, truncation_time
from lumina_lightning.sampling.presets import DEFAULT_PRESET, SETTING_NAMES, SamplerSettings, resolve_settings
from lumina_lightning.sampling.solvers import nfe as solver_nfe
from lumina_lightning.sampling.solvers import solve
from lumina_lightning.sampling.teacache import TeaCache
from lumina_lightning.sampling.timesteps import grid_for

log = logging.getLogger(__name__)

_UNSET: Any = object()
ProgressArg = bool | Callable[[int, int], None]


@dataclass
class SampleResult:
    """What a pipeline call produced.

    Attributes:
        images: PIL RGB images, exactly width × height, in prompt-major order
            (prompt 0 image 0, prompt 0 image 1, ..., prompt 1 image 0, ...).
        settings: JSON-able dict of every setting used (incl. the per-image ``seeds``).
        nfe: transformer forward calls (a batched cond+uncond call counts 1).
        rows: sample-rows evaluated by the transformer over all calls (shows the saving of CFG-Trunc).
        elapsed: wall seconds of the whole call (encode + sample + decode).
        latents: final latents (N, C, h, w), fp32, on the pipeline device.
        stats: extra counters: ``guided_calls``, ``block_rows`` (rows through the main blocks, lower
            with TeaCache), ``skipped_rows``, ``sampling_seconds``, with TeaCache ``teacache_log``
            (per call, per row: whether the main blocks ran) and, when some latents came out NaN or
            infinite, ``nonfinite_images`` (their indices; a warning naming their prompts is logged once
            per call).
    """

    images: list[Image.Image]
    settings: dict[str, Any]
    nfe: int
    rows: int
    elapsed: float
    latents: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


def snap_size(width: int, height: int, multiple: int = 16, max_size: tuple[int, int] | None = None) -> tuple[int, int, str]:
    """Round a requested size to the nearest valid one: ``(width, height, notice)``.

    ``notice`` is ``""`` when the size was already valid, else a sentence for the user.
    ``max_size`` = (max width, max height) the model's position tables allow.
    """
    def fit(v: int, limit: int | None) -> int:
        v = max(multiple, int(math.floor(v / multiple + 0.5)) * multiple)  # nearest, halves round up
        if limit is not None:
            v = min(v, (limit // multiple) * multiple)
        return v

    w = fit(width, max_size[0] if max_size else None)
    h = fit(height, max_size[1] if max_size else None)
    notice = ""
    if (w, h) != (int(width), int(height)):
        notice = f"size {width}x{height} is not supported; using {w}x{h} (sides must be multiples of {multiple}"
        notice += f", at most {max_size[0]}x{max_size[1]})" if max_size else ")"
    return w, h, notice


def nonfinite_images(latents: torch.Tensor) -> list[int]:
    """Indices of the images (rows of ``latents``) with a NaN or infinite value."""
    bad = ~torch.isfinite(latents.reshape(latents.shape[0], -1)).all(dim=1)
    return [int(i) for i in bad.nonzero().flatten().tolist()]


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] images (N, 3, H, W) -> PIL RGB (values mapped like diffusers' image processor)."""
    arr = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in arr]


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class LuminaPipeline:
    """Text-to-image with a Next-DiT, a text encoder and an autoencoder.

    Args:
        model: the Next-DiT (any size); put on ``device`` and used in eval mode during calls
            (its train/eval mode is restored afterwards, for validation during training).
        text_encoder: anything with ``encode(prompts) -> (feats (B, L, D), mask (B, L) bool)``
            (:class:`~lumina_lightning.encoders.HFTextEncoder`).
        autoencoder: ``decode(latents) -> [-1, 1] pixels``, ``latent_channels``, ``downsample``
            (:class:`~lumina_lightning.encoders.PixelAutoencoder` or ``DiffusersVAE``).
        device: where everything runs.
        dtype: transformer autocast dtype on CUDA (the state stays fp32; ignored on CPU).
        cast_weights: on CUDA with a ``dtype`` other than fp32, convert the transformer to ``dtype``
            (in place: only for a pipeline that owns its model). Ignored on CPU.
        default_system: system template used when a call does not name one (``real``).
        defaults: sampler-setting defaults applied over the preset (e.g. from ``pipeline.json``).
        unnamed_preset_defaults: sampler-setting defaults that apply only when a call names no preset
            (under ``defaults``): a diffusers folder's scheduler shift, which must not override the
            shift of a preset the user names (``official`` / ``fast`` / ``diffusers``: 6).
        resolution: the image side the model was trained at, if known (``pipeline.json``): the
            default size of the CLI, the evaluation and the app.
        prediction: what the model outputs, ``velocity`` (official) or ``data`` (``pipeline.json``;
            see :func:`~lumina_lightning.flow.convention.velocity_from_output`). Solvers, guidance and
            TeaCache see velocities either way.
    """

    def __init__(
        self,
        model: NextDiT,
        text_encoder: Any,
        autoencoder: Any,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        default_system: str | None = "real",
        defaults: dict[str, Any] | None = None,
        unnamed_preset_defaults: dict[str, Any] | None = None,
        resolution: int | None = None,
        prediction: str = "velocity",
        cast_weights: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.prediction = check_prediction(prediction)
        # the side the model was trained at (from the checkpoint), the callers' default image size
        self.resolution = int(resolution) if resolution else None
        self.dtype = dtype
        self.cast_weights = bool(cast_weights) and self.device.type == "cuda" and dtype != torch.float32
        self.model = model.to(self.device, dtype) if self.cast_weights else model.to(self.device)
        self.text_encoder = text_encoder.to(self.device) if isinstance(text_encoder, torch.nn.Module) else text_encoder
        self.autoencoder = autoencoder.to(self.device) if isinstance(autoencoder, torch.nn.Module) else autoencoder
        self.default_system = default_system
        self.defaults = dict(defaults or {})
        self.unnamed_preset_defaults = dict(unnamed_preset_defaults or {})
        if default_system:
            system_prompt(default_system)  # validate the name
        channels = getattr(autoencoder, "latent_channels", None)
        if channels is not None and channels != model.in_channels:
            raise ValueError(
                f"the autoencoder has {channels} latent channels but the transformer expects {model.in_channels}"
            )
        hidden = getattr(text_encoder, "hidden_size", None)
        if hidden is not None and hidden != model.config.cap_feat_dim:
            raise ValueError(
                f"the text encoder gives {hidden}-dim features but the transformer expects "
                f"cap_feat_dim={model.config.cap_feat_dim}"
            )

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: autoencoder downsample × patch size (16 for FLUX VAE)."""
        return int(self.autoencoder.downsample) * int(self.model.patch_size)

    @property
    def max_size(self) -> tuple[int, int]:
        """Largest (width, height) the model's RoPE tables allow."""
        lens = self.model.config.axes_lens
        return lens[2] * self.size_multiple, lens[1] * self.size_multiple

    def snap_size(self, width: int, height: int) -> tuple[int, int, str]:
        """Nearest valid (width, height) and a notice when it differs from the request (for UIs)."""
        return snap_size(width, height, self.size_multiple, self.max_size)

    def check_size(self, width: int, height: int) -> None:
        m = self.size_multiple
        if width <= 0 or height <= 0 or width % m or height % m:
            w, h, _ = self.snap_size(width, height)
            raise ValueError(
                f"image size {width}x{height} is not supported: width and height must be positive multiples of "
                f"{m} (autoencoder downsample {self.autoencoder.downsample} x patch size {self.model.patch_size}); "
                f"nearest valid size: {w}x{h}"
            )
        mw, mh = self.max_size
        if width > mw or height > mh:
            raise ValueError(f"image size {width}x{height} exceeds this model's position tables (max {mw}x{mh})")

    # -- building blocks -----------------------------------------------------------------------------
    def encode_prompts(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None,
        system: str | None,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """(cond feats, mask) and (uncond feats, mask) for one row per prompt (uncond ``None`` if not asked).

        Cond and uncond prompts are encoded in one call, like the official ``sample.py``.
        """
        cond = [build_prompt(p, system) for p in prompts]
        if negative_prompts is None:
            feats, mask = self.text_encoder.encode(cond)
            return (feats.to(self.device), mask.to(self.device)), None
        # official: negative "" stays bare; a user negative prompt gets the template (spec §3)
        uncond = [build_prompt(n, system) if n else "" for n in negative_prompts]
        feats, mask = self.text_encoder.encode(cond + uncond)
        feats, mask = feats.to(self.device), mask.to(self.device)
        n = len(cond)
        return (feats[:n], mask[:n]), (feats[n:], mask[n:])

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        f = int(self.autoencoder.downsample)
        return int(self.model.in_channels), height // f, width // f

    def make_noise(self, seeds: Sequence[int], width: int, height: int) -> torch.Tensor:
        """One N(0, I) latent per seed, drawn on the CPU with its own generator (device-independent)."""
        shape = self.latent_shape(width, height)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32) for s in seeds]
        return torch.stack(noise).to(self.device)

    def precision(self) -> contextlib.AbstractContextManager:
        """The context every direct call of ``self.model`` runs in: bf16/fp16 autocast on CUDA (which the
        transformer needs when ``cast_weights`` holds it in that dtype and its inputs are fp32), nothing on
        the CPU or in fp32."""
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def _transformer_call(self, inner: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        # One NextDiT.prepare context per set of captions (cond+uncond, then cond alone after
        # CFG truncation): the caption refiner, positions and RoPE tables are computed on the first
        # step only. The feature tensors live for the whole run, so their storage identifies them.
        contexts: dict[tuple, dict] = {}

        def call(x, t, feats, mask, rows):
            key = (feats.data_ptr(), tuple(feats.shape), mask.data_ptr(), tuple(mask.shape))
            context = contexts.setdefault(key, {"_keep": (feats, mask)})
            with self.precision():
                out = inner(x, t, feats, mask, rows, context=context)
            return velocity_from_output(out.float(), x, t, self.prediction)

        return call

    def sample_latents(
        self,
        noise: torch.Tensor,
        cond: tuple[torch.Tensor, torch.Tensor],
        uncond: tuple[torch.Tensor, torch.Tensor] | None,
        settings: SamplerSettings,
        *,
        progress: ProgressArg = False,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Integrate from ``noise`` (t = 0) to data (t = 1); returns (latents, counters)."""
        model = self.model
        total = solver_nfe(settings.solver, settings.steps)
        if settings.teacache > 0:
            inner = TeaCache(model, settings.teacache, total, settings.teacache_version)
        else:
            inner = lambda x, t, f, m, rows, context=None: model(x, t, f, m, context)  # noqa: E731
        grid = grid_for(settings.solver, settings.steps, settings.shift)
        guidance = settings.guidance
        velocity = GuidedVelocity(
            self._transformer_call(inner), cond, uncond, guidance, truncation_time(guidance, grid)
        )
        bar = None
        callback = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=settings.steps, desc=f"{settings.solver} steps", unit="step", leave=False)
            callback = lambda i, n, x: bar.update(1)  # noqa: E731
        elif callable(progress):
            callback = lambda i, n, x: progress(i + 1, n)  # noqa: E731
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            with torch.no_grad():
                latents = solve(settings.solver, velocity, noise.float(), grid, callback=callback)
        finally:
            model.train(was_training)
            if bar is not None:
                bar.close()
        stats = {
            "guided_calls": velocity.guided_calls,
            "nfe": velocity.calls,
            "rows": velocity.rows,
            "block_rows": velocity.rows,
            "skipped_rows": 0,
            "sampling_seconds": time.perf_counter() - start,
        }
        if isinstance(inner, TeaCache):
            stats["block_rows"] = inner.stats.computed_rows
            stats["skipped_rows"] = inner.stats.skipped_rows
            stats["teacache_log"] = inner.log
        return latents, stats

    def calibrate_teacache(
        self,
        prompts: Sequence[str],
        *,
        width: int,
        height: int,
        seeds: Sequence[int] = (0,),
        preset: str | None = "fast",
        degree: int = 2,
        **overrides: Any,
    ) -> list[float]:
        """Fit TeaCache coefficients for this model (see :class:`~.teacache.TeaCacheProbe`).

        Samples ``prompts`` × ``seeds`` without caching using the preset's solver/guidance, records per
        row how the first block's modulated input and the model output change between consecutive calls,
        and fits ``poly(indicator change) ≈ output change``. Use the result as ``teacache_version``
        (e.g. in a pipeline folder's ``defaults``). The default degree is 2, not the reference's 4: the
        observed range of changes is narrow and a quartic fit extrapolates wildly outside it.
        """
        from lumina_lightning.sampling.teacache import TeaCacheProbe, fit_coefficients

        self.check_size(width, height)
        settings = self.resolve(preset, **overrides).replace(teacache=0.0)
        probe = TeaCacheProbe(self.model)
        prompts = list(prompts)
        negatives = [""] * len(prompts) if settings.guidance.guided else None
        cond, uncond = self.encode_prompts(prompts, negatives, self.default_system)
        grid = grid_for(settings.solver, settings.steps, settings.shift)
        was_training = self.model.training
        self.model.eval()
        try:
            for seed in seeds:
                probe.previous.clear()
                noise = self.make_noise([int(seed) * 1000 + i for i in range(len(prompts))], width, height)
                velocity = GuidedVelocity(self._transformer_call(probe), cond, uncond, settings.guidance,
                                          truncation_time(settings.guidance, grid))
                with torch.no_grad():
                    solve(settings.solver, velocity, noise, grid)
        finally:
            self.model.train(was_training)
        return fit_coefficients(probe.pairs, degree)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents -> PIL images, one image at a time (bounded memory for large VAEs)."""
        images = []
        with torch.no_grad():
            for z in latents:
                images += to_pil(self.autoencoder.decode(z[None].to(self.device)))
        return images

    # -- the call ------------------------------------------------------------------------------------
    def resolve(self, preset: str | None = None, **overrides: Any) -> SamplerSettings:
        """Settings a call would use: preset ← this pipeline's defaults ← explicit overrides.

        With no preset named, :attr:`unnamed_preset_defaults` (a diffusers folder's scheduler shift)
        come first in the defaults; a named preset keeps its own values for those."""
        base = self.defaults if preset else {**self.unnamed_preset_defaults, **self.defaults}
        return resolve_settings(preset, base, **overrides)

    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = None,
        system: str | None = _UNSET,
        width: int,
        height: int,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        preset: str | None = None,
        solver: str | None = None,
        steps: int | None = None,
        shift: float | None = None,
        cfg_scale: float | None = None,
        renorm: float | None = None,
        cfg_trunc: float | None = None,
        cfg_mode: str | None = None,
        teacache: float | None = None,
        teacache_version: str | Sequence[float] | None = None,
        latents: torch.Tensor | None = None,
        decode: bool = True,
        progress: ProgressArg = False,
    ) -> SampleResult:
        """Generate images.

        Args:
            prompts: one prompt or a list (the system template is prepended).
            negative_prompt: ``None``/``""`` = unconditional ``""``; a string for all prompts or one per prompt.
            system: system template name (``real``, ``align``, ``base``, ``aesthetics``, ``4grid``, ``empty``) or
                ``None`` for none; default: the pipeline's ``default_system`` (``real``).
            width, height: image size in pixels (multiples of :attr:`size_multiple`).
            num_images_per_prompt: images per prompt.
            seed: ``int`` s gives image k (prompt-major order) seed ``s + k``; a list gives each image its
                seed; ``None`` draws random seeds (reported in ``settings["seeds"]``).
            preset: ``official`` (default), ``fast`` or ``diffusers`` (see :mod:`.presets`).
            solver, steps, shift, cfg_scale, renorm, cfg_trunc, cfg_mode, teacache, teacache_version:
                override the preset (``None`` keeps it). ``steps`` counts solver intervals; ``cfg_trunc`` ≥ 1
                never truncates; ``teacache`` 0 disables it (``True`` = the ``fast`` threshold);
                ``teacache_version`` is ``"v1"``, ``"v2"`` or coefficients (:meth:`calibrate_teacache`).
            latents: explicit initial noise (N, C, h, w) instead of seeded noise (seeds are then not used).
            decode: ``False`` skips decoding (``images`` is empty; ``latents`` is set).
            progress: ``True`` for a tqdm bar over steps, or a callable ``(step, total)``.
        """
        t_start = time.perf_counter()
        prompts = _as_list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        width, height = int(width), int(height)
        self.check_size(width, height)
        system = self.default_system if system is _UNSET else system
        settings = self.resolve(
            preset, solver=solver, steps=steps, shift=shift, cfg_scale=cfg_scale, renorm=renorm,
            cfg_trunc=cfg_trunc, cfg_mode=cfg_mode, teacache=teacache, teacache_version=teacache_version,
        )
        n_images = len(prompts) * num_images_per_prompt

        # seeds / noise
        if latents is not None:
            expected = (n_images, *self.latent_shape(width, height))
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents must have shape {expected} for {n_images} image(s) of {width}x{height}, got {tuple(latents.shape)}")
            seeds: list[int | None] = [None] * n_images
            noise = latents.to(self.device, torch.float32)
        else:
            if seed is None:
                rng = random.SystemRandom()
                seeds = [rng.randrange(2**31) for _ in range(n_images)]
            elif isinstance(seed, (int, np.integer)):
                seeds = [int(seed) + k for k in range(n_images)]
            else:
                seeds = [int(s) for s in seed]
                if len(seeds) != n_images:
                    raise ValueError(f"got {len(seeds)} seeds for {n_images} image(s); give one per image or a single int")
            noise = self.make_noise(seeds, width, height)

        # text
        negatives: list[str] | None = None
        if settings.guidance.guided:
            if negative_prompt is None:
                negatives = [""] * len(prompts)
            else:
                negatives = _as_list(negative_prompt)
                if len(negatives) == 1:
                    negatives = negatives * len(prompts)
                if len(negatives) != len(prompts):
                    raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        cond, uncond = self.encode_prompts(prompts, negatives, system)
        k = num_images_per_prompt
        cond = (cond[0].repeat_interleave(k, 0), cond[1].repeat_interleave(k, 0))
        if uncond is not None:
            uncond = (uncond[0].repeat_interleave(k, 0), uncond[1].repeat_interleave(k, 0))

        out, stats = self.sample_latents(noise, cond, uncond, settings, progress=progress)
        bad = nonfinite_images(out)
        if bad:
            stats["nonfinite_images"] = bad
            named = list(dict.fromkeys(prompts[i // k] for i in bad))  # image i belongs to prompt i // k
            log.warning(
                "the sampled latents of %d of %d image(s) are not finite (NaN or inf), so the decoded images are "
                "garbage; prompt(s): %s. Common causes: an untrained or diverged model, or fp16 overflow "
                "(try --dtype bf16 / fp32).", len(bad), n_images, "; ".join(repr(p) for p in named),
            )
        images = self.decode(out) if decode else []
        elapsed = time.perf_counter() - t_start
        record = {
            "preset": preset or DEFAULT_PRESET,
            **settings.to_dict(),
            "grid": "flow_dpm" if settings.solver == "dpm" else "uniform",
            "nfe_planned": solver_nfe(settings.solver, settings.steps),
            "system": system,
            # unguided (CFG scale 1) samples never see the negative prompt: recorded as none, as it was not used
            "negative_prompt": None if not settings.guidance.guided else (
                negative_prompt if (negative_prompt is None or isinstance(negative_prompt, str)) else list(negative_prompt)),
            "prompts": list(prompts),
            "width": width,
            "height": height,
            "num_images_per_prompt": num_images_per_prompt,
            "seeds": seeds,
            "explicit_latents": latents is not None,
            "dtype": str(self.dtype).replace("torch.", ""),
            "weights_dtype": str(self.dtype if self.cast_weights else torch.float32).replace("torch.", ""),
        }
        return SampleResult(
            images=images, settings=record, nfe=stats["nfe"], rows=stats["rows"], elapsed=elapsed, latents=out, stats=stats
        )


def kwargs_from_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Call arguments that reproduce an image from a ``settings`` record (e.g. read back from a PNG).

    A per-image record (``seed`` and ``prompt`` keys, as the CLI writes) gives ``prompts`` and ``seed``
    for that image; a call record gives all prompts and the per-image seed list.
    """
    kwargs: dict[str, Any] = {name: settings[name] for name in SETTING_NAMES if name in settings}
    for name in ("preset", "system", "negative_prompt", "width", "height", "num_images_per_prompt"):
        if name in settings:
            kwargs[name] = settings[name]
    if "prompt" in settings:
        kwargs["prompts"] = settings["prompt"]
        kwargs["num_images_per_prompt"] = 1
    elif "prompts" in settings:
        kwargs["prompts"] = settings["prompts"]
    if "seed" in settings:
        kwargs["seed"] = [int(settings["seed"])]
    elif settings.get("seeds") and None not in settings["seeds"]:
        kwargs["seed"] = [int(s) for s in settings["seeds"]]
    return kwargs

