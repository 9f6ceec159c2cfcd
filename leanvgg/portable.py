"""A variant as one safetensors file: plain tensors, and in its metadata what rebuilds it.

No pickles: every tensor is a plain array (torch.ao's packed dynamic-INT8 weights are stored
unpacked as INT8 values, scale and zero point), and the metadata (JSON, key ``leanvgg``) holds
the channel layout, the recipe's steps, the kept filter and neuron indices, and every static
INT8 activation's scale and zero point. ``load`` rebuilds the module the way leanvgg's cache
does (layout → each step's structure → tensors), so its logits are the cached model's, bit for
bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from leanvgg.models import from_layout
from leanvgg.quantize import StaticInt8
from leanvgg.recipes import skeleton_step

FORMAT_VERSION = 1
METADATA_KEY = "leanvgg"
# the three plain tensors that stand for one packed dynamic-INT8 weight
_INT8, _SCALES, _ZERO_POINTS = "weight_int8", "weight_scales", "weight_zero_points"


class LoadError(ValueError):
    """The file is not a leanvgg safetensors export (or is damaged); the message says why."""


def save(model: nn.Module, path: Path, *, spec: dict) -> None:
    """Write ``model``'s tensors to ``path`` with ``spec`` in the metadata.

    ``spec`` must hold ``layout`` (of the float model the steps start from), ``steps`` (each
    step's ``to_json()``) and ``input_size``; anything else in it (variant, recipe, kept
    indices) is carried along for the reader.
    """
    from safetensors.torch import save_file

    tensors, dynamic = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, DynamicLinear):
            dynamic[name] = module.version  # it decides the activations' range (reduce_range)
            tensors.update(_unpacked(name, module))
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):  # not the packed (weight, bias) tuples
            tensors.setdefault(key, value.detach().contiguous())
    meta = {**spec, "format_version": FORMAT_VERSION, "dynamic_int8": dynamic}
    if isinstance(model, StaticInt8):
        meta["activation_qparams"] = [
            {"scale": scale, "zero_point": int(zero_point)}
            for scale, zero_point in model.activation_qparams.tolist()]
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def _unpacked(name: str, module: DynamicLinear) -> dict[str, torch.Tensor]:
    weight, bias = module.weight(), module.bias()
    if weight.qscheme() == torch.per_tensor_affine:
        scales = torch.tensor([weight.q_scale()], dtype=torch.float64)
        zero_points = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
    else:
        scales, zero_points = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
    out = {f"{name}.{_INT8}": weight.int_repr(), f"{name}.{_SCALES}": scales,
           f"{name}.{_ZERO_POINTS}": zero_points}
    if bias is not None:
        out[f"{name}.bias"] = bias.detach()
    return out


def read_spec(path: Path) -> dict:
    """The metadata ``save`` wrote (layout, steps, input size, …), without reading tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise LoadError(f"{path} is not a readable safetensors file ({err}).") from None
    if METADATA_KEY not in metadata:
        raise LoadError(f"{path} is a safetensors file, but not one leanvgg exported "
                        f"(its metadata has no {METADATA_KEY!r} entry).")
    spec = json.loads(metadata[METADATA_KEY])
    if spec.get("format_version") != FORMAT_VERSION:
        raise LoadError(f"{path} has export format {spec.get('format_version')!r}; this "
                        f"leanvgg reads format {FORMAT_VERSION}.")
    return spec


def load(path: str | Path) -> nn.Module:
    """The model in a safetensors file ``leanvgg export --format safetensors`` wrote, in eval
    mode: logits bit-identical to the cached variant it was exported from (its eager model;
    compiled variants run the same weights through AOTInductor). Feed it as the ``model.json``
    beside it says (resize, crop, mean, std, input size)."""
    from safetensors.torch import load_file

    path = Path(path)
    spec = read_spec(path)
    tensors = load_file(str(path))
    model = from_layout(spec["layout"])
    for step in spec["steps"]:
        model = skeleton_step(step).skeleton(model)
    for name in spec["dynamic_int8"]:
        _repack(name, tensors)
    try:
        model.load_state_dict(tensors)
    except (RuntimeError, KeyError) as err:
        raise LoadError(f"{path}'s tensors do not fit its layout ({err}).") from None
    for name, version in spec["dynamic_int8"].items():
        model.get_submodule(name).version = version
    return model.eval()


def _repack(name: str, tensors: dict) -> None:
    """Turn the plain tensors of one dynamic-INT8 Linear back into torch.ao's state dict."""
    values = tensors.pop(f"{name}.{_INT8}")
    scales = tensors.pop(f"{name}.{_SCALES}")
    zero_points = tensors.pop(f"{name}.{_ZERO_POINTS}")
    if scales.numel() == 1:
        weight = torch._make_per_tensor_quantized_tensor(values, float(scales),
                                                         int(zero_points))
    else:
        weight = torch._make_per_channel_quantized_tensor(values, scales, zero_points, 0)
    # the keys of torch.ao's first state-dict format, which a plain dict (no version
    # metadata) is read as: the quantized weight beside the bias
    tensors[f"{name}.weight"] = weight
