"""Taking a variant out of leanvgg: a file another program can run, and ``model.json`` beside it.

``model.json`` says everything a deployer needs without leanvgg: how to feed the model (the exact
preprocessing), what it is (recipe, steps, layout facts such as the kept filters), what was
measured (accuracy with its interval, the latency profile on the exporting machine) and with
which versions. Formats: ``pt2`` (an AOTInductor package: ``torch._inductor.aoti_load_package(path)(x)`` in
any Python with the same torch, no leanvgg needed), ``onnx`` (ONNX Runtime), ``openvino`` (IR)
and ``safetensors`` (plain tensors; ``leanvgg.load`` rebuilds the model).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from leanvgg.builder import Builder, Variant, stored_profile
from leanvgg.data import calibration_batch
from leanvgg.images import WORK_SIDE, transform
from leanvgg.interop import openvino_model, write_onnx, write_openvino
from leanvgg.measure import Profile, machine_facts
from leanvgg.models import layout_of
from leanvgg.portable import save as save_safetensors
from leanvgg.recipes import CastBf16, QuantizeDynamicInt8, QuantizeStaticInt8, Recipe, Step
from leanvgg.runtime import MAX_BATCH, machine_key, package
from leanvgg.store import PROFILES, write_atomic

FORMATS = ("pt2", "onnx", "openvino", "safetensors")
MODEL_JSON_VERSION = 2


class ExportError(ValueError):
    """The variant cannot be exported in that format; the message says what can."""


@dataclass(frozen=True)
class Exported:
    variant: str
    format: str
    path: Path  # the model file (OpenVINO: the .xml, its .bin beside it)
    model_json: Path

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in _files(self.path))


def preprocessing(input_size: int) -> dict:
    """The exact input pipeline leanvgg feeds its models (``images.preprocess``), as data:
    read from the very transform it applies."""
    preset = transform(input_size)
    return {"colour": "RGB",
            # leanvgg looks at the upright centre square of a photo (images.decode), reduced
            # by an integer factor when large; the preset below then acts on that square.
            # Applying the preset to a whole non-square photo instead differs at 160 px by up
            # to 1.4 in normalised units (measured on scikit-image's photos).
            "centre_square": {"side": "min(width, height)", "left": "(width - side) // 2",
                              "top": "(height - side) // 2",
                              "reduce": f"PIL Image.reduce(max(1, side // {WORK_SIDE}))",
                              "work_side": WORK_SIDE},
            "resize_shorter_side": preset.resize_size[0],
            "interpolation": preset.interpolation.value, "antialias": preset.antialias,
            "centre_crop": [preset.crop_size[0]] * 2, "scale": "pixels / 255",
            "mean": list(preset.mean), "std": list(preset.std),
            "tensor": f"float32, N×3×{input_size}×{input_size} (NCHW)",
            # the compiled code reads its input as contiguous memory without checking strides:
            # torchvision's transforms return a channels-last view, so call .contiguous()
            "contiguous": True}


def refusal(recipe: Recipe, fmt: str) -> str | None:
    """Why ``recipe``'s variant cannot be exported as ``fmt`` and what can be instead; None if
    it can (known before anything is built)."""
    if fmt not in FORMATS:
        return f"Invalid format {fmt!r}. Formats: {', '.join(FORMATS)}."
    precision = _precision_step(recipe)
    name = recipe.name
    if isinstance(precision, QuantizeDynamicInt8) and fmt != "safetensors":
        return (f"{name} cannot be exported as {fmt}: torch.ao's packed dynamic INT8 "
                "Linears go through neither torch.export nor ONNX/OpenVINO conversion. Export "
                f"it as safetensors (leanvgg.load reads it), or export int8_static or turbo "
                f"(static INT8) as {fmt}.")
    if isinstance(precision, CastBf16) and fmt in ("onnx", "openvino"):
        return (f"{name} cannot be exported as {fmt}: neither ONNX Runtime nor OpenVINO "
                "takes a bf16 model on CPUs. Export it as pt2 or safetensors; or export "
                "baseline as openvino: OpenVINO runs FP32 models in bf16 by itself on CPUs "
                "with native bf16.")
    return None


def check(recipes: Iterable[Recipe], formats: Iterable[str]) -> None:
    """Raise ExportError for the first variant × format that cannot be exported (before
    anything is built or written)."""
    formats = list(formats)
    for recipe in recipes:
        for fmt in formats:
            reason = refusal(recipe, fmt)
            if reason:
                raise ExportError(reason)


def export(variant: Variant, fmt: str, out: Path, *, builder: Builder,
           profile: Profile | None = None) -> Exported:
    """Write ``variant`` as ``fmt`` into the folder ``out`` (created), and describe it in
    ``VARIANT.model.json`` there (one file per variant; exports in other formats already
    described there, of the same weights, stay listed)."""
    reason = refusal(variant.recipe, fmt)
    if reason:
        raise ExportError(reason)
    out.mkdir(parents=True, exist_ok=True)
    path, entry = _WRITERS[fmt](variant, out, builder)
    model_json = out / f"{variant.name}.model.json"
    formats = _described_formats(model_json, variant.artifact)
    formats[fmt] = {"files": [p.name for p in _files(path)], **entry}
    layout = layout_of(float_model(variant, builder))
    write_atomic(model_json, json.dumps(describe(variant, formats, profile, layout),
                                        indent=2).encode())
    for written in (*_files(path), model_json):
        _readable(written)
    return Exported(variant.name, fmt, path, model_json)


def export_each(variants: Iterable[Variant], formats: Sequence[str], out: Path, *,
                builder: Builder) -> Iterator[Exported]:
    """Every variant in every format (``export``), each model.json with the variant's stored
    latency profile on this machine; variants are used as the iterable yields them, so a
    caller may prepare them one at a time. Check the formats first (``check``)."""
    profiles = builder.store.load_json(PROFILES) or {}
    for variant in variants:
        profile = stored_profile(profiles, variant, torch.get_num_threads())
        for fmt in formats:
            yield export(variant, fmt, out, builder=builder, profile=profile)


def _readable(path: Path) -> None:
    """The permissions an ordinary new file gets (atomic writes start private): exports are
    made to be shipped. The umask is read, not set and restored, which would race with other
    threads creating files."""
    umask = 0o022
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    path.chmod(0o666 & ~umask)


def _precision_step(recipe: Recipe) -> Step | None:
    last = recipe.steps[-1] if recipe.steps else None
    return last if isinstance(last, (QuantizeStaticInt8, QuantizeDynamicInt8, CastBf16)) else None


def float_model(variant: Variant, builder: Builder) -> nn.Module:
    """The eager model before the precision step (all of the recipe's structure and training)."""
    steps = len(variant.recipe.steps) - (_precision_step(variant.recipe) is not None)
    return builder.artifact(variant.recipe, steps)[0]


def calibration_of(variant: Variant) -> torch.Tensor | None:
    step = _precision_step(variant.recipe)
    if not isinstance(step, QuantizeStaticInt8):
        return None
    return calibration_batch(step.input_size, step.calibration)


def _int8_note(variant: Variant, runtime: str, calibration: torch.Tensor | None) -> dict:
    if calibration is None:
        return {"precision": "fp32"}
    return {"precision": "int8",
            "quantization": f"{runtime} on leanvgg's float weights, calibrated on the "
                            f"variant's {len(calibration)} calibration images: a separate "
                            "quantization from leanvgg's own (see README, Export)"}


def _pt2(variant: Variant, out: Path, builder: Builder) -> tuple[Path, dict]:
    path = out / f"{variant.name}.pt2"
    cached = builder.package_file(variant.recipe) if variant.recipe.compiled else None
    if cached is not None:
        shutil.copyfile(cached, path)  # the very code leanvgg runs
    else:
        eager = (builder.artifact(variant.recipe, len(variant.recipe.steps))[0]
                 if variant.recipe.compiled else variant.model)
        package(eager, variant.input_size, path)
    return path, {"run": f"torch._inductor.aoti_load_package({path.name!r})(x)",
                  "batch": f"1 to {MAX_BATCH} images per call (any N×3×s×s)",
                  "precision": _precision_name(variant),
                  "needs": f"torch=={torch.__version__} on a CPU with the same features"}


def _onnx(variant: Variant, out: Path, builder: Builder) -> tuple[Path, dict]:
    path = out / f"{variant.name}.onnx"
    calibration = calibration_of(variant)
    write_onnx(float_model(variant, builder), variant.input_size, path,
               calibration=calibration)
    return path, {"run": f"onnxruntime.InferenceSession({path.name!r}).run(None, "
                         "{'input': x.numpy()})[0]", "batch": "any",
                  **_int8_note(variant, "ONNX Runtime's quantize_static (QDQ, INT8 weights "
                               "per output channel, UINT8 activations, MinMax)", calibration)}


def _openvino(variant: Variant, out: Path, builder: Builder) -> tuple[Path, dict]:
    path = out / f"{variant.name}.xml"
    calibration = calibration_of(variant)
    write_openvino(openvino_model(float_model(variant, builder), variant.input_size,
                                  calibration=calibration), path)
    # OpenVINO runs FP32 models in bf16 on CPUs with native bf16 unless told not to
    hint = "" if calibration is not None else ", {'INFERENCE_PRECISION_HINT': 'f32'}"
    return path, {"run": f"openvino.Core().compile_model({path.name!r}, 'CPU'{hint})"
                         "(x.numpy())[0]", "batch": "any",
                  **_int8_note(variant, "NNCF's post-training quantization", calibration)}


def _safetensors(variant: Variant, out: Path, builder: Builder) -> tuple[Path, dict]:
    path = out / f"{variant.name}.safetensors"
    model = builder.artifact(variant.recipe, len(variant.recipe.steps))[0]
    facts = variant.facts
    save_safetensors(model, path, spec={
        "variant": variant.name, "input_size": variant.input_size,
        "layout": layout_of(float_model(variant, builder)),
        "steps": [step.to_json() for step in variant.recipe.steps],
        "kept": {k: facts[k] for k in ("pruning", "neuron_pruning") if facts.get(k)},
        "artifact": variant.artifact})
    return path, {"run": f"leanvgg.load({path.name!r})(x)", "batch": "any",
                  "precision": _precision_name(variant),
                  "note": "plain tensors (no pickles); the metadata rebuilds the model"}


def _precision_name(variant: Variant) -> str:
    step = _precision_step(variant.recipe)
    return {QuantizeStaticInt8: "int8 (static)", QuantizeDynamicInt8: "int8 (dynamic, Linears)",
            CastBf16: "bf16"}.get(type(step), "fp32")


_WRITERS = {"pt2": _pt2, "onnx": _onnx, "openvino": _openvino, "safetensors": _safetensors}


def _files(path: Path) -> list[Path]:
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


def _described_formats(model_json: Path, artifact: str) -> dict:
    """The formats an earlier export of these same weights described, whose files remain."""
    try:
        old = json.loads(model_json.read_text())
    except (OSError, ValueError):
        return {}
    if old.get("artifact") != artifact or not isinstance(old.get("formats"), dict):
        return {}
    return {fmt: entry for fmt, entry in old["formats"].items()
            if all((model_json.parent / name).exists() for name in entry.get("files", []))}


def describe(variant: Variant, formats: dict, profile: Profile | None, layout: dict) -> dict:
    """``model.json``: how to feed it, what it is, what was measured, with which versions."""
    facts = variant.facts
    return {
        "model_json_version": MODEL_JSON_VERSION,
        "variant": variant.name,
        "description": variant.recipe.description,
        "formats": formats,
        "input_size": variant.input_size,
        "preprocessing": preprocessing(variant.input_size),
        "output": "logits, N×1000 (ImageNet-1k classes in torchvision's order)",
        "recipe": {"name": variant.recipe.name,
                   "steps": [step.to_json() for step in variant.recipe.steps]},
        "artifact": variant.artifact,
        # the channel widths after pruning (torchvision's cfg notation), Linear widths, ranks
        "layout": layout,
        "facts": {k: facts.get(k) for k in ("size_bytes", "params", "params_total", "macs",
                                            "fine_tuned", "finetune", "calibration",
                                            "pruning", "neuron_pruning", "low_rank")
                  if facts.get(k) is not None},
        "accuracy": facts.get("accuracy"),
        "latency_profile": profile.to_dict() if profile else None,
        "machine": {**machine_facts(torch.get_num_threads()), **machine_key()},
        "versions": machine_facts(torch.get_num_threads())["versions"],
    }
