import importlib.resources
import io
import os
import shutil
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from leanvgg.models import load_baseline
from leanvgg.store import Store
from leanvgg.variants import build_variants, default_names

PHOTO = Path(str(importlib.resources.files("skimage.data") / "chelsea.png"))  # a real cat photo


def pytest_report_header(config) -> str:
    """The free disk where the tests write: when a run dies of ENOSPC, its log says why."""
    folder = tempfile.gettempdir()
    return f"leanvgg: {shutil.disk_usage(folder).free / 2**30:.1f} GiB free in {folder}"


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cifar_files(monkeypatch):
    """Let torchvision read the tiny CIFAR folders tests write: its md5 check (which guards real
    CIFAR-10 copies) cannot match them."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: True)


@pytest.fixture(scope="session")
def photo_path() -> Path:
    return PHOTO


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    return Image.open(PHOTO).convert("RGB")


@pytest.fixture(scope="session")
def baseline():
    return load_baseline("random", progress=False)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The session's cache. xdist's workers share one, in the run's folder (removed with it):
    the store is made for several processes (claims, entry locks), so ``variant_set`` is built
    once, by whichever builder process claims each variant first."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.mktemp("leanvgg-cache")
    shared = tmp_path_factory.getbasetemp().parent / "leanvgg-cache"
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture(scope="session")
def variant_set(baseline, cache_dir):
    """Every default variant built once from random weights into a session-wide cache, by the
    server's builder process (with its helper: two variants at a time), then loaded here."""
    from leanvgg.service import worker

    argv = worker.command(baseline, default_names(), threads=1, runtime="inductor",
                          calibration=None)
    events = list(worker.run(argv, cache_dir, threading.Event()))
    assert sorted(e.variant for e in events if e.state == worker.BUILT) == sorted(
        default_names()), events
    return build_variants(baseline, store=Store(cache_dir), progress=False, threads=1)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@contextmanager
def running(server):
    """Run a waitress server in a thread; stop it from inside its own loop (closing its
    sockets from another thread races with the loop's select)."""
    from waitress import wasyncore

    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        thread.join(timeout=10)
        server.task_dispatcher.shutdown()


def multipart(data: bytes, filename: str = "upload") -> tuple[bytes, str]:
    """A multipart/form-data body holding ``data`` in the field ``image``, and its type."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    return body + data + f"\r\n--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def pytest_configure(config) -> None:
    """Under xdist (``make test``), the workers (and the servers and builder processes they
    start) share the cores, each computing on all of them: OpenMP's threads then sleep at a
    barrier instead of spinning. Spinning, two processes of two threads each on two cores took
    12.9 s for what took 3.9 s with sleeping threads, or one thread each (30 VGG-11 passes each,
    side by side, measured). Set here, in the controller, before the workers start (each reads
    it when it loads OpenMP); the one process of ``-n 0`` keeps OpenMP's default."""
    if getattr(config.option, "numprocesses", None):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# Fixtures that build whole things once for their users: the session's every default variant
# of a full-size VGG-19, compiled (variant_set), tune's search (searched), every export format
# of the tiny variants (exported).
SLOW_FIXTURES = {"variant_set", "searched", "exported"}


def pytest_collection_modifyitems(config, items):
    """Tests that use a slow fixture are slow by construction: mark them so ``make test-quick``
    leaves them out (the others that compile, convert, train or start processes carry the mark
    themselves). In an xdist worker (``make test``), order the modules for the workers too."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items[:] = _slowest_modules_first(items)


def _slowest_modules_first(items: list) -> list:
    """Under ``--dist loadscope`` each worker runs whole modules (their module-scoped fixtures
    are built once), handed out in the order they first appear (``--no-loadscope-reorder``):
    the users of the full-size ``variant_set`` first (every worker's builder processes build
    it together, in the one cache they share), then the modules with the most slow tests, so
    that the last module handed out is a short one."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)

    def weight(module: str) -> tuple:
        tests = modules[module]
        return (not any("variant_set" in getattr(i, "fixturenames", ()) for i in tests),
                -sum(1 for i in tests if i.get_closest_marker("slow")))

    return [item for module in sorted(modules, key=weight) for item in modules[module]]


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: a worker per core this process may use, at most 4 (each holds full-size
    models; past four the longest module bounds the run anyway), and only as many as the free
    disk holds: the suite's folders peaked at 6.3 GB one by one, and at 5.9 and 8.0 GB in two
    runs with two workers (measured), and a CI machine once ran out of disk. One worker for
    every 4 GiB free beyond the first 4."""
    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    return max(1, min(len(os.sched_getaffinity(0)), 4, int((free - 4) // 4)))
