"""The service behind the dashboard: per-variant readiness, latency profiles measured apart from
requests, rows streamed as they come, abandoned and over-long requests never measured."""

import http.client
import io
import json
import socket
import threading
import time

import pytest
from torch import nn

from conftest import encode, multipart, running
from leanvgg import packages as packages_module
from leanvgg import service as service_module
from leanvgg.service import pool as pool_module
from leanvgg import variants as variants_module
from leanvgg.compare import Settings
from leanvgg.service import ComparisonService
from leanvgg.context import OPENVINO
from leanvgg.documents import PROFILES
from leanvgg.facts import MEASURED, Placement
from leanvgg.service.profiles import ProfileKeeper
from leanvgg.service.queue import MeasurementQueue
from leanvgg.store import Store
from leanvgg.variants import VariantSet, build_variants
from leanvgg.web import create_app, make_server
from tiny import tiny_baseline

PROFILE = Settings(runs=5, warmup=1, threads=1)


class Recorded(nn.Module):
    """Wraps a model: records (thread name, start, end) of every call; optionally slow."""

    def __init__(self, model: nn.Module, calls: list, delay_s: float = 0.0) -> None:
        super().__init__()
        self.model, self.calls, self.delay_s = model, calls, delay_s

    def forward(self, x):
        start = time.perf_counter()
        time.sleep(self.delay_s)
        out = self.model(x)
        self.calls.append((threading.current_thread().name, start, time.perf_counter()))
        return out


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("service-cache"))
    return build_variants(tiny_baseline(), ["baseline", "res160"], store=store, progress=False)


def _recorded(tiny_set, calls, delays=None):
    import dataclasses

    return VariantSet(tiny_set.baseline, {
        name: dataclasses.replace(v, model=Recorded(v.model, calls, (delays or {}).get(name, 0)))
        for name, v in tiny_set.variants.items()})


def test_one_failing_variant_leaves_the_others_serving(tmp_path, monkeypatch, photo):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found (g++)")

    monkeypatch.setattr(pool_module, "load_baseline", lambda weights, **_: tiny_baseline())
    monkeypatch.setattr(packages_module, "package", no_compiler)
    service = ComparisonService(names=["baseline", "res160", "int8_static"], settings=PROFILE,
                                store=Store(tmp_path))
    service.start(background=False)
    status = service.status()
    assert status["status"] == "degraded" and status["serving"] is True
    assert status["variants"] == {"baseline": "ready", "res160": "ready",
                                  "int8_static": "failed"}
    client = create_app(service, {"TESTING": True}).test_client()
    assert client.get("/healthz").status_code == 200
    failed = [v for v in client.get("/api/variants").json["variants"] if v["state"] == "failed"]
    assert failed[0]["name"] == "int8_static" and "no C++ compiler" in failed[0]["reason"]
    body = client.post("/api/compare", data={"image": (io.BytesIO(encode(photo, "PNG")),
                                                       "a.png")}).json
    assert [v["name"] for v in body["results"]] == ["baseline", "res160"]
    assert body["not_ready"] == {"int8_static": "failed: RuntimeError: no C++ compiler found "
                                                "(g++)"}


def test_variants_become_usable_one_by_one(tmp_path, monkeypatch, photo):
    """While a later variant builds, the earlier ones already serve comparisons."""
    release = threading.Event()
    real_prepare = variants_module.VariantBuilder.prepare

    def slow_prepare(self, name, on_state=lambda s: None):
        if name == "res160":
            on_state("building")
            release.wait(30)
        return real_prepare(self, name, on_state)

    monkeypatch.setattr(pool_module, "load_baseline", lambda weights, **_: tiny_baseline())
    monkeypatch.setattr(variants_module.VariantBuilder, "prepare", slow_prepare)
    service = ComparisonService(names=["baseline", "res160"], settings=PROFILE,
                                store=Store(tmp_path))
    service.start(profile=False)
    deadline = time.monotonic() + 30
    while service.status()["variants"].get("res160") != "building":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert service.status()["serving"] and service.status()["status"] == "warming up"
    result = service.compare(encode(photo, "PNG")).result
    assert [v.name for v in result.variants] == ["baseline"]
    assert result.not_ready == {"res160": "building"}
    release.set()
    while service.warming_up():
        time.sleep(0.01)
    assert service.status()["status"] == "ready"


def test_profiles_are_measured_apart_and_never_during_a_comparison(tiny_set, tmp_path, photo):
    calls = []
    store = Store(tmp_path)
    service = ComparisonService(settings=Settings(runs=40, warmup=1, threads=1), store=store,
                                variant_set=_recorded(tiny_set, calls, {"res160": 0.01}))
    service.start()  # profiles in the background
    data = encode(photo, "PNG")
    compared = 0
    while len(service.profiles()) < 2:  # uploads now and then while the profiles are measured
        service.compare(data)
        compared += 1
        time.sleep(0.1)
    service.stop()
    profiled = [(s, e) for name, s, e in calls if name == "leanvgg-warm-up"]
    requested = [(s, e) for name, s, e in calls if name != "leanvgg-warm-up"]
    assert len(profiled) == 2 * (40 + 1) and len(requested) == 2 * compared >= 2
    for start, end in profiled:  # no profile pass overlaps a request's pass
        assert all(end <= r_start or start >= r_end for r_start, r_end in requested)
    profiles = service.profiles()
    assert profiles["res160"].latency.count == 40 and profiles["res160"].latency.median >= 10
    stored = store.documents.load(PROFILES)
    assert len(stored) == 2 and all(p["count"] == 40 for p in stored.values())
    # an upload now runs each variant once and reports the profile beside its own pass
    before = len(calls)
    result = service.compare(data).result
    assert len(calls) - before == 2
    res160 = result.variants[1]
    assert res160.latency_source == "profile" and res160.latency_ms.count == 40
    assert res160.speedup == pytest.approx(profiles["baseline"].latency.median
                                           / profiles["res160"].latency.median)
    # a second service on the same store and machine reuses the stored profiles
    again = ComparisonService(settings=Settings(runs=40, warmup=1, threads=1), store=store,
                              variant_set=_recorded(tiny_set, calls := []))
    again.start()
    deadline = time.monotonic() + 10
    while len(again.profiles()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    again.stop()
    assert calls == []  # nothing measured again


def _stream(service, photo) -> tuple[http.client.HTTPResponse, list[tuple[float, dict]]]:
    """Post the photo to the real server's stream; its response and each event as it came."""
    server = make_server(service, port=0)
    with running(server):
        body, content_type = multipart(encode(photo, "PNG"))
        connection = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=30)
        connection.request("POST", "/api/compare/stream", body, {"Content-Type": content_type})
        response = connection.getresponse()
        events = []
        while line := response.readline():
            events.append((time.perf_counter(), json.loads(line)))
        connection.close()
    return response, events


def test_the_stream_delivers_each_row_as_soon_as_it_is_computed(tiny_set, photo):
    service = ComparisonService(settings=PROFILE,
                                variant_set=_recorded(tiny_set, [], {"res160": 1.0}))
    response, events = _stream(service, photo)
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/x-ndjson"
    kinds = [event["event"] for _, event in events]
    assert kinds == ["start", "row", "row", "done"]
    assert [event["row"]["name"] for _, event in events if event["event"] == "row"] == \
        ["baseline", "res160"]
    # the baseline's row reached the client before the slow variant had even run
    assert events[2][0] - events[1][0] > 0.8
    assert len(events[3][1]["result"]["results"]) == 2


def test_a_disconnected_clients_request_is_never_measured(tiny_set, photo):
    calls = []
    service = ComparisonService(settings=PROFILE, variant_set=_recorded(tiny_set, calls))
    server = make_server(service, port=0)
    body, content_type = multipart(encode(photo, "PNG"))
    with running(server):
        with service.queue.slot:  # another comparison is being measured
            sock = socket.create_connection(("127.0.0.1", server.effective_port))
            sock.sendall(f"POST /api/compare HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
                         .encode() + body)
            deadline = time.monotonic() + 10
            while service.queue.admitted == 0:  # admitted and decoded, waiting for the slot
                assert time.monotonic() < deadline
                time.sleep(0.01)
            sock.close()  # the user closed the tab
            time.sleep(0.5)  # waitress notices the closed connection
        deadline = time.monotonic() + 10
        while service.queue.admitted:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert calls == []


def test_a_request_waits_at_most_the_queue_timeout(tiny_set, photo):
    service = ComparisonService(settings=PROFILE, variant_set=tiny_set, queue_timeout_s=0.3)
    client = create_app(service, {"TESTING": True}).test_client()
    with service.queue.slot:
        started = time.monotonic()
        response = client.post("/api/compare", data={"image": (io.BytesIO(encode(photo, "PNG")),
                                                                "a.png")})
    assert response.status_code == 503 and "Waited 0.3 s" in response.json["error"]
    assert int(response.headers["Retry-After"]) >= 1
    assert time.monotonic() - started < 5
    assert service.queue.admitted == 0


def test_a_stream_closed_before_it_started_gives_its_place_back(tiny_set, photo):
    calls = []
    service = ComparisonService(settings=PROFILE, variant_set=_recorded(tiny_set, calls),
                                max_queue=1)
    client = create_app(service, {"TESTING": True}).test_client()
    response = client.post("/api/compare/stream", buffered=False,
                           data={"image": (io.BytesIO(encode(photo, "PNG")), "a.png")})
    assert response.status_code == 200 and service.queue.admitted == 1
    response.close()  # the client went away before reading anything
    assert service.queue.admitted == 0 and calls == []
    assert service.compare(encode(photo, "PNG")).result.variants  # the queue is free again


def test_an_error_after_the_stream_started_ends_it_with_an_error_event(tiny_set, photo,
                                                                      monkeypatch):
    """The 200 is sent with the first line: a failure later used to cut the stream short."""
    service = ComparisonService(settings=PROFILE, variant_set=tiny_set)
    real_rows = service_module.Comparison.rows

    def failing(self, **kwargs):
        for row in real_rows(self, **kwargs):
            yield row
            raise RuntimeError("a variant failed mid-comparison")

    monkeypatch.setattr(service_module.Comparison, "rows", failing)
    response, timed = _stream(service, photo)
    events = [event for _, event in timed]
    assert response.status == 200
    assert [e["event"] for e in events] == ["start", "row", "error"]
    assert events[-1]["status"] == 500 and "server log" in events[-1]["error"]
    assert not service.queue.slot.locked() and service.queue.admitted == 0


def test_the_slot_is_given_back_when_the_measurement_block_ends(tiny_set, photo):
    """It used to be held by a generator until that generator was collected."""
    service = ComparisonService(settings=PROFILE, variant_set=tiny_set)
    ticket = service.admit(encode(photo, "PNG"))
    with service.measurement(ticket) as events:
        event, _ = next(events)  # one row read, then the reader stops
        assert event == "row" and service.queue.slot.locked()
    assert not service.queue.slot.locked() and service.queue.admitted == 0
    assert events.gi_frame is None  # closed at once (its thread setting undone), not collected


def test_a_profile_holds_only_for_the_runtime_it_was_measured_on(tiny_set, tmp_path):
    """A variant that moves to another runtime (Inductor first, then the one measured fastest)
    was shown with the profile of the model it no longer ran: profiles were kept by name."""
    import dataclasses

    keeper = ProfileKeeper(Settings(runs=3, warmup=1, threads=1), MeasurementQueue(1, 1.0),
                           threading.Event(), None, Store(tmp_path))
    variants = dict(tiny_set.variants)
    keeper.measure(variants)
    assert set(keeper.profiles(variants)) == {"baseline", "res160"}
    moved = dataclasses.replace(variants["res160"], placement=Placement(
        OPENVINO, OPENVINO, 1, MEASURED))
    assert keeper.profiles({"res160": moved}) == {}
    assert keeper.stale(moved) and not keeper.stale(variants["res160"])
    keeper.measure({"res160": moved})
    assert keeper.profiles({"res160": moved})["res160"].latency.count == 3
    # both are stored, each under its own runtime: a restart finds the one that holds
    again = ProfileKeeper(Settings(runs=3, warmup=1, threads=1), MeasurementQueue(1, 1.0),
                          threading.Event(), None)
    again.load(Store(tmp_path))
    assert not again.stale(moved) and not again.stale(variants["res160"])
    assert len(Store(tmp_path).documents.load(PROFILES)) == 3


def test_profiles_time_no_variant_always_right_after_the_same_one(tiny_set):
    """A variant timed right after an eager one runs slower (measured): the profiles' rounds
    go in seeded orders (the last in table order), like every other measurement."""
    import dataclasses

    from torch import nn

    calls = []

    class Recorded(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    variants = {name: dataclasses.replace(tiny_set.variants["baseline"], model=Recorded(name))
                for name in "abc"}
    keeper = ProfileKeeper(Settings(runs=12, warmup=1, threads=1), MeasurementQueue(1, 1.0),
                           threading.Event(), None)
    keeper.measure(variants)
    timed = calls[3:]
    rounds = [timed[i:i + 3] for i in range(0, 36, 3)]
    assert all(sorted(r) == list("abc") for r in rounds) and rounds[-1] == list("abc")
    assert {pair for pair in zip(timed, timed[1:])} >= {
        (x, y) for x in "abc" for y in "abc" if x != y}


def test_profiles_from_several_writers_are_all_kept(tmp_path):
    """Profiles and evaluations were read, changed and written without a lock: two servers on
    one cache lost each other's."""
    store = Store(tmp_path)

    def write(i):
        for j in range(10):
            store.documents.update(PROFILES, lambda doc, k=f"{i}-{j}": {**doc, k: j})

    workers = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(store.documents.load(PROFILES)) == 60
