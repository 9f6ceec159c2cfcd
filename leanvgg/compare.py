"""The one entry point behind the CLI, the JSON API and the dashboard."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image

from leanvgg.images import preprocess
from leanvgg.measure import Latency, Prediction, machine_facts, time_models, top_k
from leanvgg.models import CATEGORIES
from leanvgg.variants import VariantSet

@dataclass(frozen=True)
class Settings:
    runs: int = 10
    warmup: int = 2
    threads: int | None = None  # None: PyTorch's current setting

    def __post_init__(self) -> None:
        if self.runs < 1 or self.warmup < 0 or (self.threads is not None and self.threads < 1):
            raise ValueError(f"Invalid settings {self}: runs >= 1, warmup >= 0, threads >= 1.")


@dataclass(frozen=True)
class VariantResult:
    name: str
    description: str
    input_size: int
    size_mb: float
    params: int
    params_total: int
    macs: int
    latency_ms: Latency
    speedup: float
    top3: list[Prediction]
    fine_tuned: bool | None
    finetune: dict | None  # how the fine-tuned weights were made (images, epochs, final loss)
    accuracy: dict | None  # the latest evaluation of these weights, when one exists
    steps: list[dict]
    article: bool  # one of the article's five variants
    preparation_s: dict  # one-off costs (calibration_s, compile_s), apart from latency


@dataclass(frozen=True)
class ComparisonResult:
    weights: str
    predictions_meaningful: bool
    note: str
    threads: int
    runs: int
    warmup: int
    image: dict
    machine: dict
    variants: list[VariantResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def _threads(n: int | None) -> Iterator[int]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n or previous)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def compare(image: Image.Image, variant_set: VariantSet, settings: Settings = Settings(), *,
            progress: bool = False) -> ComparisonResult:
    """Time and run every variant on one image, one forward pass at a time (see ``time_models``).

    Each variant's top-3 comes from the output of its own last timed run.
    """
    variants = variant_set.variants
    if "baseline" not in variants:
        raise ValueError("The comparison needs the 'baseline' variant to compute speedups.")
    batches = {v.input_size: preprocess(image, v.input_size) for v in variants.values()}
    jobs = {name: (v.model, batches[v.input_size]) for name, v in variants.items()}
    with _threads(settings.threads) as threads:
        timings = time_models(jobs, runs=settings.runs, warmup=settings.warmup, progress=progress)
    baseline_median = timings["baseline"][0].median
    results = []
    for name, variant in variants.items():
        latency, logits = timings[name]
        results.append(VariantResult(**variant.summary(), latency_ms=latency,
                                     speedup=baseline_median / latency.median,
                                     top3=top_k(logits, CATEGORIES, 3)))
    baseline = variant_set.baseline
    return ComparisonResult(
        weights=baseline.weights,
        predictions_meaningful=baseline.meaningful,
        note=baseline.note,
        threads=threads,
        runs=settings.runs,
        warmup=settings.warmup,
        image={"width": image.width, "height": image.height},
        machine=machine_facts(threads),
        variants=results,
    )
