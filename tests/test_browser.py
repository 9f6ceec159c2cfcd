"""End to end: the real page in headless Chromium against the real WSGI server on 127.0.0.1."""

import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import running
from leanvgg.compare import Settings
from leanvgg.recipes import RECIPES
from leanvgg.service import ComparisonService
from leanvgg.store import Store
from leanvgg.variants import default_names
from leanvgg.web import make_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (.ci/run installs it)")


@pytest.fixture
def server(variant_set, cache_dir):
    service = ComparisonService(settings=Settings(runs=2, warmup=1), variant_set=variant_set,
                                store=Store(cache_dir))
    with running(make_server(service, port=0)) as url:
        yield url


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        yield page
        browser.close()


def test_upload_a_photo_and_see_every_variant(server, page, photo_path):
    requests_elsewhere = []
    local = (server, "blob:" + server)  # the preview is a blob: URL of the page's own origin
    page.on("request", lambda r: None if r.url.startswith(local) else
            requests_elsewhere.append(r.url))
    console_errors = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)

    page.goto(server + "/")
    page.wait_for_selector("#status[data-state=ready]", timeout=30_000)
    assert "meaningless" in page.inner_text("#weights-banner")

    # how many rows the table held each time it changed: rows must arrive one by one
    page.evaluate("""() => {
        window.rowCounts = [];
        new MutationObserver(() => window.rowCounts.push(
            document.querySelectorAll('#table tbody tr').length))
          .observe(document.querySelector('#table tbody'), {childList: true});
    }""")
    started = time.perf_counter()
    page.set_input_files("#file", str(photo_path))
    page.wait_for_selector("#table tbody tr", timeout=120_000)
    first_row = time.perf_counter() - started
    page.wait_for_selector("#busy", state="hidden", timeout=120_000)
    seconds = time.perf_counter() - started
    counts = page.evaluate("window.rowCounts")
    n = len(default_names())
    assert counts[:n] == list(range(1, n + 1)), counts  # the first row came before the last

    rows = page.query_selector_all("#table tbody tr")
    assert [r.get_attribute("data-variant") for r in rows] == default_names()
    for row in rows:
        cells = [c.inner_text() for c in row.query_selector_all("td")]
        assert len(cells) == 13 and cells[12] == "—"  # img/s: only when asked for
        assert len(cells[1].split(" · ")) == 3  # top-3, second column
        # no profile yet: this request's one pass, said as such, with no p90 to show
        median = re.fullmatch(r"(\d+\.\d) \(1 pass\)", cells[2])
        assert median and float(median[1]) > 0 and cells[3] == "—", cells
        assert float(cells[6]) > 0  # size MB
        # both latencies are this request's passes: a speedup of like figures
        assert cells[4].endswith("×") and float(cells[5]) > 0  # speedup, this image's pass
        assert cells[10] == "—"  # no evaluation report in this cache
        compiled = RECIPES[row.get_attribute("data-variant")].compiled
        assert (float(cells[11]) > 0) if compiled else cells[11] == "—"  # one-off seconds
        origin = "article" if RECIPES[row.get_attribute("data-variant")].article else "beyond"
        assert origin in cells[0]
        top3 = row.query_selector("td:nth-child(2)").bounding_box()
        assert top3["x"] + top3["width"] <= 1280  # visible without scrolling sideways
    assert page.get_attribute("#table tbody tr:first-child", "class") == "baseline"
    assert page.query_selector_all("td.best")  # the best of each column is highlighted
    assert page.is_visible("#preview") and page.is_hidden("#busy")
    assert "waiting for other measurements" in page.inner_text("#provenance")

    drawn = page.evaluate("""() => [...document.querySelectorAll('#results canvas')].map(c => {
        const chart = Chart.getChart(c);
        const pixels = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        return [chart ? chart.data.labels.length || chart.data.datasets.length : 0,
                pixels.some(v => v !== 0)];
    })""")
    assert drawn == [[len(default_names()), True]] * 4

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    # on laptop screens down to 1024 px every column shows without scrolling sideways (the
    # headers wrap between words, never inside "top-1"), and the four charts stand two by two
    for width in (1536, 1280, 1024):
        page.set_viewport_size({"width": width, "height": 1000})
        scroll, client, lefts, accuracy = page.evaluate("""() => {
            const wrap = document.querySelector('.table-wrap');
            const top1 = document.querySelector('#table th .nowrap');
            return [wrap.scrollWidth, wrap.clientWidth, [...document.querySelectorAll(
                '#results figure')].map(f => Math.round(f.getBoundingClientRect().left)),
                [top1.textContent, top1.getClientRects().length]]; }""")
        assert scroll <= client, (width, scroll, client)
        assert len(lefts) == 4 and lefts[0] == lefts[2] < lefts[1] == lefts[3], (width, lefts)
        assert accuracy == ["top-1", 1]
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
    # on a phone the figures scroll sideways under the variant names, which stay in view
    wrap_left, name_lefts = page.evaluate("""() => {
        const wrap = document.querySelector('.table-wrap');
        wrap.scrollLeft = wrap.scrollWidth;
        return [wrap.getBoundingClientRect().left, [...document.querySelectorAll(
            '#table tr > :first-child')].map(c => c.getBoundingClientRect().left)]; }""")
    assert len(name_lefts) == len(default_names()) + 1
    assert all(abs(left - wrap_left) <= 2 for left in name_lefts)
    (ARTIFACTS / "dashboard-timing.txt").write_text(
        f"upload to first row: {first_row:.1f} s; to all results: {seconds:.1f} s\n")

    assert requests_elsewhere == [] and console_errors == []


def test_a_bad_file_shows_a_readable_error(server, page, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    page.goto(server + "/")
    page.wait_for_selector("#status[data-state=ready]", timeout=30_000)
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert "Not a supported image" in page.inner_text("#error")
    assert page.is_hidden("#results")


def test_the_throughput_view_adds_images_per_second(server, page, photo_path):
    page.goto(server + "/")
    page.wait_for_selector("#status[data-state=ready]", timeout=30_000)
    page.check("#throughput")
    page.set_input_files("#file", str(photo_path))
    page.wait_for_selector("#table tbody tr", timeout=120_000)
    page.wait_for_selector("#busy", state="hidden", timeout=300_000)
    assert page.is_hidden("#error")
    header = [h.inner_text() for h in page.query_selector_all("#table thead th")]
    column = header.index("img/s @8")
    rows = page.query_selector_all("#table tbody tr")
    assert len(rows) == len(default_names())
    rates = [float(row.query_selector_all("td")[column].inner_text()) for row in rows]
    assert all(rate > 0 for rate in rates)  # every variant's images per second at batch 8
    best = rows[rates.index(max(rates))].query_selector_all("td")[column]
    assert "best" in (best.get_attribute("class") or "")


def test_the_page_shows_the_models_own_labels_as_text(tmp_path, page, photo_path):
    """A user's VGG whose label names hold HTML and script: shown as the very text, never run."""
    import torch

    from leanvgg.labels import Labels
    from leanvgg.models import load_baseline
    from leanvgg.variants import build_variants
    from test_own_model import SMALL_VGG11_BN, decisive, initialised

    torch.save(decisive(initialised(SMALL_VGG11_BN)).state_dict(), tmp_path / "my_vgg.pt")
    hostile = tuple(f'<img src=x onerror="window.pwned={i}">digit {i}' for i in range(9)) + (
        "<script>window.pwned=9</script>",)
    baseline = load_baseline(str(tmp_path / "my_vgg.pt"), labels=Labels(hostile, "given"),
                             input_size=32)
    variant_set = build_variants(baseline, ["baseline", "quantized"], store=Store(tmp_path),
                                 progress=False, threads=1)
    service = ComparisonService(settings=Settings(runs=2, warmup=1), variant_set=variant_set,
                                store=Store(tmp_path))
    with running(make_server(service, port=0)) as url:
        page.goto(url + "/")
        page.wait_for_selector("#status[data-state=ready]", timeout=30_000)
        assert "vgg11_bn (custom widths), 10 classes (labels: given)" in page.inner_text("#model")
        page.set_input_files("#file", str(photo_path))
        page.wait_for_selector("#busy", state="hidden", timeout=120_000)
        rows = page.query_selector_all("#table tbody tr")
        assert [r.get_attribute("data-variant") for r in rows] == ["baseline", "quantized"]
        top3 = rows[0].query_selector_all("td")[1].inner_text()  # name, then top-3
        assert top3.count("<") >= 1 and any(name in top3 for name in hostile), top3
        assert page.query_selector("#table img, #table script") is None
        assert page.evaluate("window.pwned") is None
