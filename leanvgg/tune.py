"""Accuracy-budgeted search: the fastest model on this machine within an accuracy tolerance.

The space is filter pruning × classifier compression (neuron pruning, low rank) × fine-tuned or
not × precision × input resolution. Every candidate is a recipe built by the one builder
(``leanvgg.builder``) into the same cache as every variant, so the ``tuned`` variant registered
at the end is the very artifact measured here. Accuracy is counted on the validation data with
its 95 % interval (under torchrun each rank takes a shard); latency is measured the way
``compare`` measures it, by rank 0 alone. The search is pruned three ways: a per-layer
sensitivity analysis decides which convolutions may be pruned at each ratio; a candidate is
skipped when a less compressed one (same precision, same training, no smaller input) already
broke the budget; and it stops at the time budget. Finished candidates are written to the
report after each one, so an interrupted search keeps them and a rerun resumes.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from leanvgg.builder import Builder, Variant
from leanvgg.distributed import distributed_context, from_rank_zero, rank_zero_first
from leanvgg.evaluate import Labelled, count
from leanvgg.finetune import fine_tune_step
from leanvgg.measure import Latency, time_models
from leanvgg.models import Baseline
from leanvgg.prune import deep_convs, prune_filters
from leanvgg.recipes import (PRECISIONS, Candidate, FineTune, QuantizeStaticInt8, Recipe,
                             finetune_loss)
from leanvgg.stats import half_width, wilson
from leanvgg.schema import write as write_report
from leanvgg.documents import SEARCH
from leanvgg.store import Store
from leanvgg.tune_report import (REPORT_FORMAT, Measured, Record, Skipped, TuneResult, choose,
                                 from_document, records_of, result_of, summarize,
                                 to_document)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Space:
    resolutions: tuple[int, ...] = (224, 192, 160, 128)
    prune_ratios: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5)
    precisions: tuple[str, ...] = PRECISIONS
    neuron_ratios: tuple[float, ...] = (0.0,)  # classifier neurons removed (0: none)
    ranks: tuple[int, ...] = (0,)  # classifier.0's inner width when factorised (0: not)

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise ValueError(f"Invalid precisions {bad}. Choose from {', '.join(PRECISIONS)}.")
        if any(not 0 <= r < 1 for r in self.prune_ratios + self.neuron_ratios):
            raise ValueError(f"Invalid pruning ratios {self.prune_ratios + self.neuron_ratios}: "
                             "each must be in [0, 1).")
        if any(r < 32 for r in self.resolutions):
            raise ValueError(f"Invalid resolutions {self.resolutions}: VGG needs at least 32 px.")
        if any(r < 0 for r in self.ranks):
            raise ValueError(f"Invalid ranks {self.ranks}: each must be 0 (none) or positive.")

    @property
    def baseline(self) -> Candidate:
        """The reference every drop is measured against: the unpruned FP32 model at the
        largest input, whether or not the space holds it (ratios without 0 included)."""
        return Candidate(0.0, "fp32", max(self.resolutions))

    def grid(self, *, fine_tune: bool) -> list[Candidate]:
        """Baseline first (it anchors the budget), then less before more compressed."""
        structures = sorted(itertools.product(self.prune_ratios, self.neuron_ratios, self.ranks),
                            key=lambda s: (s[0], s[1], -_kept_rank(s[2])))
        grid = [Candidate(ratio, precision, size, tuned, neurons, rank)
                for ratio, neurons, rank in structures
                for tuned in ([False, True] if fine_tune and (ratio or neurons or rank)
                              else [False])
                for precision in self.precisions
                for size in sorted(self.resolutions, reverse=True)]
        return [self.baseline] + [c for c in grid if c != self.baseline]


def _kept_rank(rank: int) -> float:
    return math.inf if rank == 0 else rank  # 0 means the full matrix


def measure_latency(variant: Variant, sample: torch.Tensor, runs: int, warmup: int) -> Latency:
    """Batch-1 latency as ``compare`` measures it (warm-up, then timed passes)."""
    return time_models({variant.name: (variant.model, sample)}, runs=runs,
                       warmup=warmup)[variant.name][0]


def sensitivity(model: nn.Module, validation: Labelled, *, layers: Sequence[int],
                ratios: Sequence[float], resolution: int, multiple_of: int = 1,
                progress: bool = True) -> dict[str, dict[str, float]]:
    """Accuracy with one conv pruned at a time, at each ratio, before any fine-tuning.

    An analysis, not a product: these models are never stored or measured for latency.
    """
    dataset = validation.dataset(resolution)
    table: dict[str, dict[str, float]] = {}
    jobs = [(layer, ratio) for layer in layers for ratio in ratios if ratio > 0]
    show = progress and distributed_context()[0] == 0
    for layer, ratio in tqdm(jobs, desc="sensitivity", unit="prune", disable=not show):
        pruned, _ = prune_filters(model, ratio=ratio, layers=[layer], multiple_of=multiple_of)
        counts, _ = count(pruned, dataset, validation.membership, batch_size=32)
        table.setdefault(str(layer), {})[f"{ratio:g}"] = counts.top1 / counts.images
    return table


def search(baseline: Baseline, validation: Labelled, *, max_drop: float,
           space: Space = Space(), train: Labelled | None = None, finetune_lr: float = 1e-4,
           finetune_epochs: int = 1, calibration: str | None = None,
           layers: Sequence[int] | None = None, multiple_of: int = 16, runs: int = 10,
           warmup: int = 2, budget_s: float | None = None, store: Store | None = None,
           report: Path | None = None, settings: Mapping[str, object] | None = None,
           progress: bool = True,
           latency: Callable[[Variant, torch.Tensor, int, int], Latency] = measure_latency
           ) -> TuneResult:
    """Measure the space (resuming from ``report``) and return its Pareto front and choice.

    ``max_drop`` is in accuracy points (1.0 = one percentage point below the FP32 baseline).
    ``train`` enables fine-tuned candidates (one recovery run per compressed model).
    ``layers``: the convs whose pruning sensitivity is measured (default: the article's rule,
    ``prune.deep_convs``). ``calibration``: static INT8's calibration source (folder or tensor file; None: the
    bundled photos). ``store`` holds every candidate's artifacts (default: the user's cache);
    ``report`` the resume file (default: the store's search document). ``settings``: what else
    determines the results; a report made with other settings is kept aside and the search
    starts afresh, so no decision taken under one budget survives into another. ``latency``
    measures a built candidate; it runs on rank 0 only.
    """
    started = time.monotonic()
    layers = tuple(layers) if layers is not None else deep_convs(baseline.model)
    store = store if store is not None else Store()
    report = report if report is not None else store.documents.path(SEARCH)
    rank, _ = distributed_context()
    native = max(space.resolutions)
    spec = (FineTune(data=train.name, lr=finetune_lr, epochs=finetune_epochs, input_size=native,
                     loss=finetune_loss(baseline.model)) if train is not None else None)
    training = asdict(spec) if spec else None
    settings = {**(settings or {}), "max_drop": max_drop, "runs": runs, "warmup": warmup,
                "layers": list(layers), "multiple_of": multiple_of, "finetune": training,
                "calibration": QuantizeStaticInt8(calibration=calibration).to_json()[
                    "calibration"]}
    model_id = f"{baseline.weights_id} on {validation.name}"
    state = from_rank_zero(lambda: _load(report, model_id, settings, space))
    state.update(multiple_of=multiple_of, max_drop=max_drop, calibration=calibration,
                 finetune=training, baseline_key=space.baseline.key,
                 model=baseline.identity(), validation=validation.name)
    references: dict[str, torch.Tensor] = {}

    def reference() -> torch.Tensor:
        """The baseline's top-1 on this rank's shard: agreement is counted image by image."""
        if "top1" not in references:
            counts, references["top1"] = count(baseline.model, validation.dataset(native),
                                               validation.membership, batch_size=32)
            references["accuracy"] = counts.top1 / counts.images
            references["images"] = counts.images
        return references["top1"]

    if state["reference_accuracy"] is None:
        reference()
        state["reference_accuracy"] = references["accuracy"]
        state["images"] = references["images"]
    state["warnings"] = _budget_warnings(max_drop, state["reference_accuracy"], state["images"])
    for warning in state["warnings"]:
        log.warning(warning)
    if state["sensitivity"] is None:
        state["sensitivity"] = sensitivity(baseline.model, validation, layers=layers,
                                           ratios=space.prune_ratios, resolution=native,
                                           multiple_of=multiple_of, progress=progress)
        _save(report, state, rank)
    builder = Builder(baseline, store)
    grid = space.grid(fine_tune=train is not None)
    complete = True
    bar = tqdm(total=len(grid), desc="tuning", unit="candidate",
               disable=not progress or rank != 0)
    bar.update(sum(c.key in state["candidates"] for c in grid))
    records = records_of(state)  # typed once; each new record is added below as it is made
    for candidate in grid:
        if candidate.key in state["candidates"]:
            continue
        # the reference is measured whatever the budget: every drop is counted against it
        if candidate != space.baseline and from_rank_zero(
                lambda: budget_s is not None and time.monotonic() - started > budget_s):
            complete = False
            log.info("Time budget reached; %d candidates left unmeasured.",
                     sum(c.key not in state["candidates"] for c in grid))
            break
        chosen_layers = _layers_for(candidate.prune_ratio, state, layers, max_drop)
        reason = _skip_reason(candidate, records, records.get(state["baseline_key"]), max_drop)
        if reason is None and candidate.prune_ratio > 0 and not chosen_layers:
            reason = "no layer can be pruned this much within the budget (sensitivity)"
        if reason is not None:
            record: Record = Skipped(candidate, reason)
        else:
            recipe = builder.bind(candidate.recipe(
                f"tune:{candidate.key}", "a leanvgg tune candidate", layers=chosen_layers,
                multiple_of=multiple_of, finetune=spec, calibration=calibration))
            try:
                record = _measure(candidate, recipe, builder, validation, train, reference,
                                  latency, runs, warmup)
            except ValueError as err:  # a step that does not apply (a rank beyond the layer's)
                record = Skipped(candidate, str(err))
            builder.forget()  # every model is in the store; keep memory flat
        state["candidates"][candidate.key] = record.to_dict()
        records[candidate.key] = record
        _save(report, state, rank)
        bar.update()
        best = choose(records, state["baseline_key"], max_drop)
        if best:
            bar.set_postfix(best=f"{best} {records[best].median_ms:.1f} ms")
    bar.close()
    return result_of(state, complete)


def _budget_warnings(max_drop: float, accuracy: float, images: int) -> list[str]:
    """Why a budget cannot be judged on this many images, if it cannot."""
    half = 100 * half_width(accuracy, images)
    if max_drop >= half:
        return []
    return [f"--max-drop {max_drop:g} is smaller than the ±{half:.1f}-point 95 % interval of "
            f"an accuracy of {accuracy:.1%} on {images} validation images (one image is "
            f"{100 / images:.2g} points): candidates within the budget cannot be told apart "
            "from ones beyond it. Use more images (--subset) or a larger --max-drop."]


def _skip_reason(candidate: Candidate, done: dict[str, Record], baseline: Record | None,
                 max_drop: float) -> str | None:
    """Skip what a measured candidate that should be at least as accurate already failed:
    same precision and training, no more compression of any kind, no smaller input."""
    if not isinstance(baseline, Measured):
        return None
    for key, record in done.items():
        if not isinstance(record, Measured):
            continue
        other = record.candidate
        drop = record.drop(baseline)
        if (drop > max_drop and other.precision == candidate.precision
                and other.fine_tuned == candidate.fine_tuned
                and other.prune_ratio <= candidate.prune_ratio
                and other.neuron_ratio <= candidate.neuron_ratio
                and _kept_rank(other.rank) >= _kept_rank(candidate.rank)
                and other.resolution >= candidate.resolution):
            return f"dominated: {key} already lost {drop:.2f} points"
    return None


def _layers_for(ratio: float, state: dict, layers: Sequence[int], max_drop: float) -> list[int]:
    """The convs whose accuracy, pruned alone at ``ratio``, stays within the budget."""
    if ratio == 0:
        return []
    table = state["sensitivity"]
    reference = state["reference_accuracy"]
    chosen = [layer for layer in layers
              if 100 * (reference - table[str(layer)][f"{ratio:g}"]) <= max_drop]
    state["layers"][f"{ratio:g}"] = chosen
    return chosen


def _measure(candidate: Candidate, recipe: Recipe, builder: Builder, validation: Labelled,
             train: Labelled | None, reference: Callable[[], torch.Tensor],
             latency: Callable[[Variant, torch.Tensor, int, int], Latency], runs: int,
             warmup: int) -> Measured:
    """Build (and train) one candidate through the builder, then count and time it."""
    start = time.perf_counter()
    if candidate.fine_tuned:  # trained once per structure; later candidates load it
        step = next(s for s in recipe.steps if isinstance(s, FineTune))
        fine_tune_step(builder, recipe, train.dataset(step.input_size), train.membership,
                       lr=step.lr, epochs=step.epochs, seed=step.seed, progress=False)
    with rank_zero_first():  # rank 0 builds and compiles; the others load what it stored
        variant = builder.variant(recipe)
    prepare_s = time.perf_counter() - start
    size = candidate.resolution
    dataset = validation.dataset(size)
    counts, _ = count(variant.model, dataset, validation.membership, reference=reference(),
                      batch_size=32)
    timed = Latency.from_dict(from_rank_zero(  # the dict crosses processes under torchrun
        lambda: latency(variant, dataset[0][0][None], runs, warmup).to_dict()))
    n = counts.images
    return Measured(candidate, counts.top1 / n, wilson(counts.top1, n), counts.top3 / n,
                    wilson(counts.top3, n), counts.agree / n, wilson(counts.agree, n), n, timed,
                    variant.facts.size_mb, variant.facts.params, variant.facts.macs,
                    prepare_s, variant.artifact,
                    tuple(s.to_json() for s in recipe.steps))


def _load(report: Path, model_id: str, settings: dict, space: Space) -> dict:
    fresh = {"format": REPORT_FORMAT, "model_id": model_id, "settings": settings,
             "space": asdict(space), "sensitivity": None, "reference_accuracy": None,
             "images": None, "layers": {}, "candidates": {}}
    if not report.exists():
        return fresh
    try:
        state = from_document(json.loads(report.read_text()))
        summarize(state)  # every field the search and the dashboard read is there
        # JSON turns tuples into lists; compare like with like
        same = (state["model_id"], state["settings"]) == (model_id,
                                                          json.loads(json.dumps(settings)))
        why = "was made for another model or with other settings"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        same, why = False, f"cannot be resumed ({err})"
    if not same:  # never lose a search: keep it beside the new one
        kept = report.with_name(f"{report.name.removesuffix('.report.json')}."
                                f"{time.strftime('%Y%m%d-%H%M%S')}.report.json")
        os.replace(report, kept)
        log.warning("The report %s %s; kept it as %s and starting a new search.", report, why,
                    kept)
        return fresh
    state["space"] = asdict(space)  # a wider or narrower space reuses what it can
    log.info("Resuming: %d candidates already measured.", len(state["candidates"]))
    return state


def _save(report: Path, state: dict, rank: int) -> None:
    if rank == 0:
        report.parent.mkdir(parents=True, exist_ok=True)
        write_report(report, to_document(state, torch.get_num_threads()))
