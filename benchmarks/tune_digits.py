"""`leanvgg tune`'s search on real data that runs offline: the digits-trained VGG-19.

Run: make bench-tune   (after `make bench-accuracy` has trained the model once)

The library's `search` on the VGG-19 trained by benchmarks/accuracy_digits.py: validation on
the 360 held-out digits, fine-tuned candidates trained on the 1,437 training digits (Adam,
lr 1e-5, one epoch: the rate that recovered pruning in that experiment), static INT8 calibrated
on 96 training digits. The digits model takes 32×32 inputs, the smallest a VGG's five poolings
allow, so resolution is not searched here (`--resolutions 32`). The report, the Pareto plot and
the sensitivity table go to benchmarks/results/tune_digits.{json,png}; the report doubles as the
resume file (rerun to continue an interrupted search).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accuracy_digits import digits, trained_vgg19
from torch.utils.data import TensorDataset

from leanvgg.evaluate import Labelled
from leanvgg.measure import machine_facts
from leanvgg.runtime import native_bf16
from leanvgg.store import default_root
from leanvgg.tune import Space, format_front, plot_front, search

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--budget-minutes", type=float, default=None)
    parser.add_argument("--prune-ratios", default="0,0.1,0.2,0.3,0.5")
    parser.add_argument("--precisions",
                        default="fp32,bf16,int8" if native_bf16() else "fp32,int8")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=25, help="of the trained model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train, test = digits(args.seed)
    model, _ = trained_vgg19(
        train, epochs=args.epochs,
        path=default_root() / "digits" / f"vgg19_digits_e{args.epochs}_s{args.seed}.pt")
    size = test.tensors[0].shape[-1]

    def at(dataset: TensorDataset):
        return lambda s: dataset if s == size else TensorDataset(
            torch.nn.functional.interpolate(dataset.tensors[0], size=(s, s), mode="bilinear",
                                            align_corners=False), dataset.tensors[1])

    calibration_images = train.tensors[0][torch.randperm(
        len(train), generator=torch.Generator().manual_seed(args.seed))[:96]]
    space = Space(resolutions=(size,),
                  prune_ratios=tuple(float(r) for r in args.prune_ratios.split(",")),
                  precisions=tuple(args.precisions.split(",")))
    RESULTS.mkdir(exist_ok=True)
    report = RESULTS / "tune_digits.json"
    result = search(model, Labelled("digits-test", at(test), torch.eye(10)),
                    max_drop=args.max_drop, space=space,
                    train=Labelled("digits-train", at(train), torch.eye(10)), finetune_lr=1e-5,
                    calibration=lambda s: calibration_images, runs=args.runs,
                    budget_s=None if args.budget_minutes is None else 60 * args.budget_minutes,
                    report=report, model_id=f"digits-vgg19-e{args.epochs}-s{args.seed}")
    plot_front(result, RESULTS / "tune_digits.png")
    state = json.loads(report.read_text())
    state["machine"] = machine_facts(torch.get_num_threads())
    report.write_text(json.dumps(state, indent=2) + "\n")
    print(format_front(result))
    print("\nsensitivity (accuracy with one conv pruned, before fine-tuning):")
    ratios = sorted({r for row in result.sensitivity.values() for r in row}, key=float)
    print(f"  {'conv':<6}" + "".join(f"{r:>8}" for r in ratios))
    for layer, row in result.sensitivity.items():
        print(f"  {layer:<6}" + "".join(f"{row[r]:>8.2%}" for r in ratios))


if __name__ == "__main__":
    main()
