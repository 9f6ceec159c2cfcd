"""Does Inductor's dynamic thread count cost anything? Packages per thread count vs one package.

Inductor writes the thread count into the code it generates (``cpp.threads``), so leanvgg
makes one AOTInductor package per thread count (keyed by it). The alternative is one package
compiled with ``cpp.dynamic_threads`` (it reads the count when it runs). This compiles a
variant (default int8_static, random weights) three ways — fixed at 1 thread, fixed at every
core, dynamic — and times them side by side in one process, round-robin, at 1 thread and at
every core (a fixed package only at its own count), batch 1. Prints the ratios and saves
benchmarks/results/dynamic_threads.json (report schema).

Run: .venv/bin/python benchmarks/dynamic_threads.py [--variant int8_static] [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

from leanvgg import schema
from leanvgg.builder import Builder
from leanvgg.measure import time_models
from leanvgg.models import load_baseline
from leanvgg.recipes import RECIPES
from leanvgg.runtime import load_package, package
from leanvgg.store import Store

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="int8_static")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "dynamic_threads.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    recipe = RECIPES[args.variant]
    with tempfile.TemporaryDirectory(prefix="leanvgg-threads-") as folder:
        builder = Builder(load_baseline("random", progress=False), Store(Path(folder) / "cache"))
        model = builder.artifact(recipe, len(recipe.steps))[0]
        packages, compile_s = {}, {}
        for label, threads, dynamic in (("fixed-1", 1, False), (f"fixed-{cores}", cores, False),
                                        ("dynamic", cores, True)):
            path = Path(folder) / f"{label}.pt2"
            start = time.perf_counter()
            with inductor_config.patch({"cpp.dynamic_threads": dynamic}):
                package(model, recipe.input_size, path, threads=threads)
            compile_s[label] = time.perf_counter() - start
            packages[label] = load_package(path, recipe.input_size)
        example = torch.randn(1, 3, recipe.input_size, recipe.input_size)
        rows, medians = [], {}
        for threads in dict.fromkeys((1, cores)):
            jobs = {label: (runner, example) for label, runner in packages.items()
                    if label == "dynamic" or label == f"fixed-{threads}"}
            timed = time_models(jobs, runs=args.runs, warmup=args.warmup, threads=threads)
            for label, (latency, _) in timed.items():
                medians[label, threads] = latency.median
                rows.append({"name": f"{label} @ {threads} threads", "package": label,
                             "threads": threads, "batch": 1, "compile_s": compile_s[label],
                             "latency_ms": latency.to_dict()})
    ratios = {threads: medians["dynamic", threads] / medians[f"fixed-{threads}", threads]
              for threads in dict.fromkeys((1, cores))}
    document = schema.document("benchmark/dynamic_threads", rows,
                               config={"variant": args.variant, "runs": args.runs,
                                       "warmup": args.warmup, "weights": "random"},
                               threads=cores,
                               dynamic_over_fixed={str(t): r for t, r in ratios.items()})
    schema.write(args.out, document)
    for row in rows:
        print(f"{row['name']:<28} median {row['latency_ms']['median']:8.2f} ms  "
              f"p10–p90 {row['latency_ms']['p10']:.2f}–{row['latency_ms']['p90']:.2f}")
    for threads, ratio in ratios.items():
        print(f"dynamic ÷ fixed at {threads} thread(s): {ratio:.3f}")
    print(f"Saved {args.out}")


if __name__ == "__main__":
    main()
