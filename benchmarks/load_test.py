"""A bounded load test against the real server on 127.0.0.1.

Starts `leanvgg serve` (random weights), waits until it is ready, then runs CLIENTS threads for
SECONDS, each posting a mix of a real photo and hostile uploads, and reports requests served,
answers by status, dropped connections, p50/p95 answer time, queue wait and the server's resident
memory before and after. Stops by itself.

Run: .venv/bin/python benchmarks/load_test.py --clients 16 --seconds 60
"""

from __future__ import annotations

import argparse
import importlib.resources
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from leanvgg import schema
from leanvgg.measure import Latency

RESULTS = Path(__file__).parent / "results"
PHOTO = (importlib.resources.files("skimage.data") / "chelsea.png").read_bytes()


def _hostile() -> dict[str, bytes]:
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(PHOTO)).convert("RGB").save(jpeg, "JPEG")
    return {"text": b"not an image at all", "truncated": jpeg.getvalue()[:5000], "empty": b""}


def _post(url: str, data: bytes) -> tuple[int, dict | None]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"upload\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, None


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def run(*, clients: int, seconds: float, runs: int = 1, home: str | None = None,
        variants: str | None = None, threads: int | None = None,
        runtime: str | None = None) -> dict:
    """``variants``: the server's --variants (default: every default variant); ``threads``:
    its --threads (default: PyTorch's; packages are made per thread count); ``runtime``: its
    --runtime (default auto)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, **({"LEANVGG_HOME": home} if home else {})}
    server = subprocess.Popen(
        [sys.executable, "-m", "leanvgg", "serve", "--weights", "random", "--port", str(port),
         "--runs", str(runs), "--warmup", "0",
         *(["--variants", variants] if variants else []),
         *(["--threads", str(threads)] if threads else []),
         *(["--runtime", runtime] if runtime else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=5):
                    break  # 200: ready
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        rss_start = _rss_mb(server.pid)
        uploads = [("photo", PHOTO), *_hostile().items()]
        statuses: Counter[str] = Counter()
        answer_s, waits = [], []
        dropped = 0
        lock = threading.Lock()
        stop = time.monotonic() + seconds

        def client(index: int) -> None:
            nonlocal dropped
            turn = index
            while time.monotonic() < stop:
                kind, data = uploads[turn % len(uploads)]
                turn += 1
                started = time.perf_counter()
                try:
                    status, body = _post(base + "/api/compare", data)
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    with lock:
                        dropped += 1
                    continue
                with lock:
                    statuses[f"{kind} {status}"] += 1
                    if status == 200:
                        answer_s.append(time.perf_counter() - started)
                        waits.append(body["queue_wait_ms"])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rss_end = _rss_mb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()

    def pct(values: list[float], q: int) -> float | None:
        return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else None

    return {
        "clients": clients, "seconds": seconds, "runs_per_variant": runs,
        "requests": sum(statuses.values()), "by_status": dict(sorted(statuses.items())),
        "server_errors": sum(n for k, n in statuses.items() if k.split()[1].startswith("5")
                             and not k.endswith("503")),
        "busy_503": sum(n for k, n in statuses.items() if k.endswith("503")),
        "dropped": dropped,
        "answer_s": {"p50": pct(answer_s, 50), "p95": pct(answer_s, 95)},
        **({"latency_ms": Latency.from_seconds(answer_s).to_dict()} if answer_s else {}),
        "queue_wait_ms": {"p50": pct(waits, 50), "p95": pct(waits, 95)},
        "rss_mb": {"start": rss_start, "end": rss_end},
        "server_exit_code": server.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--runs", type=int, default=1, help="timed runs per variant")
    parser.add_argument("--out", type=Path, default=RESULTS / "load_test.json",
                        help="where to save the JSON (default %(default)s)")
    args = parser.parse_args()
    result = run(clients=args.clients, seconds=args.seconds, runs=args.runs)
    report = schema.document(
        "benchmark/load_test", [{"name": "POST /api/compare (answer time)", **result}],
        config={"clients": args.clients, "seconds": args.seconds, "runs": args.runs},
        threads=torch.get_num_threads())
    schema.write(args.out, report)
    print(json.dumps(report["results"][0], indent=2))

if __name__ == "__main__":
    main()
