"""What is known of a variant, as typed values: what belongs to its weights
(``ArtifactFacts``), where it runs (``Placement``), its accuracy on that runtime
(``Accuracy``), its state on the way to ready (``State``), and all of it as the CLI, the JSON
API and the dashboard show it (``VariantFacts``). Dicts appear only in ``to_dict`` and
``from_dict``, at the JSON edge (manifests, documents, responses)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

# What the steps report about what they did, by the name each writes under (leanvgg.recipes).
STEP_REPORTS = ("pruning", "neuron_pruning", "low_rank", "quantization", "precision")
# One-off costs measured here, apart from steady-state latency.
PREPARATION = ("calibration_s", "compile_s", "load_s")


@dataclass(frozen=True)
class ArtifactFacts:
    """What belongs to the weights, whatever runs them: their size, parameter counts, MACs at
    the recipe's input size, training, calibration and each step's report; and the one-off
    seconds spent preparing them in this process."""

    size_bytes: int
    params: int  # non-zero
    params_total: int
    macs: int
    fine_tuned: bool | None = None  # None: nothing was pruned, so there is nothing to recover
    finetune: dict | None = None  # how the fine-tuned weights were made
    calibration: dict | None = None  # static INT8's calibration images (count, source, digest)
    reports: dict = field(default_factory=dict)  # step report name → what the step reported
    preparation_s: dict = field(default_factory=dict)  # calibration, compile, load → seconds

    @classmethod
    def from_dict(cls, data: dict) -> ArtifactFacts:
        """The facts a manifest holds (KeyError when a count is missing)."""
        return cls(int(data["size_bytes"]), int(data["params"]), int(data["params_total"]),
                   int(data["macs"]), data.get("fine_tuned"), data.get("finetune"),
                   data.get("calibration"),
                   {k: data[k] for k in STEP_REPORTS if data.get(k) is not None},
                   {k: data[k] for k in PREPARATION if k in data})

    def to_dict(self) -> dict:
        """Flat, as manifests and model.json hold them (no preparation times: not facts of
        the weights)."""
        optional = {"fine_tuned": self.fine_tuned, "finetune": self.finetune,
                    "calibration": self.calibration}
        return {"size_bytes": self.size_bytes, "params": self.params,
                "params_total": self.params_total, "macs": self.macs,
                **{k: v for k, v in optional.items() if v is not None}, **self.reports}

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 2**20


@dataclass(frozen=True)
class Accuracy:
    """Accuracies with their 95 % Wilson intervals, and the sample and runtime they come
    from."""

    top1: float
    top3: float
    agreement: float  # share of images where the top-1 equals the baseline's (paired)
    images: int
    artifact: str  # the weights evaluated; figures are shown only while they are current
    dataset: str
    top1_ci: tuple[float, float] = (0.0, 1.0)
    top3_ci: tuple[float, float] = (0.0, 1.0)
    agreement_ci: tuple[float, float] = (0.0, 1.0)
    # the runtime that ran the model (its own INT8 on ONNX Runtime and OpenVINO): the figures
    # are shown only where the variant runs on it
    runtime: str = "pytorch"
    key: str = ""  # builder.evaluation_key: weights × input size × runtime × its versions

    @classmethod
    def from_dict(cls, data: dict) -> Accuracy:
        """A stored evaluation (KeyError, TypeError or ValueError when malformed)."""
        return cls(float(data["top1"]), float(data["top3"]), float(data["agreement"]),
                   int(data["images"]), str(data["artifact"]), str(data["dataset"]),
                   *(tuple(map(float, data[k])) for k in ("top1_ci", "top3_ci",
                                                           "agreement_ci")),
                   str(data.get("runtime", "pytorch")), str(data.get("key", "")))

    def to_dict(self) -> dict:
        return {**asdict(self), **{k: list(getattr(self, k))
                                   for k in ("top1_ci", "top3_ci", "agreement_ci")}}

# How a placement was decided.
AS_BUILT = "as built"  # not placed: a compiled recipe on Inductor, an eager one on PyTorch
EAGER = "eager"  # not compiled: runs in PyTorch as the recipe built it
PINNED = "pinned"  # the user (--runtime) or the recipe (tune's measured runtime) chose it
MEASURED = "measured"  # auto: measured now on this machine, and stored
STORED = "stored"  # auto: measured earlier on this machine (same context), reused
ONLY = "only candidate"  # auto with nothing else installed or able to run it
FALLBACK = "fallback"  # the runtime asked for cannot run it here; ``reason`` says why
# auto, in a process that only loads (the server): on Inductor until the builder process has
# measured and stored the choice, then moved to the chosen runtime
PENDING = "pending choice"


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
    # candidates left out of the measurement, with why (openvino_bf16 changing top-1s)
    excluded: dict[str, str] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Placement:
        """A stored choice (raises KeyError/TypeError when it is not one)."""
        return cls(**{k: data[k] for k in ("runtime", "batch_runtime", "threads", "how")},
                   **{k: data.get(k) for k in ("asked", "reason", "medians_ms", "batch_size",
                                               "batch_medians_ms", "runs", "measured_at",
                                               "excluded")})


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
    accuracy: Accuracy | None
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
        return {**asdict(self), "accuracy": self.accuracy.to_dict() if self.accuracy else None}
