"""Accuracy of every variant on a labelled set whose labels are groups of the model's classes.

One mechanism serves every kind of labelled data: label g stands for a set of the model's
classes (row g of a groups × classes membership matrix), and the predicted label is the group
with the largest summed probability. A folder named after the model's own classes uses the
identity; for ImageNet models CIFAR-10 uses its ten groups, a full ImageNet validation folder
the identity, any other folder a mapping file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets
from tqdm.auto import tqdm

from leanvgg.builder import evaluation_key
from leanvgg.data import (DataUnavailable, FolderImages, cifar10, group_index_tensor,
                          group_probabilities, scan_folder, stratified_split, stratified_subset)
from leanvgg.distributed import distributed_context
from leanvgg.facts import Accuracy
from leanvgg.images import preprocess
from leanvgg.stats import wilson
from leanvgg.documents import EVALUATION
from leanvgg.store import Store
from leanvgg.variants import VariantSet

log = logging.getLogger(__name__)


class MappingError(ValueError):
    """A mapping file that does not map the folder's classes to ImageNet indices."""


@dataclass(frozen=True)
class Labelled:
    """A labelled set: ``dataset(size)`` yields (image tensor, group) at a model's input size."""

    name: str
    dataset: Callable[[int], Dataset]
    membership: torch.Tensor  # groups × the model's classes

    def subset(self, size: int, *, seed: int = 0) -> Labelled:
        """The same images for every input size: a class-stratified, seeded choice of ``size``."""
        if size >= len(self.dataset(32)):
            return self
        return Labelled(f"{self.name} ({size} images)",
                        lambda s: stratified_subset(self.dataset(s), size, seed=seed),
                        self.membership)


@dataclass(frozen=True)
class Counts:
    """Images, and how many of them each measure got right, summed over every rank."""

    images: int
    top1: int
    top3: int
    agree: int  # images whose top-1 equals the reference's (the baseline's)


def accuracy_of(counts: Counts, *, artifact: str, dataset: str, runtime: str = "pytorch",
                key: str = "") -> Accuracy:
    """The rates of ``counts`` with their 95 % Wilson intervals."""
    n = counts.images
    return Accuracy(top1=counts.top1 / n, top3=counts.top3 / n, agreement=counts.agree / n,
                    images=n, artifact=artifact, dataset=dataset,
                    top1_ci=wilson(counts.top1, n), top3_ci=wilson(counts.top3, n),
                    agreement_ci=wilson(counts.agree, n), runtime=runtime, key=key)


def image_folder(root: str | Path, mapping: dict[str, list[int]] | None = None) -> Labelled:
    """An ``ImageFolder``; without ``mapping`` its folders must be all 1000 ImageNet WordNet ids
    (sorted WordNet ids are ImageNet-1k's class order)."""
    try:
        classes = datasets.ImageFolder(str(root)).classes
    except (OSError, FileNotFoundError) as err:
        raise DataUnavailable(f"{str(root)!r} is not an image folder ({err}).") from None
    if mapping is None:
        if len(classes) != 1000 or not all(c.startswith("n") and c[1:].isdigit() for c in classes):
            raise MappingError(
                f"{str(root)!r} has {len(classes)} class folders; an ImageNet validation folder "
                "needs all 1000 WordNet-id folders (n01440764 …). For other folders pass a "
                "mapping file: JSON {folder name: [ImageNet class indices]}.")
        membership = torch.eye(1000)
    else:
        missing = sorted(set(classes) - set(mapping))
        bad = [c for c in classes if c in mapping and not all(
            isinstance(i, int) and 0 <= i < 1000 for i in mapping[c])]
        if missing or bad:
            raise MappingError(f"The mapping file leaves out {missing} or maps {bad} to invalid "
                               "ImageNet indices (integers 0..999).")
        membership = torch.zeros(len(classes), 1000)
        for g, name in enumerate(classes):
            membership[g, mapping[name]] = 1

    def at_size(size: int) -> Dataset:
        return datasets.ImageFolder(str(root), transform=lambda image: preprocess(
            image.convert("RGB"), size)[0])

    return Labelled(Path(root).name, at_size, membership)


def labelled_folder(root: str | Path, labels: Sequence[str]) -> Labelled:
    """A folder whose sub-folders are named after the model's own classes: each image's label
    is its class's index (no mapping), every prediction is over all of the model's classes."""
    scan = scan_folder(root, labels)
    if scan.skipped_note:
        log.warning(scan.skipped_note)
    return Labelled(Path(root).name, lambda size: FolderImages(scan, size),
                    torch.eye(len(labels)))


def split(labelled: Labelled, held_out: float = 0.2, *, seed: int = 0
          ) -> tuple[Labelled, Labelled]:
    """(training, validation) parts of one labelled set: ``held_out`` of every class for
    validation, seeded; each part's name states the split."""
    def part(index: int) -> Callable[[int], Dataset]:
        return lambda size: stratified_split(labelled.dataset(size), held_out, seed=seed)[index]

    share = f"{held_out:.0%} of each class held out, seed {seed}"
    return (Labelled(f"{labelled.name} (training part: {share})", part(0), labelled.membership),
            Labelled(f"{labelled.name} (validation part: {share})", part(1),
                     labelled.membership))


def load_mapping(path: str | Path) -> dict[str, list[int]]:
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise MappingError(f"Cannot read mapping file {str(path)!r}: {err}") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, list) for v in mapping.values()):
        raise MappingError(f"{str(path)!r} must hold a JSON object of lists of class indices.")
    return mapping


def cifar10_test(root: str | Path | None) -> Labelled:
    """CIFAR-10's test split, each class the union of its ImageNet classes."""
    return Labelled("cifar10-test", lambda size: cifar10(root, train=False, size=size),
                    group_index_tensor())


def predict(model: torch.nn.Module, dataset: Dataset, membership: torch.Tensor, *,
            batch_size: int = 16, progress: bool = False,
            desc: str = "evaluating") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-1 groups, top-k groups (k ≤ 3) and true groups of every image in ``dataset``."""
    k = min(3, len(membership))
    top1, topk, targets = [], [], []
    with torch.inference_mode():
        for images, labels in tqdm(DataLoader(dataset, batch_size=batch_size), desc=desc,
                                   unit="batch", disable=not progress):
            scores = group_probabilities(model(images), membership)
            top1.append(scores.argmax(dim=1))
            topk.append(scores.topk(k, dim=1).indices)
            targets.append(labels)
    return torch.cat(top1), torch.cat(topk), torch.cat(targets)


def shard(dataset: Dataset) -> Dataset:
    """This rank's share under torchrun: items rank, rank + N, rank + 2N … of ``dataset``.

    Every item goes to exactly one rank and none is repeated, whatever the remainder (unlike
    ``DistributedSampler``, which pads the last ranks with repeats so that shards are even,
    which would count some images twice). In one process, the whole dataset.
    """
    rank, world_size = distributed_context()
    if world_size == 1:
        return dataset
    return Subset(dataset, range(rank, len(dataset), world_size))


def count(model: torch.nn.Module, dataset: Dataset, membership: torch.Tensor, *,
          reference: torch.Tensor | None = None, batch_size: int = 16, progress: bool = False,
          desc: str = "evaluating") -> tuple[Counts, torch.Tensor]:
    """``model``'s hits on this rank's shard of ``dataset``, summed over all ranks, and this
    rank's top-1 groups (the ``reference`` of later calls: agreement is counted per image).
    """
    rank, world_size = distributed_context()
    top1, topk, targets = predict(model, shard(dataset), membership, batch_size=batch_size,
                                  progress=progress and rank == 0, desc=desc)
    agree = top1 == reference if reference is not None else torch.ones_like(top1, dtype=bool)
    totals = torch.tensor([len(targets), int((top1 == targets).sum()),
                           int((topk == targets[:, None]).any(dim=1).sum()), int(agree.sum())],
                          dtype=torch.int64)
    if world_size > 1:
        dist.all_reduce(totals)
    return Counts(*(int(v) for v in totals)), top1


def evaluate(variant_set: VariantSet, labelled: Labelled, *, batch_size: int = 16,
             progress: bool = True) -> dict[str, Accuracy]:
    """Top-1, top-3 and agreement with the baseline for every variant (baseline first), with
    their intervals, each measured on the runtime that runs the variant's single images (the
    one the dashboard shows: under ``auto`` the chosen one, e.g. the INT8 model on OpenVINO).
    Under torchrun each rank takes its shard and the counts are summed: every rank returns the
    same figures."""
    if "baseline" not in variant_set.variants:
        raise ValueError("Evaluation needs the 'baseline' variant to measure agreement with it.")
    names = sorted(variant_set.variants, key=lambda n: n != "baseline")
    reference = None
    results = {}
    for name in names:
        variant = variant_set.variants[name]
        # a ByBatch would send these batches to the batch runtime: measure the one that
        # answers single images
        model = getattr(variant.model, "single", variant.model)
        counts, top1 = count(model, labelled.dataset(variant.input_size),
                             labelled.membership, reference=reference, batch_size=batch_size,
                             progress=progress, desc=f"evaluating {name}")
        reference = top1 if reference is None else reference
        results[name] = accuracy_of(counts, artifact=variant.artifact, dataset=labelled.name,
                                    runtime=variant.runtime, key=evaluation_key(variant))
    return results


def save_report(store: Store, results: dict[str, Accuracy]) -> None:
    """Record the figures beside the cached variants, under the document's lock (other
    variants' and runtimes' figures are kept); ``build_variants`` shows them where the variant
    runs on the weights and runtime they describe."""
    store.documents.update(EVALUATION, lambda stored: {
        **stored, **{accuracy.key: {"variant": name, **accuracy.to_dict()}
                     for name, accuracy in results.items()}})
