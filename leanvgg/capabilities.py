"""What can run or be exported where: one table of precision × runtime and precision × format.

Read by ``leanvgg.runtimes`` (the candidates a variant may run on) and ``leanvgg.export`` (what
a format can hold), so the two cannot disagree. Decided from the recipe alone, before anything
is built.
"""

from __future__ import annotations

from leanvgg.context import INDUCTOR, ONNXRUNTIME, OPENVINO, OPENVINO_BF16
from leanvgg.machine import native_bf16
from leanvgg.recipes import CastBf16, QuantizeDynamicInt8, QuantizeStaticInt8, Recipe, Step

FP32, INT8_STATIC, INT8_DYNAMIC, BF16 = "fp32", "int8_static", "int8_dynamic", "bf16"
FORMATS = ("pt2", "onnx", "openvino", "safetensors")
# what each runs (openvino_bf16 runs the same IR as openvino, at OpenVINO's default precision)
FORMAT_OF = {INDUCTOR: "pt2", ONNXRUNTIME: "onnx", OPENVINO: "openvino", OPENVINO_BF16: "openvino"}
RUNTIME_OF = {"pt2": INDUCTOR, "onnx": ONNXRUNTIME, "openvino": OPENVINO}  # what runs each format

_DYNAMIC = ("{name} cannot be {done} {target}: torch.ao's packed dynamic INT8 Linears go "
            "through neither torch.export nor ONNX/OpenVINO conversion. Export it as "
            "safetensors (leanvgg.load reads it), or use int8_static or turbo (static INT8) "
            "on {target}.")
_BF16 = ("{name} cannot be {done} {target}: neither ONNX Runtime nor OpenVINO takes a bf16 "
         "model on CPUs. Export it as pt2 or safetensors; or export baseline as openvino: "
         "OpenVINO runs FP32 models in bf16 by itself on CPUs with native bf16.")
# format → precision → why it cannot (absent: it can)
_FORMAT_REFUSALS = {
    "pt2": {INT8_DYNAMIC: _DYNAMIC},
    "onnx": {INT8_DYNAMIC: _DYNAMIC, BF16: _BF16},
    "openvino": {INT8_DYNAMIC: _DYNAMIC, BF16: _BF16},
    "safetensors": {},
}


def precision_step(recipe: Recipe) -> Step | None:
    """The step that gives the recipe its precision (its last), if any."""
    last = recipe.steps[-1] if recipe.steps else None
    return last if isinstance(last, (QuantizeStaticInt8, QuantizeDynamicInt8, CastBf16)) else None


def precision_of(recipe: Recipe) -> str:
    return {QuantizeStaticInt8: INT8_STATIC, QuantizeDynamicInt8: INT8_DYNAMIC,
            CastBf16: BF16}.get(type(precision_step(recipe)), FP32)


def export_refusal(recipe: Recipe, fmt: str) -> str | None:
    """Why ``recipe``'s variant cannot be exported as ``fmt`` and what can instead; None if it
    can."""
    if fmt not in FORMATS:
        return f"Invalid format {fmt!r}. Formats: {', '.join(FORMATS)}."
    reason = _FORMAT_REFUSALS[fmt].get(precision_of(recipe))
    return reason and reason.format(name=recipe.name, done="exported as", target=fmt)


def runtime_refusal(recipe: Recipe, runtime: str) -> str | None:
    """Why leanvgg cannot run ``recipe``'s variant on ``runtime``; None if it can. Only
    compiled recipes leave PyTorch: eager ones (the article's) run as the article ran them."""
    if not recipe.compiled:
        return f"{recipe.name} runs eagerly in PyTorch, as the article ran it"
    if runtime == OPENVINO_BF16 and not native_bf16():
        return (f"{runtime} runs what is not INT8 in bf16, which this CPU only emulates "
                "(no AVX-512 BF16 or AMX): OpenVINO's default there is f32, as openvino runs")
    reason = _FORMAT_REFUSALS[FORMAT_OF[runtime]].get(precision_of(recipe))
    return reason and reason.format(name=recipe.name, done="run on", target=runtime)
