"""Building variants from recipes: reuse what is in memory or on disk, build only what is not."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn
from tqdm.auto import tqdm

from leanvgg.measure import count_macs, count_nonzero_params, count_params, state_dict_bytes
from leanvgg.models import Baseline, from_layout, layout_of
from leanvgg.recipes import RECIPES, Recipe
from leanvgg.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """A ready model with its recipe and the facts measured when it was built."""

    recipe: Recipe
    model: nn.Module
    facts: dict  # size_bytes, params, macs, fine_tuned, pruning report, ...

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
            "steps": [step.to_json() for step in self.recipe.steps],
        }


@dataclass(frozen=True)
class VariantSet:
    baseline: Baseline
    variants: dict[str, Variant]


def resolve_names(names: Iterable[str] | None) -> list[str]:
    """Validated variant names in registry order (all of them when ``names`` is None)."""
    if names is None:
        return list(RECIPES)
    names = list(names)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise ValueError(f"Invalid variants {unknown}. Known variants: {', '.join(RECIPES)}.")
    return [n for n in RECIPES if n in names]


def build_variants(baseline: Baseline, names: Iterable[str] | None = None, *,
                   store: Store | None = None, progress: bool = True) -> VariantSet:
    """Every requested variant, from the cache when a valid entry exists, else built and stored.

    Recipes that produce the same weights (baseline and res160) share one model in memory.
    """
    builder = _Builder(baseline, store if store is not None else Store())
    variants = {}
    for name in tqdm(resolve_names(names), desc="variants", unit="variant", disable=not progress):
        recipe = RECIPES[name]
        model, facts = builder.artifact(recipe, len(recipe.steps))
        variants[name] = Variant(recipe, model, {**facts,
                                                 "macs": count_macs(model, recipe.input_size)})
    return VariantSet(baseline, variants)


class _Builder:
    def __init__(self, baseline: Baseline, store: Store) -> None:
        self.baseline = baseline
        self.store = store
        self.memo: dict[str, tuple[nn.Module, dict]] = {}

    def artifact(self, recipe: Recipe, n_steps: int) -> tuple[nn.Module, dict]:
        """The model after the recipe's first ``n_steps`` steps, with its facts."""
        key = recipe.artifact_key(self.baseline.weights_id, n_steps)
        if key not in self.memo:
            self.memo[key] = self._load(recipe, n_steps, key) or self._build(recipe, n_steps, key)
        return self.memo[key]

    def _load(self, recipe: Recipe, n_steps: int, key: str) -> tuple[nn.Module, dict] | None:
        if n_steps == 0:
            model = self.baseline.model
            return model, {"size_bytes": state_dict_bytes(model), **_param_facts(model)}
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

    def _build(self, recipe: Recipe, n_steps: int, key: str) -> tuple[nn.Module, dict]:
        previous, facts = self.artifact(recipe, n_steps - 1)
        step = recipe.steps[n_steps - 1]
        log.info("Building %s: %s", recipe.name, step.to_json())
        model, new_facts = step.apply(previous)
        model.eval()
        facts = {k: v for k, v in facts.items() if k != "size_bytes"}
        facts.update(new_facts, **_param_facts(model))
        manifest = self.store.save(key, model.state_dict(), {
            "recipe": recipe.name,
            "weights": self.baseline.weights_id,
            "steps": [s.to_json() for s in recipe.steps[:n_steps]],
            "layout": layout_of(model),
            "facts": facts,
        })
        return model, {**facts, "size_bytes": manifest["bytes"]}


def _param_facts(model: nn.Module) -> dict:
    return {"params": count_nonzero_params(model), "params_total": count_params(model)}
