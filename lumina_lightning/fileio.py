"""Atomic file writes (a temp file in the target's folder, then ``os.replace`` onto the target), and the
two helpers every re-run check shares: a cheap digest of weights, and moving a stale output aside.

One place for it, because every writer of a file that a later run (or a reader at the same moment)
trusts needs the same three things: an interrupted write never leaves half a file under the real
name, no temp file is left behind, and the result has the mode a plain ``open()`` would have given.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def atomic_write(target: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)``, then move the temp file onto ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file 0600; give it what the target had, else 0666 less the umask, so
        # shared sample, export and checkpoint folders stay readable
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of UTF-8 text."""
    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; set it straight back
    os.umask(mask)
    return mask


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def content_digest(path: str | os.PathLike | None) -> str | None:
    """A digest of a file, or of the weight files under a folder (not ``pipeline.json`` and other small
    files, which TeaCache calibration and ``eval.cfg_scale`` rewrite); ``None`` when there is nothing.

    Weight files count by name, size and mtime, not by their bytes: a 2.6B export is tens of GB, and
    hashing it on every re-run would take minutes, while a retrained (rewritten) file always gets a
    new mtime. Other files (manifests, data YAMLs) count by their contents, which survive a copy.
    """
    def add(f: Path, h: Any) -> None:
        if f.suffix in WEIGHT_SUFFIXES:
            st = f.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            _add_bytes(f, h)

    return _digest(path, add)


def weights_hash(path: str | os.PathLike | None) -> str | None:
    """A digest of the *values* in the files :func:`content_digest` counts, read whole: equal for two
    exports of the same weights whenever, and by whichever process, they were written (a stage resumed
    at ``max_steps`` re-exports what it exported before); ``None`` when there is nothing.

    It reads every byte (about a second per GB), so callers hash an export once and keep the result.
    A safetensors header counts with its keys sorted: the safetensors writer emits the ``__metadata__``
    entries in a per-process hash-map order, so the same tensors saved twice differ in those bytes.
    """
    def add(f: Path, h: Any) -> None:
        with open(f, "rb") as fh:
            if f.suffix == ".safetensors":
                h.update(_canonical_safetensors_header(fh))
            _add_bytes(fh, h)

    return _digest(path, add)


def _digest(path: str | os.PathLike | None, add: Callable[[Path, Any], None]) -> str | None:
    """sha256 over the files :func:`_digested_files` lists, each by its relative name and ``add(file, hash)``."""
    root, files = _digested_files(path)
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root) if f != root else f.name).encode())
        add(f, h)
    return h.hexdigest()


def _add_bytes(source: Path | Any, h: Any) -> None:
    """Feed a file (a path, or an open binary file from where it stands) to ``h`` in 16 MB chunks."""
    if isinstance(source, Path):
        with open(source, "rb") as fh:
            return _add_bytes(fh, h)
    while chunk := source.read(1 << 24):
        h.update(chunk)


def _digested_files(path: str | os.PathLike | None) -> tuple[Path | None, list[Path]]:
    """``path`` and the files a digest of it covers: itself, or the weight files under the folder."""
    if not path or not Path(path).exists():
        return None, []
    root = Path(path)
    return root, [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES)


def _canonical_safetensors_header(fh: Any) -> bytes:
    """The header of the safetensors file open in ``fh`` as sorted-key JSON, leaving ``fh`` at the
    tensor data; a file that is no safetensors (the header does not parse) is left at its start."""
    import json
    import struct

    try:
        size = struct.unpack("<Q", fh.read(8))[0]
        if size <= _SAFETENSORS_MAX_HEADER:  # else not a header: never read gigabytes as one
            return json.dumps(json.loads(fh.read(size)), sort_keys=True).encode()
    except (struct.error, ValueError):
        pass
    fh.seek(0)
    return b""


_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit


def move_aside(path: str | os.PathLike, stamp: str | None = None) -> Path:
    """Rename a folder or file to ``<name>.replaced-<YYYYmmdd-HHMMSS>`` (never overwriting; kept, not
    deleted: it may be days of training or hours of captioning). Pass one ``stamp`` to move files that
    belong together under the same suffix."""
    path = Path(path)
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
    os.replace(path, aside)
    return aside
