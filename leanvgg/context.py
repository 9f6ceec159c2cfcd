"""The execution context: what a figure or a cache entry holds for.

A latency, an accuracy, a compiled package, a converted model or a runtime choice is true only
for the runtime that ran it, the thread count it ran with, the batch scenario, the CPU kind and
the libraries' versions. ``RunContext`` holds all of them as one frozen value, made once at the
edge (the CLI, the server, the Python API) and passed down; every key and record that depends
on them is made by ``RunContext.key`` from the parts it names, so no two keys can disagree on
what a part means, and nothing reads torch's global thread count to decide a key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from leanvgg.machine import capability, flags_hash, library_versions

PYTORCH, INDUCTOR, ONNXRUNTIME, OPENVINO = "pytorch", "inductor", "onnxruntime", "openvino"
# OpenVINO at its own default precision: what is not INT8 runs in bf16 on CPUs with native bf16
# (``openvino`` is the same IR with the f32 hint, as on the other runtimes). The precision is a
# setting of the runtime, so it is a runtime of its own here: every key, choice, profile and
# accuracy says which one ran.
OPENVINO_BF16 = "openvino_bf16"
AUTO = "auto"  # not a runtime: the fastest of the candidates, measured here
RUNTIMES = (INDUCTOR, ONNXRUNTIME, OPENVINO, OPENVINO_BF16)
# The libraries whose versions a runtime's results depend on (torch converts for every one).
RUNTIME_LIBRARIES = {
    PYTORCH: ("torch", "torchao"),
    INDUCTOR: ("torch", "torchao"),
    # a static INT8 model is torchao's PT2E quantization, exported to ONNX (QDQ); OpenVINO
    # converts that ONNX file
    ONNXRUNTIME: ("torch", "torchao", "onnx", "onnxscript", "onnxruntime"),
    OPENVINO: ("torch", "torchao", "onnx", "onnxscript", "openvino"),
    OPENVINO_BF16: ("torch", "torchao", "onnx", "onnxscript", "openvino"),
}
RUNTIME_LIBRARIES[AUTO] = tuple(dict.fromkeys(
    lib for r in (INDUCTOR, ONNXRUNTIME, OPENVINO) for lib in RUNTIME_LIBRARIES[r]))
PARTS = ("runtime", "threads", "batch", "cpu", "versions")  # what ``key`` may name, in order


@dataclass(frozen=True)
class RunContext:
    """Threads, batch scenario, runtime, CPU kind (capability and flags hash) and versions."""

    threads: int
    runtime: str = INDUCTOR
    batch: int = 1
    # read when a context is made (looked up here, so a test can stand in another machine)
    capability: str = field(default_factory=lambda: capability())
    cpu_flags: str = field(default_factory=lambda: flags_hash())
    versions: tuple[tuple[str, str | None], ...] = field(
        default_factory=lambda: tuple(sorted(library_versions().items())))

    def __post_init__(self) -> None:
        if self.threads < 1 or self.batch < 1:
            raise ValueError(f"Invalid context {self}: threads and batch are at least 1.")
        if self.runtime not in RUNTIME_LIBRARIES:
            raise ValueError(f"Invalid runtime {self.runtime!r}. Choose from "
                             f"{', '.join(RUNTIME_LIBRARIES)}.")

    @classmethod
    def here(cls, threads: int | None = None, **fields) -> RunContext:
        """This machine, with ``threads`` (None: PyTorch's current setting, read once here)."""
        return cls(threads=threads or torch.get_num_threads(), **fields)

    def on(self, runtime: str) -> RunContext:
        return dataclasses.replace(self, runtime=runtime)

    def at_batch(self, batch: int) -> RunContext:
        return dataclasses.replace(self, batch=batch)

    def libraries(self) -> dict[str, str | None]:
        """The versions of the libraries this context's runtime depends on."""
        versions = dict(self.versions)
        return {name: versions.get(name) for name in RUNTIME_LIBRARIES[self.runtime]}

    def key(self, *parts: str) -> str:
        """The parts named (of ``PARTS``), always in the same order and spelling: e.g.
        ``runtime=inductor|threads=2|cpu=AMX-1a2b…|torch=2.14.1,torchao=0.18.0``."""
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"Invalid key parts {sorted(unknown)}. Choose from {PARTS}.")
        values = {"runtime": f"runtime={self.runtime}", "threads": f"threads={self.threads}",
                  "batch": f"batch={self.batch}",
                  "cpu": f"cpu={self.capability}-{self.cpu_flags}",
                  "versions": ",".join(f"{k}={v}" for k, v in sorted(self.libraries().items())
                                       if v)}
        return "|".join(values[part] for part in PARTS if part in parts)

    def record(self) -> dict:
        """The context as a JSON object (every row and stored figure carries one)."""
        return {"runtime": self.runtime, "threads": self.threads, "batch": self.batch,
                "capability": self.capability, "cpu_flags_hash": self.cpu_flags,
                "versions": self.libraries()}
