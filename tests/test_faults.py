"""Faults: writers killed mid-write, booby-trapped files, and the download's hash check."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision.models._api as torchvision_api

from leanvgg.models import IMAGENET_WEIGHTS, WeightsError, load_baseline
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


class _Payload:
    """Unpickling this runs a command: what a booby-trapped weights file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_in_weights_or_cache_files_never_runs(tmp_path, caplog):
    marker = tmp_path / "pwned"
    trap = tmp_path / "weights.pth"
    torch.save({"features.0.weight": _Payload(marker)}, trap)
    with pytest.raises(WeightsError, match="not a PyTorch state-dict file"):
        load_baseline(str(trap))
    store = Store(tmp_path / "cache")
    store.save("artifact", {"w": torch.ones(3)}, {})
    (tmp_path / "cache" / "artifact.pt").write_bytes(trap.read_bytes())
    manifest = json.loads((tmp_path / "cache" / "artifact.json").read_text())
    manifest["sha256"] = hashlib.sha256(trap.read_bytes()).hexdigest()  # a matching hash, too
    (tmp_path / "cache" / "artifact.json").write_text(json.dumps(manifest))
    assert store.load("artifact") is None and "corrupt" in caplog.text
    assert not marker.exists()


def test_downloaded_weights_keep_torchvisions_hash_check(monkeypatch):
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        raise RuntimeError("stop here")

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", fake_download)
    with pytest.raises(WeightsError):
        load_baseline("imagenet", progress=False)
    (url, kwargs), = calls
    assert url == IMAGENET_WEIGHTS.url and kwargs.get("check_hash") is True
