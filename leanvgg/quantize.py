"""Dynamic INT8 quantization of the Linear layers (qint8 weights, activations quantized per call)."""

from __future__ import annotations

import copy
import warnings
from operator import attrgetter
from typing import Literal

import torch
from torch import fx, nn

Backend = Literal["torch.ao", "torchao"]
BACKENDS: tuple[Backend, ...] = ("torch.ao", "torchao")


def quantize_dynamic_int8(model: nn.Module, *, backend: Backend = "torch.ao") -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers run dynamic INT8; convolutions stay FP32.

    ``torch.ao`` is the default although PyTorch deprecates it for torchao: on x86 CPUs its
    fbgemm kernels run VGG-19's classifier several times faster than FP32, while torchao's
    ``Int8DynamicActivationInt8WeightConfig`` runs slower than FP32 in eager mode
    (``benchmarks/quantization_backends.py`` measures both side by side).
    """
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend {backend!r}. Only {', '.join(BACKENDS)} are supported.")
    if backend == "torchao":
        return _torchao_dynamic_int8(model)
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # Deliberate use of the deprecated path (see docstring); keep the user's log clean.
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)


def dynamic_int8_skeleton(model: nn.Module) -> nn.Module:
    """The structure ``quantize_dynamic_int8`` (torch.ao) produces from ``model``, to load a
    stored state dict into; ``model`` is changed in place.

    Each ``nn.Linear`` becomes a dynamic INT8 Linear of its shape, but its packed weights are
    a 1×1 placeholder: loading packs the stored INT8 weights (whatever shape they have), so
    quantizing and packing weights about to be replaced (twice per Linear, 3.3 s for
    VGG-19's classifier on two cores) is skipped.
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions")
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    linear = DynamicLinear(1, 1, bias_=child.bias is not None, dtype=torch.qint8)
                    linear.in_features, linear.out_features = (child.in_features,
                                                               child.out_features)
                    setattr(parent, name, linear)
    return model


def _torchao_dynamic_int8(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantized = copy.deepcopy(model)  # quantize_ mutates its argument
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda module, _name: isinstance(module, nn.Linear))
    return quantized


class StaticInt8(nn.Module):
    """A PT2E static-INT8 graph whose state dict is complete.

    PT2E writes each activation's scale and zero point into the graph as literal arguments of
    its quantize/dequantize ops, where a state dict cannot see them. This wrapper mirrors them
    in the buffer ``activation_qparams`` (one ``(scale, zero_point)`` row per op, in graph order)
    and writes them back into the graph whenever a state dict is loaded, so a stored artifact
    reloads into a skeleton without recalibration, with ``torch.load(weights_only=True)``.
    """

    def __init__(self, graph: fx.GraphModule) -> None:
        super().__init__()
        self.graph = graph
        self.register_buffer("activation_qparams", torch.tensor(
            [node.args[1:3] for node in _activation_ops(graph)], dtype=torch.float64))
        self.register_load_state_dict_post_hook(lambda module, _keys: module._write_qparams())

    def _write_qparams(self) -> None:
        for node, (scale, zero_point) in zip(_activation_ops(self.graph),
                                             self.activation_qparams.tolist()):
            node.args = (node.args[0], scale, int(zero_point), *node.args[3:])
        self.graph.recompile()

    def train(self, mode: bool = True) -> StaticInt8:
        # An exported graph is fixed in eval mode and refuses to switch; nothing else to set.
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def _activation_ops(graph: fx.GraphModule) -> list[fx.Node]:
    ops = (torch.ops.quantized_decomposed.quantize_per_tensor.default,
           torch.ops.quantized_decomposed.dequantize_per_tensor.default)
    return [node for node in graph.graph.nodes if node.target in ops]


def quantize_static_int8(model: nn.Module, calibration: torch.Tensor, *,
                         batch_size: int = 8) -> StaticInt8:
    """Static INT8 of every convolution and Linear layer, calibrated on real images.

    PT2E through torchao with ``X86InductorQuantizer``: weights INT8 per output channel,
    activations UINT8 per tensor with ranges observed on ``calibration`` (N×3×H×W, already
    preprocessed). The result is a graph of quantize/dequantize ops around FP32 ops; under
    ``torch.compile`` (``leanvgg.runtime``) Inductor fuses each pattern into a oneDNN INT8
    kernel. The FP32 originals of the INT8 weights are dropped, so the state dict holds INT8
    weights only (a quarter of the FP32 size). The input model is untouched.
    """
    graph = _prepared(model, calibration.shape[-1])
    with torch.no_grad():
        for chunk in calibration.split(batch_size):
            graph(chunk)
    return StaticInt8(_converted(graph))


def static_int8_skeleton(model: nn.Module, input_size: int) -> StaticInt8:
    """The structure ``quantize_static_int8`` produces, to load a stored state dict into:
    ``model`` (a throwaway skeleton itself) is traced as it is, and its INT8 weights are left
    uncomputed (zeros of their shape and dtype, which the state dict fills)."""
    graph = _prepared(model, input_size, copy_model=False)
    with torch.no_grad():
        graph(torch.zeros(1, 3, input_size, input_size))
    return StaticInt8(_converted(graph, compute_weights=False))


def _prepared(model: nn.Module, input_size: int, *, copy_model: bool = True
              ) -> fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    # Traced with a batch of 2 (a batch of 1 would be specialised) and any batch size allowed.
    example = torch.zeros(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    traced = copy.deepcopy(model) if copy_model else model
    exported = torch.export.export(traced.eval(), (example,), dynamic_shapes=({0: batch},))
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    return prepare_pt2e(exported.module(), quantizer)


def _converted(graph: fx.GraphModule, *, compute_weights: bool = True) -> fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    converted = convert_pt2e(graph, fold_quantize=False)
    _fold_weight_quantization(converted, compute=compute_weights)
    # Folding the weights into INT8 constants leaves their FP32 originals attached, unused.
    used = {node.target for node in converted.graph.nodes if node.op == "get_attr"}
    unused = [name for name, _ in (*converted.named_parameters(), *converted.named_buffers())
              if name not in used]
    for name in unused:
        owner, _, leaf = name.rpartition(".")
        delattr(converted.get_submodule(owner) if owner else converted, leaf)
    return converted


def _fold_weight_quantization(graph: fx.GraphModule, *, compute: bool = True) -> None:
    """Each quantize op whose inputs are all constants (a weight, its scales and zero points)
    replaced by its INT8 result, as ``convert_pt2e``'s own folding does, with the same names
    (``_frozen_param0``, … in graph order).

    ``convert_pt2e``'s folding runs the whole graph's constant parts to find them, the
    weights' dequantize ops included, only to leave those in the graph: 4.1 of its 5.2 s for
    VGG-19 on one core, paid by every static INT8 build and every reload of one.

    ``compute=False`` (a skeleton, whose INT8 weights a state dict fills): each constant is
    zeros of the result's shape and dtype, found on the meta device, not the quantized weight.
    """
    from torchao.quantization.pt2e.constant_fold import replace_node_with_constant

    def result(op, args, kwargs):
        if compute:
            return op(*args, **kwargs)
        meta = fx.node.map_aggregate((args, kwargs), lambda a: (
            a.to("meta") if isinstance(a, torch.Tensor) else a))
        shaped = op(*meta[0], **meta[1])
        return torch.zeros(shaped.shape, dtype=shaped.dtype)

    quantize = (torch.ops.quantized_decomposed.quantize_per_channel.default,
                torch.ops.quantized_decomposed.quantize_per_tensor.default)
    for node in list(graph.graph.nodes):
        inputs = node.all_input_nodes
        if (node.op != "call_function" or node.target not in quantize or not inputs
                or any(source.op != "get_attr" for source in inputs)):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs),
                                       lambda source: attrgetter(source.target)(graph))
        with torch.no_grad():
            replace_node_with_constant(graph, node, result(node.target, args, kwargs))
    graph.graph.eliminate_dead_code()
    graph.recompile()
