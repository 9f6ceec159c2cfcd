"""The CPU-native fast variants: static INT8 (really INT8), bf16, turbo; built, cached, reloaded."""

import copy
import json
import logging
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from leanvgg import runtime, variants
from leanvgg.compare import Settings, compare
from leanvgg.data import CALIBRATION_PHOTOS, DataUnavailable, calibration_batch
from leanvgg.images import preprocess
from leanvgg.interop import onnxruntime_runner, openvino_from_onnx, openvino_runner, write_onnx
from leanvgg.measure import count_params, state_dict_bytes
from leanvgg.quantize import quantize_static_int8, static_int8_skeleton
from leanvgg.store import Store
from leanvgg.variants import build_variants, default_names
from tiny import tiny_baseline, tiny_vgg

FAST = ["baseline", "int8_static", "turbo", "turbo160", "turbo_svd"]
QDQ = torch.ops.quantized_decomposed


@pytest.fixture(scope="module")
def float_model():
    return tiny_vgg(dropout=False)


@pytest.fixture(scope="module")
def calibration():
    return calibration_batch(64)


@pytest.fixture(scope="module")
def int8(float_model, calibration):
    return quantize_static_int8(float_model, calibration)


@pytest.fixture(scope="module")
def fast_built(tmp_path_factory):
    """The FAST variants of the tiny VGG built from an empty cache once for the module, made
    for 1 thread: the cache folder (tests that write copy it first) and the variant set."""
    home = tmp_path_factory.mktemp("fast")
    return home, build_variants(tiny_baseline(), FAST, store=Store(home), progress=False,
                                threads=1)


def test_calibration_uses_real_photos_with_licences():
    batch = calibration_batch(96)
    photos = [p for p in CALIBRATION_PHOTOS.iterdir() if p.suffix == ".jpg"]
    assert len(photos) == 6 and (CALIBRATION_PHOTOS / "LICENSES.md").exists()
    assert batch.shape == (6 * 4, 3, 96, 96)
    # each photo, then its mirror image
    assert torch.equal(batch[1], batch[0].flip(-1))
    assert torch.equal(batch, calibration_batch(96))  # seeded crops


def test_a_user_calibration_folder(tmp_path, photo):
    photo.save(tmp_path / "a.png")
    assert calibration_batch(64, tmp_path).shape == (4, 3, 64, 64)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataUnavailable, match="notes.txt"):
        calibration_batch(64, tmp_path)
    with pytest.raises(DataUnavailable, match="does not exist"):
        calibration_batch(64, tmp_path / "missing")


def test_every_conv_and_linear_has_int8_weights_and_int8_activations(float_model, int8):
    graph = int8.graph.graph
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in float_model.modules())
    weight_ops = [n for n in graph.nodes if n.target == QDQ.dequantize_per_channel.default]
    assert len(weight_ops) == n_layers == 19
    for node in weight_ops:
        weight = getattr(int8.graph, node.args[0].target)
        assert weight.dtype == torch.int8  # stored INT8, not FP32 fake-quantized
    activations = [n for n in graph.nodes if n.target == QDQ.quantize_per_tensor.default]
    assert len(activations) >= n_layers and all(n.args[-1] == torch.uint8 for n in activations)
    # no observers or fake-quant modules left in the graph
    assert not any("observer" in type(m).__name__.lower() or "fake" in type(m).__name__.lower()
                   for m in int8.modules())


@pytest.mark.slow  # converts for ONNX Runtime and OpenVINO (README: what slow marks)
def test_onnx_runtime_and_openvino_run_the_int8_models_own_quantization(int8, calibration,
                                                                       tmp_path, caplog):
    """The ONNX export of a static INT8 model is that model: its INT8 weights and activation
    scales, none made again (ONNX Runtime's and OpenVINO's quantizers used to calibrate their
    own from the float weights); both runtimes run it close to PyTorch."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    from onnx import numpy_helper

    path = tmp_path / "int8.onnx"
    with caplog.at_level(logging.INFO):
        write_onnx(int8, 64, path)
    # the exporter's passes log a line per constant they merge; --verbose printed them all
    assert not [r for r in caplog.records if r.name.startswith(("onnx_ir", "onnxscript"))]
    graph = onnx.load(str(path)).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    pairs = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    weights = [constants[n.input[0]] for n in pairs if n.input[0] in constants]
    ours = [t for t in int8.graph.state_dict().values() if t.dtype == torch.int8]
    assert len(weights) == len(ours) == 19  # every conv and Linear, its INT8 weights as they are
    by_content = lambda ts: sorted((tuple(t.shape), t.tobytes()) for t in ts)
    assert by_content(weights) == by_content(t.numpy() for t in ours)
    # each its own zero-point constant: OpenVINO ran a conv in FP32 when it shared one with
    # a Linear (see interop._unshare_weight_zero_points)
    zero_points = [n.input[2] for n in pairs if n.input[0] in constants]
    assert len(set(zero_points)) == len(zero_points) == 19
    activation = [(float(constants[n.input[1]]), int(constants[n.input[2]])) for n in pairs
                  if n.input[0] not in constants]
    qparams = int8.activation_qparams.tolist()
    assert len(activation) == len(qparams)
    assert sorted(activation) == sorted((float(np.float32(s)), int(z)) for s, z in qparams)

    with torch.no_grad():
        reference = int8(calibration)
    spread = float(reference.abs().max())
    # measured: 0.14 % of the largest logit on either runtime, where INT8 itself is 0.34 %
    # from FP32
    for run in (onnxruntime_runner(path, 1), openvino_runner(openvino_from_onnx(path), 1)):
        theirs = torch.from_numpy(run(calibration))
        assert float((theirs - reference).abs().max()) <= 0.01 * spread


@pytest.mark.slow
def test_packaged_int8_runs_onednn_int8_convolutions(int8, calibration, tmp_path):
    path = tmp_path / "int8.pt2"
    runtime.package(int8, 64, path, threads=2)
    with zipfile.ZipFile(path) as archive:
        sources = {name: archive.read(name).decode() for name in archive.namelist()
                   if name.endswith(".cpp")}
    source = "\n".join(text for name, text in sources.items() if name.endswith("wrapper.cpp"))
    # fused INT8 oneDNN convolutions (freezing folded the quantize/dequantize pairs), one per conv
    assert source.count("qconv") >= 16
    # the thread count is written into the generated code: a package holds for one count
    assert "num_threads(2)" in "\n".join(sources.values()), list(sources)
    packaged = runtime.load_package(path, 64)
    with torch.inference_mode():  # batch 3 runs as one batch through the same package
        batched = packaged(calibration[:3])
        rows = torch.cat([packaged(row.unsqueeze(0)) for row in calibration[:3]])
        torch.testing.assert_close(batched, int8(calibration[:3]), rtol=0.05, atol=0.05)
    torch.testing.assert_close(batched, rows, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # the package itself takes the batch (a batch-1 package
        # answers a batch of 3 with one row, silently: checked on torch 2.14.1)
        assert packaged.runner(calibration[:3].contiguous()).shape[0] == 3
    # a channels-last view of the same pixels (what torchvision's preset returns) gives the same
    # answer: the compiled code itself misreads it (on a model whose output depends on its
    # input, tests/test_export.py showed other top-1s before inputs were made contiguous), and
    # the photos leanvgg preprocesses are contiguous too
    strided = calibration[:1].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not strided.is_contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(packaged(strided), packaged(calibration[:1]), rtol=0, atol=0)
    assert preprocess(Image.new("RGB", (80, 60), (200, 30, 90)), 64).is_contiguous()


def test_a_package_leaves_its_library_neither_in_inductors_cache_nor_in_temp(
        float_model, tmp_path, monkeypatch):
    """AOTInductor wrote each package's library (the weights inside it: 276 MB for a VGG-19)
    and C++ into Inductor's cache folder, where nothing reads or removes them: a test suite's
    runs had left 38 GB in /tmp/torchinductor_root."""
    import getpass
    import tempfile

    cache, temp = tmp_path / "inductor", tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    path = tmp_path / "m.pt2"
    runtime.package(float_model, 64, path, threads=1)
    with zipfile.ZipFile(path) as archive:  # the package holds its library and its C++
        assert any(name.endswith(".so") for name in archive.namelist())
    # Inductor's own kernels may stay (small, reused); the wrapper, weights inside, may not
    left = [f for f in cache.rglob("*") if f.is_file() and (
        f.suffix in (".so", ".cpp") and "wrapper" in f.name
        or f.suffix == ".so" and f.stat().st_size > 1_000_000)]
    assert left == []
    # (Inductor keeps its precompiled headers under the temporary folder: reused, not ours)
    assert [f.name for f in temp.iterdir()] in ([], ["torchinductor_" + getpass.getuser()])
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(runtime.load_package(path, 64)(x), float_model(x),
                                   rtol=1e-4, atol=1e-4)


def test_int8_is_a_quarter_of_fp32_and_counts_every_weight(float_model, int8):
    assert state_dict_bytes(int8) < 0.3 * state_dict_bytes(float_model)
    assert count_params(int8) == count_params(float_model)


def test_int8_stays_close_to_fp32_and_leaves_the_input_alone(float_model, int8, calibration):
    before = {k: v.clone() for k, v in float_model.state_dict().items()}
    with torch.inference_mode():
        reference, quantized = float_model(calibration), int8(calibration)
    assert (reference - quantized).abs().max() < 0.05 * reference.abs().max()
    assert all(torch.equal(before[k], v) for k, v in float_model.state_dict().items())


def test_a_stored_state_dict_reloads_without_calibration(float_model, int8, calibration):
    skeleton = static_int8_skeleton(copy.deepcopy(float_model), 64)  # it takes a throwaway
    # the structure only: every tensor of the state dict, its INT8 weights left uncomputed
    shapes = {k: (v.shape, v.dtype) for k, v in skeleton.state_dict().items()}
    assert shapes == {k: (v.shape, v.dtype) for k, v in int8.state_dict().items()}
    weights = [v for v in skeleton.state_dict().values() if v.dtype == torch.int8]
    assert weights and not any(v.any() for v in weights)
    with torch.inference_mode():
        assert not torch.equal(skeleton(calibration[:3]), int8(calibration[:3]))
        skeleton.load_state_dict(int8.state_dict())
        assert torch.equal(skeleton(calibration[:3]), int8(calibration[:3]))


def test_weights_are_folded_as_torchaos_own_folding_does_them(calibration):
    """leanvgg folds the weights' quantization itself (torchao's folding also runs every
    weight's dequantize, only to keep it in the graph): the same graph, the same INT8
    constants under the same names, so artifacts stored either way load either way. A
    factorised classifier (two Linears per layer) and BatchNorm folded into its convs (with
    running statistics of its own) are checked beside a plain VGG."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from leanvgg.lowrank import factorize_linear
    from leanvgg.models import from_layout
    from leanvgg.quantize import _converted, _prepared
    from tiny import TINY_LAYOUT

    with_batchnorm = from_layout({**TINY_LAYOUT, "batch_norm": True}).eval()
    with torch.no_grad():
        for norm in (m for m in with_batchnorm.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    for model in (tiny_vgg(dropout=False), factorize_linear(tiny_vgg(dropout=False), rank=8),
                  with_batchnorm):
        prepared = _prepared(model, 64)
        with torch.no_grad():
            prepared(calibration[:8])
        theirs = convert_pt2e(copy.deepcopy(prepared))
        ours = _converted(prepared)
        assert str(ours.graph) == str(theirs.graph)
        folded = {name: tensor for name, tensor in ours.named_buffers()}
        assert folded and all(tensor.dtype == torch.int8 for name, tensor in folded.items()
                              if name.startswith("_frozen_param"))
        assert sum(name.startswith("_frozen_param") for name in folded) == sum(
            isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
        for name, tensor in folded.items():
            assert torch.equal(tensor, theirs.get_buffer(name)), name
        with torch.inference_mode():
            assert torch.equal(ours(calibration[:4]), theirs(calibration[:4]))


def test_bf16_variant_is_bf16_and_close_to_fp32(float_model, calibration):
    model = runtime.to_bf16(float_model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.inference_mode():
        reference, half = float_model(calibration[:2]), model(calibration[:2])
    assert half.dtype == torch.float32
    assert (reference - half).abs().max() < 0.05 * reference.abs().max()


def test_bf16_is_left_out_by_default_where_the_cpu_emulates_it(monkeypatch):
    monkeypatch.setattr(variants, "native_bf16", lambda: False)
    assert "bf16" not in default_names() and "turbo" in default_names()
    monkeypatch.setattr(variants, "native_bf16", lambda: True)
    assert "bf16" in default_names()


@pytest.mark.slow
def test_fast_variants_build_report_costs_and_reload_with_the_same_outputs(fast_built, tmp_path,
                                                                         calibration):
    home, built = fast_built
    again = build_variants(tiny_baseline(), FAST, progress=False, threads=1,
                           store=Store(shutil.copytree(home, tmp_path / "home")))
    for name in FAST[1:]:
        first, second = built.variants[name], again.variants[name]
        assert isinstance(first.model, runtime.Packaged)
        assert first.artifact == second.artifact
        assert first.summary().preparation_s["compile_s"] > 0
        costs = second.summary().preparation_s
        assert costs["calibration_s"] > 0 and costs["load_s"] > 0
        assert "compile_s" not in costs  # the package came from the cache
        assert second.facts.macs == first.facts.macs
        size = first.input_size
        x = torch.nn.functional.interpolate(calibration[:2], size=(size, size))
        with torch.inference_mode():
            assert torch.equal(first.model(x), second.model(x)), name
    turbo = built.variants["turbo"].summary().to_dict()
    assert turbo["article"] is False and built.variants["baseline"].summary().article is True
    assert turbo["macs"] < built.variants["int8_static"].summary().macs
    assert turbo["size_mb"] < built.variants["int8_static"].summary().size_mb
    assert built.variants["turbo160"].summary().input_size == 160
    # turbo_svd: turbo's pruned convs, fc6 and fc7 at a quarter and a sixteenth of the tiny
    # head's 64 neurons (1,024 and 256 on VGG-19's 4,096)
    svd = built.variants["turbo_svd"]
    assert [r["rank"] for r in svd.facts.reports["low_rank"]] == [16, 4]
    assert all(0 < r["retained_energy"] < 1 for r in svd.facts.reports["low_rank"])
    assert svd.facts.reports["pruning"] == built.variants["turbo"].facts.reports["pruning"]
    assert svd.facts.params_total < built.variants["turbo"].facts.params_total
    assert svd.facts.size_bytes < built.variants["turbo"].facts.size_bytes


@pytest.mark.slow
def test_a_second_process_loads_compiled_variants_without_compiling(fast_built, tmp_path):
    home = shutil.copytree(fast_built[0], tmp_path / "home")
    script = textwrap.dedent("""
        import json, sys, time
        sys.path.insert(0, sys.argv[2])
        from leanvgg import builder, runtime, variants
        from leanvgg.store import Store
        from tiny import tiny_baseline

        def refuse(*args, **kwargs):
            raise AssertionError("compiled again")

        builder.package = runtime.package = refuse
        start = time.perf_counter()
        built = variants.build_variants(tiny_baseline(), ["baseline", "int8_static"],
                                        store=Store(sys.argv[1]), progress=False,
                                        threads=1)
        print(json.dumps({"seconds": time.perf_counter() - start,
                          "costs": built.variants["int8_static"].summary().preparation_s}))
    """)
    result = subprocess.run([sys.executable, "-c", script, str(home),
                             str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert "compile_s" not in report["costs"] and report["costs"]["load_s"] > 0
    assert report["seconds"] < 30  # packaging alone took longer than this (see compile_s)


@pytest.mark.slow
def test_no_recompilation_when_requests_run(fast_built, photo):
    from leanvgg.images import Picture

    built = fast_built[1]
    picture = Picture(photo.crop((0, 0, 300, 300)), photo.width, photo.height)
    counters = torch._dynamo.utils.counters
    before = dict(counters["stats"])
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(2):  # inference mode, new tensors, other strides: nothing is traced
            result = compare(picture, built, Settings(runs=1, warmup=0))
            compare(picture, built, Settings(runs=1, warmup=0, threads=1))
    assert dict(counters["stats"]) == before
    assert len(result.variants) == len(FAST)


@pytest.mark.slow
def test_a_user_calibration_folder_makes_its_own_artifact(fast_built, tmp_path, photo):
    folder = tmp_path / "calibration"
    folder.mkdir()
    photo.save(folder / "cat.png")
    store = Store(shutil.copytree(fast_built[0], tmp_path / "cache"))
    bundled = build_variants(tiny_baseline(), ["baseline", "int8_static"], store=store,
                             progress=False, threads=1).variants["int8_static"]
    own = build_variants(tiny_baseline(), ["baseline", "int8_static"], store=store,
                         progress=False, threads=1,
                         calibration=str(folder)).variants["int8_static"]
    assert own.artifact != bundled.artifact
    assert own.facts.calibration["images"] == 4 and bundled.facts.calibration["images"] == 24
    with pytest.raises(variants.NotTuned, match="leanvgg tune"):
        build_variants(tiny_baseline(), ["baseline", "tuned"], store=store, progress=False)
