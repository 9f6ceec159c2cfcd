"""The dashboard as a new user meets it, in one run: cold start, warm start, uploads, memory.

The server only loads; its builder process (``leanvgg build --events``) builds, compiles,
converts and chooses runtimes. Measured: start → baseline answering, → every variant ready on
some runtime, → the runtime choice done, and uploads answered meanwhile (one every 2 s).

Starts `leanvgg serve --weights random` (default variants and settings) on 127.0.0.1 with an
empty cache (and an empty Inductor cache: compiled kernels and precompiled headers left by
earlier runs would make the cold start faster than a newcomer's), then again on the cache it
left, and measures: start → page and /healthz answering,
start → every variant ready, the first and later upload round-trips (`POST /api/compare`), the
time to the first row of the streamed answer (`/api/compare/stream`), and the server's RSS,
PSS and anonymous memory against the floor after warm-up and after N uploads. Saves
benchmarks/results/startup.json. Random weights: sizes and timings are real.

Run: .venv/bin/python benchmarks/startup.py --uploads 50
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory import runtime_floor_mb, smaps  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PHOTO = (importlib.resources.files("skimage.data") / "chelsea.png").read_bytes()


def _request(url: str, body: bytes | None = None, content_type: str | None = None):
    request = urllib.request.Request(url, data=body, headers={
        "Content-Type": content_type} if content_type else {})
    return urllib.request.urlopen(request, timeout=600)


def _multipart() -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"cat.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    return body + PHOTO + f"\r\n--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def wait_for(base: str, started: float, condition,
             server: subprocess.Popen | None = None) -> float:
    """Seconds since ``started`` once ``/api/variants`` meets ``condition`` (polled every
    50 ms); SystemExit if ``server`` (when given) exits first."""
    while True:
        try:
            with _request(base + "/api/variants") as response:
                if condition(json.loads(response.read())):
                    return time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError):
            pass
        if server is not None and server.poll() is not None:
            raise SystemExit(f"The server for {base} exited ({server.returncode}) first.")
        time.sleep(0.05)


def _upload(base: str) -> float:
    body, content_type = _multipart()
    started = time.perf_counter()
    with _request(base + "/api/compare", body, content_type) as response:
        json.loads(response.read())
    return time.perf_counter() - started


def _first_row(base: str) -> tuple[float, float]:
    """Seconds from sending the upload to its first row, and to the whole answer."""
    body, content_type = _multipart()
    started = time.perf_counter()
    first = None
    with _request(base + "/api/compare/stream", body, content_type) as response:
        for line in response:
            if json.loads(line)["event"] == "row" and first is None:
                first = time.perf_counter() - started
    return first, time.perf_counter() - started


def _floor(base: str, runtime: dict) -> float:
    with _request(base + "/api/variants") as response:
        variants = json.loads(response.read())["variants"]
    unique = {}
    for v in variants:
        if v["state"] == "ready":
            compiled = bool(v["preparation_s"].get("load_s"))
            unique[(v["size_mb"], v["params"], v["input_size"] if compiled else 0)] = v["size_mb"]
    return runtime["rss_mb"] + sum(unique.values())


def run_server(home: str, uploads: int, runtime: dict, *, uploading: bool = True) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "leanvgg", "serve", "--weights", "random",
                               "--port", str(port)], env={
                                   **os.environ, "LEANVGG_HOME": home,
                                   # Inductor's own cache (compiled kernels, precompiled
                                   # headers) as empty as a newcomer's on the cold start
                                   "TORCHINDUCTOR_CACHE_DIR": os.path.join(home, "inductor")},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        answering = wait_for(base, started, lambda body: True)
        serving = wait_for(base, started, lambda body: any(
            v["name"] == "baseline" and v["state"] == "ready" for v in body["variants"]))
        # uploads while the builder process builds and chooses: each must still be answered
        timeline, ready, ready_at = [], None, {}
        while True:
            with _request(base + "/api/variants") as response:
                body = json.loads(response.read())
            now = time.perf_counter() - started
            for v in body["variants"]:
                if v["state"] == "ready":
                    ready_at.setdefault(v["name"], round(now, 1))
            settled = body["status"] in ("ready", "degraded")
            if ready is None and settled:
                ready = now
            if settled and not body.get("builder_process") and not body.get("pending_choice"):
                break
            if uploading:
                timeline.append({"at_s": round(now, 1), "upload_s": _upload(base),
                                 "while": "choosing runtimes" if settled else "building"})
            time.sleep(2 if uploading else 0.5)
        chosen = time.perf_counter() - started
        during = [u["upload_s"] for u in timeline]
        ready = chosen if ready is None else ready
        after_ready = smaps(server.pid)
        first = _upload(base)
        later = [_upload(base) for _ in range(3)]
        first_row, streamed = _first_row(base)
        # the profiles are measured while the server is idle: let them finish
        wait_for(base, started, lambda body: all(v.get("profile") for v in body["variants"]))
        profiled = time.perf_counter() - started
        after_profiles = smaps(server.pid)
        times = [_upload(base) for _ in range(uploads)]
        after_uploads = smaps(server.pid)
        floor = _floor(base, runtime)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    return {"answering_s": answering, "serving_s": serving, "ready_s": ready,
            "runtime_choice_done_s": chosen, "ready_at_s": ready_at,
            "uploads_during_build": len(during),
            "upload_during_build_max_s": max(during, default=0.0),
            "upload_during_build_p50_s": statistics.median(during) if during else 0.0,
            "upload_during_build_max_s_by_phase": {
                phase: max(u["upload_s"] for u in timeline if u["while"] == phase)
                for phase in {u["while"] for u in timeline}},
            "uploads_during_build_timeline": timeline,
            "profiles_done_s": profiled,
            "first_upload_s": first, "later_upload_s": statistics.median(later),
            "first_row_s": first_row, "streamed_answer_s": streamed,
            "uploads": uploads, "upload_p50_s": statistics.median(times),
            "upload_max_s": max(times), "floor_mb": floor, "after_ready": after_ready,
            "after_profiles": after_profiles, "after_uploads": after_uploads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--home", default=None,
                        help="an empty folder for the cache, kept afterwards (default: a "
                             "temporary one), e.g. for benchmarks/memory.py on a warm cache")
    parser.add_argument("--idle-start", action="store_true",
                        help="send no uploads while the variants build (the build's own speed; "
                             "saved as startup-idle.json)")
    parser.add_argument("--cold-only", action="store_true", help="skip the warm start")
    parser.add_argument("--out", type=Path, default=None,
                        help="the report to write (default: results/startup.json, or "
                             "startup-idle.json with --idle-start)")
    args = parser.parse_args()

    import torch

    from leanvgg import schema
    from leanvgg.service import worker

    runtime = runtime_floor_mb()
    with tempfile.TemporaryDirectory(prefix="leanvgg-startup-") as temporary:
        home = args.home or temporary
        cold = run_server(home, args.uploads, runtime, uploading=not args.idle_start)
        warm = None if args.cold_only else run_server(home, args.uploads, runtime)
    runs = {"cold": cold, "warm": warm} if warm is not None else {"cold": cold}
    out = args.out or RESULTS / ("startup-idle.json" if args.idle_start else "startup.json")
    report = schema.document(
        "benchmark/startup", [{"name": f"{name} cache", **found} for name, found in runs.items()],
        config={"weights": "random (sizes and timings real)", "uploads": args.uploads,
                "uploads_during_start": not args.idle_start,
                "build_jobs": worker.JOBS},
        threads=torch.get_num_threads(), runtime_floor=runtime)
    schema.write(out, report)
    print(f"{'':<34}" + "".join(f"{name + ' cache':>12}" for name in runs))
    for key, label in [("answering_s", "start → page and /healthz (s)"),
                       ("serving_s", "start → baseline answering (s)"),
                       ("ready_s", "start → every variant ready (s)"),
                       ("runtime_choice_done_s", "start → runtime choice done (s)"),
                       ("upload_during_build_max_s", "uploads while building, max (s)"),
                       ("first_upload_s", "first upload, whole answer (s)"),
                       ("later_upload_s", "later uploads, median (s)"),
                       ("first_row_s", "upload → first row (s)"),
                       ("profiles_done_s", "start → all profiles measured (s)"),
                       ("upload_p50_s", f"{args.uploads} uploads, median (s)")]:
        print(f"{label:<34}" + "".join(f"{found[key]:>12.2f}" for found in runs.values()))
    for phase, worst in sorted(cold["upload_during_build_max_s_by_phase"].items()):
        print(f"{'  cold, max while ' + phase + ' (s)':<34}{worst:>12.2f}")
    for moment in ("after_ready", "after_uploads"):
        for name, found in runs.items():
            m, floor = found[moment], found["floor_mb"]
            print(f"{name} {moment}: RSS {m['rss_mb']:.0f} MB ({m['rss_mb'] / floor:.2f}× the "
                  f"floor {floor:.0f} MB), PSS {m['pss_mb']:.0f}, anonymous "
                  f"{m['anonymous_mb']:.0f} MB")
    print(f"cold start, each variant ready at (s): {cold['ready_at_s']}")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
