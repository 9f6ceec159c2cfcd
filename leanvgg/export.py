"""Taking a variant out of leanvgg: a file another program can run, and ``model.json`` beside it.

``model.json`` says everything a deployer needs without leanvgg: how to feed the model (the exact
preprocessing), what it is (recipe, steps, layout facts such as the kept filters), what was
measured (accuracy with its interval, the latency profile on the exporting machine) and with
which versions. Formats: ``pt2`` (an AOTInductor package: ``torch._inductor.aoti_load_package(path)(x)`` in
any Python with the same torch, no leanvgg needed), ``onnx`` (ONNX Runtime), ``openvino`` (IR)
and ``safetensors`` (plain tensors; ``leanvgg.load`` rebuilds the model).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from leanvgg.builder import Builder, Variant, calibration_of, evaluation_key, stored_profile
from leanvgg.capabilities import BF16, INT8_DYNAMIC, INT8_STATIC, export_refusal
from leanvgg.capabilities import FORMAT_OF, RUNTIME_OF, precision_of
from leanvgg.context import OPENVINO_BF16, PYTORCH
from leanvgg.facts import PINNED, Placement
from leanvgg.images import WORK_SIDE, transform
from leanvgg.interop import (INPUT, WRITTEN_WITH, copy_onnx, onnxruntime_settings,
                             openvino_config, openvino_from_onnx, openvino_model, read_openvino,
                             require, write_onnx, write_openvino)
from leanvgg.machine import machine_facts
from leanvgg.measure import Profile
from leanvgg.models import Baseline
from leanvgg.portable import save as save_safetensors
from leanvgg.recipes import Recipe
from leanvgg.runtime import MAX_BATCH, package
from leanvgg.runtimes import stored_conversion
from leanvgg.documents import EVALUATION, PROFILES
from leanvgg.files import write_atomic

MODEL_JSON_VERSION = 3


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


def check(recipes: Iterable[Recipe], formats: Iterable[str]) -> None:
    """Raise ExportError for the first variant × format that cannot be exported, and
    MissingRuntime for a format whose libraries are not installed (before anything is built
    or written)."""
    formats = list(formats)
    for fmt in formats:
        for module in WRITTEN_WITH.get(fmt, ()):
            require(module)
    for recipe in recipes:
        for fmt in formats:
            reason = export_refusal(recipe, fmt)
            if reason:
                raise ExportError(reason)


def export(variant: Variant, fmt: str, out: Path, *, builder: Builder,
           profile: Profile | None = None) -> Exported:
    """Write ``variant`` as ``fmt`` into the folder ``out`` (created), and describe it in
    ``VARIANT.model.json`` there (one file per variant; exports in other formats already
    described there, of the same weights, stay listed). Each format's entry carries the
    settings leanvgg runs it with and the accuracy measured on the runtime that runs it (none
    where it was measured only elsewhere)."""
    reason = export_refusal(variant.recipe, fmt)
    if reason:
        raise ExportError(reason)
    out.mkdir(parents=True, exist_ok=True)
    path, entry = _WRITERS[fmt](variant, out, builder)
    model_json = out / f"{variant.name}.model.json"
    formats = _described_formats(model_json, variant.artifact)
    # safetensors: leanvgg.load's eager module, on PyTorch
    runtime = _runtime_of(variant, fmt)
    evaluations = builder.store.documents.load(EVALUATION) or {}
    formats[fmt] = {"files": [p.name for p in _files(path)], **entry, "runtime": runtime,
                    "accuracy": evaluations.get(evaluation_key(_on(variant, runtime)))}
    layout = builder.layout(variant.recipe)
    write_atomic(model_json, json.dumps(describe(variant, formats, profile, layout,
                                                 builder.baseline), indent=2).encode())
    for written in (*_files(path), model_json):
        _readable(written)
    return Exported(variant.name, fmt, path, model_json)


def export_each(variants: Iterable[Variant], formats: Sequence[str], out: Path, *,
                builder: Builder) -> Iterator[Exported]:
    """Every variant in every format (``export``), each model.json with the variant's stored
    latency profile on this machine; variants are used as the iterable yields them, so a
    caller may prepare them one at a time. Check the formats first (``check``)."""
    profiles = builder.store.documents.load(PROFILES) or {}
    for variant in variants:
        profile = stored_profile(profiles, variant)
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


def _runtime_of(variant: Variant, fmt: str) -> str:
    """The runtime that runs ``fmt``: the variant's own where it runs that format here (so an
    IR the choice placed on openvino_bf16 is described with OpenVINO's default precision)."""
    if FORMAT_OF.get(variant.runtime) == fmt:
        return variant.runtime
    return RUNTIME_OF.get(fmt, PYTORCH)


def _on(variant: Variant, runtime: str) -> Variant:
    """``variant`` as if placed on ``runtime`` (for the keys of figures measured there)."""
    threads = variant.context.threads
    return dataclasses.replace(variant, placement=Placement(runtime, runtime, threads, PINNED))


def _int8_note(variant: Variant, form: str) -> dict:
    calibration = calibration_of(variant.recipe)
    if calibration is None:
        return {"precision": "fp32"}
    return {"precision": "int8",
            "quantization": f"leanvgg's own static INT8 (torchao's PT2E, calibrated on the "
                            f"variant's {len(calibration)} calibration images): the INT8 "
                            f"weights and activation scales the pt2 package runs, {form}"}


def _pt2(variant: Variant, out: Path, builder: Builder) -> tuple[Path, dict]:
    path = out / f"{variant.name}.pt2"
    threads = builder.context.threads
    cached = builder.package_file(variant.recipe) if variant.recipe.compiled else None
    if variant.recipe.compiled and cached is None:  # the very code leanvgg runs, made and kept
        builder.compile_ahead(variant.recipe)
        cached = builder.package_file(variant.recipe)
    if cached is not None:
        shutil.copyfile(cached, path)
    else:
        eager = (variant.model if variant.model is not None and not variant.recipe.compiled
                 else builder.artifact(variant.recipe, len(variant.recipe.steps))[0])
        package(eager, variant.input_size, path, threads=threads)
    return path, {"run": f"torch.set_num_threads({threads}); "
                         f"torch._inductor.aoti_load_package({path.name!r})(x)",
                  "settings": {"torch.set_num_threads": threads},
                  "threads": f"compiled for {threads} threads: Inductor writes the count into "
                             "its code, so run it with the same torch.set_num_threads",
                  "batch": f"1 to {MAX_BATCH} images per call (any N×3×s×s)",
                  "precision": _precision_name(variant),
                  "needs": f"torch=={torch.__version__} on a CPU with the same features"}


def _onnx(variant: Variant, out: Path, builder: Builder) -> tuple[Path, dict]:
    path = out / f"{variant.name}.onnx"
    stored = stored_conversion(variant, builder, "onnx")
    if stored is not None:  # the very file ONNX Runtime runs here
        copy_onnx(stored[".onnx"], path, file_metadata(builder.baseline))
    else:
        write_onnx(builder.portable_model(variant.recipe), variant.input_size, path,
                   metadata=file_metadata(builder.baseline))
    settings = onnxruntime_settings(builder.context.threads)
    options = "".join(f"options.{name} = {value}; " for name, value in settings.items())
    return path, {"labels": "metadata_props 'labels' (a JSON list, in output order)",
                  "run": f"options = onnxruntime.SessionOptions(); {options}"
                         f"onnxruntime.InferenceSession({path.name!r}, options, providers="
                         f"['CPUExecutionProvider']).run(None, {{{INPUT!r}: x.numpy()}})[0]",
                  "settings": settings, "input_name": INPUT, "batch": "any",
                  **_int8_note(variant, "as QuantizeLinear/DequantizeLinear pairs (QDQ)")}


def _openvino(variant: Variant, out: Path, builder: Builder) -> tuple[Path, dict]:
    path = out / f"{variant.name}.xml"
    write_openvino(_openvino_model(variant, builder), path,
                   metadata=file_metadata(builder.baseline))
    # what leanvgg compiles it with: the f32 hint, unless the runtime choice measured OpenVINO's
    # default (what is not INT8 in bf16, on CPUs with native bf16) faster and as faithful here
    default = _runtime_of(variant, "openvino") == OPENVINO_BF16
    settings = openvino_config(builder.context.threads, f32=not default)
    note = _int8_note(variant, "as OpenVINO converts them from the ONNX export's QDQ pairs")
    return path, {"labels": "rt_info ['leanvgg', 'labels'] (a JSON list, in output order)",
                  "run": f"openvino.Core().compile_model({path.name!r}, 'CPU', {settings!r})"
                         "(x.numpy())[0]", "settings": settings, "batch": "any", **note,
                  "precision": note["precision"] + (
                      ", the rest in bf16 (OpenVINO's default on this CPU)" if default else
                      ", the rest in f32 (INFERENCE_PRECISION_HINT)")}


def _openvino_model(variant: Variant, builder: Builder):
    """The IR OpenVINO runs here when one is stored, else OpenVINO's conversion of the stored
    ONNX file, else of a new export (the way the runtime choice makes them)."""
    stored = stored_conversion(variant, builder, "openvino")
    if stored is not None:
        return read_openvino(stored[".xml"])
    onnx = stored_conversion(variant, builder, "onnx")
    if onnx is not None:
        return openvino_from_onnx(onnx[".onnx"])
    return openvino_model(builder.portable_model(variant.recipe), variant.input_size)


def _safetensors(variant: Variant, out: Path, builder: Builder) -> tuple[Path, dict]:
    path = out / f"{variant.name}.safetensors"
    model = builder.artifact(variant.recipe, len(variant.recipe.steps))[0]
    facts = variant.facts
    save_safetensors(model, path, spec={
        "variant": variant.name, "input_size": variant.input_size,
        "layout": builder.layout(variant.recipe),
        "steps": [step.to_json() for step in variant.recipe.steps],
        "kept": {k: facts.reports[k] for k in ("pruning", "neuron_pruning")
                 if facts.reports.get(k)},
        "artifact": variant.artifact, "labels": list(builder.baseline.labels.names),
        "model": builder.baseline.identity()})
    return path, {"run": f"leanvgg.load({path.name!r})(x)", "batch": "any",
                  "precision": _precision_name(variant),
                  "note": "plain tensors (no pickles); the metadata rebuilds the model"}


def _precision_name(variant: Variant) -> str:
    return {INT8_STATIC: "int8 (static)", INT8_DYNAMIC: "int8 (dynamic, Linears)",
            BF16: "bf16"}.get(precision_of(variant.recipe), "fp32")


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


def file_metadata(baseline: Baseline) -> dict[str, str]:
    """What a model file carries where its format has a place for it (ONNX metadata_props,
    OpenVINO rt_info): the labels in output order and the model's identity, as JSON."""
    return {"labels": json.dumps(list(baseline.labels.names)),
            "model": json.dumps(baseline.identity())}


def describe(variant: Variant, formats: dict, profile: Profile | None, layout: dict,
             baseline: Baseline) -> dict:
    """``model.json``: how to feed it, what it is, what was measured, with which versions."""
    facts = variant.facts
    machine = machine_facts(variant.context.threads)
    return {
        "model_json_version": MODEL_JSON_VERSION,
        "variant": variant.name,
        "description": variant.recipe.description,
        "formats": formats,
        "input_size": variant.input_size,
        "preprocessing": preprocessing(variant.input_size),
        "output": f"logits, N×{baseline.num_classes} (the classes of 'labels', in order)",
        "labels": list(baseline.labels.names),
        "model": baseline.identity(),
        "recipe": {"name": variant.recipe.name,
                   "steps": [step.to_json() for step in variant.recipe.steps]},
        "artifact": variant.artifact,
        # the channel widths after pruning (torchvision's cfg notation), Linear widths, ranks
        "layout": layout,
        "facts": facts.to_dict(),
        # per format too (formats[…].accuracy): each measured on the runtime that runs it
        "accuracy": {fmt: entry.get("accuracy") for fmt, entry in formats.items()},
        # measured where leanvgg runs the variant, which may not be where a format runs
        "latency_profile": ({**profile.to_dict(), "runtime": variant.runtime, "batch": 1}
                            if profile else None),
        "machine": machine,
        "versions": machine["versions"],
    }
