"""Exports run without leanvgg: each is loaded in a fresh Python where importing leanvgg fails,
fed the photos the way its model.json says, and compared with leanvgg's own variant."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import leanvgg
from leanvgg import cli, portable
from leanvgg.builder import Builder
from leanvgg.data import CALIBRATION_PHOTOS
from leanvgg.images import decode, read_file
from leanvgg.models import Baseline, from_layout
from leanvgg.store import Store
from leanvgg.variants import build_variants
from tiny import TINY_LAYOUT

PHOTOS = sorted(p for p in CALIBRATION_PHOTOS.glob("*.jpg"))  # scikit-image's bundled photos
FORMATS = ["pt2", "onnx", "openvino", "safetensors"]
EXPORTED = ["baseline", "int8_static", "quantized", "turbo"]  # also as safetensors
AT_160 = ["res160", "turbo160"]  # 160 px (VGG's 7×7 pooling of a 5×5 map), onnx and openvino
# Bounds on max |logit difference| over the photos, relative to the largest |logit|, measured
# on this suite's tiny decisive model (figures in the README's Export section):
# - FP32 exports against eager PyTorch: pt2 1.2e-7 / 0.13 (about 1e-6), ONNX Runtime and
#   OpenVINO (f32 hint) of the same order; bound 1e-5.
# - INT8 pt2 is leanvgg's own package: bit-identical (0); bound 1e-6.
BOUNDS = {("baseline", "pt2"): 1e-5, ("baseline", "onnx"): 1e-5,
          ("baseline", "openvino"): 1e-5, ("int8_static", "pt2"): 1e-6,
          ("res160", "onnx"): 1e-5, ("res160", "openvino"): 1e-5}
# INT8 ONNX / OpenVINO are leanvgg's own INT8 (the pt2's weights and activation scales as QDQ):
# they differ from it only where a runtime's kernels round differently. Measured (max |Δlogit|
# over the largest |logit|): ONNX Runtime 0.0143, OpenVINO 0.0119; from FP32, both within
# 0.94-1.10× leanvgg's INT8's distance (OpenVINO's NNCF quantization, used before, was 6.0×).
SAME_INT8 = {("int8_static", "onnx"): 0.03, ("int8_static", "openvino"): 0.03}
FROM_FP32 = 1.5  # their distance from FP32, at most this many times leanvgg's INT8's
NEEDS = {"pt2": "torch", "onnx": "onnxruntime", "openvino": "openvino"}

RUNNER = r"""
import json, sys
from pathlib import Path
sys.modules["leanvgg"] = None  # importing leanvgg here raises: the export must stand alone
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

# Everything below is read from model.json: the settings leanvgg ran the format with and the
# preprocessing; nothing of the recipe is restated here.
spec_path, fmt = Path(sys.argv[1]), sys.argv[2]
spec = json.loads(spec_path.read_text())
pre, entry = spec["preprocessing"], spec["formats"][fmt]
file = str(spec_path.parent / entry["files"][0])
settings = entry["settings"]
if fmt == "pt2":
    torch.set_num_threads(settings["torch.set_num_threads"])
    package = torch._inductor.aoti_load_package(file)
    run = lambda x: package(x).numpy()
elif fmt == "onnx":
    import onnxruntime
    options = onnxruntime.SessionOptions()
    for name, value in settings.items():
        setattr(options, name, value)
    session = onnxruntime.InferenceSession(file, options, providers=["CPUExecutionProvider"])
    run = lambda x: session.run(None, {entry["input_name"]: x.numpy()})[0]
else:
    import openvino
    compiled = openvino.Core().compile_model(file, "CPU", settings)
    run = lambda x: compiled(x.numpy())[0]
transform = v2.Compose([
    v2.Resize(pre["resize_shorter_side"], interpolation=InterpolationMode(pre["interpolation"]),
              antialias=pre["antialias"]),
    v2.CenterCrop(pre["centre_crop"]), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
    v2.Normalize(pre["mean"], pre["std"])])
logits = {}
def centre_square(image):
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    factor = max(1, side // pre["centre_square"]["work_side"])
    return square.reduce(factor) if factor > 1 else square

for photo in sys.argv[3:]:
    x = transform(centre_square(Image.open(photo).convert(pre["colour"]))).unsqueeze(0)
    if pre["contiguous"]:  # torchvision's tensor is a channels-last view of the pixels
        x = x.contiguous()
    with torch.inference_mode():
        logits[Path(photo).name] = np.asarray(run(x))[0].tolist()
print(json.dumps(logits))
"""


def decisive_baseline() -> Baseline:
    """The tiny VGG, seeded, with torchvision's VGG initialisation (Kaiming convs, zero biases:
    unlike PyTorch's default init its features still differ from photo to photo) and its last
    Linear scaled so that logits are far apart."""
    torch.manual_seed(0)
    model = from_layout(TINY_LAYOUT)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)
        model.classifier[6].weight.mul_(40)
    return Baseline(model.eval(), "tiny-decisive", "tiny-vgg-init-seed0", meaningful=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    home, out = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LEANVGG_HOME", str(home))
        patch.setattr(cli, "load_baseline", lambda weights, **_: decisive_baseline())
        formats = [arg for fmt in FORMATS for arg in ("--format", fmt)]
        assert cli.main(["export", "baseline", "int8_static", *formats, "--out", str(out)]) == 0
        assert cli.main(["export", "quantized", "turbo", "--format", "safetensors",
                         "--out", str(out)]) == 0
        assert cli.main(["export", *AT_160, "--format", "onnx", "--format", "openvino",
                         "--out", str(out)]) == 0
    variants = build_variants(decisive_baseline(), EXPORTED + AT_160, store=Store(home),
                              progress=False).variants
    return out, variants, home


def _leanvgg_logits(variant) -> dict[str, torch.Tensor]:
    size = variant.input_size
    with torch.inference_mode():
        return {p.name: variant.model(decode(read_file(p)).batches({size}).tensors[size])[0]
                for p in PHOTOS}


def _run_export(out, name: str, fmt: str) -> dict[str, torch.Tensor]:
    result = subprocess.run([sys.executable, "-c", RUNNER, str(out / f"{name}.model.json"),
                             fmt, *map(str, PHOTOS)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return {k: torch.tensor(v) for k, v in json.loads(result.stdout).items()}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


@pytest.mark.parametrize(("name", "fmt"), sorted(BOUNDS) + sorted(SAME_INT8))
def test_an_export_runs_without_leanvgg_and_agrees_with_it(exported, name, fmt):
    out, variants, _ = exported
    theirs = _run_export(out, name, fmt)
    ours = _leanvgg_logits(variants[name])
    top1 = {k: int(v.argmax()) for k, v in ours.items()}
    assert {k: int(v.argmax()) for k, v in theirs.items()} == top1
    assert len(set(top1.values())) > 1  # the photos are told apart: top-1 is not a constant
    spread = max(float(v.abs().max()) for v in ours.values())
    worst = _distance(theirs, ours)
    print(f"{name} as {fmt} ({NEEDS[fmt]}): worst |logit difference| {worst:.3g}, "
          f"largest |logit| {spread:.3g}, ratio {worst / spread:.3g}")
    if (name, fmt) in BOUNDS:
        assert worst <= BOUNDS[name, fmt] * spread, (worst, spread)
        return
    assert worst <= SAME_INT8[name, fmt] * spread, (worst, spread)
    # the FP32 model the quantization starts from (pruned, at the variant's size)
    float_variant = dataclasses.replace(variants[name], model=Builder(
        decisive_baseline(), Store(exported[2])).float_model(variants[name].recipe))
    fp32 = _leanvgg_logits(float_variant)
    theirs_error, ours_error = _distance(theirs, fp32), _distance(ours, fp32)
    print(f"  from FP32: {fmt} {theirs_error:.3g}, leanvgg {ours_error:.3g}, "
          f"ratio {theirs_error / ours_error:.3g}")
    assert theirs_error <= FROM_FP32 * ours_error


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_a_pruned_int8_variant_at_160_px_exports_and_runs(exported, fmt):
    """turbo160 on the tiny VGG: its pruned (not fine-tuned) FP32 logits are too close for top-1
    to mean anything (top-2 margins of 1e-4 on logits of 0.003), so this checks that the
    conversion of a pruned INT8 model at 160 px runs, not how it agrees."""
    out, variants, _ = exported
    logits = _run_export(out, "turbo160", fmt)
    assert set(logits) == {p.name for p in PHOTOS}
    assert all(v.shape == (1000,) and torch.isfinite(v).all() for v in logits.values())
    spec = json.loads((out / "turbo160.model.json").read_text())
    assert spec["input_size"] == 160 and spec["preprocessing"]["centre_crop"] == [160, 160]
    assert spec["facts"]["pruning"] == variants["turbo160"].facts.reports["pruning"]


@pytest.mark.parametrize("name", EXPORTED)
def test_load_rebuilds_the_cached_variant_bit_for_bit(exported, name):
    out, variants, home = exported
    model = leanvgg.load(out / f"{name}.safetensors")
    # the cached eager model (compiled variants run the same weights through AOTInductor)
    builder = Builder(decisive_baseline(), Store(home))
    recipe = variants[name].recipe
    cached = builder.artifact(recipe, len(recipe.steps))[0]
    batch = torch.cat([decode(read_file(p)).batches({224}).tensors[224] for p in PHOTOS])
    with torch.inference_mode():
        assert torch.equal(model(batch), cached(batch))
    assert type(model) is type(cached)


def test_safetensors_hold_plain_tensors_and_what_rebuilds_them(exported):
    from safetensors import safe_open

    out, variants, home = exported
    spec = portable.read_spec(out / "int8_static.safetensors")
    assert [step["op"] for step in spec["steps"]] == ["quantize_static_int8"]
    assert spec["layout"]["cfg"][0] == 4 and spec["input_size"] == 224
    recipe = variants["int8_static"].recipe
    cached = Builder(decisive_baseline(), Store(home)).artifact(recipe, 1)[0]
    assert [[q["scale"], q["zero_point"]] for q in spec["activation_qparams"]] == \
        cached.activation_qparams.tolist()
    pruned = portable.read_spec(out / "turbo.safetensors")
    assert pruned["kept"]["pruning"] == variants["turbo"].facts.reports["pruning"]
    assert all(len(layer["kept"]) % 16 == 0 for layer in pruned["kept"]["pruning"])
    with safe_open(str(out / "quantized.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        int8 = handle.get_tensor("classifier.0.weight_int8")
    assert {"classifier.0.weight_scales", "classifier.0.weight_zero_points"} <= keys
    assert int8.dtype == torch.int8 and not any("_packed_params" in k for k in keys)


def test_model_json_says_how_to_feed_it_and_what_it_is(exported):
    out, variants, _ = exported
    spec = json.loads((out / "int8_static.model.json").read_text())
    assert spec["preprocessing"]["resize_shorter_side"] == 256
    assert spec["preprocessing"]["centre_crop"] == [224, 224]
    assert spec["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert spec["recipe"]["steps"][0]["op"] == "quantize_static_int8"
    assert spec["artifact"] == variants["int8_static"].artifact
    assert spec["layout"]["cfg"][:2] == [4, 4]  # the tiny VGG's widths
    assert spec["facts"]["calibration"]["source"] == "bundled photos"
    assert torch.__version__.startswith(spec["versions"]["torch"])
    assert spec["machine"]["capability"]
    assert spec["versions"]["onnxruntime"] and spec["machine"]["flags"]
    assert set(spec["formats"]) == set(FORMATS)
    threads = torch.get_num_threads()  # what the export (and so its packages) was made for
    assert spec["formats"]["pt2"]["run"] == (f"torch.set_num_threads({threads}); "
                                             "torch._inductor.aoti_load_package("
                                             "'int8_static.pt2')(x)")
    # what leanvgg runs each format with, literally (the runner above follows it)
    assert spec["formats"]["openvino"]["settings"] == {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32"}
    assert spec["formats"]["onnx"]["settings"] == {"intra_op_num_threads": threads,
                                                   "inter_op_num_threads": 1}
    assert {fmt: entry["runtime"] for fmt, entry in spec["formats"].items()} == {
        "pt2": "inductor", "onnx": "onnxruntime", "openvino": "openvino",
        "safetensors": "pytorch"}
    assert spec["accuracy"] == {fmt: None for fmt in FORMATS}  # nothing was evaluated
    assert spec["preprocessing"]["interpolation"] == "bilinear"
    assert spec["formats"]["openvino"]["files"] == ["int8_static.xml", "int8_static.bin"]
    for fmt in ("onnx", "openvino"):  # leanvgg's own INT8, not the runtime's quantization
        assert "leanvgg's own static INT8" in spec["formats"][fmt]["quantization"]


def test_what_a_format_cannot_hold_is_refused_with_what_can(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEANVGG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cli, "load_baseline", lambda weights, **_: decisive_baseline())
    out = tmp_path / "out"
    assert cli.main(["export", "baseline", "quantized", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "quantized cannot be exported as pt2" in err and "int8_static" in err
    assert "safetensors" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything was built or written
    assert cli.main(["export", "bf16", "--format", "onnx", "--out", str(out)]) == 2
    assert "bf16 cannot be exported as onnx" in capsys.readouterr().err


def test_a_missing_runtime_names_the_extra_that_installs_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEANVGG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cli, "load_baseline", lambda weights, **_: decisive_baseline())
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if it were not installed
    assert cli.main(["export", "baseline", "--format", "onnx",
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("leanvgg: error: onnx is not installed: it comes with leanvgg's 'export' "
                   "extra (pip install 'leanvgg[export]', or from a clone: pip install -e "
                   "'.[export]').")
    assert not (tmp_path / "out").exists()  # refused before anything was built or written


def test_a_file_leanvgg_did_not_export_is_refused_clearly(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(portable.LoadError, match="not one leanvgg exported"):
        leanvgg.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(portable.LoadError, match="not a readable safetensors file"):
        leanvgg.load(tmp_path / "junk.safetensors")


def test_onnx_and_openvino_exports_are_the_conversions_leanvgg_runs(tmp_path, monkeypatch,
                                                                     capsys):
    """Where the runtime choice stored a variant's conversions, export copies them (labels
    added) instead of exporting the model again: the same graph and weights leanvgg runs."""
    import importlib

    import onnx
    import openvino

    from leanvgg.recipes import QuantizeStaticInt8
    from leanvgg.runtimes import stored_conversion

    export_module = importlib.import_module("leanvgg.export")  # leanvgg.export is a function

    home, out = tmp_path / "home", tmp_path / "out"
    monkeypatch.setenv("LEANVGG_HOME", str(home))
    monkeypatch.setattr(cli, "load_baseline", lambda weights, **_: decisive_baseline())
    built = build_variants(decisive_baseline(), ["int8_static"], store=Store(home),
                           progress=False, runtime="openvino")  # stores the ONNX file first
    variant = built.variants["int8_static"]
    stored = {fmt: stored_conversion(variant, built.builder, fmt) for fmt in ("onnx", "openvino")}
    assert all(stored.values())

    def exported_again(*args, **kwargs):
        raise AssertionError("exported again instead of copied")

    made = []  # the copies need only the INT8 model's facts: it is neither loaded nor built

    def int8_model(*args, **kwargs):
        made.append(args)
        raise AssertionError("the INT8 model was loaded or built")

    monkeypatch.setattr(export_module, "write_onnx", exported_again)
    monkeypatch.setattr(export_module, "openvino_model", exported_again)
    monkeypatch.setattr(QuantizeStaticInt8, "skeleton", int8_model)
    monkeypatch.setattr(QuantizeStaticInt8, "apply", int8_model)
    assert cli.main(["export", "int8_static", "--format", "onnx", "--format", "openvino",
                     "--out", str(out)]) == 0
    assert made == []
    bar = capsys.readouterr().err  # a progress bar on stderr: one variant in two formats
    assert "exporting: 100%" in bar and "2/2" in bar

    mine, theirs = onnx.load(str(out / "int8_static.onnx")), onnx.load(str(stored["onnx"][".onnx"]))
    assert mine.graph == theirs.graph
    labels = {p.key: p.value for p in mine.metadata_props}["labels"]
    assert json.loads(labels) == list(decisive_baseline().labels.names)
    core = openvino.Core()
    ir, kept = core.read_model(str(out / "int8_static.xml")), core.read_model(
        str(stored["openvino"][".xml"]))
    assert [op.get_type_name() for op in ir.get_ordered_ops()] == [
        op.get_type_name() for op in kept.get_ordered_ops()]
    assert ir.get_rt_info(["leanvgg", "labels"]).astype(str) == labels
    assert (out / "int8_static.bin").read_bytes() == stored["openvino"][".bin"].read_bytes()


def test_model_json_names_the_runtime_its_latency_profile_was_measured_on():
    """The latency profile is the dashboard's, measured where leanvgg runs the variant (here
    OpenVINO at its default precision), whichever formats are exported: it says so."""
    import time

    from leanvgg.builder import Variant
    from leanvgg.context import RunContext
    from leanvgg.export import describe
    from leanvgg.facts import ArtifactFacts, Placement
    from leanvgg.measure import Latency, Profile
    from leanvgg.models import layout_of
    from leanvgg.recipes import RECIPES

    baseline = decisive_baseline()
    variant = Variant(RECIPES["int8_static"], None,
                      ArtifactFacts(size_bytes=1, params=1, params_total=1, macs=1), "weights",
                      RunContext.here(2), Placement("openvino_bf16", "openvino_bf16", 2, "stored"))
    profile = Profile(Latency.from_seconds([0.020, 0.021, 0.022]), time.time(), 2)
    spec = describe(variant, {}, profile, layout_of(baseline.model), baseline)
    assert spec["latency_profile"]["runtime"] == "openvino_bf16"
    assert spec["latency_profile"]["batch"] == 1 and spec["latency_profile"]["threads"] == 2
    assert spec["latency_profile"]["median"] == pytest.approx(21.0)
    assert describe(variant, {}, None, layout_of(baseline.model), baseline)[
        "latency_profile"] is None


def test_a_described_variant_has_the_loaded_ones_facts_without_its_model(tmp_path, monkeypatch):
    """``Builder.described`` reads a stored variant's key, facts and layout from the store's
    manifests, loading no model (what export needs); a variant not stored yet is made."""
    from leanvgg.models import layout_of
    from leanvgg.recipes import RECIPES

    store = Store(tmp_path)
    build_variants(decisive_baseline(), ["int8_static", "turbo_svd"], store=store,
                   progress=False, runtime="onnxruntime")  # stores the artifacts, no package
    loaded = Builder(decisive_baseline(), store)
    expected = {name: loaded.variant(RECIPES[name], compiled=False)
                for name in ("int8_static", "turbo_svd")}

    described = Builder(decisive_baseline(), store)
    monkeypatch.setattr(described, "artifact", lambda *args: pytest.fail("a model was loaded"))
    for name, variant in expected.items():
        seen = described.described(RECIPES[name])
        assert seen.model is None
        assert (seen.artifact, seen.facts, seen.recipe) == (
            variant.artifact, variant.facts, variant.recipe)
        assert described.layout(RECIPES[name]) == layout_of(loaded.float_model(variant.recipe))
    assert described.layout(RECIPES["turbo_svd"])["ranks"]  # its factorised classifier
    monkeypatch.undo()

    states = []
    made = described.described(RECIPES["quantized"], states.append)  # not stored: made now
    assert made.model is not None and states == ["building"]
    assert made.facts == Builder(decisive_baseline(), store).variant(
        RECIPES["quantized"]).facts
