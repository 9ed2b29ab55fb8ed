"""Load and save Next-DiT checkpoints in every supported layout, detected from the path.

Layouts (spec §2):

* ``lumina``    ours: one ``.safetensors`` file whose metadata holds the JSON config (a directory
  with ``model.safetensors`` + a human-readable ``config.json`` is accepted too).
* ``official``  ``consolidated[_ema].00-of-01.pth`` (+ ``model_args.pth``), keys as in the official
  ``NextDiT``; a single ``.pth``/``.safetensors`` with official keys (ComfyUI prefix allowed) as well.
* ``diffusers`` a ``Lumina2Transformer2DModel`` folder (``config.json`` + safetensors, sharded or not),
  a pipeline folder with ``transformer/``, or a single ``.safetensors`` with diffusers keys.
* ``lightning`` a ``.ckpt`` written by our training module (raw and EMA weights + the config): a file
  (single device, DDP), the distributed ``*.ckpt/`` folder that FSDP2 (``fsdp``) and FSDP1 with
  sharded state dicts (``fsdp1``) runs write (torch DCP), or the ``*.ckpt/`` folder of DeepSpeed
  ZeRO-1/2/3 runs (read with DeepSpeed's own ``zero_to_fp32``). All are read whole in one process,
  no process group needed.

A checkpoint that does not fit the config fails with :class:`CheckpointMismatchError`, which lists
missing, unexpected and shape-mismatched keys; nothing is ever half-loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lumina_lightning.fileio import atomic_write
from lumina_lightning.models.config import SIZES, NextDiTConfig, config_for
from lumina_lightning.models.convert import (
    COMFY_PREFIX,
    DIFFUSERS_CLASS,
    config_from_diffusers,
    config_to_diffusers,
    diffusers_to_official,
    infer_config_from_official,
    official_to_diffusers,
    strip_prefix,
)
from lumina_lightning.models.nextdit import NextDiT

log = logging.getLogger(__name__)

FORMATS = ("lumina", "official", "diffusers", "lightning")
LUMINA_FORMAT_TAG = "lumina-lightning/nextdit"
OFFICIAL_WEIGHTS = "consolidated.00-of-01.pth"
OFFICIAL_EMA_WEIGHTS = "consolidated_ema.00-of-01.pth"
OFFICIAL_ARGS = "model_args.pth"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# keys a checkpoint may omit: the unused norm_final (diffusers drops it) is filled with ones
_OPTIONAL_KEYS = {"norm_final.weight"}


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's tensors do not match the model built from its config."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched

        def block(title: str, keys: list[str]) -> str:
            if not keys:
                return ""
            shown = "\n    ".join(keys[:25])
            more = f"\n    ... and {len(keys) - 25} more" if len(keys) > 25 else ""
            return f"\n  {title} ({len(keys)}):\n    {shown}{more}"

        super().__init__(
            f"checkpoint {source} does not match the Next-DiT config it was loaded with:"
            + block("missing keys", missing)
            + block("unexpected keys", unexpected)
            + block("shape mismatches (checkpoint vs model)", mismatched)
        )


# ------------------------------------------------------------------------------------------------
# detection
# ------------------------------------------------------------------------------------------------


def transformer_folder(path: Path) -> Path:
    """A pipeline folder (ours with ``pipeline.json``, or diffusers') holds the model in ``transformer/``."""
    return path / "transformer" if path.is_dir() and (path / "transformer").is_dir() else path


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a distributed (sharded) training checkpoint: the ``*.ckpt/`` folder with
    torch DCP's ``.metadata`` that FSDP2 runs (Lightning's ``ModelParallelStrategy``) and FSDP1 runs
    (``FSDPStrategy(state_dict_type="sharded")``) write."""
    path = Path(path)
    return path.suffix.lower() == ".ckpt" and path.is_dir() and (path / ".metadata").is_file()


# What Lightning's DeepSpeedStrategy.save_checkpoint writes: the engine's save_checkpoint(tag="checkpoint"),
# i.e. a folder with DeepSpeed's `latest` (the tag's name) and the tag folder holding the model states
# (plus our client state: nextdit_config, lumina_pipeline, ...) and the ZeRO optimizer shards.
DEEPSPEED_LATEST = "latest"
DEEPSPEED_TAG = "checkpoint"


def is_deepspeed_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the checkpoint folder a DeepSpeed run (ZeRO-1/2/3) writes: DeepSpeed's
    ``latest`` file, or a ``checkpoint/`` tag folder with model states (not any folder of that name)."""
    path = Path(path)
    return path.is_dir() and ((path / DEEPSPEED_LATEST).is_file()
                              or any((path / DEEPSPEED_TAG).glob("*_model_states.pt")))


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training checkpoint of any strategy: a ``.ckpt`` file (single device,
    DDP), a distributed folder (FSDP2, FSDP1) or a DeepSpeed folder."""
    path = Path(path)
    return (path.suffix.lower() == ".ckpt" and path.is_file()) or is_distributed_checkpoint(path) \
        or is_deepspeed_checkpoint(path)


def detect_format(path: str | os.PathLike) -> str:
    """Which layout ``path`` holds: one of :data:`FORMATS`. Raises ``FileNotFoundError``/``ValueError``."""
    path = transformer_folder(Path(path))
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        if is_distributed_checkpoint(path) or is_deepspeed_checkpoint(path):
            return "lightning"
        cfg = path / "config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            if data.get("_class_name") == DIFFUSERS_CLASS:
                return "diffusers"
            if data.get("format") == LUMINA_FORMAT_TAG:
                return "lumina"
        if (path / OFFICIAL_WEIGHTS).is_file() or (path / OFFICIAL_EMA_WEIGHTS).is_file():
            return "official"
        raise ValueError(
            f"{path} is a directory but holds no known Next-DiT checkpoint "
            f"(expected {OFFICIAL_WEIGHTS}, a diffusers config.json for {DIFFUSERS_CLASS}, our config.json, "
            "a distributed training checkpoint's .metadata, or a DeepSpeed checkpoint's 'latest')"
        )
    suffix = path.suffix.lower()
    if suffix == ".ckpt":
        return "lightning"
    if suffix in (".pth", ".pt", ".bin"):
        return "official"
    if suffix == ".safetensors":
        with _safetensors_errors(path), safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") == LUMINA_FORMAT_TAG:
                return "lumina"
            keys = [k[len(COMFY_PREFIX):] if k.startswith(COMFY_PREFIX) else k for k in f.keys()]
        if any(k.startswith("time_caption_embed.") for k in keys):
            return "diffusers"
        if any(k.startswith("t_embedder.") for k in keys):
            return "official"
        raise ValueError(f"{path}: safetensors file with neither official nor diffusers Next-DiT keys")
    raise ValueError(f"{path}: unknown checkpoint file type {suffix!r} (.safetensors, .pth, .pt or .ckpt expected)")


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _safetensors_errors(file: Path) -> Iterator[None]:
    """safetensors names neither the file nor what is wrong with it ("header too large", "incomplete
    metadata"): every read of one goes through here, so a truncated or corrupt file is named."""
    try:
        yield
    except SafetensorError as err:
        raise ValueError(f"{file} is not a readable .safetensors file ({err})") from None


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    with _safetensors_errors(file):
        return load_file(str(file))


def _safetensors_metadata(file: Path) -> dict[str, str]:
    with _safetensors_errors(file), safe_open(str(file), framework="pt") as f:
        return f.metadata() or {}


def _torch_load(path: Path, allowed: Iterable[Any] = ()) -> Any:
    # weights_only=True: official .pth files are pickles; never run arbitrary code from a download.
    # ``allowed``: further plain-data classes the file may hold (DeepSpeed's, see _deepspeed_safe_globals).
    import pickle

    with torch.serialization.safe_globals([argparse.Namespace, *allowed]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"{path}: not a weights-only checkpoint, so it is not loaded (unpickling it could run "
                f"arbitrary code): {first}"
            ) from None


def _unwrap(state: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: does not contain a state dict of tensors")
    return state


def read_state(
    path: str | os.PathLike, ema: bool | str = False, overrides: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], NextDiTConfig, str]:
    """Read weights (official key layout) and the config from any supported checkpoint.

    Args:
        path: file or directory (see module docstring).
        ema: ``True`` for EMA weights (error if absent), ``False`` for raw weights (EMA only if the
            checkpoint has nothing else), ``"auto"`` for EMA where present.
        overrides: config fields that the checkpoint cannot tell (e.g. ``axes_dims``) or that the
            caller wants changed; applied before shapes are read and to the final config.

    Returns:
        (state dict in official/our key layout, config, detected format).
    """
    state, config, fmt, _ = _read_state(path, ema, overrides)
    return state, config, fmt


def _read_state(
    path: str | os.PathLike, ema: bool | str, overrides: dict[str, Any] | None
) -> tuple[dict[str, torch.Tensor], NextDiTConfig, str, bool]:
    """:func:`read_state`, plus whether the weights read are the EMA ones (what ``ema="auto"`` picked)."""
    path = transformer_folder(Path(path))
    fmt = detect_format(path)
    reader = {"lumina": _read_lumina, "official": _read_official, "diffusers": _read_diffusers, "lightning": _read_lightning}[fmt]
    overrides = dict(overrides or {})
    state, config, used_ema = reader(path, ema, overrides)
    if overrides:
        config = config.replace(**overrides)
    return state, config, fmt, used_ema


def _read_lumina(path: Path, ema: bool | str, overrides: dict[str, Any]) -> tuple[dict[str, torch.Tensor], NextDiTConfig, bool]:
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: our config.json but no {file.name} beside it")
    meta = _safetensors_metadata(file)
    if "config" not in meta:
        raise ValueError(f"{file}: no Next-DiT config in its metadata (not written by lumina-lightning)")
    config = NextDiTConfig.from_dict(json.loads(meta["config"]))
    ema_file = file.with_name(file.stem + "_ema.safetensors")
    if ema is True and not ema_file.is_file():
        raise FileNotFoundError(f"EMA weights requested but {ema_file} does not exist")
    chosen = ema_file if (ema is True or (ema == "auto" and ema_file.is_file())) else file
    return _load_safetensors(chosen), config, chosen == ema_file


def _read_official(path: Path, ema: bool | str, overrides: dict[str, Any]) -> tuple[dict[str, torch.Tensor], NextDiTConfig, bool]:
    if path.is_dir():
        raw, averaged = path / OFFICIAL_WEIGHTS, path / OFFICIAL_EMA_WEIGHTS
        if ema is True and not averaged.is_file():
            raise FileNotFoundError(f"EMA weights requested but {averaged} does not exist")
        use_ema = ema is True or (ema == "auto" and averaged.is_file()) or not raw.is_file()
        weights = averaged if use_ema else raw
        log.info("loading official weights from %s", weights)
    elif ema is True and path.name != OFFICIAL_EMA_WEIGHTS:
        # a single file named by the caller: EMA only if it is the EMA file, or its EMA sibling exists
        sibling = path.with_name(OFFICIAL_EMA_WEIGHTS)
        if path.name != OFFICIAL_WEIGHTS or not sibling.is_file():
            raise FileNotFoundError(f"EMA weights requested but {path} is not {OFFICIAL_EMA_WEIGHTS} and has no "
                                    "such file beside it; pass the EMA file or its folder")
        weights = sibling
    else:
        weights = path
    base, exact, named = _read_model_args(weights.with_name(OFFICIAL_ARGS))
    if weights.suffix == ".safetensors":
        state = _load_safetensors(weights)
    else:
        state = _unwrap(_torch_load(weights), weights)
    state = strip_prefix(state)
    used_ema = weights.name == OFFICIAL_EMA_WEIGHTS
    if exact:
        return state, base, used_ema
    config = infer_config_from_official(state, base, overrides)
    if named and config.dim == base.dim and (config.n_layers, config.n_refiner_layers) != (base.n_layers,
                                                                                          base.n_refiner_layers):
        # model_args.pth names the size and the widths agree: a file with fewer blocks is truncated, never
        # a shallower model to load (where the widths differ too, the name was only a loose hint)
        raise ValueError(
            f"{weights}: holds {config.n_layers} main and {config.n_refiner_layers} refiner blocks, but "
            f"{OFFICIAL_ARGS} names a model with {base.n_layers} and {base.n_refiner_layers}: truncated or "
            "mismatched checkpoint"
        )
    return state, config, used_ema


def _read_model_args(path: Path) -> tuple[NextDiTConfig, bool, bool]:
    """Config hints from the official ``model_args.pth`` (a pickled argparse Namespace), if present.

    Returns (config, exact, named): ``exact`` when the file was written by us and holds the whole
    config; otherwise the config is a base refined by reading tensor shapes, and ``named`` says that
    the base is a size the file names (so its depth is known).
    """
    if not path.is_file():
        return NextDiTConfig(), False, False
    try:
        args = _torch_load(path)
    except Exception as err:  # an unusual pickle: fall back to reading the config off the tensors
        log.warning("could not read %s safely (%s); inferring the config from tensor shapes", path, err)
        return NextDiTConfig(), False, False
    if isinstance(getattr(args, "lumina_config", None), dict):
        return NextDiTConfig.from_dict(args.lumina_config), True, True
    name = getattr(args, "model", None)
    base = config_for(name) if name in SIZES else NextDiTConfig()
    if hasattr(args, "qk_norm"):
        base = base.replace(qk_norm=bool(args.qk_norm))
    return base, False, name in SIZES


def _read_diffusers(path: Path, ema: bool | str, overrides: dict[str, Any]) -> tuple[dict[str, torch.Tensor], NextDiTConfig, bool]:
    if ema is True:
        raise ValueError(f"{path}: diffusers checkpoints hold one set of weights; ema=True is not available")
    if path.is_dir():
        folder = path
        config = config_from_diffusers(json.loads((folder / "config.json").read_text()))
        if (folder / DIFFUSERS_INDEX).is_file():
            index = json.loads((folder / DIFFUSERS_INDEX).read_text())
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(_load_safetensors(folder / shard))
        elif (folder / DIFFUSERS_WEIGHTS).is_file():
            state = _load_safetensors(folder / DIFFUSERS_WEIGHTS)
        else:
            raise FileNotFoundError(f"{folder}: no {DIFFUSERS_WEIGHTS} (or sharded index) found")
        return diffusers_to_official(state, config), config, False
    state = strip_prefix(_load_safetensors(path))
    # A lone file has no config: map it to the official layout (the qkv merge needs only the head
    # counts, read off to_k and norm_q) and then read the rest off the shapes.
    try:
        head_dim = state["layers.0.attn.norm_q.weight"].shape[0]
        dim = state["x_embedder.weight"].shape[0]
        n_kv = state["layers.0.attn.to_k.weight"].shape[0] // head_dim
    except KeyError as err:
        raise ValueError(f"{path}: incomplete diffusers Next-DiT state dict (missing {err})") from None
    axes = overrides.get("axes_dims") or [head_dim // 3] * 3
    if sum(axes) != head_dim or any(a % 2 for a in axes):
        raise ValueError(
            f"{path}: cannot infer the RoPE axis split for head_dim={head_dim} from a lone file; "
            "pass axes_dims=[...] (e.g. load_nextdit(path, axes_dims=[4, 6, 6]))"
        )
    base = NextDiTConfig(dim=dim, n_heads=dim // head_dim, n_kv_heads=n_kv, axes_dims=axes)
    official = diffusers_to_official(state, base)
    return official, infer_config_from_official(official, base, overrides), False


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The entries of a training checkpoint besides its weights (``nextdit_config``, ``lumina_pipeline``,
    ``global_step``, ...): of a ``.ckpt`` file, of a distributed ``*.ckpt/`` folder (its ``meta.pt``),
    or of a DeepSpeed folder (Lightning stores them as DeepSpeed's client state, in rank 0's model states).

    Loaded with ``weights_only=True`` (our checkpoints hold only tensors, containers and plain
    values); a file that needs more is refused rather than unpickled (that could run arbitrary code).
    """
    path = Path(path)
    if is_distributed_checkpoint(path):
        file = path / "meta.pt"
    elif is_deepspeed_checkpoint(path):
        file = _deepspeed_model_states(path)
    else:
        file = path
    if path.is_dir() and not file.is_file():
        raise ValueError(f"{path}: not a training checkpoint (a folder without .metadata and meta.pt)")
    try:
        ckpt = _torch_load(file)
    except (RuntimeError, EOFError) as err:  # not a torch zip file at all, or truncated
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{file} is not a readable training checkpoint ({first})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{file}: not a training checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


# What a DCP ``.metadata`` pickle may name: torch's checkpoint-metadata dataclasses and enums, dtypes,
# ``torch.Size``, the layout lookup and the path of the checkpoint id (torch 2.x's FileSystemWriter).
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


def _check_dcp_metadata(file: Path) -> None:
    """Refuse a DCP ``.metadata`` that names anything but checkpoint metadata, before torch reads it.

    torch's ``FileSystemReader.read_metadata`` is a plain ``pickle.load``, so a downloaded checkpoint
    folder could run code the moment it is opened. Unpickling it first with only the classes torch's
    writer uses (``_DCP_METADATA_GLOBALS``) proves the file harmless; torch then reads the same bytes.
    (torch's weights-only unpickler does not apply: ``.metadata`` is a bare pickle, not a torch.save file.)
    """
    import pickle

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in _DCP_METADATA_GLOBALS or (
                    module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"it names {module}.{name}")

    try:
        with open(file, "rb") as f:
            Restricted(f).load()
    except Exception as err:  # noqa: BLE001 - any failure means torch's own plain unpickling is not safe to run
        raise ValueError(f"{file}: not a plain distributed-checkpoint metadata file, so the checkpoint is not "
                         f"loaded (unpickling it could run arbitrary code): {err}") from None


def _read_distributed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of the LightningModule's ``<prefix>`` submodule in a distributed checkpoint folder,
    whole, read in this process alone (no process group needed; none is used if one exists: every
    caller reads the complete tensors)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    _check_dcp_metadata(path / ".metadata")
    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    tensors = {k: m for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    # Lightning files the module's state dict under "state_dict" (ModelParallelStrategy: FSDP2) or
    # under "model" (FSDPStrategy with sharded state dicts: FSDP1); see their save_checkpoint. The
    # optimizer's entries are "optimizer_<i>.*" in both, so neither root is mistaken for another.
    for root in ("state_dict.", "model."):
        full = root + prefix
        state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                 for key, meta in tensors.items() if key.startswith(full)}
        if state:
            break
    else:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized, assuming ... single process"
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {k[len(full):]: v for k, v in state.items()}


# ------------------------------------------------------------------------------------------------
# DeepSpeed checkpoint folders
# ------------------------------------------------------------------------------------------------


def _deepspeed_tag_folder(path: Path) -> Path:
    """The folder holding a DeepSpeed checkpoint's files: the tag its ``latest`` names (Lightning's
    is always ``checkpoint``)."""
    latest = path / DEEPSPEED_LATEST
    tag = latest.read_text().strip() if latest.is_file() else DEEPSPEED_TAG
    folder = path / tag
    if not tag or Path(tag).name != tag or not folder.is_dir():
        raise ValueError(f"{path}: DeepSpeed checkpoint whose {DEEPSPEED_LATEST} names the tag {tag!r}, but there is "
                         f"no folder {folder} (incomplete or moved checkpoint)")
    return folder


def _deepspeed_model_states(path: Path) -> Path:
    """Rank 0's model states in a DeepSpeed checkpoint, which hold Lightning's client state: one file
    under ZeRO-1/2, one per rank under ZeRO-3 (DeepSpeed's file names; see zero_to_fp32.get_model_state_file)."""
    folder = _deepspeed_tag_folder(path)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{path}: DeepSpeed checkpoint without model states in {folder} (expected "
                     "mp_rank_00_model_states.pt or zero_pp_rank_0_mp_rank_00_model_states.pt)")


def _deepspeed_safe_globals() -> list[Any]:
    """DeepSpeed's plain-data classes in its checkpoint files (the ZeRO stage enum, the loss scaler's
    settings, a parameter's offset in the flat buffer): allowed when the files are read weights-only."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _check_deepspeed_files(folder: Path) -> None:
    """Read every model-state and optimizer file of a DeepSpeed tag folder weights-only (mmap: no tensor
    data is read), refusing one that needs more: DeepSpeed (``zero_to_fp32``, a resume) unpickles them
    with ``weights_only=False``, so only plain data may get that far."""
    from deepspeed.utils import zero_to_fp32

    allowed = _deepspeed_safe_globals()
    for file in [*zero_to_fp32.get_model_state_files(str(folder)), *zero_to_fp32.get_optim_files(str(folder))]:
        try:
            _torch_load(Path(file), allowed)
        except (RuntimeError, EOFError) as err:  # not a torch zip file at all, or truncated
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{file} is not a readable DeepSpeed checkpoint file ({first})") from None


def check_checkpoint_safe(path: str | os.PathLike) -> None:
    """Refuse (``ValueError``) a training checkpoint whose files would need more than plain data to
    unpickle, before Lightning resumes from it: Lightning, torch's DCP reader and DeepSpeed read their
    files with full unpickling, so a downloaded ``resume:`` checkpoint could run code. Our own
    checkpoints hold tensors, containers and plain values only (:func:`read_checkpoint_meta`)."""
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():
        # by content, not the .ckpt suffix: resume also takes `.last.ckpt.old` (a swap cut short)
        _check_dcp_metadata(path / ".metadata")
        if (path / "meta.pt").is_file():
            _torch_load(path / "meta.pt")
    elif is_deepspeed_checkpoint(path):
        try:
            _check_deepspeed_files(_deepspeed_tag_folder(path))
        except ImportError:
            return  # no deepspeed: the resume itself cannot start, and says so
    elif path.is_file():
        read_checkpoint_meta(path)


def _read_deepspeed(path: Path, prefix: str, module_state: Any) -> dict[str, torch.Tensor]:
    """The tensors of the LightningModule's ``<prefix>`` submodule in a DeepSpeed checkpoint folder,
    whole and in fp32 where DeepSpeed keeps an fp32 master copy (the trained parameters; frozen ones,
    the EMA among them, are stored as trained), gathered from every rank's ZeRO shards by DeepSpeed's
    own ``zero_to_fp32``, in this process alone. ``module_state``: the ``module`` entry of rank 0's
    model states (see below)."""
    try:
        from deepspeed.utils import zero_to_fp32
    except ImportError:
        raise ValueError(f"{path} is a DeepSpeed checkpoint; reading it needs the deepspeed package "
                         "(pip install 'lumina-lightning[deepspeed]')") from None
    folder = _deepspeed_tag_folder(path)
    _check_deepspeed_files(folder)
    with _captured_output("DeepSpeed's zero_to_fp32"):
        lazy = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(path), tag=folder.name, lazy_mode=True)
    # keys as Lightning's convert_zero_checkpoint_to_fp32_state_dict gives them: checkpoints of
    # Lightning < 2.1 name the module through its "_forward_module." wrapper
    lazy = {k.removeprefix("_forward_module."): v for k, v in lazy.items()}
    # ZeRO-1 stores no frozen parameters apart (the engine's _save_checkpoint does from ZeRO-2 on), so
    # zero_to_fp32 leaves them out; its module state holds every parameter whole, as trained. (Under
    # ZeRO-3 that state holds empty placeholders, and zero_to_fp32 has every parameter.)
    for key, value in (module_state if isinstance(module_state, dict) else {}).items():
        key = key.removeprefix("_forward_module.")
        if key not in lazy and isinstance(value, torch.Tensor) and value.numel() > 0:
            lazy[key] = value
    return {k[len(prefix):]: v.contiguous() for k, v in lazy.items() if k.startswith(prefix)}


@contextlib.contextmanager
def _captured_output(what: str) -> Iterator[None]:
    """Keep a library's prints and progress bars (DeepSpeed prints each step of a conversion) out of
    the command's output; they go to the debug log."""
    import io

    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    finally:
        if buffer.getvalue().strip():
            log.debug("%s: %s", what, buffer.getvalue().strip())


def _read_lightning(path: Path, ema: bool | str, overrides: dict[str, Any]) -> tuple[dict[str, torch.Tensor], NextDiTConfig, bool]:
    ckpt = read_checkpoint_meta(path)
    if "nextdit_config" not in ckpt:
        raise ValueError(f"{path}: not a lumina-lightning training checkpoint (no 'nextdit_config' entry)")
    config = NextDiTConfig.from_dict(ckpt["nextdit_config"])
    # the LightningModule stores both networks in its state dict and records their prefixes
    # (NextDiTModule.on_save_checkpoint): "model." for the raw weights, "ema_model." for the EMA
    ema_prefix = ckpt.get("nextdit_ema_prefix")
    if ema is True and not ema_prefix:
        raise ValueError(f"{path}: EMA weights requested but the checkpoint has none")
    prefix = ema_prefix if ema_prefix and ema in (True, "auto") else ckpt.get("nextdit_prefix", "model.")
    if is_distributed_checkpoint(path):
        state = _read_distributed(path, prefix)
    elif is_deepspeed_checkpoint(path):
        state = _read_deepspeed(path, prefix, ckpt.get("module"))
    else:
        state = {k[len(prefix):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    if not state and prefix == ema_prefix:
        why = (" (a DeepSpeed run with exclude_frozen_parameters=True leaves the frozen EMA out)"
               if is_deepspeed_checkpoint(path) else " (incomplete or edited checkpoint)")
        raise ValueError(f"{path}: records EMA weights under {prefix!r} but holds none{why}; load its raw weights "
                         "(ema=False, --ema false, model.init_ema=raw)")
    if not state:
        raise ValueError(f"{path}: no weights under the prefix {prefix!r} in its state_dict")
    return state, config, bool(ema_prefix) and prefix == ema_prefix


# ------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "<state dict>") -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` fits ``model`` exactly (modulo optional keys)."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state and k not in _OPTIONAL_KEYS)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)


def build_from_state(
    config: NextDiTConfig,
    state: dict[str, torch.Tensor],
    *,
    source: str = "<state dict>",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> NextDiT:
    """Build a model on the meta device and adopt the checkpoint's tensors (no double allocation)."""
    with torch.device("meta"):
        model = NextDiT(config)
    check_state_dict(model, state, source)
    state = dict(state)
    for key in _OPTIONAL_KEYS - set(state):
        state[key] = torch.ones(model.state_dict()[key].shape, dtype=next(iter(state.values())).dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.to(device)


def load_nextdit(
    path: str | os.PathLike,
    *,
    ema: bool | str = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> NextDiT:
    """Load a Next-DiT from any supported checkpoint (format detected from the path).

    Args:
        path: a checkpoint file or folder (see :func:`detect_format`).
        ema: ``False`` raw weights, ``True`` EMA weights, ``"auto"`` EMA where the checkpoint has them.
        dtype, device: where to put the weights (default: the checkpoint's dtype, CPU).
        **overrides: config fields to override, e.g. ``qk_norm_eps=1e-6`` or ``axes_dims=[...]``.
    """
    state, config, fmt, used_ema = _read_state(path, ema, overrides)
    log.info("loading Next-DiT (%s layout, dim=%d, layers=%d, %s weights) from %s", fmt, config.dim, config.n_layers,
             "EMA" if used_ema else "raw", path)
    model = build_from_state(config, state, source=str(path), dtype=dtype, device=device)
    # which weights these are, for records (`lumina sample`'s PNGs): ema="auto" alone does not say
    model.weights_ema = used_ema
    return model


# ------------------------------------------------------------------------------------------------
# writing (atomic: temp file + rename, so an interrupted save never clobbers a good file)
# ------------------------------------------------------------------------------------------------


def _contiguous(state: dict[str, torch.Tensor], progress: bool = False) -> dict[str, torch.Tensor]:
    items: Iterable = state.items()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, total=len(state), desc="tensors", unit="t", leave=False)
    return {k: v.detach().to("cpu").contiguous() for k, v in items}


def _official_name(config: NextDiTConfig) -> str:
    for name in SIZES:
        if name.endswith("Refiner") and config_for(name) == config:
            return name
    return "NextDiT"


def save_nextdit(
    model: NextDiT | None,
    path: str | os.PathLike,
    fmt: str = "lumina",
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    config: NextDiTConfig | None = None,
    ema_state_dict: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> Path:
    """Save weights in one of the layouts ``lumina`` | ``official`` | ``diffusers``.

    Pass a model, or ``state_dict`` (official/our keys) + ``config``. ``ema_state_dict`` is written
    alongside where the layout has a place for it (``*_ema.safetensors``, ``consolidated_ema.*``);
    without it, such a file left by an earlier save is removed, as are a diffusers folder's old shards.

    Returns:
        The path written (a file for ``lumina`` given a ``.safetensors`` path, else a folder).
    """
    if fmt not in ("lumina", "official", "diffusers"):
        raise ValueError(f"cannot save in layout {fmt!r}; choose lumina, official or diffusers")
    if model is not None:
        state_dict = state_dict if state_dict is not None else model.state_dict()
        config = config or model.config
    if state_dict is None or config is None:
        raise ValueError("save_nextdit needs a model, or a state_dict and a config")
    path = Path(path)
    state = _contiguous(state_dict, progress)
    if fmt == "lumina":
        file = path if path.suffix == ".safetensors" else path / "model.safetensors"
        meta = {"format": LUMINA_FORMAT_TAG, "config": config.to_json()}
        atomic_write(file, lambda tmp: save_file(state, tmp, metadata=meta))
        if ema_state_dict is not None:
            ema = _contiguous(ema_state_dict, progress)
            ema_file = file.with_name(file.stem + "_ema.safetensors")
            atomic_write(ema_file, lambda tmp: save_file(ema, tmp, metadata=meta))
        if file.parent == path:  # a folder: also a human-readable config
            text = json.dumps({"format": LUMINA_FORMAT_TAG, **config.to_dict()}, indent=2)
            atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(text))
        if ema_state_dict is None:
            _remove_stale_ema(file.with_name(file.stem + "_ema.safetensors"))
        return file if path.suffix == ".safetensors" else path
    if fmt == "official":
        if "norm_final.weight" not in state:
            state["norm_final.weight"] = torch.ones(config.dim, dtype=next(iter(state.values())).dtype)
        args = argparse.Namespace(model=_official_name(config), qk_norm=config.qk_norm, lumina_config=config.to_dict())
        atomic_write(path / OFFICIAL_WEIGHTS, lambda tmp: torch.save(state, tmp))
        if ema_state_dict is not None:
            ema = _contiguous(ema_state_dict, progress)
            ema.setdefault("norm_final.weight", state["norm_final.weight"])
            atomic_write(path / OFFICIAL_EMA_WEIGHTS, lambda tmp: torch.save(ema, tmp))
        atomic_write(path / OFFICIAL_ARGS, lambda tmp: torch.save(args, tmp))
        if ema_state_dict is None:
            _remove_stale_ema(path / OFFICIAL_EMA_WEIGHTS)
        _remove_other_layout(path)
        return path
    diff = official_to_diffusers(state, config)
    text = json.dumps(config_to_diffusers(config), indent=2)
    atomic_write(path / DIFFUSERS_WEIGHTS, lambda tmp: save_file(diff, tmp, metadata={"format": "pt"}))
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(text))
    _remove_stale_shards(path)
    return path


# An earlier save into the same folder may have left files that the new one does not replace but
# that loading prefers (an EMA file under ema="auto", a shard index over the single file): they are
# removed after the new files are in place, so an interrupted save never leaves the folder empty.


def _remove_stale_ema(ema_file: Path) -> None:
    if ema_file.is_file():
        log.warning("removing %s, EMA weights of an earlier save: this save has no EMA, and ema='auto' (the "
                    "default of conversion and pipeline loading) would load them instead of the new weights", ema_file)
        ema_file.unlink()


def _remove_other_layout(folder: Path) -> None:
    """After an official save: a diffusers or lumina ``config.json`` left by an earlier save (and its
    weights) would win detection over the files just written, and load the old weights."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return
    try:
        data = json.loads(cfg.read_text())
    except ValueError:
        return
    if not isinstance(data, dict):
        return
    if data.get("_class_name") == DIFFUSERS_CLASS:
        kind, weights = "diffusers", [DIFFUSERS_WEIGHTS]
    elif data.get("format") == LUMINA_FORMAT_TAG:
        kind, weights = "lumina", ["model.safetensors", "model_ema.safetensors"]
    else:
        return
    log.warning("removing the %s checkpoint of an earlier save from %s (config.json and its weights): detection "
                "prefers config.json over the official files just written", kind, folder)
    cfg.unlink()  # first: from here on, the official files are what every loader reads
    if kind == "diffusers":
        _remove_stale_shards(folder, quiet=True)
    for name in weights:
        if (folder / name).is_file():
            (folder / name).unlink()


def _remove_stale_shards(folder: Path, quiet: bool = False) -> None:
    index = folder / DIFFUSERS_INDEX
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
    except (ValueError, AttributeError):  # unreadable index: still remove it, it is no longer ours
        shards = set()
    if not quiet:
        log.warning("removing the sharded weights of an earlier save from %s (%s and %d shards): loaders prefer "
                    "the shard index over the %s just written", folder, DIFFUSERS_INDEX, len(shards), DIFFUSERS_WEIGHTS)
    index.unlink()  # first: from here on, the new single file is what every loader reads
    for shard in sorted(shards):
        # only plain file names inside this folder (an index could name anything)
        if isinstance(shard, str) and Path(shard).name == shard and shard != DIFFUSERS_WEIGHTS \
                and (folder / shard).is_file():
            (folder / shard).unlink()
