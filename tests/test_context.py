"""Every figure is of the model that ran: one run context keys every cache entry and record,
``--threads`` reaches every runtime, speedups divide like figures only, and our stdout is ours."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from leanvgg import cache, cli, interop, machine, runtimes
from leanvgg.builder import Builder, Variant, profile_key
from leanvgg.compare import Settings, compare
from leanvgg.context import RunContext
from leanvgg.facts import Placement
from leanvgg.images import decode, read_file
from leanvgg.measure import Latency, Profile, time_models
from leanvgg.recipes import RECIPES
from leanvgg.store import Store
from leanvgg.variants import build_variants
from leanvgg.facts import ArtifactFacts
from test_export import PHOTOS, decisive_baseline

NO_FACTS = ArtifactFacts(size_bytes=0, params=0, params_total=0, macs=0)

HERE = Path(__file__).parent
VERSIONS = (("nncf", "3.4.0"), ("onnx", "1.2"), ("onnxruntime", "1.32.0"),
            ("openvino", "2026.4.1"), ("torch", "2.14.1"), ("torchao", "0.18.0"))


def _context(**fields) -> RunContext:
    return RunContext(**{"threads": 2, "capability": "AVX512", "cpu_flags": "abc",
                         "versions": VERSIONS, **fields})


def test_a_key_names_its_parts_in_one_order_with_the_runtimes_own_versions():
    context = _context(runtime="openvino")
    # OpenVINO runs the ONNX export of torchao's INT8 model: their versions are in its key
    assert context.key("versions", "runtime") == \
        "runtime=openvino|onnx=1.2,openvino=2026.4.1,torch=2.14.1,torchao=0.18.0"
    assert context.key("cpu", "threads", "batch") == "threads=2|batch=1|cpu=AVX512-abc"
    assert _context(runtime="inductor").key("versions") == "torch=2.14.1,torchao=0.18.0"
    assert context.record()["versions"] == {"torch": "2.14.1", "torchao": "0.18.0",
                                            "onnx": "1.2", "onnxscript": None,
                                            "openvino": "2026.4.1"}
    with pytest.raises(ValueError, match="Invalid key parts"):
        context.key("colour")
    with pytest.raises(ValueError, match="threads and batch are at least 1"):
        _context(threads=0)
    with pytest.raises(ValueError, match="Invalid runtime"):
        _context(runtime="tensorrt")


def _variant(runtime: str, context: RunContext) -> Variant:
    placement = Placement(runtime, runtime, context.threads, "pinned")
    return Variant(RECIPES["int8_static"], torch.nn.Identity(), NO_FACTS, "weights", context,
                   placement)


@pytest.mark.parametrize("flags, kind", [
    ("avx avx2 fma avx512f avx512_vnni avx_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile", "amx"),
    ("avx avx2 fma avx512f avx512_vnni avx_vnni avx512_bf16 avx512_vp2intersect",
     "avx512-avxvnni"),
    ("avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16", "avx512"),
    ("avx avx2 fma", "avx2"),
    ("sse4_2", "baseline"),
])
def test_each_cpu_kind_names_its_own_result_files(monkeypatch, flags, kind):
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset(flags.split()))
    assert machine.cpu_kind() == kind


def test_a_profile_holds_for_its_runtime_threads_and_that_runtimes_versions():
    """An OpenVINO upgrade used to re-measure the choice but serve the old profile: the
    profile key lacked OpenVINO's (and NNCF's, ONNX Runtime's) version."""
    upgraded = _context(versions=tuple((k, "2027.0" if k == "openvino" else v)
                                       for k, v in VERSIONS))
    assert profile_key(_variant("openvino", _context())) != \
        profile_key(_variant("openvino", upgraded))
    # a runtime that does not use OpenVINO keeps its profile across the upgrade
    assert profile_key(_variant("inductor", _context())) == \
        profile_key(_variant("inductor", upgraded))
    assert profile_key(_variant("inductor", _context())) != \
        profile_key(_variant("inductor", _context(threads=1)))


@pytest.mark.slow
def test_packages_are_made_and_keyed_for_their_thread_count(tmp_path):
    """Inductor writes the thread count into the code it generates: a package made at 2
    threads used to serve --threads 1 (its key had no thread count)."""
    store = Store(tmp_path)
    one = Builder(decisive_baseline(), store, RunContext.here(1))
    two = Builder(decisive_baseline(), store, RunContext.here(2))
    recipe = RECIPES["int8_static"]
    artifact = one.key(recipe)
    assert one.packages.key(artifact, 224) != two.packages.key(artifact, 224)
    for builder in (one, two):
        builder.variant(recipe)
    packages = [e for e in cache.entries(store) if e.kind == "package"]
    assert len(packages) == 2
    threads = {json.loads(next(p for p in e.paths if p.suffix == ".json").read_text())[
        "context"]["threads"] for e in packages}
    assert threads == {1, 2}


def _cpu_per_wall(model, size: int, threads: int) -> float:
    """Process CPU seconds per wall second while ``model`` runs (1.0: one busy thread)."""
    batch = torch.randn(1, 3, size, size)
    time_models({"m": (model, batch)}, runs=2, warmup=2, threads=threads)
    cpu, wall = time.process_time(), time.perf_counter()
    time_models({"m": (model, batch)}, runs=30, warmup=0, threads=threads)
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["inductor", "onnxruntime", "openvino"])
def test_threads_reach_every_runtime(tmp_path, runtime):
    """--threads 1 used to reach PyTorch only: ONNX Runtime and OpenVINO sessions were made
    with every core, so 1-thread rows timed them on two."""
    if runtime != "inductor" and not runtimes.installed(runtime):
        pytest.skip(f"{runtime} is not installed (leanvgg[export])")
    variants = build_variants(decisive_baseline(), ["baseline", "int8_static"],
                              store=Store(tmp_path), progress=False, runtime=runtime,
                              threads=1)
    variant = variants.variants["int8_static"]
    assert variant.runtime == runtime and variant.where.threads == 1
    settings = getattr(variant.model, "settings", None)
    if runtime == "onnxruntime":  # as the session reports its options back
        assert settings["intra_op_num_threads"] == 1 and settings["inter_op_num_threads"] == 1
    elif runtime == "openvino":
        assert settings["INFERENCE_NUM_THREADS"] == "1"
        assert settings["INFERENCE_PRECISION_HINT"] == "f32"
    assert _cpu_per_wall(variant.model, variant.input_size, 1) < 1.25
    photo = decode(read_file(PHOTOS[0]))
    result = compare(photo, variants, Settings(runs=2, warmup=1, threads=1))
    row = result.variants[1]
    assert row.context["threads"] == 1 and row.context["runtime"] == runtime
    recorded = result.to_dict()["results"][1]["context"]["versions"]["torch"]
    assert torch.__version__.startswith(recorded)
    with pytest.raises(ValueError, match="made for 1 threads, not 2"):
        compare(photo, variants, Settings(runs=1, warmup=0, threads=2))


def test_a_speedup_divides_only_figures_of_the_same_kind(tmp_path):
    variants = build_variants(decisive_baseline(), ["baseline", "res160"], store=Store(tmp_path),
                              progress=False, threads=1)
    photo = decode(read_file(PHOTOS[0]))
    profile = Profile(Latency.from_seconds([0.010] * 10), time.time(), 1)
    mixed = compare(photo, variants, Settings(runs=1, warmup=0), profiles={"baseline": profile})
    baseline, res160 = mixed.variants
    assert baseline.speedup == 1.0 and baseline.latency_source == "profile"
    assert res160.speedup is None and res160.latency_source == "request"
    assert "not comparable" in res160.speedup_note and "1 pass)" in res160.speedup_note
    assert res160.latency_ms.count == 1  # the request's passes, with their count
    assert "res160: no speedup, not comparable" in cli.format_table(mixed)
    # the columns fit the longest name and runtime: each row's runtime starts under the
    # header's, its input size ends under "input"
    wide = dataclasses.replace(mixed, variants=[
        dataclasses.replace(row, facts=dataclasses.replace(row.facts, name=name, runtime=where))
        for row, (name, where) in zip(mixed.variants, [("pruned_quantized_tuned", "pytorch"),
                                                        ("turbo_svd", "openvino_bf16")])])
    header, _, *rows = cli.format_table(wide).splitlines()[:4]
    for row, (name, where) in zip(rows, [("pruned_quantized_tuned", "pytorch"),
                                         ("turbo_svd", "openvino_bf16")]):
        assert row.startswith(name + " ") and row.index(where) == header.index("runtime")
        size = row[len(name):].split()[1]
        assert row.index(f" {size} ") + 1 + len(size) == header.index("input") + len("input")
    both = compare(photo, variants, Settings(runs=1, warmup=0),
                   profiles={"baseline": profile, "res160": profile})
    assert both.variants[1].speedup == 1.0 and both.variants[1].speedup_note is None
    fresh = compare(photo, variants, Settings(runs=3, warmup=1))
    assert fresh.variants[1].speedup == pytest.approx(
        fresh.variants[0].latency_ms.median / fresh.variants[1].latency_ms.median)


def test_a_variant_on_another_runtime_is_never_compiled_for_inductor(tmp_path):
    """The runtime is decided before anything is compiled: --runtime openvino used to compile
    an AOTInductor package it never ran."""
    if not runtimes.installed("openvino"):
        pytest.skip("openvino is not installed (leanvgg[export])")
    store = Store(tmp_path)
    variants = build_variants(decisive_baseline(), ["baseline", "int8_static"], store=store,
                              progress=False, runtime="openvino", threads=1)
    assert variants.variants["int8_static"].runtime == "openvino"
    kinds = [e.kind for e in cache.entries(store)]
    assert "package" not in kinds
    # the IR's .xml and .bin are one entry (they used to be two, listed and removed apart),
    # beside the ONNX export OpenVINO converted
    converted = {frozenset(p.suffix for p in e.paths) for e in cache.entries(store)
                 if e.kind == "converted"}
    assert converted == {frozenset({".xml", ".bin", ".json"}), frozenset({".onnx", ".json"})}


def test_third_party_output_never_reaches_our_stdout(tmp_path, monkeypatch, capfd, photo_path):
    """A first (cold-cache) compare --json used to print NNCF's progress bars to stdout
    before the document. Whatever a converting library prints, through Python or straight to
    file descriptor 1, goes to stderr."""
    if not runtimes.installed("openvino"):
        pytest.skip("openvino is not installed (leanvgg[export])")
    export = interop._export_onnx

    def chatty(*args, **kwargs):  # as a library that writes progress to stdout would
        print("chatty library: exporting", flush=True)
        os.write(1, b"chatty library: straight to fd 1\n")
        return export(*args, **kwargs)

    monkeypatch.setattr(interop, "_export_onnx", chatty)
    monkeypatch.setenv("LEANVGG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cli, "load_baseline", lambda weights, **_: decisive_baseline())
    assert cli.main(["compare", str(photo_path), "--json", "--variants", "int8_static",
                     "--runtime", "openvino", "--runs", "1", "--warmup", "0"]) == 0
    out, err = capfd.readouterr()
    report = json.loads(out)  # the whole of stdout is the document
    assert [r["runtime"] for r in report["results"]] == ["pytorch", "openvino"]
    assert "chatty library: exporting" in err and "straight to fd 1" in err


def test_openvinos_converter_keeps_its_verbose_lines_for_the_debug_log(tmp_path, monkeypatch,
                                                                       capfd, caplog):
    """OpenVINO's converter prints its arguments and its time whenever ``--verbose`` is among
    the process's arguments, as in every builder process a server starts: eight lines per
    conversion in the server's log. They go to leanvgg's debug log instead."""
    if not runtimes.installed("openvino"):
        pytest.skip("openvino is not installed (leanvgg[export])")
    path = tmp_path / "model.onnx"
    interop.write_onnx(decisive_baseline().model, 32, path)
    capfd.readouterr()
    monkeypatch.setattr(sys, "argv", ["leanvgg", "--verbose", "build"])
    with caplog.at_level(logging.DEBUG, logger="leanvgg.interop"):
        model = interop.openvino_from_onnx(path)
    out, err = capfd.readouterr()
    assert [tuple(p.get_partial_shape())[1:] for p in model.inputs] == [(3, 32, 32)]
    assert out == "" and "Model Conversion" not in err and "SUCCESS" not in err
    assert "Model Conversion arguments" in caplog.text  # what it said, kept


@pytest.mark.slow
def test_choosing_inductor_imports_no_other_runtime(tmp_path):
    """Deciding where a variant runs finds the runtimes without importing them."""
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
        "from test_export import decisive_baseline\n"
        "from leanvgg.store import Store\n"
        "from leanvgg.variants import build_variants\n"
        "build_variants(decisive_baseline(), ['baseline', 'int8_static'],"
        f" store=Store({str(tmp_path)!r}), progress=False, runtime='inductor', threads=1)\n"
        "print([m for m in ('onnx', 'onnxscript', 'onnxruntime', 'openvino', 'nncf')"
        " if m in sys.modules])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_calibration_folder_is_hashed_once_not_on_every_listing(tmp_path, monkeypatch):
    """The server lists its variants every second; each listing used to hash the calibration
    folder again."""
    import shutil

    from leanvgg import recipes
    from leanvgg.variants import registry_for

    folder = tmp_path / "calibration"
    folder.mkdir()
    for photo in PHOTOS[:2]:
        shutil.copy(photo, folder)
    calls = []
    real = recipes.calibration_digest
    monkeypatch.setattr(recipes, "calibration_digest", lambda f: calls.append(f) or real(f))
    registry = registry_for(decisive_baseline(), Store(tmp_path / "home"), str(folder))
    hashed = len(calls)
    variant = Variant(registry["int8_static"], torch.nn.Identity(), ArtifactFacts(1, 1, 1, 1), "a",
                      RunContext(threads=1))
    steps = [variant.summary().steps for _ in range(5)]
    assert len(calls) == hashed and steps[0] == steps[-1]
    assert steps[0][0]["calibration"] == f"folder-sha256:{real(folder)}"
