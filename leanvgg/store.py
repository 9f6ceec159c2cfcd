"""The on-disk variant cache: atomic writes, content hashes, and nothing loaded unverified."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

log = logging.getLogger(__name__)


def default_root() -> Path:
    """``$LEANVGG_HOME`` or ``~/.cache/leanvgg``."""
    return Path(os.environ.get("LEANVGG_HOME") or Path.home() / ".cache" / "leanvgg")


# Temporary files older than this are left by killed writers (a live write takes seconds).
STALE_TEMP_SECONDS = 3600


class Store:
    """Artifacts as ``<key>.pt`` (a state dict) plus ``<key>.json`` (manifest with its sha256).

    Both files are written in full to temporary files first, hashed, and only then renamed into
    place, weights before manifest. A process killed at any moment leaves the previous complete
    pair, or (between the two renames) new weights whose hash does not match the old manifest,
    which is detected and rebuilt: never a half file that gets loaded.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.pt", self.root / f"{key}.json"

    def save(self, key: str, state_dict: dict, manifest: dict) -> dict:
        """Store an artifact; returns the manifest as written (with ``bytes`` and ``sha256``).

        Only state dicts are stored: they load with ``weights_only=True``, which cannot run
        code (``torch.export.load`` may unpickle arbitrary objects, so programs are not).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep()
        weights_path, manifest_path = self._paths(key)
        weights_tmp = _write_temp(weights_path, lambda f: torch.save(state_dict, f))
        try:
            with open(weights_tmp, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            manifest = {**manifest, "key": key, "sha256": digest,
                        "bytes": os.path.getsize(weights_tmp)}
            manifest_tmp = _write_temp(
                manifest_path, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
        except BaseException:
            os.unlink(weights_tmp)
            raise
        os.replace(weights_tmp, weights_path)
        os.replace(manifest_tmp, manifest_path)
        return manifest

    def sweep(self, older_than_s: float = STALE_TEMP_SECONDS) -> list[Path]:
        """Delete temporary files that killed writers left behind; returns what was removed."""
        removed = []
        cutoff = time.time() - older_than_s
        for path in self.root.glob(".*.tmp"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                pass  # another process swept it first
        if removed:
            log.info("Removed %d stale temporary file(s) from %s.", len(removed), self.root)
        return removed

    def load(self, key: str) -> tuple[dict, dict] | None:
        """``(state_dict, manifest)``, or None when absent or corrupt (corruption is logged)."""
        weights_path, manifest_path = self._paths(key)
        if not weights_path.exists() and not manifest_path.exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            with weights_path.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if manifest.get("key") != key or manifest.get("sha256") != digest:
                raise ValueError("content hash does not match its manifest")
            with warnings.catch_warnings():
                # Emitted by torch itself when it restores quantized tensors; not actionable.
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
                state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as err:  # any damage means the same thing: rebuild it
            log.warning("Cache entry %s is corrupt or incomplete (%s); rebuilding it.",
                        weights_path, err)
            return None
        return state_dict, manifest

    def save_json(self, name: str, document: dict) -> None:
        """A small JSON document (e.g. an evaluation report) beside the artifacts, atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / f"{name}.report.json", json.dumps(document, indent=2).encode())

    def load_json(self, name: str) -> dict | None:
        """The document saved under ``name``, or None when absent or unreadable (logged)."""
        path = self.root / f"{name}.report.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("Ignoring unreadable %s (%s).", path, err)
            return None


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: readers see the old or the new file, whole."""
    os.replace(_write_temp(path, lambda f: f.write(data)), path)


def _write_temp(path: Path, write: Callable[[BinaryIO], object]) -> str:
    """Write a hidden temporary file beside ``path``, flushed to disk; removed if writing fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp
