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

from leanvgg.recipes import Candidate
from leanvgg.schema import SCHEMA_VERSION, document
from leanvgg.files import write_atomic

# 3: intervals, classifier compression, candidates built by the one builder; 4: the report
# schema (leanvgg.schema), candidates as its results
REPORT_FORMAT = 4


@dataclass
class TuneResult:
    baseline: dict | None  # the FP32, unpruned, full-resolution record (None: not measured)
    candidates: dict[str, dict]  # key → record (config, accuracy, latency, size, MACs) or skip
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
        return asdict(self)


def candidate_of(record: dict) -> Candidate:
    """The candidate a report record describes."""
    return Candidate(**{f.name: record[f.name] for f in dataclasses.fields(Candidate)
                        if f.name in record})


def pareto_front(records: Sequence[dict]) -> list[dict]:
    """Records no other record beats on both latency (lower) and accuracy (higher)."""
    front: list[dict] = []
    for record in sorted(records, key=lambda r: (r["latency_ms"]["median"], -r["accuracy"])):
        if not front or record["accuracy"] > front[-1]["accuracy"]:
            front.append(record)
    return front


def ties(a: dict, b: dict) -> bool:
    """Whether two latencies are within measurement noise: their p10–p90 ranges overlap."""
    la, lb = a["latency_ms"], b["latency_ms"]
    return la["p10"] <= lb["p90"] and lb["p10"] <= la["p90"]


def choose(records: dict[str, dict], baseline_key: str, max_drop: float) -> str | None:
    """The fastest candidate within ``max_drop`` points of the baseline's accuracy.

    Candidates whose latency ties the fastest's (``ties``) are as fast as far as the
    measurement can tell: among them the most accurate wins, then the smallest.
    """
    baseline = records.get(baseline_key)
    if baseline is None:
        return None
    within = [r for r in records.values() if "accuracy" in r
              and 100 * (baseline["accuracy"] - r["accuracy"]) <= max_drop]
    if not within:
        return None
    fastest = min(within, key=lambda r: r["latency_ms"]["median"])
    best = max((r for r in within if ties(r, fastest)),
               key=lambda r: (r["accuracy"], -r["size_mb"], -r["latency_ms"]["median"]))
    return candidate_of(best).key


def result_of(state: dict, complete: bool = True) -> TuneResult:
    """A saved (or in-progress) search state as a result: its front and its choice."""
    records = state["candidates"]
    measured = [r for r in records.values() if "accuracy" in r]
    front = [candidate_of(r).key for r in pareto_front(measured)]
    return TuneResult(baseline=records.get(state["baseline_key"]), candidates=records,
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
    measured = [{**r, "key": k, "on_front": k in result.front, "chosen": k == result.chosen}
                for k, r in result.candidates.items() if "accuracy" in r]
    return {"model_id": state["model_id"], "max_drop": result.max_drop,
            "baseline": result.baseline, "chosen": result.chosen, "front": result.front,
            "candidates": measured, "warnings": result.warnings,
            "skipped": sum("accuracy" not in r for r in result.candidates.values())}


def tuned_config(result: TuneResult) -> dict:
    """What ``variants.register_tuned`` needs to name the chosen candidate's cache entries."""
    chosen = result.candidates[result.chosen]
    candidate = candidate_of(chosen)
    return {"key": result.chosen, "candidate": asdict(candidate),
            "layers": result.layers.get(f"{candidate.prune_ratio:g}", []),
            "multiple_of": result.multiple_of,
            "finetune": result.finetune if candidate.fine_tuned else None,
            "calibration": result.calibration, "max_drop": result.max_drop,
            "accuracy": chosen["accuracy"], "latency_ms": chosen["latency_ms"],
            "artifact": chosen["artifact"]}


def _interval(record: dict) -> str:
    low, high = record["accuracy_ci"]
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
        drop = 100 * (base["accuracy"] - r["accuracy"])
        latency = r["latency_ms"]
        spread = f"{latency['p10']:.1f}–{latency['p90']:.1f}"
        mark = "" if key != result.chosen else (
            "  ← chosen" if key in result.front else "  ← chosen (ties the front on latency)")
        lines.append(f"{key:<44}{r['accuracy']:>9.2%}{_interval(r):>12}{drop:>7.2f}"
                     f"{latency['median']:>11.1f}{spread:>13}"
                     f"{base['latency_ms']['median'] / latency['median']:>8.2f}×"
                     f"{r['size_mb']:>9.1f}{mark}")
    measured = sum("accuracy" in r for r in result.candidates.values())
    skipped = len(result.candidates) - measured
    lines.append(f"{measured} candidates measured, {skipped} skipped"
                 f"{'' if result.complete else ', stopped by the time budget'}; "
                 f"budget {result.max_drop:g} points below FP32 {base['accuracy']:.2%} "
                 f"({_interval(base)} on {base['images']} images)")
    lines += [f"WARNING: {w}" for w in result.warnings]
    return "\n".join(lines)


def plot_front(result: TuneResult, path: Path) -> None:
    """Latency vs accuracy of every measured candidate (marker area ∝ size), front joined,
    each accuracy with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = {k: r for k, r in result.candidates.items() if "accuracy" in r}
    colors = {"fp32": "tab:blue", "bf16": "tab:orange", "int8": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for precision, color in colors.items():
        points = [r for r in measured.values() if r["precision"] == precision]
        if points:
            x = [r["latency_ms"]["median"] for r in points]
            y = [100 * r["accuracy"] for r in points]
            ax.errorbar(x, y, yerr=[[100 * (r["accuracy"] - r["accuracy_ci"][0]) for r in points],
                                    [100 * (r["accuracy_ci"][1] - r["accuracy"]) for r in points]],
                        fmt="none", ecolor=color, alpha=0.3, lw=1)
            ax.scatter(x, y, s=[20 + 2 * r["size_mb"] for r in points], alpha=0.6, color=color,
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
    ax.set_ylabel(f"top-1 accuracy, % (95 % Wilson interval, {base['images']} images)")
    ax.set_title("leanvgg tune: every candidate measured on this machine (area ∝ size)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, png.getvalue())
