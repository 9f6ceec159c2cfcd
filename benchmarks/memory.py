"""Memory of the dashboard's process against its floor, after each variant and after N uploads.

The floor is what the process cannot avoid: the runtime's own footprint (`import torch,
torchvision` alone, measured in a fresh process) plus the unique bytes of the loaded variants'
weights, each shared weight counted once. Prints RSS, PSS and anonymous memory (from
/proc/self/smaps_rollup) after each variant becomes ready and after N uploads, and saves
benchmarks/results/memory.json. Random weights (sizes are real; predictions meaningless).

Run: .venv/bin/python benchmarks/memory.py --uploads 50   (LEANVGG_HOME: the cache to use)
"""

from __future__ import annotations

import argparse
import gc
import importlib.resources
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def smaps(pid: int | str = "self") -> dict[str, float]:
    """RSS, PSS, anonymous and private-dirty memory of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    return {"rss_mb": fields["Rss"], "pss_mb": fields["Pss"],
            "anonymous_mb": fields["Anonymous"], "private_dirty_mb": fields["Private_Dirty"]}


def runtime_floor_mb() -> dict[str, float]:
    """What `import torch, torchvision` alone costs, measured in a fresh interpreter."""
    code = ("import json, torch, torchvision; from pathlib import Path; "
            "lines = Path('/proc/self/smaps_rollup').read_text().splitlines()[1:]; "
            "f = {l.split(':')[0]: int(l.split(':')[1].split()[0]) / 1024 for l in lines}; "
            "print(json.dumps({'rss_mb': f['Rss'], 'anonymous_mb': f['Anonymous']}))")
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                     text=True, check=True).stdout)


def unique_weights_mb(variants: dict) -> float:
    """The loaded variants' weights, each artifact counted once (baseline and res160 share)."""
    sizes = {v.artifact + ("-compiled" if v.recipe.compiled else ""): v.facts.size_bytes
             for v in variants.values()}
    return sum(sizes.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--variants", default=None, help="comma-separated (default: all)")
    parser.add_argument("--runtime", default="auto",
                        help="where compiled variants run (default auto, as the server)")
    parser.add_argument("--load-only", action="store_true",
                        help="load what the cache holds and build nothing, as the server does "
                             "(its builder process builds); needs a warm cache")
    args = parser.parse_args()

    import torch

    from leanvgg import schema
    from leanvgg.builder import stored_baseline
    from leanvgg.models import load_baseline
    from leanvgg.residency import trim
    from leanvgg.service import ComparisonService
    from leanvgg.store import Store
    from leanvgg.variants import VariantBuilder, VariantSet

    runtime = runtime_floor_mb()
    store = Store()
    # as the server: the baseline's weights mapped from the store, the copy they came in freed
    baseline = stored_baseline(load_baseline("random", progress=False), store)
    trim()
    builder = VariantBuilder(baseline, store, runtime=args.runtime,
                             load_only=args.load_only)
    names = builder.resolve(args.variants.split(",") if args.variants else None)
    ready, steps = {}, []
    print(f"{'after':<22}{'runs on':>12}{'RSS MB':>9}{'PSS MB':>9}{'anon MB':>9}{'floor MB':>10}{'RSS/floor':>10}")
    for name in names:
        started = time.perf_counter()
        ready[name] = builder.prepare(name)
        gc.collect()
        floor = runtime["rss_mb"] + unique_weights_mb(ready)
        row = {"after": f"+ {name}", "runtime": ready[name].placement.runtime,
               "seconds": round(time.perf_counter() - started, 1),
               **smaps(), "floor_mb": floor}
        steps.append(row)
        print(f"{row['after']:<22}{row['runtime']:>12}{row['rss_mb']:>9.0f}{row['pss_mb']:>9.0f}"
              f"{row['anonymous_mb']:>9.0f}{floor:>10.0f}{row['rss_mb'] / floor:>10.2f}")
    del builder  # the intermediate models it remembered while building
    gc.collect()
    service = ComparisonService(variant_set=VariantSet(baseline, ready))
    photo = (importlib.resources.files("skimage.data") / "chelsea.png").read_bytes()
    for _ in range(args.uploads):
        service.compare(photo)
    gc.collect()
    floor = runtime["rss_mb"] + unique_weights_mb(ready)
    after = {"after": f"{args.uploads} uploads", **smaps(), "floor_mb": floor}
    steps.append(after)
    print(f"{after['after']:<22}{'':>12}{after['rss_mb']:>9.0f}{after['pss_mb']:>9.0f}"
          f"{after['anonymous_mb']:>9.0f}{floor:>10.0f}{after['rss_mb'] / floor:>10.2f}")
    report = schema.document(
        "benchmark/memory", [{"name": step.pop("after"), **step} for step in steps],
        config={"weights": "random (sizes real, predictions meaningless)",
                "uploads": args.uploads, "variants": names, "runtime": args.runtime,
                "load_only": args.load_only},
        threads=torch.get_num_threads(), runtime_floor=runtime,
        unique_weights_mb=unique_weights_mb(ready))
    schema.write(RESULTS / "memory.json", report)
    print(f"runtime alone (import torch, torchvision): RSS {runtime['rss_mb']:.0f} MB, "
          f"anonymous {runtime['anonymous_mb']:.0f} MB; unique weights "
          f"{unique_weights_mb(ready):.0f} MB; saved {RESULTS / 'memory.json'}")


if __name__ == "__main__":
    main()
