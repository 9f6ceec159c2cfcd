"""The named variants as data: each recipe is a list of pure steps plus an input size."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import ClassVar, Protocol

from torch import nn

from leanvgg.data import calibration_batch, calibration_digest
from leanvgg.prune import VGG19_DEEP_CONVS, prune_filters
from leanvgg.quantize import quantize_dynamic_int8, quantize_static_int8, static_int8_skeleton
from leanvgg.runtime import to_bf16

ARTIFACT_FORMAT = 1  # bump when the meaning of a stored artifact changes


class Step(Protocol):
    # True: `build` runs `apply` when the artifact is missing. False: the artifact comes from a
    # command of its own (fine-tuning needs data and minutes); while it is missing the step is
    # skipped and the variant says so.
    automatic: bool

    def apply(self, model: nn.Module) -> tuple[nn.Module, dict]:
        """Automatic steps only: a new model (the input untouched) and the facts it establishes."""

    def skeleton(self, model: nn.Module) -> nn.Module:
        """The module structure ``apply`` produces, for loading a stored state dict into."""

    def to_json(self) -> dict:
        """Everything that determines the result; part of the cache key."""


@dataclass(frozen=True)
class Prune:
    """Structured L2-norm filter pruning; the smaller layout is stored with the artifact."""

    automatic: ClassVar[bool] = True
    ratio: float = 0.10
    layers: tuple[int, ...] = VGG19_DEEP_CONVS
    multiple_of: int = 1

    def apply(self, model: nn.Module) -> tuple[nn.Module, dict]:
        pruned, report = prune_filters(model, ratio=self.ratio, layers=self.layers,
                                       multiple_of=self.multiple_of)
        return pruned, {"pruning": [layer.to_dict() for layer in report], "fine_tuned": False}

    def skeleton(self, model: nn.Module) -> nn.Module:
        return model  # the stored layout already has the pruned channel counts

    def to_json(self) -> dict:
        spec = {"op": "prune", "criterion": "l2_norm", "ratio": self.ratio,
                "layers": list(self.layers)}
        return spec if self.multiple_of == 1 else {**spec, "multiple_of": self.multiple_of}


@dataclass(frozen=True)
class QuantizeDynamicInt8:
    """Dynamic INT8 of every Linear layer; needs no calibration, so skeleton == apply."""

    automatic: ClassVar[bool] = True

    def apply(self, model: nn.Module) -> tuple[nn.Module, dict]:
        return quantize_dynamic_int8(model), {"quantization": "dynamic int8 (Linear layers)"}

    def skeleton(self, model: nn.Module) -> nn.Module:
        return quantize_dynamic_int8(model)

    def to_json(self) -> dict:
        return {"op": "quantize_dynamic_int8", "backend": "torch.ao", "dtype": "qint8"}


@dataclass(frozen=True)
class QuantizeStaticInt8:
    """Static INT8 of convs and Linears (PT2E), calibrated on real photos at the input size.

    ``calibration`` is a folder of images; None means the photos shipped with leanvgg.
    """

    automatic: ClassVar[bool] = True
    input_size: int = 224
    calibration: str | None = None

    def apply(self, model: nn.Module) -> tuple[nn.Module, dict]:
        start = time.perf_counter()
        batch = calibration_batch(self.input_size, self.calibration)
        quantized = quantize_static_int8(model, batch)
        return quantized, {
            "quantization": "static int8 (convs + Linear; PT2E, X86InductorQuantizer)",
            "calibration": {"images": len(batch), "source": self.calibration or "bundled photos",
                            "seconds": round(time.perf_counter() - start, 1)}}

    def skeleton(self, model: nn.Module) -> nn.Module:
        return static_int8_skeleton(model, self.input_size)

    def to_json(self) -> dict:
        # v2: the views are taken from the centre square that decoding keeps (leanvgg.images)
        source = ("bundled-photos-v2" if self.calibration is None
                  else f"folder-sha256:{calibration_digest(self.calibration)}")
        return {"op": "quantize_static_int8", "backend": "torchao.pt2e x86_inductor",
                "input_size": self.input_size, "calibration": source}


@dataclass(frozen=True)
class CastBf16:
    """bf16 weights and activations, channels-last."""

    automatic: ClassVar[bool] = True

    def apply(self, model: nn.Module) -> tuple[nn.Module, dict]:
        return to_bf16(model), {"precision": "bf16"}

    def skeleton(self, model: nn.Module) -> nn.Module:
        return to_bf16(model)

    def to_json(self) -> dict:
        return {"op": "cast", "dtype": "bfloat16", "memory_format": "channels_last"}


@dataclass(frozen=True)
class FineTune:
    """Recovery training, produced by ``leanvgg finetune`` (see ``variants.finetune_variant``).

    Its key names no data or hyper-parameters: the artifact is the latest fine-tuning result,
    and its manifest records how it was made.
    """

    automatic: ClassVar[bool] = False

    def skeleton(self, model: nn.Module) -> nn.Module:
        return model

    def to_json(self) -> dict:
        return {"op": "finetune", "loss": "grouped-nll"}


def artifact_key(previous: str | None, step: dict | None = None, *,
                 weights_id: str | None = None) -> str:
    """Chained keys: the weights' key, then one key per step applied on top of the previous."""
    spec = {"format": ARTIFACT_FORMAT, "previous": previous, "step": step, "weights": weights_id}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    steps: tuple[Step, ...] = ()
    input_size: int = 224
    article: bool = False  # one of the five variants of the article leanvgg started from
    compiled: bool = False  # run under torch.compile (see leanvgg.runtime)
    needs_native_bf16: bool = False  # emulated bf16 is slower than FP32: opt-in elsewhere


# Kept filters rounded down to multiples of 16 (256→224, 512→448): whole kernel blocks.
_TURBO_PRUNE = Prune(multiple_of=16)

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe("baseline", "torchvision VGG-19, FP32", article=True),
        Recipe("pruned", "10% lowest-L2 filters of the 9 deepest convs removed (+ fine-tuning)",
               steps=(Prune(), FineTune()), article=True),
        Recipe("quantized", "dynamic INT8 of the 3 Linear layers", steps=(QuantizeDynamicInt8(),),
               article=True),
        Recipe("pruned_quantized", "pruned (+ fine-tuning), then dynamic INT8 Linear layers",
               steps=(Prune(), FineTune(), QuantizeDynamicInt8()), article=True),
        Recipe("res160", "the baseline's weights fed 160×160 inputs", input_size=160,
               article=True),
        Recipe("int8_static", "static INT8 convs and Linears, calibrated on photos, compiled",
               steps=(QuantizeStaticInt8(),), compiled=True),
        Recipe("bf16", "bf16 weights and activations, channels-last, compiled",
               steps=(CastBf16(),), compiled=True, needs_native_bf16=True),
        Recipe("turbo", "pruned to 16-channel blocks (+ fine-tuning), static INT8, compiled",
               steps=(_TURBO_PRUNE, FineTune(), QuantizeStaticInt8()), compiled=True),
        Recipe("turbo160", "turbo calibrated for and fed 160×160 inputs",
               steps=(_TURBO_PRUNE, FineTune(), QuantizeStaticInt8(input_size=160)),
               input_size=160, compiled=True),
    )
}


def tuned_recipe(config: dict) -> Recipe:
    """The recipe of a candidate chosen by ``leanvgg tune`` (see ``leanvgg.tune``)."""
    chosen = config["candidate"]
    steps: list[Step] = []
    if chosen["prune_ratio"] > 0:
        steps.append(Prune(ratio=chosen["prune_ratio"], layers=tuple(config["layers"]),
                           multiple_of=config["multiple_of"]))
        if chosen["fine_tuned"]:
            steps.append(FineTune())
    if chosen["precision"] == "int8":
        steps.append(QuantizeStaticInt8(input_size=chosen["resolution"]))
    elif chosen["precision"] == "bf16":
        steps.append(CastBf16())
    return Recipe("tuned", f"fastest within {config['max_drop']:g} accuracy points "
                  f"({config['key']}), chosen by leanvgg tune", tuple(steps),
                  input_size=chosen["resolution"], compiled=chosen["precision"] != "fp32")
