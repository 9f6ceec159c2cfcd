"""Dynamic INT8 of VGG-19's Linear layers: torch.ao (deprecated) vs torchao, side by side.

Run: make bench-quantization   (installs the `bench` extra, i.e. torchao, into .venv)
Random weights (timings and sizes only). Prints medians of the classifier alone (where the
quantized layers are) and of the whole network, and each as a ratio to FP32 in the same run.
"""

from __future__ import annotations

import argparse
import json

import torch

from leanvgg import schema
from leanvgg.measure import state_dict_bytes, time_models
from leanvgg.models import load_baseline
from leanvgg.quantize import BACKENDS, quantize_dynamic_int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fp32 = load_baseline("random", progress=False).model
    models = {"fp32": fp32, **{b: quantize_dynamic_int8(fp32, backend=b) for b in BACKENDS}}
    features = torch.randn(1, 512 * 7 * 7)
    image = torch.randn(1, 3, 224, 224)
    heads = time_models({n: (m.classifier, features) for n, m in models.items()},
                        runs=args.runs * 4, warmup=args.warmup)
    networks = time_models({n: (m, image) for n, m in models.items()},
                           runs=args.runs, warmup=args.warmup)
    rows = {name: {"classifier_ms": heads[name][0].median, "network_ms": networks[name][0].median,
                   "size_mb": state_dict_bytes(model) / 2**20}
            for name, model in models.items()}
    print(f"{'backend':<10}{'classifier ms':>15}{'× fp32':>8}{'network ms':>12}{'× fp32':>8}"
          f"{'size MB':>9}")
    for name, row in rows.items():
        print(f"{name:<10}{row['classifier_ms']:>15.2f}"
              f"{rows['fp32']['classifier_ms'] / row['classifier_ms']:>8.2f}"
              f"{row['network_ms']:>12.1f}{rows['fp32']['network_ms'] / row['network_ms']:>8.2f}"
              f"{row['size_mb']:>9.1f}")
    report = schema.document(
        "benchmark/quantization_backends",
        [{"name": name, **row, "latency_ms": networks[name][0].to_dict(),
          "classifier_latency_ms": heads[name][0].to_dict()} for name, row in rows.items()],
        config={"runs": args.runs, "warmup": args.warmup, "weights": "random"},
        threads=args.threads)
    schema.validate(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
