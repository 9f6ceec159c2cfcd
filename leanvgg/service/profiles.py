"""Latency profiles: a property of a variant on a machine, not of a picture, so measured once
per variant (round-robin, never while a comparison is admitted), stored, and served."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

import torch

from leanvgg.builder import profile_key, stored_profile
from leanvgg.compare import Settings
from leanvgg.documents import PROFILES
from leanvgg.measure import SETTLE_S, Latency, Profile, round_orders, using_threads
from leanvgg.service.pool import NotReady, VariantPool
from leanvgg.service.queue import MeasurementQueue
from leanvgg.store import Store
from leanvgg.variants import Variant

log = logging.getLogger(__name__)


class ProfileKeeper:
    """The variants' latency profiles: read from the store, measured where missing or older
    than ``refresh_s`` (round-robin, one pass at a time, only while no comparison is admitted),
    stored under the document's lock, then served.

    A profile holds for a variant as it runs now (``profile_key``: its weights, runtime,
    threads, CPU and versions): a variant that moves to another runtime (from Inductor to the
    one measured fastest) has none until it is measured there."""

    def __init__(self, settings: Settings, queue: MeasurementQueue, stop: threading.Event,
                 refresh_s: float | None = 3600.0, store: Store | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.stop = stop
        self.refresh_s = refresh_s
        self._store = store
        self._stored: dict = {}
        self._profiles: dict[str, Profile] = {}  # by profile_key
        self._lock = threading.Lock()

    def load(self, store: Store) -> None:
        """Read the stored profiles (those that hold for a variant are served when asked)."""
        self._store = store
        self._stored = store.documents.load(PROFILES) or {}

    def profiles(self, variants: Mapping[str, Variant]) -> dict[str, Profile]:
        """The profiles measured (here or stored) that hold for ``variants`` as they run now,
        by name; a variant without one is left out."""
        keys = {name: profile_key(variant) for name, variant in variants.items()}
        with self._lock:
            found = {name: self._profiles.get(key) for name, key in keys.items()}
        return {name: profile for name, profile in found.items() if profile is not None}

    def stale(self, variant: Variant) -> bool:
        """Whether ``variant`` lacks a profile (measured or stored) younger than refresh_s."""
        key = profile_key(variant)
        with self._lock:
            profile = self._profiles.get(key)
        if profile is None:
            stored = stored_profile(self._stored, variant)
            if stored is not None:
                with self._lock:
                    self._profiles[key] = profile = stored
        if profile is None:
            return True
        return (self.refresh_s is not None
                and time.time() - profile.measured_at > self.refresh_s)

    def keep(self, pool: VariantPool) -> None:
        """Measure the profiles of the pool's ready variants that lack a fresh one; then wait
        and repeat, until stopped (or, with no refresh, until every variant has one)."""
        while not self.stop.is_set():
            try:
                variants = pool.variant_set().variants
            except NotReady:
                if pool.failure is not None:
                    return
                self.stop.wait(0.5)
                continue
            stale = {name: v for name, v in variants.items() if self.stale(v)}
            if stale:
                self.measure(stale)
            elif not pool.warming_up() and self.refresh_s is None:
                return
            else:
                self.stop.wait(1.0)

    def measure(self, variants: dict[str, Variant]) -> dict[str, Profile]:
        """Round-robin timed passes over ``variants``, one pass at a time under the slot, only
        while no comparison is waiting or running; stores and returns the new profiles."""
        jobs = {name: (v.model, torch.zeros(1, 3, v.input_size, v.input_size))
                for name, v in variants.items()}
        samples: dict[str, list[float]] = {name: [] for name in jobs}
        # every variant was made for one thread count (the builder's context)
        threads = next(iter(variants.values())).context.threads
        log.info("Measuring latency profiles: %s", ", ".join(jobs))
        passes = [(name, False) for name in jobs for _ in range(self.settings.warmup)]
        passes += [(name, True) for names in round_orders(list(jobs), self.settings.runs)
                   for name in names]  # no variant always timed right after the same one
        for name, timed in passes:
            if self.stop.is_set():
                return {}
            self.queue.wait_idle(self.stop)
            model, batch = jobs[name]
            with self.queue.slot, torch.inference_mode(), using_threads(threads):
                if timed:
                    time.sleep(SETTLE_S)  # what the previous variant left running stops
                start = time.perf_counter()
                model(batch)
                elapsed = time.perf_counter() - start
            if timed:
                samples[name].append(elapsed)
        now = time.time()
        profiles = {name: Profile(Latency.from_seconds(s), now, threads)
                    for name, s in samples.items()}
        keyed = {profile_key(variants[name]): p for name, p in profiles.items()}
        if self._store is not None:  # other servers on this cache may store theirs meanwhile
            self._stored = self._store.documents.update(PROFILES, lambda stored: {
                **stored, **{key: p.to_dict() for key, p in keyed.items()}})
        with self._lock:  # served once stored: a profile shown is one a restart finds
            self._profiles.update(keyed)
        log.info("Latency profiles measured (%d passes each).", self.settings.runs)
        return profiles
