"""What pruning, fine-tuning and INT8 cost in accuracy, on real data that ships offline.

scikit-learn's 1,797 handwritten digits (8×8, upsampled to 32×32, three channels) train a VGG-19:
torchvision's 16 convolutions with their layer indices unchanged, and a 10-way classifier sized
for the small input (512·7·7 → 512 → 512 → 10). The product's own functions then prune the same
9 convolutions at 10/30/50/70 %, fine-tune (Adam, lr 1e-4, one epoch) with the same grouped loss
(here each digit is its own group, which is cross-entropy), and quantize the Linear layers.

Run: make bench-accuracy   (ARGS="--epochs 40" to change the training length)
Writes benchmarks/results/accuracy_digits.{json,png}; the trained model goes to
$LEANVGG_HOME/digits/vgg19_digits_e{epochs}_s{seed}.pt (state dict + layout) and is reused by
later runs with the same epochs and seed.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from leanvgg import schema
from leanvgg.finetune import finetune
from leanvgg.models import from_layout, layout_of
from leanvgg.prune import prune_filters
from leanvgg.quantize import quantize_dynamic_int8
from leanvgg.store import default_root

SIZE = 32
RATIOS = (0.1, 0.3, 0.5, 0.7)
LAYOUT = {"arch": "vgg", "batch_norm": False,
          "cfg": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                  512, 512, 512, 512, "M"],
          "linear_features": [512 * 7 * 7, 512, 512, 10]}
# torchvision's real classifier shape (25,088 → 4,096 → 4,096 → 10): what classifier
# compression (neuron pruning, low rank) is about; benchmarks/tune_digits.py trains this one.
WIDE_LAYOUT = {**LAYOUT, "linear_features": [512 * 7 * 7, 4096, 4096, 10]}
RESULTS = Path(__file__).parent / "results"


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """A stratified 80/20 split of the real digits, scaled to [0, 1] then standardised."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16
    images = torch.nn.functional.interpolate(images, size=SIZE, mode="bilinear",
                                             align_corners=False).repeat(1, 3, 1, 1)
    labels = torch.tensor(data.target)
    train, test = train_test_split(torch.arange(len(labels)), test_size=0.2,
                                   stratify=labels, random_state=seed)
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return (TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test]))


def accuracy(model: torch.nn.Module, dataset: TensorDataset) -> float:
    images, labels = dataset.tensors
    with torch.inference_mode():
        predictions = torch.cat([model.eval()(batch).argmax(1) for batch in images.split(128)])
    return float((predictions == labels).float().mean())


def trained_vgg19(train: TensorDataset, *, epochs: int, path: Path,
                  layout: dict = LAYOUT) -> tuple[torch.nn.Module, dict]:
    if path.exists():
        saved = torch.load(path, weights_only=True)
        model = from_layout(saved["layout"])
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["training"]
    torch.manual_seed(0)
    model = from_layout(layout)
    for module in model.modules():  # torchvision's VGG initialisation
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, 0, 0.01)
            torch.nn.init.zeros_(module.bias)
    # 1,437 images make few steps per epoch: small batches and many epochs get VGG-19 (no
    # batch norm) off its initial plateau.
    model, stats = finetune(model, train, torch.eye(10), epochs=epochs, lr=1e-4, batch_size=16)
    training = {"epochs": epochs, "batch_size": 16, "lr": 1e-4, "seconds": stats.seconds,
                "final_loss": stats.final_loss}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"layout": layout_of(model), "state_dict": model.state_dict(),
                "training": training}, path)
    return model, training


@dataclass(frozen=True)
class WideDigits:
    """The digits VGG-19 with torchvision's real classifier (WIDE_LAYOUT) that tune_digits and
    runtime_fidelity measure, its data, and a file of 96 training digits to calibrate on."""

    train: TensorDataset
    test: TensorDataset
    model: torch.nn.Module
    training: dict
    name: str
    calibration: Path


def wide_digits(epochs: int, seed: int) -> WideDigits:
    """Trained once (then loaded) under $LEANVGG_HOME/digits; the calibration file likewise."""
    train, test = digits(seed)
    root = default_root() / "digits"
    name = f"vgg19_digits_wide_e{epochs}_s{seed}"
    model, training = trained_vgg19(train, epochs=epochs, layout=WIDE_LAYOUT,
                                    path=root / f"{name}.pt")
    calibration = root / f"calibration_s{seed}.pt"
    if not calibration.exists():
        torch.save(train.tensors[0][torch.randperm(
            len(train), generator=torch.Generator().manual_seed(seed))[:96]].clone(),
            calibration)
    return WideDigits(train, test, model, training, name, calibration)


def wide_digits_from_command_line(doc: str, out: Path | None = None
                                  ) -> tuple[WideDigits, Path | None]:
    """``wide_digits`` for a benchmark's ``--epochs`` (of the trained model, default 10) and
    ``--seed``, its ``doc`` as the help text; with ``out`` (the benchmark's report), also
    ``--out`` to write it elsewhere (one report per CPU kind), returned beside the setup."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="of the trained model")
    parser.add_argument("--seed", type=int, default=0)
    if out is not None:
        parser.add_argument("--out", type=Path, default=out,
                            help=f"the report to write (default {out.name})")
    args = parser.parse_args()
    return wide_digits(args.epochs, args.seed), getattr(args, "out", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=25, help="training epochs (default 25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-lr", type=float, default=1e-4,
                        help="Adam learning rate of the recovery epoch (default 1e-4, the "
                             "product's recipe; other values write results with a suffix)")
    args = parser.parse_args()
    train, test = digits(args.seed)
    model, training = trained_vgg19(
        train, epochs=args.epochs,
        path=default_root() / "digits" / f"vgg19_digits_e{args.epochs}_s{args.seed}.pt")
    groups = torch.eye(10)
    rows = {"baseline": accuracy(model, test),
            "quantized": accuracy(quantize_dynamic_int8(model), test)}
    pruning = []
    for ratio in RATIOS:
        pruned, _ = prune_filters(model, ratio=ratio)
        started = time.perf_counter()
        tuned, stats = finetune(pruned, train, groups, epochs=1, lr=args.finetune_lr,
                                batch_size=32, seed=args.seed)
        pruning.append({"ratio": ratio, "before_finetune": accuracy(pruned, test),
                        "after_finetune": accuracy(tuned, test),
                        "finetune_seconds": time.perf_counter() - started,
                        "finetune_loss": stats.final_loss})
        if ratio == 0.1:
            rows["pruned_quantized (10 %, fine-tuned)"] = accuracy(quantize_dynamic_int8(tuned),
                                                                  test)
            rows["pruned_quantized (10 %, not fine-tuned)"] = accuracy(
                quantize_dynamic_int8(pruned), test)
    report = schema.document(
        "benchmark/accuracy_digits", [{"name": n, "accuracy": v} for n, v in rows.items()],
        config={"train_images": len(train), "test_images": len(test), "input_size": SIZE,
                "training": training, "finetune_lr": args.finetune_lr},
        threads=torch.get_num_threads(), pruning=pruning)
    name = "accuracy_digits" + ("" if args.finetune_lr == 1e-4 else f"_lr{args.finetune_lr:g}")
    schema.write(RESULTS / f"{name}.json", report)
    plot(report, RESULTS / f"{name}.png")

    print(f"held-out accuracy on {len(test)} real digits (trained on {len(train)}):")
    for name, value in rows.items():
        print(f"  {name:<42}{value:8.2%}")
    print(f"  {'pruning ratio':<14}{'before fine-tune':>18}{'after 1 epoch':>15}")
    for row in pruning:
        print(f"  {row['ratio']:<14.0%}{row['before_finetune']:>18.2%}"
              f"{row['after_finetune']:>15.2%}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [100 * r["ratio"] for r in report["pruning"]]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(ratios, [100 * r["before_finetune"] for r in report["pruning"]], "o-",
            label="pruned, before fine-tuning")
    ax.plot(ratios, [100 * r["after_finetune"] for r in report["pruning"]], "s-",
            label=f"pruned + 1 epoch fine-tuning (Adam lr {report['finetune_lr']:g})")
    ax.axhline(100 * report["accuracy"]["baseline"], color="gray", ls="--", label="baseline")
    ax.axhline(100 * report["accuracy"]["quantized"], color="tab:green", ls=":",
               label="INT8 Linear (not pruned)")
    ax.set(xlabel="filters removed from the 9 deepest convs (%)", ylabel="held-out accuracy (%)",
           title=f"VGG-19 on {report['test_images']} held-out real digits", ylim=(0, 101))
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
