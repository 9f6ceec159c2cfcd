"""Writing files so that readers see the old file or the new one, whole, never a part."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def new_temp(path: Path, suffix: str = ".tmp") -> Path:
    """An empty hidden temporary file beside ``path`` (its name ends with ``suffix``: some
    writers, AOTInductor's among them, insist on their suffix)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    return Path(tmp)


def flush(path: Path) -> None:
    """Force ``path``'s content to disk (before it is renamed into place)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_temp(path: Path, write: Callable[[Path], object], *, suffix: str = ".tmp") -> Path:
    """Have ``write`` fill a hidden temporary file beside ``path`` (given by its path), then
    flush it to disk; the file is removed if writing fails."""
    tmp = new_temp(path, suffix)
    try:
        write(tmp)
        flush(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: readers see the old or the new file, whole."""
    os.replace(write_temp(path, lambda tmp: tmp.write_bytes(data)), path)
