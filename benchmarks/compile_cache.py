"""Keeping compiled code between processes: AOTInductor packages vs Inductor's caches.

For one compiled variant (default int8_static, random weights) this measures, in fresh
processes so nothing is warm: (a) an AOTInductor package: time to make it, to load it, its first
call and its median latency; (b) `torch.compile` with freezing (the path leanvgg used before):
compile + first call, whether `torch.compiler.save_cache_artifacts()` has anything to keep, and
compile + first call again in a new process after `load_cache_artifacts`; then both runners'
latency round-robin in one process. Saves benchmarks/results/compile_cache.json.

Run: .venv/bin/python benchmarks/compile_cache.py [--variant int8_static]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

_CHILD = r"""
import json, os, statistics, sys, time
folder, variant, phase = sys.argv[1], sys.argv[2], sys.argv[3]
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(folder, "inductor-" + phase)
import torch
import torch._inductor.config as inductor_config
from leanvgg.models import load_baseline
from leanvgg.recipes import RECIPES
from leanvgg.runtime import load_package, package
from leanvgg.store import Store
from leanvgg.builder import Builder

recipe = RECIPES[variant]
size = recipe.input_size
x = torch.randn(1, 3, size, size)
out = {}

def timed(runner, n=15):
    samples = []
    with torch.inference_mode():
        for _ in range(n):
            start = time.perf_counter(); runner(x); samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)

def first_call(runner):
    start = time.perf_counter()
    with torch.inference_mode():
        runner(x)
    return time.perf_counter() - start

if phase == "aoti-load":
    start = time.perf_counter()
    runner = load_package(os.path.join(folder, "model.pt2"), size)
    out["load_s"] = time.perf_counter() - start
    out["first_call_s"] = first_call(runner)
    out["median_ms"] = timed(runner)
else:
    model, _, _ = Builder(load_baseline("random", progress=False),
                           Store(os.path.join(folder, "cache"))).artifact(recipe, len(recipe.steps))
    if phase == "aoti-make":
        start = time.perf_counter()
        package(model, size, os.path.join(folder, "model.pt2"), threads=torch.get_num_threads())
        out["make_s"] = time.perf_counter() - start
    else:  # compile-save, compile-load: torch.compile with freezing, Inductor's mega-cache
        mega = os.path.join(folder, "mega.bin")
        if phase == "compile-load":
            out["artifacts_found"] = os.path.exists(mega)
            if out["artifacts_found"]:
                start = time.perf_counter()
                torch.compiler.load_cache_artifacts(open(mega, "rb").read())
                out["load_artifacts_s"] = time.perf_counter() - start
        with inductor_config.patch(freezing=True):
            compiled = torch.compile(model)
            out["compile_and_first_call_s"] = first_call(compiled)
            if phase == "compile-save":
                saved = torch.compiler.save_cache_artifacts()
                out["artifacts_bytes"] = len(saved[0]) if saved else None
                if saved:
                    open(mega, "wb").write(saved[0])
            else:
                runner = load_package(os.path.join(folder, "model.pt2"), size)
                first_call(runner)
                # round-robin in this one process: the same machine state for both
                samples = {"aoti": [], "torch.compile": []}
                with torch.inference_mode():
                    for _ in range(20):
                        for name, r in (("aoti", runner), ("torch.compile", compiled)):
                            start = time.perf_counter(); r(x)
                            samples[name].append(time.perf_counter() - start)
                out["round_robin_median_ms"] = {k: 1e3 * statistics.median(v)
                                                for k, v in samples.items()}
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="int8_static")
    args = parser.parse_args()

    import torch

    from leanvgg import schema

    phases = []
    with tempfile.TemporaryDirectory(prefix="leanvgg-compile-") as folder:
        for phase in ("aoti-make", "aoti-load", "compile-save", "compile-load"):
            result = subprocess.run([sys.executable, "-c", _CHILD, folder, args.variant, phase],
                                    capture_output=True, text=True, timeout=1800)
            if result.returncode != 0:
                raise SystemExit(result.stderr[-3000:])
            phases.append({"name": phase, **json.loads(result.stdout.strip().splitlines()[-1])})
            print(phase, phases[-1], flush=True)
    schema.write(RESULTS / "compile_cache.json", schema.document(
        "benchmark/compile_cache", phases,
        config={"variant": args.variant, "weights": "random (timings real)"},
        threads=torch.get_num_threads()))
    print(f"saved {RESULTS / 'compile_cache.json'}")


if __name__ == "__main__":
    main()
