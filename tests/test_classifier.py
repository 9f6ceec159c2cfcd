"""Classifier compression: neuron pruning and truncated-SVD low rank, on torchvision's real
classifier shape (25,088 → 4,096 → 4,096 → 1000), checked against their definitions."""

import copy

import pytest
import torch
from torch import nn
from torchvision import models

from leanvgg.lowrank import factorize, factorize_linear, retained_energy, truncated_svd
from leanvgg.measure import count_macs, count_params
from leanvgg.models import from_layout, layout_of
from leanvgg.prune import l2_norm, prune_filters, prune_neurons
from leanvgg.recipes import RECIPES, Candidate, LowRank, PruneNeurons, bind, merge_facts
from tiny import tiny_vgg


@pytest.fixture(scope="module")
def vgg19():
    torch.manual_seed(0)
    model = models.vgg19(weights=None).eval()
    with torch.no_grad():
        for module in model.classifier:
            if isinstance(module, nn.Linear):
                module.bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def features(vgg19):
    """What the classifier reads for two inputs (flattened pooled maps), computed once."""
    torch.manual_seed(1)
    with torch.inference_mode():
        x = torch.randn(2, 3, 64, 64)
        return torch.flatten(vgg19.avgpool(vgg19.features(x)), 1)


def test_neuron_pruning_removes_the_lowest_l2_rows_and_equals_zeroing_them(vgg19, features):
    pruned, report = prune_neurons(vgg19, ratio=0.5)
    assert [(r.module, r.index, r.before, r.after) for r in report] == [
        ("classifier", 0, 4096, 2048), ("classifier", 3, 4096, 2048)]
    assert [m.weight.shape for m in pruned.classifier if isinstance(m, nn.Linear)] == [
        (2048, 25088), (2048, 2048), (1000, 2048)]
    for layer in report:  # kept: exactly the highest-norm rows
        scores = l2_norm(vgg19.classifier[layer.index].weight)
        assert set(layer.kept) == set(scores.topk(layer.after).indices.tolist())
    # Definition: removing a neuron is zeroing its row and bias (its ReLU output is then 0, so
    # the next layer's column for it contributes nothing).
    masked = copy.deepcopy(vgg19)
    with torch.no_grad():
        for layer in report:
            removed = sorted(set(range(layer.before)) - set(layer.kept))
            masked.classifier[layer.index].weight[removed] = 0
            masked.classifier[layer.index].bias[removed] = 0
    with torch.inference_mode():
        torch.testing.assert_close(pruned.classifier(features), masked.classifier(features),
                                   rtol=1e-4, atol=1e-5)
    assert count_params(pruned) < count_params(vgg19) - 60_000_000
    assert count_params(vgg19) == 143_667_240  # the input is untouched


@pytest.mark.slow
def test_low_rank_is_the_truncated_svd_split_in_two_linears(vgg19, features, monkeypatch):
    rank = 16
    svds = []  # the one SVD of fc6 factorize runs, kept here instead of run twice
    monkeypatch.setattr("leanvgg.lowrank.truncated_svd", lambda weight, r: svds.append(
        (weight.detach().clone(), r, truncated_svd(weight, r))) or svds[-1][2])
    factorised, energy = factorize(vgg19, rank=rank)
    first, second = factorised.classifier[0]
    assert (first.weight.shape, second.weight.shape) == ((rank, 25088), (4096, rank))
    assert first.bias is None
    # fc6's own weight at the rank asked (truncated_svd itself: the optimum test below)
    (weight, asked, (u, s, v)), = svds
    assert asked == rank and torch.equal(weight, vgg19.classifier[0].weight)
    # The halves' product is U_r S_r V_rᵀ: compared on 64 random directions (Freivalds), not
    # as two 4,096 × 25,088 matrices built and compared entry by entry (10 s)
    probe = torch.randn(25088, 64, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(second.weight.double() @ (first.weight.double() @ probe),
                               (u * s) @ (v.T @ probe), rtol=1e-4, atol=1e-6)
    # singular values split evenly: both halves have the same squared norm (Σ s_i)
    torch.testing.assert_close(first.weight.double().square().sum(), s.sum(), rtol=1e-4, atol=0)
    torch.testing.assert_close(second.weight.double().square().sum(), s.sum(), rtol=1e-4, atol=0)
    with torch.inference_mode():
        expected = (features.double() @ v) @ (u * s).T + vgg19.classifier[0].bias.double()
        torch.testing.assert_close(second(first(features)).double(), expected, rtol=1e-4,
                                   atol=1e-4)
    weight = vgg19.classifier[0].weight.detach().double()
    assert energy == pytest.approx(float(s.square().sum() / weight.square().sum()))
    params = count_params(factorised)
    assert params == count_params(vgg19) - 25088 * 4096 + rank * (25088 + 4096)
    assert count_macs(factorised, 224) < count_macs(vgg19, 224)


@pytest.mark.parametrize("spectrum", ["flat", "decaying"])
@pytest.mark.parametrize("wide", [True, False])
def test_the_truncated_svd_is_the_optimum(spectrum, wide):
    """Eckart–Young: no rank-r matrix is closer to W than its top-r SVD; the Gram route must
    reach that optimum and the exact singular triplets, for wide and tall matrices."""
    torch.manual_seed(0)
    weight = torch.randn(256, 1024, dtype=torch.float64)
    if spectrum == "decaying":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        weight = (u * (0.97 ** torch.arange(256))) @ vh
    weight = weight if wide else weight.T
    rank = 32
    u, s, v = truncated_svd(weight, rank)
    exact_u, exact, exact_vh = torch.linalg.svd(weight, full_matrices=False)
    optimum = exact[rank:].square().sum().sqrt()
    error = (weight - (u * s) @ v.T).norm()
    assert float(error) == pytest.approx(float(optimum), rel=1e-9)
    torch.testing.assert_close(s, exact[:rank], rtol=1e-9, atol=0)
    assert u.shape == (weight.shape[0], rank) and v.shape == (weight.shape[1], rank)
    # singular vectors are unique up to sign (the spectrum has no repeated values)
    signs = (u * exact_u[:, :rank]).sum(0).sign()
    torch.testing.assert_close(u * signs, exact_u[:, :rank], rtol=0, atol=1e-6)
    torch.testing.assert_close(v * signs, exact_vh[:rank].T, rtol=0, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_svd_computes_on_pytorchs_thread_count(threads, monkeypatch):
    """SciPy's own BLAS does the SVD's work: it must use the cores PyTorch was given (a
    builder process computing beside another on one core each), then go back to its own."""
    from threadpoolctl import threadpool_info

    import scipy.linalg

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info()
                if pool["user_api"] == "blas" and "scipy" in pool["filepath"]}

    seen, eigh = [], scipy.linalg.eigh
    monkeypatch.setattr(scipy.linalg, "eigh", lambda *a, **k: seen.append(blas_threads())
                        or eigh(*a, **k))
    before = blas_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    u, s, v = truncated_svd(torch.randn(64, 200, dtype=torch.float64), 8)
    assert seen == [{threads}] and before and blas_threads() == before
    assert u.shape == (64, 8) and s.shape == (8,) and v.shape == (200, 8)


def test_a_rank_beyond_the_matrix_rank_gets_zero_directions():
    torch.manual_seed(0)
    weight = torch.randn(64, 8, dtype=torch.float64) @ torch.randn(8, 200, dtype=torch.float64)
    u, s, v = truncated_svd(weight, 12)  # numerical rank 8
    assert bool(torch.isfinite(u).all() and torch.isfinite(v).all())
    assert bool((s[8:] == 0).all() and (v[:, 8:] == 0).all())
    torch.testing.assert_close((u * s) @ v.T, weight, rtol=0, atol=1e-9)


def test_full_rank_reproduces_the_layer(vgg19, features):
    small = copy.deepcopy(vgg19)
    small.classifier[0] = nn.Linear(64, 32)  # full rank is 32: cheap to check exactly
    full = factorize_linear(small, rank=32)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        torch.testing.assert_close(full.classifier[0](x), small.classifier[0](x), rtol=1e-4,
                                   atol=1e-5)
    with pytest.raises(ValueError, match="Invalid rank 33"):
        factorize_linear(small, rank=33)
    with pytest.raises(ValueError, match="not an unfactorised Linear"):
        factorize_linear(full, rank=4)


@pytest.mark.slow
def test_layouts_rebuild_compressed_models_and_filter_pruning_composes(vgg19, features):
    pruned, _ = prune_filters(vgg19, ratio=0.5, layers=[34])
    neurons, _ = prune_neurons(pruned, ratio=0.25)
    factorised = factorize_linear(neurons, rank=32)
    layout = layout_of(factorised)
    assert layout["linear_features"] == [256 * 49, 3072, 3072, 1000]
    assert layout["ranks"] == {"0": 32}
    rebuilt = from_layout(layout)
    rebuilt.load_state_dict(factorised.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(x), factorised(x))
    # filter pruning after factorisation slices the first half's input columns
    later, _ = prune_filters(factorize_linear(vgg19, rank=16), ratio=0.5, layers=[34])
    assert later.classifier[0][0].in_features == 256 * 49
    assert "ranks" not in layout_of(vgg19)


def test_recipe_steps_record_what_they_did_and_order_structure_first(vgg19):
    model, facts = PruneNeurons(ratio=0.5).apply(vgg19)
    assert facts["neuron_pruning"][0]["after"] == 2048 and len(facts["neuron_pruning"]) == 2
    low, facts = LowRank(rank=16).apply(model)
    energy = retained_energy(model.classifier[0], 16)
    assert facts["low_rank"] == [{"layer": 0, "rank": 16,
                                  "retained_energy": pytest.approx(energy, rel=1e-12)}]
    assert 0 < energy < 1
    assert low.classifier[0][0].out_features == 16
    recipe = Candidate(0.3, "int8", 160, neuron_ratio=0.5, rank=256).recipe(
        "t", "", layers=[34])
    assert [s.to_json()["op"] for s in recipe.steps] == [
        "prune", "prune_neurons", "low_rank", "quantize_static_int8"]
    assert recipe.compiled and recipe.input_size == 160
    with pytest.raises(ValueError, match="fine-tuned"):
        Candidate(0.3, "fp32", 160, fine_tuned=True).recipe("t", "", layers=[34])


def test_turbo_svd_binds_fast_rcnns_ranks_to_the_head_at_hand(vgg19):
    """A quarter of fc6's and a sixteenth of fc7's width: 1,024 and 256 on VGG-19's 4,096-wide
    head, the same proportions on a user's narrower one; two factorisations report both."""
    def ranks(model):
        return [(s.layer, s.rank) for s in bind(RECIPES["turbo_svd"], model).steps
                if isinstance(s, LowRank)]

    assert ranks(vgg19) == [(0, 1024), (3, 256)]
    assert ranks(tiny_vgg()) == [(0, 16), (3, 4)]
    with pytest.raises(ValueError, match="once bound"):
        RECIPES["turbo_svd"].steps[1].to_json()
    small = tiny_vgg()
    model, facts = small, {}
    for step in bind(RECIPES["turbo_svd"], small).steps[1:3]:
        model, new = step.apply(model)
        facts = merge_facts(facts, new)
    assert [(r["layer"], r["rank"]) for r in facts["low_rank"]] == [(0, 16), (3, 4)]
    assert (model.classifier[0][0].out_features, model.classifier[3][0].out_features) == (16, 4)
