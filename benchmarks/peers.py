"""leanvgg's variants against other CPU runtimes, in one process, on one input, side by side.

Run: make bench-peers   (installs the `export` and `bench` extras: OpenVINO, ONNX Runtime, NNCF)

Runners: PyTorch eager FP32; every leanvgg variant on the runtimes leanvgg chose for it on this
machine (--runtime auto: the fastest of inductor, onnxruntime and openvino at batch 1 for single
images and at batch 8 for batches, measured once per machine and thread count); OpenVINO INT8
(NNCF post-training quantization calibrated on leanvgg's calibration photos) and ONNX Runtime
static INT8 (QDQ, per-channel weights, the same calibration) of the unpruned model, as peers. All run with the same thread count on the same
preprocessed photo, per batch size (1 and 8) and thread count (1 and all cores): each runner
warmed up, then the timed passes go round-robin over the runners, one pass at a time, each
round in its own seeded order and each timed pass right after an untimed one of the same
runner (``time_models(primed=True)``: a model run right after an eager PyTorch one was
measured 5-15 % slower, and a fixed order charged that to the same runners every round:
FP32 eager after ONNX Runtime, int8_static after res160). Prints,
per thread count and batch size, leanvgg's fastest 224 px variant against the fastest peer and
int8_static against it (issue 15's targets: ≤ 0.9× and ≤ 1.0×), and the fastest 160 px variant
against FP32 eager. Saves benchmarks/results/peers.json (report schema) and peers.png. Random
weights by default: timings and sizes are real, predictions are not.
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
from typing import TypeVar

import torch
from PIL import Image

from leanvgg import schema
from leanvgg.data import calibration_batch
from leanvgg.images import preprocess
from leanvgg.interop import (INPUT, onnxruntime_runner, openvino_runner, stdout_to_stderr,
                             write_onnx, write_openvino)
from leanvgg.measure import count_macs, state_dict_bytes, time_models
from leanvgg.models import load_baseline
from leanvgg.recipes import RECIPES
from leanvgg.machine import native_bf16
from leanvgg.schema import Throughput
from leanvgg.store import Store
from leanvgg.variants import build_variants, default_names

RESULTS = Path(__file__).parent / "results"
PHOTO = importlib.resources.files("skimage.data") / "chelsea.png"
T = TypeVar("T")


class Runner:
    """A callable on a torch batch, with what it is and what it cost to prepare."""

    def __init__(self, name: str, run: Callable[[torch.Tensor], object], *, size_mb: float,
                 precision: str, macs: int, input_size: int, prepare_s: float,
                 batch_sizes: tuple[int, ...] = (1, 8),
                 runtimes: tuple[str, str] | None = None) -> None:
        self.name, self.run, self.size_mb, self.precision = name, run, size_mb, precision
        self.macs, self.input_size, self.prepare_s = macs, input_size, prepare_s
        self.batch_sizes = batch_sizes
        self.runtimes = runtimes  # leanvgg's: where one image runs, where batches run

    def label(self, batch_size: int) -> str:
        """Its name in a report row, with the runtime that ran this batch size (leanvgg's)."""
        if self.runtimes is None:
            return self.name
        return f"{self.name} [{self.runtimes[batch_size > 1]}]"

    def __call__(self, batch: torch.Tensor) -> object:
        return self.run(batch)


def timed(build: Callable[[], T]) -> tuple[T, float]:
    """What ``build`` returns, and the seconds it took."""
    start = time.perf_counter()
    built = build()
    return built, time.perf_counter() - start


def nncf_int8(model: torch.nn.Module, calibration: torch.Tensor, size: int):
    """What a user of OpenVINO gets: OpenVINO's conversion of the float model, quantized by
    NNCF's post-training quantization on the same calibration images (an OpenVINO model)."""
    import nncf
    import openvino as ov

    with stdout_to_stderr():
        converted = ov.convert_model(model.eval(), example_input=torch.zeros(1, 3, size, size),
                                     input=[(-1, 3, size, size)])
        dataset = nncf.Dataset([row.contiguous().numpy() for row in calibration.split(1)])
        return nncf.quantize(converted, dataset, subset_size=len(calibration))


def onnxruntime_qdq(model: torch.nn.Module, calibration: torch.Tensor, size: int,
                    path: Path) -> None:
    """What a user of ONNX Runtime gets, written to ``path``: its ``quantize_static`` of the
    float model's ONNX export (QDQ, INT8 weights per output channel, UINT8 activations, MinMax)
    on the same calibration images."""
    from onnxruntime import quantization

    fp32 = path.with_name(path.stem + "_fp32.onnx")
    write_onnx(model, size, fp32)
    rows = iter(calibration.split(1))

    class Reader(quantization.CalibrationDataReader):
        def get_next(self) -> dict | None:
            row = next(rows, None)
            return None if row is None else {INPUT: row.contiguous().numpy()}

    with stdout_to_stderr():
        quantization.quantize_static(
            str(fp32), str(path), Reader(), quant_format=quantization.QuantFormat.QDQ,
            per_channel=True, activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8)
    fp32.unlink()


def _openvino_int8(model: torch.nn.Module, calibration: torch.Tensor, threads: int,
                   size: int, tmp: Path) -> tuple[Callable, float]:
    ov_model = nncf_int8(model, calibration, size)
    write_openvino(ov_model, tmp / "vgg19_int8.xml")
    size_mb = sum(p.stat().st_size for p in tmp.glob("vgg19_int8.*")) / 2**20
    return openvino_runner(ov_model, threads, f32=False), size_mb  # OpenVINO's defaults


def _onnxruntime_int8(model: torch.nn.Module, calibration: torch.Tensor, threads: int,
                      size: int, tmp: Path) -> tuple[Callable, float]:
    path = tmp / "vgg19_int8.onnx"
    onnxruntime_qdq(model, calibration, size, path)
    return onnxruntime_runner(path, threads), path.stat().st_size / 2**20


def matmul_ceilings(threads: int, n: int = 2048, repeats: int = 15) -> dict[str, float]:
    """GOP/s of one large matmul per precision: roughly the best this machine can do.

    Each precision is the faster of two kernels, each kept under its own name. FP32 and bf16:
    torch.mm (``fp32_mm``, ``bf16_mm``: MKL's GEMM for FP32; AMX-BF16 where the CPU has it) and
    oneDNN's direct 3×3 convolution of VGG's conv3 shape, 256 channels at 56×56
    (``fp32_onednn``, ``bf16_onednn``: what PyTorch's convolutions call). Neither is the faster
    everywhere: on the AVX-512 EPYC with AVX-VNNI, MKL's FP32 GEMM reached 90 GOP/s at 1 thread
    and oneDNN's convolution 174-196 (its direct AVX-512 kernel; oneDNN's verbose log), and
    eager FP32 VGG-19 ran at 120-155 % of an FP32 "ceiling" that was torch.mm alone.

    INT8: oneDNN's quantized Linear (``int8_onednn``: ``torch.ops.onednn.qlinear_pointwise``,
    the kernel Inductor's PT2E INT8 calls, AMX-INT8 or VNNI where the CPU has them) and
    fbgemm's u8×s8 GEMM (``int8_fbgemm``: torch.ao's quantized Linear). Neither is the faster
    everywhere: on AMX fbgemm reached half of oneDNN, on the AVX-512 EPYC oneDNN reached 548
    GOP/s at 2 threads against fbgemm's 862.

    bf16 uses n/2 (and half the channels) where the CPU only emulates it, or one repeat would
    take many seconds. Each figure is the best of 15 repeats, not 5: on the AVX-VNNI EPYC the
    best of 5 was 2-4 % lower (INT8 855-866 against 881-898 GOP/s at 1 thread, three runs
    each), and compiled runners passed 100 % of it.
    """
    import warnings

    from torch.ao.nn.quantized import Linear as QuantizedLinear

    torch.set_num_threads(threads)
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    native = native_bf16()
    m = n if native else n // 2
    a16, b16 = torch.randn(m, m).bfloat16(), torch.randn(m, m).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        linear = QuantizedLinear(n, n)
        linear.set_weight_bias(torch.quantize_per_tensor(torch.randn(n, n), 0.02, 0, torch.qint8),
                               None)
        x8 = torch.quantize_per_tensor(torch.rand(n, n), 0.01, 0, torch.quint8)
    # VGG's conv3 (features.10-16): 256 → 256 channels, 3×3, at 56×56
    c32, c16, side = 256, 256 if native else 128, 56
    x32, w32 = torch.randn(1, c32, side, side), torch.randn(c32, c32, 3, 3)
    x16, w16 = (torch.randn(1, c16, side, side).bfloat16(),
                torch.randn(c16, c16, 3, 3).bfloat16())
    conv = torch.nn.functional.conv2d
    cases = {"fp32_mm": (lambda: a32 @ b32, 2 * n**3),
             "fp32_onednn": (lambda: conv(x32, w32, padding=1), 2 * c32**2 * 9 * side**2),
             "int8_fbgemm": (lambda: linear(x8), 2 * n**3),
             "bf16_mm": (lambda: a16 @ b16, 2 * m**3),
             "bf16_onednn": (lambda: conv(x16, w16, padding=1), 2 * c16**2 * 9 * side**2)}
    onednn = getattr(torch.ops, "onednn", None)
    if onednn is not None and hasattr(onednn, "qlinear_pointwise"):
        u8 = torch.randint(0, 256, (n, n), dtype=torch.uint8)
        packed = onednn.qlinear_prepack(torch.randint(-127, 128, (n, n), dtype=torch.int8),
                                        [n, n])
        scales, zeros = torch.full((n,), 0.02), torch.zeros(n, dtype=torch.long)
        cases["int8_onednn"] = (lambda: onednn.qlinear_pointwise(
            u8, 0.01, 0, packed, scales, zeros, None, 1.0, 0, torch.float32, "none", [], ""),
            2 * n**3)
    ceilings = {}
    with torch.inference_mode():
        for name, (fn, ops) in cases.items():
            fn()
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            ceilings[name] = ops / min(samples) / 1e9
    for precision in ("fp32", "bf16", "int8"):
        ceilings[precision] = max(v for k, v in ceilings.items()
                                  if k.startswith(f"{precision}_"))
    return ceilings


PEERS = ("openvino int8 (nncf)", "onnxruntime int8 qdq")
TARGET_PEER, TARGET_INT8 = 0.9, 1.0  # issue 15: fastest 224 px ≤ 0.9× the fastest peer, …
TARGET_X_FP32 = 15.0  # issue 24: a 224 px variant ≥ 15× FP32 eager at batch 1 (on AMX)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                        help="thread counts, each measured in full (default 1 and all cores)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--runtime", default="auto", help="leanvgg's runtime (default auto)")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers")
    parser.add_argument("--markdown", action="store_true",
                        help="measure nothing: print the README's tables from the saved report")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    thread_counts = tuple(dict.fromkeys(int(t) for t in args.threads.split(",")))
    baseline = load_baseline(args.weights, progress=False)
    rows, ceilings = [], {}
    for threads in thread_counts:
        found, ceilings[str(threads)] = measure(baseline, threads, batch_sizes, args)
        rows += found
    document = schema.document(
        "benchmark/peers", rows,
        config={"weights": baseline.weights, "runs": args.runs, "warmup": args.warmup,
                "threads": list(thread_counts), "batch_sizes": list(batch_sizes),
                "runtime": args.runtime},
        threads=max(thread_counts), matmul_ceiling_gops=ceilings)
    document["targets"] = targets(document)
    out = args.out.with_suffix(".json")
    schema.write(out, document)
    document = json.loads(out.read_text())  # the tables and the plot read what was saved
    for threads in thread_counts:
        for batch_size in batch_sizes:
            print(_table(document, threads, batch_size))
    print()
    for line in document["targets"]:
        print(line["summary"])
    _plot(document, args.out.with_suffix(".png"))
    print(f"\nSaved {out} and {args.out.with_suffix('.png')}")


def measure(baseline, threads: int, batch_sizes: tuple[int, ...],
            args: argparse.Namespace) -> tuple[list[dict], dict[str, float]]:
    """Every runner at ``threads`` threads, per batch size: rows of the report."""
    log = logging.getLogger("peers")
    torch.set_num_threads(threads)
    fp32 = baseline.model
    names = default_names() + ([] if native_bf16() else ["bf16"])
    log.info("%d threads: building / loading leanvgg variants (%s): %s", threads,
             args.runtime, ", ".join(names))
    # made for this thread count: packages and runtime sessions are keyed and set up per count
    variant_set = build_variants(baseline, names, store=Store(), progress=True,
                                 runtime=args.runtime, threads=threads)
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
        facts = variant.summary()
        runners.append(Runner(
            f"leanvgg {name}", variant.model, runtimes=(facts.runtime, facts.batch_runtime),
            size_mb=facts.size_mb, precision=precision, macs=facts.macs,
            input_size=variant.input_size, prepare_s=sum(facts.preparation_s.values()),
            # emulated bf16 runs ~7× slower than FP32; batch 8 would take minutes for nothing
            batch_sizes=(1,) if emulated else batch_sizes))
    with tempfile.TemporaryDirectory() as tmp:
        for label, make in zip(PEERS, (_openvino_int8, _onnxruntime_int8)):
            log.info("Preparing %s", label)
            (run, size_mb), seconds = timed(
                lambda make=make: make(fp32, calibration, threads, 224, Path(tmp)))
            runners.append(Runner(label, run, size_mb=size_mb, precision="int8", macs=macs224,
                                  input_size=224, prepare_s=seconds))

        ceilings = matmul_ceilings(threads)
        log.info("Matmul ceilings (GOP/s): %s", ceilings)
        image = Image.open(PHOTO).convert("RGB")
        rows = []
        for batch_size in batch_sizes:
            jobs = {r.name: (r, preprocess(image, r.input_size).expand(batch_size, -1, -1, -1)
                             .contiguous())
                    for r in runners if batch_size in r.batch_sizes}
            log.info("Timing batch %d at %d threads: %d runners × (%d warm-up + %d runs)",
                     batch_size, threads, len(jobs), args.warmup, args.runs)
            timings = time_models(jobs, runs=args.runs, warmup=args.warmup, progress=True,
                                  primed=True)
            rows += [{**row, "threads": threads}
                     for row in _rows(runners, timings, batch_size, ceilings)]
    return rows, ceilings


def targets(document: dict) -> list[dict]:
    """Per thread count and batch size: leanvgg's fastest 224 px variant against the fastest
    peer, int8_static (same MACs) against it, the fastest 160 px variant against FP32 eager.

    The ≥ 15× FP32 eager target (batch 1) is AMX's: on other CPU kinds the ratio is reported,
    not judged."""
    amx = "amx_int8" in document["machine"]["flags"]
    lines = []
    for threads in document["config"]["threads"]:
        for batch in document["config"]["batch_sizes"]:
            rows = [r for r in document["results"]
                    if r["threads"] == threads and r["batch"] == batch]
            ms = {r["name"]: r["latency_ms"]["median"] for r in rows}
            ours = [r for r in rows if r["name"].startswith("leanvgg")]
            peer = min((r for r in rows if r["name"] in PEERS),
                       key=lambda r: r["latency_ms"]["median"])
            best224 = min((r for r in ours if r["input_size"] == 224),
                          key=lambda r: r["latency_ms"]["median"])
            int8 = next(r for r in ours if r["name"].startswith("leanvgg int8_static "))
            small = [r for r in ours if r["input_size"] == 160]
            best160 = min(small, key=lambda r: r["latency_ms"]["median"]) if small else None
            ratio = ms[best224["name"]] / ms[peer["name"]]
            int8_ratio = ms[int8["name"]] / ms[peer["name"]]
            # where int8_static's p10–p90 range overlaps the peer's, the two are a tie in this
            # run whatever the medians say (at 1 thread it can be the very same OpenVINO model)
            tie = (int8["latency_ms"]["p10"] <= peer["latency_ms"]["p90"]
                   and peer["latency_ms"]["p10"] <= int8["latency_ms"]["p90"])
            line = {"threads": threads, "batch": batch, "fastest_224": best224["name"],
                    "fastest_peer": peer["name"], "x_of_peer": ratio,
                    "target_met": ratio <= TARGET_PEER, "int8_static_x_of_peer": int8_ratio,
                    "int8_target_met": int8_ratio <= TARGET_INT8,
                    "int8_p10_p90_overlaps_peer": tie,
                    "speedup_224_vs_fp32_eager": ms["pytorch eager fp32"] / ms[best224["name"]],
                    "fp32_target_applies": amx and batch == 1,
                    "fastest_160": best160["name"] if best160 else None,
                    "speedup_160_vs_fp32_eager": (ms["pytorch eager fp32"]
                                                  / ms[best160["name"]]) if best160 else None}
            line["summary"] = (
                f"{threads} thread(s), batch {batch}: {best224['name']} "
                f"{ms[best224['name']]:.1f} ms = {ratio:.2f}× {peer['name']} "
                f"{ms[peer['name']]:.1f} ms (target ≤ {TARGET_PEER}: "
                f"{'met' if line['target_met'] else 'MISSED'}); int8_static {int8_ratio:.2f}× "
                f"(target ≤ {TARGET_INT8}: {'met' if line['int8_target_met'] else 'MISSED'}"
                f"{', p10–p90 overlap the peer' if tie else ''})"
                f"; {best224['name']} {line['speedup_224_vs_fp32_eager']:.2f}× FP32 eager"
                + (f" (target ≥ {TARGET_X_FP32:g}: "
                   f"{'met' if line['speedup_224_vs_fp32_eager'] >= TARGET_X_FP32 else 'MISSED'})"
                   if line["fp32_target_applies"] else "")
                + (f"; {best160['name']} {line['speedup_160_vs_fp32_eager']:.2f}× FP32 eager"
                   if best160 else ""))
            lines.append(line)
    return lines


def markdown(document: dict) -> str:
    """The README's two tables (latency per scenario, the targets) from a saved report."""
    scenarios = [(t, b) for t in document["config"]["threads"]
                 for b in document["config"]["batch_sizes"]]
    heads = [f"{t} thread{'s' if t > 1 else ''}, batch {b}" for t, b in scenarios]
    cells: dict[str, dict[tuple[int, int], str]] = {}
    for r in document["results"]:
        name, _, runtime = r["name"].partition(" [")
        ms = r["latency_ms"]["median"]
        tag = f" [{runtime.rstrip(']')}]" if runtime else ""
        cells.setdefault(name, {})[r["threads"], r["batch"]] = (
            f"{ms:.1f}{tag} ({r['x_vs_fp32_eager']:.2f})")
    lines = ["| median ms [runtime] (× FP32 eager) | " + " | ".join(heads) + " |",
             "|---" * (len(heads) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(row.get(s, "—") for s in scenarios) + " |"
              for name, row in cells.items()]
    by = {(t["threads"], t["batch"]): t for t in document["targets"]}

    def peer(name: str) -> str:
        return "OpenVINO" if name.startswith("openvino") else "ONNX Runtime"

    def met(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    lines += ["", "| target | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|",
              "| fastest 224 px variant ≤ 0.9× the fastest peer | " + " | ".join(
                  f"{by[s]['fastest_224'].removeprefix('leanvgg ')} {by[s]['x_of_peer']:.3f}× "
                  f"{peer(by[s]['fastest_peer'])}: {met(by[s]['target_met'])}"
                  for s in scenarios) + " |",
              "| int8_static (same MACs) ≤ 1.0× the fastest peer | " + " | ".join(
                  f"{by[s]['int8_static_x_of_peer']:.3f}×: {met(by[s]['int8_target_met'])}"
                  + (" (p10–p90 overlap: a tie)" if by[s].get("int8_p10_p90_overlaps_peer")
                     else "") for s in scenarios) + " |",
              "| fastest 224 px variant against FP32 eager (≥ 15× at batch 1 on AMX) | "
              + " | ".join(
                  f"{by[s]['fastest_224'].removeprefix('leanvgg ')} "
                  f"{by[s]['speedup_224_vs_fp32_eager']:.2f}×"
                  + (f": {met(by[s]['speedup_224_vs_fp32_eager'] >= TARGET_X_FP32)}"
                     if by[s].get("fp32_target_applies", s[1] == 1) else "")
                  for s in scenarios) + " |",
              "| fastest 160 px variant against FP32 eager | " + " | ".join(
                  f"{by[s]['fastest_160'].removeprefix('leanvgg ')} "
                  f"{by[s]['speedup_160_vs_fp32_eager']:.2f}×" for s in scenarios) + " |"]
    return "\n".join(lines)


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
            "name": runner.label(batch_size), "precision": runner.precision,
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


def _table(document: dict, threads: int, batch_size: int) -> str:
    """One thread count's and batch size's rows of a saved report, as a table."""
    header = (f"{'runner':<36}{'input':>6}{'median ms':>11}{'p90 ms':>9}{'min ms':>9}"
              f"{'img/s':>8}{'× fp32':>8}{'× OV int8':>10}{'size MB':>9}{'GOP/s':>8}"
              f"{'% ceil':>8}{'prep s':>8}")
    lines = [f"\nbatch {batch_size}, {threads} thread(s)", header, "-" * len(header)]
    for r in (r for r in document["results"]
              if r["batch"] == batch_size and r["threads"] == threads):
        vs_ov = f"{r['x_vs_openvino_int8']:.2f}" if r["x_vs_openvino_int8"] else "—"
        latency = r["latency_ms"]
        lines.append(
            f"{r['name']:<36}{r['input_size']:>6}{latency['median']:>11.1f}"
            f"{latency['p90']:>9.1f}{latency['min']:>9.1f}"
            f"{r['throughput']['images_per_s']:>8.1f}{r['x_vs_fp32_eager']:>8.2f}{vs_ov:>10}"
            f"{r['size_mb']:>9.1f}{r['gops']:>8.0f}{r['pct_of_ceiling']:>7.0f}%"
            f"{r['prepare_s']:>8.1f}")
    machine = document["machine"]
    lines.append(f"{machine['cpu']} ({', '.join(machine['flags'])}), torch {machine['torch']}")
    return "\n".join(lines)


def _plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads, batches = document["config"]["threads"], document["config"]["batch_sizes"]
    fig, axes = plt.subplots(len(threads), len(batches),
                             figsize=(7.5 * len(batches), 5.5 * len(threads)), squeeze=False)
    for row_axes, count in zip(axes, threads):
        for ax, batch_size in zip(row_axes, batches):
            rows = sorted((r for r in document["results"]
                           if r["batch"] == batch_size and r["threads"] == count),
                          key=lambda r: r["latency_ms"]["median"])
            colors = ["tab:green" if r["name"].startswith("leanvgg") else "tab:gray"
                      for r in rows]
            ax.barh([r["name"] for r in rows], [r["latency_ms"]["median"] for r in rows],
                    color=colors)
            ax.invert_yaxis()
            ax.set_xlabel("median latency per batch, ms (lower is better)")
            ax.set_title(f"VGG-19, batch {batch_size}, {count} thread(s)")
    machine = document["machine"]
    fig.suptitle(f"{machine['cpu']} ({', '.join(machine['flags'])}), torch {machine['torch']}"
                 f"; random weights")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
