"""Warm starts of the dashboard: this tree against another revision, side by side in one run.

Both start `leanvgg serve --weights random` (default variants and settings) on one warm cache,
alternately, `--rounds` times each after one unmeasured start each (the current tree's first
start also fills an empty cache, and records what later starts read back); measured: start →
every variant ready on its chosen runtime (`/api/variants` polled every 50 ms: status ready, no
builder process, no runtime choice pending). The other revision is checked out with
`git worktree` into a temporary folder and started from there (its own `leanvgg` imported, the
same virtual environment). Prints each side's median and their ratio, with the CPU flags;
saves benchmarks/results/warm_start.json. Random weights: the timings are real.

Run: .venv/bin/python benchmarks/warm_start.py --against HEAD~1 --rounds 4
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from leanvgg import schema
from leanvgg.measure import Latency
from leanvgg.store import default_root

sys.path.insert(0, str(Path(__file__).parent))
from startup import wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def warm_start(tree: Path, home: Path, log: Path) -> float:
    """Seconds from starting the server in ``tree`` to every variant ready."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    with log.open("w") as stderr:
        server = subprocess.Popen(  # run from the tree: `-m` imports the working folder's first
            [sys.executable, "-m", "leanvgg", "serve", "--weights", "random", "--port",
             str(port)], cwd=tree, env={**os.environ, "LEANVGG_HOME": str(home)},
            stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            return wait_for(f"http://127.0.0.1:{port}", started, lambda body: (
                body["status"] in ("ready", "degraded")
                and not (body.get("builder_process") or body.get("pending_choice"))), server)
        except SystemExit:
            sys.stderr.write(log.read_text()[-4000:])  # why, before its folder goes
            raise
        finally:
            server.terminate()
            server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--home", type=Path, default=default_root(),
                        help="the cache both use (default: LEANVGG_HOME or ~/.cache/leanvgg)")
    args = parser.parse_args()
    revision = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=ROOT,
                              check=True, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="leanvgg-warm-") as temporary:
        other = Path(temporary) / revision
        subprocess.run(["git", "worktree", "add", "--detach", str(other), revision], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            trees = {"this tree": ROOT, f"revision {revision}": other}
            logs = {name: Path(temporary) / f"{i}.log" for i, name in enumerate(trees)}
            seconds: dict[str, list[float]] = {name: [] for name in trees}
            for name, tree in trees.items():  # unmeasured: fills the cache, warms the page cache
                warm_start(tree, args.home, logs[name])
            for round_ in range(args.rounds):
                for name, tree in (trees.items() if round_ % 2 == 0
                                   else reversed(trees.items())):
                    seconds[name].append(warm_start(tree, args.home, logs[name]))
                    print(f"round {round_ + 1}, {name}: {seconds[name][-1]:.2f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT,
                           check=False, capture_output=True)
    latency = {name: Latency.from_seconds(found) for name, found in seconds.items()}
    ours, theirs = latency["this tree"].median, latency[f"revision {revision}"].median
    report = schema.document(
        "benchmark/warm_start",
        [{"name": name, "ready_ms": found.to_dict()} for name, found in latency.items()],
        config={"weights": "random (timings real)", "rounds": args.rounds,
                "against": revision, "measured": "start -> every variant ready"},
        threads=os.cpu_count() or 1, ratio=ours / theirs)
    schema.write(RESULTS / "warm_start.json", report)
    for name, found in latency.items():
        print(f"{name:<20} median {found.median / 1e3:6.2f} s  (min {found.min / 1e3:.2f}, "
              f"max {found.max / 1e3:.2f})")
    print(f"this tree / revision {revision}: {ours / theirs:.2f}×; {report['machine']['cpu']} "
          f"({' '.join(report['machine']['flags'])})")
    print(f"saved {RESULTS / 'warm_start.json'}")


if __name__ == "__main__":
    main()
