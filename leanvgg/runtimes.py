"""Where a compiled variant runs: Inductor (leanvgg's AOTInductor package), ONNX Runtime or
OpenVINO, chosen by measuring them on this machine.

Which runtime is fastest for a model depends on the CPU (AVX2, AVX-512 VNNI, AMX), on the
libraries' versions and on the scenario (one image at a time, or batches), so with ``auto`` each
candidate runs the variant once per machine in a short round-robin at batch 1 and at batch
``BATCH``: single images run on the fastest at batch 1, batches on the fastest at batch
``BATCH`` unless the first is within ``SAME`` of it (``ByBatch`` routes between them). The
choice is stored with the CPU flags, the thread count and the versions it holds for, and reused
until one of them changes. Every runtime is fed the same model: the variant's own float weights
(pruned, fine-tuned) and, for INT8, its own calibration images, quantized by leanvgg's PT2E path
on Inductor and by the runtime's own quantizer elsewhere (ONNX Runtime's static QDQ, NNCF): the
INT8 decisions are the runtime's, the data are the same. Converted models are kept in the cache
like packages. Without the optional runtimes (``pip install 'leanvgg[export]'``) everything runs
on Inductor, as before.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leanvgg.builder import Builder, Variant
from leanvgg.export import calibration_of, float_model, refusal
from leanvgg.interop import (MissingRuntime, onnxruntime_runner, openvino_model,
                             openvino_runner, require, write_onnx, write_openvino)
from leanvgg.measure import machine_facts, time_models
from leanvgg.recipes import artifact_key
from leanvgg.runtime import machine_key
from leanvgg.store import RUNTIME_CHOICES

log = logging.getLogger(__name__)

INDUCTOR, ONNXRUNTIME, OPENVINO = "inductor", "onnxruntime", "openvino"
RUNTIMES = (INDUCTOR, ONNXRUNTIME, OPENVINO)
AUTO = "auto"
CHOICES = (AUTO, *RUNTIMES)
_FORMAT = {ONNXRUNTIME: "onnx", OPENVINO: "openvino"}  # the export format each one runs
_MODULES = {ONNXRUNTIME: ("onnx", "onnxruntime"), OPENVINO: ("openvino", "nncf")}
BATCH = 8  # the batch size the batch runtime is chosen at (the dashboard's throughput view)
# Batches stay on the single-image runtime unless another is faster by more than this: a
# smaller difference is run-to-run noise here (repeated runs differ by ~2 %), and one runtime
# holds one model in memory instead of two.
SAME = 0.02


class Foreign(nn.Module):
    """A model run by another runtime, called like a torch module (torch in, torch out)."""

    def __init__(self, run: Callable[[torch.Tensor], np.ndarray], runtime: str) -> None:
        super().__init__()
        self.run = run
        self.runtime = runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.run(x.contiguous())))


class ByBatch(nn.Module):
    """Single images on one runtime, batches on another: each scenario on its fastest.

    The batch model is made on the first batch (a converted model loads in seconds from the
    cache), so a process that never sees a batch never holds it.
    """

    def __init__(self, single: nn.Module, batched: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.single = single
        self.make_batched = batched
        self.made: list[nn.Module] = []  # the batch model, once made (outside the module tree)
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self.single(x)
        with self.lock:
            if not self.made:
                self.made.append(self.make_batched())
        return self.made[0](x)


def installed(runtime: str) -> bool:
    """Whether ``runtime``'s libraries import here (Inductor always does)."""
    try:
        for module in _MODULES.get(runtime, ()):
            require(module)
    except MissingRuntime:
        return False
    return True


def candidates(variant: Variant) -> list[str]:
    """The runtimes that can run ``variant`` here: compiled variants whose precision the other
    runtimes take (FP32, static INT8; not bf16) and whose libraries are installed."""
    if not variant.recipe.compiled:
        return []
    return [INDUCTOR, *(r for r in (ONNXRUNTIME, OPENVINO)
                        if refusal(variant.recipe, _FORMAT[r]) is None and installed(r))]


def choice_key(variant: Variant, threads: int) -> str:
    """What a choice holds for: these weights at this size, threads, CPU and versions."""
    machine, versions = machine_key(), machine_facts(threads)["versions"]
    libraries = ",".join(f"{k}={versions[k]}" for k in sorted(versions) if versions[k])
    return (f"{variant.name}|{variant.artifact}|{variant.input_size}px|threads={threads}|"
            f"cpu={machine['capability']}-{machine['cpu_flags']}|{libraries}")


def select(variant: Variant, builder: Builder, runtime: str = AUTO, *,
           runs: int = 10, warmup: int = 2,
           on_state: Callable[[str], object] = lambda state: None) -> Variant:
    """``variant`` running on ``runtime`` (``auto``: the fastest candidate here at batch 1 and,
    for batches, the fastest at batch ``BATCH``, measured once per machine and stored); its
    facts say which runtimes and why. A runtime that cannot run it, or is not installed, falls
    back to Inductor with one log line."""
    if runtime not in CHOICES:
        raise ValueError(f"Invalid runtime {runtime!r}. Choose from {', '.join(CHOICES)}.")
    usable = candidates(variant)
    if not usable or runtime == INDUCTOR or (runtime == AUTO and usable == [INDUCTOR]):
        return _on(variant, INDUCTOR if variant.recipe.compiled else "pytorch", None)
    if runtime != AUTO and runtime not in usable:
        why = (f"{runtime} is not installed (pip install 'leanvgg[export]')"
               if not installed(runtime) else refusal(variant.recipe, _FORMAT[runtime]))
        log.warning("%s runs on inductor: %s", variant.name, why)
        return _on(variant, INDUCTOR, {"asked": runtime, "fallback": why})
    threads = torch.get_num_threads()
    if runtime != AUTO:
        return _on(variant, runtime, {"asked": runtime}, _model(variant, runtime, builder))
    key = choice_key(variant, threads)
    stored = (builder.store.load_json(RUNTIME_CHOICES) or {}).get(key)
    if (isinstance(stored, dict) and stored.get("runtime") in usable
            and stored.get("batch_runtime") in usable and stored.get("batch_size") == BATCH):
        chosen, batched = stored["runtime"], stored["batch_runtime"]
        single = _model(variant, chosen, builder)
        model = single if batched == chosen else ByBatch(
            single, lambda: _model(variant, batched, builder))
        return _on(variant, chosen, stored, model)
    on_state("choosing runtime")
    runners = {r: _model(variant, r, builder) for r in usable}
    # the caller keeps other timings away meanwhile (the server holds its measurement slot)
    medians = _medians(runners, _example(variant, 1), runs=runs, warmup=warmup)
    per_batch = _medians(runners, _example(variant, BATCH), runs=max(3, runs // 2), warmup=1)
    chosen = min(medians, key=medians.get)
    batched = batch_runtime(per_batch, chosen)
    record = {"runtime": chosen, "medians_ms": medians, "runs": runs, "threads": threads,
              "batch_runtime": batched, "batch_size": BATCH, "batch_medians_ms": per_batch,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with builder.store.lock(RUNTIME_CHOICES):  # other processes may record theirs meanwhile
        choices = builder.store.load_json(RUNTIME_CHOICES) or {}
        builder.store.save_json(RUNTIME_CHOICES, {**choices, key: record})
    log.info("%s runs on %s (median ms at batch 1: %s) and batches on %s (per batch of %d: %s)",
             variant.name, chosen, ", ".join(f"{r} {ms:.1f}" for r, ms in medians.items()),
             batched, BATCH, ", ".join(f"{r} {ms:.1f}" for r, ms in per_batch.items()))
    single, batch_model = runners[chosen], runners[batched]  # the others are let go
    model = single if batched == chosen else ByBatch(single, lambda: batch_model)
    return _on(variant, chosen, record, model)


def batch_runtime(per_batch: dict[str, float], single: str) -> str:
    """The runtime for batches: the fastest at batch ``BATCH``, unless the single-image
    runtime ``single`` is within ``SAME`` of it."""
    fastest = min(per_batch, key=per_batch.get)
    return single if per_batch[single] <= (1 + SAME) * per_batch[fastest] else fastest


def _example(variant: Variant, batch: int) -> torch.Tensor:
    size = variant.input_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _medians(runners: dict[str, nn.Module], example: torch.Tensor, *, runs: int,
             warmup: int) -> dict[str, float]:
    timed = time_models({r: (m, example) for r, m in runners.items()}, runs=runs,
                        warmup=warmup)
    return {r: latency.median for r, (latency, _) in timed.items()}


def missing_runtimes_note() -> str | None:
    """One line for the log when ``auto`` has nothing to choose from, else None."""
    missing = [r for r in (ONNXRUNTIME, OPENVINO) if not installed(r)]
    if not missing:
        return None
    return (f"{' and '.join(missing)} not installed: compiled variants run on inductor "
            f"(pip install 'leanvgg[export]' lets leanvgg measure them and pick the fastest).")


def _on(variant: Variant, runtime: str, choice: dict | None,
        model: nn.Module | None = None) -> Variant:
    batches = (choice or {}).get("batch_runtime", runtime)
    return dataclasses.replace(variant, model=model if model is not None else variant.model,
                               facts={**variant.facts, "runtime": runtime,
                                      "batch_runtime": batches, "runtime_choice": choice})


def _model(variant: Variant, runtime: str, builder: Builder) -> nn.Module:
    """The variant on ``runtime``: its package for Inductor, else converted for the runtime
    (from the cache, or made and stored once)."""
    if runtime == INDUCTOR:
        return variant.model
    threads = torch.get_num_threads()
    if runtime == ONNXRUNTIME:
        path = _converted(variant, builder, ".onnx", lambda target: write_onnx(
            float_model(variant, builder), variant.input_size, target,
            calibration=calibration_of(variant)))
        return Foreign(onnxruntime_runner(path, threads), runtime)
    made: dict = {}

    def ir() -> object:  # converted (and quantized) once for both of its files
        if "model" not in made:
            made["model"] = openvino_model(float_model(variant, builder), variant.input_size,
                                           calibration=calibration_of(variant))
        return made["model"]

    def write(suffix: str) -> Callable[[Path], None]:
        def to(target: Path) -> None:
            with tempfile.TemporaryDirectory(prefix="leanvgg-ir-") as folder:
                write_openvino(ir(), Path(folder) / "model.xml")
                shutil.copyfile(Path(folder) / f"model{suffix}", target)
        return to

    xml = _converted(variant, builder, ".xml", write(".xml"))
    weights = _converted(variant, builder, ".bin", write(".bin"))
    core = require("openvino").Core()
    return Foreign(openvino_runner(core.read_model(str(xml), str(weights)), threads), runtime)


def _converted(variant: Variant, builder: Builder, suffix: str,
               write: Callable[[Path], None]) -> Path:
    """A converted model file in the store, keyed by the variant's weights, the suffix and
    the converting libraries' versions; made under the entry's lock when missing."""
    versions = machine_facts(1)["versions"]
    key = artifact_key(variant.artifact, {
        "op": "convert", "suffix": suffix, "input_size": variant.input_size,
        "versions": {k: versions[k] for k in ("onnx", "onnxruntime", "openvino", "nncf")}})
    found = builder.store.load_file(key, suffix)
    if found is None:
        with builder.store.lock(key):
            found = builder.store.load_file(key, suffix)
            if found is None:
                log.info("Converting %s for %s (one-off, then kept in the cache)",
                         variant.name, suffix)
                builder.store.save_file(key, suffix, write, {
                    "recipe": variant.name, "artifact": variant.artifact,
                    "converted": suffix, "input_size": variant.input_size})
                found = builder.store.load_file(key, suffix)
    return found[0]
