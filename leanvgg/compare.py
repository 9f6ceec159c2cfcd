"""The one entry point behind the CLI, the JSON API and the dashboard."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import time
import dataclasses
from dataclasses import asdict, dataclass, field, replace

import torch
from PIL import Image

from leanvgg.context import PYTORCH
from leanvgg.facts import VariantFacts
from leanvgg.images import Batches, Picture
from leanvgg.machine import machine_facts
from leanvgg.measure import (Latency, Prediction, Profile, time_models,
                             time_models_iter, top_k, using_threads)
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
    latency_ms: Latency  # from ``latency_source`` (its ``count`` says how many passes)
    latency_source: str  # "profile": measured apart, N passes; "request": this request's passes
    image_ms: float  # this image's last pass
    profile: dict | None  # the variant's stored latency profile on this machine, with its age
    # the baseline's median over this variant's, only when both are of the same kind (both
    # profiles, or both this request's passes); else None and ``speedup_note`` says why
    speedup: float | None
    top3: list[Prediction]
    context: dict  # what these figures hold for (RunContext.record: runtime, threads, batch…)
    speedup_note: str | None = None
    throughput: Throughput | None = None  # the offline scenario, when a batch size was asked

    @property
    def name(self) -> str:
        return self.facts.name

    def to_dict(self) -> dict:
        """One flat object: the facts' fields, then the measured ones (a row of the report
        schema, ``leanvgg.schema``)."""
        row = asdict(self)
        row.pop("facts")
        return {**self.facts.to_dict(), **row}


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
    model: dict = field(default_factory=dict)  # Baseline.identity(): arch, classes, labels…
    labels_note: str | None = None  # what to know about the labels (e.g. none were given)

    def to_dict(self) -> dict:
        """The report schema's document (``leanvgg.schema``), kind ``compare``."""
        fields = asdict(self)
        del fields["variants"]
        return {"schema_version": SCHEMA_VERSION, "kind": "compare", "created": self.created,
                "machine": self.machine,
                "config": {"runs": self.runs, "warmup": self.warmup, "threads": self.threads,
                           "batch_size": self.batch_size, "weights": self.weights,
                           "model": self.model},
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
        self.threads = settings.threads or variant_set.threads or torch.get_num_threads()
        # packages and runtime sessions run on the thread count they were made for; eager
        # PyTorch runs on whatever is in force
        fixed = [v.name for v in variant_set.variants.values()
                 if v.runtime != PYTORCH and v.context.threads != self.threads]
        if fixed:
            made_for = variant_set.variants[fixed[0]].context.threads
            raise ValueError(f"{', '.join(fixed)} were made for {made_for} threads, not "
                             f"{self.threads}: build them with threads={self.threads} (their "
                             "packages and runtime sessions are set up for one count).")

    def rows(self, *, progress: bool = False) -> Iterator[VariantResult]:
        """Each variant's row as soon as its last pass ends, baseline first."""
        variants = self.variant_set.variants
        jobs = {name: (v.model, self.batches.tensors[v.input_size])
                for name, v in variants.items()}
        base: tuple[str, Latency] | None = None  # the baseline's source and latency
        with using_threads(self.threads):
            for name, measured, logits in time_models_iter(
                    jobs, runs=self.settings.runs, warmup=self.settings.warmup,
                    progress=progress):
                profile = self.profiles.get(name)
                latency = profile.latency if profile else measured
                source = "profile" if profile else "request"
                if base is None:  # the baseline comes first
                    base = source, latency
                speedup, note = _speedup(base, source, latency)
                variant = variants[name]
                yield VariantResult(
                    facts=variant.summary(), latency_ms=latency, latency_source=source,
                    image_ms=measured.median,
                    profile=profile.to_dict() if profile else None,
                    speedup=speedup, speedup_note=note,
                    top3=top_k(logits, self.variant_set.baseline.labels.names, 3),
                    context=dataclasses.replace(variant.run_context(),
                                                threads=self.threads).record())

    def with_throughput(self, rows: list[VariantResult], *, progress: bool = False
                        ) -> list[VariantResult]:
        """The rows with the offline scenario: each variant fed batches of ``batch_size``
        copies of the image, timed per batch the way the batch-1 passes were."""
        size = self.settings.batch_size
        variants = self.variant_set.variants
        jobs = {name: (v.model, self.batches.tensors[v.input_size]
                       .expand(size, -1, -1, -1).contiguous())
                for name, v in variants.items()}
        timed = time_models(jobs, runs=self.settings.runs, warmup=max(1, self.settings.warmup),
                            progress=progress, threads=self.threads)
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
            model=baseline.identity(),
            labels_note=baseline.labels.note,
        )


def _speedup(base: tuple[str, Latency], source: str, latency: Latency
             ) -> tuple[float | None, str | None]:
    """The baseline's median over this row's, and None or why there is none: a profile's
    median (many warm passes, measured apart) and a request's passes are different figures."""
    base_source, base_latency = base
    if base_source != source:
        kinds = {"profile": "a latency profile", "request": "this request's passes"}
        return None, (f"not comparable: the baseline's latency is {kinds[base_source]}, this "
                      f"variant's is {kinds[source]} ({latency.count} pass"
                      f"{'es' if latency.count != 1 else ''})")
    return base_latency.median / latency.median, None
