"""``leanvgg tune``'s report: the Pareto front, the choice within the budget, the table and the
plot. Kept apart from the search so that the server, which only shows reports, never imports
the search (and its training and compiling) to do it.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from leanvgg.measure import Latency
from leanvgg.recipes import Candidate
from leanvgg.schema import SCHEMA_VERSION, document
from leanvgg.files import write_atomic

# 3: intervals, classifier compression, candidates built by the one builder; 4: the report
# schema (leanvgg.schema), candidates as its results
REPORT_FORMAT = 4


Interval = tuple[float, float]


@dataclass(frozen=True)
class Skipped:
    """A candidate the search did not measure, and why (dominated, beyond the sensitivity
    budget, a step that does not apply)."""

    candidate: Candidate
    reason: str

    @property
    def key(self) -> str:
        return self.candidate.key

    def to_dict(self) -> dict:
        return {**asdict(self.candidate), "skipped": self.reason}


@dataclass(frozen=True)
class Measured:
    """A candidate built, counted on the validation set (each rate with its 95 % Wilson
    interval; agreement: top-1 equal to the reference's) and timed at batch 1."""

    candidate: Candidate
    accuracy: float
    accuracy_ci: Interval
    top3: float
    top3_ci: Interval
    agreement: float
    agreement_ci: Interval
    images: int
    latency: Latency
    size_mb: float
    params: int
    macs: int
    prepare_s: float  # building, training and compiling it (0 when loaded)
    artifact: str  # the cache entry measured (the ``tuned`` variant loads this very entry)
    steps: tuple[dict, ...]

    @property
    def key(self) -> str:
        return self.candidate.key

    @property
    def median_ms(self) -> float:
        return self.latency.median

    def drop(self, reference: Measured) -> float:
        """Accuracy points lost against ``reference``."""
        return 100 * (reference.accuracy - self.accuracy)

    def to_dict(self) -> dict:
        return {**asdict(self.candidate), "accuracy": self.accuracy,
                "accuracy_ci": list(self.accuracy_ci), "top3": self.top3,
                "top3_ci": list(self.top3_ci), "agreement": self.agreement,
                "agreement_ci": list(self.agreement_ci), "images": self.images,
                "latency_ms": self.latency.to_dict(), "size_mb": self.size_mb,
                "params": self.params, "macs": self.macs, "prepare_s": self.prepare_s,
                "artifact": self.artifact, "steps": list(self.steps)}


Record = Measured | Skipped


def record_of(data: dict) -> Record:
    """A report's candidate record, typed (KeyError, TypeError or ValueError if malformed)."""
    candidate = candidate_of(data)
    if "accuracy" not in data:
        return Skipped(candidate, str(data.get("skipped")))
    return Measured(candidate, float(data["accuracy"]), _pair(data["accuracy_ci"]),
                    float(data["top3"]), _pair(data["top3_ci"]), float(data["agreement"]),
                    _pair(data["agreement_ci"]), int(data["images"]),
                    Latency.from_dict(data["latency_ms"]), float(data["size_mb"]),
                    int(data["params"]), int(data["macs"]), float(data["prepare_s"]),
                    str(data["artifact"]), tuple(data["steps"]))


def _pair(values) -> Interval:
    low, high = values
    return float(low), float(high)


@dataclass
class TuneResult:
    baseline: Measured | None  # the FP32, unpruned, full-resolution record (None: not measured)
    candidates: dict[str, Record]  # key → what was measured, or why it was skipped
    front: list[str]  # keys on the Pareto front, fastest first
    chosen: str | None  # the fastest key within the budget (latency ties: most accurate)
    sensitivity: dict[str, dict[str, float]]  # layer → ratio → accuracy
    max_drop: float
    complete: bool  # False when the time budget ended the search
    layers: dict[str, list[int]] = field(default_factory=dict)  # ratio → layers pruned
    multiple_of: int = 1
    finetune: dict | None = None  # data, lr, epochs and seed of fine-tuned candidates
    calibration: str | None = None  # static INT8's calibration source (None: bundled photos)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "baseline": self.baseline.to_dict() if self.baseline else None,
                "candidates": {k: r.to_dict() for k, r in self.candidates.items()}}

    def measured(self) -> dict[str, Measured]:
        return {k: r for k, r in self.candidates.items() if isinstance(r, Measured)}


def candidate_of(record: dict) -> Candidate:
    """The candidate a report record describes."""
    return Candidate(**{f.name: record[f.name] for f in dataclasses.fields(Candidate)
                        if f.name in record})


def pareto_front(records: Sequence[Measured]) -> list[Measured]:
    """Records no other record beats on both latency (lower) and accuracy (higher)."""
    front: list[Measured] = []
    for record in sorted(records, key=lambda r: (r.median_ms, -r.accuracy)):
        if not front or record.accuracy > front[-1].accuracy:
            front.append(record)
    return front


def ties(a: Measured, b: Measured) -> bool:
    """Whether two latencies are within measurement noise: their p10–p90 ranges overlap."""
    la, lb = a.latency, b.latency
    return la.p10 <= lb.p90 and lb.p10 <= la.p90


def choose(records: dict[str, Record], baseline_key: str, max_drop: float) -> str | None:
    """The fastest candidate within ``max_drop`` points of the baseline's accuracy.

    Candidates whose latency ties the fastest's (``ties``) are as fast as far as the
    measurement can tell: among them the most accurate wins, then the smallest.
    """
    baseline = records.get(baseline_key)
    if not isinstance(baseline, Measured):
        return None
    within = [r for r in records.values()
              if isinstance(r, Measured) and r.drop(baseline) <= max_drop]
    if not within:
        return None
    fastest = min(within, key=lambda r: r.median_ms)
    best = max((r for r in within if ties(r, fastest)),
               key=lambda r: (r.accuracy, -r.size_mb, -r.median_ms))
    return best.key


def records_of(state: dict) -> dict[str, Record]:
    """A search state's candidates, typed."""
    return {key: record_of(data) for key, data in state["candidates"].items()}


def result_of(state: dict, complete: bool = True) -> TuneResult:
    """A saved (or in-progress) search state as a result: its front and its choice."""
    records = records_of(state)
    measured = [r for r in records.values() if isinstance(r, Measured)]
    front = [r.key for r in pareto_front(measured)]
    baseline = records.get(state["baseline_key"])
    return TuneResult(baseline=baseline if isinstance(baseline, Measured) else None,
                      candidates=records,
                      front=front, chosen=choose(records, state["baseline_key"],
                                                 state["max_drop"]),
                      sensitivity=state["sensitivity"], max_drop=state["max_drop"],
                      complete=complete, layers=state["layers"],
                      multiple_of=state["multiple_of"], finetune=state["finetune"],
                      calibration=state["calibration"], warnings=state.get("warnings", []))


def to_document(state: dict, threads: int) -> dict:
    """The search's state as a report (``leanvgg.schema``, kind ``tune``): one result per
    candidate (measured or skipped), named by its key; ``threads``: its latency's."""
    rest = {k: v for k, v in state.items() if k not in ("candidates", "settings")}
    return document("tune", [{"name": key, **record}
                             for key, record in state["candidates"].items()],
                    config=state["settings"], threads=threads, **rest)


def from_document(report: dict) -> dict:
    """The search's state from its report (``to_document``); ValueError for another format."""
    if (report.get("schema_version"), report.get("format")) != (SCHEMA_VERSION, REPORT_FORMAT):
        raise ValueError(f"report format {report.get('format')!r} (schema "
                         f"{report.get('schema_version')!r}), not {REPORT_FORMAT} "
                         f"(schema {SCHEMA_VERSION})")
    skip = ("schema_version", "kind", "created", "machine", "config", "results")
    return {**{k: v for k, v in report.items() if k not in skip},
            "settings": report["config"],
            "candidates": {r["name"]: {k: v for k, v in r.items() if k != "name"}
                           for r in report["results"]}}


def summarize(state: dict) -> dict:
    """A search's state as the dashboard shows it: candidates with front and choice marked."""
    result = result_of(state)
    measured = [{**r.to_dict(), "key": k, "on_front": k in result.front,
                 "chosen": k == result.chosen} for k, r in result.measured().items()]
    return {"model_id": state["model_id"], "max_drop": result.max_drop,
            "baseline": result.baseline.to_dict() if result.baseline else None,
            "chosen": result.chosen, "front": result.front, "candidates": measured,
            "warnings": result.warnings,
            "skipped": len(result.candidates) - len(measured)}


def tuned_config(result: TuneResult) -> dict:
    """What ``variants.register_tuned`` needs to name the chosen candidate's cache entries."""
    chosen = result.candidates[result.chosen]
    candidate = chosen.candidate
    return {"key": result.chosen, "candidate": asdict(candidate),
            "layers": result.layers.get(f"{candidate.prune_ratio:g}", []),
            "multiple_of": result.multiple_of,
            "finetune": result.finetune if candidate.fine_tuned else None,
            "calibration": result.calibration, "max_drop": result.max_drop,
            "accuracy": chosen.accuracy, "latency_ms": chosen.latency.to_dict(),
            "artifact": chosen.artifact}


def _interval(record: Measured) -> str:
    low, high = record.accuracy_ci
    return f"{100 * low:.1f}–{100 * high:.1f}"


def format_front(result: TuneResult) -> str:
    """The Pareto front as a table, the choice marked, with each accuracy's 95 % interval."""
    base = result.baseline
    header = (f"{'candidate':<44}{'accuracy':>9}{'95% CI':>12}{'drop':>7}{'median ms':>11}"
              f"{'p10–p90':>13}{'speedup':>9}{'size MB':>9}")
    lines = [header, "-" * len(header)]
    shown = list(result.front)
    if result.chosen and result.chosen not in shown:  # a latency tie of a front point
        shown.append(result.chosen)
    for key in shown:
        r = result.candidates[key]
        latency = r.latency
        spread = f"{latency.p10:.1f}–{latency.p90:.1f}"
        mark = "" if key != result.chosen else (
            "  ← chosen" if key in result.front else "  ← chosen (ties the front on latency)")
        lines.append(f"{key:<44}{r.accuracy:>9.2%}{_interval(r):>12}{r.drop(base):>7.2f}"
                     f"{latency.median:>11.1f}{spread:>13}"
                     f"{base.median_ms / latency.median:>8.2f}×"
                     f"{r.size_mb:>9.1f}{mark}")
    measured = len(result.measured())
    skipped = len(result.candidates) - measured
    lines.append(f"{measured} candidates measured, {skipped} skipped"
                 f"{'' if result.complete else ', stopped by the time budget'}; "
                 f"budget {result.max_drop:g} points below FP32 {base.accuracy:.2%} "
                 f"({_interval(base)} on {base.images} images)")
    lines += [f"WARNING: {w}" for w in result.warnings]
    return "\n".join(lines)


def plot_front(result: TuneResult, path: Path) -> None:
    """Latency vs accuracy of every measured candidate (marker area ∝ size), front joined,
    each accuracy with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = result.measured()
    colors = {"fp32": "tab:blue", "bf16": "tab:orange", "int8": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for precision, color in colors.items():
        points = [r for r in measured.values() if r.candidate.precision == precision]
        if points:
            x = [r.median_ms for r in points]
            y = [100 * r.accuracy for r in points]
            ax.errorbar(x, y, yerr=[[100 * (r.accuracy - r.accuracy_ci[0]) for r in points],
                                    [100 * (r.accuracy_ci[1] - r.accuracy) for r in points]],
                        fmt="none", ecolor=color, alpha=0.3, lw=1)
            ax.scatter(x, y, s=[20 + 2 * r.size_mb for r in points], alpha=0.6, color=color,
                       label=precision)
    front = [measured[k] for k in result.front]
    ax.plot([r.median_ms for r in front], [100 * r.accuracy for r in front],
            "k--", lw=1, label="Pareto front")
    base = result.baseline
    ax.axhline(100 * base.accuracy - result.max_drop, color="gray", lw=0.8, ls=":",
               label=f"budget: −{result.max_drop:g} points")
    if result.chosen:
        chosen = measured[result.chosen]
        ax.annotate(f"tuned: {result.chosen}", (chosen.median_ms, 100 * chosen.accuracy),
                    textcoords="offset points", xytext=(10, -15), fontsize=8)
    ax.set_xlabel("median latency, ms (batch 1)")
    ax.set_ylabel(f"top-1 accuracy, % (95 % Wilson interval, {base.images} images)")
    ax.set_title("leanvgg tune: every candidate measured on this machine (area ∝ size)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, png.getvalue())
