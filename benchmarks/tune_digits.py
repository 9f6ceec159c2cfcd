"""`leanvgg tune`'s search on real data that runs offline: digits on a VGG-19 with torchvision's
real classifier (25,088 → 4,096 → 4,096 → 10).

Run: make bench-tune   (trains the model once, ~15 min on 2 cores; then the search)

The library's `search`, through the same builder and cache as every variant, on the VGG-19
trained by benchmarks/accuracy_digits.py with the wide head (10 epochs): validation on the 360
held-out digits (each accuracy with its 95 % Wilson interval), fine-tuned candidates trained on
the 1,437 training digits (Adam, lr 1e-5, one epoch: the rate that recovered pruning in that
experiment), static INT8 calibrated on 96 training digits (a tensor file). The digits model takes
32×32 inputs, the smallest a VGG's five poolings allow, so resolution is not searched here; the
space is filter pruning × classifier neuron pruning × low rank of classifier.0 × fine-tuning ×
precision. The report, the Pareto plot and the classifier table go to
benchmarks/results/tune_digits.{json,png}; the report doubles as the resume file. Artifacts go to
$LEANVGG_HOME/bench-tune (several GB: every candidate's model is kept, as `tune` keeps them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accuracy_digits import wide_digits
from torch.utils.data import TensorDataset

from leanvgg.evaluate import Labelled
from leanvgg.models import Baseline
from leanvgg.machine import native_bf16
from leanvgg.schema import write as write_report
from leanvgg.store import Store, default_root
from leanvgg.tune import Space, search
from leanvgg.tune_report import Measured, Record, format_front, plot_front

RESULTS = Path(__file__).parent / "results"


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--budget-minutes", type=float, default=None)
    parser.add_argument("--prune-ratios", type=_floats, default=(0.0, 0.5))
    parser.add_argument("--neuron-ratios", type=_floats, default=(0.0, 0.75))
    parser.add_argument("--ranks", default="0,128")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=10, help="of the trained model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    setup = wide_digits(args.epochs, args.seed)
    train, test, model, training, name = (setup.train, setup.test, setup.model,
                                          setup.training, setup.name)
    size = test.tensors[0].shape[-1]
    calibration = setup.calibration

    def at(dataset: TensorDataset):
        return lambda s: dataset if s == size else TensorDataset(
            torch.nn.functional.interpolate(dataset.tensors[0], size=(s, s), mode="bilinear",
                                            align_corners=False), dataset.tensors[1])

    space = Space(resolutions=(size,), prune_ratios=args.prune_ratios,
                  precisions=tuple(args.precisions.split(",")),
                  neuron_ratios=args.neuron_ratios,
                  ranks=tuple(int(r) for r in args.ranks.split(",")))
    RESULTS.mkdir(exist_ok=True)
    report = RESULTS / "tune_digits.json"
    result = search(Baseline(model, name, f"digits-{name}", meaningful=True),
                    Labelled("digits-test", at(test), torch.eye(10)),
                    max_drop=args.max_drop, space=space,
                    train=Labelled("digits-train", at(train), torch.eye(10)), finetune_lr=1e-5,
                    calibration=str(calibration), runs=args.runs,
                    budget_s=None if args.budget_minutes is None else 60 * args.budget_minutes,
                    store=Store(default_root() / "bench-tune"), report=report)
    plot_front(result, RESULTS / "tune_digits.png")
    document = json.loads(report.read_text())  # the search's report (leanvgg.schema)
    document["config"] |= {"training": training, "bf16_native": native_bf16()}
    write_report(report, document)
    print(format_front(result))
    print()
    print(classifier_table(result.candidates))


def classifier_table(candidates: dict[str, Record]) -> str:
    """What classifier compression buys and costs, INT8 and FP32 side by side (measured rows)."""
    rows = [{**r.to_dict(), "latency_ms": {"median": r.median_ms}} for r in candidates.values()
            if isinstance(r, Measured)]
    rows.sort(key=lambda r: (r["precision"], r["prune_ratio"], r["neuron_ratio"],
                             -r["rank"] if r["rank"] else -10**9, r["fine_tuned"]))
    header = (f"{'precision':<10}{'filters':>8}{'neurons':>8}{'rank':>6}{'tuned':>6}"
              f"{'size MB':>9}{'params M':>9}{'median ms':>10}{'accuracy (95% CI)':>24}")
    lines = [header, "-" * len(header)]
    for r in rows:
        low, high = r["accuracy_ci"]
        accuracy = f"{r['accuracy']:.1%} ({100 * low:.1f}–{100 * high:.1f})"
        lines.append(f"{r['precision']:<10}{r['prune_ratio']:>8g}{r['neuron_ratio']:>8g}"
                     f"{r['rank'] or '-':>6}{'yes' if r['fine_tuned'] else 'no':>6}"
                     f"{r['size_mb']:>9.1f}{r['params'] / 1e6:>9.1f}"
                     f"{r['latency_ms']['median']:>10.2f}{accuracy:>24}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
