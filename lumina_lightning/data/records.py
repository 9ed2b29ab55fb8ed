"""Records and the formats they are read from: JSONL/JSON manifests, image folders, data YAMLs.

Every reader returns :class:`Record` objects with an absolute image path, so everything after this
module is format-agnostic.

Accepted record shapes (one JSON object per line in ``.jsonl``, or a JSON list in ``.json``):

* ours: ``{"image": "img/0001.png", "captions": {"short": "...", "long": "...", "tags": "..."},
  "width": 512, "height": 768, "meta": {...}}`` (width/height/meta optional; extra keys go to
  ``meta``);
* one caption: ``{"image": ..., "caption": "..."}`` (also ``"text"``), stored as level
  ``"caption"``;
* Hugging Face ``imagefolder`` metadata: ``{"file_name": ..., "text": ...}``;
* the official Lumina shapes (spec §3, "Training"): ``image_path`` + ``super_high_quality_caption``
  (system template ``align``), ``path`` + ``prompt`` (system template ``base``), and the
  README-documented ``image_path`` + ``prompt`` that the official loader actually rejects (issue
  #46; spec §9.2 item 3) — we accept it, with no system template of its own. Their caption is
  stored as level ``"caption"``.

A record's own ``"system"`` key wins over its source's ``system`` (data YAML), which wins over the
shape's default above.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import yaml

__all__ = [
    "Record",
    "SourceInfo",
    "RecordSet",
    "ManifestError",
    "DuplicateKeyError",
    "UniqueKeyLoader",
    "IMAGE_EXTENSIONS",
    "parse_record",
    "read_manifest",
    "iter_jsonl",
    "read_folder",
    "read_data_yaml",
    "load_records",
    "write_manifest",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SINGLE_CAPTION_LEVEL = "caption"

# Keys that name the image, in order of preference.
_IMAGE_KEYS = ("image", "image_path", "path", "file_name")
# Keys that hold a single caption; all map to level "caption".
_SINGLE_CAPTION_KEYS = ("caption", "text", "prompt", "super_high_quality_caption")
_CONSUMED = set(_IMAGE_KEYS) | set(_SINGLE_CAPTION_KEYS) | {"captions", "meta", "system", "width", "height"}


class ManifestError(ValueError):
    """A manifest, folder or data YAML cannot be read; the message names the file (and line)."""


@dataclass
class Record:
    """One image with its captions.

    Attributes:
        image: absolute path of the image file.
        captions: caption text per level, e.g. ``{"short": ..., "long": ..., "tags": ...,
            "long_de": ...}``; a single-caption record has level ``"caption"``.
        meta: everything else the source carried (GenEval metadata, ids, scores, ...).
        source: where the record came from (manifest path, folder, ...), for logs and stats.
        system: name of the system-prompt template the source asks for (spec §3: ``"align"``,
            ``"base"``, ``"real"``, ...), or ``None`` for the recipe's default.
        width, height: image size if the manifest states it (saves reading headers); the
            displayed size, i.e. after EXIF rotation.
    """

    image: str
    captions: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    system: str | None = None
    width: int | None = None
    height: int | None = None


@dataclass
class SourceInfo:
    """One source of a :class:`RecordSet`: records ``[start, stop)`` sampled with ``ratio`` per epoch."""

    name: str
    start: int
    stop: int
    ratio: float = 1.0

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class RecordSet:
    """All records of a run plus the sources they came from and their sampling ratios."""

    records: list[Record]
    sources: list[SourceInfo]

    def __len__(self) -> int:
        return len(self.records)

    def epoch_indices(self, seed: int, epoch: int) -> np.ndarray:
        """Record indices of one epoch after applying each source's ratio (deterministic).

        A ratio ``r`` takes every record ``⌊r⌋`` times plus a random subset of
        ``round((r − ⌊r⌋)·n)`` records, drawn anew each epoch from ``(seed, epoch, source)``.
        The official ``MyDataset`` draws one fixed subset (ratio ≤ 1); re-drawing per epoch is a
        deliberate improvement so that a down-weighted source is still seen in full over a long run.
        """
        parts = []
        for s, src in enumerate(self.sources):
            if src.size == 0 or src.ratio <= 0:
                continue
            whole = int(math.floor(src.ratio))
            frac = src.ratio - whole
            base = np.arange(src.start, src.stop, dtype=np.int64)
            parts.extend([base] * whole)
            extra = int(round(frac * src.size))
            if extra:
                # numpy seeds must be non-negative: mask like the other seeded draws so any int seed works
                rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), s, 0x5A7])
                parts.append(np.sort(rng.choice(base, size=extra, replace=False)))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _resolve(path: str, base: Path) -> str:
    expanded = os.path.expanduser(path)
    return os.path.abspath(expanded if os.path.isabs(expanded) else base / expanded)


def _clean_caption(value: Any, where: str, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ManifestError(f"{where}: caption {key!r} must be a string, got {type(value).__name__}")
    return value


def parse_record(
    obj: Any, base: Path, where: str, source: str = "", system: str | None = None
) -> Record:
    """Turn one decoded JSON object into a :class:`Record` (see the module docstring for shapes).

    Args:
        obj: the decoded JSON object.
        base: directory that relative image paths are resolved against.
        where: ``"file:line"`` used in error messages.
        source: name recorded in ``Record.source``.
        system: the source's system template (overrides the shape's default, not the record's own).
    """
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    image_key = next((k for k in _IMAGE_KEYS if k in obj), None)
    if image_key is None:
        raise ManifestError(f"{where}: no image path (expected one of {', '.join(_IMAGE_KEYS)}); keys: {sorted(obj)}")
    image = obj[image_key]
    if not isinstance(image, str) or not image:
        raise ManifestError(f"{where}: {image_key!r} must be a non-empty string")

    captions: dict[str, str] = {}
    if "captions" in obj:
        levels = obj["captions"]
        if not isinstance(levels, dict):
            raise ManifestError(f"{where}: 'captions' must be an object of level -> text")
        for level, text in levels.items():
            captions[str(level)] = _clean_caption(text, where, str(level))
    single = next((k for k in _SINGLE_CAPTION_KEYS if k in obj), None)
    if single is not None and SINGLE_CAPTION_LEVEL not in captions:
        captions[SINGLE_CAPTION_LEVEL] = _clean_caption(obj[single], where, single)
    if single is None and "captions" not in obj:
        raise ManifestError(f"{where}: no caption (expected 'captions', or one of {', '.join(_SINGLE_CAPTION_KEYS)})")

    # Spec §3: the official trainer picks the system template from the record shape.
    shape_system = None
    if image_key == "image_path" and "super_high_quality_caption" in obj:
        shape_system = "align"
    elif image_key == "path" and "prompt" in obj:
        shape_system = "base"
    record_system = obj.get("system")
    if record_system is not None and not isinstance(record_system, str):
        raise ManifestError(f"{where}: 'system' must be a string")

    raw_meta = obj.get("meta") or {}
    if not isinstance(raw_meta, dict):
        raise ManifestError(f"{where}: 'meta' must be an object")
    meta = dict(raw_meta)
    meta.update({k: v for k, v in obj.items() if k not in _CONSUMED})

    def _int(key: str) -> int | None:
        value = obj.get(key)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or value <= 0:
            raise ManifestError(f"{where}: {key!r} must be a positive number")
        return int(value)

    return Record(
        image=_resolve(image, base),
        captions=captions,
        meta=meta,
        source=source,
        system=record_system or system or shape_system,
        width=_int("width"),
        height=_int("height"),
    )


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names one key twice. YAML itself keeps the last value and drops the first silently
    (a pasted second ``optim:`` section would train with half the settings, a second ``META:`` drop
    sources), so every YAML a user writes is refused instead; the reader prefixes the file."""

    def __init__(self, key: str, first_line: int, line: int) -> None:
        super().__init__(f"duplicate key `{key}` at lines {first_line} and {line}: YAML would keep only the last "
                         "and silently drop the first; merge them into one")
        self.key, self.first_line, self.line = key, first_line, line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`DuplicateKeyError` (key path, both lines) for a key given
    twice in one mapping. A key overriding a ``<<:`` merge is YAML's own rule, not a duplicate."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_unique_keys(self, node, "", set())
        return super().construct_document(node)


def _check_unique_keys(loader: yaml.SafeLoader, node: yaml.Node, path: str, seen: set[int]) -> None:
    """Walk the composed document, before it becomes dicts (which keep only the last of equal keys)."""
    if id(node) in seen:  # an alias of a node already walked (anchors may even be recursive)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(loader, item, f"{path}[{i}]", seen)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first_lines: dict[Any, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: checked where the anchor is
            _check_unique_keys(loader, value_node, path, seen)
            continue
        # compare keys as constructed: `1` and `01` are one key in the dict too
        scalar = isinstance(key_node, yaml.ScalarNode)
        key = loader.construct_object(key_node) if scalar else object()  # complex keys: never compared
        label = str(key) if scalar else "<complex key>"
        name = f"{path}.{label}" if path else label
        line = key_node.start_mark.line + 1
        if key in first_lines:
            raise DuplicateKeyError(name, first_lines[key], line)
        first_lines[key] = line
        _check_unique_keys(loader, value_node, name, seen)


def not_utf8(path: str | os.PathLike, err: UnicodeDecodeError, line: int | None = None) -> str:
    """The message for a text input that is not UTF-8: the file (and line), the byte, what to do."""
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: not UTF-8 text ({err.reason} at byte {err.start}{' of the line' if line else ''}); save it as UTF-8"


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file, decoded line by line, so that a byte that is not UTF-8
    is reported at its own line (a text-mode read decodes in chunks and cannot say which)."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ManifestError(not_utf8(path, err, lineno)) from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSON-lines file; a line that is not JSON
    (or not UTF-8) raises :class:`ManifestError` naming ``path:line`` (``json.loads`` of one line
    alone would say "line 1")."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}:{lineno}: malformed JSON line ({err.msg} at column {err.colno})") from err


def read_manifest(
    path: str | os.PathLike, root: str | os.PathLike | None = None, system: str | None = None, source: str | None = None,
    fmt: str = "auto",
) -> list[Record]:
    """Read a ``.jsonl`` (one object per line) or ``.json`` (a list of objects) manifest.

    Relative image paths are resolved against ``root`` if given, else the manifest's directory.
    A malformed line raises :class:`ManifestError` naming the file and line number. ``fmt`` is
    ``"auto"`` (by suffix: ``.json`` = a list, anything else JSON lines), ``"json"`` or ``"jsonl"``.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    if fmt not in ("auto", "json", "jsonl"):
        raise ManifestError(f"{path}: unknown manifest format {fmt!r} (expected auto, json or jsonl)")
    base = Path(root).expanduser().resolve() if root is not None else path.resolve().parent
    name = source or str(path)
    records: list[Record] = []
    if fmt == "json" or (fmt == "auto" and path.suffix == ".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from err
        except UnicodeDecodeError as err:
            raise ManifestError(not_utf8(path, err)) from None
        if not isinstance(data, list):
            raise ManifestError(f"{path}: a .json manifest must hold a list of records")
        for i, obj in enumerate(data):
            records.append(parse_record(obj, base, f"{path}[{i}]", name, system))
    else:
        for lineno, obj in iter_jsonl(path):
            records.append(parse_record(obj, base, f"{path}:{lineno}", name, system))
    return records


def read_folder(
    folder: str | os.PathLike, system: str | None = None, source: str | None = None, recursive: bool = True
) -> list[Record]:
    """Read a folder of images with same-name ``.txt`` captions and optional ``.json`` sidecars.

    ``cat.png`` takes its caption from ``cat.txt`` (level ``"caption"``) and, if present, more
    fields from ``cat.json``: ``captions`` (levels), ``caption``/``prompt``/``text``, ``system``,
    ``width``/``height``, everything else into ``meta``. An image with no caption at all is kept
    (with no levels) so the loader counts it as an ``empty_caption`` skip instead of dropping it
    silently. Files are listed in sorted order so the record order is reproducible.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not a directory")
    pattern = "**/*" if recursive else "*"
    images = sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    name = source or str(folder)
    records = []
    for img in images:
        obj: dict[str, Any] = {}
        sidecar = img.with_suffix(".json")
        if sidecar.is_file():
            try:
                obj = json.loads(sidecar.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ManifestError(f"{sidecar}:{err.lineno}: malformed JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise ManifestError(f"{sidecar}: expected a JSON object")
        txt = img.with_suffix(".txt")
        if txt.is_file():
            captions = dict(obj.get("captions") or {})
            captions.setdefault(SINGLE_CAPTION_LEVEL, txt.read_text(encoding="utf-8").strip())
            obj["captions"] = captions
        if "captions" not in obj and not any(k in obj for k in _SINGLE_CAPTION_KEYS):
            obj["captions"] = {}
        obj["image"] = str(img)
        records.append(parse_record(obj, folder, str(sidecar if sidecar.is_file() else img), name, system))
    return records


def _read_source(path: Path, kind: str, root: str | None, system: str | None, where: str,
                 stack: tuple[Path, ...]) -> tuple[RecordSet, bool]:
    """One META entry's records, and whether it was a nested data YAML (with sources of its own)."""
    if kind in ("auto", "image_text"):  # "image_text" appears in official data YAMLs
        if path.is_dir():
            kind = "folder"
        elif path.suffix in (".yaml", ".yml"):
            kind = "yaml"
        else:
            kind = "json" if path.suffix == ".json" else "jsonl"
    if kind == "folder":
        if not path.is_dir():
            raise ManifestError(f"{where}: type 'folder' but {path} is not a directory")
        recs = read_folder(path, system=system)
    elif kind in ("jsonl", "json"):
        if path.is_dir():
            raise ManifestError(f"{where}: type {kind!r} but {path} is a directory")
        recs = read_manifest(path, root=root, system=system, fmt=kind)
    elif kind == "yaml":
        return _read_data_yaml(path, root, system, stack), True
    else:
        raise ManifestError(f"{where}: unknown source type {kind!r} (expected auto, jsonl, json, folder or yaml)")
    return RecordSet(recs, [SourceInfo(str(path), 0, len(recs), 1.0)]), False


def read_data_yaml(path: str | os.PathLike, root: str | os.PathLike | None = None) -> RecordSet:
    """Read an official-style data YAML that mixes several sources with sampling ratios::

        META:
          - path: hq.jsonl          # manifest (.jsonl/.json), image folder or another data YAML;
                                    # relative to this file
            ratio: 2.0              # per-epoch sampling ratio (default 1.0), see RecordSet.epoch_indices
            root: /data/images      # base for relative image paths (default: the manifest's folder)
            type: jsonl             # auto (default, by suffix) | jsonl | json | folder | yaml
            system: align           # system template for this source's records
          - path: web.jsonl
            ratio: 0.5

    ``root`` given here (by the caller or ``--root``; relative to the current directory) applies
    to sources that have no ``root`` of their own; a ``root:`` inside the YAML is relative to the
    YAML's folder. A source that is itself a data YAML contributes its own sources, each with its
    ratio multiplied by the entry's ``ratio``; the entry's ``root`` and ``system`` apply to those of
    its sources that name none.
    """
    if root is not None:  # the caller's root is relative to the current directory, like for a manifest
        root = _resolve(str(root), Path.cwd())
    return _read_data_yaml(Path(path).expanduser().resolve(), root, None, ())


def _read_data_yaml(path: Path, root: str | None, system: str | None, stack: tuple[Path, ...]) -> RecordSet:
    if path in stack:
        chain = " -> ".join(str(p) for p in stack + (path,))
        raise ManifestError(f"{path}: data YAMLs include each other in a loop ({chain})")
    stack = stack + (path,)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except DuplicateKeyError as err:
        raise ManifestError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: malformed YAML ({err})") from err
    except UnicodeDecodeError as err:
        raise ManifestError(not_utf8(path, err)) from None
    except OSError as err:
        raise ManifestError(f"{path}: cannot read ({err.strerror or err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("META"), list) or not data["META"]:
        raise ManifestError(f"{path}: a data YAML needs a non-empty 'META' list of sources")
    records: list[Record] = []
    sources: list[SourceInfo] = []
    for i, entry in enumerate(data["META"]):
        where = f"{path}: META[{i}]"
        if not isinstance(entry, dict) or "path" not in entry:
            raise ManifestError(f"{where}: each source needs a 'path'")
        unknown = set(entry) - {"path", "ratio", "root", "type", "system", "name"}
        if unknown:
            raise ManifestError(f"{where}: unknown keys {sorted(unknown)} (allowed: path, ratio, root, type, system, "
                                "name)")
        for key in ("path", "root", "type", "system", "name"):
            value = entry.get(key)
            if value is not None and (not isinstance(value, str) or not value.strip()) and not (
                    key in ("path", "root", "name") and isinstance(value, (int, float)) and not isinstance(value, bool)):
                raise ManifestError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
        if entry.get("path") is None:
            raise ManifestError(f"{where}: 'path' is empty")
        raw_ratio = entry.get("ratio", 1.0)
        try:
            if isinstance(raw_ratio, bool) or raw_ratio is None:
                raise TypeError
            ratio = float(raw_ratio)
        except (TypeError, ValueError):
            raise ManifestError(f"{where}: 'ratio' must be a number >= 0, got {raw_ratio!r}") from None
        if not math.isfinite(ratio) or ratio < 0:
            raise ManifestError(f"{where}: 'ratio' must be a finite number >= 0, got {raw_ratio!r}")
        src_path = Path(_resolve(str(entry["path"]), path.parent))
        # A ``root:`` written in the YAML is relative to the YAML's folder; a ``root`` from the
        # caller/CLI was resolved against the current directory above (as for a manifest).
        if entry.get("root") is not None:
            src_root = _resolve(str(entry["root"]), path.parent)
        else:
            src_root = root
        if not src_path.exists():
            raise ManifestError(f"{where}: {src_path} not found")
        src_system = entry.get("system") or system
        part, nested = _read_source(src_path, str(entry.get("type", "auto")), src_root, src_system, where, stack)
        offset = len(records)
        if nested:
            prefix = str(entry.get("name") or "")
            for src in part.sources:
                name = f"{prefix}/{src.name}" if prefix else src.name
                for r in part.records[src.start:src.stop]:
                    r.source = name
                sources.append(SourceInfo(name, offset + src.start, offset + src.stop, ratio * src.ratio))
        else:
            name = str(entry.get("name") or src_path)
            for r in part.records:
                r.source = name
            sources.append(SourceInfo(name, offset, offset + len(part.records), ratio))
        records.extend(part.records)
    return RecordSet(records, sources)


def load_records(
    path: str | os.PathLike, root: str | os.PathLike | None = None, system: str | None = None
) -> RecordSet:
    """Load records from a data YAML (``.yaml``/``.yml``), a manifest (``.jsonl``/``.json``) or a folder."""
    p = Path(path).expanduser()
    if p.suffix in (".yaml", ".yml"):
        return read_data_yaml(p, root=root)
    if p.is_dir():
        recs = read_folder(p, system=system)
    elif p.suffix in (".jsonl", ".json"):
        recs = read_manifest(p, root=root, system=system)
    elif not p.exists():
        raise ManifestError(f"{p}: not found")
    else:
        raise ManifestError(f"{p}: unsupported data path (expected .jsonl, .json, .yaml or a folder)")
    return RecordSet(recs, [SourceInfo(str(p), 0, len(recs), 1.0)])


def record_to_dict(record: Record, base: Path | None = None) -> dict[str, Any]:
    """The manifest form of a record (image path made relative to ``base`` when it is inside it)."""
    image = record.image
    if base is not None:
        try:
            image = os.path.relpath(record.image, base)
            if image.startswith(".."):
                image = record.image
        except ValueError:  # different drive on Windows
            image = record.image
    out: dict[str, Any] = {"image": image, "captions": dict(record.captions)}
    if record.width is not None and record.height is not None:
        out["width"], out["height"] = record.width, record.height
    if record.system is not None:
        out["system"] = record.system
    if record.meta:
        out["meta"] = record.meta
    return out


def write_manifest(records: Iterable[Record], path: str | os.PathLike) -> Path:
    """Write records as a JSONL manifest; image paths become relative to the manifest's folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record_to_dict(record, base), ensure_ascii=False) + "\n")
    return path
