"""Low-rank factorisation of a classifier Linear by truncated SVD.

VGG-19's ``classifier.0`` maps 25,088 inputs to 4,096 outputs: 102.8 M weights, 72 % of the
model's. Replacing W (out × in) by its best rank-r approximation U_r S_r V_rᵀ (Eckart–Young) as
two Linears, in → r then r → out, costs r × (in + out) weights: 7.5 M at r = 256. Both halves
are ordinary Linears, so every quantizer that takes a Linear takes them.

The top r singular triplets come from the randomized algorithm of Halko, Martinsson and Tropp
(``torch.svd_lowrank``, as scikit-learn's ``TruncatedSVD`` does by default): a full SVD of a
4,096 × 25,088 matrix takes minutes on two cores, the randomized one seconds, and with power
iterations its approximation error is within a fraction of a percent of the optimum (tested).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.models import VGG

OVERSAMPLING = 32  # extra random directions: the error bound tightens quickly with them
POWER_ITERATIONS = 6  # sharpen the spectrum where singular values decay slowly


def factorize_linear(model: VGG, *, rank: int, layer: int = 0) -> VGG:
    """A copy of ``model`` whose ``classifier[layer]`` is two Linears of inner width ``rank``.

    The first half, ``V_rᵀ`` scaled by √S_r, has no bias; the second, ``U_r`` scaled by √S_r,
    keeps the original bias, so ``second(first(x)) = x (U_r S_r V_rᵀ)ᵀ + b`` exactly (the
    singular values are split evenly between the halves, which keeps both halves' ranges alike
    for INT8). The input model is untouched.
    """
    linear = model.classifier[layer]
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"Invalid layer {layer}: classifier[{layer}] is "
                         f"{type(linear).__name__}, not an unfactorised Linear.")
    if not 1 <= rank <= min(linear.in_features, linear.out_features):
        raise ValueError(f"Invalid rank {rank}: it must be in 1.."
                         f"{min(linear.in_features, linear.out_features)} for classifier[{layer}] "
                         f"({linear.in_features} → {linear.out_features}).")
    with torch.no_grad():
        u, s, v = truncated_svd(linear.weight, rank)
        root = s.sqrt()
        first = nn.Linear(linear.in_features, rank, bias=False)
        second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
        first.weight.copy_((root[:, None] * v.T).float())
        second.weight.copy_((u * root).float())
        if linear.bias is not None:
            second.bias.copy_(linear.bias)
    factorised = copy.deepcopy(model)
    factorised.classifier[layer] = nn.Sequential(first, second).train(linear.training)
    return factorised


def truncated_svd(weight: torch.Tensor, rank: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m × r), S (r), V (n × r) of ``weight``'s top ``rank`` singular triplets, seeded."""
    q = min(rank + OVERSAMPLING, *weight.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(weight.detach().double(), q=q, niter=POWER_ITERATIONS)
    return u[:, :rank], s[:rank], v[:, :rank]


def retained_energy(linear: nn.Linear, rank: int) -> float:
    """Share of the weight's squared Frobenius norm kept at ``rank`` (Σ s_i², i < rank)."""
    with torch.no_grad():
        _, s, _ = truncated_svd(linear.weight, rank)
        return float((s ** 2).sum() / linear.weight.double().square().sum())
