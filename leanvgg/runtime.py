"""Turning a built model into a fast CPU executable: bf16 casting and AOTInductor packages."""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from pathlib import Path

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


MAX_BATCH = 1024  # the largest batch a package takes in one call (larger ones are split)


class Packaged(nn.Module):
    """A model compiled ahead of time by AOTInductor for N×3×s×s inputs, 1 ≤ N ≤ ``MAX_BATCH``.

    Nothing is traced or compiled when it runs (no Dynamo, hence no recompilation whatever the
    input's strides, batch size or grad mode). A batch runs as one batch: the classifier's
    weights are read once per batch instead of once per image (15 % faster at batch 8 than row
    by row, 2 % slower at batch 1 than a batch-1 package, same outputs to the bit; measured).
    """

    def __init__(self, runner, input_size: int) -> None:
        super().__init__()
        self.runner = runner
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The compiled code indexes its input as contiguous NCHW memory and does not check
        # strides: a channels-last view (what torchvision's preset returns) would be misread.
        x = x.contiguous()
        if x.shape[0] <= MAX_BATCH:
            return self.runner(x)
        return torch.cat([self.runner(chunk) for chunk in x.split(MAX_BATCH)])


def package(model: nn.Module, input_size: int, path: Path, *, threads: int) -> None:
    """Compile ``model`` with AOTInductor into the package file ``path`` (minutes at most), for
    running on ``threads`` threads.

    Inductor writes the thread count into the code it generates (``#pragma omp parallel
    num_threads(N)``, ``cpp.threads``), while the oneDNN kernels it calls use the thread count
    in force when they run: a package is made for one count (the caller keys it by that count)
    and is run under it.

    Freezing treats the weights as constants, which is what lets Inductor fold the INT8
    quantize/dequantize patterns into oneDNN INT8 kernels and prepack weights: without it the
    package runs the slow unfused graph (361 ms instead of 50 ms for int8_static, measured).
    Exporting under ``no_grad`` keeps the weights out of autograd, as freezing needs. The batch
    dimension stays symbolic (traced with 2 images: a batch of 1 would be specialised).

    AOTInductor writes the package's library (its weights inside: 276 MB for a VGG-19) and
    its C++ into Inductor's own cache folder unless told otherwise, where nothing ever reads
    or removes them (the package holds its own copy): an empty cache's first start left 711
    MB there, and every new set of weights as much again. They are written into a temporary
    folder instead, removed once the package is made.
    """
    import torch._inductor.config as inductor_config

    from leanvgg.quantize import StaticInt8

    # a PT2E graph exports as itself (it is fixed in eval mode); its wrapper only mirrors its
    # qparams for state dicts
    target = model.graph if isinstance(model, StaticInt8) else model.eval()
    example = torch.zeros(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with (torch.no_grad(), warnings.catch_warnings(),
          tempfile.TemporaryDirectory(prefix="leanvgg-aoti-") as scratch,
          inductor_config.patch({"freezing": True, "cpp.threads": threads,
                                 "aot_inductor.output_path": scratch})):
        # raised inside Inductor's own oneDNN lowering; nothing a user can act on
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")
        program = torch.export.export(target, (example,), dynamic_shapes=({0: batch},))
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def load_package(path: Path, input_size: int) -> Packaged:
    """A package made by ``package``; only ever call it on files from the user's own cache."""
    return Packaged(torch._inductor.aoti_load_package(str(path)), input_size)


def compile_for_cpu(model: nn.Module, input_size: int, *, threads: int
                    ) -> tuple[Packaged, float]:
    """``model`` compiled (``package`` into a temporary file, then loaded) and the seconds that
    took; for models that are measured once and not kept (the fidelity benchmark's)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="leanvgg-aoti-") as folder:
        path = Path(folder) / "model.pt2"
        package(model, input_size, path, threads=threads)
        compiled = load_package(path, input_size)
    return compiled, time.perf_counter() - start
