"""A model's class names: read from a file (``--labels``), an image folder's sub-folders,
ImageNet's for 1,000-class models, or ``class 0 … class N-1``; checked once, here.

Labels are not part of any cache key (nothing built from the weights depends on them); the
latest labels given for a set of weights are kept in the store's LABELS document, so a command
run later without ``--labels`` shows the same names.
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torchvision.models import VGG19_Weights

from leanvgg.documents import LABELS

if TYPE_CHECKING:
    from leanvgg.store import Store

IMAGENET_CATEGORIES: tuple[str, ...] = tuple(VGG19_Weights.IMAGENET1K_V1.meta["categories"])
MAX_FILE_BYTES = 4 * 2**20  # 100,000 names of 40 characters fit well within it
MAX_NAME_CHARS = 200
IMAGENET, GENERIC = "imagenet", "generic"


class LabelsError(ValueError):
    """Labels that cannot be used; the message says what is wrong and what is accepted."""


@dataclass(frozen=True)
class Labels:
    """One name per class, in the model's output order, and where they came from."""

    names: tuple[str, ...]
    source: str  # "imagenet", "generic", "file PATH" or "folder PATH"

    def __post_init__(self) -> None:
        problem = _problem(self.names)
        if problem:
            raise LabelsError(f"Invalid labels from {self.source}: {problem}.")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def note(self) -> str | None:
        """What a reader must know about the names, if anything."""
        if self.source == GENERIC:
            return (f"no labels given: classes are shown as 'class 0' … 'class {len(self) - 1}' "
                    "(pass --labels FILE, one name per line)")
        return None

    def to_dict(self) -> dict:
        return {"names": list(self.names), "source": self.source}

    @classmethod
    def from_dict(cls, data: dict) -> Labels:
        return cls(tuple(data["names"]), data["source"])


def default_labels(num_classes: int) -> Labels:
    """ImageNet's names for a 1,000-class model, otherwise ``class 0`` … ``class N-1``."""
    if num_classes == len(IMAGENET_CATEGORIES):
        return Labels(IMAGENET_CATEGORIES, IMAGENET)
    return Labels(tuple(f"class {i}" for i in range(num_classes)), GENERIC)


def read_labels(path: str | Path) -> Labels:
    """The names in a text file (one per line) or a JSON list of strings."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise LabelsError(f"Invalid labels file {str(path)!r}: not a file.")
        if size > MAX_FILE_BYTES:
            raise LabelsError(f"Invalid labels file {str(path)!r}: {size:,} bytes, more than "
                              f"{MAX_FILE_BYTES:,} (one name per line is far less).")
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise LabelsError(f"Cannot read labels file {str(path)!r}: "
                          f"{err.strerror or err}.") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LabelsError(f"Invalid labels file {str(path)!r}: not UTF-8 text (one name per "
                          "line, or a JSON list of strings).") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except ValueError as err:
            raise LabelsError(f"Invalid labels file {str(path)!r}: not a JSON list ({err}).") \
                from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise LabelsError(f"Invalid labels file {str(path)!r}: a JSON labels file must be "
                              "a list of strings.")
    else:
        names = text.splitlines()
        while names and not names[-1].strip():  # a trailing newline (or blank lines) ends it
            names.pop()
    return Labels(tuple(n.strip() for n in names), f"file {path}")


def _problem(names: tuple[str, ...]) -> str | None:
    if not names:
        return "no names"
    for index, name in enumerate(names):
        if not name.strip():
            return f"name {index} (line {index + 1}) is empty"
        if len(name) > MAX_NAME_CHARS:
            return f"name {index} has {len(name)} characters, more than {MAX_NAME_CHARS}"
        if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
            return f"name {index} holds control characters (is it a binary file?)"
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            return f"{name!r} is both name {seen[name]} and name {index}"
        seen[name] = index
    return None


def check_count(labels: Labels, num_classes: int) -> None:
    if len(labels) != num_classes:
        raise LabelsError(f"Invalid labels from {labels.source}: {len(labels)} names for a "
                          f"model with {num_classes} classes (one name per class, in the "
                          "model's output order).")


def remembered(store: Store, weights_id: str) -> Labels | None:
    """The labels last given for these weights, if any (and still valid)."""
    found = (store.documents.load(LABELS) or {}).get(weights_id)
    try:
        return Labels.from_dict(found) if found else None
    except (KeyError, TypeError, LabelsError):
        return None


def remember(store: Store, weights_id: str, labels: Labels) -> None:
    """Keep ``labels`` for these weights (generic and ImageNet names need no keeping)."""
    if labels.source in (IMAGENET, GENERIC) or remembered(store, weights_id) == labels:
        return
    store.documents.update(LABELS, lambda stored: {**stored, weights_id: labels.to_dict()})


def attach(baseline, store: Store, given: Labels | None = None,
           folder: Labels | None = None):
    """The baseline with its labels: ``given`` (``--labels``), else those last given for these
    weights, else a labelled folder's sub-folder names (for a model without names of its own),
    else its defaults; checked against the model's classes. Nothing is kept here: ``remember``
    them once the command that uses them has succeeded."""
    labels = given or remembered(store, baseline.weights_id)
    if labels is None and folder is not None and baseline.labels.source == GENERIC:
        labels = folder
    if labels is None:
        return baseline
    check_count(labels, baseline.num_classes)
    return dataclasses.replace(baseline, labels=labels)
