"""A long-lived comparison service: variants become ready one by one, latency is profiled once.

Latency is a property of a variant on a machine, not of a picture: a background thread measures
each ready variant's profile (round-robin, never while a comparison runs) and stores it; an
upload then runs every variant once for its predictions. The web app is a thin layer over this.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from leanvgg.builder import profile_key, stored_profile
from leanvgg.facts import State
from leanvgg.compare import ONE_PASS, Comparison, ComparisonResult, Settings, VariantResult
from leanvgg.images import DEFAULT_LIMITS, Batches, ImageLimits, check
from leanvgg.measure import Latency, Profile, using_threads
from leanvgg.models import Baseline, load_baseline
from leanvgg.store import PROFILES, SEARCH, Store
from leanvgg.tune_report import from_document, summarize
from leanvgg.variants import Variant, VariantBuilder, VariantSet

log = logging.getLogger(__name__)

# Uploads decoded at once: each costs up to ~250 MB at the limits (README, "Reliability"), and
# comparisons run one at a time anyway. Decoding runs on its own thread(s), not the request's:
# the allocator then reuses one decode's freed buffers for the next instead of keeping them in
# each request thread's own arena (measured: peak growth for four worst images at once varied
# 393–556 MB with decoding on the request threads).
DECODE_SLOTS = 1


class NotReady(Exception):
    """The baseline is still being loaded (or failed to); the message says which."""


class Busy(Exception):
    """The queue for the measurement slot is full, or a request waited too long in it."""

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Abandoned(Exception):
    """The client went away before its comparison was measured; nothing was measured."""


class ReportError(Exception):
    """A stored report exists but cannot be read; the message says what to do."""


@dataclass(frozen=True)
class VariantStatus:
    """Where a variant is on its way to ready, and why it failed if it did."""

    name: str
    state: State
    reason: str | None = None


@dataclass(frozen=True)
class Queued:
    result: ComparisonResult
    waited_ms: float  # time spent waiting for earlier measurements to finish

    def to_dict(self) -> dict:
        return {**self.result.to_dict(), "queue_wait_ms": self.waited_ms}


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
    """Owns the variants and the single measurement slot that keeps timings honest."""

    def __init__(self, *, weights: str = "auto", names: list[str] | None = None,
                 settings: Settings = Settings(runs=30, warmup=2),
                 limits: ImageLimits = DEFAULT_LIMITS, store: Store | None = None,
                 max_queue: int = 8, queue_timeout_s: float = 120.0,
                 profile_refresh_s: float | None = 3600.0,
                 variant_set: VariantSet | None = None, calibration: str | None = None,
                 runtime: str = "inductor") -> None:
        """``settings``: the profiles' passes (runs, warm-up) and threads; ``variant_set``:
        variants built already (then ``start`` only starts profiling); ``calibration``: a
        folder of images for static INT8 (default: the bundled photos); ``runtime``: where
        compiled variants run (``leanvgg.runtimes``; auto measures once per machine, holding the
        measurement slot); ``profile_refresh_s``:
        profiles older than this are measured again when idle (None: never)."""
        self.weights = weights
        self.names = names
        self.settings = settings
        self.limits = limits
        self.store = store
        self.calibration = calibration
        self.runtime = runtime
        if variant_set is not None and settings.threads:
            variant_set = _on_threads(variant_set, settings.threads)
        if max_queue < 1:
            raise ValueError(f"Invalid max_queue {max_queue}: at least 1 comparison must fit.")
        self.max_queue = max_queue  # comparisons admitted at once: one measuring, the rest waiting
        self.queue_timeout_s = queue_timeout_s
        self.profile_refresh_s = profile_refresh_s
        self._lock = threading.Lock()  # guards the dictionaries below
        self._baseline: Baseline | None = variant_set.baseline if variant_set else None
        self._ready: dict[str, Variant] = dict(variant_set.variants) if variant_set else {}
        self._states: dict[str, VariantStatus] = {
            name: VariantStatus(name, State.READY) for name in self._ready}
        self._order: list[str] = list(self._ready)
        self._profiles: dict[str, Profile] = {}
        self._profile_store: Store | None = store
        self._stored_profiles: dict = {}
        self._failure: str | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._slot = threading.Lock()
        self._admitted = 0
        self._admitted_lock = threading.Lock()
        self._decoder = ThreadPoolExecutor(DECODE_SLOTS, thread_name_prefix="leanvgg-decode")

    # --- start-up ----------------------------------------------------------------------------

    def start(self, *, background: bool = True, profile: bool = True) -> None:
        """Load or build every variant, one at a time, then keep their profiles measured."""
        def run() -> None:
            if self._baseline is None:
                self._warm_up()
            elif self.store is not None:
                self._load_profiles(self.store)
            if profile:
                self._profile_forever()

        if background:
            thread = threading.Thread(target=run, name="leanvgg-warm-up", daemon=True)
            self._threads.append(thread)
            thread.start()
        else:
            if self._baseline is None:
                self._warm_up()

    def stop(self, timeout_s: float = 0.0) -> bool:
        """Ask the background work to stop at its next pass; wait up to ``timeout_s`` for it.

        Returns whether it has stopped (a variant being built or compiled finishes first).
        """
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def warming_up(self) -> bool:
        """Whether a variant is still being loaded, built or compiled."""
        with self._lock:
            return self._baseline is None and self._failure is None or any(
                not s.state.settled for s in self._states.values())

    def _warm_up(self) -> None:
        try:
            store = self.store if self.store is not None else Store()
            baseline = load_baseline(self.weights)
            builder = VariantBuilder(baseline, store, self.calibration, runtime=self.runtime,
                                     threads=self.settings.threads, measuring=self._slot)
            names = builder.resolve(self.names)
        except Exception as err:  # reported by status() and every request, not lost in a thread
            log.exception("Warm-up failed")
            self._failure = f"Loading the variants failed: {err}"
            return
        with self._lock:
            self._order = names
            self._states = {name: VariantStatus(name, State.QUEUED) for name in names}
            self._baseline = baseline
        self._load_profiles(store)
        for name in names:
            if self._stop.is_set():
                return
            try:
                variant = builder.prepare(name, lambda state, name=name: self._set(name, state))
            except Exception as err:  # one variant's failure never takes the others down
                log.exception("Variant %s failed", name)
                self._set(name, State.FAILED, f"{type(err).__name__}: {str(err).splitlines()[0]}"
                          if str(err) else type(err).__name__)
                continue
            with self._lock:
                self._ready[name] = variant
            self._set(name, State.READY)
            log.info("Ready: %s", name)

    def _set(self, name: str, state: State, reason: str | None = None) -> None:
        with self._lock:
            self._states[name] = VariantStatus(name, State(state), reason)

    # --- what the app shows --------------------------------------------------------------------

    def status(self) -> dict:
        """``ready`` (all), ``degraded`` (baseline ready, some failed), ``warming up`` or
        ``failed`` (the baseline is not available), with each variant's state."""
        with self._lock:
            states = {name: s.state.value for name, s in self._states.items()}
            loaded = self._baseline is not None
            serving = "baseline" in self._ready  # comparisons need it for their speedups
        if self._failure is not None or states.get("baseline") == "failed":
            state = "failed"
        elif loaded and all(s == "ready" for s in states.values()):
            state = "ready"
        elif loaded and all(s in ("ready", "failed") for s in states.values()):
            state = "degraded"
        else:
            state = "warming up"
        return {"status": state, "serving": serving,
                "variants": states, **({"error": self._failure} if self._failure else {})}

    def variant_statuses(self) -> list[VariantStatus]:
        with self._lock:
            return [self._states[name] for name in self._order if name in self._states]

    def weights_info(self) -> dict:
        """Where the baseline's weights came from, once it is loaded (else every field None)."""
        baseline = self._baseline
        return {"weights": baseline.weights if baseline else None,
                "predictions_meaningful": baseline.meaningful if baseline else None,
                "note": baseline.note if baseline else None}

    def baseline(self) -> Baseline:
        if self._baseline is None:
            raise NotReady(self._failure or "Warming up: the baseline is still loading.")
        return self._baseline

    def variant_set(self) -> VariantSet:
        """The variants ready now, in registry order (baseline first)."""
        baseline = self.baseline()
        with self._lock:
            ready = {name: self._ready[name] for name in self._order if name in self._ready}
            baseline_state = self._states.get("baseline")
        if "baseline" not in ready and baseline_state is not None:
            raise NotReady(f"The baseline is {baseline_state.state}"
                           + (f": {baseline_state.reason}" if baseline_state.reason else
                              "; the variants are still loading."))
        return VariantSet(baseline, ready)

    def profiles(self) -> dict[str, Profile]:
        with self._lock:
            return dict(self._profiles)

    def tune_report(self) -> dict | None:
        """The latest ``leanvgg tune`` search in this service's cache, summarized; None if none."""
        state = (self.store or Store()).load_json(SEARCH)  # the search's report document
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
            with self._admitted_lock:
                if self._admitted >= self.max_queue:
                    raise Busy(f"The server is busy ({self._admitted} comparisons queued); "
                               "try again shortly.")
                self._admitted += 1
        except BaseException:
            checked.image.close()
            raise
        sizes = {v.input_size for v in variant_set.variants.values()}
        try:
            batches = self._decoder.submit(lambda: checked.decode().batches(sizes)).result()
        except BaseException:
            self._leave()
            raise
        not_ready = {s.name: s.state + (f": {s.reason}" if s.reason else "")
                     for s in self.variant_statuses() if s.name not in variant_set.variants}
        return Ticket(batches, variant_set, not_ready, self._leave)

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

        Raises Busy after ``queue_timeout_s`` in the queue and Abandoned when ``disconnected``
        says the client has gone (checked before anything is measured).
        """
        try:
            if not self._slot.acquire(timeout=self.queue_timeout_s):
                raise Busy(f"Waited {self.queue_timeout_s:g} s for the measurement slot; try "
                           "again shortly.", retry_after_s=max(1, round(self.queue_timeout_s / 4)))
            try:
                waited_ms = (time.perf_counter() - ticket.queued_at) * 1e3
                if disconnected():
                    raise Abandoned("The client went away before its comparison started.")
                events = self._events(ticket, runs, batch_size, waited_ms)
                try:
                    yield events
                finally:
                    events.close()  # its thread count and inference mode are undone now
            finally:
                self._slot.release()
        finally:
            ticket.release()

    def _events(self, ticket: Ticket, runs: int | None, batch_size: int, waited_ms: float
                ) -> Iterator[tuple[str, VariantResult | Queued]]:
        # without a profile, a row's latency is this request's pass(es), with their count (every
        # runner had its warm-up call when it was loaded)
        settings = (dataclasses.replace(self.settings, runs=runs) if runs
                    else dataclasses.replace(ONE_PASS, threads=self.settings.threads))
        comparison = Comparison(ticket.batches, ticket.variant_set,
                                dataclasses.replace(settings, batch_size=batch_size),
                                profiles=None if runs else self.profiles())
        rows = []
        for row in comparison.rows():
            rows.append(row)
            yield "row", row
        if batch_size > 1:
            rows = comparison.with_throughput(rows)
        yield "done", Queued(comparison.result(rows, ticket.not_ready), waited_ms)

    def _leave(self) -> None:
        with self._admitted_lock:
            self._admitted -= 1

    # --- latency profiles --------------------------------------------------------------------

    def _load_profiles(self, store: Store) -> None:
        self._profile_store = store
        self._stored_profiles = store.load_json(PROFILES) or {}

    def _stored_profile(self, variant: Variant) -> Profile | None:
        return stored_profile(self._stored_profiles, variant)

    def _stale(self, variant: Variant) -> bool:
        with self._lock:
            profile = self._profiles.get(variant.name)
        if profile is None:
            stored = self._stored_profile(variant)
            if stored is not None:
                with self._lock:
                    self._profiles[variant.name] = profile = stored
        if profile is None:
            return True
        return (self.profile_refresh_s is not None
                and time.time() - profile.measured_at > self.profile_refresh_s)

    def _profile_forever(self) -> None:
        """Measure the profiles of ready variants that lack a fresh one; then wait and repeat."""
        while not self._stop.is_set():
            try:
                variants = self.variant_set().variants
            except NotReady:
                if self._failure is not None:
                    return
                self._stop.wait(0.5)
                continue
            stale = {name: v for name, v in variants.items() if self._stale(v)}
            if stale:
                self.measure_profiles(stale)
            elif not self.warming_up() and self.profile_refresh_s is None:
                return
            else:
                self._stop.wait(1.0)

    def measure_profiles(self, variants: dict[str, Variant]) -> dict[str, Profile]:
        """Round-robin timed passes over ``variants``, one pass at a time under the slot, only
        while no comparison is waiting or running; stores and returns the new profiles."""
        jobs = {name: (v.model, torch.zeros(1, 3, v.input_size, v.input_size))
                for name, v in variants.items()}
        samples: dict[str, list[float]] = {name: [] for name in jobs}
        # every variant was made for one thread count (the builder's context)
        threads = next(iter(variants.values())).context.threads
        log.info("Measuring latency profiles: %s", ", ".join(jobs))
        passes = [(name, False) for name in jobs for _ in range(self.settings.warmup)]
        passes += [(name, True) for _ in range(self.settings.runs) for name in jobs]
        for name, timed in passes:
            if self._stop.is_set():
                return {}
            self._wait_idle()
            model, batch = jobs[name]
            with self._slot, torch.inference_mode(), using_threads(threads):
                start = time.perf_counter()
                model(batch)
                elapsed = time.perf_counter() - start
            if timed:
                samples[name].append(elapsed)
        now = time.time()
        profiles = {name: Profile(Latency.from_seconds(s), now, threads)
                    for name, s in samples.items()}
        store = self._profile_store
        if store is not None:  # other servers on this cache may store theirs meanwhile
            self._stored_profiles = store.update_json(PROFILES, lambda stored: {
                **stored, **{profile_key(variants[name]): p.to_dict()
                             for name, p in profiles.items()}})
        with self._lock:  # served once stored: a profile shown is one a restart finds
            self._profiles.update(profiles)
        log.info("Latency profiles measured (%d passes each).", self.settings.runs)
        return profiles

    def _wait_idle(self) -> None:
        """Comparisons come first: wait while any is admitted (decoding, queued or measuring)."""
        while self._admitted > 0 and not self._stop.is_set():
            time.sleep(0.02)
