"""Turning a built model into a fast CPU executable: bf16 casting and Inductor compilation."""

from __future__ import annotations

import copy
import time
import warnings
from functools import lru_cache

import torch
from torch import nn


class Bf16(nn.Module):
    """Runs ``net`` with bf16 weights and activations in channels-last layout; FP32 in and out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        return self.net(x).float()


def to_bf16(model: nn.Module) -> Bf16:
    """A bf16, channels-last copy of ``model`` (the input is untouched)."""
    return Bf16(copy.deepcopy(model).to(torch.bfloat16).to(memory_format=torch.channels_last))


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is unavailable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """Whether the CPU computes in bf16 (AVX-512 BF16 or AMX); elsewhere bf16 is emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


RECOMPILE_LIMIT = 64  # compiled models × batch sizes in one process


class Compiled(nn.Module):
    """``model`` under ``torch.compile`` with Inductor's freezing on for every (re)compilation.

    Freezing treats the weights as constants, which is what lets Inductor fold the INT8
    quantize/dequantize patterns into oneDNN INT8 kernels and prepack weights; a recompilation
    without it (a new batch size, say) would silently run the slow unfused graph. Every
    compiled model of one class shares one code object and so one recompile budget (8 by
    default, after which Dynamo silently runs eager): the budget is raised, and exhausting it
    raises instead of slowing down unseen.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(model.eval())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True), dynamo_config.patch(
                recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True
        ), warnings.catch_warnings():
            # raised inside Inductor's own oneDNN lowering; nothing a user can act on
            warnings.filterwarnings("ignore", message="To copy construct from a tensor")
            return self.compiled(x)


def compile_for_cpu(model: nn.Module, input_size: int) -> tuple[Compiled, float]:
    """The compiled model, compiled at once by a first call, and the seconds that took.

    The first call (tracing, code generation, C++ compilation) runs under ``inference_mode``
    like the timed runs, so its one-off cost is reported apart from steady-state latency.
    """
    # Made outside inference mode like real inputs: an inference tensor would fail the
    # compiled code's guards on the first real call and trigger a second compilation.
    example = torch.zeros(1, 3, input_size, input_size)
    start = time.perf_counter()
    compiled = Compiled(model)
    with torch.inference_mode():
        compiled(example)
    return compiled, time.perf_counter() - start
