"""The on-disk variant cache: atomic writes, content hashes, and nothing loaded unverified."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

log = logging.getLogger(__name__)


def default_root() -> Path:
    """``$LEANVGG_HOME`` or ``~/.cache/leanvgg``."""
    return Path(os.environ.get("LEANVGG_HOME") or Path.home() / ".cache" / "leanvgg")


class Store:
    """Artifacts as ``<key>.pt`` (a state dict) plus ``<key>.json`` (manifest with its sha256).

    The manifest is written after the state dict, so an interrupted write leaves either the
    previous complete pair or a state dict whose hash no longer matches: never a half file that
    gets loaded.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.pt", self.root / f"{key}.json"

    def save(self, key: str, state_dict: dict, manifest: dict) -> dict:
        """Store an artifact; returns the manifest as written (with ``bytes`` and ``sha256``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        weights_path, manifest_path = self._paths(key)
        _atomic_write(weights_path, lambda f: torch.save(state_dict, f))
        with weights_path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        manifest = {**manifest, "key": key, "sha256": digest,
                    "bytes": weights_path.stat().st_size}
        _atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
        return manifest

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
        _atomic_write(self.root / f"{name}.report.json",
                      lambda f: f.write(json.dumps(document, indent=2).encode()))

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


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
