"""The one entry point behind the CLI, the JSON API and the dashboard."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from PIL import Image

from leanvgg.builder import VariantFacts
from leanvgg.images import Batches, Picture
from leanvgg.measure import (Latency, Prediction, Profile, machine_facts, time_models,
                             time_models_iter, top_k, using_threads)
from leanvgg.models import CATEGORIES
from leanvgg.schema import SCHEMA_VERSION, Throughput
from leanvgg.variants import VariantSet


@dataclass(frozen=True)
class Settings:
    runs: int = 10
    warmup: int = 2
    threads: int | None = None  # None: PyTorch's current setting
    # above 1: also the offline scenario, images/s at this batch size (after the batch-1 rows)
    batch_size: int = 1

    def __post_init__(self) -> None:
        if (self.runs < 1 or self.warmup < 0 or self.batch_size < 1
                or (self.threads is not None and self.threads < 1)):
            raise ValueError(f"Invalid settings {self}: runs >= 1, warmup >= 0, threads >= 1, "
                             "batch_size >= 1.")


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
    throughput: Throughput | None = None  # the offline scenario, when a batch size was asked

    @property
    def name(self) -> str:
        return self.facts.name

    def to_dict(self) -> dict:
        """One flat object: the facts' fields, then the measured ones (a row of the report
        schema, ``leanvgg.schema``)."""
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
    batch_size: int
    image: dict
    machine: dict
    created: str
    variants: list[VariantResult] = field(default_factory=list)
    not_ready: dict = field(default_factory=dict)  # variant → its state, when left out

    def to_dict(self) -> dict:
        """The report schema's document (``leanvgg.schema``), kind ``compare``."""
        fields = asdict(self)
        del fields["variants"]
        return {"schema_version": SCHEMA_VERSION, "kind": "compare", "created": self.created,
                "machine": self.machine,
                "config": {"runs": self.runs, "warmup": self.warmup, "threads": self.threads,
                           "batch_size": self.batch_size, "weights": self.weights},
                **fields, "results": [row.to_dict() for row in self.variants]}


def compare(image: Image.Image | Picture | Batches, variant_set: VariantSet,
            settings: Settings = Settings(), *, profiles: Mapping[str, Profile] | None = None,
            progress: bool = False) -> ComparisonResult:
    """Time and run every variant on one image, one forward pass at a time (see ``time_models``).

    Each variant's top-3 comes from the output of its own last timed run. With ``profiles``,
    latencies and speedups come from them (a CNN's latency does not depend on the picture) and
    this image's own passes are reported beside them.
    """
    comparison = Comparison(image, variant_set, settings, profiles=profiles)
    rows = list(comparison.rows(progress=progress))
    if settings.batch_size > 1:
        rows = comparison.with_throughput(rows, progress=progress)
    return comparison.result(rows)


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

    def with_throughput(self, rows: list[VariantResult], *, progress: bool = False
                        ) -> list[VariantResult]:
        """The rows with the offline scenario: each variant fed batches of ``batch_size``
        copies of the image, timed per batch the way the batch-1 passes were."""
        size = self.settings.batch_size
        variants = self.variant_set.variants
        jobs = {name: (v.model, self.batches.tensors[v.input_size]
                       .expand(size, -1, -1, -1).contiguous())
                for name, v in variants.items()}
        with using_threads(self.settings.threads):
            timed = time_models(jobs, runs=self.settings.runs,
                                warmup=max(1, self.settings.warmup), progress=progress)
        return [replace(row, throughput=Throughput.of(size, timed[row.name][0]))
                for row in rows]

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
            batch_size=self.settings.batch_size,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            image={"width": self.batches.width, "height": self.batches.height},
            machine=machine_facts(self.threads),
            variants=rows,
            not_ready=dict(not_ready or {}),
        )
