"""Load, compose, override and validate training recipes.

A recipe is a YAML file whose keys follow :class:`~lumina_lightning.training.config.RecipeConfig`.
Composition:

* ``defaults: [base/model_2b.yaml, ...]`` lists files (relative to the recipe's folder, ``.yaml``
  optional) merged in order *before* the file itself, recursively (the Hydra ``defaults`` idea,
  implemented here on plain omegaconf because Hydra is not a dependency);
* ``${...}`` interpolations are resolved by omegaconf on the merged result;
* dotted command-line overrides (``trainer.max_steps=100 data.batch_size=8``) come last.

Every file and every override is validated on its own before merging, so an error names the file
(or "command line"), the dotted key, and the closest valid key or the expected type — before any
model, encoder or data is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from omegaconf import OmegaConf

from lumina_lightning.data.records import DuplicateKeyError, UniqueKeyLoader
from lumina_lightning.flow.convention import PREDICTIONS
from lumina_lightning.training.config import RecipeConfig

COMMAND_LINE = "command line"
# task -> (module, schema class). A recipe names its task with `task:` (default: generation).
TASKS = {
    "generation": ("lumina_lightning.training.config", "RecipeConfig"),
    "unicap": ("lumina_lightning.training.unicap_config", "UniCapRecipe"),
}


def schema_for(task: str, where: str) -> type:
    """The dataclass a recipe of ``task`` is validated against."""
    import importlib

    if task not in TASKS:
        close = closest(str(task), TASKS)
        hint = f" (did you mean {close!r}?)" if close else ""
        raise RecipeError(f"{where}: unknown `task` {task!r}{hint}; known tasks: {sorted(TASKS)}")
    module, name = TASKS[task]
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError:
        raise RecipeError(f"{where}: the `{task}` task is not built yet in this version ({module} is missing)") from None


def packaged_recipes_dir() -> Path | None:
    """The recipes that came with this install: the copy a wheel ships as ``lumina_lightning/_recipes``
    (``setup.py`` puts it there) or, in a checkout and its editable install, the checkout's ``recipes/``."""
    package = Path(__file__).resolve().parents[1]
    if (package / "_recipes").is_dir():
        return package / "_recipes"
    checkout = package.parent
    # the checkout's own recipes, not some other `recipes/` folder beside an installed package
    if (checkout / "pyproject.toml").is_file() and (checkout / "recipes" / "tiny" / "pipeline.yaml").is_file():
        return checkout / "recipes"
    return None


def find_recipe(path: str) -> str:
    """``path`` where it exists; otherwise, for a relative path that starts with ``recipes/``, the recipe
    of that name that came with the install, so ``lumina train recipes/tiny/stage1_lowres.yaml`` and
    ``lumina pipeline recipes/tiny/pipeline.yaml`` work from any folder after ``pip install`` (outputs
    still go under the current folder). Anything else comes back unchanged, for the caller's
    does-not-exist message."""
    given = Path(path)
    if given.exists() or given.is_absolute() or not given.parts or given.parts[0] != "recipes":
        return path
    shipped = packaged_recipes_dir()
    if shipped is None:
        return path
    candidate = shipped.joinpath(*given.parts[1:])
    if not candidate.is_file():
        return path
    print(f"{path}: not in the current folder; using the recipe installed with lumina-lightning, {candidate}",
          file=sys.stderr)
    return str(candidate)


class RecipeError(ValueError):
    """A recipe that does not fit the schema; the message names the file and key."""


class _Loader(UniqueKeyLoader):
    """PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a *string*; YAML 1.2 and every user
    reads it as a number. This loader resolves such exponents as floats, and refuses a key given
    twice in one mapping (:class:`~lumina_lightning.data.records.DuplicateKeyError`) where PyYAML
    would keep the last silently."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse recipe YAML (safe; numbers like ``1e-3`` are floats; a duplicate key raises
    :class:`~lumina_lightning.data.records.DuplicateKeyError`, which callers prefix with the file)."""
    return yaml.load(text, Loader=_Loader)


# ------------------------------------------------------------------------------------------------
# schema checks
# ------------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if isinstance(value, str) and "${" in value:  # checked again after interpolation
        return True
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        _, item = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(isinstance(k, str) and _matches(v, item) for k, v in value.items())
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    return isinstance(value, tp)


def _find_dataclass(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        for a in typing.get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


def closest(key: str, options: typing.Iterable[str]) -> str | None:
    """The valid name a misspelled ``key`` most likely meant (similar spelling, or a shared stem)."""
    options = list(options)
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    if close:
        return close[0]
    stems = [o for o in options if key.startswith(o) or o.startswith(key) or o in key]
    return max(stems, key=len) if stems else None


def check_section(data: Any, cls: type, where: str, prefix: str = "") -> None:
    """Raise :class:`RecipeError` for unknown keys or wrongly typed values of ``data`` against ``cls``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: `{prefix.rstrip('.') or '<root>'}` must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            close = closest(str(key), hints)
            hint = f"; did you mean `{prefix}{close}`?" if close else f"; valid keys here: {', '.join(sorted(hints))}"
            raise RecipeError(f"{where}: unknown key `{dotted}`{hint}")
        tp = hints[key]
        sub = _find_dataclass(tp)
        if sub is not None and isinstance(value, dict):
            check_section(value, sub, where, dotted + ".")
            continue
        if not _matches(value, tp):
            raise RecipeError(
                f"{where}: `{dotted}` must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
            )


# ------------------------------------------------------------------------------------------------
# loading and composition
# ------------------------------------------------------------------------------------------------


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_default(entry: str, folder: Path, where: str, announce: bool = True) -> Path:
    """A ``defaults`` entry, relative to the folder of the file that names it; else, for a file inside a
    ``recipes/`` folder, the entry at the same place in the installed recipes (``announce``: say so)."""
    candidates = [folder / entry, folder / f"{entry}.yaml"]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    installed = _installed_default(entry, folder)
    if installed is not None:
        if announce:
            print(f"{where}: `defaults` entry {entry!r} is not beside it ({candidates[-1]}); using the copy "
                  f"installed with lumina-lightning, {installed}", file=sys.stderr)
        return installed
    shipped = packaged_recipes_dir()
    hint = f"; the recipes installed with lumina-lightning are in {shipped}" if shipped is not None else ""
    raise RecipeError(f"{where}: `defaults` entry {entry!r} not found (looked for {', '.join(map(str, candidates))})"
                      f"{hint}")


def _installed_default(entry: str, folder: Path) -> Path | None:
    """Where ``entry`` is in the installed recipes, for a file in ``.../recipes/<sub>/``: a recipe
    copied on its own into ``./recipes/tiny/`` (the README's ``lumina train recipes/tiny/...``) names
    ``../base/common`` and has no ``./recipes/base/``. ``None`` outside a ``recipes/`` folder, where
    the entry is not installed, or where it would lead out of the installed recipes."""
    shipped = packaged_recipes_dir()
    parts = folder.resolve().parts
    if shipped is None or "recipes" not in parts:
        return None
    inside = parts[len(parts) - parts[::-1].index("recipes"):]  # the folders below the last `recipes`
    root = shipped.resolve()
    for name in (entry, f"{entry}.yaml"):
        candidate = root.joinpath(*inside, name).resolve()
        if candidate.is_file() and candidate.is_relative_to(root):
            return candidate
    return None


def _load_file(path: Path, stack: tuple[Path, ...], files: list[Path], schema: type = RecipeConfig,
               per_file: typing.Callable[[dict, Path], None] | None = None) -> dict:
    """One file merged over its ``defaults``; ``per_file(data, path)`` runs on each file's own keys
    before merging (pipelines resolve the recipe paths a file names against that file's folder)."""
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise RecipeError(f"recipe defaults form a cycle: {chain}")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except DuplicateKeyError as err:
        raise RecipeError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        from lumina_lightning.data.records import not_utf8

        raise RecipeError(not_utf8(path, err)) from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    defaults = data.pop("defaults", []) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    merged: dict = {}
    for entry in defaults:
        merged = _deep_merge(merged, _load_file(_resolve_default(str(entry), path.parent, str(path)),
                                                (*stack, path), files, schema, per_file))
    check_section(data, schema, str(path))
    if per_file is not None:
        per_file(data, path)
    files.append(path)
    return _deep_merge(merged, data)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in item:
        raise RecipeError(f"{COMMAND_LINE}: override {item!r} must look like key.subkey=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("+")
    if not key:
        raise RecipeError(f"{COMMAND_LINE}: override {item!r} has an empty key")
    stripped = raw.strip()
    if (" #" in raw or stripped.startswith("#")) and stripped[:1] not in ("'", '"'):
        # YAML reads " #" as the start of a comment: `output_dir=/runs/my run #2` would silently
        # become "/runs/my run"
        raise RecipeError(f"{COMMAND_LINE}: in override {item!r}, YAML would read ' #' as the start of a comment "
                          f"and cut the value; quote it: {key}='\"{raw}\"'")
    try:
        value = load_yaml(raw) if stripped else None
    except DuplicateKeyError as err:
        raise RecipeError(f"{COMMAND_LINE}: override {item!r} gives `{key}.{err.key}` twice; give it once") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _nest(keys: list[str], value: Any) -> dict:
    out: Any = value
    for k in reversed(keys):
        out = {k: out}
    return out


@dataclasses.dataclass
class LoadedRecipe:
    """A validated recipe: the typed config, its resolved plain-dict form and the files it came from."""

    config: Any  # RecipeConfig for generation, the task's schema otherwise
    resolved: dict[str, Any]
    files: list[Path]
    overrides: list[str]
    path: Path
    task: str = "generation"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved, sort_keys=False)


def build_dataclass(cls: type, data: dict, where: str, prefix: str = "") -> Any:
    """Instantiate nested dataclasses from a validated dict (values already type-checked)."""
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        sub = _find_dataclass(hints[key])
        if sub is not None and isinstance(value, dict):
            value = build_dataclass(sub, value, where, f"{prefix}{key}.")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: invalid `{prefix.rstrip('.') or '<root>'}` section: {err}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRecipe:
    """Load a recipe with its defaults, apply overrides, resolve interpolations, validate, build.

    Raises:
        RecipeError: naming the file (or "command line"), the dotted key and what was expected.
    """
    path = Path(path)
    _refuse_pipeline_file(path)
    files: list[Path] = []
    task = _peek_task(path)
    schema = schema_for(task, str(path))
    merged = _load_file(path, (), files, schema)
    for item in overrides:
        keys, value = parse_override(item)
        patch = _nest(keys, value)
        check_section(patch, schema, f"{COMMAND_LINE} ({item})")
        merged = _deep_merge(merged, patch)
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(merged), resolve=True)
    except Exception as err:  # omegaconf's InterpolationKeyError etc.
        raise RecipeError(f"{path}: cannot resolve interpolation: {err}") from None
    where = f"{path} (after merging defaults and overrides)"
    check_section(resolved, schema, where)
    config = build_dataclass(schema, resolved, where)
    # the full resolved config, defaults included: what the run actually used
    full = dataclasses.asdict(config)
    if schema is RecipeConfig:
        check_semantics(config, where)
    elif hasattr(config, "check"):
        try:
            config.check()
        except ValueError as err:
            raise RecipeError(f"{where}: {err}") from None
    return LoadedRecipe(config=config, resolved=full, files=files, overrides=list(overrides), path=path, task=task)


def _refuse_pipeline_file(path: Path) -> None:
    """A pipeline file (its ``stages:`` list, own or through ``defaults``) given where a stage recipe
    belongs: say which command runs it, not that its keys are unknown to a recipe."""
    if peek_key(path, "stages") is not None:
        raise RecipeError(f"{path} is a pipeline file (it lists `stages`), not a training recipe: run it with "
                          f"`lumina pipeline {path}`, or train one of its stage recipes with `lumina train`")


def _peek_task(path: Path) -> str:
    """The ``task`` a recipe names, in its own file or its ``defaults`` (default ``generation``)."""
    return str(peek_key(path, "task", "generation"))


def peek_key(path: Path, key: str, default: Any = None, _stack: tuple[Path, ...] = ()) -> Any:
    """A top-level ``key`` as composition would set it, read before the full load picks a schema: the
    file's own value, else the last of its ``defaults`` that sets it (recursively). Unreadable files,
    missing defaults and cycles give ``default`` here; the full load reports them with their position."""
    path = Path(path).resolve()
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) if path.is_file() and path not in _stack else None
    except (yaml.YAMLError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        return default
    if key in data:
        return data[key]
    defaults = data.get("defaults") or []
    for entry in reversed([defaults] if isinstance(defaults, str) else defaults):
        try:
            parent = _resolve_default(str(entry), path.parent, str(path), announce=False)
        except RecipeError:
            continue
        value = peek_key(parent, key, None, (*_stack, path))
        if value is not None:
            return value
    return default


# ------------------------------------------------------------------------------------------------
# semantic checks that need the code (sizes, strategies, templates) but no files
# ------------------------------------------------------------------------------------------------

STRATEGIES = ("auto", "ddp", "fsdp", "fsdp1", "deepspeed_stage_2", "deepspeed_stage_3")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true")


def _choice(where: str, key: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{where}: `{key}` = {value!r} is not one of {choices}{hint}")


def check_semantics(cfg: RecipeConfig, where: str) -> None:
    from lumina_lightning.encoders.text import SYSTEM_PROMPTS
    from lumina_lightning.models.config import SIZES, config_for

    _choice(where, "model.size", cfg.model.size, SIZES)
    try:
        model_cfg = config_for(cfg.model.size, **cfg.model.overrides)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{where}: `model.overrides`: {err}") from None
    _check_caption_length(cfg, model_cfg, where)
    _choice(where, "model.init_ema", cfg.model.init_ema, ("raw", "ema", "auto"))
    _choice(where, "model.attention_backend", cfg.model.attention_backend, ("auto", "sdpa", "flash"))
    _choice(where, "autoencoder.kind", cfg.autoencoder.kind, ("vae", "pixel", "conv"))
    if cfg.autoencoder.kind == "vae" and not cfg.autoencoder.path:
        # also with data.cache_dir: validation samples, the validation loss and the export decode with it
        raise RecipeError(f"{where}: `autoencoder.path` is required for autoencoder.kind=vae (a local VAE folder)")
    if cfg.autoencoder.kind == "conv" and not cfg.autoencoder.path:
        raise RecipeError(f"{where}: `autoencoder.path` is required for autoencoder.kind=conv (a trained conv autoencoder folder)")
    if cfg.autoencoder.kind in ("vae", "conv") and cfg.autoencoder.path:
        from lumina_lightning.encoders.autoencoder import check_autoencoder_kind

        try:
            check_autoencoder_kind(cfg.autoencoder.kind, cfg.autoencoder.path)
        except ValueError as err:
            raise RecipeError(f"{where}: {err}") from None
    if cfg.autoencoder.train is not None:
        from lumina_lightning.encoders.conv_autoencoder import TRAIN_KEYS

        if cfg.autoencoder.kind != "conv":
            raise RecipeError(f"{where}: `autoencoder.train` is only for autoencoder.kind=conv, not {cfg.autoencoder.kind!r}")
        for key in cfg.autoencoder.train:
            if key not in TRAIN_KEYS:
                hint = difflib.get_close_matches(str(key), TRAIN_KEYS, n=1)
                raise RecipeError(f"{where}: unknown key `autoencoder.train.{key}`"
                                  + (f" (did you mean `{hint[0]}`?)" if hint else f"; known: {', '.join(TRAIN_KEYS)}"))
        from lumina_lightning.encoders.conv_autoencoder import check_train_settings, is_conv_autoencoder

        if cfg.autoencoder.path and is_conv_autoencoder(cfg.autoencoder.path):
            try:  # an existing folder is not retrained: changed settings would be ignored
                check_train_settings(cfg.autoencoder.path, dict(cfg.autoencoder.train))
            except ValueError as err:
                raise RecipeError(f"{where}: {err}") from None
    _check_data_patch(cfg, model_cfg, where)
    for key, value in (("text_encoder.dtype", cfg.text_encoder.dtype), ("autoencoder.dtype", cfg.autoencoder.dtype)):
        _choice(where, key, value, ("fp32", "bf16", "fp16"))
    _choice(where, "objective.timestep_sampler", cfg.objective.timestep_sampler, ("lognorm", "uniform"))
    _choice(where, "objective.prediction", cfg.objective.prediction, PREDICTIONS)
    shift = cfg.objective.shift
    if not (shift == "auto" or (isinstance(shift, (int, float)) and not isinstance(shift, bool) and shift > 0)):
        raise RecipeError(f"{where}: `objective.shift` must be 'auto' or a number > 0, got {shift!r}")
    if not 0.0 <= cfg.objective.caption_dropout < 1.0:
        raise RecipeError(f"{where}: `objective.caption_dropout` must be in [0, 1), got {cfg.objective.caption_dropout}")
    _choice(where, "objective.system", cfg.objective.system, SYSTEM_PROMPTS)
    _choice(where, "trainer.strategy", cfg.trainer.strategy, STRATEGIES)
    _choice(where, "trainer.precision", cfg.trainer.precision, PRECISIONS)
    _check_flash_settings(cfg, where)
    from lumina_lightning.training.optim import MUON_STRATEGIES, OPTIMIZERS
    from lumina_lightning.training.schedules import SCHEDULES

    _choice(where, "optim.schedule", cfg.optim.schedule, SCHEDULES)
    _choice(where, "optim.name", cfg.optim.name, OPTIMIZERS)
    if cfg.optim.name == "muon" and cfg.trainer.strategy not in MUON_STRATEGIES:
        raise RecipeError(f"{where}: `optim.name` = 'muon' is not supported with trainer.strategy="
                          f"{cfg.trainer.strategy!r} yet: Muon orthogonalises whole weight matrices, which FSDP and "
                          f"DeepSpeed shard across ranks. Use one of {MUON_STRATEGIES}, or optim.name=adamw")
    if not cfg.optim.muon_lr_scale > 0:
        raise RecipeError(f"{where}: `optim.muon_lr_scale` must be > 0, got {cfg.optim.muon_lr_scale}")
    if not 0.0 <= cfg.optim.muon_momentum < 1.0:
        raise RecipeError(f"{where}: `optim.muon_momentum` must be in [0, 1), got {cfg.optim.muon_momentum}")
    if cfg.optim.muon_ns_steps < 1:
        raise RecipeError(f"{where}: `optim.muon_ns_steps` must be >= 1, got {cfg.optim.muon_ns_steps}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise RecipeError(f"{where}: `optim.min_lr_ratio` must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if len(cfg.optim.betas) != 2:
        raise RecipeError(f"{where}: `optim.betas` needs two numbers, got {cfg.optim.betas}")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise RecipeError(f"{where}: `ema.decay` must be in [0, 1), got {cfg.ema.decay}")
    if cfg.data.batch_size < 1 or cfg.trainer.max_steps < 1:
        raise RecipeError(f"{where}: `data.batch_size` and `trainer.max_steps` must be >= 1")
    if not cfg.optim.lr > 0:
        raise RecipeError(f"{where}: `optim.lr` must be > 0, got {cfg.optim.lr}")
    for key, value, least in (("trainer.checkpoint_every_n_steps", cfg.trainer.checkpoint_every_n_steps, 1),
                              ("trainer.log_every_n_steps", cfg.trainer.log_every_n_steps, 1),
                              ("validation.every_n_steps", cfg.validation.every_n_steps, 0),
                              ("validation.sample_every_n_steps", cfg.validation.sample_every_n_steps, 0)):
        if value < least:
            raise RecipeError(f"{where}: `{key}` must be >= {least}{' (0 = never)' if least == 0 else ''}, got {value}")
    if cfg.resume not in (None, "auto") and not str(cfg.resume):
        raise RecipeError(f"{where}: `resume` must be null, 'auto' or a checkpoint path")
    _check_sample_grid(cfg, model_cfg, where)


def _check_caption_length(cfg: RecipeConfig, model_cfg: Any, where: str) -> None:
    """``text_encoder.max_length`` within what the model's RoPE caption axis can place: image tokens sit
    at axis-0 position ``cap_len``, so a caption may have at most ``axes_lens[0] - 1`` tokens (spec §1.4).
    A longer cap validated and then failed at the first long caption, hours into a run."""
    max_length, limit = cfg.text_encoder.max_length, model_cfg.max_caption_len
    if max_length < 1:
        raise RecipeError(f"{where}: `text_encoder.max_length` must be >= 1, got {max_length}")
    if max_length > limit:
        raise RecipeError(
            f"{where}: `text_encoder.max_length` = {max_length} is more than the {limit} caption tokens model "
            f"{cfg.model.size} can place (its RoPE caption axis: axes_lens[0] = {model_cfg.axes_lens[0]}, and the "
            f"image tokens sit at position cap_len); set text_encoder.max_length <= {limit} (official: 256)"
        )


def _autoencoder_downsample(cfg: RecipeConfig) -> tuple[int | None, str]:
    """The recipe's autoencoder downsampling and where it comes from (``None``: not known before loading,
    e.g. a VAE folder that is not on this machine)."""
    ae = cfg.autoencoder
    if ae.kind == "pixel":
        return 1, "the pixel autoencoder"
    from lumina_lightning.encoders.autoencoder import autoencoder_folder_info

    info = autoencoder_folder_info(ae.path)
    if info is not None and info.get("downsample"):
        return int(info["downsample"]), f"the autoencoder in {ae.path}"
    if ae.kind == "conv" and info is None and ae.train is not None:
        from lumina_lightning.encoders.conv_autoencoder import ConvAutoencoderConfig

        down = ae.train.get("downsample", ConvAutoencoderConfig.downsample)
        if isinstance(down, int) and not isinstance(down, bool):
            return down, "autoencoder.train.downsample"
    return None, ""


def _check_data_patch(cfg: RecipeConfig, model_cfg: Any, where: str) -> None:
    """``data.patch`` (the bucket grid: every bucket side is a multiple of it) a multiple of one token's
    pixels, autoencoder downsampling x ``model.patch_size``: otherwise some buckets give latents that do
    not divide into patches, found only when such a batch comes up."""
    down, source = _autoencoder_downsample(cfg)
    if down is None:
        return
    token = down * int(model_cfg.patch_size)
    if cfg.data.patch % token:
        raise RecipeError(
            f"{where}: `data.patch` = {cfg.data.patch} is not a multiple of {token} pixels, the image side of one "
            f"token ({source} downsamples {down}x, model.patch_size is {model_cfg.patch_size}): bucket sides are "
            f"multiples of data.patch and must divide into tokens; set data.patch to {token} (or a multiple of it)"
        )


def _check_sample_grid(cfg: RecipeConfig, model_cfg: Any, where: str) -> None:
    """The sample grid's settings (``validation.*``) as ``NextDiTModule.render_samples`` uses them: it
    draws the first grid at step ``validation.sample_every_n_steps`` (or the last step), so a value it
    cannot use passed ``--validate-only`` and stopped the run there, hours in."""
    from lumina_lightning.sampling.presets import PRESETS, resolve_settings

    v = cfg.validation
    if not (v.sample_every_n_steps and v.prompts):
        return  # no grid is drawn: these settings are not used (a run that turns the grid on checks them)
    _choice(where, "validation.preset", v.preset, PRESETS)
    if v.steps is not None and v.steps < 1:
        raise RecipeError(f"{where}: `validation.steps` must be >= 1 or null (the preset's own: "
                          f"{PRESETS[v.preset].steps} for {v.preset!r}), got {v.steps}")
    try:  # whatever else the sampler refuses, as the grid's pipeline (no pipeline defaults) resolves it
        resolve_settings(v.preset, steps=v.steps, cfg_scale=v.cfg_scale)
    except ValueError as err:
        raise RecipeError(f"{where}: `validation.preset` / `steps` / `cfg_scale`: {err}") from None
    if not v.seeds:
        # render_samples repeats the seeds over the prompts: none is a ZeroDivisionError
        raise RecipeError(f"{where}: `validation.seeds` is empty but the sample grid draws {len(v.prompts)} "
                          f"validation.prompts; give at least one seed (repeated over the prompts), or set "
                          f"validation.sample_every_n_steps=0 for no grid")
    _check_grid_size(cfg, model_cfg, where)


def _check_grid_size(cfg: RecipeConfig, model_cfg: Any, where: str) -> None:
    """``validation.width`` / ``height`` (``null`` or 0: ``data.resolution``, as render_samples reads them)
    positive multiples of one token's pixels and within the model's RoPE tables: the sampler's
    ``check_size`` refuses anything else when the grid is drawn."""
    v = cfg.validation
    given = [(key, value, axis) for key, value, axis in (("validation.width", v.width, 2),
                                                         ("validation.height", v.height, 1)) if value]
    down, source = _autoencoder_downsample(cfg)
    if not given or down is None:
        return
    from lumina_lightning.sampling.pipeline import snap_size

    token = down * int(model_cfg.patch_size)
    limits = model_cfg.axes_lens[2] * token, model_cfg.axes_lens[1] * token  # (width, height), spec §1.4
    for key, value, axis in given:
        if value < 0 or value % token:
            w, h, _ = snap_size(v.width or cfg.data.resolution, v.height or cfg.data.resolution, token, limits)
            raise RecipeError(
                f"{where}: `{key}` = {value} is not a positive multiple of {token} pixels, the image side of one "
                f"token ({source} downsamples {down}x, model.patch_size is {model_cfg.patch_size}): the sample "
                f"grid could not be drawn; nearest valid grid size: {w}x{h} (validation.width x validation.height; "
                f"null = data.resolution)"
            )
        limit = limits[0] if axis == 2 else limits[1]
        if value > limit:
            raise RecipeError(
                f"{where}: `{key}` = {value} is more than the {limit} pixels model {cfg.model.size} can place "
                f"(its RoPE tables: axes_lens[{axis}] = {model_cfg.axes_lens[axis]} tokens of {token} px); "
                f"set {key} <= {limit}"
            )


def _check_flash_settings(cfg: RecipeConfig, where: str) -> None:
    """``model.attention_backend: flash`` runs flash-attn's kernels, which take CUDA tensors in fp16/bf16
    only (``models.attention``): a 32-bit or CPU recipe would pass validation and stop at the first step."""
    if cfg.model.attention_backend != "flash":
        return
    if "16" not in str(cfg.trainer.precision):
        raise RecipeError(f"{where}: `model.attention_backend` = 'flash' needs a 16-bit `trainer.precision` "
                          f"(bf16-mixed, 16-mixed or bf16-true; flash-attn has no fp32 kernels), got "
                          f"{cfg.trainer.precision!r}; or set model.attention_backend=auto (flash-attn where it can run)")
    if str(cfg.trainer.accelerator) == "cpu":
        raise RecipeError(f"{where}: `model.attention_backend` = 'flash' needs CUDA, but trainer.accelerator is 'cpu'; "
                          "set model.attention_backend=auto or sdpa")


def check_flash_host(cfg: RecipeConfig, where: str) -> None:
    """Before a run starts (data, encoders, an MLflow run): ``flash`` on a host without flash-attn or
    CUDA. Not part of :func:`check_semantics`, which must pass on a login node without a GPU."""
    if cfg.model.attention_backend != "flash":
        return
    import torch

    from lumina_lightning.models.attention import HAS_FLASH_ATTN

    if not HAS_FLASH_ATTN or not torch.cuda.is_available():
        missing = "flash-attn is not installed (README: GPU install, the gpu extra)" if not HAS_FLASH_ATTN \
            else "this host has no CUDA device"
        raise RecipeError(f"{where}: `model.attention_backend` = 'flash', but {missing}; set "
                          "model.attention_backend=auto (flash-attn where it can run, else SDPA) or sdpa")
