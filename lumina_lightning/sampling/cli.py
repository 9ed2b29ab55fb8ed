"""``lumina sample``: generate PNGs from prompts with any checkpoint or pipeline folder.

Every PNG carries its prompt, seed and all settings in its text metadata (``prompt``, ``seed``,
``negative_prompt`` and ``lumina_settings`` = the full JSON record), and ``OUT/index.jsonl`` lists
the same records, one per image. :func:`read_png_settings` reads a record back and
:func:`lumina_lightning.sampling.pipeline.kwargs_from_settings` turns it into call arguments; its
``checkpoint``, ``ema``, ``text_encoder`` and ``vae`` are the ``load_pipeline`` arguments it was drawn with.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

SETTINGS_KEY = "lumina_settings"
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def teacache_version_arg(text: str) -> str | list[float]:
    """argparse type for ``--teacache-version``: ``v1``, ``v2`` or comma-separated coefficients."""
    if text in ("v1", "v2"):
        return text
    try:
        return [float(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected v1, v2 or comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from lumina_lightning.encoders.text import SYSTEM_PROMPTS
    from lumina_lightning.sampling.presets import PRESETS
    from lumina_lightning.sampling.solvers import SOLVER_NAMES

    p = argparse.ArgumentParser(
        prog="lumina sample",
        description="Generate images from prompts. Settings come from --preset (default: official = midpoint "
        "17 steps, shift 6, CFG 4, renorm 1.0), then the checkpoint's pipeline defaults, then the flags given.",
    )
    p.add_argument("--ckpt", required=True, help="pipeline folder, diffusers Lumina2 folder, training .ckpt, or a "
                   "bare transformer checkpoint (then also --text-encoder and --vae)")
    p.add_argument("--text-encoder", help="text-encoder folder (or 'minilm'); overrides the checkpoint's")
    p.add_argument("--vae", help="VAE folder or 'pixel'; overrides the checkpoint's")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (quote each one); same as --prompt")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="UTF-8 text file, one prompt per line; a line starting with '{' is a "
                   "JSONL record {\"prompt\": ..., \"seed\": int, \"negative_prompt\": ...} (seed and "
                   "negative_prompt optional, null = not given; other keys are refused). A prompt that itself "
                   "starts with '{' must be written as such a record. Every line is checked before the model loads")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for every prompt (default: none = '')")
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    p.add_argument("--width", type=int, default=None,
                   help="default: as --height, else the resolution the checkpoint was trained at, else 1024")
    p.add_argument("--height", type=int, default=None, help="default: as --width")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="official (default) | fast | diffusers")
    p.add_argument("--solver", choices=SOLVER_NAMES, default=None)
    p.add_argument("--steps", type=int, default=None, help="solver steps (intervals; official '18' = 17 steps)")
    p.add_argument("--shift", type=float, default=None,
                   help="time shift (default 6, every preset's; a pipeline folder's default shift applies over "
                   "the preset, a diffusers folder's scheduler shift only when no --preset is given)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default 4; 1 = no guidance)")
    p.add_argument("--renorm", type=float, default=None, help="CFG-Renorm factor (0 = off; default 1.0)")
    p.add_argument("--cfg-trunc", type=float, default=None,
                   help="CFG truncation: model time (official mode; >= 1 never) or step fraction (diffusers mode)")
    p.add_argument("--cfg-mode", choices=("official", "diffusers"), default=None,
                   help="renorm/truncation semantics (default official)")
    p.add_argument("--teacache", type=float, default=None, help="TeaCache threshold (0 = off)")
    p.add_argument("--teacache-version", type=teacache_version_arg, default=None,
                   help="v1 | v2 (the released model's polynomials) or comma-separated coefficients, highest degree first")
    p.add_argument("--seed", type=int, default=0, help="base seed: image k gets seed+k (default 0)")
    p.add_argument("--n-per-prompt", type=int, default=1, help="images per prompt")
    p.add_argument("--system", default=None, choices=[*sorted(SYSTEM_PROMPTS), "none"],
                   help="system template (default: the checkpoint's, else 'real'); 'none' for none")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="transformer autocast dtype on CUDA (default bf16)")
    p.add_argument("--ema", choices=("auto", "true", "false"), default="auto", help="use EMA weights (default auto)")
    return p


# the keys a --prompts-file JSONL line may have; anything else is refused (a misspelled "negative" or
# "neg" used to be dropped silently)
PROMPT_KEYS = ("prompt", "seed", "negative_prompt")
# what torch.Generator.manual_seed accepts
_SEED_RANGE = (-(2**63), 2**64 - 1)


def _prompt_record(record: Any, where: str, n_per_prompt: int = 1) -> dict[str, Any]:
    """A checked JSONL record: ``prompt`` a non-empty string, ``seed`` an int, ``negative_prompt`` a
    string; ``null`` is the same as leaving a key out. ``ValueError`` starting with ``where`` otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a JSONL line must be an object like {{\"prompt\": \"...\"}}, "
                         f"got a {type(record).__name__}")
    unknown = [k for k in record if k not in PROMPT_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(map(repr, PROMPT_KEYS))}")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        got = "an empty string" if isinstance(prompt, str) else "nothing" if prompt is None else repr(prompt)
        raise ValueError(f"{where}: a JSONL line needs a non-empty string 'prompt', got {got}")
    item: dict[str, Any] = {"prompt": prompt}
    seed = record.get("seed")
    if seed is not None:
        # bool is an int in Python and 2.9 would be cut to 2: both are refused, as are "3" and 3.0
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{where}: 'seed' must be a whole number like 7 (or null for the default), "
                             f"got {json.dumps(seed)}")
        low, high = _SEED_RANGE
        if not low <= seed <= high - (n_per_prompt - 1):
            raise ValueError(f"{where}: 'seed' must be between {low} and {high - (n_per_prompt - 1)}, got {seed}")
        item["seed"] = seed
    negative = record.get("negative_prompt")
    if negative is not None:
        if not isinstance(negative, str):
            raise ValueError(f"{where}: 'negative_prompt' must be a string (or null for --negative-prompt), "
                             f"got {json.dumps(negative)}")
        item["negative_prompt"] = negative
    return item


def read_prompts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """[{"prompt": str, "seed"?: int, "negative_prompt"?: str}, ...] from flags and file.

    Every line of ``--prompts-file`` is checked here, before any model loads: a bad line is a
    ``ValueError`` naming ``path:line``. The file is UTF-8 (a byte-order mark is skipped). A line
    starting with ``{`` is a JSONL record (:data:`PROMPT_KEYS`; ``null`` = key left out); any other
    non-blank line is a prompt as written.
    """
    items: list[dict[str, Any]] = [{"prompt": p} for p in [*args.prompts, *args.prompt]]
    if args.prompts_file:
        from lumina_lightning.cli import check_input

        path = Path(args.prompts_file)
        check_input(path, "--prompts-file")
        try:
            # utf-8-sig: files saved "UTF-8 with BOM" (Windows editors, PowerShell 5) start with U+FEFF,
            # which made the first line neither JSON nor a clean prompt
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as err:
            from lumina_lightning.data.records import not_utf8

            raise ValueError(not_utf8(path, err)) from None
        n_per_prompt = max(int(getattr(args, "n_per_prompt", 1) or 1), 1)
        for n, line in enumerate(lines, 1):
            text = line.strip()
            if not text:
                continue
            if text.startswith("{"):
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    # refused rather than read as a prompt: a JSONL record with a typo must not turn into
                    # a literal prompt full of braces and quotes
                    raise ValueError(
                        f"{path}:{n}: a line starting with '{{' is read as a JSONL record, but this is not valid "
                        f"JSON ({err.msg} at column {err.colno}). To use a prompt that starts with '{{', write "
                        f"the line as JSONL: {json.dumps({'prompt': text}, ensure_ascii=False)}"
                    ) from None
                items.append(_prompt_record(record, f"{path}:{n}", n_per_prompt))
            else:
                items.append({"prompt": text})
    if not items:
        raise ValueError("no prompts: give them as arguments ('a red circle' or --prompt TEXT, repeatable) or "
                         "--prompts-file FILE")
    return items


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "image"


def save_png(image: Any, path: Path, record: dict[str, Any]) -> None:
    """Save with the prompt, seed and settings in PNG text chunks."""
    from PIL.PngImagePlugin import PngInfo

    from lumina_lightning.fileio import atomic_write

    info = PngInfo()
    info.add_text("prompt", record.get("prompt", ""))
    info.add_text("seed", str(record.get("seed")))
    if record.get("negative_prompt"):
        info.add_text("negative_prompt", str(record["negative_prompt"]))
    info.add_text(SETTINGS_KEY, json.dumps(record, sort_keys=True))
    # temp file + rename: an interrupted run or a reader never sees half a PNG
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def resolve_device(device: str | None) -> str:
    """The ``--device`` of ``lumina sample`` and ``lumina demo``: as given, else CUDA when there is one.

    A CUDA device without CUDA is refused here with a message (``ValueError``) instead of by torch
    with an assertion traceback at the first ``.to()``.
    """
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device} is not a device (cpu, cuda, cuda:N)") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but no CUDA GPU is visible; use --device cpu")
    return device


def _next_file_number(out: Path) -> int:
    """The first file number after every PNG in ``out`` and every file ``index.jsonl`` lists, so a
    second run into the same folder adds images instead of overwriting the first run's."""
    names = [p.name for p in out.glob("*.png")]
    index = out / "index.jsonl"
    if index.is_file():
        for line in index.read_text(encoding="utf-8").splitlines():
            try:
                names.append(str(json.loads(line).get("file", "")))
            except (json.JSONDecodeError, AttributeError):  # a line cut short by an interrupted run
                continue
    numbers = [int(m.group(1)) for name in names if (m := re.match(r"(\d+)_", name))]
    return max(numbers, default=-1) + 1


def _recorded_path(value: str | None) -> str | None:
    """An existing path made absolute, so a PNG's record reloads from any directory; the names the
    loaders know (``minilm``, ``pixel``) and anything else stay as given."""
    if value is None or value in ("minilm", "pixel") or not Path(value).exists():
        return value
    return str(Path(value).resolve())


def loaded_record(
    checkpoint: str | Path, model: Any, *, text_encoder: str | None = None, vae: str | None = None,
    ema: bool | str = "auto",
) -> dict[str, Any]:
    """Which weights and encoders were loaded, as ``load_pipeline`` arguments: with these,
    ``load_pipeline(**record)`` + :func:`~lumina_lightning.sampling.pipeline.kwargs_from_settings`
    reproduce an image from any directory. The checkpoint and existing encoder paths are made
    absolute; ``ema`` is what was loaded (``True`` / ``False``), not the ``"auto"`` that picked it.
    Written into every PNG by ``lumina sample`` and ``lumina demo``."""
    return dict(checkpoint=str(Path(checkpoint).resolve()),
                ema=bool(getattr(model, "weights_ema", ema is True)),
                text_encoder=_recorded_path(None if text_encoder is None else str(text_encoder)),
                vae=_recorded_path(None if vae is None else str(vae)))


def read_png_settings(path: str | Path) -> dict[str, Any]:
    """The ``lumina_settings`` record of a PNG written by ``lumina sample``."""
    from PIL import Image

    with Image.open(path) as im:
        text = im.text.get(SETTINGS_KEY)  # type: ignore[attr-defined]
    if text is None:
        raise ValueError(f"{path} has no {SETTINGS_KEY!r} metadata")
    return json.loads(text)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from lumina_lightning.sampling.pipeline_io import load_pipeline

    from lumina_lightning.cli import check_output

    items = read_prompts(args)
    check_output(args.out, "--out")  # before the weights load, not after
    if args.n_per_prompt < 1:
        raise ValueError("--n-per-prompt must be >= 1")
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    device = resolve_device(args.device)
    dtype = getattr(torch, _DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")])
    ema: bool | str = {"auto": "auto", "true": True, "false": False}[args.ema]
    pipe = load_pipeline(args.ckpt, text_encoder=args.text_encoder, vae=args.vae, device=device, dtype=dtype, ema=ema)
    # one side given: a square of it (as --height's help says), not a mix with the checkpoint's size
    args.width = args.width or args.height or pipe.resolution or 1024
    args.height = args.height or args.width
    pipe.check_size(args.width, args.height)
    system = pipe.default_system if args.system is None else (None if args.system == "none" else args.system)
    overrides = dict(
        preset=args.preset, solver=args.solver, steps=args.steps, shift=args.shift, cfg_scale=args.cfg,
        renorm=args.renorm, cfg_trunc=args.cfg_trunc, cfg_mode=args.cfg_mode, teacache=args.teacache,
        teacache_version=args.teacache_version,
    )
    settings = pipe.resolve(**overrides)  # validates before any work
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first_file = _next_file_number(out)
    # which weights and encoders were loaded: with these, load_pipeline(**those) + kwargs_from_settings
    # reproduce each image. `ema` is what was loaded (True / False), not the "auto" that picked it
    loaded = loaded_record(args.ckpt, pipe.model, text_encoder=args.text_encoder, vae=args.vae, ema=ema)
    total = len(items) * args.n_per_prompt
    print(f"lumina sample: {total} image(s) at {args.width}x{args.height} with {settings.solver} x{settings.steps}, "
          f"cfg {settings.cfg_scale} on {device} -> {out}", file=sys.stderr)
    if not settings.guidance.guided and (args.negative_prompt or any(i.get("negative_prompt") for i in items)):
        print(f"lumina sample: warning: guidance is off (cfg {settings.cfg_scale}), so the negative prompt has no "
              "effect; the images record none (give --cfg > 1 to use it)", file=sys.stderr)
    index = 0
    with open(out / "index.jsonl", "a", encoding="utf-8") as log, tqdm(total=total, desc="images", unit="img") as bar:
        for item in items:
            n = args.n_per_prompt
            seeds = [int(item["seed"]) + j for j in range(n)] if item.get("seed") is not None else \
                [args.seed + index + j for j in range(n)]
            negative = item.get("negative_prompt", args.negative_prompt)
            result = pipe(
                item["prompt"], negative_prompt=negative, system=system, width=args.width, height=args.height,
                num_images_per_prompt=n, seed=seeds, progress=True, **overrides,
            )
            for j, image in enumerate(result.images):
                record = {k: v for k, v in result.settings.items() if k not in ("prompts", "seeds")}
                # nfe counts the call's batched forwards (the same for every image of it); rows_per_image is
                # this image's share of the sample-rows (2 per guided call, 1 per unguided one)
                record.update(prompt=item["prompt"], seed=seeds[j], index=index, **loaded, nfe=result.nfe,
                              rows_per_image=result.rows // max(len(result.images), 1))
                path = out / f"{first_file + index:05d}_{_slug(item['prompt'])}_s{seeds[j]}.png"
                save_png(image, path, record)
                log.write(json.dumps({"file": path.name, **record}) + "\n")
                index += 1
                bar.update(1)
    print(f"lumina sample: wrote {index} image(s) to {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from lumina_lightning.models.io import CheckpointMismatchError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (OSError, ImportError, ValueError, KeyError, CheckpointMismatchError) as err:
        # OSError: what transformers / diffusers raise for a --text-encoder or --vae folder without
        # its config or weights (their message names the folder and the missing file)
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"lumina sample: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
