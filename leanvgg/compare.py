"""The one entry point behind the CLI, the JSON API and the dashboard."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image

from leanvgg.builder import VariantFacts
from leanvgg.images import Batches, Picture
from leanvgg.measure import (Latency, Prediction, Profile, machine_facts, time_models_iter,
                             top_k, using_threads)
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


# A request of the dashboard: one pass per variant for its predictions; latency from profiles.
ONE_PASS = Settings(runs=1, warmup=0)


@dataclass(frozen=True)
class VariantResult:
    """One row: the variant's static facts (as ``/api/variants`` shows them) and this run."""

    facts: VariantFacts
    latency_ms: Latency  # from ``latency_source``
    latency_source: str  # "profile": measured apart, N passes; "request": this request's passes
    image_ms: float  # this image's last pass
    profile: dict | None  # the variant's stored latency profile on this machine, with its age
    speedup: float  # the baseline's median over this variant's (both from profiles if any)
    top3: list[Prediction]

    @property
    def name(self) -> str:
        return self.facts.name

    def to_dict(self) -> dict:
        """One flat object: the facts' fields, then the measured ones."""
        row = asdict(self)
        return {**row.pop("facts"), **row}


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
    not_ready: dict = field(default_factory=dict)  # variant → its state, when left out

    def to_dict(self) -> dict:
        return {**asdict(self), "variants": [row.to_dict() for row in self.variants]}


def compare(image: Image.Image | Picture | Batches, variant_set: VariantSet,
            settings: Settings = Settings(), *, profiles: Mapping[str, Profile] | None = None,
            progress: bool = False) -> ComparisonResult:
    """Time and run every variant on one image, one forward pass at a time (see ``time_models``).

    Each variant's top-3 comes from the output of its own last timed run. With ``profiles``,
    latencies and speedups come from them (a CNN's latency does not depend on the picture) and
    this image's own passes are reported beside them.
    """
    comparison = Comparison(image, variant_set, settings, profiles=profiles)
    return comparison.result(list(comparison.rows(progress=progress)))


class Comparison:
    """One image against every variant, row by row (the dashboard streams them as they come)."""

    def __init__(self, image: Image.Image | Picture | Batches, variant_set: VariantSet,
                 settings: Settings = Settings(), *,
                 profiles: Mapping[str, Profile] | None = None) -> None:
        if "baseline" not in variant_set.variants:
            raise ValueError("The comparison needs the 'baseline' variant to compute speedups.")
        if isinstance(image, Image.Image):
            image = Picture.of(image)
        if isinstance(image, Picture):
            image = image.batches({v.input_size for v in variant_set.variants.values()})
        self.batches = image
        self.variant_set = variant_set
        self.settings = settings
        self.profiles = dict(profiles or {})
        self.threads = settings.threads or torch.get_num_threads()

    def rows(self, *, progress: bool = False) -> Iterator[VariantResult]:
        """Each variant's row as soon as its last pass ends, baseline first."""
        variants = self.variant_set.variants
        jobs = {name: (v.model, self.batches.tensors[v.input_size])
                for name, v in variants.items()}
        baseline_median = None
        with using_threads(self.settings.threads):
            for name, measured, logits in time_models_iter(
                    jobs, runs=self.settings.runs, warmup=self.settings.warmup,
                    progress=progress):
                profile = self.profiles.get(name)
                latency = profile.latency if profile else measured
                if baseline_median is None:  # the baseline comes first
                    baseline_median = latency.median
                variant = variants[name]
                yield VariantResult(
                    facts=variant.summary(), latency_ms=latency,
                    latency_source="profile" if profile else "request",
                    image_ms=measured.median,
                    profile=profile.to_dict() if profile else None,
                    speedup=baseline_median / latency.median,
                    top3=top_k(logits, CATEGORIES, 3))

    def result(self, rows: list[VariantResult], not_ready: Mapping[str, str] | None = None
               ) -> ComparisonResult:
        baseline = self.variant_set.baseline
        return ComparisonResult(
            weights=baseline.weights,
            predictions_meaningful=baseline.meaningful,
            note=baseline.note,
            threads=self.threads,
            runs=self.settings.runs,
            warmup=self.settings.warmup,
            image={"width": self.batches.width, "height": self.batches.height},
            machine=machine_facts(self.threads),
            variants=rows,
            not_ready=dict(not_ready or {}),
        )
