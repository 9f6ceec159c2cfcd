"""The builder process the server starts: ``leanvgg build --events`` builds, calibrates,
compiles, converts and chooses runtimes into the cache, and says so one JSON line at a time;
the server only loads what it has finished. Whatever compiling leaves behind stays in that
process, and no comparison waits for a build."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from leanvgg.models import WEIGHTS_CHOICES, Baseline

log = logging.getLogger(__name__)

BUILT, PLACED, FAILED = "built", "placed", "failed"
# The builder process's niceness: it uses only the CPU the server leaves, so a comparison
# sent while variants build is answered at the server's own speed (2 cores shared otherwise).
# Its timings are unaffected: it times runtimes under the store's timing lock, which the
# server's comparisons wait for.
NICE = 19
# Variants built at a time in the first stage: a helper process builds beside the builder
# process, each on half the cores, then makes packages and conversions ahead of the runtime
# choice
# (compiling leaves one of 2 cores idle about half the time; with the server loading beside
# them, every default variant was ready in 167 s instead of 186 s with the helper at full
# width, and in 143 s with this split, choice done in 278 s instead of 364 s: measured on a
# 2-core Sapphire Rapids by benchmarks/startup.py --idle-start); one where there is one core,
# or as LEANVGG_BUILD_JOBS says (1: no helper, and one builder's memory instead of two).
JOBS = int(os.environ.get("LEANVGG_BUILD_JOBS") or min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class Event:
    """One line of the builder process: a variant's state (building, compiling, converting,
    choosing), ``built`` (in the cache, ready on ``runtime``: eager, Inductor, or, under
    auto, ONNX Runtime or PyTorch until its choice), ``placed`` (its runtime choice
    stored) or ``failed`` (with why)."""

    variant: str
    state: str
    reason: str | None = None
    runtime: str | None = None

    def line(self) -> str:
        return json.dumps({k: v for k, v in vars(self).items() if v is not None})

    @classmethod
    def parse(cls, line: str) -> Event | None:
        """The event on ``line``, or None for anything else (a library's stray print)."""
        try:
            data = json.loads(line)
            return cls(str(data["variant"]), str(data["state"]), data.get("reason"),
                       data.get("runtime"))
        except (ValueError, KeyError, TypeError):
            return None


def events_channel() -> Callable[[Event], None]:
    """How a builder process says its events: one line each on its stdout, which from now on
    carries nothing else. The stdout is kept as a private duplicate, and file descriptor 1 and
    ``sys.stdout`` go to stderr: what a library prints (a progress bar, a C library's partial
    line) can neither break an event's line nor pass for one, and an event said by one thread
    while another has redirected stdout around a conversion (``interop.stdout_to_stderr``)
    still reaches the server. (It used to go to stderr then: the helper's ``built`` for
    int8_static, relayed while the builder converted turbo_svd, was never heard; the server,
    which loads a variant when it hears ``built``, would have left it unready.)"""
    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def say(event: Event) -> None:
        with lock:
            channel.write(event.line() + "\n")
            channel.flush()

    return say


def reloadable(baseline: Baseline) -> bool:
    """Whether another process can load the same baseline from its ``weights`` (a model that
    exists only in this process's memory cannot)."""
    return baseline.weights in WEIGHTS_CHOICES or Path(baseline.weights).is_file()


def command(baseline: Baseline, names: Sequence[str], *, threads: int, runtime: str,
            calibration: str | None, helper: bool = False) -> list[str]:
    """The builder process's command line for these variants of ``baseline`` (``helper``: its
    helper's, which builds the first stage, and the conversions the runtime choice will time,
    beside it and chooses no runtime)."""
    argv = [sys.executable, "-m", "leanvgg", "--verbose", "build", "--events", "--weights",
            baseline.weights, "--input-size", str(baseline.input_size), "--threads",
            str(threads), "--runtime", runtime, "--variants", ",".join(names)]
    return (argv + (["--calibration", calibration] if calibration else [])
            + (["--helper"] if helper else []))


def start(argv: list[str], store_root: Path) -> subprocess.Popen:
    """The builder process on the store at ``store_root``, started (its events wait in its
    pipe for ``events``; its log goes to our stderr)."""
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, bufsize=1,
        env={**os.environ, "LEANVGG_HOME": str(store_root)}, preexec_fn=_in_child)


def run(argv: list[str], store_root: Path, stop: threading.Event) -> Iterator[Event]:
    """Start the builder process on the store at ``store_root`` and yield its events
    (``events``)."""
    yield from events(start(argv, store_root), stop)


def events(process: subprocess.Popen, stop: threading.Event) -> Iterator[Event]:
    """The events of ``process`` (``start``'s) until it ends; ``stop`` (or this generator's
    closing) terminates it."""
    watcher = threading.Thread(target=_stop_when, args=(stop, process), daemon=True,
                               name="leanvgg-builder-watch")
    watcher.start()
    try:
        for line in process.stdout:
            event = Event.parse(line)
            if event is not None:
                yield event
        code = process.wait()
        if code != 0 and not stop.is_set():
            raise BuilderFailed(f"the builder process exited with code {code} (its log is in "
                                "the server's)")
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


class BuilderFailed(RuntimeError):
    """The builder process ended without finishing its variants."""


def _stop_when(stop: threading.Event, process: subprocess.Popen) -> None:
    while process.poll() is None:
        if stop.wait(0.5):
            process.terminate()
            return


def _in_child() -> None:
    """In the child, before it runs: lower its priority (``NICE``) and get SIGTERM if the
    server dies, so no builder outlives it (Linux)."""
    os.nice(NICE)
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
