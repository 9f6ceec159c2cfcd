"""Building variants from recipes: reuse what is in memory or on disk, build only what is not."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from torchvision.models import VGG
from tqdm.auto import tqdm

from leanvgg.finetune import distributed_context, finetune
from leanvgg.measure import count_macs, count_nonzero_params, count_params, state_dict_bytes
from leanvgg.models import Baseline, from_layout, layout_of
from leanvgg.recipes import (RECIPES, FineTune, QuantizeStaticInt8, Recipe, artifact_key,
                             tuned_recipe)
from leanvgg.runtime import load_package, machine_key, native_bf16, package
from leanvgg.store import Store

log = logging.getLogger(__name__)

REPORT = "evaluation"  # the store document holding the latest accuracy figures
TUNED = "tuned"  # the store document holding leanvgg tune's latest choice


class NotTuned(LookupError):
    """``tuned`` was asked for, but ``leanvgg tune`` has not chosen one for these weights."""


@dataclass(frozen=True)
class Variant:
    """A ready model with its recipe and the facts measured when it was built."""

    recipe: Recipe
    model: nn.Module
    facts: dict  # size_bytes, params, macs, fine_tuned, pruning report, ...
    artifact: str  # the cache key of its weights

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def input_size(self) -> int:
        return self.recipe.input_size

    def summary(self) -> dict:
        """The variant's static facts, as shown by the CLI, the JSON API and the dashboard."""
        return {
            "name": self.name,
            "description": self.recipe.description,
            "input_size": self.input_size,
            "size_mb": self.facts["size_bytes"] / 2**20,
            "params": self.facts["params"],
            "params_total": self.facts["params_total"],
            "macs": self.facts["macs"],
            # None: nothing was pruned, so there is nothing to recover by fine-tuning
            "fine_tuned": self.facts.get("fine_tuned"),
            "finetune": self.facts.get("finetune"),
            "accuracy": self.facts.get("accuracy"),
            "steps": [step.to_json() for step in self.recipe.steps],
            "article": self.recipe.article,
            # one-off costs, apart from steady-state latency: calibration when it was built,
            # compilation when its package was made, loading (incl. the first call) here
            "preparation_s": {k: self.facts[k] for k in ("calibration_s", "compile_s", "load_s")
                              if k in self.facts},
        }


@dataclass(frozen=True)
class VariantSet:
    baseline: Baseline
    variants: dict[str, Variant]


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

    ``calibration``: a folder of images that replaces the bundled photos in every static-INT8
    step (its content hash is part of the artifacts' keys).
    """
    config = store.load_json(TUNED)
    registry = dict(RECIPES)
    if config is not None and config.get("weights") == baseline.weights_id:
        registry[TUNED] = tuned_recipe(config)
    if calibration is not None:
        calibration = str(Path(calibration).resolve())
        registry = {name: dataclasses.replace(recipe, steps=tuple(
            dataclasses.replace(step, calibration=calibration)
            if isinstance(step, QuantizeStaticInt8) else step for step in recipe.steps))
            for name, recipe in registry.items()}
    return registry


def register_tuned(baseline: Baseline, config: dict, store: Store,
                   finetuned: nn.Module | None = None) -> Recipe:
    """Record ``leanvgg tune``'s choice so ``compare`` and the dashboard show it as ``tuned``.

    ``config`` holds the chosen candidate, the layers pruned and the budget; a fine-tuned
    choice needs its fine-tuned FP32 model, stored as the recipe's FineTune artifact.
    """
    config = {**config, "weights": baseline.weights_id}
    recipe = tuned_recipe(config)
    if config["candidate"]["fine_tuned"]:
        if finetuned is None:
            raise ValueError("A fine-tuned choice needs its fine-tuned model.")
        position = next(i for i, s in enumerate(recipe.steps) if isinstance(s, FineTune))
        builder = _Builder(baseline, store)
        _, facts, key = builder.artifact(recipe, position)
        builder.save(recipe, position + 1, artifact_key(key, recipe.steps[position].to_json()),
                     key, finetuned, {**facts, "fine_tuned": True}, layout_of(finetuned))
    store.save_json(TUNED, config)
    return recipe


def build_variants(baseline: Baseline, names: Iterable[str] | None = None, *,
                   store: Store | None = None, progress: bool = True,
                   calibration: str | None = None) -> VariantSet:
    """Every requested variant, from the cache when a valid entry exists, else built and stored.

    Recipes that produce the same weights (baseline and res160) share one model in memory.
    """
    builder = VariantBuilder(baseline, store if store is not None else Store(), calibration)
    names = builder.resolve(names)
    with rank_zero_first():  # under torchrun the other ranks then load what rank 0 built
        variants = {name: builder.prepare(name)
                    for name in tqdm(names, desc="variants", unit="variant",
                                     disable=not progress)}
    return VariantSet(baseline, variants)


class VariantBuilder:
    """Prepares named variants one at a time (the dashboard shows each as it becomes ready).

    A compiled variant is an AOTInductor package in the store, keyed by its weights' key, its
    input size, torch's version and the CPU's features: once made, a later process loads it
    (and its facts) without compiling anything or even loading the eager weights.
    """

    def __init__(self, baseline: Baseline, store: Store, calibration: str | None = None) -> None:
        self.baseline = baseline
        self.store = store
        self.registry = registry_for(baseline, store, calibration)
        self.accuracy = store.load_json(REPORT) or {}
        self._builder = _Builder(baseline, store)

    def resolve(self, names: Iterable[str] | None) -> list[str]:
        """Validated names in registry order; ``tuned`` only once ``leanvgg tune`` chose one."""
        if names is not None:
            names = list(names)
            if TUNED in names and TUNED not in self.registry:
                raise NotTuned("No 'tuned' variant for these weights yet: run 'leanvgg tune' "
                               "first.")
        return resolve_names(names, self.registry)

    def prepare(self, name: str, on_state: Callable[[str], object] = lambda state: None
                ) -> Variant:
        """The ready variant; ``on_state`` hears "building" and, if it compiles, "compiling"."""
        recipe = self.registry[name]
        on_state("building")
        if recipe.compiled:
            model, facts, key = self._packaged(recipe, on_state)
        else:
            model, facts, key = self._builder.artifact(recipe, len(recipe.steps))
            facts = {**facts, "macs": count_macs(model, recipe.input_size)}
        if "calibration" in facts:
            facts["calibration_s"] = facts["calibration"]["seconds"]
        measured = self.accuracy.get(name)
        if measured and measured.get("artifact") == key:  # only figures of these very weights
            facts["accuracy"] = measured
        return Variant(recipe, model, facts, key)

    def _packaged(self, recipe: Recipe, on_state: Callable[[str], object]
                  ) -> tuple[nn.Module, dict, str]:
        key = self._builder.key(recipe)
        found = self._load_package(recipe, key)
        if found is not None:
            return found
        model, facts, key = self._builder.artifact(recipe, len(recipe.steps))
        package_key = _package_key(key, recipe)
        with self.store.lock(package_key):  # another process may be compiling it right now
            found = self._load_package(recipe, key)
            if found is not None:
                return found
            on_state("compiling")
            log.info("Compiling %s (one-off, then kept in the cache)", recipe.name)
            facts = {**facts, "macs": count_macs(model, recipe.input_size)}
            start = time.perf_counter()
            self.store.save_file(
                package_key, PACKAGE_SUFFIX,
                lambda path: package(model, recipe.input_size, path),
                {"recipe": recipe.name, "artifact": key, "machine": machine_key(),
                 "input_size": recipe.input_size, "facts": facts})
            compile_s = time.perf_counter() - start
        model, facts, key = self._load_package(recipe, key)
        return model, {**facts, "compile_s": compile_s}, key

    def _load_package(self, recipe: Recipe, key: str) -> tuple[nn.Module, dict, str] | None:
        entry = self.store.load_file(_package_key(key, recipe), PACKAGE_SUFFIX,
                                     validate=_check_package_manifest)
        if entry is None:
            return None
        path, manifest = entry
        start = time.perf_counter()
        model = load_package(path, recipe.input_size)
        with torch.inference_mode():  # the first call prepares kernels: not a request's cost
            model(torch.zeros(1, 3, recipe.input_size, recipe.input_size))
        log.info("Loaded %s's compiled package from the cache.", recipe.name)
        return model, {**manifest["facts"], "load_s": time.perf_counter() - start}, key


PACKAGE_SUFFIX = ".pt2"


def _package_key(key: str, recipe: Recipe) -> str:
    return artifact_key(key, {"op": "aoti_package", "input_size": recipe.input_size,
                              **machine_key()})


def _check_package_manifest(manifest: dict) -> None:
    facts = manifest.get("facts")
    if not (isinstance(facts, dict) and all(isinstance(facts.get(k), int) for k in (
            "size_bytes", "params", "params_total", "macs"))):
        raise ValueError("the package's manifest lacks its facts")


def finetune_variant(baseline: Baseline, dataset: Dataset, membership: torch.Tensor, *,
                     name: str = "pruned", store: Store | None = None,
                     **train) -> tuple[nn.Module, dict]:
    """Fine-tune ``name``'s model as it stands before its FineTune step and cache the result.

    Every recipe sharing that step (pruned and pruned_quantized) uses the new weights from its
    next build. Under torchrun only rank 0 writes. Returns the trained model and the facts
    stored with it.
    """
    recipe = RECIPES[resolve_names([name])[0]]
    position = next((i for i, s in enumerate(recipe.steps) if isinstance(s, FineTune)), None)
    if position is None:
        raise ValueError(f"Invalid variant {name!r}: its recipe has no fine-tuning step.")
    builder = _Builder(baseline, store if store is not None else Store())
    with rank_zero_first():
        model, facts, key = builder.artifact(recipe, position)
    trained, stats = finetune(model, dataset, membership, **train)
    facts = {**facts, "fine_tuned": True, "finetune": stats.to_dict()}
    if distributed_context()[0] == 0:
        builder.save(recipe, position + 1, artifact_key(key, recipe.steps[position].to_json()),
                     key, trained, facts, layout_of(trained))
    return trained, facts


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Under torchrun, rank 0 runs the block first while the others wait, then they run it
    (building a cache entry once; the others find it made). A no-op in a single process."""
    rank, world_size = distributed_context()
    if world_size > 1 and rank != 0:
        dist.barrier()
    yield
    if world_size > 1 and rank == 0:
        dist.barrier()


class _Builder:
    def __init__(self, baseline: Baseline, store: Store) -> None:
        self.baseline = baseline
        self.store = store
        self.memo: dict[str, tuple[nn.Module, dict]] = {}

    def key(self, recipe: Recipe, n_steps: int | None = None) -> str:
        """The cache key ``artifact`` would give, without loading or building anything."""
        n_steps = len(recipe.steps) if n_steps is None else n_steps
        if n_steps == 0:
            return artifact_key(None, weights_id=self.baseline.weights_id)
        previous = self.key(recipe, n_steps - 1)
        step = recipe.steps[n_steps - 1]
        key = artifact_key(previous, step.to_json())
        return key if step.automatic or self.store.has(key) else previous

    def artifact(self, recipe: Recipe, n_steps: int) -> tuple[nn.Module, dict, str]:
        """The model after the recipe's first ``n_steps`` steps, its facts and its cache key.

        A non-automatic step whose artifact is missing is skipped: its key stays the previous
        one, so everything built on top of it is built on the model without it.
        """
        if n_steps == 0:
            key = artifact_key(None, weights_id=self.baseline.weights_id)
            if key not in self.memo:
                model = self.baseline.model
                self.memo[key] = model, {"size_bytes": state_dict_bytes(model),
                                         **_param_facts(model)}
            return (*self.memo[key], key)
        previous, previous_facts, previous_key = self.artifact(recipe, n_steps - 1)
        step = recipe.steps[n_steps - 1]
        key = artifact_key(previous_key, step.to_json())
        if key not in self.memo:
            loaded = self._load(recipe, n_steps, key)
            if loaded is None and not step.automatic:
                return previous, previous_facts, previous_key
            if loaded is None:
                with self.store.lock(key):  # another process may be building it right now
                    loaded = self._load(recipe, n_steps, key)
                    if loaded is None:
                        log.info("Building %s: %s", recipe.name, step.to_json())
                        model, new_facts = step.apply(previous)
                        # wrapped results (INT8 graphs, bf16) keep their source VGG's layout
                        layout = layout_of(model if isinstance(model, VGG) else previous)
                        loaded = self.save(recipe, n_steps, key, previous_key, model.eval(),
                                           {**previous_facts, **new_facts}, layout)
            self.memo[key] = loaded
        return (*self.memo[key], key)

    def _load(self, recipe: Recipe, n_steps: int, key: str) -> tuple[nn.Module, dict] | None:
        entry = self.store.load(key, validate=_check_manifest)
        if entry is None:
            return None
        state_dict, manifest = entry
        try:
            model = from_layout(manifest["layout"])
            for step in recipe.steps[:n_steps]:
                model = step.skeleton(model)
            # assign: the module keeps the memory-mapped tensors instead of copying them
            model.load_state_dict(state_dict, assign=True)
        except Exception as err:  # a layout that does not build, or weights that do not fit it
            log.warning("Cache entry %s does not fit its layout (%s); rebuilding it.", key, err)
            return None
        log.info("Loaded %s (%d steps) from the cache.", recipe.name, n_steps)
        return model.eval(), {**manifest["facts"], "size_bytes": manifest["bytes"]}

    def save(self, recipe: Recipe, n_steps: int, key: str, previous_key: str, model: nn.Module,
             facts: dict, layout: dict) -> tuple[nn.Module, dict]:
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


def _check_manifest(manifest: dict) -> None:
    """Raise if a manifest lacks what ``_Builder._load`` reads (then the entry is rebuilt)."""
    layout, facts = manifest.get("layout"), manifest.get("facts")
    if not isinstance(facts, dict):
        raise ValueError("the manifest lacks its 'facts'")
    if not (isinstance(layout, dict) and isinstance(layout.get("cfg"), list)
            and isinstance(layout.get("linear_features"), list)
            and isinstance(layout.get("batch_norm"), bool)):
        raise ValueError("the manifest lacks a valid 'layout'")


def _param_facts(model: nn.Module) -> dict:
    return {"params": count_nonzero_params(model), "params_total": count_params(model)}
