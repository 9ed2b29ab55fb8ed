"""Everything the demo app does besides drawing widgets: validation, presets, seeds, sampling, PNGs.

The Gradio file (:mod:`lumina_lightning.ui.gradio_app`) only wires components to a
:class:`DemoService`; this module has no Gradio import, so it is unit-testable without a server or
a browser, and an API client gets exactly the checks the web page gets.

A request is a mapping of the :data:`REQUEST_FIELDS` names to *raw* values (what a browser or an
API client sent: numbers, strings, booleans, ``None``). :meth:`DemoService.validate` turns it into a
:class:`GenerationRequest` or raises :class:`RequestError` with a message meant for the user;
:meth:`DemoService.generate` runs the :class:`~lumina_lightning.sampling.pipeline.LuminaPipeline`
and returns a :class:`Generation`: PNG files (prompt, seed and every setting in their text
metadata, written by :func:`lumina_lightning.sampling.cli.save_png`), the seeds used, the time taken
and the model forwards, with the acceleration spelled out against the ``official`` preset. At most
``ServeConfig.concurrency`` pipeline calls run at once, and a request whose :class:`CancelFlag` is set
(:meth:`DemoService.agenerate` sets it when its task is cancelled) stops at its next sampling step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

# The presets the app offers (issue 7): the official sampler and the accelerated stack. ``diffusers``
# is left out because its CFG-Truncation is a step fraction, not model time, which would change the
# meaning of the truncation control under the user's hand.
APP_PRESETS = ("official", "fast")
# Order of the request values: the web page's inputs and the positional API arguments of /generate.
REQUEST_FIELDS = (
    "prompt", "negative_prompt", "system", "width", "height", "num_images", "randomize_seed", "seed",
    "preset", "solver", "steps", "cfg_scale", "renorm", "cfg_trunc", "teacache",
)
# Controls a preset fills in (the rest of the sampler settings, shift / cfg_mode / TeaCache polynomial,
# come from the preset and the checkpoint's own defaults).
PRESET_CONTROLS = ("solver", "steps", "cfg_scale", "renorm", "cfg_trunc", "teacache")
ASPECT_RATIOS = (("1:1", 1, 1), ("4:3", 4, 3), ("3:4", 3, 4), ("3:2", 3, 2), ("2:3", 2, 3),
                 ("16:9", 16, 9), ("9:16", 9, 16))

# Ranges of the numeric controls: (low, high). Generous enough for real use, tight enough that one
# request cannot occupy a shared server for an hour.
LIMITS: dict[str, tuple[float, float]] = {
    "cfg_scale": (1.0, 20.0),  # 1 = no guidance (and no unconditional forward)
    "renorm": (0.0, 10.0),  # 0 = off; official 1.0
    "cfg_trunc": (0.0, 1.0),  # model time; 1 = never truncate (official default)
    "teacache": (0.0, 2.0),  # 0 = off; fast 0.3
}
MAX_SEED = 2**31 - 1
DEFAULT_MAX_PIXELS = 2048 * 1024  # per image: 1024x1024 (the 2B model's native size) and its 2:1 / 1:2 siblings
DEFAULT_MAX_IMAGES = 4
DEFAULT_MAX_STEPS = 100
# Before tokenizing, absurdly long API prompts are cut to this many characters (tokenizing megabytes
# would stall the worker; the encoder keeps at most a few hundred tokens anyway).
MAX_PROMPT_CHARS = 20_000
TINY_RECIPE = "recipes/tiny/stage1_lowres.yaml"
TINY_EXPORT = "runs/tiny_stage1_lowres/export"

ProgressFn = Callable[[int, int, str], None]


class RequestError(ValueError):
    """A request the app refuses; the message is shown to the user as is."""


class GenerationCancelled(RequestError):
    """The request was cancelled (:class:`CancelFlag`) before it finished; no PNGs were written."""


class CancelFlag:
    """A per-request cancel flag: set it (from any thread) and the generation stops at its next
    sampling step, or before it starts when it is still waiting for a slot.

    :meth:`DemoService.agenerate` sets it when the awaiting task is cancelled (gradio cancels the
    task of a request a client cancels; it cannot stop the worker thread itself).
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`GenerationCancelled` when set."""
        if self._event.is_set():
            raise GenerationCancelled("the request was cancelled")


def no_checkpoint_message(path: str | os.PathLike | None = None) -> str:
    """Why ``lumina demo`` refuses to start without a checkpoint, and how to get one offline."""
    head = (
        "lumina demo: no checkpoint given (--ckpt PATH)." if not path
        else f"lumina demo: no checkpoint or pipeline at {path}."
    )
    return (
        f"{head}\n"
        "The demo serves a trained model. To get one offline, train the tiny demo model on the CPU\n"
        "(a few minutes, no downloads) and serve its export:\n\n"
        f"    lightning run {TINY_RECIPE}\n"
        f"    lumina demo --ckpt {TINY_EXPORT}\n\n"
        "--ckpt also takes a pipeline folder, a training .ckpt, a diffusers Lumina2 folder, or a bare\n"
        "transformer checkpoint (official .pth, with --text-encoder PATH --vae PATH)."
    )


# --------------------------------------------------------------------------------------------------
# raw value parsing (API clients send anything JSON can hold)
# --------------------------------------------------------------------------------------------------


def _range(low: float | None, high: float | None) -> str:
    def show(x: float) -> str:  # whole bounds in full: 2147483647, not 2.14748e+09
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    if low is not None and high is not None:
        return f"between {show(low)} and {show(high)}"
    return f"at least {show(low)}" if low is not None else f"at most {show(high)}" if high is not None else ""


def _number(name: str, value: Any, *, integer: bool, low: float | None = None,
            high: float | None = None) -> float | int:
    what = "a whole number" if integer else "a number"
    if isinstance(value, bool) or value is None:
        raise RequestError(f"{name} must be {what}, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            raise RequestError(f"{name} must be {what}, got {text[:40]!r}") from None
    if not isinstance(value, (int, float)):
        # numpy scalars and similar arrive only from Python callers; anything else (lists, dicts) is refused
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise RequestError(f"{name} must be {what}, got a {type(value).__name__}") from None
    try:
        finite = math.isfinite(value)
    except OverflowError:  # a JSON integer beyond float range (1 and 400 zeros is valid JSON)
        about = f"about {'-' if value < 0 else ''}1e{int(math.log10(abs(value)))}"
        if low is not None and high is not None:
            raise RequestError(f"{name} must be {_range(low, high)}, got {about}") from None
        raise RequestError(f"{name} is out of range, got {about}") from None
    if not finite:
        raise RequestError(f"{name} must be a finite number, got {value}")
    if integer:
        if float(value) != int(value):
            raise RequestError(f"{name} must be a whole number, got {value}")
        value = int(value)
    else:
        value = float(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"{name} must be {_range(low, high)}, got {value:g}")
    return value


def _text(name: str, value: Any, *, allow_none: bool = True) -> str:
    if value is None and allow_none:
        return ""
    if not isinstance(value, str):
        raise RequestError(f"{name} must be text, got {type(value).__name__}")
    return value


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise RequestError(f"{name} must be true or false, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise RequestError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _slug(text: str, n: int = 32) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "image"


def _fit_budget(width: int, height: int, max_pixels: int, multiple: int) -> tuple[int, int]:
    """The largest size of about the same aspect ratio within ``max_pixels`` (sides multiples of ``multiple``)."""
    scale = math.sqrt(max_pixels / (width * height))
    w = max(multiple, int(width * scale) // multiple * multiple)
    h = max(multiple, int(height * scale) // multiple * multiple)
    return w, h


# --------------------------------------------------------------------------------------------------
# requests and results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    """Server-side limits and defaults (``lumina demo`` flags).

    Args:
        max_pixels: per-image pixel budget (width × height); larger requests are refused.
        max_images: most images per request.
        max_steps: most solver steps per request.
        resolution: side of the square resolution preset (the aspect-ratio presets keep its area);
            ``None`` picks one from the model (see :meth:`DemoService.base_resolution`).
        checkpoint: what is served (shown on the page and written into each PNG's metadata).
        output_dir: where PNGs are written (default: a fresh temporary folder, removed on close).
        keep_outputs_s: PNG folders older than this are deleted at the next request.
        concurrency: generations that may run at once (``--concurrency``); :meth:`DemoService.generate`
            holds one of these slots around the pipeline call, so the bound holds whatever the web
            framework's queue does (gradio frees a cancelled request's queue slot while its thread still
            runs).
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = DEFAULT_MAX_IMAGES
    max_steps: int = DEFAULT_MAX_STEPS
    resolution: int | None = None
    checkpoint: str = ""
    output_dir: str | None = None
    keep_outputs_s: float = 3600.0
    concurrency: int = 1

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_images", "max_steps", "concurrency"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution is not None and int(self.resolution) < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")


@dataclass
class GenerationRequest:
    """A validated request; ``notices`` are the warnings the user should see (snapped size, truncation)."""

    prompt: str
    negative_prompt: str
    system: str | None
    width: int
    height: int
    num_images: int
    seed: int
    seed_was_random: bool
    preset: str
    solver: str
    steps: int
    cfg_scale: float
    renorm: float
    cfg_trunc: float
    teacache: float
    notices: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None
    prompt_truncated: bool = False

    @property
    def seeds(self) -> list[int]:
        """Image k gets seed + k (the pipeline's convention), so one number reproduces the batch."""
        return [self.seed + k for k in range(self.num_images)]

    def pipeline_kwargs(self) -> dict[str, Any]:
        return dict(
            negative_prompt=self.negative_prompt or None, system=self.system, width=self.width,
            height=self.height, num_images_per_prompt=self.num_images, seed=self.seeds, preset=self.preset,
            solver=self.solver, steps=self.steps, cfg_scale=self.cfg_scale, renorm=self.renorm,
            cfg_trunc=self.cfg_trunc, teacache=self.teacache,
        )


@dataclass
class Generation:
    """What one request produced.

    Attributes:
        files: the PNGs (with metadata), one per image, in seed order.
        images: the same images as PIL objects.
        seeds: seed of each image.
        settings: the pipeline's settings record (every sampler setting, size, system, seeds).
        elapsed: wall seconds of the pipeline call (encode + sample + decode).
        nfe: transformer calls (a batched cond + uncond call counts once).
        passes_per_image: transformer passes through the main blocks per image (cond and uncond rows
            counted separately, TeaCache-skipped rows not counted): the honest cost measure.
        baseline_nfe, baseline_passes_per_image: the same for the ``official`` preset, for comparison.
        notices: warnings for the user (snapped size, truncated prompt).
        summary: a Markdown paragraph with all of the above for the page.
    """

    files: list[Path]
    images: list[Any]
    seeds: list[int]
    settings: dict[str, Any]
    elapsed: float
    nfe: int
    passes_per_image: float
    baseline_nfe: int
    baseline_passes_per_image: int
    stats: dict[str, Any]
    notices: list[str]
    summary: str

    @property
    def gallery(self) -> list[tuple[str, str]]:
        return [(str(f), f"seed {s}") for f, s in zip(self.files, self.seeds)]

    def info(self) -> dict[str, Any]:
        """JSON-able facts for API clients (the page shows :attr:`summary`)."""
        return {
            "seeds": list(self.seeds),
            "width": self.settings["width"],
            "height": self.settings["height"],
            "elapsed_s": round(self.elapsed, 4),
            "sampling_s": round(float(self.stats.get("sampling_seconds", 0.0)), 4),
            "nfe": self.nfe,
            "passes_per_image": self.passes_per_image,
            "official_nfe": self.baseline_nfe,
            "official_passes_per_image": self.baseline_passes_per_image,
            "teacache_skipped_rows": int(self.stats.get("skipped_rows", 0)),
            "notices": list(self.notices),
            "settings": {k: v for k, v in self.settings.items() if k not in ("prompts",)},
        }


class _SerializedEncoder:
    """Lets several queue workers share one text encoder: ``encode`` runs one call at a time.

    ``HFTextEncoder`` keeps an LRU cache (an ``OrderedDict``) that concurrent calls would corrupt;
    everything else (token counting, attributes) is passed through untouched.
    """

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self._lock = threading.Lock()

    def encode(self, prompts: list[str]) -> Any:
        with self._lock:
            return self._encoder.encode(prompts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)


class DemoService:
    """The demo's logic around one loaded pipeline.

    Args:
        pipe: a :class:`~lumina_lightning.sampling.pipeline.LuminaPipeline`.
        config: limits and defaults (:class:`ServeConfig`).
    """

    def __init__(self, pipe: Any, config: ServeConfig | None = None, *,
                 loaded: Mapping[str, Any] | None = None) -> None:
        self.pipe = pipe
        self.config = config or ServeConfig()
        # the load_pipeline arguments that reproduce the served pipeline (checkpoint, ema, text_encoder,
        # vae; :func:`~lumina_lightning.sampling.cli.loaded_record`), written into every PNG; None for a
        # pipeline built in memory, whose PNGs record ``config.checkpoint`` as given
        self.loaded = dict(loaded) if loaded is not None else None
        if not isinstance(pipe.text_encoder, _SerializedEncoder):
            pipe.text_encoder = _SerializedEncoder(pipe.text_encoder)
        self._output_dir: Path | None = None
        self._own_output_dir = self.config.output_dir is None
        self._slots = threading.BoundedSemaphore(int(self.config.concurrency))

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        text_encoder: str | None = None,
        vae: str | None = None,
        device: str = "cpu",
        dtype: Any = None,
        config: ServeConfig | None = None,
    ) -> "DemoService":
        """Load any checkpoint :func:`~lumina_lightning.sampling.pipeline_io.load_pipeline` reads."""
        import torch

        from lumina_lightning.sampling.cli import loaded_record
        from lumina_lightning.sampling.pipeline_io import load_pipeline

        if dtype is None:
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        pipe = load_pipeline(path, text_encoder=text_encoder, vae=vae, device=device, dtype=dtype)
        config = config or ServeConfig()
        if not config.checkpoint:
            config = dataclasses.replace(config, checkpoint=str(path))
        # recorded as `lumina sample` records it (absolute paths, the weights ema="auto" picked), now,
        # while a relative path still means what it meant on the command line
        loaded = loaded_record(path, pipe.model, text_encoder=text_encoder, vae=vae)
        return cls(pipe, config, loaded=loaded)

    @property
    def output_dir(self) -> Path:
        """Where the PNGs go; created on first use (a service that never serves leaves nothing behind)."""
        if self._output_dir is None:
            path = self.config.output_dir or tempfile.mkdtemp(prefix="lumina-demo-")
            Path(path).mkdir(parents=True, exist_ok=True)
            self._output_dir = Path(path)
        return self._output_dir

    def close(self) -> None:
        """Remove the PNG folder when this service created it."""
        if self._own_output_dir and self._output_dir is not None:
            shutil.rmtree(self._output_dir, ignore_errors=True)
            self._output_dir = None

    # -- what the page shows before any request --------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        return int(self.pipe.size_multiple)

    @property
    def max_tokens(self) -> int | None:
        """The text encoder's token cap (256 for the official Gemma-2 setup), if it has one."""
        value = getattr(self.pipe.text_encoder, "max_length", None)
        return int(value) if value else None

    @property
    def system_choices(self) -> list[str]:
        from lumina_lightning.encoders.text import SYSTEM_PROMPTS

        return list(SYSTEM_PROMPTS)

    @property
    def default_system(self) -> str:
        # ``empty`` stands for "no template": a dropdown cannot hold None
        return self.pipe.default_system or "empty"

    @property
    def solver_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs; labels say what a step costs so the forward counts make sense."""
        from lumina_lightning.sampling.solvers import EVALS_PER_STEP

        names = {"midpoint": "Midpoint", "euler": "Euler", "dpm": "Flow-DPM-Solver (DPM-Solver++ 2M)"}
        return [(f"{names.get(s, s)}: {n} forward{'s' if n > 1 else ''}/step", s) for s, n in EVALS_PER_STEP.items()]

    def check_resolution(self) -> None:
        """Refuse a configured ``resolution`` (``lumina demo --resolution``) the model cannot draw, with the
        message ``lumina sample --width`` gives (the pipeline's own ``check_size``: multiples of
        :attr:`size_multiple`, the nearest valid size, the position tables). ``lumina demo`` calls it
        right after loading, the first moment the model's size multiple is known; without it the square
        preset silently snapped to another size. A side over the ``max_pixels`` budget is refused too
        (it was shrunk to fit unsaid). ``None`` (the model's own size) passes."""
        side = self.config.resolution
        if side is None:
            return
        try:
            self.pipe.check_size(int(side), int(side))
        except ValueError as err:
            raise ValueError(f"--resolution {side}: {err}") from None
        if int(side) ** 2 > self.config.max_pixels:  # base_resolution would shrink it to the budget unsaid
            fits = _fit_budget(int(side), int(side), self.config.max_pixels, self.size_multiple)[0]
            raise ValueError(f"--resolution {side}: {side}x{side} is {int(side) ** 2:,} pixels, more than the "
                             f"per-image budget --max-pixels {self.config.max_pixels:,}; raise --max-pixels to at "
                             f"least {int(side) ** 2}, or use --resolution {fits} (the largest that fits)")

    def base_resolution(self) -> int:
        """Side of the square preset: the configured ``resolution`` (see :meth:`check_resolution`), else
        the one the checkpoint was trained at (``pipeline.json``), else 64 tokens a side for latent models
        (1024 px with the FLUX VAE, the 2B model's native size) and 16 tokens a side for pixel-space
        models; snapped and kept within the model's position tables and the pixel budget."""
        m = self.size_multiple
        side = (self.config.resolution or getattr(self.pipe, "resolution", None)
                or (64 if int(self.pipe.autoencoder.downsample) > 1 else 16) * m)
        side = max(m, int(side) // m * m)
        side = min(side, *self.pipe.max_size)
        budget_side = int(math.sqrt(self.config.max_pixels)) // m * m
        return max(m, min(side, budget_side))

    def resolution_presets(self) -> list[tuple[str, int, int]]:
        """``(label, width, height)`` per aspect ratio, each about the area of the square preset."""
        base = self.base_resolution()
        m = self.size_multiple
        max_w, max_h = self.pipe.max_size
        out = []
        for name, a, b in ASPECT_RATIOS:
            w = max(m, round(base * math.sqrt(a / b) / m) * m)
            h = max(m, round(base * math.sqrt(b / a) / m) * m)
            if w > max_w or h > max_h or w * h > self.config.max_pixels:
                continue
            out.append((f"{name}  ({w}x{h})", w, h))
        return out

    def size_for(self, label: str) -> tuple[int, int]:
        """Width and height of a resolution preset label."""
        for name, w, h in self.resolution_presets():
            if name == label:
                return w, h
        raise RequestError(f"unknown resolution preset {label!r}")

    def preset_values(self, preset: str) -> dict[str, Any]:
        """The control values a preset fills in (after the checkpoint's own defaults)."""
        _choice("preset", preset, APP_PRESETS)
        s = self.pipe.resolve(preset)
        trunc = s.cfg_trunc

        # a checkpoint's defaults or a low --max-steps may lie outside the controls' ranges; the
        # filled-in values must always be a valid request
        def clamp(key: str, value: float) -> float:
            low, high = LIMITS[key]
            return float(min(max(value, low), high))

        return {
            "solver": s.solver,
            "steps": min(int(s.steps), self.config.max_steps),
            "cfg_scale": clamp("cfg_scale", s.cfg_scale),
            "renorm": clamp("renorm", s.renorm),
            # the control has no "off" state: 1.0 (and above) never truncates in model time
            "cfg_trunc": 1.0 if trunc is None or trunc >= 1.0 else clamp("cfg_trunc", trunc),
            "teacache": clamp("teacache", s.teacache),
        }

    def defaults(self) -> dict[str, Any]:
        """Initial values of every request field (the ``official`` preset, the square size)."""
        presets = self.resolution_presets()
        w, h = (presets[0][1], presets[0][2]) if presets else (self.base_resolution(),) * 2
        return {
            "prompt": "", "negative_prompt": "", "system": self.default_system, "width": w, "height": h,
            "num_images": 1, "randomize_seed": True, "seed": 0, "preset": "official",
            **self.preset_values("official"),
        }

    def describe(self) -> str:
        """One Markdown line about the served model and the server's limits."""
        model = self.pipe.model
        params = sum(p.numel() for p in model.parameters()) / 1e6
        mw, mh = self.pipe.max_size
        tokens = f"{self.max_tokens}-token prompts" if self.max_tokens else "prompts"
        return (
            f"Serving `{self.config.checkpoint or 'a pipeline'}`: Next-DiT {params:.1f}M parameters on "
            f"{self.pipe.device}; sizes in multiples of {self.size_multiple} px up to {mw}x{mh}, at most "
            f"{self.config.max_pixels / 1e6:.2f} MP per image, {self.config.max_images} images per request; "
            f"{tokens}."
        )

    # -- validation --------------------------------------------------------------------------------------
    def _prompt_notice(self, name: str, text: str, system: str | None) -> tuple[int | None, bool, str | None]:
        """(tokens, truncated, notice) of one prompt as the encoder sees it (with the template)."""
        from lumina_lightning.encoders.text import build_prompt

        encoder = self.pipe.text_encoder
        limit = self.max_tokens
        if not limit or not hasattr(encoder, "token_count"):
            return None, False, None
        full = build_prompt(text, system)
        tokens = int(encoder.token_count(full))
        if tokens <= limit:
            return tokens, False, None
        template = tokens - int(encoder.token_count(text)) if system and system != "empty" else 0
        tail = self._cut_tail(full, limit)
        with_template = f" including the {template}-token '{system}' system template" if template > 0 else ""
        notice = (
            f"The {name} is {tokens} tokens{with_template}; the text encoder reads at most {limit}, so it was "
            f"truncated" + (f" and this end was ignored: \u201c{tail}\u201d" if tail else "") + "."
        )
        return tokens, True, notice

    def _cut_tail(self, text: str, limit: int) -> str:
        """The part of ``text`` past the token limit (via the tokenizer's offsets), shortened for display."""
        tokenizer = getattr(self.pipe.text_encoder, "tokenizer", None)
        try:
            enc = tokenizer(text, add_special_tokens=True, truncation=True, max_length=limit,
                            return_offsets_mapping=True)
            end = max(e for _, e in enc["offset_mapping"])
        except Exception:  # slow tokenizers have no offsets: the notice then only gives the counts
            return ""
        tail = text[end:].strip()
        return tail if len(tail) <= 120 else tail[:117] + "..."

    def validate(self, raw: Mapping[str, Any]) -> GenerationRequest:
        """Check and normalise raw request values; raises :class:`RequestError` with a user-facing message."""
        if not isinstance(raw, Mapping):
            raise RequestError("the request must be a mapping of field names to values")
        unknown = sorted(set(raw) - set(REQUEST_FIELDS))
        if unknown:
            raise RequestError(f"unknown request field(s) {unknown}; known: {list(REQUEST_FIELDS)}")
        values = {**self.defaults(), **raw}
        cfg = self.config
        notices: list[str] = []

        prompt = _text("prompt", values["prompt"]).strip()
        if not prompt:
            raise RequestError("Please enter a prompt: it is empty.")
        negative = _text("negative prompt", values["negative_prompt"]).strip()
        for name, text in (("prompt", prompt), ("negative prompt", negative)):
            if len(text) > MAX_PROMPT_CHARS:
                notices.append(f"The {name} is {len(text)} characters; only the first {MAX_PROMPT_CHARS} were read.")
        prompt, negative = prompt[:MAX_PROMPT_CHARS], negative[:MAX_PROMPT_CHARS]
        system = _choice("system prompt", values["system"] or "empty", self.system_choices)
        system_arg = None if system == "empty" else system

        preset = _choice("preset", values["preset"], APP_PRESETS)
        # A sampler control left out (or None, what the API endpoint receives for a field a client did
        # not send) takes the requested preset's value, not the official one defaults() filled in.
        values.update({k: v for k, v in self.preset_values(preset).items() if raw.get(k) is None})
        from lumina_lightning.sampling.solvers import SOLVER_NAMES

        solver = _choice("solver", values["solver"], SOLVER_NAMES)
        steps = int(_number("steps", values["steps"], integer=True, low=1, high=cfg.max_steps))
        def real(label: str, key: str) -> float:
            low, high = LIMITS[key]
            return float(_number(label, values[key], integer=False, low=low, high=high))

        cfg_scale = real("CFG scale", "cfg_scale")
        renorm = real("CFG-Renorm", "renorm")
        # kept as given: 1.0 already means "never truncate" (official model time and diffusers step
        # fraction alike), and unlike None it overrides a preset or checkpoint that truncates
        trunc = real("CFG-Truncation", "cfg_trunc")
        teacache = real("TeaCache threshold", "teacache")
        num_images = int(_number("number of images", values["num_images"], integer=True, low=1, high=cfg.max_images))

        # size: snap to the multiple / position tables (with a notice), then refuse what is over budget
        width = int(_number("width", values["width"], integer=True, low=1))
        height = int(_number("height", values["height"], integer=True, low=1))
        w, h, snap = self.pipe.snap_size(width, height)
        if snap:
            notices.append(f"Image {snap}.")
        if w * h > cfg.max_pixels:
            fw, fh = _fit_budget(w, h, cfg.max_pixels, self.size_multiple)
            asked = f"{width}x{height}" + (f" (snapped to {w}x{h})" if snap else "")
            raise RequestError(
                f"Image size {asked} is {w * h / 1e6:.2f} megapixels, over this server's budget of "
                f"{cfg.max_pixels / 1e6:.2f} megapixels per image ({cfg.max_pixels} pixels, --max-pixels); "
                f"try {fw}x{fh}."
            )

        randomize = _flag("randomize seed", values["randomize_seed"])
        seed_value = values["seed"]
        if seed_value is None or (isinstance(seed_value, str) and not seed_value.strip()):
            randomize = True
        if not randomize:
            seed = int(_number("seed", seed_value, integer=True, low=-1, high=MAX_SEED))
            randomize = seed == -1  # the common "-1 = random" convention of image APIs
        if randomize:
            # one random base seed, not one per image: the number shown reproduces the whole batch
            seed = random.SystemRandom().randrange(MAX_SEED - cfg.max_images)
        elif seed + num_images - 1 > MAX_SEED:
            raise RequestError(f"seed must be at most {MAX_SEED - num_images + 1} for {num_images} images "
                               f"(image k uses seed + k), got {seed}")

        tokens, truncated, notice = self._prompt_notice("prompt", prompt, system_arg)
        if notice:
            notices.append(notice)
        if negative:
            _, _, neg_notice = self._prompt_notice("negative prompt", negative, system_arg)
            if neg_notice:
                notices.append(neg_notice)

        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative, system=system_arg, width=w, height=h, num_images=num_images,
            seed=seed, seed_was_random=randomize, preset=preset, solver=solver, steps=steps, cfg_scale=cfg_scale,
            renorm=renorm, cfg_trunc=trunc, teacache=teacache, notices=notices,
            prompt_tokens=tokens, prompt_truncated=truncated,
        )
        try:  # the sampler's own checks (e.g. a combination it refuses) as a user message
            self.pipe.resolve(preset, solver=solver, steps=steps, cfg_scale=cfg_scale, renorm=renorm,
                              cfg_trunc=request.cfg_trunc, teacache=teacache)
        except ValueError as err:
            raise RequestError(str(err)) from None
        return request

    # -- generation -----------------------------------------------------------------------------------
    def _prune_outputs(self) -> None:
        cutoff = time.time() - self.config.keep_outputs_s
        for child in self.output_dir.glob("req-*"):
            try:
                if child.stat().st_mtime < cutoff:
                    shutil.rmtree(child, ignore_errors=True)
            except FileNotFoundError:  # another worker removed it first
                pass

    def set_concurrency(self, concurrency: int) -> None:
        """Change how many generations may run at once (before serving: requests already holding a
        slot of the old bound keep it)."""
        if int(concurrency) < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.config = dataclasses.replace(self.config, concurrency=int(concurrency))
        self._slots = threading.BoundedSemaphore(int(concurrency))

    def _acquire_slot(self, slots: threading.Semaphore, cancel: CancelFlag | None) -> None:
        # wait in short slices so that a request cancelled while it waits never runs
        while not slots.acquire(timeout=0.05):
            if cancel is not None:
                cancel.check()

    async def agenerate(self, raw: Mapping[str, Any], progress: ProgressFn | None = None) -> Generation:
        """:meth:`generate` in a worker thread, for an asyncio server (the Gradio app).

        When the awaiting task is cancelled (gradio cancels a request a client cancels, e.g.
        ``gradio_client``'s ``Job.cancel()``), the request's :class:`CancelFlag` is set, so the
        generation stops at its next sampling step and frees its slot, and the cancellation goes on.
        """
        import asyncio

        cancel = CancelFlag()
        try:
            return await asyncio.to_thread(self.generate, raw, progress, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def generate(self, raw: Mapping[str, Any], progress: ProgressFn | None = None,
                 cancel: CancelFlag | None = None) -> Generation:
        """Validate, sample and write PNGs. Raises :class:`RequestError` for anything the user can fix
        (and for failures of the model, with the reason, so that the server keeps serving), and
        :class:`GenerationCancelled` when ``cancel`` is set before the images are sampled.

        At most ``config.concurrency`` pipeline calls run at once (the others wait here)."""
        from lumina_lightning.sampling.cli import save_png
        from lumina_lightning.sampling.solvers import nfe as solver_nfe

        request = self.validate(raw)
        self._prune_outputs()
        report = progress or (lambda done, total, desc: None)

        def on_step(step: int, total: int) -> None:
            if cancel is not None:
                cancel.check()  # raised through the solver: the pipeline stops at this step
            report(step, total, f"sampling: step {step}/{total}")

        slots = self._slots
        if not slots.acquire(blocking=False):
            report(0, request.steps, "waiting for another generation to finish")
            self._acquire_slot(slots, cancel)
        try:
            if cancel is not None:
                cancel.check()
            report(0, request.steps, "encoding the prompt")
            result = self.pipe(request.prompt, progress=on_step, **request.pipeline_kwargs())
        except RequestError:
            raise
        except ValueError as err:
            raise RequestError(f"the pipeline refused the request: {err}") from None
        except Exception as err:  # noqa: BLE001 - one bad request (e.g. out of memory) must not stop the server
            log.exception("generation failed")
            raise RequestError(f"generation failed: {type(err).__name__}: {err}") from None
        finally:
            slots.release()

        report(request.steps, request.steps, "saving PNGs")
        folder = self.output_dir / f"req-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        settings = result.settings
        n = len(result.images)
        passes = result.stats.get("block_rows", result.rows) / max(n, 1)
        official = self.pipe.resolve("official")
        baseline_nfe = solver_nfe(official.solver, official.steps)
        baseline_passes = baseline_nfe * (2 if official.guidance.guided else 1)
        files = []
        # which weights and encoders were served: the load_pipeline arguments, as `lumina sample` records
        # them; a model built in memory records the configured name and ema None
        weights = self.loaded or dict(checkpoint=self.config.checkpoint,
                                      ema=getattr(self.pipe.model, "weights_ema", None))
        for k, (image, seed) in enumerate(zip(result.images, request.seeds)):
            record = {key: value for key, value in settings.items() if key not in ("prompts", "seeds")}
            record.update(
                prompt=request.prompt, seed=seed, index=k, **weights, nfe=result.nfe,
                rows_per_image=result.rows // max(n, 1), passes_per_image=passes,
                elapsed_s=round(result.elapsed, 4), prompt_tokens=request.prompt_tokens,
                prompt_truncated=request.prompt_truncated, source="lumina demo",
            )
            path = folder / f"lumina_{_slug(request.prompt)}_s{seed}.png"
            save_png(image, path, record)
            files.append(path)

        generation = Generation(
            files=files, images=list(result.images), seeds=request.seeds, settings=settings, elapsed=result.elapsed,
            nfe=int(result.nfe), passes_per_image=round(float(passes), 2), baseline_nfe=int(baseline_nfe),
            baseline_passes_per_image=int(baseline_passes), stats={k: v for k, v in result.stats.items()
                                                                   if k != "teacache_log"},
            notices=list(request.notices), summary="",
        )
        generation.summary = self.summarize(request, generation)
        return generation

    def summarize(self, request: GenerationRequest, gen: Generation) -> str:
        """Markdown for the page: seeds, size, time, forwards and the saving against ``official``."""
        seeds = ", ".join(str(s) for s in gen.seeds)
        origin = "random" if request.seed_was_random else "fixed"
        lines = [
            f"**{len(gen.files)} image{'s' if len(gen.files) != 1 else ''}**, {request.width}x{request.height}, "
            f"seed{'s' if len(gen.seeds) != 1 else ''} {seeds} ({origin}; image k uses seed + k)",
            f"**Time:** {gen.elapsed:.2f} s (sampling {float(gen.stats.get('sampling_seconds', 0.0)):.2f} s)",
        ]
        s = self.pipe.resolve(request.preset, solver=request.solver, steps=request.steps, cfg_scale=request.cfg_scale,
                              renorm=request.renorm, cfg_trunc=request.cfg_trunc, teacache=request.teacache)
        detail = [f"{s.solver} x{s.steps}"]
        if s.guidance.guided:
            truncated = s.cfg_trunc is not None and s.cfg_trunc < 1.0
            detail.append(f"CFG on {gen.stats.get('guided_calls', gen.nfe)} of {gen.nfe} calls, "
                          + (f"truncated at {s.cfg_trunc:g}" if truncated else "never truncated"))
        if s.teacache > 0:
            detail.append(f"TeaCache skipped {gen.stats.get('skipped_rows', 0)} row(s)")
        lines.append(
            f"**Model forwards:** {gen.nfe} transformer calls, {gen.passes_per_image:g} passes per image "
            f"({'; '.join(detail)}). The `official` preset takes {gen.baseline_nfe} calls, "
            f"{gen.baseline_passes_per_image} passes per image"
            + (f": **{gen.baseline_passes_per_image / gen.passes_per_image:.1f}x fewer passes**." if
               gen.passes_per_image and gen.passes_per_image < gen.baseline_passes_per_image else ".")
        )
        lines += [f"\u26a0\ufe0f {n}" for n in gen.notices]
        return "\n\n".join(lines)
