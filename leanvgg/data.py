"""Datasets for recovery and evaluation (a user's labelled image folders, CIFAR-10) and the
CIFAR-10 → ImageNet-1k label groups."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from leanvgg.images import ImageError, check, decode, preprocess, read_file
from leanvgg.models import IMAGENET_WEIGHTS
from leanvgg.store import default_root


class DataUnavailable(Exception):
    """The requested dataset is neither on disk nor downloadable; the message says what to do."""


@dataclass(frozen=True)
class LabelGroup:
    name: str
    imagenet: tuple[int, ...]  # ImageNet-1k class indices this CIFAR-10 class covers
    why: str


def _span(first: int, last: int) -> tuple[int, ...]:
    return tuple(range(first, last + 1))


# One group per CIFAR-10 class, in CIFAR-10's label order. Groups are disjoint: an ImageNet
# class belongs to at most one CIFAR class, so "the group with the largest summed probability"
# is well defined.
CIFAR10_GROUPS: tuple[LabelGroup, ...] = (
    LabelGroup("airplane", (404, 895, 908),
               "airliner, warplane and wing (ImageNet's name for aircraft seen from outside); "
               "airship and space shuttle are not aeroplanes"),
    LabelGroup("automobile", (436, 468, 511, 609, 627, 656, 661, 751, 817),
               "the passenger cars: beach wagon, cab, convertible, jeep, limousine, minivan, "
               "Model T, racer, sports car. CIFAR-10's automobile is 'sedans, SUVs, things of "
               "that sort'"),
    LabelGroup("bird", _span(7, 24) + _span(80, 100) + _span(127, 146),
               "all 59 ImageNet bird classes (cock … great grey owl, black grouse … black swan, "
               "white stork … albatross)"),
    LabelGroup("cat", _span(281, 285),
               "the domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian cat; the wild "
               "cats (cougar, lynx, lion, …) are not in CIFAR-10's cat class"),
    LabelGroup("deer", (351, 352, 353),
               "ImageNet-1k has no deer class; hartebeest, impala and gazelle are the slender, "
               "brown, antlered/horned ruminants closest to CIFAR-10's deer photos"),
    LabelGroup("dog", _span(151, 268),
               "the 118 domestic dog breeds (Chihuahua … Mexican hairless); wolves, coyote, "
               "dingo and wild dogs (269–275) are excluded"),
    LabelGroup("frog", (30, 31, 32), "bullfrog, tree frog, tailed frog"),
    LabelGroup("horse", (339, 603),
               "sorrel (ImageNet's only horse class) and horse cart; zebra is a separate "
               "species that CIFAR-10's horse photos do not show"),
    LabelGroup("ship", (403, 472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 914),
               "vessels: aircraft carrier, canoe, catamaran, container ship, fireboat, gondola, "
               "lifeboat, liner, pirate ship, schooner, speedboat, submarine, trimaran, yawl"),
    LabelGroup("truck", (555, 569, 675, 717, 864, 867),
               "fire engine, garbage truck, moving van, pickup, tow truck, trailer truck. "
               "CIFAR-10 puts pickups in neither vehicle class; they join truck, the class an "
               "ImageNet model confuses them with, as they never appear as automobiles"),
)


def group_index_tensor(groups: Sequence[LabelGroup] = CIFAR10_GROUPS,
                       num_classes: int = 1000) -> torch.Tensor:
    """A (groups × classes) 0/1 matrix: row g marks the ImageNet classes of group g."""
    membership = torch.zeros(len(groups), num_classes)
    for g, group in enumerate(groups):
        membership[g, list(group.imagenet)] = 1
    return membership


def group_probabilities(logits: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """Each group's summed softmax probability (rows: samples); the prediction is the argmax."""
    return torch.softmax(logits, dim=1) @ membership.T


def input_transform(size: int) -> v2.Compose:
    """Small images (CIFAR-10, digits) scaled up to the model's input, ImageNet-normalised."""
    preset = IMAGENET_WEIGHTS.transforms()
    return v2.Compose([v2.ToImage(), v2.Resize((size, size), antialias=True),
                       v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean=preset.mean, std=preset.std)])


def cifar10(root: str | Path | None, *, train: bool, size: int) -> Dataset:
    """CIFAR-10 from ``root`` (python-batches layout), downloading it when no root is given."""
    download = root is None
    root = Path(root) if root is not None else default_root() / "data"
    try:
        return datasets.CIFAR10(str(root), train=train, transform=input_transform(size),
                                download=download)
    except Exception as err:  # missing files, a failed download or a bad archive alike
        raise DataUnavailable(
            f"CIFAR-10 is not available ({err}). Connect to the internet to download it, or "
            "pass --data DIR where DIR holds cifar-10-batches-py/ (the python version from "
            "the CIFAR-10 website)."
        ) from err


def stratified_subset(dataset: Dataset, size: int, *, seed: int = 0) -> Subset:
    """``size`` samples with every class equally represented (±1), chosen reproducibly."""
    targets = torch.as_tensor(dataset.targets)
    classes = targets.unique().tolist()
    if not 0 < size <= len(targets):
        raise DataUnavailable(f"Invalid subset size {size}: the data set has {len(targets)} "
                              f"images, so it must be in 1..{len(targets)}.")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for rank, label in enumerate(classes):
        members = torch.nonzero(targets == label).flatten()
        take = size // len(classes) + (rank < size % len(classes))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    order = torch.cat(chosen)
    order = order[torch.randperm(len(order), generator=generator)]
    return _with_targets(dataset, order.tolist())


def _calibration_tensor(path: Path, size: int) -> torch.Tensor:
    try:
        batch = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a bad file; all mean the same
        raise DataUnavailable(
            f"Calibration file {str(path)!r} is not a saved tensor ({err}).") from None
    if not (isinstance(batch, torch.Tensor) and batch.dim() == 4 and batch.shape[1] == 3
            and len(batch) > 0):
        raise DataUnavailable(f"Calibration file {str(path)!r} must hold an N × 3 × H × W tensor.")
    batch = batch.float()
    if batch.shape[-2:] != (size, size):
        batch = torch.nn.functional.interpolate(batch, size=(size, size), mode="bilinear",
                                                align_corners=False, antialias=True)
    return batch


CALIBRATION_PHOTOS = Path(__file__).parent / "calibration_photos"  # licences in LICENSES.md


def calibration_digest(folder: str | Path) -> str:
    """A short content hash of a calibration folder (or tensor file), so its artifacts change
    when it does."""
    digest = hashlib.sha256()
    if Path(folder).is_file():
        return hashlib.sha256(Path(folder).read_bytes()).hexdigest()[:16]
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def calibration_batch(size: int, folder: str | Path | None = None, *, seed: int = 0) -> torch.Tensor:
    """Real images for static quantization: each photo, its mirror and two seeded random crops.

    Activation ranges must come from real pixels (noise has none of their statistics). Without
    ``folder`` the six public-domain/CC0 photos shipped with leanvgg are used; a user folder is
    read whole (every file must be an image), in name order. A file instead of a folder holds
    an N × 3 × H × W tensor already normalised the way the model's inputs are (``torch.save``;
    e.g. data that is not photos, like the digits benchmark's); it is resized to ``size``.
    """
    folder = Path(folder) if folder is not None else CALIBRATION_PHOTOS
    if folder.is_file():
        return _calibration_tensor(folder, size)
    if not folder.is_dir():
        raise DataUnavailable(f"Calibration folder {str(folder)!r} does not exist.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".md"))
    if not files:
        raise DataUnavailable(f"Calibration folder {str(folder)!r} holds no images.")
    crop = v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True)
    preset = IMAGENET_WEIGHTS.transforms()
    normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(mean=preset.mean, std=preset.std)])
    views = []
    with torch.random.fork_rng(devices=[]):  # torchvision's random crops use the global RNG
        torch.manual_seed(seed)
        for path in files:
            try:
                image = decode(read_file(path)).square  # what the models see of it
            except ImageError as err:
                raise DataUnavailable(f"Calibration image {path.name}: {err}") from None
            centred = preprocess(image, size)[0]
            pixels = v2.functional.to_image(image)
            views += [centred, centred.flip(-1), normalise(crop(pixels)), normalise(crop(pixels))]
    return torch.stack(views)


@dataclass(frozen=True)
class FolderScan:
    """A labelled image folder (one sub-folder per label, torchvision's ``ImageFolder``
    layout), its images checked once: what was taken and what was skipped, and why."""

    root: Path
    samples: tuple[tuple[Path, int], ...]  # (image file, model class index)
    classes: tuple[str, ...]  # the sub-folders' names, sorted
    not_images: int  # files skipped: not a readable image of a supported format
    outside: int  # symbolic links skipped: they lead out of the folder

    @property
    def skipped_note(self) -> str | None:
        parts = [f"{n} {what}" for n, what in ((self.not_images, "files that are not images"),
                                               (self.outside, "links out of the folder"))
                 if n]
        return f"{self.root}: skipped {' and '.join(parts)}" if parts else None


def folder_classes(root: str | Path) -> tuple[str, ...]:
    """The sub-folder names of a labelled image folder, sorted (``ImageFolder``'s order)."""
    root = Path(root)
    if not root.is_dir():
        raise DataUnavailable(f"{str(root)!r} is not a folder.")
    real = root.resolve()
    classes = tuple(sorted(entry.name for entry in root.iterdir()
                           if entry.is_dir() and not entry.name.startswith(".")
                           and entry.resolve().is_relative_to(real)))
    if not classes:
        raise DataUnavailable(f"{str(root)!r} holds no class sub-folders: a labelled image "
                              "folder has one sub-folder of images per label.")
    return classes


def scan_folder(root: str | Path, labels: Sequence[str]) -> FolderScan:
    """Every image of a labelled folder, with its class's index in ``labels`` (the model's
    class names). Each sub-folder must be named after one of them; files that are not images
    and links leading out of the folder are skipped and counted."""
    root = Path(root)
    classes = folder_classes(root)
    index = {name: i for i, name in enumerate(labels)}
    unknown = [name for name in classes if name not in index]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise DataUnavailable(
            f"{str(root)!r}: {len(unknown)} sub-folder(s) named after no class of the model "
            f"({shown}); the model's classes are {', '.join(repr(n) for n in labels[:5])}"
            f"{' …' if len(labels) > 5 else ''} (pass --labels FILE to name them).")
    real = root.resolve()
    samples, not_images, outside = [], 0, 0
    for name in classes:
        for folder, dirs, files in os.walk(root / name):  # links to folders are not followed
            dirs.sort()
            for file in sorted(files):
                path = Path(folder) / file
                if not path.resolve().is_relative_to(real):
                    outside += 1
                    continue
                try:
                    check(read_file(path))
                except (ImageError, OSError):
                    not_images += 1
                    continue
                samples.append((path, index[name]))
    if not samples:
        raise DataUnavailable(f"{str(root)!r} holds no images in its class sub-folders "
                              f"({not_images} other files).")
    return FolderScan(root, tuple(samples), classes, not_images, outside)


class FolderImages(Dataset):
    """A scanned folder's images at a model's input size: (normalised tensor, class index);
    decoded with the uploads' own checks and bounds."""

    def __init__(self, scan: FolderScan, size: int) -> None:
        self.scan = scan
        self.size = size
        self.targets = [target for _, target in scan.samples]  # for stratified_subset

    def __len__(self) -> int:
        return len(self.scan.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.scan.samples[index]
        return preprocess(decode(read_file(path)).square, self.size)[0], target


def stratified_split(dataset: Dataset, held_out: float, *, seed: int = 0
                     ) -> tuple[Subset, Subset]:
    """(training, validation): ``held_out`` of every class's images (at least one) for
    validation, chosen reproducibly by ``seed``; the rest for training."""
    if not 0 < held_out < 1:
        raise DataUnavailable(f"Invalid held-out share {held_out}: it must be in (0, 1).")
    targets = torch.as_tensor(dataset.targets)
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in targets.unique().tolist():
        members = torch.nonzero(targets == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = max(1, round(held_out * len(members))) if len(members) > 1 else 0
        val += members[:n_val].tolist()
        train += members[n_val:].tolist()
    return _with_targets(dataset, sorted(train)), _with_targets(dataset, sorted(val))


def _with_targets(dataset: Dataset, indices: list[int]) -> Subset:
    subset = Subset(dataset, indices)
    subset.targets = [dataset.targets[i] for i in indices]  # stratified_subset reads them
    return subset
