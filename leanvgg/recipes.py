"""The named variants as data: each recipe is a list of pure steps plus an input size."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from torch import nn

from leanvgg.context import INDUCTOR
from leanvgg.data import calibration_batch, calibration_digest
from leanvgg.lowrank import factorize
from leanvgg.prune import VGG19_HIDDEN_LINEARS, deep_convs, prune_filters, prune_neurons
from leanvgg.quantize import (dynamic_int8_skeleton, quantize_dynamic_int8,
                              quantize_static_int8, static_int8_skeleton)
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
    """Structured L2-norm filter pruning; the smaller layout is stored with the artifact.

    ``layers`` None: the article's rule, the last conv of block 3 and every conv of blocks 4
    and 5 (``prune.deep_convs``), filled in for the model at hand by ``bind``.
    """

    automatic: ClassVar[bool] = True
    ratio: float = 0.10
    layers: tuple[int, ...] | None = None
    multiple_of: int = 1

    def apply(self, model: nn.Module) -> tuple[nn.Module, dict]:
        layers = self.layers if self.layers is not None else deep_convs(model)
        pruned, report = prune_filters(model, ratio=self.ratio, layers=layers,
                                       multiple_of=self.multiple_of)
        return pruned, {"pruning": [layer.to_dict() for layer in report], "fine_tuned": False}

    def skeleton(self, model: nn.Module) -> nn.Module:
        return model  # the stored layout already has the pruned channel counts

    def to_json(self) -> dict:
        if self.layers is None:
            raise ValueError("Prune(layers=None) names its convs once bound to a model "
                             "(recipes.bind).")
        spec = {"op": "prune", "criterion": "l2_norm", "ratio": self.ratio,
                "layers": list(self.layers)}
        return spec if self.multiple_of == 1 else {**spec, "multiple_of": self.multiple_of}


@dataclass(frozen=True)
class PruneNeurons:
    """Neuron pruning of the classifier's hidden Linears by L2 norm (the next layer follows)."""

    automatic: ClassVar[bool] = True
    ratio: float = 0.5
    layers: tuple[int, ...] = VGG19_HIDDEN_LINEARS
    multiple_of: int = 1

    def apply(self, model: nn.Module) -> tuple[nn.Module, dict]:
        pruned, report = prune_neurons(model, ratio=self.ratio, layers=self.layers,
                                       multiple_of=self.multiple_of)
        return pruned, {"neuron_pruning": [layer.to_dict() for layer in report],
                        "fine_tuned": False}

    def skeleton(self, model: nn.Module) -> nn.Module:
        return model  # the stored layout has the pruned widths

    def to_json(self) -> dict:
        spec = {"op": "prune_neurons", "criterion": "l2_norm", "ratio": self.ratio,
                "layers": list(self.layers)}
        return spec if self.multiple_of == 1 else {**spec, "multiple_of": self.multiple_of}


@dataclass(frozen=True)
class LowRank:
    """Truncated-SVD factorisation of ``classifier[layer]`` into two Linears of width ``rank``.

    ``rank`` None: ``share`` of the layer's smaller dimension, filled in for the model at hand
    by ``bind`` (1/4 of VGG-19's 4,096 is Fast R-CNN's 1,024; a user's narrower head keeps the
    same proportion).
    """

    automatic: ClassVar[bool] = True
    rank: int | None = 256
    layer: int = 0
    share: float | None = None

    def apply(self, model: nn.Module) -> tuple[nn.Module, dict]:
        rank = self.bound(model).rank
        factorised, energy = factorize(model, rank=rank, layer=self.layer)
        return factorised, {
            "low_rank": [{"layer": self.layer, "rank": rank, "retained_energy": energy}],
            "fine_tuned": False}

    def bound(self, model: nn.Module) -> LowRank:
        """This step with its rank for ``model`` (itself when the rank is given)."""
        if self.rank is not None:
            return self
        linear = model.classifier[self.layer]
        width = min(linear.in_features, linear.out_features)
        return dataclasses.replace(self, rank=max(1, round(width * self.share)), share=None)

    def skeleton(self, model: nn.Module) -> nn.Module:
        return model  # the stored layout records the factorised layer's rank

    def to_json(self) -> dict:
        if self.rank is None:
            raise ValueError("LowRank(rank=None) names its rank once bound to a model "
                             "(recipes.bind).")
        return {"op": "low_rank", "method": "truncated_svd", "layer": self.layer,
                "rank": self.rank}


@dataclass(frozen=True)
class QuantizeDynamicInt8:
    """Dynamic INT8 of every Linear layer; needs no calibration."""

    automatic: ClassVar[bool] = True

    def apply(self, model: nn.Module) -> tuple[nn.Module, dict]:
        return quantize_dynamic_int8(model), {"quantization": "dynamic int8 (Linear layers)"}

    def skeleton(self, model: nn.Module) -> nn.Module:
        return dynamic_int8_skeleton(model)

    def to_json(self) -> dict:
        return {"op": "quantize_dynamic_int8", "backend": "torch.ao", "dtype": "qint8"}


@dataclass(frozen=True)
class QuantizeStaticInt8:
    """Static INT8 of convs and Linears (PT2E), calibrated on real photos at the input size.

    ``calibration`` is a folder of images or a file of preprocessed tensors (see
    ``data.calibration_batch``); None means the photos shipped with leanvgg.
    """

    automatic: ClassVar[bool] = True
    input_size: int = 224
    calibration: str | None = None
    # the calibration source as the cache key names it: a folder is hashed once, here, not on
    # every to_json() (the server lists variants every second)
    source: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # v2: the views are taken from the centre square that decoding keeps (leanvgg.images)
        object.__setattr__(self, "source", "bundled-photos-v2" if self.calibration is None
                           else f"{'folder' if Path(self.calibration).is_dir() else 'file'}-"
                                f"sha256:{calibration_digest(self.calibration)}")

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
        return {"op": "quantize_static_int8", "backend": "torchao.pt2e x86_inductor",
                "input_size": self.input_size, "calibration": self.source}


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
    """Recovery training, made by a command of its own (``leanvgg finetune``, or ``leanvgg
    tune`` for its candidates) and stored as this step's artifact.

    Without ``data`` its key names no data or hyper-parameters: the artifact is the latest
    ``leanvgg finetune`` result, and its manifest records how it was made. ``tune``'s candidates
    name their data and settings, so each search's training is its own cache entry.
    """

    automatic: ClassVar[bool] = False
    data: str | None = None
    lr: float | None = None
    epochs: int | None = None
    seed: int = 0
    input_size: int = 224  # the resolution it trains at
    # "grouped-nll": CIFAR-10 classes as groups of ImageNet's (1,000-class models);
    # "cross-entropy": the model's own classes. None: by the model's classes (``bind``).
    loss: str | None = None

    def skeleton(self, model: nn.Module) -> nn.Module:
        return model

    def to_json(self) -> dict:
        if self.loss is None:
            raise ValueError("FineTune(loss=None) names its loss once bound to a model "
                             "(recipes.bind).")
        spec = {"op": "finetune", "loss": self.loss}
        if self.data is None:
            return spec
        return {**spec, "data": self.data, "lr": self.lr, "epochs": self.epochs,
                "seed": self.seed, "input_size": self.input_size}


def merge_facts(facts: dict, new: dict) -> dict:
    """The facts after one more step: its own replace the earlier ones, except reports that are
    lists (one entry per layer), which add up: two factorisations report both layers."""
    return {**facts, **new, **{key: facts[key] + value for key, value in new.items()
                               if isinstance(value, list) and isinstance(facts.get(key), list)}}


def skeleton_step(spec: dict) -> Step:
    """A step rebuilt from its ``to_json()``, enough for its ``skeleton`` (the module structure
    it produces): how an export is loaded without the data or files that made it."""
    op = spec.get("op")
    if op == "prune":
        return Prune(spec["ratio"], tuple(spec["layers"]), spec.get("multiple_of", 1))
    if op == "prune_neurons":
        return PruneNeurons(spec["ratio"], tuple(spec["layers"]), spec.get("multiple_of", 1))
    if op == "low_rank":
        return LowRank(spec["rank"], spec["layer"])
    if op == "quantize_dynamic_int8":
        return QuantizeDynamicInt8()
    if op == "quantize_static_int8":
        return QuantizeStaticInt8(input_size=spec["input_size"])
    if op == "cast":
        return CastBf16()
    if op == "finetune":
        return FineTune(loss=spec.get("loss"))
    raise ValueError(f"Invalid step {spec!r}: not one leanvgg makes.")


def finetune_loss(model: nn.Module) -> str:
    """The recovery loss for a model: ImageNet's 1,000 classes are trained on CIFAR-10 as
    groups of them; a model with its own classes on its own labelled images."""
    return "grouped-nll" if model.classifier[-1].out_features == 1000 else "cross-entropy"


def bind(recipe: Recipe, model: nn.Module) -> Recipe:
    """The recipe with what depends on the model's layout filled in (the convs ``Prune``
    removes filters from, the rank of a ``LowRank`` given as a share, the loss of
    ``FineTune``); a bound recipe is returned unchanged."""
    steps = tuple(
        dataclasses.replace(step, layers=deep_convs(model))
        if isinstance(step, Prune) and step.layers is None else
        step.bound(model) if isinstance(step, LowRank) else
        dataclasses.replace(step, loss=finetune_loss(model))
        if isinstance(step, FineTune) and step.loss is None else step
        for step in recipe.steps)
    return recipe if steps == recipe.steps else dataclasses.replace(recipe, steps=steps)


def at_input_size(recipe: Recipe, native: int) -> Recipe:
    """A registered recipe for a model trained at ``native`` pixels instead of 224: every
    size (the input, calibration, training) scaled by native/224, so res160 is 160/224 of it."""
    if native == 224:
        return recipe

    def size(value: int) -> int:
        return max(32, round(value * native / 224))

    steps = tuple(dataclasses.replace(step, input_size=size(step.input_size))
                  if isinstance(step, (QuantizeStaticInt8, FineTune)) else step
                  for step in recipe.steps)
    return dataclasses.replace(recipe, steps=steps, input_size=size(recipe.input_size))


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
    # the runtime it must run on whatever --runtime says (tune measured its accuracy and
    # latency there, so its budget holds there only); None: --runtime decides
    runtime: str | None = None


PRECISIONS = ("fp32", "bf16", "int8")


def precision_steps(precision: str, input_size: int = 224,
                    calibration: str | None = None) -> tuple[Step, ...]:
    """The steps that give a float model its precision; the only place this mapping exists."""
    if precision == "int8":
        return (QuantizeStaticInt8(input_size=input_size, calibration=calibration),)
    if precision == "bf16":
        return (CastBf16(),)
    if precision == "fp32":
        return ()
    raise ValueError(f"Invalid precision {precision!r}. Choose from {', '.join(PRECISIONS)}.")


# Kept filters rounded down to multiples of 16 (256→224, 512→448): whole kernel blocks.
_TURBO_PRUNE = Prune(multiple_of=16)
# fc6 (classifier.0) to a quarter of its width, fc7 (classifier.3) to a sixteenth: at batch 1
# the classifier's weights stream from memory on every image (Girshick, Fast R-CNN, 2015, §3.1:
# these ranks cost VGG-16 0.3 mAP)
_CLASSIFIER_SVD = (LowRank(rank=None, layer=0, share=1 / 4), LowRank(rank=None, layer=3,
                                                                     share=1 / 16))

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe("baseline", "the VGG as given, FP32", article=True),
        Recipe("pruned", "10% lowest-L2 filters removed from the last conv of block 3 and all "
               "of blocks 4-5 (+ fine-tuning)",
               steps=(Prune(), FineTune()), article=True),
        Recipe("quantized", "dynamic INT8 of the 3 Linear layers", steps=(QuantizeDynamicInt8(),),
               article=True),
        Recipe("pruned_quantized", "pruned (+ fine-tuning), then dynamic INT8 Linear layers",
               steps=(Prune(), FineTune(), QuantizeDynamicInt8()), article=True),
        Recipe("res160", "the baseline's weights fed 160×160 inputs", input_size=160,
               article=True),
        Recipe("int8_static", "static INT8 convs and Linears, calibrated on photos, compiled",
               steps=precision_steps("int8"), compiled=True),
        Recipe("bf16", "bf16 weights and activations, channels-last, compiled",
               steps=precision_steps("bf16"), compiled=True, needs_native_bf16=True),
        Recipe("turbo", "pruned to 16-channel blocks (+ fine-tuning), static INT8, compiled",
               steps=(_TURBO_PRUNE, FineTune(), *precision_steps("int8")), compiled=True),
        Recipe("turbo160", "turbo calibrated for and fed 160×160 inputs",
               steps=(_TURBO_PRUNE, FineTune(), *precision_steps("int8", 160)),
               input_size=160, compiled=True),
        Recipe("turbo_svd", "turbo with fc6 and fc7 factorised by truncated SVD (Fast R-CNN's "
               "ranks 1,024 and 256 on a 4,096-wide head) before fine-tuning: under a third "
               "of turbo's classifier weights",
               steps=(_TURBO_PRUNE, *_CLASSIFIER_SVD, FineTune(), *precision_steps("int8")),
               compiled=True),
    )
}


@dataclass(frozen=True)
class Candidate:
    """A point of ``leanvgg tune``'s search space; ``recipe`` turns it into steps."""

    prune_ratio: float
    precision: str  # fp32 | bf16 | int8
    resolution: int
    fine_tuned: bool = False
    neuron_ratio: float = 0.0  # share of the classifier's hidden neurons removed
    rank: int = 0  # classifier.0 factorised to this inner width (0: not factorised)

    @property
    def key(self) -> str:
        return (f"prune{self.prune_ratio:g}-{self.precision}-{self.resolution}px"
                + (f"-neurons{self.neuron_ratio:g}" if self.neuron_ratio else "")
                + (f"-rank{self.rank}" if self.rank else "")
                + ("-finetuned" if self.fine_tuned else ""))

    @property
    def compressed(self) -> bool:
        """Whether anything is removed or factorised (and so could be recovered by training)."""
        return bool(self.prune_ratio or self.neuron_ratio or self.rank)

    def recipe(self, name: str, description: str, *, layers: Sequence[int],
               multiple_of: int = 1, finetune: FineTune | None = None,
               calibration: str | None = None) -> Recipe:
        """Structure first (filters, neurons, rank), then recovery, then precision.

        ``layers``: the convs pruned at ``prune_ratio`` (tune's sensitivity analysis picks
        them); ``finetune``: the training that makes ``fine_tuned`` candidates.
        """
        steps: list[Step] = []
        if self.prune_ratio > 0 and layers:
            steps.append(Prune(ratio=self.prune_ratio, layers=tuple(layers),
                               multiple_of=multiple_of))
        if self.neuron_ratio > 0:
            steps.append(PruneNeurons(ratio=self.neuron_ratio, multiple_of=multiple_of))
        if self.rank:
            steps.append(LowRank(rank=self.rank))
        if self.fine_tuned:
            if finetune is None:
                raise ValueError(f"{self.key} is fine-tuned: say how (data, lr, epochs).")
            steps.append(finetune)
        steps += precision_steps(self.precision, self.resolution, calibration)
        return Recipe(name, description, tuple(steps), input_size=self.resolution,
                      compiled=self.precision != "fp32")


def tuned_recipe(config: dict) -> Recipe:
    """The recipe of the candidate ``leanvgg tune`` chose (``tune.tuned_config``): the very
    recipe the search built and measured, so it names the same cache entries."""
    candidate = Candidate(**config["candidate"])
    recipe = candidate.recipe(
        "tuned", f"fastest within {config['max_drop']:g} accuracy points ({candidate.key}), "
        "chosen by leanvgg tune", layers=config["layers"], multiple_of=config["multiple_of"],
        finetune=FineTune(**config["finetune"]) if config.get("finetune") else None,
        calibration=config.get("calibration"))
    # tune measured its accuracy and latency on Inductor (PT2E INT8): its budget holds there,
    # not for another runtime's own quantization, so it runs there whatever --runtime says
    return dataclasses.replace(recipe, runtime=INDUCTOR if recipe.compiled else None)
