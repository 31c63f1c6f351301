"""Atomic writes: a reader (another rank, a resumed run, a crash's survivor) sees a file or
directory either complete or not at all, never half written.

Every file esorl writes that something later reads (caches, metrics rewrites, shards,
exported models, checkpoint markers) goes through one of these; the temporary name carries
the process id, so two processes writing the same path cannot race on one temporary file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8", fsync: bool = False) -> Path:
    """Write ``data`` (text or bytes) to ``path`` through a temporary file and ``os.replace``.
    ``fsync``: flush to disk before the rename (for files a crash must not lose)."""
    path = Path(path)
    raw = data.encode(encoding) if isinstance(data, str) else data
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_if_changed(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text`` unless the file already holds exactly it (a cache
    written once is not rewritten, so its modification time keeps meaning "built then")."""
    path = Path(path)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return path
    return atomic_write(path, text)


def atomic_save(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` writes the file (``np.save``, ``torch.save``, ...) to a temporary path
    that is then renamed to ``path``."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def replace_dir(tmp_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Move a completely written directory ``tmp_dir`` to ``out_dir``, replacing what was
    there (an exported model: readers of ``out_dir`` see the old or the new one)."""
    tmp_dir, out_dir = Path(tmp_dir), Path(out_dir)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        out_dir.replace(old)
        tmp_dir.replace(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.replace(out_dir)
    return out_dir
