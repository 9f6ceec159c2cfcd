"""A long-lived comparison service: variants become ready one by one, latency is profiled once.

Three parts share one measurement slot: the ``VariantPool`` builds the variants one at a time,
the ``ProfileKeeper`` measures each ready variant's latency profile (a property of a variant on
a machine, not of a picture: round-robin, never while a comparison is admitted) and stores it,
and the ``MeasurementQueue`` admits uploads and runs them one at a time. The web app is a thin
layer over ``ComparisonService``, which holds the three.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from leanvgg.compare import ONE_PASS, Comparison, ComparisonResult, Settings, VariantResult
from leanvgg.documents import SEARCH
from leanvgg.images import DEFAULT_LIMITS, ImageLimits, check
from leanvgg.measure import Profile
from leanvgg.models import Baseline
from leanvgg.service.pool import PROCESS, THREAD, NotReady, VariantPool, VariantStatus
from leanvgg.service.profiles import ProfileKeeper
from leanvgg.service.queue import Busy, MeasurementQueue, Ticket
from leanvgg.store import Store
from leanvgg.tune_report import from_document, summarize
from leanvgg.variants import Variant, VariantSet

__all__ = ["PROCESS", "THREAD", "Abandoned", "Busy", "ComparisonService", "NotReady", "Queued",
           "ReportError", "VariantStatus"]

log = logging.getLogger(__name__)

# Uploads decoded at once: each costs up to ~250 MB at the limits (README, "Reliability"), and
# comparisons run one at a time anyway. Decoding runs on its own thread(s), not the request's:
# the allocator then reuses one decode's freed buffers for the next instead of keeping them in
# each request thread's own arena (measured: peak growth for four worst images at once varied
# 393–556 MB with decoding on the request threads).
DECODE_SLOTS = 1


class Abandoned(Exception):
    """The client went away before its comparison was measured; nothing was measured."""


class ReportError(Exception):
    """A stored report exists but cannot be read; the message says what to do."""


@dataclass(frozen=True)
class Queued:
    result: ComparisonResult
    waited_ms: float  # time spent waiting for earlier measurements to finish

    def to_dict(self) -> dict:
        return {**self.result.to_dict(), "queue_wait_ms": self.waited_ms}


def _on_threads(variant_set: VariantSet, threads: int) -> VariantSet:
    """``variant_set`` for running on ``threads``: eager variants run on any count (their
    context says the one they will run on); compiled ones only on the count they were made
    for (ValueError otherwise)."""
    if variant_set.threads not in (None, threads):
        raise ValueError(f"The variants were made for {variant_set.threads} threads, not "
                         f"{threads}: build them with threads={threads}.")
    return dataclasses.replace(variant_set, variants={
        name: dataclasses.replace(v, context=dataclasses.replace(v.context, threads=threads),
                                  placement=dataclasses.replace(v.where, threads=threads))
        for name, v in variant_set.variants.items()})


class ComparisonService:
    """The variant pool, its profile keeper and the measurement queue, sharing one slot: what
    the web app (and ``leanvgg serve``) call."""

    def __init__(self, *, weights: str | Baseline = "auto", names: list[str] | None = None,
                 settings: Settings = Settings(runs=30, warmup=2),
                 limits: ImageLimits = DEFAULT_LIMITS, store: Store | None = None,
                 max_queue: int = 8, queue_timeout_s: float = 120.0,
                 profile_refresh_s: float | None = 3600.0,
                 variant_set: VariantSet | None = None, calibration: str | None = None,
                 runtime: str = "inductor", build_in: str = THREAD) -> None:
        """``settings``: the profiles' passes (runs, warm-up) and threads; ``variant_set``:
        variants built already (then ``start`` only starts profiling); ``calibration``: a
        folder of images for static INT8 (default: the bundled photos); ``runtime``: where
        compiled variants run (``leanvgg.runtimes``; auto measures once per machine, holding the
        measurement slot); ``profile_refresh_s``: profiles older than this are measured again
        when idle (None: never); ``build_in``: PROCESS builds in a builder process and only
        loads here (``leanvgg serve``), THREAD builds in this process."""
        self.settings = settings
        self.limits = limits
        self.store = store
        if variant_set is not None and settings.threads:
            variant_set = _on_threads(variant_set, settings.threads)
        self.queue = MeasurementQueue(max_queue, queue_timeout_s)
        self._stop = threading.Event()
        self.pool = VariantPool(weights=weights, names=names, store=store,
                                calibration=calibration, runtime=runtime,
                                threads=settings.threads, measuring=self.queue.slot,
                                variant_set=variant_set, build_in=build_in)
        self.keeper = ProfileKeeper(settings, self.queue, self._stop, profile_refresh_s, store)
        self._threads: list[threading.Thread] = []
        self._decoder = ThreadPoolExecutor(DECODE_SLOTS, thread_name_prefix="leanvgg-decode")

    @property
    def max_queue(self) -> int:
        return self.queue.max_queue

    # --- start-up ----------------------------------------------------------------------------

    def start(self, *, background: bool = True, profile: bool = True) -> None:
        """Load or build every variant, one at a time, then keep their profiles measured."""
        def run() -> None:
            if not self.pool.built:
                self.pool.build(self._stop, self.keeper.load)
            elif self.store is not None:
                self.keeper.load(self.store)
            if profile:
                self.keeper.keep(self.pool)

        if background:
            thread = threading.Thread(target=run, name="leanvgg-warm-up", daemon=True)
            self._threads.append(thread)
            thread.start()
        elif not self.pool.built:
            self.pool.build(self._stop, self.keeper.load)

    def stop(self, timeout_s: float = 0.0) -> bool:
        """Ask the background work to stop at its next pass; wait up to ``timeout_s`` for it.

        Returns whether it has stopped (a variant being built or compiled finishes first).
        """
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    # --- what the app shows --------------------------------------------------------------------

    def warming_up(self) -> bool:
        return self.pool.warming_up()

    def status(self) -> dict:
        return self.pool.status()

    def variant_statuses(self) -> list[VariantStatus]:
        return self.pool.statuses()

    def baseline(self) -> Baseline:
        return self.pool.baseline()

    def variant_set(self) -> VariantSet:
        return self.pool.variant_set()

    def profiles(self, variants: dict[str, Variant] | None = None) -> dict[str, Profile]:
        """The latency profiles that hold for ``variants`` (default: those ready now) as they
        run now, by name."""
        if variants is None:
            try:
                variants = self.variant_set().variants
            except NotReady:
                return {}
        return self.keeper.profiles(variants)

    def measure_profiles(self, variants: dict[str, Variant]) -> dict[str, Profile]:
        return self.keeper.measure(variants)

    def weights_info(self) -> dict:
        return self.pool.weights_info()

    def tune_report(self) -> dict | None:
        """The latest ``leanvgg tune`` search in this service's cache, summarized; None if none."""
        state = (self.store or Store()).documents.load(SEARCH)  # the search's report document
        if state is None:
            return None
        try:
            return summarize(from_document(state))
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # valid JSON, wrong fields
            log.warning("Unreadable tune report (%r).", err)
            raise ReportError("The saved search report is unreadable; run 'leanvgg tune' again "
                              "to make a new one.") from None

    # --- comparisons -------------------------------------------------------------------------

    def compare(self, data: bytes, *, runs: int | None = None, batch_size: int = 1,
                disconnected: Callable[[], bool] = lambda: False) -> Queued:
        """The whole comparison of an upload (see ``admit`` and ``measurement``)."""
        with self.measurement(self.admit(data), runs=runs, batch_size=batch_size,
                              disconnected=disconnected) as events:
            for event, payload in events:
                if event == "done":
                    return payload
        raise AssertionError("measurement() always ends with 'done'")

    def admit(self, data: bytes) -> Ticket:
        """Check the headers, admit, then decode (a few at a time) to tensors.

        Raises ImageError, NotReady or Busy; a refused upload's pixels are never decoded.
        """
        checked = check(data, limits=self.limits)  # cheap: headers only, no pixels
        try:
            variant_set = self.variant_set()
            self.queue.enter()
        except BaseException:
            checked.image.close()
            raise
        sizes = {v.input_size for v in variant_set.variants.values()}
        try:
            batches = self._decoder.submit(lambda: checked.decode().batches(sizes)).result()
        except BaseException:
            self.queue.leave()
            raise
        not_ready = {s.name: s.state + (f": {s.reason}" if s.reason else "")
                     for s in self.variant_statuses() if s.name not in variant_set.variants}
        return Ticket(batches, variant_set, not_ready, self.queue.leave)

    @contextlib.contextmanager
    def measurement(self, ticket: Ticket, *, runs: int | None = None, batch_size: int = 1,
                    disconnected: Callable[[], bool] = lambda: False
                    ) -> Iterator[Iterator[tuple[str, VariantResult | Queued]]]:
        """Hold the measurement slot for the block (waiting for it first) and give the
        comparison's events: ``("row", VariantResult)`` per variant as it is computed, then
        ``("done", Queued)``. The slot and the ticket's place are given back when the block
        ends, however it ends (a client that stops reading included), never later.
        ``runs``: measure latency here with that many passes (after the usual warm-up)
        instead of using the profiles. ``batch_size`` above 1: the done result's rows also
        carry throughput, batches of that many copies of the image timed after the rows (one
        warm-up batch, then ``runs`` or one timed batch each).

        Raises Busy after the queue's timeout and Abandoned when ``disconnected`` says the
        client has gone (checked before anything is measured).
        """
        try:
            with self.queue.held():
                waited_ms = (time.perf_counter() - ticket.queued_at) * 1e3
                if disconnected():
                    raise Abandoned("The client went away before its comparison started.")
                events = self._events(ticket, runs, batch_size, waited_ms)
                try:
                    yield events
                finally:
                    events.close()  # its thread count and inference mode are undone now
        finally:
            ticket.release()

    def _events(self, ticket: Ticket, runs: int | None, batch_size: int, waited_ms: float
                ) -> Iterator[tuple[str, VariantResult | Queued]]:
        # without a profile, a row's latency is this request's pass(es), with their count (every
        # runner had its warm-up call when it was loaded)
        settings = (dataclasses.replace(self.settings, runs=runs) if runs
                    else dataclasses.replace(ONE_PASS, threads=self.settings.threads))
        variants = ticket.variant_set.variants
        comparison = Comparison(ticket.batches, ticket.variant_set,
                                dataclasses.replace(settings, batch_size=batch_size),
                                profiles=None if runs else self.profiles(variants))
        rows = []
        for row in comparison.rows():
            rows.append(row)
            yield "row", row
        if batch_size > 1:
            rows = comparison.with_throughput(rows)
        yield "done", Queued(comparison.result(rows, ticket.not_ready), waited_ms)
