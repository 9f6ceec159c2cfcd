"""Mapped files' pages given back after a load (leanvgg.residency), data intact."""

import mmap
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import torch

from leanvgg.builder import Builder, stored_baseline
from leanvgg.models import Baseline, from_layout
from leanvgg.recipes import RECIPES
from leanvgg.residency import file_mappings, released
from leanvgg.store import Store
from tiny import TINY_LAYOUT, tiny_baseline

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


def test_pages_of_the_tensors_kept_stay_resident(tmp_path):
    data = np.arange(16 * 2**20, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    path.write_bytes(data.tobytes())
    kept = []  # what keep() returns when the block ends
    with open(path, "rb") as f, released(keep=lambda: kept):
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        view = np.frombuffer(mapped, dtype=np.uint8)
        with warnings.catch_warnings():  # read-only memory: it is never written here
            warnings.simplefilter("ignore", UserWarning)
            kept.append(torch.from_numpy(view[4 * 2**20:8 * 2**20]))  # read in place
        int(view.sum())
    assert 4 * 1024 <= resident_kb(view.ctypes.data) < 4 * 1024 + 64  # only the kept 4 MB
    assert int(kept[0].sum()) == int(data[4 * 2**20:8 * 2**20].sum())
    del view
    kept.clear()
    mapped.close()


def test_a_loaded_dynamic_int8_model_gives_back_the_weights_it_packed(tmp_path):
    """torch.ao packs a dynamic INT8 Linear's weights into fbgemm's layout when they are
    loaded: their pages of the mapped state dict are read no more and are given back, while
    the convs' FP32 weights (read in place) stay mapped and the outputs are unchanged. (A
    head of 2,048: the kernel reclaims whole folios, which a tiny file does not span.)"""
    torch.manual_seed(0)
    wide = Baseline(from_layout({**TINY_LAYOUT, "linear_features": [32 * 7 * 7, 2048, 2048,
                                                                    1000]}).eval(),
                    "wide", "wide-seed0", meaningful=False)
    recipe = RECIPES["quantized"]
    built = Builder(wide, Store(tmp_path)).variant(recipe, compiled=False)
    loaded = Builder(wide, Store(tmp_path), load_only=True).variant(recipe, compiled=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), built.model(x), rtol=0, atol=0)
    resident = resident_kb(loaded.model.features[0].weight.data_ptr()) * 1024
    convs = sum(p.numel() * 4 for p in loaded.model.parameters())  # FP32, read in place
    linears = sum(m.weight().numel() for m in loaded.model.classifier  # INT8, packed
                  if hasattr(m, "_packed_params"))
    assert linears > 8 * 2**20 and convs < 2**20
    assert convs * 0.9 <= resident < convs + 2 * 2**20


def test_the_baseline_is_mapped_from_the_store_once_saved(tmp_path):
    """The server's and its builder process's baseline: the same weights, read from one file
    (shared page cache) instead of a private copy in each process."""
    baseline = tiny_baseline()
    store = Store(tmp_path)
    mapped = stored_baseline(baseline, store)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(mapped.model(x), baseline.model(x), rtol=0, atol=0)
    ranges = [(start, end) for start, end, _ in file_mappings()]
    assert all(any(start <= p.data_ptr() < end for start, end in ranges)
               for p in mapped.model.parameters())
    assert (mapped.weights_id, mapped.labels) == (baseline.weights_id, baseline.labels)
    files = sorted(tmp_path.glob("*.pt"))
    again = stored_baseline(tiny_baseline(), store)  # a later start: loaded, not written
    assert sorted(tmp_path.glob("*.pt")) == files and len(files) == 1
    with torch.inference_mode():
        torch.testing.assert_close(again.model(x), baseline.model(x), rtol=0, atol=0)
