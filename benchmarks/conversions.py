"""ONNX Runtime's and OpenVINO's INT8: leanvgg's own model exported, or each runtime's quantizer.

For one static INT8 variant (default int8_static; random weights: timings and sizes are real,
predictions are not) this measures, in one process:
- the conversion, on one core: what leanvgg does since 2026-12-07 (its PT2E model, calibrated
  once, exported to ONNX as QDQ; OpenVINO's conversion of that file) against what it did before,
  each runtime's own post-training quantizer of the float model on the same calibration images
  (ONNX Runtime's quantize_static; NNCF);
- each resulting model's latency on ONNX Runtime and on OpenVINO (the f32 hint and OpenVINO's
  defaults), round-robin (``time_models``, primed) at --threads, batch 1;
- how far each model's logits are from the PT2E model's on the calibration images (largest
  |difference| over the largest |logit|).
Saves benchmarks/results/conversions.json (report schema).

Run: .venv/bin/python benchmarks/conversions.py [--variant int8_static] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peers import nncf_int8, onnxruntime_qdq, timed

from leanvgg import schema
from leanvgg.builder import Builder, calibration_of
from leanvgg.interop import (onnxruntime_runner, openvino_from_onnx, openvino_runner,
                             write_onnx)
from leanvgg.measure import time_models, using_threads
from leanvgg.models import load_baseline
from leanvgg.recipes import RECIPES
from leanvgg.store import Store

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="int8_static",
                        choices=[n for n, r in RECIPES.items() if calibration_of(r) is not None])
    parser.add_argument("--threads", type=int, default=2, help="for the latencies")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="leanvgg-conversions-") as folder:
        tmp = Path(folder)
        builder = Builder(load_baseline("random", progress=False), Store(tmp / "cache"))
        recipe = builder.bind(RECIPES[args.variant])
        size, calibration = recipe.input_size, calibration_of(recipe)
        with using_threads(1):  # as a builder process converts beside its helper
            float_model = builder.float_model(recipe)
            int8 = builder.portable_model(recipe)
            _, export_s = timed(lambda: write_onnx(int8, size, tmp / "ours.onnx"))
            ours_ir, ir_s = timed(lambda: openvino_from_onnx(tmp / "ours.onnx"))
            _, qdq_s = timed(lambda: onnxruntime_qdq(float_model, calibration, size,
                                                      tmp / "quantize_static.onnx"))
            theirs_ir, nncf_s = timed(lambda: nncf_int8(float_model, calibration, size))
        threads = args.threads
        models = {  # name: (runner, conversion seconds)
            "leanvgg's int8 [onnxruntime]": (
                onnxruntime_runner(tmp / "ours.onnx", threads), export_s),
            "quantize_static [onnxruntime]": (
                onnxruntime_runner(tmp / "quantize_static.onnx", threads), qdq_s),
            "leanvgg's int8 [openvino f32]": (
                openvino_runner(ours_ir, threads), export_s + ir_s),
            "nncf [openvino f32]": (openvino_runner(theirs_ir, threads), nncf_s),
            "leanvgg's int8 [openvino default]": (
                openvino_runner(ours_ir, threads, f32=False), export_s + ir_s),
            "nncf [openvino default]": (
                openvino_runner(theirs_ir, threads, f32=False), nncf_s),
        }
        with torch.inference_mode():
            reference = int8(calibration)
        spread = float(reference.abs().max())
        distance = {name: float((torch.as_tensor(run(calibration)) - reference).abs().max())
                    / spread for name, (run, _) in models.items()}
        example = torch.randn(1, 3, size, size)
        timings = time_models({name: (run, example) for name, (run, _) in models.items()},
                              runs=args.runs, warmup=3, progress=True, primed=True,
                              threads=threads)
    rows = [{"name": name, "conversion_s": seconds,
             "latency_ms": timings[name][0].to_dict(), "from_pt2e": distance[name]}
            for name, (_, seconds) in models.items()]
    print(f"{args.variant}: conversion on 1 thread; median ms at batch 1, {threads} threads; "
          "largest |logit difference| from the PT2E model / its largest |logit|")
    for row in rows:
        print(f"  {row['name']:36s} {row['conversion_s']:6.1f} s  "
              f"{row['latency_ms']['median']:7.1f} ms  {row['from_pt2e']:.4f}")
    schema.write(RESULTS / "conversions.json", schema.document(
        "benchmark/conversions", rows, threads=threads,
        config={"variant": args.variant, "weights": "random (timings real)",
                "calibration_images": len(calibration), "runs": args.runs, "warmup": 3,
                "conversion_threads": 1}))


if __name__ == "__main__":
    main()
