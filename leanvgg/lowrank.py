"""Low-rank factorisation of a classifier Linear by truncated SVD.

VGG-19's ``classifier.0`` maps 25,088 inputs to 4,096 outputs: 102.8 M weights, 72 % of the
model's. Replacing W (out × in) by its best rank-r approximation U_r S_r V_rᵀ (Eckart–Young) as
two Linears, in → r then r → out, costs r × (in + out) weights: 7.5 M at r = 256. Both halves
are ordinary Linears, so every quantizer that takes a Linear takes them.

The top r singular triplets are exact (not randomized): they come from the eigendecomposition
of the smaller Gram matrix (W Wᵀ, 4,096 × 4,096 for fc6), in float64. Only its upper triangle
and its top r eigenpairs are computed (BLAS's ``syrk`` and LAPACK's MRRR driver, through SciPy;
PyTorch has neither): on one core, VGG-19's fc6 (4,096 × 25,088) factorises at r = 1,024 in
26.5 s (47.3 s with every eigenpair from ``torch.linalg.eigh``); ``torch.svd_lowrank``, with
enough power iterations to be within 0.5 % of the optimum, took 86 s on two cores for turbo's
fc6. Squaring W squares its condition number, which costs digits only in singular values below
~1e-6 of the largest: in float64 that spares every triplet a classifier's factorisation keeps
(tested against ``torch.linalg.svd``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.models import VGG


def factorize_linear(model: VGG, *, rank: int, layer: int = 0) -> VGG:
    """A copy of ``model`` whose ``classifier[layer]`` is two Linears of inner width ``rank``
    (``factorize`` without the retained energy)."""
    return factorize(model, rank=rank, layer=layer)[0]


def factorize(model: VGG, *, rank: int, layer: int = 0) -> tuple[VGG, float]:
    """A copy of ``model`` whose ``classifier[layer]`` is two Linears of inner width ``rank``,
    and the share of the layer's squared Frobenius norm they keep (one SVD for both).

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
        energy = float(s.square().sum() / linear.weight.double().square().sum())
    factorised = copy.deepcopy(model)
    factorised.classifier[layer] = nn.Sequential(first, second).train(linear.training)
    return factorised, energy


def truncated_svd(weight: torch.Tensor, rank: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m × r), S (r, descending), V (n × r) of ``weight``'s top ``rank`` singular triplets,
    in float64.

    With W = U S Vᵀ, the eigenvectors of W Wᵀ are U and its eigenvalues S²; V = Wᵀ U S⁻¹ (or
    the other way round when W is tall). The Gram matrix's eigenvalues are exact to about
    eps × λ_max, so a singular value below √(n·eps) × s_max is zero to working precision: its
    direction gets zero columns instead of a division by ~0.
    """
    matrix = weight.detach().double()
    tall = matrix.shape[0] > matrix.shape[1]
    if tall:
        matrix = matrix.T
    values, left = gram_eigenpairs(matrix, rank)
    s = values.clamp_min(0).sqrt()
    kept = s > s[0] * (matrix.shape[1] * torch.finfo(torch.float64).eps) ** 0.5
    right = (matrix.T @ left) / torch.where(kept, s, 1.0)
    right[:, ~kept] = 0
    s = torch.where(kept, s, 0.0)
    return (right, s, left) if tall else (left, s, right)


def gram_eigenpairs(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` largest eigenvalues (descending) of the Gram matrix ``matrix @ matrix.T``
    and their eigenvectors (m × rank), in float64, on as many threads as PyTorch computes on.

    BLAS's symmetric rank-k product makes only the Gram matrix's upper triangle (half the
    work: 9.0 s against 19.4 s for fc6 on one core) and LAPACK's MRRR driver only the
    eigenpairs asked for (PyTorch has neither), both through SciPy.
    """
    from scipy.linalg import eigh
    from scipy.linalg.blas import dsyrk
    from threadpoolctl import threadpool_limits

    n = matrix.shape[0]
    with threadpool_limits(torch.get_num_threads(), user_api="blas"):  # SciPy's own BLAS
        # matrix.T in Fortran order is matrix's own memory: (matrix.T)ᵀ matrix.T = matrix matrixᵀ
        gram = dsyrk(1.0, matrix.double().numpy().T, trans=1, lower=0)
        values, vectors = eigh(gram, lower=False, subset_by_index=[n - rank, n - 1],
                               driver="evr", overwrite_a=True, check_finite=False)  # ascending
    return (torch.from_numpy(values[::-1].copy()),
            torch.from_numpy(vectors[:, ::-1].copy()))


def retained_energy(linear: nn.Linear, rank: int) -> float:
    """Share of the weight's squared Frobenius norm kept at ``rank`` (Σ s_i², i < rank)."""
    with torch.no_grad():
        _, s, _ = truncated_svd(linear.weight, rank)
        return float((s ** 2).sum() / linear.weight.double().square().sum())
