"""The named variants as data: each recipe is a list of pure steps plus an input size."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar, Protocol

from torch import nn

from leanvgg.prune import VGG19_DEEP_CONVS, prune_filters
from leanvgg.quantize import quantize_dynamic_int8

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

    def apply(self, model: nn.Module) -> tuple[nn.Module, dict]:
        pruned, report = prune_filters(model, ratio=self.ratio, layers=self.layers)
        return pruned, {"pruning": [layer.to_dict() for layer in report], "fine_tuned": False}

    def skeleton(self, model: nn.Module) -> nn.Module:
        return model  # the stored layout already has the pruned channel counts

    def to_json(self) -> dict:
        return {"op": "prune", "criterion": "l2_norm", "ratio": self.ratio,
                "layers": list(self.layers)}


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


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe("baseline", "torchvision VGG-19, FP32"),
        Recipe("pruned", "10% lowest-L2 filters of the 9 deepest convs removed (+ fine-tuning)",
               steps=(Prune(), FineTune())),
        Recipe("quantized", "dynamic INT8 of the 3 Linear layers", steps=(QuantizeDynamicInt8(),)),
        Recipe("pruned_quantized", "pruned (+ fine-tuning), then dynamic INT8 Linear layers",
               steps=(Prune(), FineTune(), QuantizeDynamicInt8())),
        Recipe("res160", "the baseline's weights fed 160×160 inputs", input_size=160),
    )
}
