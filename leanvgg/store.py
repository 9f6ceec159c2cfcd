"""The on-disk variant cache: atomic writes, content hashes, and nothing loaded unverified.

The documents beside the entries are ``leanvgg.documents``'s (``Store.documents``); listing and
removing entries is ``leanvgg.cache``'s."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from leanvgg.documents import Documents
from leanvgg.files import flush, new_temp, write_temp

log = logging.getLogger(__name__)


def default_root() -> Path:
    """``$LEANVGG_HOME`` or ``~/.cache/leanvgg``."""
    return Path(os.environ.get("LEANVGG_HOME") or Path.home() / ".cache" / "leanvgg")


# Temporary files older than this are left by killed writers (a live write takes seconds).
STALE_TEMP_SECONDS = 3600
MEASUREMENT_LOCK = ".measurement-slot.lock"  # Store.measuring's lock file, in the root
# What every manifest holds, with its type; an entry missing one is treated as corrupt.
MANIFEST_FIELDS = {"key": str, "sha256": str, "bytes": int, "manifest_sha256": str}


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


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
        self.documents = Documents(self.root, self.lock)  # evaluations, profiles, choices...

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

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Hold the machine's timing lock for this store (``flock`` on one file in its root):
        the server's measurement slot and a builder process timing runtimes both take it, so
        no two timings overlap; the kernel drops it when its holder dies."""
        fd = os.open(self.root / MEASUREMENT_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

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
                temps[suffix] = new_temp(self._paths(key, suffix)[0], f".tmp{suffix}")
            write(temps)
            digests = {}
            for suffix, tmp in temps.items():
                flush(tmp)
                digests[suffix] = _file_digest(tmp)
            manifest = {**manifest, "key": key, "sha256": _entry_digest(digests),
                        "bytes": sum(os.path.getsize(t) for t in temps.values()),
                        **({"files": digests} if len(suffixes) > 1 else {})}
            manifest["manifest_sha256"] = _manifest_digest(manifest)
            text = json.dumps(manifest, indent=2).encode()
            manifest_tmp = write_temp(self._paths(key)[1], lambda path: path.write_bytes(text))
        except BaseException:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)
            raise
        for suffix, tmp in temps.items():
            os.replace(tmp, self._paths(key, suffix)[0])
        os.replace(manifest_tmp, self._paths(key)[1])
        return manifest

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
            _check_digest(manifest, _entry_digest(
                {suffix: _file_digest(path) for suffix, path in paths.items()}))
            return paths

        return self._load(key, suffixes, check, validate)

    def manifest(self, key: str, suffixes: tuple[str, ...] = (".pt",)) -> dict | None:
        """The checked manifest of an entry, its files present but not hashed (for what the
        manifest alone says; loading the entry checks its files), or None."""
        found = self._load(key, suffixes, lambda paths, manifest: None, None)
        return None if found is None else found[1]

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
