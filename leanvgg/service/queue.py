"""Admission and the one measurement slot: comparisons are timed one at a time, and at most
``max_queue`` wait for the slot (each with its decoded upload)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from contextlib import AbstractContextManager

from leanvgg.images import Batches
from leanvgg.variants import VariantSet


class Busy(Exception):
    """The queue for the measurement slot is full, or a request waited too long in it."""

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Ticket:
    """An admitted upload, decoded to tensors, waiting for the measurement slot.

    ``release`` gives its place in the queue back (once, however often it is called): after
    its measurement, or when the response is closed without it ever starting.
    """

    batches: Batches
    variant_set: VariantSet
    not_ready: dict[str, str]
    leave: Callable[[], None]
    queued_at: float = field(default_factory=time.perf_counter)
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.leave()


class Slot:
    """The measurement slot: a thread lock, and with ``across`` (``Store.measuring``) also a
    lock that other processes take while they time something (the builder process choosing
    runtimes), so that no two timings ever overlap on the machine."""

    def __init__(self, across: Callable[[], AbstractContextManager] | None = None) -> None:
        self._lock = threading.Lock()
        # set while a builder process runs (VariantPool); read at each acquire
        self.across = across
        self._held: contextlib.ExitStack | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._lock.acquire(blocking, timeout):
            return False
        if self.across is not None:
            stack = contextlib.ExitStack()
            stack.enter_context(self.across())  # waits while another process times
            self._held = stack
        return True

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.close()
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> Slot:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class MeasurementQueue:
    """The one measurement slot that keeps timings honest, and the comparisons admitted to
    wait for it (at most ``max_queue``: one measuring, the rest waiting)."""

    def __init__(self, max_queue: int = 8, timeout_s: float = 120.0) -> None:
        if max_queue < 1:
            raise ValueError(f"Invalid max_queue {max_queue}: at least 1 comparison must fit.")
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.slot = Slot()  # held by whatever is timing or running a model
        self._admitted = 0
        self._lock = threading.Lock()

    @property
    def admitted(self) -> int:
        """Comparisons admitted now (decoding, waiting or measuring)."""
        return self._admitted

    def enter(self) -> None:
        """Take a place in the queue; Busy when it is full."""
        with self._lock:
            if self._admitted >= self.max_queue:
                raise Busy(f"The server is busy ({self._admitted} comparisons queued); "
                           "try again shortly.")
            self._admitted += 1

    def leave(self) -> None:
        with self._lock:
            self._admitted -= 1

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the slot for the block, after waiting for it up to ``timeout_s`` (Busy)."""
        if not self.slot.acquire(timeout=self.timeout_s):
            raise Busy(f"Waited {self.timeout_s:g} s for the measurement slot; try again "
                       "shortly.", retry_after_s=max(1, round(self.timeout_s / 4)))
        try:
            yield
        finally:
            self.slot.release()

    def wait_idle(self, stop: threading.Event) -> None:
        """Comparisons come first: wait while any is admitted (decoding, queued or measuring)."""
        while self._admitted > 0 and not stop.is_set():
            time.sleep(0.02)
