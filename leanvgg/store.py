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
import re
import stat
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from leanvgg.documents import VERIFIED, Documents
from leanvgg.files import flush, new_temp, write_temp

log = logging.getLogger(__name__)


def default_root() -> Path:
    """``$LEANVGG_HOME`` or ``~/.cache/leanvgg``."""
    return Path(os.environ.get("LEANVGG_HOME") or Path.home() / ".cache" / "leanvgg")


# Temporary files older than this are left by killed writers (a live write takes seconds).
STALE_TEMP_SECONDS = 3600
MEASUREMENT_LOCK = ".measurement-slot.lock"  # Store.measuring's lock file, in the root
GENERATION_CHARS = 16  # hex digits of an entry's hash in its data files' names
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


def _identity(info: os.stat_result) -> list[int]:
    """What differs whenever a file's bytes may differ: its device, inode, size, modification
    and change times (writers here only ever replace files, which gives a new inode; writing
    into a file in place sets its mtime and ctime, and no process can set a ctime back short of
    changing the clock)."""
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


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


def _data_name(key: str, sha256: str, suffix: str) -> str:
    """The name of an entry's data file: its content hash in the name, so that a new generation
    never overwrites the file the current manifest names."""
    return f"{key}.{sha256[:GENERATION_CHARS]}{suffix}"


class Store:
    """Artifacts as ``<key>.<generation>.pt`` (a state dict) plus ``<key>.json`` (the manifest,
    with its sha256, naming the data files).

    The data files are written in full to temporary files, hashed and renamed to names that
    carry their hash; then the manifest is replaced, which is the one step that commits the
    entry; only then are the previous generation's files removed. A process killed at any
    moment leaves the previous complete entry or the new one, never a mixture (a generation
    whose manifest never landed is removed by ``sweep``). Entries written before data files
    were named by their hash (``<key>.pt``, a manifest without ``names``) still load.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = private_root(Path(root) if root is not None else default_root())
        self.documents = Documents(self.root, self.lock)  # evaluations, profiles, choices...
        self._claims: dict[str, int] = {}  # key -> the descriptor holding its claim

    def _paths(self, key: str, suffix: str = ".pt") -> tuple[Path, Path]:
        """The legacy data path (before data files carried their hash) and the manifest's."""
        return self.root / f"{key}{suffix}", self.root / f"{key}.json"

    def _data_paths(self, key: str, manifest: dict, suffixes: tuple[str, ...],
                    ) -> dict[str, Path]:
        """The data files a manifest names (checked: exactly the names its hash gives), or the
        legacy ``<key><suffix>`` of a manifest that names none."""
        names = manifest.get("names")
        if names is None:
            return {suffix: self._paths(key, suffix)[0] for suffix in suffixes}
        expected = {suffix: _data_name(key, manifest["sha256"], suffix) for suffix in suffixes}
        if names != expected:
            raise ValueError("the manifest names other data files than its hash gives")
        return {suffix: self.root / name for suffix, name in names.items()}

    def _generations(self, key: str) -> list[Path]:
        """Every data file of ``key``'s entry on disk, of any generation (legacy included)."""
        pattern = re.compile(rf"{re.escape(key)}(\.[0-9a-f]{{{GENERATION_CHARS}}})?\.[a-z0-9]+")
        return [path for path in self.root.glob(f"{key}.*")
                if path.suffix != ".json" and pattern.fullmatch(path.name)]

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

    def claim(self, key: str) -> bool:
        """Take ``key`` for this store object until ``release_claims`` (or the process ends):
        True when it is ours (now, or already), False while another holds it. Builder
        processes working side by side split their variants this way: each builds the next
        one nobody has claimed. The kernel drops a claim when its holder dies."""
        if key in self._claims:
            return True
        fd = os.open(self.root / f".claim.{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._claims[key] = fd
        return True

    def release_claims(self) -> None:
        """Let go of every claim this store object holds."""
        for fd in self._claims.values():
            os.close(fd)
        self._claims.clear()

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
            sha256 = _entry_digest(digests)
            manifest = {**manifest, "key": key, "sha256": sha256,
                        "bytes": sum(os.path.getsize(t) for t in temps.values()),
                        "names": {suffix: _data_name(key, sha256, suffix) for suffix in suffixes},
                        **({"files": digests} if len(suffixes) > 1 else {})}
            manifest["manifest_sha256"] = _manifest_digest(manifest)
            text = json.dumps(manifest, indent=2).encode()
            manifest_tmp = write_temp(self._paths(key)[1], lambda path: path.write_bytes(text))
        except BaseException:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)
            raise
        for suffix, tmp in temps.items():  # the new generation, beside the current one
            os.replace(tmp, self.root / manifest["names"][suffix])
        os.replace(manifest_tmp, self._paths(key)[1])  # the commit
        current = {self.root / name for name in manifest["names"].values()}
        for path in self._generations(key):
            if path not in current:
                path.unlink(missing_ok=True)
        return manifest

    def sweep(self, older_than_s: float = STALE_TEMP_SECONDS) -> list[Path]:
        """Delete what killed writers left behind: temporary files, and data files that no
        manifest names (a generation whose manifest never landed, or the previous one when the
        writer died before removing it); returns what was removed."""
        removed = []
        cutoff = time.time() - older_than_s
        for path in [*self.root.glob(".*.tmp*"), *self._unnamed()]:
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                pass  # another process swept it first
        if removed:
            log.info("Removed %d stale temporary file(s) from %s.", len(removed), self.root)
        return removed

    def _unnamed(self) -> list[Path]:
        """Data files of a hashed generation that their entry's manifest does not name."""
        found = []
        for path in self.root.glob(f"*.{'[0-9a-f]' * GENERATION_CHARS}.*"):
            key = path.name.split(".")[0]
            try:
                names = json.loads(self._paths(key)[1].read_text()).get("names") or {}
            except (OSError, ValueError, AttributeError):
                names = {}  # no readable manifest: nothing names it
            if path.name not in names.values():
                found.append(path)
        return found

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
                _check_digest(manifest, self._digest(f))
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
                    digests[suffix] = self._digest(f)
            _check_digest(manifest, _entry_digest(digests))
            return paths

        return self._load(key, suffixes, check, validate)

    def _digest(self, f) -> str:
        """The sha256 of the open data file ``f``: read in full the first time, and then each
        time the file is not the very same one (``_identity``) as when it was last read; in
        between, the hash recorded then (the ``verified`` document). A warm start reads none
        of the 2 GB its variants' files hold, and still loads nothing whose hash was never
        checked against its manifest: the recorded hash is of these very bytes, and the
        manifest check that follows is the same either way."""
        identity = _identity(os.fstat(f.fileno()))
        stamp = self.documents.remember(
            VERIFIED, os.path.basename(f.name),
            lambda: {"identity": identity, "sha256": hashlib.file_digest(f, "sha256").hexdigest()},
            holds=lambda known: isinstance(known, dict) and known.get("identity") == identity,
            keep=lambda other: (self.root / other).exists())  # stamps of removed files go
        return str(stamp.get("sha256"))

    def manifest(self, key: str, suffixes: tuple[str, ...] = (".pt",)) -> dict | None:
        """The checked manifest of an entry, its files present but not hashed (for what the
        manifest alone says; loading the entry checks its files), or None."""
        found = self._load(key, suffixes,
                           lambda paths, manifest: [path.stat() for path in paths.values()], None)
        return None if found is None else found[1]

    def _load(self, key: str, suffixes: tuple[str, ...],
              read: Callable[[dict[str, Path], dict], object],
              validate: Callable[[dict], object] | None):
        manifest_path = self._paths(key)[1]
        if not manifest_path.exists() and not self._generations(key):
            return None
        for _ in range(10):  # a writer replaced the entry between its manifest and its files
            before = _stat_id(manifest_path)
            try:
                return self._read(key, suffixes, read, validate)
            except Exception as err:  # any damage means the same thing: rebuild it
                if _stat_id(manifest_path) != before:
                    continue
                log.warning("Cache entry %s is corrupt or incomplete (%s); rebuilding it.",
                            manifest_path.with_suffix(""), err)
                return None
        return None

    def _read(self, key: str, suffixes: tuple[str, ...],
              read: Callable[[dict[str, Path], dict], object],
              validate: Callable[[dict], object] | None) -> tuple[object, dict]:
        manifest = json.loads(self._paths(key)[1].read_text())
        if not isinstance(manifest, dict):
            raise ValueError("the manifest is not a JSON object")
        for field, kind in MANIFEST_FIELDS.items():
            if not isinstance(manifest.get(field), kind):
                raise ValueError(f"the manifest lacks a valid {field!r}")
        if manifest["manifest_sha256"] != _manifest_digest(manifest):
            raise ValueError("the manifest was changed after it was written")
        if manifest["key"] != key:
            raise ValueError("the manifest belongs to another entry")
        paths = self._data_paths(key, manifest, suffixes)
        if validate is not None:
            validate(manifest)
        return read(paths, manifest), manifest


def _stat_id(path: Path) -> tuple[int, int] | None:
    """What changes when a file is replaced (its inode and change time), or None if absent."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns
