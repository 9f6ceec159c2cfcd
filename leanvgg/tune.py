"""Accuracy-budgeted search: the fastest model on this machine within an accuracy tolerance.

The space is pruning ratio × fine-tuned or not × precision × input resolution. Every candidate
is measured here, on this machine: accuracy on the validation data (``evaluate.predict``) and
latency the way ``compare`` measures it (warm-up, then timed passes under inference mode).
The search is pruned three ways: a per-layer sensitivity analysis decides which convolutions
may be pruned at each ratio; a candidate is skipped when a cheaper-to-lose one (same
precision, no more pruning, no smaller input) already broke the budget; and it stops at the
time budget. Finished candidates are written to the report after each one, so an interrupted
search keeps them and a rerun resumes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from leanvgg.data import calibration_batch
from leanvgg.evaluate import Labelled, predict
from leanvgg.finetune import finetune
from leanvgg.measure import count_macs, count_params, state_dict_bytes, time_models
from leanvgg.prune import VGG19_DEEP_CONVS, prune_filters
from leanvgg.quantize import quantize_static_int8
from leanvgg.runtime import compile_for_cpu, to_bf16
from leanvgg.store import write_atomic

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
REPORT_FORMAT = 2  # 2: the settings that made it are stored and compared on resume
TUNE_REPORT = "tune"  # the store document name of the latest search (``<root>/tune.report.json``)


@dataclass(frozen=True)
class Candidate:
    prune_ratio: float
    precision: str  # fp32 | bf16 | int8
    resolution: int
    fine_tuned: bool = False

    @property
    def key(self) -> str:
        return (f"prune{self.prune_ratio:g}-{self.precision}-{self.resolution}px"
                f"{'-finetuned' if self.fine_tuned else ''}")


@dataclass(frozen=True)
class Space:
    resolutions: tuple[int, ...] = (224, 192, 160, 128)
    prune_ratios: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5)
    precisions: tuple[str, ...] = PRECISIONS

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise ValueError(f"Invalid precisions {bad}. Choose from {', '.join(PRECISIONS)}.")
        if any(not 0 <= r < 1 for r in self.prune_ratios):
            raise ValueError(f"Invalid prune ratios {self.prune_ratios}: each must be in [0, 1).")
        if any(r < 32 for r in self.resolutions):
            raise ValueError(f"Invalid resolutions {self.resolutions}: VGG needs at least 32 px.")


@dataclass
class TuneResult:
    baseline: dict | None  # the FP32, unpruned, full-resolution record (None: not measured)
    candidates: dict[str, dict]  # key → record (config, accuracy, latency, size, MACs) or skip
    front: list[str]  # keys on the Pareto front, fastest first
    chosen: str | None  # the fastest key within the budget
    sensitivity: dict[str, dict[str, float]]  # layer → ratio → accuracy
    max_drop: float
    complete: bool  # False when the time budget ended the search
    layers: dict[str, list[int]] = field(default_factory=dict)  # ratio → layers pruned
    multiple_of: int = 1
    finetune: dict = field(default_factory=dict)  # lr and epochs of fine-tuned candidates

    def to_dict(self) -> dict:
        return asdict(self)


def pareto_front(records: Sequence[dict]) -> list[dict]:
    """Records no other record beats on both latency (lower) and accuracy (higher)."""
    front: list[dict] = []
    for record in sorted(records, key=lambda r: (r["latency_ms"]["median"], -r["accuracy"])):
        if not front or record["accuracy"] > front[-1]["accuracy"]:
            front.append(record)
    return front


def sensitivity(model: nn.Module, validation: Labelled, *, layers: Sequence[int],
                ratios: Sequence[float], resolution: int, multiple_of: int = 1,
                progress: bool = True) -> dict[str, dict[str, float]]:
    """Accuracy with one conv pruned at a time, at each ratio, before any fine-tuning."""
    dataset = validation.dataset(resolution)
    table: dict[str, dict[str, float]] = {}
    jobs = [(layer, ratio) for layer in layers for ratio in ratios if ratio > 0]
    for layer, ratio in tqdm(jobs, desc="sensitivity", unit="prune", disable=not progress):
        pruned, _ = prune_filters(model, ratio=ratio, layers=[layer], multiple_of=multiple_of)
        table.setdefault(str(layer), {})[f"{ratio:g}"] = _accuracy(pruned, dataset, validation)
    return table


def search(model: nn.Module, validation: Labelled, *, max_drop: float, space: Space = Space(),
           train: Labelled | None = None, finetune_lr: float = 1e-4, finetune_epochs: int = 1,
           calibration: Callable[[int], torch.Tensor] = calibration_batch,
           layers: Sequence[int] = VGG19_DEEP_CONVS, multiple_of: int = 16, runs: int = 10,
           warmup: int = 2, budget_s: float | None = None, report: Path | None = None,
           model_id: str = "", settings: Mapping[str, object] | None = None,
           progress: bool = True) -> TuneResult:
    """Measure the space (resuming from ``report``) and return its Pareto front and choice.

    ``max_drop`` is in accuracy points (1.0 = one percentage point below the FP32 baseline).
    ``train`` enables fine-tuned candidates (one recovery epoch per pruned model).
    ``settings``: what else determines the results (calibration source, training subset...);
    a report made with other settings is kept aside and the search starts afresh, so no
    decision taken under one budget survives into another.
    """
    started = time.monotonic()
    settings = {**(settings or {}), "max_drop": max_drop, "runs": runs, "warmup": warmup,
                "layers": list(layers), "multiple_of": multiple_of,
                "finetune": {"lr": finetune_lr, "epochs": finetune_epochs,
                             "train": train.name if train is not None else None}}
    state = _load(report, model_id, settings, space)
    state.update(multiple_of=multiple_of, max_drop=max_drop,
                 finetune={"lr": finetune_lr, "epochs": finetune_epochs})
    native = max(space.resolutions)
    if state["reference_accuracy"] is None:
        state["reference_accuracy"] = _accuracy(model, validation.dataset(native), validation)
    if state["sensitivity"] is None:
        state["sensitivity"] = sensitivity(model, validation, layers=layers,
                                           ratios=space.prune_ratios, resolution=native,
                                           multiple_of=multiple_of, progress=progress)
        _save(report, state)
    sample = {size: calibration(size)[:1] for size in space.resolutions}
    grid = _grid(space, fine_tune=train is not None)
    complete = True
    bar = tqdm(total=len(grid), desc="tuning", unit="candidate", disable=not progress)
    bar.update(sum(c.key in state["candidates"] for c in grid))
    models: dict[tuple[float, bool], nn.Module | None] = {}
    for candidate in grid:
        if candidate.key in state["candidates"]:
            continue
        if budget_s is not None and time.monotonic() - started > budget_s:
            complete = False
            log.info("Time budget reached; %d candidates left unmeasured.",
                     sum(c.key not in state["candidates"] for c in grid))
            break
        baseline = state["candidates"].get(_baseline_key(space))
        reason = _skip_reason(candidate, state["candidates"], baseline, max_drop)
        float_model = None if reason else _float_model(
            models, model, candidate, state, validation, train, layers, max_drop, multiple_of,
            finetune_lr, finetune_epochs)
        if reason is None and float_model is None:
            reason = "no layer can be pruned this much within the budget (sensitivity)"
        if reason:
            state["candidates"][candidate.key] = {**asdict(candidate), "skipped": reason}
        else:
            state["candidates"][candidate.key] = _measure(
                candidate, float_model, validation, calibration, sample[candidate.resolution],
                runs, warmup)
        _save(report, state)
        bar.update()
        best = _choose(state["candidates"], _baseline_key(space), max_drop)
        if best:
            bar.set_postfix(best=f"{best} {state['candidates'][best]['latency_ms']['median']:.1f} ms")
    bar.close()
    return _result(state, space, max_drop, complete)


def _grid(space: Space, *, fine_tune: bool) -> list[Candidate]:
    # Baseline first (it anchors the budget), then cheaper-to-lose before riskier candidates.
    grid = []
    for ratio in sorted(space.prune_ratios):
        for tuned in ([False, True] if fine_tune and ratio > 0 else [False]):
            for precision in space.precisions:
                for size in sorted(space.resolutions, reverse=True):
                    grid.append(Candidate(ratio, precision, size, tuned))
    base = Candidate(min(space.prune_ratios), "fp32", max(space.resolutions))
    return [base] + [c for c in grid if c != base]


def _baseline_key(space: Space) -> str:
    return Candidate(min(space.prune_ratios), "fp32", max(space.resolutions)).key


def _skip_reason(candidate: Candidate, done: dict[str, dict], baseline: dict | None,
                 max_drop: float) -> str | None:
    """Skip what a measured candidate that should be at least as accurate already failed."""
    if baseline is None:
        return None
    for key, record in done.items():
        if "accuracy" not in record:
            continue
        drop = 100 * (baseline["accuracy"] - record["accuracy"])
        if (drop > max_drop and record["precision"] == candidate.precision
                and record["fine_tuned"] == candidate.fine_tuned
                and record["prune_ratio"] <= candidate.prune_ratio
                and record["resolution"] >= candidate.resolution):
            return f"dominated: {key} already lost {drop:.2f} points"
    return None


def _layers_for(ratio: float, state: dict, layers: Sequence[int], max_drop: float) -> list[int]:
    """The convs whose accuracy, pruned alone at ``ratio``, stays within the budget."""
    table = state["sensitivity"]
    reference = state["reference_accuracy"]
    return [layer for layer in layers
            if 100 * (reference - table[str(layer)][f"{ratio:g}"]) <= max_drop]


def _float_model(cache: dict, model: nn.Module, candidate: Candidate, state: dict,
                 validation: Labelled, train: Labelled | None, layers: Sequence[int],
                 max_drop: float, multiple_of: int, lr: float, epochs: int) -> nn.Module | None:
    """The pruned (and maybe fine-tuned) FP32 model behind a candidate; None if nothing fits."""
    key = (candidate.prune_ratio, candidate.fine_tuned)
    if key in cache:
        return cache[key]
    if candidate.prune_ratio == 0:
        cache[key] = model
        return model
    chosen = _layers_for(candidate.prune_ratio, state, layers, max_drop)
    state["layers"][f"{candidate.prune_ratio:g}"] = chosen
    if not chosen:
        cache[key] = None
        return None
    cache[key] = _pruned(model, candidate.prune_ratio, chosen, multiple_of=multiple_of,
                         train=train if candidate.fine_tuned else None,
                         resolution=max(state["space"]["resolutions"]),
                         finetune_args={"lr": lr, "epochs": epochs})
    return cache[key]


def _pruned(model: nn.Module, ratio: float, layers: Sequence[int], *, multiple_of: int,
            train: Labelled | None, resolution: int, finetune_args: dict) -> nn.Module:
    """``model`` pruned at ``ratio`` in ``layers``, then fine-tuned (seeded) on ``train`` if any."""
    pruned, _ = prune_filters(model, ratio=ratio, layers=layers, multiple_of=multiple_of)
    if train is None:
        return pruned
    tuned, _ = finetune(pruned, train.dataset(resolution), train.membership, progress=False,
                        **finetune_args)
    return tuned


def _measure(candidate: Candidate, model: nn.Module, validation: Labelled,
             calibration: Callable[[int], torch.Tensor], sample: torch.Tensor, runs: int,
             warmup: int) -> dict:
    size = candidate.resolution
    prepare = time.perf_counter()
    if candidate.precision == "int8":
        stored = quantize_static_int8(model, calibration(size))
    elif candidate.precision == "bf16":
        stored = to_bf16(model)
    else:
        stored = model
    runnable = stored if candidate.precision == "fp32" else compile_for_cpu(stored, size)[0]
    prepare_s = time.perf_counter() - prepare
    accuracy = _accuracy(runnable, validation.dataset(size), validation)
    latency = time_models({candidate.key: (runnable, sample)}, runs=runs,
                          warmup=warmup)[candidate.key][0]
    return {**asdict(candidate), "accuracy": accuracy, "latency_ms": asdict(latency),
            "size_mb": state_dict_bytes(stored) / 2**20, "params": count_params(stored),
            "macs": count_macs(model, size), "prepare_s": prepare_s}


def _accuracy(model: nn.Module, dataset, validation: Labelled) -> float:
    top1, _, targets = predict(model, dataset, validation.membership, batch_size=32)
    return float((top1 == targets).float().mean())


def _choose(records: dict[str, dict], baseline_key: str, max_drop: float) -> str | None:
    baseline = records.get(baseline_key)
    if baseline is None:
        return None
    within = [r for r in records.values() if "accuracy" in r
              and 100 * (baseline["accuracy"] - r["accuracy"]) <= max_drop]
    if not within:
        return None
    best = min(within, key=lambda r: r["latency_ms"]["median"])
    return Candidate(best["prune_ratio"], best["precision"], best["resolution"],
                     best["fine_tuned"]).key


def _result(state: dict, space: Space, max_drop: float, complete: bool) -> TuneResult:
    records = state["candidates"]
    measured = [r for r in records.values() if "accuracy" in r]
    front = [Candidate(r["prune_ratio"], r["precision"], r["resolution"], r["fine_tuned"]).key
             for r in pareto_front(measured)]
    return TuneResult(baseline=records.get(_baseline_key(space)), candidates=records, front=front,
                      chosen=_choose(records, _baseline_key(space), max_drop),
                      sensitivity=state["sensitivity"], max_drop=max_drop, complete=complete,
                      layers=state["layers"], multiple_of=state["multiple_of"],
                      finetune=state["finetune"])


def summarize(state: dict) -> dict:
    """A saved report as the dashboard shows it: candidates with front and choice marked."""
    space = Space(**{k: tuple(v) for k, v in state["space"].items()})
    result = _result(state, space, state["max_drop"], complete=True)
    measured = [{**r, "key": k, "on_front": k in result.front, "chosen": k == result.chosen}
                for k, r in result.candidates.items() if "accuracy" in r]
    return {"model_id": state["model_id"], "max_drop": result.max_drop,
            "baseline": result.baseline, "chosen": result.chosen, "front": result.front,
            "candidates": measured,
            "skipped": sum("accuracy" not in r for r in result.candidates.values())}


def _load(report: Path | None, model_id: str, settings: dict, space: Space) -> dict:
    fresh = {"format": REPORT_FORMAT, "model_id": model_id, "settings": settings,
             "space": asdict(space), "sensitivity": None, "reference_accuracy": None,
             "layers": {}, "candidates": {}}
    if report is None or not report.exists():
        return fresh
    try:
        state = json.loads(report.read_text())
        summarize(state)  # every field the search and the dashboard read is there
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("Ignoring unreadable tuning report %s (%s).", report, err)
        return fresh
    # JSON turns tuples into lists; compare like with like
    if (state.get("format"), state.get("model_id"), state.get("settings")) != (
            REPORT_FORMAT, model_id, json.loads(json.dumps(settings))):
        kept = report.with_name(f"{report.name.removesuffix('.report.json')}."
                                f"{time.strftime('%Y%m%d-%H%M%S')}.report.json")
        os.replace(report, kept)
        log.warning("The report %s was made for another model or with other settings; kept it "
                    "as %s and starting a new search.", report, kept)
        return fresh
    state["space"] = asdict(space)  # a wider or narrower space reuses what it can
    log.info("Resuming: %d candidates already measured.", len(state["candidates"]))
    return state


def _save(report: Path | None, state: dict) -> None:
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(report, json.dumps(state, indent=2).encode())


def tuned_config(result: TuneResult) -> dict:
    """What ``variants.register_tuned`` needs to rebuild the chosen candidate."""
    chosen = result.candidates[result.chosen]
    return {"key": result.chosen, "candidate": {k: chosen[k] for k in (
                "prune_ratio", "precision", "resolution", "fine_tuned")},
            "layers": result.layers.get(f"{chosen['prune_ratio']:g}", []),
            "multiple_of": result.multiple_of, "max_drop": result.max_drop,
            "accuracy": chosen["accuracy"], "latency_ms": chosen["latency_ms"]}


def rebuild_float_model(model: nn.Module, result: TuneResult, *,
                        train: Labelled | None) -> nn.Module:
    """The chosen candidate's pruned (and fine-tuned, seeded as in the search) FP32 model."""
    config = tuned_config(result)
    chosen = config["candidate"]
    if chosen["prune_ratio"] == 0:
        return model
    if chosen["fine_tuned"] and train is None:
        raise ValueError("The chosen candidate was fine-tuned: pass the same training data.")
    return _pruned(model, chosen["prune_ratio"], config["layers"],
                   multiple_of=result.multiple_of, train=train if chosen["fine_tuned"] else None,
                   resolution=max(r["resolution"] for r in result.candidates.values()),
                   finetune_args=result.finetune)


def format_front(result: TuneResult) -> str:
    """The Pareto front as a table, the choice marked."""
    base = result.baseline
    lines = [f"{'candidate':<32}{'accuracy':>9}{'drop':>7}{'median ms':>11}{'speedup':>9}"
             f"{'size MB':>9}",
             "-" * 77]
    for key in result.front:
        r = result.candidates[key]
        drop = 100 * (base["accuracy"] - r["accuracy"])
        mark = "  ← chosen" if key == result.chosen else ""
        lines.append(f"{key:<32}{r['accuracy']:>9.2%}{drop:>7.2f}{r['latency_ms']['median']:>11.1f}"
                     f"{base['latency_ms']['median'] / r['latency_ms']['median']:>8.2f}×"
                     f"{r['size_mb']:>9.1f}{mark}")
    measured = sum("accuracy" in r for r in result.candidates.values())
    skipped = len(result.candidates) - measured
    lines.append(f"{measured} candidates measured, {skipped} skipped"
                 f"{'' if result.complete else ', stopped by the time budget'}; "
                 f"budget {result.max_drop:g} points below FP32 {base['accuracy']:.2%}")
    return "\n".join(lines)


def plot_front(result: TuneResult, path: Path) -> None:
    """Latency vs accuracy of every measured candidate (marker area ∝ size), front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = {k: r for k, r in result.candidates.items() if "accuracy" in r}
    colors = {"fp32": "tab:blue", "bf16": "tab:orange", "int8": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for precision, color in colors.items():
        points = [r for r in measured.values() if r["precision"] == precision]
        if points:
            ax.scatter([r["latency_ms"]["median"] for r in points],
                       [100 * r["accuracy"] for r in points],
                       s=[20 + 2 * r["size_mb"] for r in points], alpha=0.6, color=color,
                       label=precision)
    front = [measured[k] for k in result.front]
    ax.plot([r["latency_ms"]["median"] for r in front], [100 * r["accuracy"] for r in front],
            "k--", lw=1, label="Pareto front")
    base = result.baseline
    ax.axhline(100 * base["accuracy"] - result.max_drop, color="gray", lw=0.8, ls=":",
               label=f"budget: −{result.max_drop:g} points")
    if result.chosen:
        chosen = measured[result.chosen]
        ax.annotate(f"tuned: {result.chosen}", (chosen["latency_ms"]["median"],
                                                100 * chosen["accuracy"]),
                    textcoords="offset points", xytext=(10, -15), fontsize=8)
    ax.set_xlabel("median latency, ms (batch 1)")
    ax.set_ylabel("top-1 accuracy, %")
    ax.set_title("leanvgg tune: every candidate measured on this machine (area ∝ size)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, png.getvalue())
