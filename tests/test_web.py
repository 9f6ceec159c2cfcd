import io
import threading

import pytest

from conftest import encode
from leanvgg.compare import Settings
from leanvgg.images import ImageLimits
from leanvgg.service import ComparisonService
from leanvgg.store import Store
from leanvgg.variants import build_variants, default_names
from leanvgg.web import create_app
from hostile import corpus
from tiny import tiny_baseline

FAST = Settings(runs=1, warmup=0, threads=1)


@pytest.fixture(scope="session")
def ready_service(variant_set):
    return ComparisonService(settings=FAST, variant_set=variant_set)


def test_a_started_service_loads_its_variants(variant_set, cache_dir):
    service = ComparisonService(weights="random", names=["baseline", "quantized"],
                                store=Store(cache_dir))
    idle = {"builder_process": False, "pending_choice": []}  # built here, in this process
    assert service.status() == {"status": "warming up", "serving": False, "variants": {},
                                **idle}
    service.start(background=False)
    assert service.status() == {"status": "ready", "serving": True,
                                "variants": {"baseline": "ready", "quantized": "ready"}, **idle}
    assert list(service.variant_set().variants) == ["baseline", "quantized"]


@pytest.fixture
def app(ready_service):
    return create_app(ready_service, {"TESTING": True})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def photo_bytes(photo_path):
    return photo_path.read_bytes()


def test_page_is_self_contained_and_secured(client):
    response = client.get("/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere
    assert "/static/vendor/chart-4.6.1.umd.min.js" in html and "/static/app.js" in html
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    for asset in ("/static/app.js", "/static/style.css", "/static/vendor/chart-4.6.1.umd.min.js",
                  "/static/vendor/chart.js-LICENSE.md"):
        assert client.get(asset).status_code == 200, asset


def test_healthz_ready(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json["status"] == "ready" and response.json["serving"] is True
    assert set(response.json["variants"].values()) == {"ready"}


def test_variants_lists_states_and_static_facts(client):
    body = client.get("/api/variants").json
    assert body["predictions_meaningful"] is False and "meaningless" in body["note"]
    names = [v["name"] for v in body["variants"]]
    assert names == default_names()
    for v in body["variants"]:
        assert v["state"] == "ready" and v["reason"] is None
        assert {"description", "input_size", "size_mb", "params", "macs", "fine_tuned",
                "profile"} <= v.keys()


def test_compare_returns_the_cli_json_plus_queue_wait(client, photo_bytes):
    response = client.post("/api/compare", data={"image": (io.BytesIO(photo_bytes), "cat.png")})
    assert response.status_code == 200
    body = response.json
    assert body["queue_wait_ms"] >= 0 and body["runs"] == 1 and body["threads"] == 1
    assert [v["name"] for v in body["results"]][0] == "baseline"
    assert body["not_ready"] == {}
    for v in body["results"]:  # no profile measured in this service: this request's pass
        assert len(v["top3"]) == 3 and v["latency_ms"]["median"] > 0
        assert v["latency_source"] == "request" and v["image_ms"] == v["latency_ms"]["median"]


def test_runs_measures_latency_in_the_request(client, photo_bytes):
    response = client.post("/api/compare?runs=3",
                           data={"image": (io.BytesIO(photo_bytes), "cat.png")})
    assert response.status_code == 200 and response.json["runs"] == 3
    assert all(v["latency_ms"]["count"] == 3 for v in response.json["results"])
    bad = client.post("/api/compare?runs=zero",
                      data={"image": (io.BytesIO(photo_bytes), "cat.png")})
    assert bad.status_code == 400 and "Invalid runs" in bad.json["error"]


@pytest.fixture(scope="module")
def tiny_service(tmp_path_factory):
    """Answers in milliseconds, so every item of the corpus goes through a whole comparison."""
    store = Store(tmp_path_factory.mktemp("tiny-cache"))
    return ComparisonService(settings=FAST, variant_set=build_variants(
        tiny_baseline(), ["baseline", "res160"], store=store, progress=False))


def test_every_hostile_upload_gets_its_documented_answer(tiny_service, photo):
    client = create_app(tiny_service, {"TESTING": True}).test_client()
    for upload in corpus(photo):
        response = client.post("/api/compare",
                               data={"image": (io.BytesIO(upload.data), f"{upload.name}.jpg")})
        assert response.status_code == upload.status, upload.name
        if upload.status == 200:
            assert [v["name"] for v in response.json["results"]] == ["baseline", "res160"]
        else:
            assert upload.message in response.json["error"], upload.name
    assert client.get("/healthz").status_code == 200  # and it keeps serving


def test_upload_limits_are_configurable(tiny_service, photo):
    strict = ComparisonService(settings=FAST, variant_set=tiny_service.variant_set(),
                               limits=ImageLimits(max_bytes=2**20, min_side=400))
    client = create_app(strict, {"TESTING": True}).test_client()
    assert client.application.config["MAX_CONTENT_LENGTH"] < 2 * 2**20
    big = client.post("/api/compare", data={"image": (io.BytesIO(b"\0" * 2 * 2**20), "a.png")})
    assert big.status_code == 413 and "the limit is 1 MB" in big.json["error"]
    small = client.post("/api/compare",
                        data={"image": (io.BytesIO(encode(photo, "PNG")), "a.png")})
    assert small.status_code == 400 and "at least 400 pixels" in small.json["error"]


@pytest.mark.parametrize(("kwargs", "status", "message"), [
    ({"data": {"other": "x"}, "content_type": "multipart/form-data"}, 400, "got 0"),
    ({"data": {"image": "not a file"}, "content_type": "multipart/form-data"}, 400, "got 0"),
    ({"data": b"raw bytes", "content_type": "image/png"}, 415, "multipart/form-data"),
    ({"json": {"image": "x"}}, 415, "multipart/form-data"),
])
def test_malformed_requests(client, kwargs, status, message):
    response = client.post("/api/compare", **kwargs)
    assert response.status_code == status
    assert message in response.json["error"]


def test_two_files_in_the_field_are_refused(client, photo_bytes):
    data = {"image": [(io.BytesIO(photo_bytes), "a.png"), (io.BytesIO(photo_bytes), "b.png")]}
    response = client.post("/api/compare", data=data)
    assert response.status_code == 400 and "got 2" in response.json["error"]


def test_no_route_reads_or_writes_a_path_the_client_names(client, photo_bytes, tmp_path,
                                                         monkeypatch):
    rules = {rule.rule for rule in client.application.url_map.iter_rules()}
    assert rules == {"/", "/healthz", "/api/variants", "/api/compare", "/api/compare/stream",
                     "/api/tune",
                     "/static/<path:filename>"}
    for probe in ("/static/../__init__.py", "/static/..%2f..%2fpyproject.toml",
                  "/static/%2e%2e/views.py", "/static//etc/passwd"):
        assert client.get(probe, follow_redirects=True).status_code == 404, probe
    monkeypatch.chdir(tmp_path)
    response = client.post("/api/compare", data={
        "image": (io.BytesIO(photo_bytes), "../../escaped.png")})
    assert response.status_code == 200
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent.parent / "escaped.png").exists()


def test_unknown_route_and_method_are_json(client):
    assert client.get("/nope").status_code == 404
    response = client.get("/api/compare")
    assert response.status_code == 405 and "error" in response.json


def test_warming_up_answers_at_once_and_refuses_comparisons(photo_bytes):
    waiting = ComparisonService(weights="random", settings=FAST)  # never started
    client = create_app(waiting, {"TESTING": True}).test_client()
    assert client.get("/healthz").json["status"] == "warming up"
    assert client.get("/healthz").status_code == 503
    variants = client.get("/api/variants")
    assert variants.status_code == 200 and variants.json["weights"] is None
    response = client.post("/api/compare", data={"image": (io.BytesIO(photo_bytes), "a.png")})
    assert response.status_code == 503 and "Warming up" in response.json["error"]
    assert client.get("/").status_code == 200


def test_a_failed_warm_up_is_reported(tmp_path):
    broken = ComparisonService(weights=str(tmp_path / "missing.pth"), settings=FAST)
    broken.start(background=False)
    client = create_app(broken, {"TESTING": True}).test_client()
    response = client.get("/healthz")
    assert response.status_code == 503 and response.json["status"] == "failed"
    assert "no such file" in response.json["error"]


def _concurrently(client, photo_bytes, n):
    barrier = threading.Barrier(n)
    responses = []

    def post():
        barrier.wait()
        responses.append(client.post("/api/compare",
                                     data={"image": (io.BytesIO(photo_bytes), "a.png")}))

    threads = [threading.Thread(target=post) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return responses


def test_concurrent_comparisons_queue_and_say_how_long_they_waited(client, photo_bytes):
    first, second = sorted(_concurrently(client, photo_bytes, 2),
                           key=lambda r: r.json["queue_wait_ms"])
    assert first.status_code == second.status_code == 200
    measured_ms = sum(v["latency_ms"]["median"] for v in first.json["results"])
    # the later one waited at least as long as the earlier one spent measuring
    assert second.json["queue_wait_ms"] >= 0.9 * measured_ms


def test_a_full_queue_answers_busy(ready_service, photo_bytes):
    tight = ComparisonService(settings=FAST, max_queue=1,
                              variant_set=ready_service.variant_set())
    client = create_app(tight, {"TESTING": True}).test_client()
    statuses = sorted(r.status_code for r in _concurrently(client, photo_bytes, 2))
    assert statuses == [200, 503]


def test_uploads_are_decoded_only_once_admitted(tiny_service, photo, monkeypatch):
    from leanvgg import images

    tight = ComparisonService(settings=FAST, max_queue=1, variant_set=tiny_service.variant_set())
    decoded = []
    real_decode = images.Checked.decode
    monkeypatch.setattr(images.Checked, "decode",
                        lambda self: decoded.append(self.image.size) or real_decode(self))
    client = create_app(tight, {"TESTING": True}).test_client()
    data = encode(photo, "PNG")
    with tight.queue.slot:  # the measurement slot is busy: the first upload is admitted and waits
        first = threading.Thread(target=client.post, args=("/api/compare",),
                                 kwargs={"data": {"image": (io.BytesIO(data), "a.png")}})
        first.start()
        while not decoded:
            threading.Event().wait(0.01)
        second = client.post("/api/compare", data={"image": (io.BytesIO(data), "b.png")})
        assert second.status_code == 503 and "busy" in second.json["error"]
        assert len(decoded) == 1  # the refused upload's pixels were never decoded
    first.join()
