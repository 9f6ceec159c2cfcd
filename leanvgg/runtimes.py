"""Where a compiled variant runs: Inductor (leanvgg's AOTInductor package), ONNX Runtime or
OpenVINO, chosen by measuring them on this machine.

Which runtime is fastest for a model depends on the CPU (AVX2, AVX-512 VNNI, AMX), on the
libraries' versions, on the thread count and on the scenario (one image at a time, or
batches), so with ``auto`` each candidate runs the variant once per machine in a short
round-robin at batch 1 and at batch ``BATCH``: single images run on the fastest at batch 1,
batches on the fastest at batch ``BATCH`` unless the first is within ``SAME`` of it
(``ByBatch`` routes between them). The choice is stored under the variant's run context
(threads, CPU, versions: ``leanvgg.context``) and reused until one of them changes. The
runtime is decided before anything is compiled (``plan``): a variant that runs elsewhere never
has its package made. Every runtime runs the same model: a static INT8 variant's own PT2E
quantization (its INT8 weights and activation scales, calibrated once), exported to ONNX as
QDQ for ONNX Runtime and converted from that file for OpenVINO (``leanvgg.interop``); a float
variant's weights. Only the kernels differ. Every runner is built for
the context's thread count and called once before it is used. Converted models are kept in
the cache like packages. Without the optional runtimes (``pip install 'leanvgg[export]'``)
everything runs on Inductor, as before.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leanvgg.builder import Builder, NotBuilt, Variant, calibration_of, facts_of
from leanvgg.capabilities import (FORMAT_OF, INT8_STATIC, RUNTIME_OF, precision_of,
                                  runtime_refusal)
from leanvgg.context import (AUTO, INDUCTOR, ONNXRUNTIME, OPENVINO, OPENVINO_BF16, PYTORCH,
                             RUNTIMES, RunContext)
from leanvgg.facts import (EAGER, FALLBACK, MEASURED, ONLY, PENDING, PINNED, STORED,
                           Placement, State)
from leanvgg.interop import (WRITTEN_WITH, Runner, installed as modules_installed,
                             onnxruntime_runner, openvino_from_onnx, openvino_runner, write_onnx,
                             write_openvino)
from leanvgg.measure import time_models, warm_up
from leanvgg.recipes import Recipe, artifact_key
from leanvgg.residency import released
from leanvgg.documents import RUNTIME_CHOICES

log = logging.getLogger(__name__)

CHOICES = (AUTO, *RUNTIMES)
# per format (openvino and openvino_bf16 run one IR): the libraries that convert and run it
_MODULES = {"onnx": (*WRITTEN_WITH["onnx"], "onnxruntime"), "openvino": WRITTEN_WITH["openvino"]}
BATCH = 8  # the batch size the batch runtime is chosen at (the dashboard's throughput view)
# Batches stay on the single-image runtime unless another is faster by more than this: a
# smaller difference is run-to-run noise here (repeated runs differ by ~2 %), and one runtime
# holds one model in memory instead of two.
SAME = 0.02
# openvino_bf16 is kept among the candidates only where its top-1 agrees this often with the
# same IR run in f32 (the variant's own INT8 model) on the calibration photos' crops
AGREEMENT = 0.99


class Foreign(nn.Module):
    """A model run by another runtime, called like a torch module (torch in, torch out)."""

    def __init__(self, run: Runner, runtime: str) -> None:
        super().__init__()
        self.run = run
        self.runtime = runtime

    @property
    def settings(self) -> dict:
        """The settings the runtime reports it runs with (threads, precision hint)."""
        return self.run.settings

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
    """Whether ``runtime``'s libraries are installed here (Inductor always is); found without
    importing them."""
    return modules_installed(*_MODULES.get(FORMAT_OF.get(runtime), ()))


def candidates(recipe: Recipe) -> list[str]:
    """The runtimes that can run ``recipe``'s variant here (``leanvgg.capabilities``) and whose
    libraries are installed; none for eager recipes."""
    if runtime_refusal(recipe, INDUCTOR) is not None:
        return []
    return [INDUCTOR, *(r for r in (ONNXRUNTIME, OPENVINO, OPENVINO_BF16)
                        if runtime_refusal(recipe, r) is None and installed(r))]


def choice_key(recipe: Recipe, artifact: str, context: RunContext) -> str:
    """What a choice holds for: these weights at this size, the candidates measured (a new one,
    such as openvino_bf16, is measured before it is chosen or not), the threads, CPU and the
    versions of every candidate runtime."""
    return (f"{recipe.name}|{artifact}|{recipe.input_size}px|"
            f"candidates={','.join(candidates(recipe))}|"
            + context.on(AUTO).key("threads", "cpu", "versions"))


def plan(recipe: Recipe, builder: Builder, runtime: str = AUTO) -> Placement | None:
    """Where ``recipe``'s variant runs, decided from the recipe and the stored choice alone
    (nothing is built); None when ``auto`` has to measure first."""
    if runtime not in CHOICES:
        raise ValueError(f"Invalid runtime {runtime!r}. Choose from {', '.join(CHOICES)}.")
    threads = builder.context.threads
    usable = candidates(recipe)
    if not usable:
        return Placement(PYTORCH, PYTORCH, threads, EAGER, asked=runtime)
    if recipe.runtime is not None:  # tune measured it there: its budget holds there
        return Placement(recipe.runtime, recipe.runtime, threads, PINNED, asked=runtime,
                         reason=f"{recipe.name}'s accuracy and latency were measured on "
                                f"{recipe.runtime}")
    if runtime == AUTO and usable == [INDUCTOR]:
        return Placement(INDUCTOR, INDUCTOR, threads, ONLY, asked=runtime)
    if runtime != AUTO and runtime not in usable:
        why = (f"{runtime} is not installed (pip install 'leanvgg[export]')"
               if not installed(runtime) else runtime_refusal(recipe, runtime))
        log.warning("%s runs on inductor: %s", recipe.name, why)
        return Placement(INDUCTOR, INDUCTOR, threads, FALLBACK, asked=runtime, reason=why)
    if runtime != AUTO:
        return Placement(runtime, runtime, threads, PINNED, asked=runtime)
    stored = (builder.store.documents.load(RUNTIME_CHOICES) or {}).get(
        choice_key(recipe, builder.key(recipe), builder.context))
    try:
        placement = dataclasses.replace(Placement.from_dict(stored), how=STORED)
    except (KeyError, TypeError):
        return None
    if (placement.runtime in usable and placement.batch_runtime in usable
            and placement.batch_size == BATCH and placement.threads == threads):
        return placement
    return None


def select(recipe: Recipe, builder: Builder, runtime: str = AUTO, *,
           runs: int = 10, warmup: int = 2,
           on_state: Callable[[State], object] = lambda state: None) -> Variant:
    """``recipe``'s variant running where ``plan`` puts it, or (``auto`` with no stored
    choice) on the fastest candidate here at batch 1 and, for batches, the fastest at batch
    ``BATCH``, measured now and stored. Only what runs is built: a variant placed on ONNX
    Runtime or OpenVINO alone is never compiled for Inductor."""
    placement = plan(recipe, builder, runtime)
    if builder.load_only and (placement is None or placement.how == ONLY and not (
            builder.packages.facts(builder.key(builder.bind(recipe)), recipe.input_size))):
        # the builder process is measuring its choice, or compiling its only candidate
        return _pending(recipe, builder, runtime, on_state, compiling=placement is not None)
    if placement is None:
        return _measured(builder.variant(recipe, on_state), builder, runs=runs,
                         warmup=warmup, on_state=on_state)
    runs_on = {placement.runtime, placement.batch_runtime}
    variant = None
    if placement.how != EAGER and INDUCTOR not in runs_on:
        variant = _converted_only(recipe, builder, placement.runtime, on_state)
    if variant is None:
        variant = builder.variant(recipe, on_state, compiled=INDUCTOR in runs_on)
    if placement.how == EAGER:
        return dataclasses.replace(variant, placement=placement)
    single = _model(variant, placement.runtime, builder, on_state)
    model = single if placement.batch_runtime == placement.runtime else ByBatch(
        single, lambda: _model(variant, placement.batch_runtime, builder))
    return dataclasses.replace(variant, model=model, placement=placement)


def first_runtime(recipe: Recipe) -> str:
    """Where a builder process makes ``recipe``'s compiled variant ready first under ``auto``,
    before its runtime choice, so that the first start serves it sooner: ONNX Runtime where it
    can run it and is installed (exporting int8_static takes 5 s where compiling its Inductor
    package takes 20 s, on one core of the 2-core AVX-512 EPYC); PyTorch eager for a float or
    dynamic INT8 model, which runs on the same oneDNN and fbgemm kernels uncompiled (bf16:
    121.6 ms against its package's 108.6 ms there, batch 1, 2 threads; no compile at all);
    else Inductor (static INT8 eager would run reference kernels, slower than FP32). Its
    package is compiled afterwards, for the choice (``ahead_of_choice``)."""
    if ONNXRUNTIME in candidates(recipe):
        return ONNXRUNTIME
    return INDUCTOR if precision_of(recipe) == INT8_STATIC else PYTORCH


def _pending(recipe: Recipe, builder: Builder, asked: str,
             on_state: Callable[[State], object], *, compiling: bool = False) -> Variant:
    """The variant while the builder process has not stored its runtime choice (or, for a
    variant with Inductor as its only candidate, ``compiling``: its package) yet, on the
    runtime it was made ready on first (``first_runtime``): its stored ONNX Runtime
    conversion, else its Inductor package, else (PyTorch first) its eager model;
    ``NotBuilt`` while none is stored."""
    first = first_runtime(recipe)
    variant = (_converted_only(recipe, builder, first, on_state) if first == ONNXRUNTIME
               else None)
    if variant is not None:
        variant = dataclasses.replace(variant, model=_model(variant, first, builder, on_state))
    elif first == PYTORCH and builder.packages.facts(
            builder.key(builder.bind(recipe)), recipe.input_size) is None:
        variant = builder.variant(recipe, on_state, compiled=False)
    else:
        first, variant = INDUCTOR, builder.variant(recipe, on_state)
    awaited = ("its Inductor package (compiled by the builder process) is stored" if compiling
               else "the runtime choice (measured by the builder process) is stored")
    return dataclasses.replace(variant, placement=Placement(
        first, first, builder.context.threads, PENDING, asked=asked,
        reason=f"on {first} until {awaited}"))


def _measured(variant: Variant, builder: Builder, *, runs: int, warmup: int,
              on_state: Callable[[State], object]) -> Variant:
    on_state(State.CHOOSING)
    context = builder.context
    runners = {r: _model(variant, r, builder, on_state) for r in candidates(variant.recipe)}
    excluded = _unfaithful(runners, variant)
    for runtime in excluded:
        del runners[runtime]
    # the caller keeps its own timings away meanwhile (the server holds its measurement slot);
    # the store's timing lock keeps a server's away while a builder process times, one round
    # at a time: a comparison sent meanwhile waits for a round, not for the whole choice
    turns = builder.store.measuring
    medians = _medians(runners, _example(variant, 1), context, runs=runs, warmup=warmup,
                       turns=turns)
    per_batch = _medians(runners, _example(variant, BATCH), context,
                         runs=max(3, runs // 2), warmup=1, turns=turns)
    chosen = min(medians, key=medians.get)
    batched = batch_runtime(per_batch, chosen)
    placement = Placement(chosen, batched, context.threads, MEASURED, asked=AUTO,
                          medians_ms=medians, batch_size=BATCH, batch_medians_ms=per_batch,
                          runs=runs, excluded=excluded or None,
                          measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    key = choice_key(variant.recipe, variant.artifact, context)
    # other processes may record theirs meanwhile
    builder.store.documents.update(RUNTIME_CHOICES, lambda choices: {
        **choices, key: placement.to_dict()})
    log.info("%s runs on %s (median ms at batch 1, %d threads: %s) and batches on %s (per "
             "batch of %d: %s)", variant.name, chosen, context.threads,
             ", ".join(f"{r} {ms:.1f}" for r, ms in medians.items()), batched, BATCH,
             ", ".join(f"{r} {ms:.1f}" for r, ms in per_batch.items()))
    single, batch_model = runners[chosen], runners[batched]  # the others are let go
    model = single if batched == chosen else ByBatch(single, lambda: batch_model)
    return dataclasses.replace(variant, model=model, placement=placement)


def _unfaithful(runners: dict[str, nn.Module], variant: Variant) -> dict[str, str]:
    """The candidates that would change what the variant predicts, with why: openvino_bf16
    unless its top-1 agrees with the same IR in f32 on at least ``AGREEMENT`` of the
    calibration photos' crops (real photos; bf16 changes the precision, not the INT8 model)."""
    if OPENVINO_BF16 not in runners or OPENVINO not in runners:
        return {}
    images = calibration_of(variant.recipe)
    if images is None:
        return {}
    with torch.inference_mode():
        ours, reference = (torch.cat([runners[r](row[None]) for row in images]).argmax(1)
                           for r in (OPENVINO_BF16, OPENVINO))
    agreement = float((ours == reference).float().mean())
    log.info("%s: %s agrees with %s on top-1 for %.1f %% of %d calibration crops",
             variant.name, OPENVINO_BF16, OPENVINO, 100 * agreement, len(images))
    if agreement >= AGREEMENT:
        return {}
    return {OPENVINO_BF16: f"top-1 agrees with {OPENVINO} (f32) on {100 * agreement:.1f} % of "
                           f"{len(images)} calibration crops, below {100 * AGREEMENT:g} %"}


def batch_runtime(per_batch: dict[str, float], single: str) -> str:
    """The runtime for batches: the fastest at batch ``BATCH``, unless the single-image
    runtime ``single`` is within ``SAME`` of it."""
    fastest = min(per_batch, key=per_batch.get)
    return single if per_batch[single] <= (1 + SAME) * per_batch[fastest] else fastest


def _example(variant: Variant, batch: int) -> torch.Tensor:
    size = variant.input_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _medians(runners: dict[str, nn.Module], example: torch.Tensor, context: RunContext, *,
             runs: int, warmup: int, turns: Callable[[], AbstractContextManager]
             ) -> dict[str, float]:
    timed = time_models({r: (m, example) for r, m in runners.items()}, runs=runs,
                        warmup=warmup, threads=context.threads, turns=turns)
    return {r: latency.median for r, (latency, _) in timed.items()}


def missing_runtimes_note() -> str | None:
    """One line for the log when ``auto`` has nothing to choose from, else None."""
    missing = [r for r in (ONNXRUNTIME, OPENVINO) if not installed(r)]
    if not missing:
        return None
    return (f"{' and '.join(missing)} not installed: compiled variants run on inductor "
            f"(pip install 'leanvgg[export]' lets leanvgg measure them and pick the fastest).")


def _model(variant: Variant, runtime: str, builder: Builder,
           on_state: Callable[[State], object] = lambda state: None) -> nn.Module:
    """The variant on ``runtime`` for the builder's thread count: its package for Inductor,
    else converted for the runtime (from the cache, or made and stored once) and called once."""
    if runtime == INDUCTOR:
        return variant.model
    threads = builder.context.threads
    paths = _converted(variant, builder, runtime, on_state,
                       _writer(variant, runtime, builder, on_state))
    if runtime == ONNXRUNTIME:
        runner, source = onnxruntime_runner, paths[".onnx"]
    else:
        source = paths[".xml"]  # its .bin beside it
        # openvino: the f32 hint; openvino_bf16: OpenVINO's default precision
        runner = functools.partial(openvino_runner, f32=runtime == OPENVINO)
    with released():  # the file it mapped (OpenVINO's .bin), once it has its own copy
        model = Foreign(runner(source, threads), runtime)
        warm_up(model, variant.input_size, threads)
    return model


def _writer(variant: Variant, runtime: str, builder: Builder,
            on_state: Callable[[State], object] = lambda state: None
            ) -> Callable[[dict[str, Path]], None]:
    """What writes the variant's conversion for ``runtime`` into the store's target files,
    one per suffix: its portable model (a static INT8 variant's own quantization) as ONNX;
    for OpenVINO, OpenVINO's conversion of that ONNX file (made and stored first if need
    be, so both runtimes run one export)."""
    if runtime == ONNXRUNTIME:
        return lambda targets: write_onnx(builder.portable_model(variant.recipe),
                                          variant.input_size, targets[".onnx"])

    def write(targets: dict[str, Path]) -> None:
        onnx = _converted(variant, builder, ONNXRUNTIME, on_state,
                          _writer(variant, ONNXRUNTIME, builder))[".onnx"]
        with tempfile.TemporaryDirectory(prefix="leanvgg-ir-") as folder:
            write_openvino(openvino_from_onnx(onnx), Path(folder) / "model.xml")
            for suffix, target in targets.items():
                shutil.copyfile(Path(folder) / f"model{suffix}", target)

    return write


def ahead_of_choice(recipe: Recipe, builder: Builder) -> list[str]:
    """The formats ``auto`` needs made before it times ``recipe``'s variant: its Inductor
    package (pt2) and its conversions (onnx, openvino), in that order; its package alone when
    Inductor is its only candidate; none when its choice is stored already or pinned. Work that a process with nothing
    else to build can do ahead of the choice (``make_ahead``)."""
    placement = plan(recipe, builder, AUTO)
    if placement is not None:  # stored, pinned, or nothing to choose from
        # the package of a variant ready first elsewhere (eager) when Inductor is all it has
        return [FORMAT_OF[INDUCTOR]] if placement.how == ONLY else []
    return list(dict.fromkeys(FORMAT_OF[r] for r in candidates(recipe)))


def make_ahead(recipe: Recipe, builder: Builder, format_: str,
               on_state: Callable[[State], object] = lambda state: None) -> None:
    """Store ``recipe``'s package (pt2) or conversion (onnx, openvino) unless stored, timing
    and loading nothing: a builder's helper makes them while the builder still builds, so
    that the runtime choice, timed by one process alone, finds them made. A conversion's
    manifest keeps the facts of the variant's ONNX conversion (made first, ``first_runtime``)
    or its package (once another process compiling it is done), else the eager variant's."""
    recipe = builder.bind(recipe)
    runtime = RUNTIME_OF[format_]
    if runtime == INDUCTOR:
        builder.compile_ahead(recipe, on_state)
        return
    artifact = builder.key(recipe)
    # facts without waiting for another process's compile
    variant = _converted_only(recipe, builder, ONNXRUNTIME, on_state)
    if variant is None:
        with builder.store.lock(builder.packages.key(artifact, recipe.input_size)):
            facts = builder.packages.facts(artifact, recipe.input_size)  # if compiling
        variant = (Variant(recipe, None, facts_of(facts), artifact, builder.context)
                   if facts is not None else builder.variant(recipe, on_state, compiled=False))
    _converted(variant, builder, runtime, on_state,
               _writer(variant, runtime, builder, on_state))


def stored_conversion(variant: Variant, builder: Builder, format_: str) -> dict[str, Path] | None:
    """The files (``{suffix: path}``, hashes checked) of ``variant``'s conversion to
    ``format_`` (onnx, openvino) as the store keeps it for the runtime that runs it: what
    leanvgg runs there. None when none is stored (the runtime choice stores them)."""
    found = builder.store.load_files(
        _conversion_key(variant.artifact, variant.input_size, RUNTIME_OF[format_], builder),
        _SUFFIXES[format_])
    return found[0] if found is not None else None


_SUFFIXES = {"onnx": (".onnx",), "openvino": (".xml", ".bin")}  # a conversion's files, per format


def _conversion_key(artifact: str, input_size: int, runtime: str, builder: Builder) -> str:
    """A converted model's key: the variant's weights, the format, the input size and the
    converting libraries' versions (openvino and openvino_bf16 run one IR)."""
    return artifact_key(artifact, {
        "op": "convert", "format": FORMAT_OF[runtime], "input_size": input_size,
        "context": builder.context.on(_converts_for(runtime)).key("runtime", "versions")})


def _converts_for(runtime: str) -> str:
    """The runtime a conversion is made and recorded for (openvino for openvino_bf16)."""
    return RUNTIME_OF[FORMAT_OF[runtime]]


def _converted_only(recipe: Recipe, builder: Builder, runtime: str,
                    on_state: Callable[[State], object]) -> Variant | None:
    """The variant without its eager model, for one that runs only on ``runtime`` (ONNX
    Runtime or OpenVINO): its facts from the stored conversion, so that the eager weights
    (and what loading a PT2E graph costs: 814 MB RSS for turbo's, measured) are never loaded;
    None when the conversion is not stored or predates facts in its manifest."""
    recipe = builder.bind(recipe)
    artifact = builder.key(recipe)
    manifest = builder.store.manifest(
        _conversion_key(artifact, recipe.input_size, runtime, builder),
        _SUFFIXES[FORMAT_OF[runtime]])
    facts = manifest and manifest.get("facts")  # its files are checked when they are loaded
    if not isinstance(facts, dict):
        return None
    try:
        facts = facts_of(facts)
    except (KeyError, TypeError, ValueError):
        return None
    on_state(State.BUILDING)
    return Variant(recipe, None, facts, artifact, builder.context)


def _converted(variant: Variant, builder: Builder, runtime: str,
               on_state: Callable[[State], object],
               write: Callable[[dict[str, Path]], None]) -> dict[str, Path]:
    """A converted model in the store (one entry, however many files: OpenVINO's .xml and
    .bin), keyed by ``_conversion_key``, with the variant's facts in its manifest; made by
    ``write`` (one path per suffix) under the entry's lock when missing."""
    key = _conversion_key(variant.artifact, variant.input_size, runtime, builder)
    suffixes = _SUFFIXES[FORMAT_OF[runtime]]
    found = builder.store.load_files(key, suffixes)
    if found is None and builder.load_only:
        raise NotBuilt(f"{variant.name}: its {FORMAT_OF[runtime]} conversion is not in the "
                       "cache yet")
    if found is None:
        with builder.store.lock(key):
            found = builder.store.load_files(key, suffixes)
            if found is None:
                on_state(State.CONVERTING)
                log.info("Converting %s for %s (one-off, then kept in the cache)",
                         variant.name, runtime)
                builder.store.save_files(
                    key, suffixes, write,
                    {"recipe": variant.name, "artifact": variant.artifact,
                     "facts": variant.facts.to_dict(),
                     "converted": FORMAT_OF[runtime], "input_size": variant.input_size,
                     "context": builder.context.on(_converts_for(runtime)).record()})
                found = builder.store.load_files(key, suffixes)
    return found[0]
