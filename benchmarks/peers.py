"""leanvgg's variants against other CPU runtimes, in one process, on one input, side by side.

Run: make bench-peers   (installs the `peers` extra: OpenVINO, NNCF, ONNX Runtime)

Runners: PyTorch eager FP32; every leanvgg variant; OpenVINO INT8 (NNCF post-training
quantization calibrated on leanvgg's calibration photos); ONNX Runtime static INT8 (QDQ,
per-channel weights, the same calibration); torch.compile bf16 (leanvgg's `bf16` variant).
All run with the same thread count on the same preprocessed photo, batch 1 and batch 8: each
runner warmed up, then the timed passes go round-robin over the runners, one pass at a time.
Saves benchmarks/results/peers.json and peers.png. Random weights by default: timings and
sizes are real, predictions are not.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from leanvgg.data import calibration_batch
from leanvgg.images import preprocess
from leanvgg.measure import count_macs, machine_facts, state_dict_bytes, time_models
from leanvgg.models import load_baseline
from leanvgg.recipes import RECIPES
from leanvgg.runtime import cpu_flags, native_bf16
from leanvgg.store import Store
from leanvgg.variants import build_variants, default_names

RESULTS = Path(__file__).parent / "results"
PHOTO = importlib.resources.files("skimage.data") / "chelsea.png"
LIBRARIES = ("torch", "torchvision", "torchao", "openvino", "nncf", "onnxruntime", "onnx")
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
         "amx_int8")


class Runner:
    """A callable on a torch batch, with what it is and what it cost to prepare."""

    def __init__(self, name: str, run: Callable[[torch.Tensor], object], *, size_mb: float,
                 precision: str, macs: int, input_size: int, prepare_s: float,
                 batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        self.name, self.run, self.size_mb, self.precision = name, run, size_mb, precision
        self.macs, self.input_size, self.prepare_s = macs, input_size, prepare_s
        self.batch_sizes = batch_sizes

    def __call__(self, batch: torch.Tensor) -> object:
        return self.run(batch)


def _timed(build: Callable[[], tuple]) -> tuple[tuple, float]:
    start = time.perf_counter()
    built = build()
    return built, time.perf_counter() - start


def _openvino_int8(model: torch.nn.Module, calibration: torch.Tensor, threads: int,
                   size: int, tmp: Path) -> tuple[Callable, float]:
    import nncf
    import openvino as ov

    example = torch.zeros(1, 3, size, size)
    ov_model = ov.convert_model(model, example_input=example,
                                input=[(-1, 3, size, size)])
    dataset = nncf.Dataset([c[None].numpy() for c in calibration])
    quantized = nncf.quantize(ov_model, dataset, subset_size=len(calibration))
    ov.save_model(quantized, tmp / "vgg19_int8.xml")
    size_mb = sum(p.stat().st_size for p in tmp.glob("vgg19_int8.*")) / 2**20
    compiled = ov.Core().compile_model(quantized, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(batch: torch.Tensor) -> np.ndarray:
        return request.infer({0: batch.numpy()})[0]

    return run, size_mb


def _onnxruntime_int8(model: torch.nn.Module, calibration: torch.Tensor, threads: int,
                      size: int, tmp: Path) -> tuple[Callable, float]:
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    fp32_path, int8_path = tmp / "vgg19.onnx", tmp / "vgg19_int8.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(fp32_path),
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": c[None].numpy()} for c in calibration])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    quantize_static(str(fp32_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> np.ndarray:
        return session.run(None, {"input": batch.numpy()})[0]

    return run, int8_path.stat().st_size / 2**20


def matmul_ceilings(threads: int, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GOP/s of one large matmul per precision: roughly the best this machine can do.

    FP32 and bf16 through torch.mm (oneDNN/MKL); INT8 through torch.ao's quantized Linear
    (fbgemm's u8×s8 GEMM; torch._int_mm has no fast CPU kernel). bf16 uses n/2 where the CPU
    only emulates it, or one repeat would take many seconds.
    """
    import warnings

    from torch.ao.nn.quantized import Linear as QuantizedLinear

    torch.set_num_threads(threads)
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    m = n if native_bf16() else n // 2
    a16, b16 = torch.randn(m, m).bfloat16(), torch.randn(m, m).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        linear = QuantizedLinear(n, n)
        linear.set_weight_bias(torch.quantize_per_tensor(torch.randn(n, n), 0.02, 0, torch.qint8),
                               None)
        x8 = torch.quantize_per_tensor(torch.rand(n, n), 0.01, 0, torch.quint8)
    cases = {"fp32": (lambda: a32 @ b32, 2 * n**3), "int8": (lambda: linear(x8), 2 * n**3),
             "bf16": (lambda: a16 @ b16, 2 * m**3)}
    ceilings = {}
    for name, (fn, ops) in cases.items():
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        ceilings[name] = ops / min(samples) / 1e9
    return ceilings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    log = logging.getLogger("peers")

    baseline = load_baseline(args.weights, progress=False)
    fp32 = baseline.model
    names = default_names() + ([] if native_bf16() else ["bf16"])
    log.info("Building / loading leanvgg variants: %s", ", ".join(names))
    variant_set = build_variants(baseline, names, store=Store(), progress=True)
    calibration = calibration_batch(224)
    macs224 = count_macs(fp32, 224)

    runners = [Runner("pytorch eager fp32", fp32, size_mb=state_dict_bytes(fp32) / 2**20,
                      precision="fp32", macs=macs224, input_size=224, prepare_s=0.0)]
    for name, variant in variant_set.variants.items():
        if name == "baseline":
            continue
        recipe = RECIPES[name]
        precision = ("bf16" if name == "bf16" else "int8" if recipe.compiled else "fp32")
        emulated = name == "bf16" and not native_bf16()
        runners.append(Runner(
            f"leanvgg {name}", variant.model, size_mb=variant.facts["size_bytes"] / 2**20,
            precision=precision, macs=variant.facts["macs"], input_size=variant.input_size,
            prepare_s=sum(variant.summary().preparation_s.values()),
            # emulated bf16 runs ~7× slower than FP32; batch 8 would take minutes for nothing
            batch_sizes=(1,) if emulated else batch_sizes))
    with tempfile.TemporaryDirectory() as tmp:
        for label, make in (("openvino int8 (nncf)", _openvino_int8),
                            ("onnxruntime int8 qdq", _onnxruntime_int8)):
            log.info("Preparing %s", label)
            (run, size_mb), seconds = _timed(
                lambda make=make: make(fp32, calibration, args.threads, 224, Path(tmp)))
            runners.append(Runner(label, run, size_mb=size_mb, precision="int8", macs=macs224,
                                  input_size=224, prepare_s=seconds))

        ceilings = matmul_ceilings(args.threads)
        log.info("Matmul ceilings (GOP/s): %s", ceilings)
        image = Image.open(PHOTO).convert("RGB")
        results = {}
        for batch_size in batch_sizes:
            jobs = {r.name: (r, preprocess(image, r.input_size).expand(batch_size, -1, -1, -1)
                             .contiguous())
                    for r in runners if batch_size in r.batch_sizes}
            log.info("Timing batch %d: %d runners × (%d warm-up + %d runs)", batch_size,
                     len(jobs), args.warmup, args.runs)
            timings = time_models(jobs, runs=args.runs, warmup=args.warmup, progress=True)
            results[batch_size] = _rows(runners, timings, batch_size, ceilings)

    document = {"machine": {**machine_facts(args.threads),
                            "flags": [f for f in FLAGS if f in cpu_flags()],
                            "libraries": {lib: _version(lib) for lib in LIBRARIES}},
                "weights": baseline.weights, "runs": args.runs, "warmup": args.warmup,
                "matmul_ceiling_gops": ceilings,
                "results": {str(b): rows for b, rows in results.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    for batch_size, rows in results.items():
        print(_table(rows, batch_size))
    _plot(results, args.out.with_suffix(".png"), document["machine"])
    print(f"\nSaved {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


def _rows(runners: list[Runner], timings: dict, batch_size: int,
          ceilings: dict[str, float]) -> list[dict]:
    eager = timings["pytorch eager fp32"][0].median
    openvino = timings.get("openvino int8 (nncf)", (None,))[0]
    rows = []
    for runner in runners:
        if runner.name not in timings:
            continue
        latency = timings[runner.name][0]
        gops = 2 * runner.macs * batch_size / (latency.median / 1e3) / 1e9
        rows.append({
            "runner": runner.name, "precision": runner.precision,
            "input_size": runner.input_size, "batch": batch_size,
            "median_ms": latency.median, "p90_ms": latency.p90, "min_ms": latency.min,
            "x_vs_fp32_eager": eager / latency.median,
            "x_vs_openvino_int8": openvino.median / latency.median if openvino else None,
            "size_mb": runner.size_mb, "gops": gops,
            "pct_of_ceiling": 100 * gops / ceilings[runner.precision],
            "prepare_s": runner.prepare_s,
        })
    return rows


def _table(rows: list[dict], batch_size: int) -> str:
    header = (f"{'runner':<28}{'input':>6}{'median ms':>11}{'p90 ms':>9}{'min ms':>9}"
              f"{'× fp32':>8}{'× OV int8':>10}{'size MB':>9}{'GOP/s':>8}{'% ceil':>8}"
              f"{'prep s':>8}")
    lines = [f"\nbatch {batch_size}", header, "-" * len(header)]
    for r in rows:
        vs_ov = f"{r['x_vs_openvino_int8']:.2f}" if r["x_vs_openvino_int8"] else "—"
        lines.append(
            f"{r['runner']:<28}{r['input_size']:>6}{r['median_ms']:>11.1f}{r['p90_ms']:>9.1f}"
            f"{r['min_ms']:>9.1f}{r['x_vs_fp32_eager']:>8.2f}{vs_ov:>10}{r['size_mb']:>9.1f}"
            f"{r['gops']:>8.0f}{r['pct_of_ceiling']:>7.0f}%{r['prepare_s']:>8.1f}")
    return "\n".join(lines)


def _plot(results: dict, path: Path, machine: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 6), squeeze=False)
    for ax, (batch_size, rows) in zip(axes[0], results.items()):
        rows = sorted(rows, key=lambda r: r["median_ms"])
        colors = ["tab:green" if r["runner"].startswith("leanvgg") else "tab:gray" for r in rows]
        ax.barh([r["runner"] for r in rows], [r["median_ms"] for r in rows], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("median latency, ms (lower is better)")
        ax.set_title(f"VGG-19, batch {batch_size}")
    fig.suptitle(f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _version(library: str) -> str | None:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
