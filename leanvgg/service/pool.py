"""The variants on their way to ready, each with its state (queued, building, compiling, ready
or failed and why)."""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass

from leanvgg.builder import NotBuilt, stored_baseline, stored_weights
from leanvgg.context import RunContext
from leanvgg.facts import PENDING, State
from leanvgg.labels import attach
import leanvgg.service.worker as worker
from leanvgg.service.queue import Slot
from leanvgg.models import Baseline, load_baseline
from leanvgg.store import Store
from leanvgg.variants import (Variant, VariantBuilder, VariantSet, failure_reason,
                              registry_for, resolve_names)

log = logging.getLogger(__name__)

THREAD, PROCESS = "thread", "process"  # where variants are built (VariantPool's build_in)


class NotReady(Exception):
    """The baseline is still being loaded (or failed to); the message says which."""


@dataclass(frozen=True)
class VariantStatus:
    """Where a variant is on its way to ready, and why it failed if it did."""

    name: str
    state: State
    reason: str | None = None


class VariantPool:
    """The variants on their way to ready: built (or loaded) one at a time, each with its
    state; one variant's failure never takes the others down."""

    def __init__(self, *, weights: str | Baseline, names: list[str] | None, store: Store | None,
                 calibration: str | None, runtime: str, threads: int | None,
                 measuring: threading.Lock | Slot, variant_set: VariantSet | None = None,
                 build_in: str = THREAD) -> None:
        """``build_in``: PROCESS builds in a builder process (``leanvgg.service.worker``)
        while this one only loads what it finished; THREAD builds here."""
        if build_in not in (THREAD, PROCESS):
            raise ValueError(f"Invalid build_in {build_in!r}: {THREAD} or {PROCESS}.")
        self.build_in = build_in
        self.weights = weights
        self.names = names
        self.store = store
        self.calibration = calibration
        self.runtime = runtime
        self.threads = threads
        self.measuring = measuring  # held while choosing a runtime measures candidates
        self._lock = threading.Lock()  # guards the dictionaries below
        self._baseline: Baseline | None = variant_set.baseline if variant_set else None
        self._ready: dict[str, Variant] = dict(variant_set.variants) if variant_set else {}
        self._states: dict[str, VariantStatus] = {
            name: VariantStatus(name, State.READY) for name in self._ready}
        self._order: list[str] = list(self._ready)
        # ready where the builder made them first (runtimes.first_runtime) until their
        # choice (or their only runtime's package) is stored
        self._pending_choice: set[str] = set()
        self.builder_running = False
        self.failure: str | None = None

    @property
    def built(self) -> bool:
        """Whether the variants were handed over ready (nothing to build)."""
        return self._baseline is not None

    def build(self, stop: threading.Event, on_store: Callable[[Store], object]) -> None:
        """Load the baseline, then build every variant in registry order until ``stop``;
        ``on_store`` hears the store once it is open (before the first variant)."""
        early = None
        try:
            store = self.store if self.store is not None else Store()
            weights = (self.weights if isinstance(self.weights, Baseline)
                       else attach(load_baseline(self.weights, drawn=False), store))
            early = self._start_on_empty_cache(weights, store)
            # its weights mapped from the store: shared with the builder process, not copied
            baseline = stored_baseline(weights, store)
            in_process = self.build_in == PROCESS and worker.reloadable(baseline)
            builder = VariantBuilder(baseline, store, self.calibration, runtime=self.runtime,
                                     threads=self.threads, measuring=self.measuring,
                                     load_only=in_process)
            names = builder.resolve(self.names)
        except Exception as err:  # reported by status() and every request, not lost in a thread
            log.exception("Warm-up failed")
            self.failure = f"Loading the variants failed: {err}"
            if early is not None:
                early.terminate()
            return
        with self._lock:
            self._order = names
            self._states = {name: VariantStatus(name, State.QUEUED) for name in names}
            self._baseline = baseline
        on_store(store)
        missing = []
        try:
            for name in names:  # what the cache holds is ready at once
                if stop.is_set():
                    return
                if not self._prepare(builder, name, missing_ok=in_process):
                    missing.append(name)
            later = [n for n in names if n in missing or n in self._pending_choice]
            if later or early is not None:
                self._build_elsewhere(builder, later, store, stop, early)
                early = None
        finally:
            if early is not None and early.poll() is None:
                early.terminate()

    def _start_on_empty_cache(self, weights: Baseline, store: Store
                              ) -> subprocess.Popen | None:
        """On a cache without these weights (a first start: every variant is to build), the
        builder process, started before this process loads anything, so that its start-up
        (imports: about 4 s) runs beside ours; None otherwise (what the cache holds is loaded
        first, and a builder started only for what it lacks)."""
        if (self.build_in != PROCESS or not worker.reloadable(weights)
                or stored_weights(weights, store)):
            return None
        try:
            names = resolve_names(self.names, registry_for(weights, store, self.calibration))
        except Exception:  # said when the variants are resolved on the weights themselves
            return None
        log.info("Building every variant in a builder process (an empty cache)")
        return worker.start(worker.command(
            weights, names, threads=RunContext.here(self.threads).threads,
            runtime=self.runtime, calibration=self.calibration), store.root)

    def _prepare(self, builder: VariantBuilder, name: str, *, missing_ok: bool = False) -> bool:
        """Load (or, building here, build) ``name`` and make it ready; False when a load-only
        builder lacks it (``missing_ok``), True otherwise (ready, or failed and why)."""
        try:
            variant = builder.prepare(name, lambda state: self._set(name, state))
        except NotBuilt as err:
            if missing_ok:
                self._set(name, State.QUEUED)
                return False
            self._set(name, State.FAILED, f"the builder process stored no artifact: {err}")
            return True
        except Exception as err:  # one variant's failure never takes the others down
            log.exception("Variant %s failed", name)
            self._set(name, State.FAILED, failure_reason(err))
            return True
        with self._lock:
            self._ready[name] = variant
            if variant.where.how == PENDING:
                self._pending_choice.add(name)
            else:
                self._pending_choice.discard(name)
        self._set(name, State.READY)
        log.info("Ready: %s on %s", name, variant.runtime)
        return True

    def _build_elsewhere(self, builder: VariantBuilder, names: list[str], store: Store,
                         stop: threading.Event, started: subprocess.Popen | None = None
                         ) -> None:
        """Run the builder process for ``names`` (or hear ``started``, building them all);
        load each variant it finishes (where it was made ready first, then on the runtime
        measured for it)."""
        process = started
        if process is None:
            log.info("Building %s in a builder process", ", ".join(names))
            process = worker.start(worker.command(
                builder.baseline, names, threads=builder.builder.context.threads,
                runtime=self.runtime, calibration=self.calibration), store.root)
        self.builder_running = True
        # the builder times runtimes under the store's timing lock: our slot takes it too
        shares = hasattr(self.measuring, "across")
        if shares:
            self.measuring.across = store.measuring
        try:
            for event in worker.events(process, stop):
                ready = event.variant in self._ready
                if event.state == worker.BUILT and not ready:
                    self._prepare(builder, event.variant)
                elif event.state == worker.PLACED:
                    if event.variant in self._pending_choice:  # moves to its chosen runtime
                        self._prepare(builder, event.variant)
                    with self._lock:  # it stays where it is if the choice failed
                        self._pending_choice.discard(event.variant)
                elif event.state == worker.FAILED:
                    self._set(event.variant, State.FAILED, event.reason)
                elif not ready and event.state in {s.value for s in State}:
                    self._set(event.variant, State(event.state))
        except worker.BuilderFailed as err:
            self._fail_unready(names, str(err))
        else:
            if not stop.is_set():  # it ended, and what it did not make ready never will be
                self._fail_unready(names, "the builder process ended without building it")
        finally:
            if shares:
                self.measuring.across = None
            self.builder_running = False

    def _fail_unready(self, names: list[str], reason: str) -> None:
        for name in names:
            with self._lock:
                unsettled = name not in self._ready and not self._states[name].state.settled
            if unsettled:
                self._set(name, State.FAILED, reason)

    def _set(self, name: str, state: State, reason: str | None = None) -> None:
        with self._lock:
            self._states[name] = VariantStatus(name, State(state), reason)

    def warming_up(self) -> bool:
        """Whether a variant is still being loaded, built or compiled."""
        with self._lock:
            return self._baseline is None and self.failure is None or any(
                not s.state.settled for s in self._states.values())

    def status(self) -> dict:
        """``ready`` (all), ``degraded`` (baseline ready, some failed), ``warming up`` or
        ``failed`` (the baseline is not available), with each variant's state."""
        with self._lock:
            states = {name: s.state.value for name, s in self._states.items()}
            loaded = self._baseline is not None
            serving = "baseline" in self._ready  # comparisons need it for their speedups
        if self.failure is not None or states.get("baseline") == "failed":
            state = "failed"
        elif loaded and all(s == "ready" for s in states.values()):
            state = "ready"
        elif loaded and all(s in ("ready", "failed") for s in states.values()):
            state = "degraded"
        else:
            state = "warming up"
        with self._lock:
            # ready where they were made first, moving to their measured runtime once the
            # builder stored it
            pending = [name for name in self._order if name in self._pending_choice]
        return {"status": state, "serving": serving, "variants": states,
                "builder_process": self.builder_running, "pending_choice": pending,
                **({"error": self.failure} if self.failure else {})}

    def weights_info(self) -> dict:
        """Where the baseline's weights came from, once it is loaded (else every field None)."""
        baseline = self._baseline
        return {"weights": baseline.weights if baseline else None,
                "predictions_meaningful": baseline.meaningful if baseline else None,
                "note": baseline.note if baseline else None,
                "model": baseline.identity() if baseline else None,
                "labels_note": baseline.labels.note if baseline else None}

    def statuses(self) -> list[VariantStatus]:
        with self._lock:
            return [self._states[name] for name in self._order if name in self._states]

    def baseline(self) -> Baseline:
        if self._baseline is None:
            raise NotReady(self.failure or "Warming up: the baseline is still loading.")
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
