"""Taking a variant out of leanvgg: a file another program can run, and ``model.json`` beside it.

``model.json`` says everything a deployer needs without leanvgg: how to feed the model (the exact
preprocessing), what it is (recipe, steps, layout facts such as the kept filters), what was
measured (accuracy with its interval, the latency profile on the exporting machine) and with
which versions. Formats so far: ``pt2`` (an AOTInductor package: ``torch._inductor.
aoti_load_package(path)(x)`` in any Python with the same torch, no leanvgg needed).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from leanvgg.builder import Builder, Variant
from leanvgg.images import transform
from leanvgg.measure import Profile, machine_facts
from leanvgg.runtime import machine_key, package
from leanvgg.store import write_atomic

FORMATS = ("pt2",)
MODEL_JSON_VERSION = 1


class ExportError(ValueError):
    """The variant cannot be exported in that format; the message says what can."""


@dataclass(frozen=True)
class Exported:
    variant: str
    format: str
    path: Path  # the model file
    model_json: Path


def preprocessing(input_size: int) -> dict:
    """The exact input pipeline leanvgg feeds its models (``images.preprocess``), as data:
    read from the very transform it applies."""
    preset = transform(input_size)
    return {"colour": "RGB", "resize_shorter_side": preset.resize_size[0],
            "interpolation": preset.interpolation.value, "antialias": preset.antialias,
            "centre_crop": [preset.crop_size[0]] * 2, "scale": "pixels / 255",
            "mean": list(preset.mean), "std": list(preset.std),
            "tensor": f"float32, N×3×{input_size}×{input_size} (NCHW)",
            # the compiled code reads its input as contiguous memory without checking strides:
            # torchvision's transforms return a channels-last view, so call .contiguous()
            "contiguous": True,
            "batch": "1 per call (larger batches: one row at a time)"}


def export(variant: Variant, fmt: str, out: Path, *, builder: Builder,
           profile: Profile | None = None) -> Exported:
    """Write ``variant`` as ``fmt`` into the folder ``out`` (created), with ``model.json``."""
    if fmt not in FORMATS:
        raise ExportError(f"Invalid format {fmt!r}. Formats: {', '.join(FORMATS)}.")
    if any(isinstance(m, DynamicLinear) for m in variant.model.modules()):
        raise ExportError(
            f"{variant.name} cannot be exported as {fmt}: torch.ao's packed dynamic INT8 "
            "Linears do not go through torch.export. Export int8_static or turbo (static INT8, "
            "exportable) or the FP32 variant it starts from instead.")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{variant.name}.pt2"
    cached = builder.package_file(variant.recipe) if variant.recipe.compiled else None
    if cached is not None:
        shutil.copyfile(cached, path)  # the very code leanvgg runs
    else:
        package(variant.model, variant.input_size, path)
    model_json = out / f"{variant.name}.model.json"
    write_atomic(model_json, json.dumps(describe(variant, path, profile), indent=2).encode())
    return Exported(variant.name, fmt, path, model_json)


def describe(variant: Variant, path: Path, profile: Profile | None) -> dict:
    """``model.json``: how to feed it, what it is, what was measured, with which versions."""
    facts = variant.facts
    return {
        "model_json_version": MODEL_JSON_VERSION,
        "variant": variant.name,
        "description": variant.recipe.description,
        "file": path.name,
        "format": "pt2",
        "run": f"torch._inductor.aoti_load_package({path.name!r})(x)",
        "input_size": variant.input_size,
        "preprocessing": preprocessing(variant.input_size),
        "output": "logits, N×1000 (ImageNet-1k classes in torchvision's order)",
        "recipe": {"name": variant.recipe.name,
                   "steps": [step.to_json() for step in variant.recipe.steps]},
        "artifact": variant.artifact,
        "facts": {k: facts.get(k) for k in ("size_bytes", "params", "params_total", "macs",
                                            "fine_tuned", "finetune", "calibration",
                                            "pruning", "neuron_pruning", "low_rank")
                  if facts.get(k) is not None},
        "accuracy": facts.get("accuracy"),
        "latency_profile": profile.to_dict() if profile else None,
        "machine": {**machine_facts(torch.get_num_threads()), **machine_key()},
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }
