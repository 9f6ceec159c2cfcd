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
import importlib.resources
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from leanvgg import schema
from leanvgg.data import calibration_batch
from leanvgg.images import preprocess
from leanvgg.interop import (onnxruntime_runner, openvino_model, openvino_runner, write_onnx,
                             write_openvino)
from leanvgg.measure import count_macs, state_dict_bytes, time_models
from leanvgg.models import load_baseline
from leanvgg.recipes import RECIPES
from leanvgg.runtime import native_bf16
from leanvgg.schema import Throughput
from leanvgg.store import Store
from leanvgg.variants import build_variants, default_names

RESULTS = Path(__file__).parent / "results"
PHOTO = importlib.resources.files("skimage.data") / "chelsea.png"


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
    ov_model = openvino_model(model, size, calibration=calibration)
    write_openvino(ov_model, tmp / "vgg19_int8.xml")
    size_mb = sum(p.stat().st_size for p in tmp.glob("vgg19_int8.*")) / 2**20
    return openvino_runner(ov_model, threads), size_mb


def _onnxruntime_int8(model: torch.nn.Module, calibration: torch.Tensor, threads: int,
                      size: int, tmp: Path) -> tuple[Callable, float]:
    path = tmp / "vgg19_int8.onnx"
    write_onnx(model, size, path, calibration=calibration)
    return onnxruntime_runner(path, threads), path.stat().st_size / 2**20


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

    document = schema.document(
        "benchmark/peers", [row for rows in results.values() for row in rows],
        config={"weights": baseline.weights, "runs": args.runs, "warmup": args.warmup,
                "threads": args.threads, "batch_sizes": list(batch_sizes)},
        threads=args.threads, matmul_ceiling_gops=ceilings)
    out = args.out.with_suffix(".json")
    schema.write(out, document)
    document = json.loads(out.read_text())  # the table and the plot read what was saved
    for batch_size in batch_sizes:
        print(_table(document, batch_size))
    _plot(document, args.out.with_suffix(".png"))
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
            "name": runner.name, "precision": runner.precision,
            "input_size": runner.input_size, "batch": batch_size,
            "latency_ms": latency.to_dict(),
            "throughput": Throughput.of(batch_size, latency).to_dict(),
            "x_vs_fp32_eager": eager / latency.median,
            "x_vs_openvino_int8": openvino.median / latency.median if openvino else None,
            "size_mb": runner.size_mb, "gops": gops,
            "pct_of_ceiling": 100 * gops / ceilings[runner.precision],
            "prepare_s": runner.prepare_s,
        })
    return rows


def _table(document: dict, batch_size: int) -> str:
    """One batch size's rows of a saved report, as a table."""
    header = (f"{'runner':<28}{'input':>6}{'median ms':>11}{'p90 ms':>9}{'min ms':>9}"
              f"{'img/s':>8}{'× fp32':>8}{'× OV int8':>10}{'size MB':>9}{'GOP/s':>8}"
              f"{'% ceil':>8}{'prep s':>8}")
    lines = [f"\nbatch {batch_size}", header, "-" * len(header)]
    for r in (r for r in document["results"] if r["batch"] == batch_size):
        vs_ov = f"{r['x_vs_openvino_int8']:.2f}" if r["x_vs_openvino_int8"] else "—"
        latency = r["latency_ms"]
        lines.append(
            f"{r['name']:<28}{r['input_size']:>6}{latency['median']:>11.1f}"
            f"{latency['p90']:>9.1f}{latency['min']:>9.1f}"
            f"{r['throughput']['images_per_s']:>8.1f}{r['x_vs_fp32_eager']:>8.2f}{vs_ov:>10}"
            f"{r['size_mb']:>9.1f}{r['gops']:>8.0f}{r['pct_of_ceiling']:>7.0f}%"
            f"{r['prepare_s']:>8.1f}")
    machine = document["machine"]
    lines.append(f"{machine['cpu']} ({', '.join(machine['flags'])}), "
                 f"{machine['threads']} threads, torch {machine['torch']}")
    return "\n".join(lines)


def _plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_sizes = document["config"]["batch_sizes"]
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(7 * len(batch_sizes), 6),
                             squeeze=False)
    for ax, batch_size in zip(axes[0], batch_sizes):
        rows = sorted((r for r in document["results"] if r["batch"] == batch_size),
                      key=lambda r: r["latency_ms"]["median"])
        colors = ["tab:green" if r["name"].startswith("leanvgg") else "tab:gray" for r in rows]
        ax.barh([r["name"] for r in rows], [r["latency_ms"]["median"] for r in rows],
                color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("median latency, ms (lower is better)")
        ax.set_title(f"VGG-19, batch {batch_size}")
    machine = document["machine"]
    fig.suptitle(f"{machine['cpu']} ({', '.join(machine['flags'])}), {machine['threads']} "
                 f"threads, torch {machine['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
