"""The on-disk variant cache: atomic writes, content hashes, and nothing loaded unverified."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def default_root() -> Path:
    """``$LEANVGG_HOME`` or ``~/.cache/leanvgg``."""
    return Path(os.environ.get("LEANVGG_HOME") or Path.home() / ".cache" / "leanvgg")


# Temporary files older than this are left by killed writers (a live write takes seconds).
STALE_TEMP_SECONDS = 3600
# What every manifest holds, with its type; an entry missing one is treated as corrupt.
MANIFEST_FIELDS = {"key": str, "sha256": str, "bytes": int, "manifest_sha256": str}


# An entry's data file, by suffix: what kind of thing it is.
DATA_KINDS = {".pt": "weights", ".pt2": "package", ".onnx": "converted", ".xml": "converted",
              ".bin": "converted"}

# The documents kept beside the artifacts (``<root>/<name>.report.json``), named here only.
EVALUATION = "evaluation"  # ``leanvgg evaluate``'s latest figures, per variant and artifact
TUNED = "tuned"  # ``leanvgg tune``'s latest choice, registered as the ``tuned`` variant
SEARCH = "tune"  # ``leanvgg tune``'s latest search: every candidate (its resume file)
PROFILES = "profiles"  # the server's latency profiles, per variant and machine
RUNTIME_CHOICES = "runtimes"  # the runtime measured fastest per variant, CPU and versions
SEARCH_PLOT = "tune.png"  # the latest search's Pareto plot


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


class CacheError(Exception):
    """The cache folder cannot be trusted or used; the message says why and what to do."""


def _manifest_digest(manifest: dict) -> str:
    """The hash of a manifest's content, itself excluded: edits to a manifest are detected."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _entry_digest(digests: dict[str, str]) -> str:
    """An entry's content hash: its one file's sha256, or (several files) the hash of theirs."""
    if len(digests) == 1:
        return next(iter(digests.values()))
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def _check_digest(manifest: dict, digest: str) -> None:
    if manifest["sha256"] != digest:
        raise ValueError("content hash does not match its manifest")


def private_root(root: Path) -> Path:
    """``root``, created ``0700`` if missing; refused if another user could write into it.

    The cache holds code-bearing artifacts (weights, compiled kernels), so a folder that
    someone else owns or that everyone may write to could feed this process their files.
    """
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = root.stat()
    except OSError as err:
        raise CacheError(f"Cannot use the cache folder {str(root)!r}: {err.strerror or err}. "
                         "Set LEANVGG_HOME to a folder of your own.") from None
    if info.st_uid != os.getuid():
        raise CacheError(f"The cache folder {str(root)!r} belongs to another user (uid "
                         f"{info.st_uid}); set LEANVGG_HOME to a folder of your own.")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheError(f"The cache folder {str(root)!r} is writable by other users (mode "
                         f"{stat.filemode(info.st_mode)}); run 'chmod go-w {root}' or set "
                         "LEANVGG_HOME to a private folder.")
    return root


class Store:
    """Artifacts as ``<key>.pt`` (a state dict) plus ``<key>.json`` (manifest with its sha256).

    Both files are written in full to temporary files first, hashed, and only then renamed into
    place, weights before manifest. A process killed at any moment leaves the previous complete
    pair, or (between the two renames) new weights whose hash does not match the old manifest,
    which is detected and rebuilt: never a half file that gets loaded.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = private_root(Path(root) if root is not None else default_root())

    def _paths(self, key: str, suffix: str = ".pt") -> tuple[Path, Path]:
        return self.root / f"{key}{suffix}", self.root / f"{key}.json"

    def has(self, key: str) -> bool:
        """Whether an entry (valid or not) exists under ``key``."""
        return self._paths(key)[1].exists()

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the entry's lock: one builder at a time per entry, across processes.

        A second builder waits, then finds the entry made (check with ``load`` inside).
        The kernel drops the lock when its holder dies, so a killed builder blocks nobody.
        """
        fd = os.open(self.root / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def save(self, key: str, state_dict: dict, manifest: dict) -> dict:
        """Store an artifact; returns the manifest as written (with ``bytes`` and ``sha256``).

        Only state dicts are stored this way: they load with ``weights_only=True``, which
        cannot run code (``torch.export.load`` may unpickle arbitrary objects, so programs are
        not). Compiled code goes through ``save_file``.
        """
        def write(path: Path) -> None:
            with path.open("wb") as f:
                torch.save(state_dict, f)

        return self.save_file(key, ".pt", write, manifest)

    def save_file(self, key: str, suffix: str, write: Callable[[Path], object],
                  manifest: dict) -> dict:
        """Store a file that ``write(path)`` makes (e.g. an AOTInductor package), like ``save``.

        Its temporary file keeps the real suffix last: writers such as AOTInductor insist on it.
        """
        return self.save_files(key, (suffix,), lambda paths: write(paths[suffix]), manifest)

    def save_files(self, key: str, suffixes: tuple[str, ...],
                   write: Callable[[dict[str, Path]], object], manifest: dict) -> dict:
        """Store one entry made of several files (OpenVINO's .xml and .bin): ``write`` fills a
        temporary path per suffix; every file is hashed into the one manifest, and the entry is
        loaded, listed and removed as one."""
        self.sweep()
        temps: dict[str, Path] = {}
        try:
            for suffix in suffixes:
                fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}{suffix}.",
                                           suffix=f".tmp{suffix}")
                os.close(fd)
                temps[suffix] = Path(tmp)
            write(temps)
            digests = {}
            for suffix, tmp in temps.items():
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                    f.seek(0)
                    digests[suffix] = hashlib.file_digest(f, "sha256").hexdigest()
            manifest = {**manifest, "key": key, "sha256": _entry_digest(digests),
                        "bytes": sum(os.path.getsize(t) for t in temps.values()),
                        **({"files": digests} if len(suffixes) > 1 else {})}
            manifest["manifest_sha256"] = _manifest_digest(manifest)
            text = json.dumps(manifest, indent=2).encode()
            manifest_tmp = _write_temp(self._paths(key)[1], lambda path: path.write_bytes(text))
        except BaseException:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)
            raise
        for suffix, tmp in temps.items():
            os.replace(tmp, self._paths(key, suffix)[0])
        os.replace(manifest_tmp, self._paths(key)[1])
        return manifest

    def entries(self) -> list[Entry]:
        """Every entry (artifacts and compiled packages; not the documents), newest first."""
        found = []
        for manifest_path in self.root.glob("*.json"):
            if manifest_path.name.endswith(".report.json"):
                continue  # a document (evaluation, tuned choice, search, profiles)
            key = manifest_path.stem
            data = [p for p in self.root.glob(f"{key}.*") if p.suffix in DATA_KINDS]
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

    def remove(self, entry: Entry) -> None:
        """Delete an entry, under its lock (never under a builder's feet). The empty lock file
        stays: deleting it could let two processes hold two locks on one key."""
        with self.lock(entry.key):
            for path in entry.paths:
                path.unlink(missing_ok=True)

    def sweep(self, older_than_s: float = STALE_TEMP_SECONDS) -> list[Path]:
        """Delete temporary files that killed writers left behind; returns what was removed."""
        removed = []
        cutoff = time.time() - older_than_s
        for path in self.root.glob(".*.tmp*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                pass  # another process swept it first
        if removed:
            log.info("Removed %d stale temporary file(s) from %s.", len(removed), self.root)
        return removed

    def load(self, key: str, validate: Callable[[dict], object] | None = None,
             ) -> tuple[dict, dict] | None:
        """``(state_dict, manifest)``, or None when absent or corrupt (corruption is logged).

        The tensors are memory-mapped from the file (clean, shared, evictable pages rather than
        a private copy), through the very file descriptor that was hashed: the folder is
        private and writers only ever replace files, so the bytes hashed are the bytes mapped.
        ``validate`` checks the caller's own manifest fields; whatever it raises marks the entry
        as corrupt.
        """
        def read(paths: dict[str, Path], manifest: dict) -> dict:
            with paths[".pt"].open("rb") as f:
                _check_digest(manifest, hashlib.file_digest(f, "sha256").hexdigest())
                with warnings.catch_warnings():
                    # Emitted by torch itself when it restores quantized tensors; not actionable.
                    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                    warnings.filterwarnings("ignore",
                                            message=".*quantized tensor creation functions")
                    return torch.load(f"/proc/self/fd/{f.fileno()}", map_location="cpu",
                                      weights_only=True, mmap=True)

        return self._load(key, (".pt",), read, validate)

    def load_file(self, key: str, suffix: str, validate: Callable[[dict], object] | None = None,
                  ) -> tuple[Path, dict] | None:
        """``(path, manifest)`` of a file stored by ``save_file`` whose hash checks out, or None
        (absent or corrupt, logged). The folder is private (``private_root``), so the file
        cannot be swapped between this check and its use by anyone but this user."""
        found = self.load_files(key, (suffix,), validate)
        return None if found is None else (found[0][suffix], found[1])

    def load_files(self, key: str, suffixes: tuple[str, ...],
                   validate: Callable[[dict], object] | None = None,
                   ) -> tuple[dict[str, Path], dict] | None:
        """``({suffix: path}, manifest)`` of an entry stored by ``save_files``, every file's
        hash checked, or None (absent or corrupt, logged)."""
        def check(paths: dict[str, Path], manifest: dict) -> dict[str, Path]:
            digests = {}
            for suffix, path in paths.items():
                with path.open("rb") as f:
                    digests[suffix] = hashlib.file_digest(f, "sha256").hexdigest()
            _check_digest(manifest, _entry_digest(digests))
            return paths

        return self._load(key, suffixes, check, validate)

    def _load(self, key: str, suffixes: tuple[str, ...],
              read: Callable[[dict[str, Path], dict], object],
              validate: Callable[[dict], object] | None):
        paths = {suffix: self._paths(key, suffix)[0] for suffix in suffixes}
        data_path, manifest_path = paths[suffixes[0]], self._paths(key)[1]
        if not data_path.exists() and not manifest_path.exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            if not isinstance(manifest, dict):
                raise ValueError("the manifest is not a JSON object")
            for field, kind in MANIFEST_FIELDS.items():
                if not isinstance(manifest.get(field), kind):
                    raise ValueError(f"the manifest lacks a valid {field!r}")
            if manifest["manifest_sha256"] != _manifest_digest(manifest):
                raise ValueError("the manifest was changed after it was written")
            if manifest["key"] != key:
                raise ValueError("the manifest belongs to another entry")
            if validate is not None:
                validate(manifest)
            content = read(paths, manifest)
        except Exception as err:  # any damage means the same thing: rebuild it
            log.warning("Cache entry %s is corrupt or incomplete (%s); rebuilding it.",
                        data_path, err)
            return None
        return content, manifest

    def document(self, name: str) -> Path:
        """Where the document ``name`` (EVALUATION, TUNED, SEARCH, PROFILES) lives."""
        return self.root / f"{name}.report.json"

    def save_json(self, name: str, document: dict) -> None:
        """A small JSON document (e.g. an evaluation report) beside the artifacts, atomically."""
        write_atomic(self.document(name), json.dumps(document, indent=2).encode())

    def update_json(self, name: str, change: Callable[[dict], dict]) -> dict:
        """``change`` the document (``{}`` when absent) and write the result, under the
        document's lock: other processes and threads updating it meanwhile lose nothing."""
        with self.lock(f"{name}.report"):
            document = change(self.load_json(name) or {})
            self.save_json(name, document)
        return document

    def load_json(self, name: str) -> dict | None:
        """The document saved under ``name``, or None when absent or unreadable (logged)."""
        path = self.document(name)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("Ignoring unreadable %s (%s).", path, err)
            return None


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


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: readers see the old or the new file, whole."""
    os.replace(_write_temp(path, lambda tmp: tmp.write_bytes(data)), path)


def _write_temp(path: Path, write: Callable[[Path], object], *, suffix: str = ".tmp") -> str:
    """Have ``write`` fill a hidden temporary file beside ``path`` (given by its path), then
    flush it to disk; the file is removed if writing fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp
