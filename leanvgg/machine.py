"""The machine a figure was measured on: the CPU's features and the libraries' versions.

Read here and only here; ``leanvgg.context.RunContext`` turns them into keys and records.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from functools import lru_cache

import torch
import torchvision

# the CPU features that decide which kernels run (SIMD width, INT8 dot products, bf16, AMX)
KERNEL_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
LIBRARIES = ("torch", "torchvision", "torchao", "onnxruntime", "openvino", "nncf", "onnx",
             "onnxscript")


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


def cpu_kind() -> str:
    """A short name for the kind of CPU, for file names of per-CPU results: ``amx`` (AMX-INT8),
    ``avx512-avxvnni`` (AVX-512 with AVX-VNNI too), ``avx512``, ``avx2`` or ``baseline``. The
    figures themselves carry every flag (``machine_facts``); this only tells the files apart."""
    flags = cpu_flags()
    if "amx_int8" in flags:
        return "amx"
    if "avx512f" in flags:
        return "avx512-avxvnni" if "avx_vnni" in flags else "avx512"
    return "avx2" if "avx2" in flags else "baseline"


def flags_hash() -> str:
    """A short hash of every CPU flag: compiled code and measurements hold only where it
    matches."""
    return hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]


def capability() -> str:
    """PyTorch's CPU capability (DEFAULT, AVX2, AVX512, ...)."""
    return torch.backends.cpu.get_cpu_capability()


def library_versions() -> dict[str, str | None]:
    """Every library a figure may depend on (None: not installed); read from the installed
    packages' metadata, without importing them."""
    return {name: _version(name) for name in LIBRARIES}


def machine_facts(threads: int) -> dict:
    """What a timing was measured on, recorded with every figure: CPU model, its kernel flags,
    PyTorch's CPU capability, threads and library versions (None: not installed)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "flags": [f for f in KERNEL_FLAGS if f in cpu_flags()],
            "capability": capability(), "cpu_flags_hash": flags_hash(),
            "logical_cpus": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "quantized_engine": torch.backends.quantized.engine,
            "python": platform.python_version(), "versions": library_versions()}


def _version(library: str) -> str | None:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return None
