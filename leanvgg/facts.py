"""What is shown of a variant, as typed values: where it runs (``Placement``), its state on the
way to ready (``State``) and its facts as the CLI, the JSON API and the dashboard show them
(``VariantFacts``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

# How a placement was decided.
AS_BUILT = "as built"  # not placed: a compiled recipe on Inductor, an eager one on PyTorch
EAGER = "eager"  # not compiled: runs in PyTorch as the recipe built it
PINNED = "pinned"  # the user (--runtime) or the recipe (tune's measured runtime) chose it
MEASURED = "measured"  # auto: measured now on this machine, and stored
STORED = "stored"  # auto: measured earlier on this machine (same context), reused
ONLY = "only candidate"  # auto with nothing else installed or able to run it
FALLBACK = "fallback"  # the runtime asked for cannot run it here; ``reason`` says why


@dataclass(frozen=True)
class Placement:
    """The runtime for single images and the one for batches, the thread count they were made
    for, and how they were decided (with the medians that decided them, when measured)."""

    runtime: str
    batch_runtime: str
    threads: int
    how: str
    asked: str | None = None  # the --runtime asked for (auto, or a pinned one)
    reason: str | None = None  # a fallback's or a pin's reason
    medians_ms: dict[str, float] | None = None  # batch 1, per candidate runtime
    batch_size: int | None = None
    batch_medians_ms: dict[str, float] | None = None  # per batch of ``batch_size``
    runs: int | None = None
    measured_at: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Placement:
        """A stored choice (raises KeyError/TypeError when it is not one)."""
        return cls(**{k: data[k] for k in ("runtime", "batch_runtime", "threads", "how")},
                   **{k: data.get(k) for k in ("asked", "reason", "medians_ms", "batch_size",
                                               "batch_medians_ms", "runs", "measured_at")})


class State(str, Enum):
    """Where a variant is on its way to ready (the service's, the API's and the page's words:
    the value is what ``/api/variants`` sends)."""

    QUEUED = "queued"
    BUILDING = "building"
    COMPILING = "compiling"
    CONVERTING = "converting"
    CHOOSING = "choosing runtime"
    READY = "ready"
    FAILED = "failed"

    @property
    def settled(self) -> bool:
        return self in (State.READY, State.FAILED)


@dataclass(frozen=True)
class VariantFacts:
    """A variant's static facts, as the CLI, the JSON API and the dashboard show them."""

    name: str
    description: str
    input_size: int
    size_mb: float
    params: int  # non-zero
    params_total: int
    macs: int
    fine_tuned: bool | None  # None: nothing was pruned, so there is nothing to recover
    finetune: dict | None  # how the fine-tuned weights were made (images, epochs, final loss)
    # the latest evaluation of these very weights on the runtime that runs them here (its
    # record names the runtime); None when none was measured there
    accuracy: dict | None
    steps: list[dict]
    article: bool  # one of the article's five variants
    # where it runs: pytorch (eager), inductor, onnxruntime or openvino (leanvgg.runtimes), one
    # image at a time and in batches, with the thread count and how it was decided
    runtime: str
    batch_runtime: str
    threads: int
    placement: dict
    # one-off costs, apart from steady-state latency: calibration when it was built,
    # compilation when its package was made, loading (incl. the first call) here
    preparation_s: dict

    def to_dict(self) -> dict:
        return asdict(self)
