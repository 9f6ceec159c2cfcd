from urllib.error import URLError

import pytest
import torch
import torchvision.models._api as torchvision_api

from leanvgg.measure import count_params
from leanvgg.models import (CATEGORIES, IMAGENET_WEIGHTS, WeightsError, from_layout, layout_of,
                            load_baseline)
from leanvgg.prune import prune_filters


def test_baseline_has_vgg19s_exact_parameter_count(baseline):
    assert count_params(baseline.model) == 143_667_240 == IMAGENET_WEIGHTS.meta["num_params"]


def test_random_weights_are_seeded_and_flagged_meaningless(baseline):
    again = load_baseline("random", progress=False)
    for a, b in zip(baseline.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    assert not baseline.meaningful
    assert "meaningless" in baseline.note
    assert baseline.weights_id == "random-seed0"


def test_undrawn_random_weights_are_drawn_only_where_the_store_lacks_them(baseline, tmp_path,
                                                                         monkeypatch):
    import leanvgg.builder
    from leanvgg.builder import stored_baseline
    from leanvgg.store import Store

    undrawn = load_baseline("random", progress=False, drawn=False)
    assert all(p.is_meta for p in undrawn.model.parameters())
    assert (undrawn.weights_id, undrawn.num_classes) == (baseline.weights_id, 1000)
    first = stored_baseline(undrawn, Store(tmp_path))  # an empty store: drawn, then stored
    for a, b in zip(baseline.model.state_dict().values(), first.model.state_dict().values()):
        assert torch.equal(a, b)  # the very weights `--weights random` always gave

    def no_drawing(**kwargs):
        raise AssertionError("drew the random weights again")

    monkeypatch.setattr(leanvgg.builder, "random_model", no_drawing)
    again = stored_baseline(load_baseline("random", progress=False, drawn=False),
                            Store(tmp_path))  # a later start: mapped from the store
    for a, b in zip(baseline.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)


def test_imagenet_weights_are_taken_as_loaded_not_copied_over_a_random_init(baseline,
                                                                            monkeypatch):
    given = {name: tensor + 1 for name, tensor in baseline.model.state_dict().items()}
    calls = []
    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url",
                        lambda url, **kwargs: calls.append(kwargs) or given)
    loaded = load_baseline("imagenet", progress=False)
    assert calls == [{"progress": False, "check_hash": True}]
    assert loaded.weights_id == "imagenet1k-v1" and loaded.meaningful
    for name, tensor in loaded.model.state_dict().items():
        assert tensor.data_ptr() == given[name].data_ptr()  # assigned, not copied


def test_categories_come_from_the_weights_metadata():
    assert len(CATEGORIES) == 1000
    assert CATEGORIES[281] == "tabby"


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", refuse)


def test_imagenet_without_network_fails_with_an_actionable_message(offline):
    with pytest.raises(WeightsError) as err:
        load_baseline("imagenet", progress=False)
    message = str(err.value)
    assert IMAGENET_WEIGHTS.url in message
    assert "--weights random" in message and "--weights PATH" in message


def test_auto_falls_back_to_random_loudly(offline, caplog):
    result = load_baseline("auto", progress=False)
    assert result.weights == "random" and not result.meaningful
    assert "FALLING BACK TO RANDOM WEIGHTS" in caplog.text


@pytest.mark.slow
def test_local_state_dict_file_is_loaded(baseline, tmp_path):
    path = tmp_path / "vgg19.pth"
    torch.save(baseline.model.state_dict(), path)
    loaded = load_baseline(str(path))
    assert loaded.meaningful and loaded.weights == str(path)
    assert loaded.weights_id.startswith("file-")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), baseline.model(x))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda: b"not a checkpoint", "is not a PyTorch weights file"),
        (lambda: {"weights": [1, 2, 3]}, "holds a dict with keys \\['weights'\\], not a model's weights"),
        (lambda: {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)},
         "is not a torchvision VGG: no features.N conv weights"),
    ],
    ids=["garbage", "not-tensors", "resnet-like"],
)
def test_bad_weights_files_get_a_clear_error(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    value = content()
    if isinstance(value, bytes):
        path.write_bytes(value)
    else:
        torch.save(value, path)
    with pytest.raises(WeightsError, match=message):
        load_baseline(str(path))


def test_unknown_weights_value_names_the_choices():
    with pytest.raises(WeightsError, match="auto, imagenet, random"):
        load_baseline("imagenett")


def test_layout_round_trip_rebuilds_a_pruned_model(baseline):
    pruned, _ = prune_filters(baseline.model, ratio=0.3)
    rebuilt = from_layout(layout_of(pruned))
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(rebuilt(x), pruned(x))
