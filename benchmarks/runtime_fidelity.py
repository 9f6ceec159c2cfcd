"""Does the choice of runtime change what a variant predicts? Top-1 agreement with Inductor.

Run: make bench-fidelity   (uses the digits VGG-19 that `make bench-tune` trains, or trains it)

The digits-trained VGG-19 with torchvision's real classifier (benchmarks/tune_digits.py's
model; real, held-out handwritten digits at 32 px) made static INT8 by the product's own build
path (recipe → builder, calibrated on 96 training digits), then run on each runtime
leanvgg.runtimes offers: Inductor (leanvgg's PT2E INT8, compiled), ONNX Runtime and OpenVINO
(the same INT8 model exported to ONNX as QDQ; OpenVINO's IR converted from that file; until
2026-12-07 each runtime's own quantizer, NNCF for OpenVINO, quantized the float weights again),
and, where the CPU computes in bf16, OpenVINO at its default precision (openvino_bf16: the same
IR, what is not INT8 in bf16). For each: held-out accuracy and top-1 agreement with the Inductor
path, both with 95 % Wilson intervals, and the largest logit difference; for openvino_bf16 also
its agreement with the same IR in f32 (the variant's own INT8 model), which decides whether the
runtime choice may use it. Target (issues 15 and 24): agreement >= 99 %.
Writes benchmarks/results/runtime_fidelity.json (report schema; --out: another file, e.g. per
CPU kind).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accuracy_digits import wide_digits_from_command_line

from leanvgg import schema
from leanvgg.builder import Builder
from leanvgg.models import Baseline
from leanvgg.recipes import Candidate
from leanvgg.capabilities import runtime_refusal
from leanvgg.context import OPENVINO, OPENVINO_BF16
from leanvgg.runtimes import RUNTIMES, select
from leanvgg.stats import wilson
from leanvgg.store import Store, default_root

RESULTS = Path(__file__).parent / "results"
TARGET = 0.99


def main() -> None:
    setup, out = wide_digits_from_command_line(__doc__, RESULTS / "runtime_fidelity.json")
    model, name, calibration = setup.model, setup.name, setup.calibration
    images, labels = setup.test.tensors
    size = images.shape[-1]
    builder = Builder(Baseline(model, name, f"digits-{name}", meaningful=True),
                      Store(default_root() / "bench-runtime-fidelity"))
    recipe = Candidate(0.0, "int8", size).recipe(
        "int8_static", "static INT8 of the digits VGG-19", layers=(),
        calibration=str(calibration))
    outputs = {}
    for runtime in RUNTIMES:
        refusal = runtime_refusal(recipe, runtime)
        if refusal is not None:
            print(f"{runtime}: {refusal}")
            continue
        on = select(recipe, builder, runtime)
        assert on.runtime == runtime, on.where
        with torch.inference_mode():
            outputs[runtime] = torch.cat([on.model(row[None]) for row in images])
    with torch.inference_mode():
        fp32 = model(images)
    reference = outputs["inductor"].argmax(1)
    rows = []
    for runtime, logits in outputs.items():
        top1 = logits.argmax(1)
        n, agree, correct = len(labels), int((top1 == reference).sum()), int(
            (top1 == labels).sum())
        rows.append({"name": runtime, "images": n,
                     "agreement_with_inductor": agree / n,
                     "agreement_ci": list(wilson(agree, n)),
                     "accuracy": correct / n, "accuracy_ci": list(wilson(correct, n)),
                     "max_logit_diff_vs_inductor": float((logits - outputs["inductor"])
                                                         .abs().max()),
                     "max_logit_diff_vs_fp32": float((logits - fp32).abs().max()),
                     "target_met": agree / n >= TARGET})
        if runtime == OPENVINO_BF16 and OPENVINO in outputs:
            same = int((top1 == outputs[OPENVINO].argmax(1)).sum())
            rows[-1].update({"agreement_with_openvino_f32": same / n,
                             "agreement_with_openvino_f32_ci": list(wilson(same, n)),
                             "target_met": min(agree, same) / n >= TARGET})
    fp32_correct = int((fp32.argmax(1) == labels).sum())
    report = schema.document(
        "benchmark/runtime_fidelity", rows,
        config={"model": name, "training": setup.training, "input_size": size,
                "calibration_images": 96, "target_agreement": TARGET,
                "fp32_accuracy": fp32_correct / len(labels)},
        threads=torch.get_num_threads())
    schema.write(out, report)
    print(f"{'runtime':<15}{'agrees with inductor':>22}{'accuracy':>20}{'max |Δlogit|':>14}")
    for r in rows:
        low, high = r["agreement_ci"]
        print(f"{r['name']:<15}{r['agreement_with_inductor']:>12.2%} ({low:.1%}–{high:.1%})"
              f"{r['accuracy']:>12.2%}{'':>8}{r['max_logit_diff_vs_inductor']:>14.4f}"
              f"  {'met' if r['target_met'] else 'MISSED'}")
        if "agreement_with_openvino_f32" in r:
            low, high = r["agreement_with_openvino_f32_ci"]
            print(f"{'':<15}agrees with openvino (f32): {r['agreement_with_openvino_f32']:.2%} "
                  f"({low:.1%}–{high:.1%})")
    print(f"FP32: {fp32_correct / len(labels):.2%} on {len(labels)} held-out digits; "
          f"saved {out}")


if __name__ == "__main__":
    main()
