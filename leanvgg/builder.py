"""Building models from recipes: reuse what is in memory or on disk, build only what is not.

Every model leanvgg makes comes through here: the registered variants, ``tune``'s candidates
and (later) exports. A recipe's steps chain cache keys (weights → step → step …), so two recipes
that share their first steps share those artifacts, and a model measured by ``tune`` is the
very cache entry the ``tuned`` variant loads.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import VGG

from leanvgg.capabilities import precision_step
from leanvgg.context import INDUCTOR, PYTORCH, RunContext
from leanvgg.data import calibration_batch
from leanvgg.documents import MACS
from leanvgg.facts import AS_BUILT, Accuracy, ArtifactFacts, Placement, State, VariantFacts
from leanvgg.measure import Profile, count_macs, param_counts, state_dict_bytes
from leanvgg.models import Baseline, from_layout, layout_of, random_model
from leanvgg.packages import Packages
from leanvgg.recipes import (QuantizeStaticInt8, Recipe, Step, artifact_key, bind,
                             merge_facts)
from leanvgg.residency import released
from leanvgg.store import Store

log = logging.getLogger(__name__)


class NotBuilt(LookupError):
    """A load-only builder (``Builder(load_only=True)``) lacks an artifact it would have to
    build, compile or convert; the message says which."""


@dataclass(frozen=True)
class Variant:
    """A ready model with its recipe and the facts measured when it was built."""

    recipe: Recipe
    model: nn.Module | None  # None: described from the store, not loaded (Builder.described)
    facts: ArtifactFacts  # what belongs to its weights (size, params, MACs, step reports)
    artifact: str  # the cache key of its weights
    context: RunContext  # the threads (and machine) it was made for
    placement: Placement | None = None  # where it runs (leanvgg.runtimes); None: as built
    accuracy: Accuracy | None = None  # its evaluation on the runtime it runs on, if any

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def input_size(self) -> int:
        return self.recipe.input_size

    @property
    def where(self) -> Placement:
        """Where it runs: its placement, or (not placed) as the builder made it."""
        if self.placement is not None:
            return self.placement
        runtime = INDUCTOR if self.recipe.compiled else PYTORCH
        return Placement(runtime, runtime, self.context.threads, AS_BUILT)

    @property
    def runtime(self) -> str:
        """Where single images run (``leanvgg.runtimes`` says how it was chosen)."""
        return self.where.runtime

    def run_context(self, batch: int = 1) -> RunContext:
        """The context its figures hold for: its runtime for ``batch``, its threads."""
        where = self.where
        return self.context.on(where.runtime if batch == 1 else where.batch_runtime
                               ).at_batch(batch)

    def summary(self) -> VariantFacts:
        return VariantFacts(
            name=self.name,
            description=self.recipe.description,
            input_size=self.input_size,
            size_mb=self.facts.size_mb,
            params=self.facts.params,
            params_total=self.facts.params_total,
            macs=self.facts.macs,
            fine_tuned=self.facts.fine_tuned,
            finetune=self.facts.finetune,
            accuracy=self.accuracy,
            steps=[step.to_json() for step in self.recipe.steps],
            article=self.recipe.article,
            runtime=self.where.runtime,
            batch_runtime=self.where.batch_runtime,
            threads=self.context.threads,
            placement=self.where.to_dict(),
            preparation_s=dict(self.facts.preparation_s),
        )


class Builder:
    """Models after any number of a recipe's steps, from memory, the store, or built.

    A compiled recipe's model is an AOTInductor package (``leanvgg.packages``) made for
    ``context``: once made, a later process loads it (and its facts) without compiling anything
    or even loading the eager weights. Fine-tuning (a non-automatic step) is made through
    ``make`` by ``leanvgg.finetune.fine_tune_step``.
    """

    def __init__(self, baseline: Baseline, store: Store,
                 context: RunContext | None = None, *, load_only: bool = False) -> None:
        """``load_only``: never build, compile or convert (``NotBuilt`` instead), nor measure
        a runtime choice: the process that serves loads what a builder process made."""
        self.baseline = baseline
        self.load_only = load_only
        self.store = store
        self.context = context if context is not None else RunContext.here()
        self.memo: dict[str, tuple[nn.Module, dict]] = {}
        self.packages = Packages(store, self.context)

    def variant(self, recipe: Recipe, on_state: Callable[[State], object] = lambda state: None,
                *, compiled: bool = True) -> Variant:
        """The ready variant; ``on_state`` hears "building" and, if it compiles, "compiling".
        ``compiled=False``: a compiled recipe's eager model, its package neither made nor
        loaded (for a variant that runs on another runtime, or is exported as another
        format)."""
        recipe = self.bind(recipe)
        on_state(State.BUILDING)
        if recipe.compiled and compiled:
            model, facts, key = self._packaged(recipe, on_state)
        else:
            model, facts, key = self.artifact(recipe, len(recipe.steps))
            facts = {**facts, "macs": self._macs(model, key, recipe.input_size)}
        return Variant(recipe, model, facts_of(facts), key, self.context)

    def described(self, recipe: Recipe,
                  on_state: Callable[[State], object] = lambda state: None) -> Variant:
        """The variant as the store describes it: its key and facts from the manifests, its
        model not loaded (``model`` None), for what needs only them (export copies the stored
        files and reads the facts; loading a static INT8 model takes seconds). A variant whose
        facts are not all stored yet is made as ``variant(compiled=False)`` makes it."""
        recipe = self.bind(recipe)
        key = self.key(recipe)
        facts = (self.packages.facts(key, recipe.input_size) if recipe.compiled else None)
        if facts is None:
            facts = self._stored_facts(key, recipe.input_size)
        if facts is None:
            return self.variant(recipe, on_state, compiled=False)
        return Variant(recipe, None, facts_of(facts), key, self.context)

    def _stored_facts(self, key: str, input_size: int) -> dict | None:
        """An artifact's facts from its manifest and its MACs from the MACS document, as
        ``variant(compiled=False)`` gives them; None unless both are stored."""
        manifest = self.store.manifest(key)
        macs = (self.store.documents.load(MACS) or {}).get(f"{key}@{input_size}")
        if manifest is None or not isinstance(macs, int) or macs <= 0:
            return None
        try:
            _check_manifest(manifest)
        except ValueError:
            return None
        # the baseline's manifest holds its size; a step's is the entry's bytes (Builder._load)
        return {"size_bytes": manifest["bytes"], **manifest["facts"], "macs": macs}

    def layout(self, recipe: Recipe) -> dict:
        """The channel widths, Linear widths and ranks of ``recipe``'s float model
        (``models.layout_of``), from its stored manifest when there is one (every manifest
        keeps its source VGG's layout), else from the loaded float model."""
        manifest = self.store.manifest(self.key(recipe))
        try:
            _check_manifest(manifest or {})
        except ValueError:
            return layout_of(self.float_model(recipe))
        return manifest["layout"]

    def compile_ahead(self, recipe: Recipe,
                      on_state: Callable[[State], object] = lambda state: None) -> None:
        """Store ``recipe``'s package unless it is stored, loading nothing (a builder process
        compiles it ahead of a runtime choice while its variant runs elsewhere)."""
        recipe = self.bind(recipe)
        key = self.key(recipe)
        if not recipe.compiled or self.packages.facts(key, recipe.input_size) is not None:
            return
        model, facts, key = self.artifact(recipe, len(recipe.steps))
        self.packages.make(recipe, model, facts, key, on_state, load=False)

    def _macs(self, model: nn.Module, key: str, input_size: int) -> int:
        """``count_macs`` of the artifact ``key`` at ``input_size``, counted once (a forward
        pass, 0.3 s for a VGG-19 at 224 px on 2 cores) and then read from the store's MACS
        document: the count depends on the architecture alone, which the key fixes."""
        return self.store.documents.remember(
            MACS, f"{key}@{input_size}", lambda: count_macs(model, input_size),
            holds=lambda known: isinstance(known, int) and known > 0)

    def float_model(self, recipe: Recipe) -> nn.Module:
        """The eager model before the precision step (all of the recipe's structure and
        training): what other runtimes convert and quantize themselves."""
        recipe = self.bind(recipe)
        steps = len(recipe.steps) - (precision_step(recipe) is not None)
        return self.artifact(recipe, steps)[0]

    def portable_model(self, recipe: Recipe) -> nn.Module:
        """The eager model other runtimes convert (``leanvgg.interop``): a static INT8
        recipe's own PT2E model, so ONNX Runtime and OpenVINO run the weights and activation
        scales Inductor runs; else the float model (bf16 is a precision of the runtime
        there)."""
        recipe = self.bind(recipe)
        if calibration_of(recipe) is not None:
            return self.artifact(recipe, len(recipe.steps))[0]
        return self.float_model(recipe)

    def key(self, recipe: Recipe, n_steps: int | None = None) -> str:
        """The cache key ``artifact`` would give, without loading or building anything."""
        recipe = self.bind(recipe)
        n_steps = len(recipe.steps) if n_steps is None else n_steps
        if n_steps == 0:
            return artifact_key(None, weights_id=self.baseline.weights_id)
        previous = self.key(recipe, n_steps - 1)
        step = recipe.steps[n_steps - 1]
        key = artifact_key(previous, step.to_json())
        return key if step.automatic or key in self.memo or self.store.has(key) else previous

    def artifact(self, recipe: Recipe, n_steps: int) -> tuple[nn.Module, dict, str]:
        """The model after the recipe's first ``n_steps`` steps, its facts and its cache key.

        A non-automatic step whose artifact is missing is skipped: its key stays the previous
        one, so everything built on top of it is built on the model without it.
        """
        recipe = self.bind(recipe)
        if n_steps == 0:
            key = artifact_key(None, weights_id=self.baseline.weights_id)
            if key not in self.memo:
                model = self.baseline.model
                self.memo[key] = model, _weights_facts(model)
            return (*self.memo[key], key)
        previous, previous_facts, previous_key = self.artifact(recipe, n_steps - 1)
        step = recipe.steps[n_steps - 1]
        key = artifact_key(previous_key, step.to_json())
        if key not in self.memo:
            loaded = self._load(recipe, n_steps, key)
            if loaded is None and not step.automatic:
                return previous, previous_facts, previous_key
            if loaded is None and self.load_only:
                raise NotBuilt(f"{recipe.name}: step {n_steps} ({step.to_json()['op']}) is not "
                               "in the cache yet")
            if loaded is None:
                with self.store.lock(key):  # another process may be building it right now
                    loaded = self._load(recipe, n_steps, key)
                    if loaded is None:
                        log.info("Building %s: %s", recipe.name, step.to_json())
                        model, new_facts = step.apply(previous)
                        loaded = self._save(recipe, n_steps, key, previous_key, model.eval(),
                                            merge_facts(previous_facts, new_facts),
                                            _layout(model, previous))
            self.memo[key] = loaded
        return (*self.memo[key], key)

    def make(self, recipe: Recipe, position: int,
             produce: Callable[[nn.Module, dict], tuple[nn.Module, dict]], *,
             replace: bool = False, write: bool = True) -> tuple[nn.Module, dict, str]:
        """The artifact of the non-automatic step at ``position`` (fine-tuning), made by
        ``produce(model before it, its facts) → (model, new facts)`` when missing (always,
        with ``replace``) and stored (unless ``write`` is False: under torchrun only rank 0
        writes). Returns the model, its facts and its key."""
        recipe = self.bind(recipe)
        model, facts, previous_key = self.artifact(recipe, position)
        key = artifact_key(previous_key, recipe.steps[position].to_json())
        if not replace:
            found = self.memo.get(key) or self._load(recipe, position + 1, key)
            if found is not None:
                self.memo[key] = found
                return (*found, key)
        made, new_facts = produce(model, facts)
        merged = merge_facts(facts, new_facts)
        if write:
            self._save(recipe, position + 1, key, previous_key, made.eval(), merged,
                       _layout(made, model))
        else:
            self.memo[key] = made.eval(), {**merged, **_param_facts(made)}
        return (*self.memo[key], key)

    def package_file(self, recipe: Recipe) -> Path | None:
        """The cached, verified package of a compiled recipe on this machine, if made."""
        recipe = self.bind(recipe)
        return self.packages.file(self.key(recipe), recipe.input_size)

    def bind(self, recipe: Recipe) -> Recipe:
        """The recipe for this baseline's layout (``recipes.bind``): every method takes
        registered recipes as they are and builds them for the model at hand."""
        return bind(recipe, self.baseline.model)

    def forget(self, keep: Collection[str] = ()) -> None:
        """Drop every model held in memory but the baseline and the artifacts ``keep`` (they
        reload from the store)."""
        root = artifact_key(None, weights_id=self.baseline.weights_id)
        self.memo = {k: v for k, v in self.memo.items() if k == root or k in keep}

    def _packaged(self, recipe: Recipe, on_state: Callable[[State], object]
                  ) -> tuple[nn.Module, dict, str]:
        key = self.key(recipe)
        found = self.packages.load(recipe, key)
        if found is None and self.load_only:
            raise NotBuilt(f"{recipe.name}: its compiled package is not in the cache yet")
        if found is None:
            model, facts, key = self.artifact(recipe, len(recipe.steps))
            found = self.packages.make(recipe, model, facts, key, on_state)
        return (*found, key)

    def _load(self, recipe: Recipe, n_steps: int, key: str) -> tuple[nn.Module, dict] | None:
        found = _from_store(self.store, key, recipe.steps[:n_steps])
        if found is None:
            return None
        model, manifest = found
        log.info("Loaded %s (%d steps) from the cache.", recipe.name, n_steps)
        return model, {**manifest["facts"], "size_bytes": manifest["bytes"]}

    def _save(self, recipe: Recipe, n_steps: int, key: str, previous_key: str,
              model: nn.Module, facts: dict, layout: dict) -> tuple[nn.Module, dict]:
        """Store the result of step ``n_steps`` (applied on ``previous_key``) and remember it."""
        facts = {**{k: v for k, v in facts.items() if k != "size_bytes"}, **_param_facts(model)}
        manifest = self.store.save(key, model.state_dict(), {
            "recipe": recipe.name,
            "weights": self.baseline.weights_id,
            "previous": previous_key,
            "step": recipe.steps[n_steps - 1].to_json(),
            "layout": layout,
            "facts": facts,
        })
        self.memo[key] = model, {**facts, "size_bytes": manifest["bytes"]}
        return self.memo[key]


def stored_baseline(baseline: Baseline, store: Store) -> Baseline:
    """The baseline with its weights memory-mapped from the store (saved there once, as the
    first link of every recipe's chain of keys) instead of held in the process's own memory.

    Mapped, the 548 MB of VGG-19's FP32 weights are clean file pages: the server and its
    builder process share them through the page cache instead of holding a copy each, and
    they do not count as the process's anonymous memory. The caller drops the original model
    (the next variant prepared trims the heap it leaves). An entry that does not fit is
    rewritten. Random weights may come undrawn (``load_baseline(..., drawn=False)``): they are
    drawn only if the store lacks them, so a warm start spends no second drawing 143.7 M
    values that the store already holds.
    """
    key = artifact_key(None, weights_id=baseline.weights_id)
    for _ in range(2):
        found = _from_store(store, key, ())
        if found is not None:
            return dataclasses.replace(baseline, model=found[0])
        try:
            with store.lock(key):  # a builder process may be storing them right now
                found = _from_store(store, key, ())
                if found is not None:
                    return dataclasses.replace(baseline, model=found[0])
                if next(baseline.model.parameters()).is_meta:  # random weights not drawn yet
                    baseline = dataclasses.replace(baseline, model=random_model())
                model = baseline.model
                store.save(key, model.state_dict(), {
                    "recipe": "baseline", "weights": baseline.weights_id, "previous": None,
                    "step": None, "layout": layout_of(model), "facts": _weights_facts(model)})
        except OSError as err:  # a full disk: the weights stay where they are
            log.warning("Cannot store the baseline's weights (%s); keeping them in memory.", err)
            break
    if next(baseline.model.parameters()).is_meta:
        baseline = dataclasses.replace(baseline, model=random_model())
    return baseline  # the store would not keep it: the weights stay where they are


def stored_weights(baseline: Baseline, store: Store) -> bool:
    """Whether the store holds ``baseline``'s weights (its manifest, read without loading)."""
    return store.manifest(artifact_key(None, weights_id=baseline.weights_id)) is not None


def _from_store(store: Store, key: str, steps: Sequence[Step]
                ) -> tuple[nn.Module, dict] | None:
    """The model stored under ``key`` (the result of ``steps``) and its manifest, or None when
    the entry is absent, corrupt or does not fit its layout (logged; the caller makes it again).

    The state dict is memory-mapped and assigned, not copied; what the model copies out of the
    mapping when it is loaded (quantized tensors, packed INT8 Linears) is given back, the pages
    of its own tensors stay. Skeletons stay on the meta device unless a step's skeleton runs
    the model (PT2E's).
    """
    loaded: list[nn.Module] = []
    with released(keep=lambda: [t for m in loaded
                                for t in itertools.chain(m.parameters(), m.buffers())]):
        entry = store.load(key, validate=_check_manifest)
        if entry is None:
            return None
        state_dict, manifest = entry
        try:
            model = from_layout(manifest["layout"], materialized=any(
                isinstance(step, _SKELETONS_THAT_RUN) for step in steps))
            for step in steps:
                model = step.skeleton(model)
            model.load_state_dict(state_dict, assign=True)
        except Exception as err:  # a layout that does not build, or weights not fitting it
            log.warning("Cache entry %s does not fit its layout (%s); rebuilding it.", key, err)
            return None
        loaded.append(model)
    return model.eval(), manifest


def _weights_facts(model: nn.Module) -> dict:
    """What the baseline's weights are: their bytes and parameter counts."""
    return {"size_bytes": state_dict_bytes(model), **_param_facts(model)}


def facts_of(facts: dict) -> ArtifactFacts:
    """A variant's facts from a manifest's (its calibration's seconds among its preparation
    times)."""
    if "calibration" in facts:
        facts = {**facts, "calibration_s": facts["calibration"]["seconds"]}
    return ArtifactFacts.from_dict(facts)


def calibration_of(recipe: Recipe) -> torch.Tensor | None:
    """The images a static-INT8 recipe is calibrated on (None for other recipes)."""
    step = precision_step(recipe)
    if not isinstance(step, QuantizeStaticInt8):
        return None
    return calibration_batch(step.input_size, step.calibration)


def profile_key(variant: Variant) -> str:
    """Where a variant's latency profile is kept (store document PROFILES): it holds only for
    these weights at this input size, in its run context (runtime, threads, batch 1, CPU and
    the runtime's library versions)."""
    return (f"{variant.name}|{variant.artifact}|{variant.input_size}px|"
            + variant.run_context().key("runtime", "threads", "batch", "cpu", "versions"))


def evaluation_key(variant: Variant) -> str:
    """Where a variant's accuracy is kept (store document EVALUATION): it holds for these
    weights at this input size on the runtime that ran them (INT8 on ONNX Runtime or OpenVINO
    is their own quantization) with that runtime's library versions."""
    return (f"{variant.name}|{variant.artifact}|{variant.input_size}px|"
            + variant.run_context().key("runtime", "versions"))


def stored_profile(profiles: Mapping[str, dict], variant: Variant) -> Profile | None:
    """The variant's profile in the PROFILES document, if one holds here and is readable."""
    data = profiles.get(profile_key(variant))
    try:
        return Profile.from_dict(data) if data else None
    except (KeyError, TypeError, ValueError):
        return None


def _layout(model: nn.Module, previous: nn.Module) -> dict:
    # wrapped results (INT8 graphs, bf16) keep their source VGG's layout
    return layout_of(model if isinstance(model, VGG) else previous)


# steps whose skeleton runs the model it is given (PT2E traces and calibrates it): they need
# real (zero) weights
_SKELETONS_THAT_RUN = (QuantizeStaticInt8,)


def _check_manifest(manifest: dict) -> None:
    """Raise if a manifest lacks what ``Builder._load`` reads (then the entry is rebuilt)."""
    layout, facts = manifest.get("layout"), manifest.get("facts")
    if not isinstance(facts, dict):
        raise ValueError("the manifest lacks its 'facts'")
    if not (isinstance(layout, dict) and isinstance(layout.get("cfg"), list)
            and isinstance(layout.get("linear_features"), list)
            and isinstance(layout.get("batch_norm"), bool)
            and isinstance(layout.get("ranks", {}), dict)):
        raise ValueError("the manifest lacks a valid 'layout'")


def _param_facts(model: nn.Module) -> dict:
    nonzero, total = param_counts(model)
    return {"params": nonzero, "params_total": total}
