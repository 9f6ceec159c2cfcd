"""Which channel alignment suits this CPU? turbo_svd with kept filters rounded down to 16, 32 or
64, each built through the product's build path and timed on the runtimes it can run on.

turbo keeps 90 % of the filters of the 9 deepest convs, rounded down to a multiple of 16
(256 → 224, 512 → 448: whole AVX-512 blocks). AMX tiles hold 16 rows of 64 bytes, so 32 or 64
might suit them better; this measures instead of assuming. Alignments that give the same
layout are one model and are built and timed once. Random weights (timings and sizes are
real), batch 1, round-robin (3 warm-up, --runs timed passes each, each right after an untimed
one of the same runner).

Run: .venv/bin/python benchmarks/channel_alignment.py   (LEANVGG_HOME: the cache to use)
Writes benchmarks/results/channel_alignment.json (report schema; --out: another file, e.g. per
CPU kind).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from leanvgg import schema
from leanvgg.capabilities import runtime_refusal
from leanvgg.builder import Builder
from leanvgg.context import RunContext
from leanvgg.measure import time_models
from leanvgg.models import load_baseline
from leanvgg.recipes import RECIPES, Prune, bind
from leanvgg.runtimes import RUNTIMES, installed, select
from leanvgg.store import Store

RESULTS = Path(__file__).parent / "results"
ALIGNMENTS = (16, 32, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS / "channel_alignment.json",
                        help="the report to write (one per CPU kind measured)")
    args = parser.parse_args()
    baseline = load_baseline("random", progress=False)
    builder = Builder(baseline, Store(), RunContext.here(args.threads))
    layouts: dict[tuple[int, ...], list[int]] = {}  # kept filters → the alignments giving them
    recipes = {}
    for alignment in ALIGNMENTS:
        recipe = bind(dataclasses.replace(RECIPES["turbo_svd"], steps=tuple(
            dataclasses.replace(step, multiple_of=alignment) if isinstance(step, Prune)
            else step for step in RECIPES["turbo_svd"].steps)), baseline.model)
        _, facts, _ = builder.artifact(recipe, 1)
        kept = tuple(layer["after"] for layer in facts["pruning"])
        if kept not in layouts:
            recipes[kept] = recipe
        layouts.setdefault(kept, []).append(alignment)
    jobs, rows = {}, []
    x = torch.randn(1, 3, 224, 224)
    for kept, recipe in recipes.items():
        name = "/".join(str(a) for a in layouts[kept])
        for runtime in RUNTIMES:
            if not installed(runtime) or runtime_refusal(recipe, runtime) is not None:
                continue
            variant = select(recipe, builder, runtime)
            jobs[f"{name} [{runtime}]"] = (variant.model, x)
            rows.append({"name": f"{name} [{runtime}]", "alignments": layouts[kept],
                         "kept_filters": list(kept), "runtime": runtime,
                         "macs": variant.facts.macs, "size_mb": variant.facts.size_mb})
    # primed: each timed pass right after an untimed one of the same runner (four runtimes
    # whose threads outlive their pass: unprimed, half the passes here ran at twice the time)
    timings = time_models(jobs, runs=args.runs, warmup=3, progress=True, threads=args.threads,
                          primed=True)
    for row in rows:
        latency = timings[row["name"]][0]
        row["latency_ms"] = latency.to_dict()
    report = schema.document("benchmark/channel_alignment", rows,
                             config={"weights": "random", "runs": args.runs, "batch": 1,
                                     "primed": True, "recipe": "turbo_svd"},
                             threads=args.threads)
    schema.write(args.out, report)
    print(f"{'alignment [runtime]':<28}{'kept filters (features 16…34)':<44}{'GMACs':>7}"
          f"{'median ms':>11}")
    for row in rows:
        print(f"{row['name']:<28}{','.join(map(str, row['kept_filters'])):<44}"
              f"{row['macs'] / 1e9:>7.2f}{row['latency_ms']['median']:>11.2f}")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
