"""Processes killed with SIGKILL in the middle of cache writes never leave a loadable half file."""

import os
import signal
import subprocess
import sys
import time

import torch

from leanvgg.store import Store

# A child that rewrites one artifact forever, each generation a tensor filled with its number.
_WRITER = """
import sys, torch
from leanvgg.store import Store
store = Store(sys.argv[1])
generation = 1
print("writing", flush=True)
while True:
    store.save("artifact", {"w": torch.full((25_000_000,), float(generation))},
               {"generation": generation})
    generation += 1
"""


def _consistent(store: Store) -> int:
    state_dict, manifest = store.load("artifact")
    w = state_dict["w"]
    assert w.numel() == 25_000_000 and bool((w == w[0]).all())
    assert manifest["generation"] == int(w[0])  # weights and manifest of one generation
    return manifest["generation"]


def test_sigkill_at_any_moment_of_a_write_leaves_a_consistent_entry(tmp_path):
    store = Store(tmp_path)
    store.save("artifact", {"w": torch.zeros(25_000_000)}, {"generation": 0})
    killed_mid_write = 0
    for delay in (0.3, 0.9, 1.7, 2.6):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "writing"
        time.sleep(delay)
        temporaries = list(tmp_path.glob(".*.tmp"))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        killed_mid_write += bool(temporaries)
        _consistent(store)  # the previous or a later complete generation, never a mixture
    assert killed_mid_write >= 1  # at least one kill landed inside a write
    leftovers = list(tmp_path.glob(".*.tmp"))
    assert sorted(store.sweep(older_than_s=0)) == sorted(leftovers)
    assert not list(tmp_path.glob(".*.tmp"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact.json", "artifact.pt"]
    _consistent(store)


def test_fresh_temporaries_are_not_swept(tmp_path):
    store = Store(tmp_path)
    live = tmp_path / ".artifact.pt.abc.tmp"
    live.write_bytes(b"another process is writing this")
    stale = tmp_path / ".other.pt.def.tmp"
    stale.write_bytes(b"left by a killed writer")
    hour_ago = time.time() - 2 * 3600
    os.utime(stale, (hour_ago, hour_ago))
    assert store.sweep() == [stale]
    assert live.exists() and not stale.exists()
