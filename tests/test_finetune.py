import logging
import math

import pytest
import torch

from leanvgg import finetune as finetune_module
from leanvgg.compare import Settings, compare
from leanvgg.data import (CIFAR10_GROUPS, DataUnavailable, cifar10, group_index_tensor,
                          group_probabilities, stratified_subset)
from leanvgg.documents import VERIFIED
from leanvgg.finetune import finetune, grouped_nll
from leanvgg.recipes import RECIPES
from leanvgg.store import Store
from leanvgg.variants import build_variants, finetune_variant
from tiny import tiny_baseline, tiny_vgg, write_cifar

CIFAR_ORDER = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]


def test_mapping_is_ten_disjoint_non_empty_groups_of_valid_indices():
    assert [g.name for g in CIFAR10_GROUPS] == CIFAR_ORDER
    seen = set()
    for group in CIFAR10_GROUPS:
        assert group.imagenet and group.why
        assert all(0 <= i < 1000 for i in group.imagenet)
        assert seen.isdisjoint(group.imagenet), group.name
        seen.update(group.imagenet)
    membership = group_index_tensor()
    assert membership.shape == (10, 1000) and membership.sum(0).max() == 1
    assert len(CIFAR10_GROUPS[5].imagenet) == 118 and len(CIFAR10_GROUPS[2].imagenet) == 59


def test_grouped_loss_matches_a_hand_computation():
    membership = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 0]])  # group 0 = {0, 1}, group 1 = {2}
    logits = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0]])
    targets = torch.tensor([0, 1])
    z0 = math.e + math.e**2 + 2
    z1 = 2 + math.e**3 + math.e
    expected = (-math.log((math.e + math.e**2) / z0) - math.log(math.e**3 / z1)) / 2
    assert grouped_nll(logits, targets, membership).item() == pytest.approx(expected, rel=1e-6)
    assert group_probabilities(logits, membership).argmax(dim=1).tolist() == [0, 1]


def test_stratified_subset_is_balanced_and_seeded(tmp_path, tiny_cifar_files):
    dataset = cifar10(write_cifar(tmp_path, per_class=4), train=True, size=32)
    assert len(dataset) == 200  # 5 batches × 10 classes × 4
    subset = stratified_subset(dataset, 23, seed=1)
    labels = [dataset.targets[i] for i in subset.indices]
    assert sorted(labels.count(c) for c in range(10)) == [2] * 7 + [3] * 3
    assert subset.indices == stratified_subset(dataset, 23, seed=1).indices
    assert subset.indices != stratified_subset(dataset, 23, seed=2).indices
    with pytest.raises(DataUnavailable, match="Invalid subset size 201"):
        stratified_subset(dataset, 201)


def test_missing_cifar_gives_an_actionable_error(tmp_path):
    with pytest.raises(DataUnavailable, match="pass --data DIR"):
        cifar10(tmp_path, train=True, size=32)


@pytest.fixture
def tiny_cifar(tmp_path, tiny_cifar_files):
    return cifar10(write_cifar(tmp_path / "data", per_class=4), train=True, size=32)


def test_finetune_lowers_the_loss_and_leaves_the_input_alone(tiny_cifar):
    model = tiny_vgg()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained, stats = finetune(model, tiny_cifar, group_index_tensor(), epochs=4, lr=1e-3,
                              batch_size=20, progress=False)
    assert stats.final_loss < stats.first_loss
    assert stats.images == 200 and stats.epochs == 4 and stats.world_size == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(trained.features[0].weight, model.features[0].weight)


@pytest.mark.slow
def test_finetuned_weights_reach_pruned_and_pruned_quantized(tiny_cifar, tmp_path, photo):
    baseline, store = tiny_baseline(), Store(tmp_path / "cache")
    # the article's variants: the fast ones fine-tune their own pruning (their own entries)
    article = [name for name, recipe in RECIPES.items() if recipe.article]
    before = build_variants(baseline, article, store=store, progress=False).variants
    assert before["pruned"].facts.fine_tuned is False
    _, facts = finetune_variant(baseline, tiny_cifar, group_index_tensor(), store=store,
                                epochs=2, lr=1e-3, batch_size=20, progress=False)
    assert facts["fine_tuned"] is True and facts["finetune"]["images"] == 200
    after = build_variants(baseline, article, store=store, progress=False)
    result = compare(photo, after, Settings(runs=1, warmup=0)).to_dict()
    rows = {v["name"]: v for v in result["results"]}
    assert rows["pruned"]["fine_tuned"] is True and rows["pruned_quantized"]["fine_tuned"] is True
    assert rows["pruned"]["finetune"]["final_loss"] == pytest.approx(facts["finetune"]["final_loss"])
    assert rows["quantized"]["fine_tuned"] is None
    assert after.variants["pruned_quantized"].artifact != before["pruned_quantized"].artifact
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert not torch.equal(after.variants["pruned"].model(x), before["pruned"].model(x))


def test_a_killed_finetune_leaves_the_previous_entry(tiny_cifar, tmp_path, monkeypatch, caplog):
    baseline, store = tiny_baseline(), Store(tmp_path / "cache")
    finetune_variant(baseline, tiny_cifar, group_index_tensor(), store=store, batch_size=20,
                     progress=False)

    def entries() -> dict[str, bytes]:  # not the hashes that reading them records
        return {p.name: p.read_bytes() for p in store.root.iterdir()
                if not p.name.startswith((f"{VERIFIED}.", f".{VERIFIED}."))}

    files = entries()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "train_one_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune_variant(baseline, tiny_cifar, group_index_tensor(), store=store, batch_size=20,
                         progress=False)
    assert entries() == files
    caplog.set_level(logging.INFO)
    again = build_variants(baseline, ["pruned"], store=store, progress=False)
    assert again.variants["pruned"].facts.fine_tuned is True
    assert "corrupt" not in caplog.text
