"""Mapped files' pages given back after a load (leanvgg.residency), data intact."""

import mmap
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from leanvgg.residency import file_mappings, released

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc")


def resident_kb(address: int) -> int:
    """Rss of the mapping that holds ``address``, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        match = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if match:
            inside = int(match[1], 16) <= address < int(match[2], 16)
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError("no such mapping")


def test_a_file_mapped_inside_the_block_is_given_back_and_still_reads_the_same(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 32 * 2**20, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    path.write_bytes(data.tobytes())
    kept = mmap.mmap(-1, 8 * 2**20)  # anonymous: what a runtime copies the weights into
    with open(path, "rb") as f, released():
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        view = np.frombuffer(mapped, dtype=np.uint8)
        kept[:] = view[:8 * 2**20].tobytes()  # touches the copied part: resident now
        checksum = int(view.sum())  # touches every page
        address = view.ctypes.data
        assert resident_kb(address) > 30 * 1024
    assert resident_kb(address) < 4 * 1024  # given back
    assert int(view.sum()) == checksum == int(data.sum())  # read back from the file
    assert bytes(kept[:1024]) == data[:1024].tobytes()  # the anonymous copy untouched
    del view
    mapped.close()


def test_mappings_made_before_the_block_are_left_alone(tmp_path):
    path = tmp_path / "other.bin"
    path.write_bytes(b"\x01" * 8 * 2**20)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        view = np.frombuffer(mapped, dtype=np.uint8)
        assert int(view.sum()) == 8 * 2**20
        assert any(p == str(path) for _, _, p in file_mappings())
        with released():
            pass
        assert resident_kb(view.ctypes.data) > 7 * 1024
        del view
        mapped.close()
