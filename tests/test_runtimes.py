"""The runtime as a measured choice: chosen once per machine and kept, measured again when the
CPU or a library changes, each runtime agreeing with Inductor on real photos, and Inductor
alone (with one log line) where the other runtimes are not installed."""

import json
import logging
import shutil
import sys

import pytest
import torch

from leanvgg import cache, capabilities, cli, machine, runtimes
from leanvgg import context as context_module
from leanvgg.builder import Builder, Variant
from leanvgg.context import RunContext
from leanvgg.facts import ArtifactFacts, Placement
from leanvgg.recipes import RECIPES
from leanvgg.measure import Latency
from leanvgg.packages import Packages
from leanvgg.images import decode, read_file
from leanvgg.documents import RUNTIME_CHOICES
from leanvgg.store import Store
from leanvgg.variants import build_variants
from test_export import PHOTOS, decisive_baseline

NAMES = ["baseline", "int8_static"]
# How far each runtime's INT8 (Inductor's own, as QDQ) may be from Inductor's logits, over the
# largest |logit|, and from the FP32 logits in multiples of Inductor's INT8 distance: the
# same bounds as the exports these runtimes run (tests/test_export.py, README).
SAME_INT8, FROM_FP32 = 0.03, 1.5


def _build(home, runtime="auto", threads=None):
    return build_variants(decisive_baseline(), NAMES, store=Store(home), progress=False,
                          runtime=runtime, threads=threads).variants


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A cache holding NAMES built once for the module, int8_static packaged for Inductor and
    converted for ONNX Runtime and OpenVINO, with no runtime chosen yet (each build pinned one):
    the state a first ``auto`` start finds once its variants are built. Module-scoped, so it is
    made before any test's monkeypatching."""
    home = tmp_path_factory.mktemp("converted")
    for runtime in ("inductor", "onnxruntime", "openvino"):
        _build(home, runtime)
    return home


@pytest.fixture
def home(converted, tmp_path):
    """This test's own copy of ``converted``: for tests of choosing, loading and measuring
    again, which built the same four entries from an empty folder each (building into one is
    what tests/test_fast.py, test_context.py, test_export.py and ``converted`` itself do)."""
    return shutil.copytree(converted, tmp_path / "home")


def _logits(variant) -> torch.Tensor:
    size = variant.input_size
    batch = torch.cat([decode(read_file(p)).batches({size}).tensors[size] for p in PHOTOS])
    with torch.inference_mode():
        return torch.cat([variant.model(row[None]) for row in batch])


@pytest.fixture
def timings(monkeypatch):
    """Every round-robin the runtime choice runs (the runtimes it timed, at which batch size)."""
    calls = []
    real = runtimes.time_models

    def counted(jobs, **kwargs):
        calls.append((sorted(jobs), {batch.shape[0] for _, batch in jobs.values()}))
        return real(jobs, **kwargs)

    monkeypatch.setattr(runtimes, "time_models", counted)
    return calls


# Known costs (median ms) the fake timer gives each runtime: ONNX Runtime is fastest for one
# image; for batches Inductor is, and ONNX Runtime is more than 2 % slower there.
COSTS = {1: {"inductor": 30.0, "onnxruntime": 20.0, "openvino": 25.0},
         runtimes.BATCH: {"inductor": 100.0, "onnxruntime": 150.0, "openvino": 101.0}}


@pytest.fixture
def known_costs(monkeypatch):
    """The runtime choice's round-robins time every runner at its known cost, on a CPU without
    native bf16 (so the candidates are the same on every machine); returns the (runtimes, batch
    sizes) of each round-robin."""
    monkeypatch.setattr(capabilities, "native_bf16", lambda: False)
    calls = []

    def timed(jobs, **kwargs):
        batch = {b.shape[0] for _, b in jobs.values()}
        calls.append((sorted(jobs), batch))
        size, = batch
        return {r: (Latency.from_seconds([COSTS[size][r] / 1e3] * 3), None) for r in jobs}

    monkeypatch.setattr(runtimes, "time_models", timed)
    return calls


@pytest.mark.slow
def test_auto_measures_once_per_machine_and_keeps_the_choice(home, known_costs):
    first = _build(home)["int8_static"]
    every = ["inductor", "onnxruntime", "openvino"]
    assert known_costs == [(every, {1}), (every, {runtimes.BATCH})]  # images, then batches
    facts = first.summary()
    assert (facts.runtime, facts.batch_runtime) == ("onnxruntime", "inductor")
    assert facts.placement["how"] == "measured" and facts.placement["medians_ms"] == COSTS[1]
    assert facts.placement["batch_medians_ms"] == COSTS[runtimes.BATCH]
    assert isinstance(first.model, runtimes.ByBatch)
    assert _build(home)["baseline"].summary().runtime == "pytorch"  # eager: no choice
    second = _build(home)["int8_static"]  # a later start: nothing measured again
    assert len(known_costs) == 2 and second.summary().placement["how"] == "stored"
    assert (second.summary().runtime, second.summary().batch_runtime) == \
        ("onnxruntime", "inductor")
    stored = Store(home).documents.load(RUNTIME_CHOICES)
    assert len(stored) == 1 and next(iter(stored.values()))["runtime"] == "onnxruntime"


@pytest.mark.slow
def test_single_images_and_batches_each_run_on_their_chosen_runtime(home, timings):
    _build(home)
    # a machine where ONNX Runtime was measured fastest for one image, OpenVINO for batches
    store = Store(home)
    (key, record), = store.documents.load(RUNTIME_CHOICES).items()
    store.documents.save(RUNTIME_CHOICES, {key: {**record, "runtime": "onnxruntime",
                                            "batch_runtime": "openvino"}})
    variant = _build(home)["int8_static"]
    assert len(timings) == 2  # the stored choice was used as it is
    facts = variant.summary()
    assert (facts.runtime, facts.batch_runtime) == ("onnxruntime", "openvino")
    model = variant.model
    assert isinstance(model, runtimes.ByBatch) and model.single.runtime == "onnxruntime"
    one = _logits(variant)  # photo by photo: ONNX Runtime alone; OpenVINO not even loaded
    assert model.made == []
    size = variant.input_size
    photos = torch.cat([decode(read_file(p)).batches({size}).tensors[size] for p in PHOTOS])
    with torch.inference_mode():
        batched = model(photos)
    assert [m.runtime for m in model.made] == ["openvino"]
    pinned = _build(home, "openvino")["int8_static"]
    torch.testing.assert_close(batched, _logits(pinned), rtol=1e-4, atol=1e-5)
    assert batched.argmax(1).tolist() == one.argmax(1).tolist()


def test_batches_stay_on_the_single_image_runtime_unless_another_is_clearly_faster():
    assert runtimes.batch_runtime({"inductor": 710.0, "openvino": 710.8}, "openvino") == \
        "openvino"  # 0.1 %: noise, and one model in memory instead of two
    assert runtimes.batch_runtime({"inductor": 353.0, "openvino": 385.0}, "openvino") == \
        "inductor"  # 9 %: worth a second model
    assert runtimes.batch_runtime({"inductor": 320.0, "openvino": 330.0}, "inductor") == \
        "inductor"


@pytest.mark.slow
@pytest.mark.parametrize("change", ["cpu flags", "library version", "threads"])
def test_a_new_cpu_library_version_or_thread_count_measures_again(home, known_costs,
                                                                 monkeypatch, change):
    _build(home)
    threads = None
    if change == "cpu flags":
        monkeypatch.setattr(context_module, "flags_hash", lambda: "another")
    elif change == "library version":
        versions = context_module.library_versions()
        monkeypatch.setattr(context_module, "library_versions",
                            lambda: {**versions, "onnxruntime": "99.0"})
    else:
        threads = 1 if torch.get_num_threads() != 1 else 2
    _build(home, threads=threads)
    assert len(known_costs) == 4  # batch 1 and batch 8, twice
    assert len(Store(home).documents.load(RUNTIME_CHOICES)) == 2  # the old choice is kept


def assert_same_int8(theirs: torch.Tensor, ours: torch.Tensor, fp32: torch.Tensor) -> None:
    """Another runtime's logits ``theirs`` run Inductor's INT8 model (``ours``): the same
    top-1 on every photo, within ``SAME_INT8``, and no further from FP32 than ``FROM_FP32``."""
    assert torch.equal(theirs.argmax(1), ours.argmax(1))  # the same top-1 on every photo
    assert len(set(ours.argmax(1).tolist())) > 1
    assert float((theirs - ours).abs().max()) <= SAME_INT8 * float(ours.abs().max())
    theirs_error = float((theirs - fp32).abs().max())
    ours_error = float((ours - fp32).abs().max())
    assert theirs_error <= FROM_FP32 * ours_error, (theirs_error, ours_error)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_each_runtime_agrees_with_inductor_on_real_photos(home, runtime):
    pinned = _build(home, runtime)
    inductor = _build(home, "inductor")
    assert pinned["int8_static"].summary().runtime == runtime
    assert inductor["int8_static"].summary().runtime == "inductor"
    assert_same_int8(_logits(pinned["int8_static"]), _logits(inductor["int8_static"]),
                     _logits(inductor["baseline"]))
    # size and accuracy facts are the variant's, whatever runs it
    assert pinned["int8_static"].facts.size_bytes == \
        inductor["int8_static"].facts.size_bytes


@pytest.mark.slow
def test_without_the_runtimes_everything_runs_on_inductor_with_one_log_line(
        home, converted, tmp_path, monkeypatch, caplog, timings):
    for module in ("onnxruntime", "openvino", "onnx", "onnxscript"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with caplog.at_level(logging.WARNING):
        variant = _build(home)["int8_static"]
    assert variant.summary().runtime == "inductor" and timings == []
    lines = [r.getMessage() for r in caplog.records
             if r.levelno >= logging.WARNING and r.name.startswith("leanvgg")]
    assert len(lines) == 1 and "pip install 'leanvgg[export]'" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pinned = _build(shutil.copytree(converted, tmp_path / "pinned"), "openvino")["int8_static"]
    assert pinned.summary().runtime == "inductor"
    assert pinned.summary().placement["asked"] == "openvino"
    assert pinned.summary().placement["how"] == "fallback"
    assert [r.getMessage() for r in caplog.records if r.name.startswith("leanvgg")] == [
        "int8_static runs on inductor: openvino is not installed "
        "(pip install 'leanvgg[export]')"]


def test_a_variant_on_another_runtime_alone_never_loads_its_eager_model(home,
                                                                        monkeypatch):
    first = _build(home, "openvino")["int8_static"]
    assert first.summary().runtime == first.summary().batch_runtime == "openvino"
    from leanvgg.builder import Builder

    def refused(self, recipe, n_steps):  # what loading (or building) any model goes through
        raise AssertionError(f"loaded {recipe.name}'s eager model after {n_steps} steps")

    monkeypatch.setattr(Builder, "artifact", refused)
    again = build_variants(decisive_baseline(), ["int8_static"], store=Store(home),
                           progress=False, runtime="openvino").variants["int8_static"]
    assert again.facts == first.facts and again.artifact == first.artifact
    assert again.model.runtime == "openvino"
    torch.testing.assert_close(_logits(again), _logits(first), rtol=0, atol=0)


def test_openvino_at_its_default_precision_is_a_candidate_only_where_bf16_is_native(
        monkeypatch):
    recipe = RECIPES["int8_static"]
    monkeypatch.setattr(capabilities, "native_bf16", lambda: False)
    assert "only emulates" in capabilities.runtime_refusal(recipe, "openvino_bf16")
    assert "openvino_bf16" not in runtimes.candidates(recipe)
    monkeypatch.setattr(capabilities, "native_bf16", lambda: True)
    assert capabilities.runtime_refusal(recipe, "openvino_bf16") is None
    if runtimes.installed("openvino"):
        assert runtimes.candidates(recipe)[-2:] == ["openvino", "openvino_bf16"]
    assert "cannot be run on openvino_bf16" in capabilities.runtime_refusal(
        RECIPES["bf16"], "openvino_bf16")  # a bf16 model goes to neither OpenVINO
    assert capabilities.FORMAT_OF["openvino_bf16"] == "openvino"
    assert capabilities.RUNTIME_OF["openvino"] == "openvino"


class _Logits(torch.nn.Module):
    """Logits from the image itself (its mean per colour channel), top-1 flipped on the images
    whose indices are in ``flipped``: a runtime that changes some predictions."""

    def __init__(self, flipped=()):
        super().__init__()
        self.flipped, self.seen = set(flipped), 0

    def forward(self, x):
        logits = torch.stack([x.mean((2, 3))[:, c] * (c + 1) for c in range(3)], 1)
        if self.seen in self.flipped:
            logits = -logits
        self.seen += 1
        return logits


@pytest.mark.parametrize("flipped, kept", [((), True), ((5,), False)])
def test_openvino_bf16_is_measured_only_where_its_top1_agrees_with_openvino_f32(flipped, kept):
    context = RunContext.here(2)
    variant = Variant(RECIPES["int8_static"], torch.nn.Identity(),
                      ArtifactFacts(size_bytes=0, params=0, params_total=0, macs=0), "weights",
                      context, Placement("inductor", "inductor", 2, "pinned"))
    runners = {"inductor": _Logits(), "openvino": _Logits(), "openvino_bf16": _Logits(flipped)}
    excluded = runtimes._unfaithful(runners, variant)
    if kept:  # 24 of 24 crops agree
        assert excluded == {}
    else:  # 23 of 24: 95.8 %
        assert excluded == {"openvino_bf16": "top-1 agrees with openvino (f32) on 95.8 % of 24 "
                                             "calibration crops, below 99 %"}
    assert runners["openvino_bf16"].seen == runners["openvino"].seen == 24
    assert runners["inductor"].seen == 0  # only the two precisions of one IR are compared


@pytest.mark.slow
def test_openvino_bf16_runs_the_same_ir_with_openvinos_default_precision(home, monkeypatch,
                                                                        known_costs):
    if not runtimes.installed("openvino"):
        pytest.skip("openvino is not installed (leanvgg[export])")
    assert _build(home)["int8_static"].runtime == "onnxruntime"  # chosen among three
    monkeypatch.setattr(capabilities, "native_bf16", lambda: True)
    costs = {1: {**COSTS[1], "openvino_bf16": 10.0},
             runtimes.BATCH: {**COSTS[runtimes.BATCH], "openvino_bf16": 99.0}}
    monkeypatch.setattr(sys.modules[__name__], "COSTS", costs)
    variant = _build(home)["int8_static"]  # a new candidate: that choice no longer holds
    three, every = ["inductor", "onnxruntime", "openvino"], [
        "inductor", "onnxruntime", "openvino", "openvino_bf16"]
    assert [names for names, _ in known_costs] == [three, three, every, every]
    facts = variant.summary()
    assert (facts.runtime, facts.batch_runtime) == ("openvino_bf16", "openvino_bf16")
    assert facts.placement["medians_ms"] == costs[1] and facts.placement["excluded"] is None
    settings = variant.model.settings
    assert "INFERENCE_PRECISION_HINT" in settings  # as OpenVINO reports it back
    bf16 = settings["INFERENCE_PRECISION_HINT"]
    assert bf16 == ("bf16" if machine.native_bf16() else "f32")  # its default on this CPU
    conversions = [e for e in cache.entries(Store(home)) if e.kind == "converted"]
    assert sorted(e.recipe for e in conversions) == ["int8_static", "int8_static"]  # onnx, one IR
    again = _build(home)["int8_static"]  # the stored choice, on the same IR
    assert again.summary().placement["how"] == "stored" and again.runtime == "openvino_bf16"
    pinned = _build(home, "openvino")["int8_static"]
    assert pinned.model.settings["INFERENCE_PRECISION_HINT"] == "f32"
    assert _logits(again).argmax(1).tolist() == _logits(pinned).argmax(1).tolist()
    # leanvgg export describes the IR with the precision the stored choice runs it in (it
    # used to say the f32 hint, whatever the choice: the settings of a model leanvgg did not run)
    monkeypatch.setenv("LEANVGG_HOME", str(home))
    monkeypatch.setattr(cli, "load_baseline", lambda weights, **_: decisive_baseline())
    assert cli.main(["export", "int8_static", "--format", "openvino", "--format", "onnx",
                     "--threads", str(torch.get_num_threads()), "--out", str(home / "out")]) == 0
    formats = json.loads((home / "out" / "int8_static.model.json").read_text())["formats"]
    assert formats["openvino"]["runtime"] == "openvino_bf16"
    assert "INFERENCE_PRECISION_HINT" not in formats["openvino"]["settings"]
    assert formats["onnx"]["runtime"] == "onnxruntime"


@pytest.mark.slow
def test_a_helper_makes_ready_on_onnx_runtime_then_makes_ahead_what_the_choice_times(
        tmp_path, monkeypatch):
    """A builder makes a static INT8 variant ready on ONNX Runtime first (its export, not
    Inductor's compile), and bf16 (Inductor its only candidate) uncompiled; once every
    variant is claimed, a helper compiles the packages and makes the conversions ``auto``
    will time, and chooses nothing. A server meanwhile serves them from that ONNX export and
    eagerly, pending; the builder's choice, timed after the helper, finds everything made."""
    from leanvgg.variants import VariantBuilder, build_in_stages

    baseline, home = decisive_baseline(), tmp_path / "h"
    heard = []

    def stages(**kwargs):
        heard.clear()
        build_in_stages(baseline, [*NAMES, "bf16"], store=Store(home), calibration=None,
                        runtime="auto", threads=1,
                        emit=lambda *a, **k: heard.append((*a[:2], k.get("runtime"))),
                        **kwargs)

    loads, load = [], Builder._load

    def loading(self, recipe, n_steps, key):  # what is loaded from the store
        found = load(self, recipe, n_steps, key)
        if found is not None:
            loads.append((recipe.name, n_steps))
        return found

    monkeypatch.setattr(Builder, "_load", loading)
    stages(helper=True)
    monkeypatch.undo()
    # its package compiled from the PT2E model it exported, held in memory, not reloaded
    assert ("int8_static", len(RECIPES["int8_static"].steps)) not in loads, loads
    assert ("bf16", len(RECIPES["bf16"].steps)) in loads  # (a cheap reload: not held)
    built = [event for event in heard if event[1] == "built"]
    assert sorted(built) == [("baseline", "built", "pytorch"), ("bf16", "built", "pytorch"),
                             ("int8_static", "built", "onnxruntime")]
    # each compiled after every variant was ready, ahead of the choice
    compiled = [heard.index((name, "compiling", None)) for name in ("int8_static", "bf16")]
    assert min(compiled) > max(heard.index(event) for event in built)
    assert not [event for event in heard if event[1] == "placed"]
    assert not Store(home).documents.load(RUNTIME_CHOICES)
    made = VariantBuilder(baseline, Store(home), threads=1)
    recipe, builder = made.registry["int8_static"], made.builder
    for runtime in ("onnxruntime", "openvino"):
        key = runtimes._conversion_key(builder.key(recipe), recipe.input_size, runtime, builder)
        assert Store(home).manifest(key, runtimes._SUFFIXES[capabilities.FORMAT_OF[runtime]])
    assert builder.packages.facts(builder.key(recipe), recipe.input_size) is not None

    serving = VariantBuilder(baseline, Store(home), runtime="auto", threads=1, load_only=True)
    pending = serving.prepare("int8_static")
    assert (pending.runtime, pending.where.how) == ("onnxruntime", "pending choice")
    assert pending.where.reason.startswith("on onnxruntime until the runtime choice")
    monkeypatch.setattr(Packages, "facts", lambda *a, **k: None)  # its package not made yet
    eager = serving.prepare("bf16")
    monkeypatch.undo()
    assert (eager.runtime, eager.where.how) == ("pytorch", "pending choice")
    assert eager.where.reason == ("on pytorch until its Inductor package (compiled by the "
                                  "builder process) is stored")
    bf16 = VariantBuilder(baseline, Store(home), threads=1).prepare("bf16")
    assert bf16.runtime == "inductor"
    same = _logits(eager).float(), _logits(bf16).float()
    assert torch.equal(same[0].argmax(1), same[1].argmax(1))
    on_inductor = VariantBuilder(baseline, Store(home), threads=1).prepare("int8_static")
    fp32 = _build(home, "inductor")["baseline"]
    assert_same_int8(_logits(pending), _logits(on_inductor), _logits(fp32))

    def again(*args, **kwargs):
        raise AssertionError("the runtime choice made again what the helper made")

    monkeypatch.setattr(runtimes, "write_onnx", again)
    monkeypatch.setattr(runtimes, "openvino_from_onnx", again)
    monkeypatch.setattr("leanvgg.packages.package", again)
    stages()
    placed = [event for event in heard if event[1] == "placed"]
    assert placed == [("int8_static", "placed", placed[0][2]), ("bf16", "placed", "inductor")]
    assert placed[0][2] in runtimes.candidates(recipe)
    assert runtimes.ahead_of_choice(recipe, builder) == []  # chosen: nothing to make ahead
