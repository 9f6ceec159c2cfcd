"""Dynamic INT8 quantization of the Linear layers (qint8 weights, activations quantized per call)."""

from __future__ import annotations

import copy
import warnings
from typing import Literal

import torch
from torch import nn

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


def _torchao_dynamic_int8(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantized = copy.deepcopy(model)  # quantize_ mutates its argument
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda module, _name: isinstance(module, nn.Linear))
    return quantized
