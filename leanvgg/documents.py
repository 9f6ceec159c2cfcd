"""The JSON documents kept beside the cache's artifacts (``<root>/<name>.report.json``):
evaluations, tune's choice and search, latency profiles, runtime choices. Named here only."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from leanvgg.files import write_atomic

log = logging.getLogger(__name__)

EVALUATION = "evaluation"  # ``leanvgg evaluate``'s latest figures, per variant and artifact
TUNED = "tuned"  # ``leanvgg tune``'s latest choice, registered as the ``tuned`` variant
SEARCH = "tune"  # ``leanvgg tune``'s latest search: every candidate (its resume file)
PROFILES = "profiles"  # the server's latency profiles, per variant and machine
RUNTIME_CHOICES = "runtimes"  # the runtime measured fastest per variant, CPU and versions
LABELS = "labels"  # the class names last given per set of weights (leanvgg.labels)
MACS = "macs"  # each eager artifact's multiply-accumulates per input size (leanvgg.builder)
VERIFIED = "verified"  # each data file's sha256 as last read in full, by file identity (store)
SEARCH_PLOT = "tune.png"  # the latest search's Pareto plot
SUFFIX = ".report.json"

T = TypeVar("T")


class Documents:
    """Small JSON documents in ``root``, each written atomically and updated under a lock
    (``lock(name)``: the store's per-entry lock, shared across processes)."""

    def __init__(self, root: Path,
                 lock: Callable[[str], contextlib.AbstractContextManager]) -> None:
        self.root = root
        self._lock = lock

    def path(self, name: str) -> Path:
        """Where the document ``name`` (EVALUATION, TUNED, SEARCH, PROFILES, ...) lives."""
        return self.root / f"{name}{SUFFIX}"

    def save(self, name: str, document: dict) -> None:
        """Replace the document, atomically."""
        write_atomic(self.path(name), json.dumps(document, indent=2).encode())

    def update(self, name: str, change: Callable[[dict], dict]) -> dict:
        """``change`` the document (``{}`` when absent) and write the result, under the
        document's lock: other processes and threads updating it meanwhile lose nothing."""
        with self._lock(f"{name}.report"):
            document = change(self.load(name) or {})
            self.save(name, document)
        return document

    def remember(self, name: str, key: str, compute: Callable[[], T], *,
                 holds: Callable[[object], bool],
                 keep: Callable[[str], bool] = lambda key: True) -> T:
        """The value recorded under ``key`` in the document ``name``, where ``holds`` accepts
        it; else ``compute()``'s, recorded (with the other entries ``keep`` accepts) and
        returned. A value that cannot be recorded (a full or read-only disk) is still
        returned, and computed again next time."""
        known = (self.load(name) or {}).get(key)
        if holds(known):
            return known
        value = compute()
        try:
            self.update(name, lambda entries: {
                **{k: v for k, v in entries.items() if keep(k)}, key: value})
        except OSError as err:
            log.debug("Cannot record %s in %s (%s).", key, name, err)
        return value

    def load(self, name: str) -> dict | None:
        """The document saved under ``name``, or None when absent or unreadable (logged)."""
        path = self.path(name)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("Ignoring unreadable %s (%s).", path, err)
            return None
