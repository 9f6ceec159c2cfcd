"""Building variants from recipes: reuse what is in memory or on disk, build only what is not."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.models import VGG
from tqdm.auto import tqdm

from leanvgg.finetune import distributed_context, finetune
from leanvgg.measure import count_macs, count_nonzero_params, count_params, state_dict_bytes
from leanvgg.models import Baseline, from_layout, layout_of
from leanvgg.recipes import (RECIPES, FineTune, QuantizeStaticInt8, Recipe, artifact_key,
                             tuned_recipe)
from leanvgg.runtime import compile_for_cpu, native_bf16
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
            # compilation (incl. the first call) in this process
            "preparation_s": {k: self.facts[k] for k in ("calibration_s", "compile_s")
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
    store = store if store is not None else Store()
    builder = _Builder(baseline, store)
    accuracy = store.load_json(REPORT) or {}
    registry = registry_for(baseline, store, calibration)
    if names is not None and TUNED in names and TUNED not in registry:
        raise NotTuned("No 'tuned' variant for these weights yet: run 'leanvgg tune' first.")
    variants = {}
    for name in tqdm(resolve_names(names, registry), desc="variants", unit="variant",
                     disable=not progress):
        recipe = registry[name]
        model, facts, key = builder.artifact(recipe, len(recipe.steps))
        facts = {**facts, "macs": count_macs(model, recipe.input_size)}
        if "calibration" in facts:
            facts["calibration_s"] = facts["calibration"]["seconds"]
        if recipe.compiled:
            log.info("Compiling %s (one-off)", name)
            model, facts["compile_s"] = compile_for_cpu(model, recipe.input_size)
        measured = accuracy.get(name)
        if measured and measured.get("artifact") == key:  # only figures of these very weights
            facts["accuracy"] = measured
        variants[name] = Variant(recipe, model, facts, key)
    return VariantSet(baseline, variants)


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
    model, facts, key = builder.artifact(recipe, position)
    trained, stats = finetune(model, dataset, membership, **train)
    facts = {**facts, "fine_tuned": True, "finetune": stats.to_dict()}
    if distributed_context()[0] == 0:
        builder.save(recipe, position + 1, artifact_key(key, recipe.steps[position].to_json()),
                     key, trained, facts, layout_of(trained))
    return trained, facts


class _Builder:
    def __init__(self, baseline: Baseline, store: Store) -> None:
        self.baseline = baseline
        self.store = store
        self.memo: dict[str, tuple[nn.Module, dict]] = {}

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
                log.info("Building %s: %s", recipe.name, step.to_json())
                model, new_facts = step.apply(previous)
                # wrapped results (INT8 graphs, bf16) keep the layout of the VGG they came from
                layout = layout_of(model if isinstance(model, VGG) else previous)
                loaded = self.save(recipe, n_steps, key, previous_key, model.eval(),
                                   {**previous_facts, **new_facts}, layout)
            self.memo[key] = loaded
        return (*self.memo[key], key)

    def _load(self, recipe: Recipe, n_steps: int, key: str) -> tuple[nn.Module, dict] | None:
        entry = self.store.load(key)
        if entry is None:
            return None
        state_dict, manifest = entry
        model = from_layout(manifest["layout"])
        for step in recipe.steps[:n_steps]:
            model = step.skeleton(model)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as err:
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


def _param_facts(model: nn.Module) -> dict:
    return {"params": count_nonzero_params(model), "params_total": count_params(model)}
