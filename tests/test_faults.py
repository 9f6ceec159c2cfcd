"""Faults: writers killed mid-write, booby-trapped files, and the download's hash check."""

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torchvision.models._api as torchvision_api

from leanvgg.models import IMAGENET_WEIGHTS, WeightsError, load_baseline
from leanvgg.store import CacheError, Store, _manifest_digest
from leanvgg.variants import build_variants
from tiny import tiny_baseline

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


@pytest.mark.slow
def test_sigkill_at_any_moment_of_a_write_leaves_a_consistent_entry(tmp_path):
    store = Store(tmp_path)
    store.save("artifact", {"w": torch.zeros(25_000_000)}, {"generation": 0})
    killed_mid_write = 0
    for delay in (0.3, 0.9, 1.7, 2.6):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "writing"
        time.sleep(delay)
        temporaries = list(tmp_path.glob(".*.tmp*"))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        killed_mid_write += bool(temporaries)
        _consistent(store)  # the previous or a later complete generation, never a mixture
    assert killed_mid_write >= 1  # at least one kill landed inside a write
    named = set(json.loads((tmp_path / "artifact.json").read_text())["names"].values())
    kept = named | {"artifact.json", "verified.report.json", ".verified.report.lock"}
    leftovers = [p for p in tmp_path.iterdir() if p.name not in kept]
    assert sorted(store.sweep(older_than_s=0)) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    _consistent(store)


def _generation(store: Store) -> int:
    state_dict, manifest = store.load("artifact")
    assert bool((state_dict["w"] == manifest["generation"]).all())
    return manifest["generation"]


def test_a_writer_killed_before_its_manifest_landed_leaves_the_previous_entry(tmp_path,
                                                                              monkeypatch):
    store = Store(tmp_path)
    store.save("artifact", {"w": torch.full((1000,), 1.0)}, {"generation": 1})
    real_replace = os.replace

    def killed_at_the_commit(source, target):
        if str(target).endswith("artifact.json"):
            raise KeyboardInterrupt  # the new data file is in place, its manifest is not
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_at_the_commit)
    with pytest.raises(KeyboardInterrupt):
        store.save("artifact", {"w": torch.full((1000,), 2.0)}, {"generation": 2})
    monkeypatch.undo()
    assert _generation(store) == 1  # the new weights never pass for the old manifest's
    orphans = [p.name for p in store.sweep(older_than_s=0)]
    assert len(orphans) == 2 and {Path(name).suffix for name in orphans} == {".pt", ".tmp"}
    assert _generation(store) == 1
    store.save("artifact", {"w": torch.full((1000,), 3.0)}, {"generation": 3})
    assert _generation(store) == 3 and len(list(tmp_path.glob("artifact.*.pt"))) == 1


def test_readers_beside_a_writer_always_load_one_whole_generation(tmp_path, caplog):
    store = Store(tmp_path)
    store.save("artifact", {"w": torch.full((200_000,), 0.0)}, {"generation": 0})
    done = threading.Event()

    def write():
        for generation in range(1, 40):
            store.save("artifact", {"w": torch.full((200_000,), float(generation))},
                       {"generation": generation})
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen = []
    while not done.is_set():
        seen.append(_generation(Store(tmp_path)))
    writer.join()
    assert seen == sorted(seen) and len(set(seen)) > 1  # it moved on, and never back
    assert "corrupt" not in caplog.text


def test_an_entry_written_before_data_files_carried_their_hash_still_loads(tmp_path):
    store = Store(tmp_path)
    store.save("artifact", {"w": torch.ones(3)}, {"generation": 1})
    data, = tmp_path.glob("artifact.*.pt")
    data.rename(tmp_path / "artifact.pt")  # the previous layout: <key>.pt, no names
    manifest = json.loads((tmp_path / "artifact.json").read_text())
    del manifest["names"]
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (tmp_path / "artifact.json").write_text(json.dumps(manifest))
    assert _generation(store) == 1
    store.save("artifact", {"w": torch.full((3,), 2.0)}, {"generation": 2})
    assert _generation(store) == 2 and not (tmp_path / "artifact.pt").exists()


def test_a_manifest_naming_a_file_outside_its_entry_is_refused(tmp_path, caplog):
    store = Store(tmp_path)
    store.save("artifact", {"w": torch.ones(3)}, {})
    store.save("other", {"w": torch.zeros(3)}, {})
    manifest = json.loads((tmp_path / "artifact.json").read_text())
    other = json.loads((tmp_path / "other.json").read_text())
    manifest.update(sha256=other["sha256"], names=other["names"])  # another entry's file
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (tmp_path / "artifact.json").write_text(json.dumps(manifest))
    assert store.load("artifact") is None and "other data files" in caplog.text


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
    with pytest.raises(WeightsError, match=r"refused by torch.load\(weights_only=True\)"):
        load_baseline(str(trap))
    store = Store(tmp_path / "cache")
    store.save("artifact", {"w": torch.ones(3)}, {})
    (tmp_path / "cache" / "artifact.pt").write_bytes(trap.read_bytes())
    manifest = json.loads((tmp_path / "cache" / "artifact.json").read_text())
    manifest["sha256"] = hashlib.sha256(trap.read_bytes()).hexdigest()  # a matching hash, too
    manifest["manifest_sha256"] = _manifest_digest(manifest)  # and a manifest that checks out
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


def _tiny_entry(tmp_path):
    """A tiny baseline with its quantized variant built into a fresh cache."""
    store = Store(tmp_path / "cache")
    built = build_variants(tiny_baseline(), ["quantized"], store=store, progress=False)
    key = built.variants["quantized"].artifact
    return store, key, tmp_path / "cache" / f"{key}.json"


@pytest.mark.parametrize("damage", ["delete layout", "delete facts", "edit a fact",
                                    "delete sha256", "not an object", "bad layout"])
def test_a_damaged_manifest_is_rebuilt_not_a_traceback(tmp_path, caplog, damage):
    store, key, path = _tiny_entry(tmp_path)
    manifest = json.loads(path.read_text())
    if damage == "delete layout":
        del manifest["layout"]
    elif damage == "delete facts":
        del manifest["facts"]
    elif damage == "edit a fact":
        manifest["facts"]["params"] = 1  # still well-formed: only the manifest hash sees it
    elif damage == "delete sha256":
        del manifest["sha256"]
    elif damage == "not an object":
        manifest = [manifest]
    else:
        manifest["layout"]["cfg"] = ["x"]
    if isinstance(manifest, dict) and damage in ("delete layout", "delete facts", "bad layout"):
        manifest["manifest_sha256"] = _manifest_digest(manifest)  # only the schema check sees it
    path.write_text(json.dumps(manifest))
    rebuilt = build_variants(tiny_baseline(), ["quantized"], store=store, progress=False)
    assert rebuilt.variants["quantized"].artifact == key
    assert "rebuilding it" in caplog.text
    assert store.load(key) is not None  # and the entry is whole again


@pytest.mark.slow
def test_two_processes_building_one_entry_build_it_once(tmp_path):
    script = textwrap.dedent("""
        import logging, sys
        sys.path.insert(0, sys.argv[2])
        logging.basicConfig(level=logging.INFO)
        from leanvgg.store import Store
        from leanvgg.variants import build_variants
        from tiny import tiny_baseline
        build_variants(tiny_baseline(), ["int8_static"], store=Store(sys.argv[1]), progress=False)
    """)
    command = [sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parent)]
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [run.communicate(timeout=600)[1] for run in runs]
    assert all(run.returncode == 0 for run in runs), logs
    built = sum(log.count("Building int8_static") for log in logs)
    assert built == 1, logs  # the other waited on the entry's lock, then loaded it
    assert sum(log.count("Compiling int8_static") for log in logs) == 1, logs  # its package too
    assert sum(log.count("Loaded int8_static's compiled package") for log in logs) == 2


def test_the_cache_folder_is_private_and_foreign_ones_are_refused(tmp_path):
    home = tmp_path / "home"
    Store(home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(CacheError, match="writable by other users"):
        Store(shared)
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    if os.getuid() == 0:  # CI runs as root: give the folder away instead
        os.chown(foreign, 12345, 12345)
    else:
        foreign = Path("/")  # root's
    with pytest.raises(CacheError, match="another user"):
        Store(foreign)


def _counting_hashes(monkeypatch) -> list[str]:
    """The names of the files hashed in full from now on."""
    hashed, real = [], hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest",
                        lambda f, digest: hashed.append(Path(f.name).name) or real(f, digest))
    return hashed


def test_a_file_is_hashed_in_full_once_until_it_changes(tmp_path, monkeypatch, caplog):
    Store(tmp_path).save("artifact", {"w": torch.arange(100_000.0)}, {"generation": 1})
    Store(tmp_path).save_files("converted", (".xml", ".bin"), lambda paths: [
        path.write_bytes(path.suffix.encode() * 1000) for path in paths.values()], {})
    hashed = _counting_hashes(monkeypatch)
    for _ in range(3):  # a fresh store each time, as each process start opens its own
        assert Store(tmp_path).load("artifact")[0]["w"].equal(torch.arange(100_000.0))
        assert Store(tmp_path).load_files("converted", (".xml", ".bin")) is not None
    assert len(hashed) == 3 and len(set(hashed)) == 3  # .pt, .xml, .bin: each read once
    # one byte changed in place, then its modification time set back: the change time moved,
    # so the file is read again and its hash no longer matches the manifest
    data, = tmp_path.glob("artifact.*.pt")
    info = data.stat()
    with data.open("r+b") as f:
        f.seek(info.st_size // 2)
        byte = f.read(1)
        f.seek(info.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(data, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert data.stat().st_size == info.st_size and data.stat().st_mtime_ns == info.st_mtime_ns
    assert Store(tmp_path).load("artifact") is None
    assert hashed[-1] == data.name and "content hash does not match" in caplog.text
    # a replaced file (a new inode) is read again, too, and a good one is trusted again after
    Store(tmp_path).save("artifact", {"w": torch.ones(10)}, {"generation": 2})
    before = len(hashed)
    assert Store(tmp_path).load("artifact")[1]["generation"] == 2
    assert Store(tmp_path).load("artifact")[1]["generation"] == 2
    assert len(hashed) == before + 1
    stamps = json.loads((tmp_path / "verified.report.json").read_text())
    assert sorted(stamps) == sorted(p.name for p in tmp_path.iterdir()  # the removed
                                    if p.suffix in (".pt", ".xml", ".bin"))  # generation dropped
