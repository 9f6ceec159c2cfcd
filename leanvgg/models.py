"""Baselines (ImageNet, seeded random, or a user's own VGG from a file or memory, with its labels)
and VGG layouts as data."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import safetensors.torch
import torch
from torch import nn
from torchvision.models import VGG, VGG19_Weights, vgg19
from torchvision.models.vgg import cfgs, make_layers

from leanvgg.labels import IMAGENET_CATEGORIES, Labels, check_count, default_labels

log = logging.getLogger(__name__)

IMAGENET_WEIGHTS = VGG19_Weights.IMAGENET1K_V1
CATEGORIES: tuple[str, ...] = IMAGENET_CATEGORIES
RANDOM_SEED = 0
WEIGHTS_CHOICES = ("auto", "imagenet", "random")


class WeightsError(Exception):
    """The requested weights cannot be loaded; the message says what to do instead."""


ACCEPTED = ("a torchvision VGG (vgg11, vgg13, vgg16, vgg19 or their _bn forms, any number of "
            "classes) as a state dict, a checkpoint dict holding one (under 'model', "
            "'state_dict' or 'model_state_dict'), or a .safetensors file")
CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict")
# what DistributedDataParallel and torch.compile put in front of every name
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def blocks_of(cfg: list) -> tuple[int, ...]:
    """The convs per block of a VGG configuration (a block ends at each pool, "M")."""
    counts, convs = [], 0
    for entry in cfg:
        if entry == "M":
            counts.append(convs)
            convs = 0
        else:
            convs += 1
    return tuple(counts)


# torchvision's VGG configurations by the convs per block (VGG's five blocks, a pool after each)
ARCHS = {blocks_of(cfg): (name, cfg) for name, cfg in zip(("vgg11", "vgg13", "vgg16", "vgg19"),
                         (cfgs["A"], cfgs["B"], cfgs["D"], cfgs["E"]))}


@dataclass(frozen=True)
class Baseline:
    """The FP32 VGG every variant starts from, with where its weights came from, its class
    names and the input size it was trained at."""

    model: VGG
    weights: str  # what the user asked for, resolved: "imagenet", "random" or a file path
    weights_id: str  # identifies the weights' content; part of every cache key
    meaningful: bool  # False for random weights: predictions mean nothing
    labels: Labels | None = None  # None: ImageNet's for 1,000 classes, else class 0 … N-1
    input_size: int = 224  # the native input size (res160 is 160/224 of it)

    def __post_init__(self) -> None:
        if self.labels is None:
            object.__setattr__(self, "labels", default_labels(self.num_classes))
        check_count(self.labels, self.num_classes)
        if not 32 <= self.input_size <= 1024:
            raise WeightsError(f"Invalid input size {self.input_size}: it must be in 32..1024 "
                               "pixels (VGG pools five times).")

    @property
    def num_classes(self) -> int:
        return layout_of(self.model)["linear_features"][-1]

    @property
    def arch(self) -> str:
        """The torchvision name of its layout (``vgg16_bn``), or how it differs from one."""
        return arch_of(layout_of(self.model))

    @property
    def note(self) -> str:
        if self.meaningful:
            return f"weights: {self.weights}"
        return "random weights: sizes and timings are real; predictions are meaningless"

    def identity(self) -> dict:
        """What every report says of the model: architecture, classes, weights, labels."""
        return {"arch": self.arch, "classes": self.num_classes, "weights": self.weights,
                "weights_id": self.weights_id, "labels": self.labels.source,
                "input_size": self.input_size}

    def describe(self) -> str:
        """The identity in one line (the CLI's header)."""
        return (f"{self.arch}, {self.num_classes} classes ({self.labels.source} labels), "
                f"{self.input_size} px, weights {self.weights}")


def load_baseline(weights: str = "auto", *, labels: Labels | None = None,
                  input_size: int = 224, progress: bool = True, drawn: bool = True
                  ) -> Baseline:
    """Resolve a ``--weights`` value (auto, imagenet, random or a file: a state dict, a
    checkpoint holding one, or a .safetensors file) to a model.

    ``drawn=False``: random weights are not drawn (their model is on the meta device, their
    identity known): for ``builder.stored_baseline``, which maps them from the store and
    draws them (``random_model``) only where the store lacks them."""
    if weights == "random":
        baseline = _random_baseline(drawn)
    elif weights == "imagenet":
        baseline = _imagenet_baseline(progress=progress)
    elif weights == "auto":
        try:
            baseline = _imagenet_baseline(progress=progress)
        except WeightsError as err:
            log.warning("%s\nFALLING BACK TO RANDOM WEIGHTS: predictions will be meaningless.",
                        err)
            baseline = _random_baseline(drawn)
    else:
        baseline = _file_baseline(Path(weights))
    if labels is None and input_size == baseline.input_size:
        return baseline
    return dataclasses.replace(baseline, labels=labels, input_size=input_size)


def random_model(*, drawn: bool = True) -> VGG:
    """The seeded random VGG-19 of ``--weights random``; ``drawn=False``: its skeleton on the
    meta device (drawing its 143.7 M values takes a second)."""
    # PyTorch's default layer initialisation (not VGG's, which zeroes every bias) so that, like
    # trained weights, no parameter is exactly zero and non-zero counts equal the real model's.
    with torch.random.fork_rng(devices=[]), torch.device("cpu" if drawn else "meta"):
        torch.manual_seed(RANDOM_SEED)
        model = vgg19(weights=None, init_weights=False)
    return model.eval()


def _random_baseline(drawn: bool = True) -> Baseline:
    return Baseline(random_model(drawn=drawn), "random", f"random-seed{RANDOM_SEED}",
                    meaningful=False)


def _imagenet_baseline(*, progress: bool) -> Baseline:
    try:
        # torchvision downloads once into TORCH_HOME and checks the file's hash; the skeleton
        # is built on the meta device and takes the loaded tensors as they are (assign), so
        # no second of random initialisation is drawn only to be overwritten, nor copied.
        state_dict = IMAGENET_WEIGHTS.get_state_dict(progress=progress, check_hash=True)
        with torch.device("meta"):
            model = vgg19(weights=None, init_weights=False)
        model.load_state_dict(state_dict, assign=True)
    except (URLError, OSError, RuntimeError) as err:
        checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_WEIGHTS.url).name
        raise WeightsError(
            f"Cannot fetch the ImageNet VGG-19 weights ({err}). Connect to the internet, or "
            f"download {IMAGENET_WEIGHTS.url} to {checkpoint}, or pass --weights random "
            "(timings only) or --weights PATH (your own VGG's weights file)."
        ) from err
    return Baseline(model.eval(), "imagenet", "imagenet1k-v1", meaningful=True)


def baseline_of(model: VGG, name: str = "in-memory model", *, labels: Labels | None = None,
                input_size: int = 224) -> Baseline:
    """A baseline from a model in memory (any torchvision VGG layout), identified in the cache
    by its weights' content."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return Baseline(model.eval(), name, f"module-{digest.hexdigest()[:16]}", meaningful=True,
                    labels=labels, input_size=input_size)


def _file_baseline(path: Path) -> Baseline:
    if not path.is_file():
        raise WeightsError(
            f"Invalid weights {str(path)!r}: no such file. Use one of "
            f"{', '.join(WEIGHTS_CHOICES)} or the path of a weights file: {ACCEPTED}.")
    data = path.read_bytes()  # read once: the bytes hashed below are the bytes loaded
    model = vgg_from_state_dict(read_state_dict(data, str(path)), str(path))
    digest = hashlib.sha256(data).hexdigest()[:16]
    return Baseline(model.eval(), str(path), f"file-{digest}", meaningful=True)


def read_state_dict(data: bytes, where: str = "the weights") -> dict[str, torch.Tensor]:
    """The state dict in a weights file's bytes: safetensors, or ``torch.save``'d (loaded with
    ``weights_only``: a pickle that would run code is refused), bare or inside a checkpoint."""
    if data[8:9] == b"{" and len(data) >= 8 + int.from_bytes(data[:8], "little"):
        try:
            return safetensors.torch.load(data)
        except Exception as err:  # safetensors raises its own error types for a bad header
            raise WeightsError(f"{where!r} is not a valid safetensors file "
                               f"({_first_line(err)}).") from None
    try:
        found = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"unsupported global:? (?:GLOBAL )?[\w.]+", str(err), flags=re.I)
        if found is None:
            raise WeightsError(f"{where!r} is not a PyTorch weights file "
                               f"({_first_line(err)}).") from None
        raise WeightsError(f"{where!r} was refused by torch.load(weights_only=True): it holds "
                           "objects other than tensors and plain containers, which could run "
                           f"code when loaded ({found.group(0)}). Save the state dict alone "
                           "(torch.save(model.state_dict(), path)) or use safetensors.") from None
    except Exception as err:  # torch.load raises many types for a bad file; all mean the same
        raise WeightsError(f"{where!r} is not a PyTorch weights file "
                           f"({_first_line(err)}).") from None
    return _state_dict_in(found, where)


def _first_line(err: Exception) -> str:
    lines = (line.strip() for line in str(err).splitlines() if line.strip())
    return next(lines, type(err).__name__)


def _state_dict_in(found: object, where: str) -> dict[str, torch.Tensor]:
    def tensors(value: object) -> bool:
        return (isinstance(value, dict) and bool(value)
                and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                        for k, v in value.items()))

    if not tensors(found) and isinstance(found, dict):
        held = [k for k in CHECKPOINT_KEYS if tensors(found.get(k))]
        if held:
            found = found[held[0]]
    if not tensors(found):
        what = (f"a dict with keys {sorted(map(str, found))[:6]}" if isinstance(found, dict)
                else f"a {type(found).__name__}")
        raise WeightsError(f"{where!r} holds {what}, not a model's weights. Accepted: "
                           f"{ACCEPTED}.")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in found):
            found = {k[len(prefix):]: v for k, v in found.items()}
    return found


def vgg_from_state_dict(state_dict: dict[str, torch.Tensor], where: str = "the weights") -> VGG:
    """The torchvision VGG these tensors are the weights of: its layout read from their names
    and shapes (convs, BatchNorm, pools between blocks, classifier widths), then loaded
    strictly. Anything else is refused in one line naming what was found."""
    layout = _layout_of_tensors(state_dict, where)
    model = from_layout(layout)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        raise WeightsError(f"{where!r} is a VGG whose tensors do not fit together: "
                           f"{(lines or [str(err)])[0]}") from None
    return model.eval()


def _layout_of_tensors(state_dict: dict[str, torch.Tensor], where: str) -> dict:
    def refuse(found: str) -> WeightsError:
        return WeightsError(f"{where!r} is not a torchvision VGG: {found}. Accepted: {ACCEPTED}.")

    convs, norms = {}, set()
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit():
            if parts[2] == "weight" and tensor.dim() == 4:
                convs[int(parts[1])] = tensor.shape
            elif parts[2] == "running_mean":
                norms.add(int(parts[1]))
    names = sorted({key.split(".")[0] for key in state_dict})
    if not convs:
        raise refuse(f"no features.N conv weights (top-level names: {names[:8]})")
    step = 3 if norms else 2  # conv, (BatchNorm,) ReLU
    cfg: list[int | str] = []
    expected = 0
    for index in sorted(convs):
        if index == expected + 1 and cfg:  # one more module between: a pool ends the block
            cfg.append("M")
            expected += 1
        if index != expected or (norms and index + 1 not in norms):
            raise refuse(f"a conv at features.{index} where torchvision's layout has "
                         f"{'a conv' if index != expected else 'its BatchNorm next'} at "
                         f"features.{expected if index != expected else index + 1}")
        cfg.append(int(convs[index][0]))
        expected = index + step
    cfg.append("M")
    blocks = blocks_of(cfg)
    if blocks not in ARCHS:
        raise refuse(f"{sum(blocks)} convs in blocks of {list(blocks)}, which no torchvision "
                     f"VGG has ({', '.join(f'{n}: {list(b)}' for b, (n, _) in ARCHS.items())})")
    linears = [state_dict.get(f"classifier.{i}.weight") for i in (0, 3, 6)]
    if any(w is None or w.dim() != 2 for w in linears):
        raise refuse(f"no classifier.0/3/6 Linear weights (classifier names: "
                     f"{sorted(k for k in state_dict if k.startswith('classifier'))[:6]})")
    dims = [int(linears[0].shape[1]), *(int(w.shape[0]) for w in linears)]
    if dims[0] != cfg[-2] * 7 * 7:
        raise WeightsError(f"{where!r} is a VGG whose tensors do not fit together: "
                           f"classifier.0 takes {dims[0]} inputs, but the last conv's "
                           f"{cfg[-2]} channels pooled to 7×7 give {cfg[-2] * 49}.")
    return {"arch": "vgg", "cfg": cfg, "batch_norm": bool(norms), "linear_features": dims}


def arch_of(layout: dict) -> str:
    """``vgg16_bn`` for torchvision's layouts; the nearest name and what differs otherwise
    (pruned, narrower or factorised models)."""
    cfg = layout["cfg"]
    blocks = blocks_of(cfg)
    name, reference = ARCHS.get(blocks, (f"vgg ({sum(blocks)} convs)", None))
    name += "_bn" if layout["batch_norm"] else ""
    if reference is not None and list(reference) == list(cfg) and \
            layout["linear_features"][1:3] == [4096, 4096] and not layout.get("ranks"):
        return name
    return f"{name} (custom widths)"


def layout_of(model: VGG) -> dict:
    """The architecture of a (possibly pruned or factorised) VGG as JSON-able data, enough to
    rebuild it. ``ranks`` (only when some classifier Linear is factorised, see
    ``leanvgg.lowrank``) maps a classifier position to its inner width."""
    cfg: list[int | str] = []
    batch_norm = False
    for module in model.features:
        if isinstance(module, nn.Conv2d):
            cfg.append(module.out_channels)
        elif isinstance(module, nn.MaxPool2d):
            cfg.append("M")
        elif isinstance(module, nn.BatchNorm2d):
            batch_norm = True
    dims: list[int] = []
    ranks: dict[str, int] = {}
    for position, module in enumerate(model.classifier):
        halves = list(module) if isinstance(module, nn.Sequential) else [module]
        if not hasattr(halves[0], "in_features"):
            continue
        if len(halves) == 2:
            ranks[str(position)] = halves[0].out_features
        dims = dims or [halves[0].in_features]
        dims.append(halves[-1].out_features)
    layout = {"arch": "vgg", "cfg": cfg, "batch_norm": batch_norm, "linear_features": dims}
    return {**layout, "ranks": ranks} if ranks else layout


def from_layout(layout: dict, *, materialized: bool = True) -> VGG:
    """A zero-filled VGG with exactly the given layout, ready for ``load_state_dict``;
    ``materialized=False``: its tensors left on the meta device (no memory, no time), for
    ``load_state_dict(assign=True)`` to put the loaded ones in their place."""
    features = [int(c) if c != "M" else "M" for c in layout["cfg"]]
    dims = layout["linear_features"]
    ranks = {int(k): int(v) for k, v in layout.get("ranks", {}).items()}
    with torch.device("meta"):  # skip initialising weights that are about to be overwritten
        model = VGG(make_layers(features, batch_norm=layout["batch_norm"]), num_classes=dims[-1],
                    init_weights=False)
        for position, (d_in, d_out) in zip((0, 3, 6), zip(dims, dims[1:])):
            rank = ranks.get(position)
            model.classifier[position] = nn.Linear(d_in, d_out) if rank is None else (
                nn.Sequential(nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out)))
    if not materialized:
        return model.eval()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    return model.eval()
