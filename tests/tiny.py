"""A VGG-19-shaped model small enough to train in seconds, and tiny CIFAR-10 folders."""

import pickle
from pathlib import Path

import numpy as np
import torch

from leanvgg.models import Baseline, from_layout

# VGG-19's configuration with every width divided by 16: the same layer indices (the pruned
# convs sit at features 16, 19, …, 34), so every recipe applies unchanged.
TINY_LAYOUT = {"arch": "vgg", "batch_norm": False,
               "cfg": [4, 4, "M", 8, 8, "M", 16, 16, 16, 16, "M", 32, 32, 32, 32, "M",
                       32, 32, 32, 32, "M"],
               "linear_features": [32 * 7 * 7, 64, 64, 1000]}


def tiny_vgg(seed: int = 0, dropout: bool = True):
    torch.manual_seed(seed)
    model = from_layout(TINY_LAYOUT)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    if not dropout:
        for i, module in enumerate(model.classifier):
            if isinstance(module, torch.nn.Dropout):
                model.classifier[i] = torch.nn.Identity()
    return model.eval()


def tiny_baseline(seed: int = 0) -> Baseline:
    return Baseline(tiny_vgg(seed), "tiny", f"tiny-seed{seed}", meaningful=False)


def write_cifar(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    """A CIFAR-10 folder in the python-batches layout; each class has its own colour pattern."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for batch in batches:
        labels = [c for c in range(10) for _ in range(per_class)]
        images = np.stack([
            np.clip(rng.normal(25 * c, 20, size=(3, 32, 32)), 0, 255) for c in labels
        ]).astype(np.uint8).reshape(len(labels), -1)
        with open(folder / batch, "wb") as f:
            pickle.dump({"data": images, "labels": labels}, f)
    return root
