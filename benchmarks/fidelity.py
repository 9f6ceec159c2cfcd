"""How faithful the fast variants are to FP32: accuracy, top-1 agreement and logit error.

Run: make bench-fidelity   (after `make bench-accuracy` has trained the digits VGG-19 once)

1. The digits-trained VGG-19 of benchmarks/accuracy_digits.py (real, held-out data): the
   product's own functions make static INT8 (calibrated on 96 training digits), turbo (filters
   pruned to 16-channel blocks, then static INT8; with and without one recovery epoch) and
   bf16, each compiled like the product's variants; held-out accuracy, top-1 agreement with
   FP32 and the largest logit difference.
2. The leanvgg variants as built for the current weights (random unless --weights says
   otherwise) on real photos that were NOT used for calibration, with their mirror images.
Writes benchmarks/results/fidelity.json.
"""

from __future__ import annotations

import argparse
import importlib.resources
from pathlib import Path

import torch
from accuracy_digits import digits, trained_vgg19
from PIL import Image

from leanvgg import schema
from leanvgg.finetune import finetune
from leanvgg.images import preprocess
from leanvgg.models import load_baseline
from leanvgg.prune import prune_filters
from leanvgg.quantize import quantize_static_int8
from leanvgg.runtime import compile_for_cpu, to_bf16
from leanvgg.store import Store, default_root
from leanvgg.variants import build_variants, default_names

RESULTS = Path(__file__).parent / "results"
# scikit-image photos that are not among leanvgg's calibration photos
HELD_OUT_PHOTOS = ("motorcycle_left.png", "logo.png", "color.png", "ihc.png", "coins.png",
                   "camera.png", "moon.png", "page.png")


def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(batch) for batch in images.split(64)]).float()


def fidelity(reference: torch.Tensor, output: torch.Tensor,
             labels: torch.Tensor | None = None) -> dict:
    row = {"top1_agreement": float((output.argmax(1) == reference.argmax(1)).float().mean()),
           "max_logit_diff": float((output - reference).abs().max()),
           "logit_range": float(reference.max() - reference.min())}
    if labels is not None:
        row["accuracy"] = float((output.argmax(1) == labels).float().mean())
    return row


def digits_fidelity(epochs: int, seed: int) -> dict:
    path = default_root() / "digits" / f"vgg19_digits_e{epochs}_s{seed}.pt"
    train, test = digits(seed)
    model, _ = trained_vgg19(train, epochs=epochs, path=path)
    images, labels = test.tensors
    size = images.shape[-1]
    calibration = train.tensors[0][torch.randperm(len(train), generator=torch.Generator()
                                                  .manual_seed(seed))[:96]]
    pruned, _ = prune_filters(model, ratio=0.1, multiple_of=16)
    recovered, _ = finetune(pruned, train, torch.eye(10), epochs=1, lr=1e-5, batch_size=32,
                            seed=seed, progress=False)
    candidates = {
        "int8_static": quantize_static_int8(model, calibration),
        "turbo (not fine-tuned)": quantize_static_int8(pruned, calibration),
        "turbo (fine-tuned 1 epoch, lr 1e-5)": quantize_static_int8(recovered, calibration),
        "bf16": to_bf16(model),
    }
    reference = logits(model, images)
    rows = {"fp32": fidelity(reference, reference, labels)}
    for name, candidate in candidates.items():
        compiled, _ = compile_for_cpu(candidate, size, threads=torch.get_num_threads())
        rows[name] = fidelity(reference, logits(compiled, images), labels)
    return {"test_images": len(labels), "calibration_images": len(calibration), "rows": rows}


def photo_fidelity(weights: str) -> dict:
    baseline = load_baseline(weights, progress=False)
    variant_set = build_variants(baseline, default_names(), store=Store(), progress=False)
    folder = importlib.resources.files("skimage.data")
    photos = [Image.open(folder / name).convert("RGB") for name in HELD_OUT_PHOTOS]
    rows = {}
    for size in sorted({v.input_size for v in variant_set.variants.values()}):
        batch = torch.cat([preprocess(p, size) for p in photos])
        batch = torch.cat([batch, batch.flip(-1)])
        reference = logits(variant_set.variants["baseline"].model, batch)
        for name, variant in variant_set.variants.items():
            if variant.input_size == size and name != "baseline":
                rows[name] = fidelity(reference, logits(variant.model, batch))
        if size != 224:  # the baseline itself at this size, for comparison
            rows[f"baseline@{size}"] = fidelity(
                logits(variant_set.variants["baseline"].model,
                       torch.cat([preprocess(p, 224) for p in photos] * 2)), reference)
    return {"weights": baseline.weights, "images": 2 * len(photos), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default="random")
    args = parser.parse_args()
    parts = {"digits": digits_fidelity(args.epochs, args.seed),
             "photos": photo_fidelity(args.weights)}
    report = schema.document(
        "benchmark/fidelity",
        [{"name": f"{part}/{name}", "data": part, **row}
         for part, found in parts.items() for name, row in found.pop("rows").items()],
        config={"epochs": args.epochs, "seed": args.seed, **parts},
        threads=torch.get_num_threads())
    schema.write(RESULTS / "fidelity.json", report)
    for part in parts:
        print(f"\n{part}:")
        for row in (r for r in report["results"] if r["data"] == part):
            name = row["name"].split("/", 1)[1]
            acc = f"{row['accuracy']:8.2%}" if "accuracy" in row else "       —"
            print(f"  {name:<38}{acc}  agreement {row['top1_agreement']:7.2%}  "
                  f"max |Δlogit| {row['max_logit_diff']:.4f} (range {row['logit_range']:.2f})")


if __name__ == "__main__":
    main()
