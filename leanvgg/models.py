"""Baseline loading (ImageNet, seeded random or a local file) and VGG layouts as data."""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn
from torchvision.models import VGG, VGG19_Weights, vgg19
from torchvision.models.vgg import make_layers

log = logging.getLogger(__name__)

IMAGENET_WEIGHTS = VGG19_Weights.IMAGENET1K_V1
CATEGORIES: list[str] = IMAGENET_WEIGHTS.meta["categories"]
RANDOM_SEED = 0
WEIGHTS_CHOICES = ("auto", "imagenet", "random")


class WeightsError(Exception):
    """The requested weights cannot be loaded; the message says what to do instead."""


@dataclass(frozen=True)
class Baseline:
    """The FP32 VGG-19 every variant starts from, with where its weights came from."""

    model: VGG
    weights: str  # what the user asked for, resolved: "imagenet", "random" or a file path
    weights_id: str  # identifies the weights' content; part of every cache key
    meaningful: bool  # False for random weights: predictions mean nothing

    @property
    def note(self) -> str:
        if self.meaningful:
            return f"weights: {self.weights}"
        return "random weights: sizes and timings are real; predictions are meaningless"


def load_baseline(weights: str = "auto", *, progress: bool = True) -> Baseline:
    """Resolve a ``--weights`` value (auto, imagenet, random or a state-dict path) to a model."""
    if weights == "random":
        return _random_baseline()
    if weights == "imagenet":
        return _imagenet_baseline(progress=progress)
    if weights == "auto":
        try:
            return _imagenet_baseline(progress=progress)
        except WeightsError as err:
            log.warning("%s\nFALLING BACK TO RANDOM WEIGHTS: predictions will be meaningless.", err)
            return _random_baseline()
    return _file_baseline(Path(weights))


def _random_baseline() -> Baseline:
    # PyTorch's default layer initialisation (not VGG's, which zeroes every bias) so that, like
    # trained weights, no parameter is exactly zero and non-zero counts equal the real model's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = vgg19(weights=None, init_weights=False)
    return Baseline(model.eval(), "random", f"random-seed{RANDOM_SEED}", meaningful=False)


def _imagenet_baseline(*, progress: bool) -> Baseline:
    try:
        # torchvision downloads once into TORCH_HOME and checks the file's hash.
        model = vgg19(weights=IMAGENET_WEIGHTS, progress=progress)
    except (URLError, OSError, RuntimeError) as err:
        checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_WEIGHTS.url).name
        raise WeightsError(
            f"Cannot fetch the ImageNet VGG-19 weights ({err}). Connect to the internet, or "
            f"download {IMAGENET_WEIGHTS.url} to {checkpoint}, or pass --weights random "
            "(timings only) or --weights PATH (a local VGG-19 state dict)."
        ) from err
    return Baseline(model.eval(), "imagenet", "imagenet1k-v1", meaningful=True)


def baseline_of(model: VGG, name: str = "in-memory model") -> Baseline:
    """A baseline from a model in memory (any torchvision VGG layout), identified in the cache
    by its weights' content."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return Baseline(model.eval(), name, f"module-{digest.hexdigest()[:16]}", meaningful=True)


def _file_baseline(path: Path) -> Baseline:
    if not path.is_file():
        raise WeightsError(
            f"Invalid weights {str(path)!r}: no such file. Use one of "
            f"{', '.join(WEIGHTS_CHOICES)} or the path of a VGG-19 state-dict file."
        )
    try:
        data = path.read_bytes()  # read once: the bytes hashed below are the bytes loaded
        state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a bad file; all mean the same
        raise WeightsError(f"{str(path)!r} is not a PyTorch state-dict file ({err}).") from err
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise WeightsError(f"{str(path)!r} does not hold a state dict (a dict of tensors).")
    model = vgg19(weights=None, init_weights=False)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        first = str(err).splitlines()[1:2] or [str(err)]
        raise WeightsError(
            f"{str(path)!r} is not a torchvision VGG-19 state dict: {first[0].strip()}"
        ) from err
    digest = hashlib.sha256(data).hexdigest()[:16]
    return Baseline(model.eval(), str(path), f"file-{digest}", meaningful=True)


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


def from_layout(layout: dict) -> VGG:
    """A zero-filled VGG with exactly the given layout, ready for ``load_state_dict``."""
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
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    return model.eval()
