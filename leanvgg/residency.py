"""Giving back the pages of files a runtime mapped only to copy from.

A loaded model often holds its weights twice: the file the runtime mapped (an AOTInductor
package's shared library, whose constants oneDNN copies into its own blocked layout; an
OpenVINO IR's .bin, which the CPU plugin repacks when it compiles) and the runtime's own copy.
Once the model has run, the mapped pages are read no more, yet they stay resident and count in
the process's memory. ``released`` asks the kernel to reclaim the file-backed pages of the
mappings a load made (``madvise(MADV_PAGEOUT)``): a hint that never loses data (a page that is
read again is read back from the file, and anonymous pages, which hold the runtime's own copy
and anything it wrote, stay), so it is safe whether or not the runtime still reads the file.
Linux only; elsewhere, or on kernels without MADV_PAGEOUT (before 5.4), it does nothing.

An eager model loaded from a memory-mapped state dict holds most of its tensors in the mapping
(they are read on every run: those pages ``keep``), but not all: quantized tensors are copied
out when they are loaded, and a dynamic INT8 Linear's weights are then packed into fbgemm's
own layout; the rest of the mapping is given back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MADV_PAGEOUT = 21  # linux/mman.h
_MAPS = Path("/proc/self/maps")
_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ (\d+)\s+(.*)$")


def file_mappings() -> set[tuple[int, int, str]]:
    """This process's file-backed data mappings (code is left alone): (start, end, path)."""
    try:
        text = _MAPS.read_text()
    except OSError:
        return set()
    found = set()
    for line in text.splitlines():
        match = _LINE.match(line)
        if (match and "x" not in match[3] and int(match[4]) != 0  # inode 0: anonymous
                and match[5].startswith("/")):
            found.add((int(match[1], 16), int(match[2], 16), match[5]))
    return found


@contextmanager
def released(keep: Callable[[], Iterable[torch.Tensor]] = tuple) -> Iterator[None]:
    """Reclaim the file-backed pages of the mappings made inside the block, once it ends
    (put the model's first run inside it, so that what the runtime copies on first use has
    been copied), except the pages holding the storages of the tensors ``keep()`` returns then
    (a model's own parameters, read in place on every run)."""
    before = file_mappings()
    yield
    new = file_mappings() - before
    if new:
        pageout(_without(new, keep()))


def _without(mappings: set[tuple[int, int, str]], tensors: Iterable[torch.Tensor]
             ) -> set[tuple[int, int, str]]:
    """The mappings' ranges less the pages that hold any of the tensors' storages."""
    page = mmap.PAGESIZE
    held = sorted((storage.data_ptr() // page * page,
                   -(-(storage.data_ptr() + storage.nbytes()) // page) * page)
                  for storage in (t.untyped_storage() for t in tensors))
    pieces = set()
    for start, end, path in mappings:
        at = start
        for low, high in held:
            if high <= at or low >= end:
                continue
            if low > at:
                pieces.add((at, low, path))
            at = max(at, high)
        if at < end:
            pieces.add((at, end, path))
    return pieces


def trim() -> None:
    """Give glibc's free heap pages back to the kernel (``malloc_trim(0)``). Loading a model
    frees a lot: the randomly initialised skeleton its weights replace, the copies quantizing
    it made; freed blocks under glibc's mmap threshold stay in the heap, counted in the
    process's memory, until trimmed (measured: 674 MB anonymous after loading the
    ``quantized`` variant, 121 MB once trimmed). glibc only; elsewhere nothing."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def pageout(mappings: set[tuple[int, int, str]]) -> None:
    libc = _libc()
    if libc is None:
        return
    for start, end, path in mappings:
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                        MADV_PAGEOUT) != 0:
            log.debug("madvise(MADV_PAGEOUT) refused for %s (errno %d)", path,
                      ctypes.get_errno())
            return  # an old kernel: no mapping will take it


def _libc():
    if not hasattr(mmap, "MAP_PRIVATE") or not _MAPS.exists():
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc
