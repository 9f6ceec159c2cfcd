"""Structured pruning of torchvision VGGs: conv filters and classifier neurons are physically
removed, never masked."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import VGG

# The 9 deepest convolutions of VGG-19 (`features` indices): conv3_4, conv4_*, conv5_*.
VGG19_DEEP_CONVS = (16, 19, 21, 23, 25, 28, 30, 32, 34)


def deep_convs(model: VGG) -> tuple[int, ...]:
    """The convs the article prunes, generalised to every VGG: the last conv of block 3 and
    every conv of blocks 4 and 5 (`features` indices; for VGG-19 exactly VGG19_DEEP_CONVS)."""
    blocks: list[list[int]] = [[]]
    for index, module in enumerate(model.features):
        if isinstance(module, nn.Conv2d):
            blocks[-1].append(index)
        elif isinstance(module, nn.MaxPool2d):
            blocks.append([])
    blocks = [b for b in blocks if b]
    if len(blocks) < 5:
        raise ValueError(f"Invalid VGG: {len(blocks)} blocks of convs, not VGG's five.")
    return (blocks[2][-1], *blocks[3], *blocks[4])

Importance = Callable[[torch.Tensor], torch.Tensor]
"""Conv weight (out × in × kh × kw) in, one score per output filter out; low scores are removed."""


def l2_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each filter, flattened over in-channels × kernel."""
    return weight.detach().flatten(1).norm(p=2, dim=1)


# The classifier's hidden Linears (`classifier` indices): 25,088 → 4,096 and 4,096 → 4,096.
VGG19_HIDDEN_LINEARS = (0, 3)


@dataclass(frozen=True)
class LayerPruning:
    index: int  # position in `features` (convs) or `classifier` (Linears)
    before: int  # output filters (neurons) before pruning
    kept: tuple[int, ...]  # original indices of the surviving filters, ascending
    module: str = "features"

    @property
    def after(self) -> int:
        return len(self.kept)

    @property
    def removed(self) -> int:
        return self.before - self.after

    def to_dict(self) -> dict:
        return {"module": self.module, "index": self.index, "before": self.before,
                "after": self.after, "removed": self.removed, "kept": list(self.kept)}


def prune_filters(
    model: VGG,
    *,
    ratio: float = 0.10,
    layers: Sequence[int] = VGG19_DEEP_CONVS,
    importance: Importance = l2_norm,
    multiple_of: int = 1,
) -> tuple[VGG, list[LayerPruning]]:
    """Remove the ``int(ratio × out_channels)`` least important filters of each listed conv.

    ``multiple_of`` rounds the kept count down to a multiple of it (at least one multiple, at
    most every filter): INT8 and bf16 CPU kernels work in blocks of 16 or more channels, and a
    ragged remainder costs a whole block.

    Returns a new, physically smaller model (the input is untouched) and a per-layer report.
    Scores are computed on the unpruned weights, so the result does not depend on layer order.
    The consumers of each pruned conv shrink with it: its BatchNorm, the next conv's input
    channels, or, after the last conv, the first Linear's channel-major input blocks.
    """
    _check(ratio, multiple_of)
    convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    bad = sorted(set(layers) - set(convs))
    if bad:
        raise ValueError(f"Invalid layers {bad}: not convolutions. Convolutions are at {convs}.")
    pruned = copy.deepcopy(model)
    report = []
    for index in sorted(set(layers)):
        conv = model.features[index]
        kept = _kept(importance(conv.weight), ratio, multiple_of)
        _shrink_outputs(pruned, index, kept)
        report.append(LayerPruning(index, conv.out_channels, tuple(kept.tolist())))
    return pruned, report


def prune_neurons(
    model: VGG,
    *,
    ratio: float = 0.5,
    layers: Sequence[int] = VGG19_HIDDEN_LINEARS,
    importance: Importance = l2_norm,
    multiple_of: int = 1,
) -> tuple[VGG, list[LayerPruning]]:
    """Remove the ``int(ratio × out_features)`` least important neurons of each hidden Linear.

    A neuron is a row of the Linear's weight (scored by its L2 norm, like a filter); the next
    Linear loses the matching input columns. The classifier holds 72 % of VGG-19's parameters,
    and at batch 1 its INT8 weights are read once per image, so fewer neurons are fewer bytes
    moved. Returns a new model (the input is untouched) and a per-layer report.
    """
    _check(ratio, multiple_of)
    linears = [i for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear)]
    bad = sorted(set(layers) - set(linears[:-1]))
    if bad:
        raise ValueError(f"Invalid classifier layers {bad}: not hidden Linears (unfactorised). "
                         f"Hidden Linears are at {linears[:-1]}.")
    pruned = copy.deepcopy(model)
    report = []
    for index in sorted(set(layers)):
        layer = model.classifier[index]
        kept = _kept(importance(layer.weight), ratio, multiple_of)
        consumer = next(i for i in linears if i > index)
        pruned.classifier[index] = _sliced_linear(pruned.classifier[index], rows=kept)
        pruned.classifier[consumer] = _sliced_linear(pruned.classifier[consumer], columns=kept)
        report.append(LayerPruning(index, layer.out_features, tuple(kept.tolist()), "classifier"))
    return pruned, report


def _check(ratio: float, multiple_of: int) -> None:
    if not 0 <= ratio < 1:
        raise ValueError(f"Invalid pruning ratio {ratio}. It must be in [0, 1).")
    if multiple_of < 1:
        raise ValueError(f"Invalid multiple_of {multiple_of}. It must be at least 1.")


def _kept(scores: torch.Tensor, ratio: float, multiple_of: int) -> torch.Tensor:
    """Ascending indices of the highest scores: ``ratio`` of them removed, the rest rounded down
    to a multiple of ``multiple_of`` (at least one multiple, at most all)."""
    total = len(scores)
    n_keep = total - int(ratio * total)
    n_keep = min(total, max(multiple_of, n_keep // multiple_of * multiple_of))
    return torch.sort(torch.topk(scores, n_keep, sorted=False).indices).values


def _sliced_linear(linear: nn.Linear, *, rows: torch.Tensor | None = None,
                   columns: torch.Tensor | None = None) -> nn.Linear:
    weight, bias = linear.weight, linear.bias
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if columns is not None:
        weight = weight[:, columns]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    return _new_like(linear, new, weight=weight, bias=bias)


def _shrink_outputs(model: VGG, index: int, kept: torch.Tensor) -> None:
    """Keep only output channels `kept` of features[index] and of everything consuming them."""
    features = model.features
    channels = features[index].out_channels
    features[index] = _sliced_conv(features[index], out_keep=kept)
    for later in range(index + 1, len(features)):
        module = features[later]
        if isinstance(module, nn.BatchNorm2d):
            features[later] = _sliced_batch_norm(module, kept)
        elif isinstance(module, nn.Conv2d):
            features[later] = _sliced_conv(module, in_keep=kept)
            return
    # No later conv: the first Linear reads the pooled map flattened channel-major (C × H × W);
    # when it is factorised (leanvgg.lowrank), the first of its two Linears does.
    head = model.classifier
    first = head[0]
    if isinstance(first, nn.Sequential):
        head, first = first, first[0]
    per_channel = first.in_features // channels
    columns = (kept[:, None] * per_channel + torch.arange(per_channel)).flatten()
    head[0] = _sliced_linear(first, columns=columns)


def _sliced_conv(conv: nn.Conv2d, *, out_keep: torch.Tensor | None = None,
                 in_keep: torch.Tensor | None = None) -> nn.Conv2d:
    weight, bias = conv.weight, conv.bias
    if out_keep is not None:
        weight = weight[out_keep]
        bias = bias[out_keep] if bias is not None else None
    if in_keep is not None:
        weight = weight[:, in_keep]
    new = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, bias=bias is not None,
                    padding_mode=conv.padding_mode)
    return _new_like(conv, new, weight=weight, bias=bias)


def _sliced_batch_norm(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[keep])
            new.bias.copy_(bn.bias[keep])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[keep])
            new.running_var.copy_(bn.running_var[keep])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new.train(bn.training)


def _new_like(old: nn.Module, new: nn.Module, *, weight: torch.Tensor,
              bias: torch.Tensor | None) -> nn.Module:
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    return new.train(old.training)
