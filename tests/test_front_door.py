"""What a web client can send, against the real server (waitress on 127.0.0.1, its own process):
bodies above the bound, foreign Host names, cross-site posts, slow clients and the memory the
worst images the limits allow cost."""

import http.client
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import multipart
from leanvgg import schema
from leanvgg.web import ENVELOPE

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(port, pid) of a real server over the tiny VGG."""
    cache = tmp_path_factory.mktemp("front-door-cache")
    process = subprocess.Popen([sys.executable, str(HERE / "server_worker.py"), str(cache)],
                               stdout=subprocess.PIPE, text=True)
    port = int(process.stdout.readline())
    yield port, process.pid
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None, timeout: float = 60) -> tuple[int, dict | bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data
    finally:
        connection.close()


def _post_image(port: int, data: bytes, headers: dict | None = None, timeout: float = 120):
    body, content_type = multipart(data)
    return _request(port, "POST", "/api/compare", body,
                    {"Content-Type": content_type, **(headers or {})}, timeout)


@pytest.mark.slow
def test_the_answer_follows_the_report_schema(server, photo_path):
    port, _ = server
    status, body = _post_image(port, photo_path.read_bytes())
    assert status == 200
    schema.validate(body)
    assert body["kind"] == "compare" and [r["name"] for r in body["results"]] == \
        ["baseline", "res160"]
    assert body["machine"]["threads"] == 1 and body["results"][0]["latency_ms"]["count"] == 1


def _post_image_to(port: int, path: str, data: bytes):
    body, content_type = multipart(data)
    return _request(port, "POST", path, body, {"Content-Type": content_type})


def test_the_throughput_scenario_is_measured_on_request_and_bounded(server, photo_path):
    port, _ = server
    status, body = _post_image_to(port, "/api/compare?batch=3", photo_path.read_bytes())
    assert status == 200
    schema.validate(body)
    assert body["batch_size"] == 3 and body["config"]["batch_size"] == 3
    for row in body["results"]:
        throughput = row["throughput"]
        assert throughput["batch_size"] == 3 and throughput["latency_ms"]["count"] == 1
        assert throughput["images_per_s"] == pytest.approx(
            3 / (throughput["latency_ms"]["median"] / 1e3))
    for bad in ("17", "0", "eight"):
        status, body = _post_image_to(port, f"/api/compare?batch={bad}",
                                      photo_path.read_bytes())
        assert status == 400 and body["error"].startswith(f"Invalid batch '{bad}'")
    status, body = _post_image_to(port, "/api/compare/stream?batch=99", photo_path.read_bytes())
    assert status == 400 and "Invalid batch" in body["error"]


@pytest.mark.parametrize("value", ["²", "٣", "9" * 5000, "+3", " 3", "3.0"])
def test_a_count_is_ascii_digits_or_a_400(server, photo_path, value):
    """'²' passed str.isdigit() and then failed int(), and int() refuses 5,000 digits: both
    answered 500."""
    port, _ = server
    from urllib.parse import quote

    status, body = _post_image_to(port, f"/api/compare?runs={quote(value)}",
                                  photo_path.read_bytes())
    assert status == 400 and body["error"].startswith("Invalid runs")
    assert len(body["error"]) < 120  # a 5,000-digit value is not echoed whole


def test_a_body_above_the_bound_is_refused_before_it_is_read(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /api/compare HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: 300000000\r\n\r\n")
        # not one byte of the 300 MB body is sent, yet the answer comes at once
        started = time.monotonic()
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - started < 5


def test_a_body_just_inside_the_bound_reaches_the_app(server):
    # 20 MB of non-image within the envelope: read whole, then refused by content (415)
    port, _ = server
    status, body = _post_image(port, b"\1" * (20 * 2**20 - ENVELOPE))
    assert status == 415 and "Not a supported image" in body["error"]


@pytest.mark.parametrize(("host", "status"), [("evil.test", 400), ("127.0.0.1", 200),
                                              ("localhost", 200), ("evil.test:8000", 400)])
def test_only_the_servers_own_host_names_are_answered(server, host, status):
    port, _ = server
    answer, body = _request(port, "GET", "/api/variants", headers={"Host": host})
    assert answer == status
    if status == 400:
        assert "error" in body  # JSON, like every other error


def test_the_host_check_covers_the_page_and_posts_too(server, photo_path):
    port, _ = server
    assert _request(port, "GET", "/", headers={"Host": "evil.test"})[0] == 400
    assert _post_image(port, photo_path.read_bytes(), {"Host": "evil.test"})[0] == 400


@pytest.mark.parametrize(("headers", "status"), [
    ({"Origin": "http://evil.test", "Sec-Fetch-Site": "cross-site"}, 403),
    ({"Origin": "http://evil.test"}, 403),  # older browsers send no Sec-Fetch-Site
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Sec-Fetch-Site": "same-site", "Origin": "http://localhost:3000"}, 403),
    ({"Origin": "null"}, 403),
    ({"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:{port}"}, 200),  # the page
    ({}, 200),  # curl, scripts
])
def test_cross_site_posts_are_refused(server, photo_path, headers, status):
    port, _ = server
    headers = {k: v.format(port=port) for k, v in headers.items()}
    answer, body = _post_image(port, photo_path.read_bytes(), headers)
    assert answer == status, body
    if status == 403:
        assert "Cross-site" in body["error"]


def test_fifty_slow_clients_do_not_starve_the_others(server, photo_path):
    port, _ = server
    stop = threading.Event()
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(50)]

    def trickle():
        request = (b"POST /api/compare HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n"
                   b"\r\n" + b"x" * 1000)
        for i in range(len(request)):
            if stop.is_set():
                return
            for sock in sockets:
                try:
                    sock.send(request[i:i + 1])
                except OSError:
                    pass
            time.sleep(0.05)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        time.sleep(1)  # every slow client has its connection open and is mid-request
        started = time.monotonic()
        assert _request(port, "GET", "/healthz", timeout=10)[0] == 200
        status, body = _post_image(port, photo_path.read_bytes(), timeout=30)
        assert status == 200 and len(body["results"]) == 2
        assert time.monotonic() - started < 10
    finally:
        stop.set()
        thread.join()
        for sock in sockets:
            sock.close()


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def _worst_images() -> dict[str, bytes]:
    """The largest decoded sizes the default limits (50 MP, 20 MB) accept."""
    def save(image, fmt, **params):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **params)
        return buffer.getvalue()

    gradient = Image.linear_gradient("L").resize((7071, 7071))
    return {
        "extreme-aspect-png": save(Image.new("RGB", (1_562_500, 32), (9, 99, 199)), "PNG"),
        "rgba-50mp-png": save(Image.merge("RGBA", [gradient] * 4), "PNG", compress_level=1),
        "progressive-jpeg": save(gradient.convert("RGB"), "JPEG", progressive=True),
        "16-bit-tiff": save(gradient.convert("I;16"), "TIFF", compression="tiff_deflate"),
    }


# What the README documents: the decoder's own buffers for the one decode allowed at a time
# (≤ 250 MB), the tensors, plus the request bodies held by the threads.
RSS_GROWTH_BOUND_MB = 500


@pytest.mark.slow
def test_four_worst_images_at_once_stay_within_the_memory_bound(server):
    port, pid = server
    images = _worst_images()
    assert all(len(data) < 20 * 2**20 for data in images.values())
    _request(port, "GET", "/healthz")
    idle = _rss_mb(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
    answers = {}

    def post(name, data):
        answers[name] = _post_image(port, data, timeout=300)

    threads = [threading.Thread(target=post, args=item) for item in images.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    growth = _rss_mb(pid, "VmHWM") - idle
    assert {name: status for name, (status, _) in answers.items()} == dict.fromkeys(images, 200)
    assert answers["extreme-aspect-png"][1]["image"] == {"width": 1_562_500, "height": 32}
    print(f"peak RSS growth with 4 worst images at once: {growth:.0f} MB (idle {idle:.0f} MB)")
    assert growth < RSS_GROWTH_BOUND_MB
