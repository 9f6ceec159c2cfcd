import copy

import pytest
import torch
from torch import nn
from torchvision import models

from leanvgg.measure import count_params
from leanvgg.prune import VGG19_DEEP_CONVS, l2_norm, prune_filters


def trained_like(builder, seed: int = 0) -> nn.Module:
    """A VGG with activations of realistic scale: Kaiming weights, non-zero biases and BN stats."""
    torch.manual_seed(seed)
    model = builder(weights=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.normal_(0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.fixture(scope="module")
def vgg19():
    return trained_like(models.vgg19)


def vgg19_params(channels: list) -> int:
    """Parameters of a VGG-19 with the given conv widths, from the layer shapes alone."""
    total, previous = 0, 3
    for c in channels:
        if c != "M":
            total += previous * c * 3 * 3 + c
            previous = c
    dims = [previous * 7 * 7, 4096, 4096, 1000]
    return total + sum(i * o + o for i, o in zip(dims, dims[1:]))


def zeroed_copy(model: nn.Module, report) -> nn.Module:
    """The unpruned model with exactly the removed filters (and their BN outputs) set to zero."""
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for layer in report:
            removed = sorted(set(range(layer.before)) - set(layer.kept))
            for module in zeroed.features[layer.index: layer.index + 2]:
                if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                    module.weight[removed] = 0
                    module.bias[removed] = 0
    return zeroed


def test_vgg19_channel_counts_and_parameter_total(vgg19):
    pruned, report = prune_filters(vgg19)
    assert [layer.index for layer in report] == list(VGG19_DEEP_CONVS)
    assert [(layer.before, layer.after, layer.removed) for layer in report] == (
        [(256, 231, 25)] + [(512, 461, 51)] * 8)
    widths = [m.out_channels if isinstance(m, nn.Conv2d) else "M"
              for m in pruned.features if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
    assert widths == [64, 64, "M", 128, 128, "M", 256, 256, 256, 231, "M",
                      461, 461, 461, 461, "M", 461, 461, 461, 461, "M"]
    assert pruned.classifier[0].in_features == 461 * 7 * 7
    assert count_params(pruned) == vgg19_params(widths)


@pytest.mark.slow
def test_kept_channels_can_be_rounded_to_kernel_blocks(vgg19):
    pruned, report = prune_filters(vgg19, multiple_of=16)
    assert [(layer.before, layer.after) for layer in report] == [(256, 224)] + [(512, 448)] * 8
    assert pruned.classifier[0].in_features == 448 * 7 * 7
    narrow = nn.Sequential(nn.Conv2d(3, 8, 3))
    _, (small,) = prune_filters(models.VGG(narrow, init_weights=False), layers=[0],
                                multiple_of=16)
    assert small.after == 8  # never more filters than there are


def test_removed_filters_are_the_lowest_l2_norms(vgg19):
    _, report = prune_filters(vgg19)
    for layer in report:
        norms = l2_norm(vgg19.features[layer.index].weight)
        removed = sorted(set(range(layer.before)) - set(layer.kept))
        assert norms[removed].max() <= norms[list(layer.kept)].min()


def test_pruned_outputs_equal_baseline_with_those_filters_zeroed(vgg19, photo):
    from leanvgg.images import preprocess

    x = preprocess(photo, 224)
    pruned, report = prune_filters(vgg19)
    with torch.inference_mode():
        expected = zeroed_copy(vgg19, report)(x)
        got = pruned(x)
        original = vgg19(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert not torch.allclose(got, original, rtol=1e-3)  # pruning really changed something


def test_input_model_is_untouched(vgg19):
    before = {k: v.clone() for k, v in vgg19.state_dict().items()}
    prune_filters(vgg19, ratio=0.5)
    after = vgg19.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("builder", [models.vgg11, models.vgg13_bn, models.vgg16_bn,
                                     models.vgg19_bn])
def test_every_torchvision_vgg_including_batch_norm(builder):
    model = trained_like(builder)
    convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    layers = convs[-4:]  # two consecutive pruned convs and the one before the classifier
    pruned, report = prune_filters(model, ratio=0.25, layers=layers)
    assert [layer.after for layer in report] == [384] * 4
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = zeroed_copy(model, report)(x)
        got = pruned(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    bn = [m for m in pruned.features if isinstance(m, nn.BatchNorm2d)]
    assert all(b.num_features == c.out_channels for b, c in zip(
        bn, [m for m in pruned.features if isinstance(m, nn.Conv2d)]))


def test_custom_importance_is_a_callable():
    model = trained_like(models.vgg11)
    last = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)][-1]
    by_index = lambda weight: torch.arange(weight.shape[0], dtype=torch.float)  # noqa: E731
    _, report = prune_filters(model, ratio=0.5, layers=[last], importance=by_index)
    assert report[0].kept == tuple(range(256, 512))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ratio": 1.0}, "Invalid pruning ratio"),
    ({"ratio": -0.1}, "Invalid pruning ratio"),
    ({"layers": [17]}, r"Invalid layers \[17\]: not convolutions"),
])
def test_bad_arguments_are_named(vgg19, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune_filters(vgg19, **kwargs)
