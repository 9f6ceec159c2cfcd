"""The registry: which variants exist (the recipes, plus ``tuned`` once ``leanvgg tune`` chose
one), and preparing them by name through the one builder (``leanvgg.builder``)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from leanvgg.builder import Builder, Variant, evaluation_key
from leanvgg.context import RunContext
from leanvgg.facts import Accuracy, State
from leanvgg.distributed import rank_zero_first
from leanvgg.finetune import fine_tune_step
from leanvgg.models import Baseline
from leanvgg.recipes import (RECIPES, QuantizeStaticInt8, Recipe, at_input_size, bind,
                             tuned_recipe)
from leanvgg.machine import native_bf16
from leanvgg.runtimes import (AUTO, CHOICES, INDUCTOR, ONNXRUNTIME, PYTORCH, ahead_of_choice,
                              first_runtime, make_ahead, missing_runtimes_note, select)
from leanvgg.documents import EVALUATION, TUNED
from leanvgg.residency import trim
from leanvgg.store import Store

if TYPE_CHECKING:
    from leanvgg.service.worker import Event as BuildEvent


log = logging.getLogger(__name__)


class NotTuned(LookupError):
    """``tuned`` was asked for, but ``leanvgg tune`` has not chosen one for these weights."""


@dataclass(frozen=True)
class VariantSet:
    baseline: Baseline
    variants: dict[str, Variant]
    # what built them (its cache): exporting a variant reuses its artifacts and packages
    builder: Builder | None = field(default=None, repr=False, compare=False)

    @property
    def threads(self) -> int | None:
        """The thread count the compiled variants were made for (their packages and runtime
        sessions run on it); None when every variant is eager (it runs on any count)."""
        counts = {v.context.threads for v in self.variants.values() if v.runtime != "pytorch"}
        return counts.pop() if len(counts) == 1 else None


def default_names(registry: Mapping[str, Recipe] = RECIPES) -> list[str]:
    """Every registered variant, except bf16 where the CPU only emulates bf16 (slower than FP32)."""
    return [name for name, recipe in registry.items()
            if not recipe.needs_native_bf16 or native_bf16()]


def resolve_names(names: Iterable[str] | None,
                  registry: Mapping[str, Recipe] = RECIPES) -> list[str]:
    """Validated variant names in registry order (``default_names()`` when ``names`` is None)."""
    if names is None:
        return default_names(registry)
    names = list(names)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"Invalid variants {unknown}. Known variants: {', '.join(registry)}.")
    return [n for n in registry if n in names]


def registry_for(baseline: Baseline, store: Store,
                 calibration: str | None = None) -> dict[str, Recipe]:
    """The registered recipes, plus ``tuned`` when ``leanvgg tune`` chose one for these weights.

    ``calibration``: a folder of images that replaces the bundled photos in every registered
    static-INT8 step (its content hash is part of the artifacts' keys). ``tuned`` keeps the
    calibration its search measured: it is that very artifact.
    """
    registry = {name: dataclasses.replace(recipe, steps=tuple(
        dataclasses.replace(step, calibration=str(Path(calibration).resolve()))
        if calibration is not None and isinstance(step, QuantizeStaticInt8) else step
        for step in recipe.steps)) for name, recipe in RECIPES.items()}
    # sizes relative to the model's own input size, structure to its layout
    registry = {name: bind(at_input_size(recipe, baseline.input_size), baseline.model)
                for name, recipe in registry.items()}
    config = store.documents.load(TUNED)
    if config is not None and config.get("weights") == baseline.weights_id:
        try:
            registry[TUNED] = tuned_recipe(config)
        except (KeyError, TypeError, ValueError):
            pass  # a choice recorded by an older leanvgg: run 'leanvgg tune' again
    return registry


def register_tuned(baseline: Baseline, config: dict, store: Store) -> Recipe:
    """Record ``leanvgg tune``'s choice so ``compare`` and the dashboard show it as ``tuned``.

    ``config`` (``tune.tuned_config``) holds everything its recipe needs; the recipe names the
    cache entries the search built, so nothing is built or fine-tuned again.
    """
    config = {**config, "weights": baseline.weights_id}
    recipe = tuned_recipe(config)
    store.documents.save(TUNED, config)
    return recipe


def build_variants(baseline: Baseline, names: Iterable[str] | None = None, *,
                   store: Store | None = None, progress: bool = True,
                   calibration: str | None = None, runtime: str = INDUCTOR,
                   threads: int | None = None) -> VariantSet:
    """Every requested variant, from the cache when a valid entry exists, else built and stored,
    each made for running on ``threads`` threads (None: PyTorch's current setting).

    Recipes that produce the same weights (baseline and res160) share one model in memory.
    """
    builder = VariantBuilder(baseline, store if store is not None else Store(), calibration,
                             runtime=runtime, threads=threads)
    names = builder.resolve(names)
    with rank_zero_first():  # under torchrun the other ranks then load what rank 0 built
        variants = {name: builder.prepare(name)
                    for name in tqdm(names, desc="variants", unit="variant",
                                     disable=not progress)}
    return VariantSet(baseline, variants, builder.builder)


class VariantBuilder:
    """Prepares named variants one at a time (the dashboard shows each as it becomes ready)."""

    def __init__(self, baseline: Baseline, store: Store, calibration: str | None = None, *,
                 runtime: str = INDUCTOR, threads: int | None = None,
                 measuring: AbstractContextManager = contextlib.nullcontext(),
                 load_only: bool = False) -> None:
        """``runtime``: where compiled variants run (``leanvgg.runtimes``: inductor, auto,
        onnxruntime, openvino); ``threads``: the thread count every runtime is set up for and
        every figure holds for (None: PyTorch's current setting, read once here);
        ``measuring``: held while a variant is prepared (the server's
        measurement slot), so that no comparison runs meanwhile: building, compiling and
        converting go through ``torch.export``, whose tracing is not thread-safe (a request
        running beside it had its tensors traced and failed), and choosing a runtime times
        things, which must not overlap with other timings. ``load_only``: load what is in
        the cache and nothing else (``NotBuilt`` for a variant that is not; auto's choice
        pending until a builder process stores it): the server's mode."""
        if runtime not in CHOICES:
            raise ValueError(f"Invalid runtime {runtime!r}. Choose from {', '.join(CHOICES)}.")
        self.baseline = baseline
        self.store = store
        self.registry = registry_for(baseline, store, calibration)
        self.accuracy = store.documents.load(EVALUATION) or {}
        self.builder = Builder(baseline, store, RunContext.here(threads), load_only=load_only)
        self.runtime = runtime
        self.measuring = measuring
        note = missing_runtimes_note() if runtime == AUTO else None
        if note:
            log.warning(note)

    def resolve(self, names: Iterable[str] | None) -> list[str]:
        """Validated names in registry order; ``tuned`` only once ``leanvgg tune`` chose one."""
        if names is not None:
            names = list(names)
            if TUNED in names and TUNED not in self.registry:
                raise NotTuned("No 'tuned' variant for these weights yet: run 'leanvgg tune' "
                               "first.")
        return resolve_names(names, self.registry)

    def claim_key(self, name: str) -> str:
        """What a process claims to build ``name`` (``Store.claim``): the name and its weights."""
        return f"{name}.{self.builder.key(self.registry[name])}"

    def prepare(self, name: str, on_state: Callable[[State], object] = lambda state: None,
                *, runtime: str | None = None) -> Variant:
        """The ready variant, with the latest evaluation of these very weights on the runtime
        it runs on, if any; ``runtime``: instead of the builder's own."""
        with self.measuring:
            variant = select(self.registry[name], self.builder, runtime or self.runtime,
                             on_state=on_state)
        trim()  # what loading freed (the skeleton its weights replaced) leaves the process
        measured = self.accuracy.get(evaluation_key(variant))
        try:
            accuracy = Accuracy.from_dict(measured) if measured else None
        except (KeyError, TypeError, ValueError):  # an older or damaged record: not shown
            accuracy = None
        return dataclasses.replace(variant, accuracy=accuracy) if accuracy else variant


def finetune_variant(baseline: Baseline, dataset: Dataset, membership: torch.Tensor, *,
                     name: str = "pruned", store: Store | None = None,
                     **train) -> tuple[nn.Module, dict]:
    """Fine-tune ``name``'s model as it stands before its FineTune step and cache the result.

    Every recipe sharing that step (pruned and pruned_quantized) uses the new weights from its
    next build. Under torchrun only rank 0 writes. Returns the trained model and the facts
    stored with it.
    """
    store = store if store is not None else Store()
    recipe = registry_for(baseline, store)[resolve_names([name])[0]]
    builder = Builder(baseline, store)
    model, facts, _ = fine_tune_step(builder, recipe, dataset, membership, replace=True, **train)
    return model, facts


def build_in_stages(baseline: Baseline, names: Iterable[str] | None, *, store: Store,
                    calibration: str | None, runtime: str, threads: int | None,
                    emit: Callable[..., object],
                    beside: Callable[[list[str], int], Iterable[BuildEvent]] | None = None,
                    helper: bool = False) -> None:
    """What a builder process does for a server: every variant into the cache, ready to run,
    first (on the runtime pinned; under ``auto``, on ``first_runtime``: ONNX Runtime, whose
    export costs a quarter of Inductor's compile, or uncompiled), then, under ``auto``, each
    compiled variant's package made and its runtime choice measured and stored. ``emit(variant, state, reason=None, runtime=None)`` hears each
    state, ``built`` once a variant can be loaded, ``placed`` once its choice is stored, and
    ``failed``. Models are let go as soon as they are stored: the server loads its own.

    Each variant of the first stage is built by whoever claims it first (``Store.claim``):
    ``beside(names, threads)`` starts another process doing the same first stage meanwhile (a
    builder process's helper: compiling leaves a core idle half the time) and gives its
    events, which are passed on to ``emit``; what it built gets its runtime choice here. A
    variant it claimed but never finished (it died) is built here after it ends. Under
    ``auto``, once every variant is claimed, each process goes on with the packages and
    conversions the choice will time (``runtimes.make_ahead``), claimed the same way, so that
    the choice (timed here alone, after the helper ended) finds them made. While two processes build,
    each computes on half the cores: two at full width oversubscribe the machine (every
    variant but turbo_svd ready in 89 s instead of 137 s on two cores). ``helper``: this is
    the helper, which builds only what it claims and chooses no runtime."""
    first = VariantBuilder(baseline, store, calibration, threads=threads,
                           runtime=INDUCTOR if runtime == AUTO else runtime)
    names = first.resolve(names)
    order = longest_first(names, first.registry)
    lock = threading.Lock()
    cores = torch.get_num_threads()

    def said(*args, **kwargs) -> None:  # one line at a time, from either thread
        with lock:
            emit(*args, **kwargs)

    built, done = set(), set()  # built: in the cache; done: built or failed, by either
    # the static INT8 models this process made ready on ONNX Runtime, whose packages are
    # still to compile ahead (artifact key by name): kept in memory for that instead of
    # reloaded from the store (a PT2E model's reload is its skeleton's export, preparation
    # and conversion: 4-7 s each on one core, measured)
    held: dict[str, str] = {}
    started = threading.Event()  # the helper has begun (its imports take seconds)

    def hear() -> None:
        try:
            for event in beside(names, first.builder.context.threads):
                started.set()
                said(event.variant, event.state, reason=event.reason, runtime=event.runtime)
                if event.state in ("built", State.FAILED.value):
                    with lock:
                        done.add(event.variant)
                        if event.state == "built":
                            built.add(event.variant)
        except Exception as err:  # what it left undone is built here
            log.warning("The helper builder stopped: %s", err)

    listener = threading.Thread(target=hear, daemon=True, name="leanvgg-builder-beside")

    def width() -> int:  # the cores this process computes on now
        # (all of them while the helper still starts: its imports leave a core idle)
        side_by_side = helper or listener.is_alive() and started.is_set()
        return max(1, cores // 2) if side_by_side else cores

    def ready_first(name: str) -> tuple[Variant, str]:
        """The variant ready to run, and where it runs until its runtime is chosen."""
        def on_state(state: State) -> None:
            said(name, state.value)

        recipe = first.registry[name]
        where = first_runtime(recipe) if runtime == AUTO and recipe.compiled else first.runtime
        try:
            if where == PYTORCH:  # uncompiled: its package is compiled after
                return first.builder.variant(recipe, on_state, compiled=False), where
            if where != first.runtime:
                variant = first.prepare(name, on_state, runtime=where)
                return variant, variant.runtime
        except Exception:  # the runtime choice says why, if it fails there too
            log.exception("Making %s ready on %s failed: on %s instead", name, where,
                          first.runtime)
        variant = first.prepare(name, on_state)
        return variant, variant.runtime

    def build(claiming: bool) -> None:
        for name in order:
            if name in done or (claiming and not store.claim(first.claim_key(name))):
                continue
            torch.set_num_threads(width())
            try:
                variant, runs_on = ready_first(name)
            except Exception as err:  # one variant's failure never takes the others down
                log.exception("Variant %s failed", name)
                said(name, State.FAILED.value, reason=failure_reason(err))
                done.add(name)
                continue
            said(name, "built", runtime=runs_on)
            built.add(name)
            done.add(name)
            if (runtime == AUTO and runs_on == ONNXRUNTIME  # its PT2E model: costly to reload
                    and "pt2" in ahead_of_choice(variant.recipe, first.builder)):
                held[name] = variant.artifact
            del variant
            first.builder.forget(keep=held.values())

    def ahead() -> None:  # of the choice; what is left is made when the choice is
        # every package first (the longest items, ~20 s each), then the conversions (seconds
        # each), so that neither process is left compiling alone at the end
        work = [(name, format_) for name in order
                if first.registry[name].compiled and not (name in done and name not in built)
                for format_ in ahead_of_choice(first.registry[name], first.builder)]
        # (the packages of the models this process holds first: the other process reloads
        # a model only for what it claims of ours)
        for name, format_ in sorted(work, key=lambda item: (item[1] != "pt2",
                                                            item[0] not in held)):
            recipe = first.registry[name]
            if format_ == "pt2":  # compiled here now (from memory) or by the other process
                held.pop(name, None)
            if not store.claim(f"ahead.{format_}.{first.claim_key(name)}"):
                continue
            torch.set_num_threads(width())
            try:
                make_ahead(recipe, first.builder, format_,
                           lambda state, name=name: said(name, state.value))
            except Exception:  # the choice makes it again, and says why it cannot
                log.exception("Making %s's %s ahead of its runtime choice failed", name,
                              format_)
            first.builder.forget(keep=held.values())
        held.clear()
        first.builder.forget()

    if beside is not None:
        listener.start()
    try:
        build(claiming=True)
        if runtime == AUTO:
            ahead()
        if beside is not None:
            listener.join()
    finally:
        torch.set_num_threads(cores)
    if not helper:  # what others claimed and left undone (a helper that stopped), or that
        build(claiming=False)  # another server's builder holds: its entry locks wait for it
    store.release_claims()
    if runtime != AUTO or helper:
        return
    second = VariantBuilder(baseline, store, calibration, threads=threads, runtime=AUTO)
    for name in names:
        if name not in built or not second.registry[name].compiled:
            continue
        try:
            variant = second.prepare(name, lambda state, name=name: said(name, state.value))
        except Exception as err:  # it stays where it runs now
            log.exception("Choosing a runtime for %s failed", name)
            said(name, "placed", reason=f"the runtime choice failed: {failure_reason(err)}")
            continue
        said(name, "placed", runtime=variant.runtime)
        del variant
        second.builder.forget()


def longest_first(names: Iterable[str], registry: Mapping[str, Recipe]) -> list[str]:
    """The order two processes claim variants to build in: eager ones first (seconds each:
    the article's five are ready soonest), then compiled ones with the most automatic steps
    first (turbo_svd's pruning and two SVDs before int8_static's quantization alone), so that
    the longest is not the one left running alone at the end; otherwise in registry order."""
    def rank(name: str) -> tuple[bool, int]:
        recipe = registry[name]
        return recipe.compiled, -sum(step.automatic for step in recipe.steps) * recipe.compiled

    return sorted(names, key=rank)


def failure_reason(err: Exception) -> str:
    """Why a variant failed, in one line: the error's type and its message's first line."""
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
