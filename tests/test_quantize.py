import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from leanvgg.measure import count_params, state_dict_bytes
from leanvgg.models import from_layout, layout_of
from leanvgg.quantize import dynamic_int8_skeleton, quantize_dynamic_int8
from tiny import tiny_vgg


@pytest.fixture(scope="module")
def quantized(baseline):
    return quantize_dynamic_int8(baseline.model)


def test_the_three_linear_layers_are_dynamic_int8(quantized):
    linears = [m for m in quantized.classifier if not isinstance(m, (nn.ReLU, nn.Dropout))]
    assert len(linears) == 3
    assert all(isinstance(m, DynamicQuantizedLinear) for m in linears)
    assert all(m.weight().dtype == torch.qint8 for m in linears)
    assert all(isinstance(m, nn.Conv2d) for m in quantized.features if hasattr(m, "weight"))


def test_state_dict_is_under_40_percent_of_fp32(baseline, quantized):
    assert state_dict_bytes(quantized) < 0.40 * state_dict_bytes(baseline.model)


def test_parameters_are_counted_unpacked(baseline, quantized):
    assert count_params(quantized) == count_params(baseline.model) == 143_667_240


def test_input_model_is_untouched(baseline, quantized):
    assert all(type(m) is nn.Linear for m in baseline.model.classifier if hasattr(m, "in_features"))


def test_outputs_stay_close_to_fp32(baseline, quantized, photo):
    from leanvgg.images import preprocess

    x = preprocess(photo, 224)
    features = torch.flatten(baseline.model.avgpool(baseline.model.features(x)), 1)
    with torch.inference_mode():
        expected = baseline.model.classifier(features)
        got = quantized.classifier(features)
    error = (got - expected).abs().max() / expected.abs().max()
    assert error < 0.05
    assert not torch.equal(got, expected)


def test_unknown_backend_is_named(baseline):
    with pytest.raises(ValueError, match="Only torch.ao, torchao are supported"):
        quantize_dynamic_int8(baseline.model, backend="fbgemm")


def test_a_tensor_file_is_a_calibration_source_keyed_by_its_content(tmp_path):
    from leanvgg.data import DataUnavailable, calibration_batch
    from leanvgg.recipes import QuantizeStaticInt8

    batch = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "calibration.pt"
    torch.save(batch, path)
    torch.testing.assert_close(calibration_batch(32, path), batch)
    assert calibration_batch(64, path).shape == (4, 3, 64, 64)  # resized to the input size
    key = QuantizeStaticInt8(input_size=32, calibration=str(path)).to_json()["calibration"]
    assert key.startswith("file-sha256:")
    torch.save(batch + 1, path)
    assert QuantizeStaticInt8(input_size=32, calibration=str(path)).to_json()[
        "calibration"] != key
    (tmp_path / "bad.pt").write_bytes(b"not a tensor")
    with pytest.raises(DataUnavailable, match="not a saved tensor"):
        calibration_batch(32, tmp_path / "bad.pt")
    torch.save(torch.zeros(3), tmp_path / "flat.pt")
    with pytest.raises(DataUnavailable, match="N × 3 × H × W"):
        calibration_batch(32, tmp_path / "flat.pt")


def test_a_stored_state_dict_loads_into_the_skeleton_with_the_same_outputs():
    """The skeleton skips quantizing and packing weights that loading replaces; what it holds
    once loaded is the quantized model itself: structure, shapes, weights, outputs."""
    model = tiny_vgg()  # eval mode: dropout is the identity
    quantized = quantize_dynamic_int8(model)
    skeleton = dynamic_int8_skeleton(from_layout(layout_of(model), materialized=False))
    skeleton.load_state_dict(quantized.state_dict(), assign=True)
    assert layout_of(skeleton) == layout_of(quantized) == layout_of(model)
    for mine, theirs in zip(skeleton.classifier, quantized.classifier):
        assert type(mine) is type(theirs)
        if isinstance(theirs, DynamicQuantizedLinear):
            assert torch.equal(mine.weight().int_repr(), theirs.weight().int_repr())
            assert torch.equal(mine.bias(), theirs.bias())
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(skeleton(x), quantized(x))
