"""A long-lived comparison service: warms variants up in the background, measures one at a time.

The web app is a thin layer over this; it holds no model logic of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from leanvgg.compare import ComparisonResult, Settings, compare
from leanvgg.images import DEFAULT_LIMITS, ImageLimits, decode
from leanvgg.models import load_baseline
from leanvgg.store import Store
from leanvgg.tune import TUNE_REPORT, summarize
from leanvgg.variants import VariantSet, build_variants

log = logging.getLogger(__name__)


class NotReady(Exception):
    """The variants are still being loaded or built (or failed to); the message says which."""


class Busy(Exception):
    """The queue for the measurement slot is full."""


@dataclass(frozen=True)
class Queued:
    result: ComparisonResult
    waited_ms: float  # time spent waiting for earlier measurements to finish

    def to_dict(self) -> dict:
        return {**self.result.to_dict(), "queue_wait_ms": self.waited_ms}


class ComparisonService:
    """Owns the variants and the single measurement slot that keeps timings honest."""

    def __init__(self, *, weights: str = "auto", names: list[str] | None = None,
                 settings: Settings = Settings(), limits: ImageLimits = DEFAULT_LIMITS,
                 store: Store | None = None, max_queue: int = 8,
                 variant_set: VariantSet | None = None, calibration: str | None = None) -> None:
        """``variant_set``: variants built already (then ``start`` is not needed);
        ``calibration``: a folder of images for static INT8 (default: the bundled photos)."""
        self.weights = weights
        self.names = names
        self.settings = settings
        self.limits = limits
        self.store = store
        self.calibration = calibration
        if max_queue < 1:
            raise ValueError(f"Invalid max_queue {max_queue}: at least 1 comparison must fit.")
        self.max_queue = max_queue  # comparisons admitted at once: one measuring, the rest waiting
        self._variant_set = variant_set
        self._warm_up_thread: threading.Thread | None = None
        self._failure: str | None = None
        self._slot = threading.Lock()
        self._admitted = 0
        self._admitted_lock = threading.Lock()

    def start(self, *, background: bool = True) -> None:
        """Load or build every variant; in the background unless told otherwise."""
        if background:
            self._warm_up_thread = threading.Thread(target=self._warm_up, name="leanvgg-warm-up",
                                                    daemon=True)
            self._warm_up_thread.start()
        else:
            self._warm_up()

    def warming_up(self) -> bool:
        """Whether a background warm-up is still loading or building."""
        return self._warm_up_thread is not None and self._warm_up_thread.is_alive()

    def _warm_up(self) -> None:
        try:
            baseline = load_baseline(self.weights)
            self._variant_set = build_variants(baseline, self.names, store=self.store,
                                               calibration=self.calibration)
            log.info("Ready: %s", ", ".join(self._variant_set.variants))
        except Exception as err:  # reported by status() and every request, not lost in a thread
            log.exception("Warm-up failed")
            self._failure = f"Loading the variants failed: {err}"

    def status(self) -> dict:
        if self._variant_set is not None:
            state = "ready"
        elif self._failure is not None:
            state = "failed"
        else:
            state = "warming up"
        return {"status": state, **({"error": self._failure} if self._failure else {})}

    def tune_report(self) -> dict | None:
        """The latest ``leanvgg tune`` search in this service's cache, summarized; None if none."""
        state = (self.store or Store()).load_json(TUNE_REPORT)
        return summarize(state) if state else None

    def variant_set(self) -> VariantSet:
        if self._variant_set is None:
            raise NotReady(self._failure or "Warming up: the variants are still loading.")
        return self._variant_set

    def compare(self, data: bytes) -> Queued:
        """Decode, then measure once the slot is free; raises ImageError, NotReady or Busy."""
        image = decode(data, limits=self.limits)
        variant_set = self.variant_set()
        with self._admitted_lock:
            if self._admitted >= self.max_queue:
                raise Busy(f"The server is busy ({self._admitted} comparisons queued); "
                           "try again shortly.")
            self._admitted += 1
        queued_at = time.perf_counter()
        try:
            with self._slot:
                waited_ms = (time.perf_counter() - queued_at) * 1e3
                return Queued(compare(image, variant_set, self.settings), waited_ms)
        finally:
            with self._admitted_lock:
                self._admitted -= 1
