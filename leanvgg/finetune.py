"""Recovery training after pruning: on the model's own labelled images (cross-entropy), or for
ImageNet's 1,000 classes on CIFAR-10, each CIFAR class the union of its ImageNet classes.

Plain functions in the shape of torchvision's reference ``train.py``. The same code runs in one
process or under ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on GPU), where each
rank sees its share of every global batch and gradients are averaged, so N ranks take the same
steps as one process would over the same global batches.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from leanvgg.distributed import barrier, distributed_context, rank_zero_first
from leanvgg.recipes import FineTune, Recipe

if TYPE_CHECKING:
    from leanvgg.builder import Builder

log = logging.getLogger(__name__)


def grouped_nll(logits: torch.Tensor, targets: torch.Tensor,
                membership: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log Σ_{i∈group(target)} softmax(logits)_i`` over the batch.

    ``membership`` is the (groups × classes) 0/1 matrix of ``data.group_index_tensor``.
    """
    log_probs = F.log_softmax(logits, dim=1)
    outside = membership[targets] == 0
    return -torch.logsumexp(log_probs.masked_fill(outside, float("-inf")), dim=1).mean()


@dataclass(frozen=True)
class FinetuneStats:
    images: int  # per epoch, over all ranks
    epochs: int
    final_loss: float  # mean loss of the last epoch
    first_loss: float  # mean loss of the first 10 % of the first epoch
    seconds: float
    world_size: int

    def to_dict(self) -> dict:
        return {"images": self.images, "epochs": self.epochs, "final_loss": self.final_loss,
                "first_loss": self.first_loss, "seconds": self.seconds,
                "world_size": self.world_size}


def recovery_loss(logits: torch.Tensor, targets: torch.Tensor,
                  membership: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy on the model's own classes, or (``membership``) the grouped loss."""
    if membership is None:
        return F.cross_entropy(logits, targets)
    return grouped_nll(logits, targets, membership)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    membership: torch.Tensor | None, *, epoch: int, show: bool) -> list[float]:
    """One pass over ``loader``; returns the loss of every step (this rank's batch)."""
    model.train()
    losses = []
    bar = tqdm(loader, desc=f"fine-tune epoch {epoch + 1}", unit="batch", disable=not show)
    started = time.perf_counter()
    seen = 0
    for images, targets in bar:
        loss = recovery_loss(model(images), targets, membership)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        seen += len(images)
        bar.set_postfix(loss=f"{loss.item():.3f}",
                        img_s=f"{seen / (time.perf_counter() - started):.1f}")
    return losses


def finetune(model: nn.Module, dataset: Dataset, membership: torch.Tensor | None, *,
             epochs: int = 1, lr: float = 1e-4, batch_size: int = 32, seed: int = 0,
             progress: bool = True) -> tuple[nn.Module, FinetuneStats]:
    """A fine-tuned copy of ``model`` (Adam; cross-entropy, or the grouped loss when
    ``membership`` is given); the input model is untouched.

    ``batch_size`` is the global batch: under torchrun each of N ranks takes batch_size / N.
    """
    rank, world_size = distributed_context()
    if batch_size % world_size:
        raise ValueError(f"Invalid batch size {batch_size}: not divisible by {world_size} ranks.")
    trained = copy.deepcopy(model)
    torch.manual_seed(seed)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size // world_size, sampler=sampler)
    wrapped = DistributedDataParallel(trained) if world_size > 1 else trained
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=lr)
    started = time.perf_counter()
    epoch_losses = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        epoch_losses.append(train_one_epoch(wrapped, loader, optimizer, membership,
                                            epoch=epoch, show=progress and rank == 0))
    trained.eval()
    first = epoch_losses[0][: max(1, len(epoch_losses[0]) // 10)]
    stats = FinetuneStats(
        images=len(sampler) * world_size, epochs=epochs,
        final_loss=_global_mean(epoch_losses[-1], world_size),
        first_loss=_global_mean(first, world_size),
        seconds=time.perf_counter() - started, world_size=world_size)
    return trained, stats


def _global_mean(values: list[float], world_size: int) -> float:
    mean = torch.tensor(sum(values) / len(values))
    if world_size > 1:
        dist.all_reduce(mean)
        mean /= world_size
    return float(mean)


def fine_tune_step(builder: Builder, recipe: Recipe, dataset: Dataset,
                   membership: torch.Tensor | None, *, replace: bool = False,
                   **train) -> tuple[nn.Module, dict, str]:
    """The artifact of the recipe's FineTune step: trained on ``dataset`` when missing (always,
    with ``replace``), stored by ``builder``, returned with its facts and key. The step's loss
    (``recipes.finetune_loss``) decides: cross-entropy ignores ``membership``.

    Under torchrun rank 0 first builds the model training starts from (the others load it),
    every rank trains (DistributedDataParallel), rank 0 stores the result, and all return once
    it is stored.
    """
    recipe = builder.bind(recipe)
    position = next((i for i, s in enumerate(recipe.steps) if isinstance(s, FineTune)), None)
    if position is None:
        raise ValueError(f"Invalid variant {recipe.name!r}: its recipe has no fine-tuning step.")
    if recipe.steps[position].loss == "cross-entropy":
        membership = None
    with rank_zero_first():
        builder.artifact(recipe, position)

    def train_it(model: nn.Module, _facts: dict) -> tuple[nn.Module, dict]:
        trained, stats = finetune(model, dataset, membership, **train)
        return trained, {"fine_tuned": True, "finetune": stats.to_dict()}

    made = builder.make(recipe, position, train_it, replace=replace,
                        write=distributed_context()[0] == 0)
    barrier()
    return made
