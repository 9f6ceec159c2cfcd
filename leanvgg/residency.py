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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
def released() -> Iterator[None]:
    """Reclaim the file-backed pages of the mappings made inside the block, once it ends
    (put the model's first run inside it, so that what the runtime copies on first use has
    been copied)."""
    before = file_mappings()
    yield
    new = file_mappings() - before
    if new:
        pageout(new)


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
