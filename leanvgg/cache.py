"""Administering the cache (``leanvgg cache list|clear``): its entries as people see them, and
their removal. Reading and writing entries is ``leanvgg.store``'s."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from leanvgg.documents import SUFFIX as DOCUMENT_SUFFIX
from leanvgg.store import Store

# An entry's data file, by suffix: what kind of thing it is.
DATA_KINDS = {".pt": "weights", ".pt2": "package", ".onnx": "converted", ".xml": "converted",
              ".bin": "converted"}


@dataclass(frozen=True)
class Entry:
    """One cache entry as ``leanvgg cache list`` shows it."""

    key: str
    recipe: str  # the recipe that built it ("?" when the manifest is unreadable)
    kind: str  # "weights" (a state dict), "package" (compiled code) or "converted" (ONNX, IR)
    bytes: int  # data and manifest together
    modified: float  # when it was written (seconds since the epoch)
    built_from: str  # the step applied and the entry it was applied to, or what was compiled
    paths: tuple[Path, ...]


def entries(store: Store) -> list[Entry]:
    """Every entry (artifacts, compiled packages, converted models; not the documents), newest
    first."""
    found = []
    for manifest_path in store.root.glob("*.json"):
        if manifest_path.name.endswith(DOCUMENT_SUFFIX):
            continue  # a document (evaluation, tuned choice, search, profiles)
        key = manifest_path.stem
        data = [p for p in store.root.glob(f"{key}.*") if p.suffix in DATA_KINDS]
        try:
            manifest = json.loads(manifest_path.read_text())
            recipe = str(manifest.get("recipe", "?"))
            if "step" in manifest:
                step = manifest["step"] or {}
                built_from = f"{step.get('op', '?')} on {str(manifest.get('previous'))[:8]}"
            else:
                made = "converted" if "converted" in manifest else "compiled"
                built_from = f"{made} from {str(manifest.get('artifact'))[:8]}"
        except (OSError, ValueError, AttributeError):
            recipe, built_from = "?", "unreadable manifest"
        paths = (manifest_path, *data)
        kinds = {DATA_KINDS[p.suffix] for p in data}
        found.append(Entry(key, recipe, kinds.pop() if len(kinds) == 1 else "?",
                           sum(_size(p) for p in paths), _mtime(manifest_path), built_from,
                           paths))
    return sorted(found, key=lambda e: -e.modified)


def remove(store: Store, entry: Entry) -> None:
    """Delete an entry, under its lock (never under a builder's feet). The empty lock file
    stays: deleting it could let two processes hold two locks on one key."""
    with store.lock(entry.key):
        for path in entry.paths:
            path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
