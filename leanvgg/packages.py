"""AOTInductor packages in the store: compiled once per weights, input size and run context
(threads, CPU kind, torch), then loaded by any later process without compiling anything or
loading the eager weights."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from leanvgg.context import INDUCTOR, RunContext
from leanvgg.facts import State
from leanvgg.measure import count_macs, warm_up
from leanvgg.recipes import Recipe, artifact_key
from leanvgg.residency import released
from leanvgg.runtime import MAX_BATCH, load_package, package
from leanvgg.store import Store

log = logging.getLogger(__name__)

SUFFIX = ".pt2"


class Packages:
    """The packages of compiled recipes, made for ``context`` (its threads are compiled in)."""

    def __init__(self, store: Store, context: RunContext) -> None:
        self.store = store
        self.context = context

    def key(self, artifact: str, input_size: int) -> str:
        """The package's cache key: its weights' key, input size, batch range and context."""
        return artifact_key(artifact, {"op": "aoti_package", "input_size": input_size,
                                       "batch": f"1..{MAX_BATCH}", "context": self.context.on(
                                           INDUCTOR).key("runtime", "threads", "cpu",
                                                         "versions")})

    def _entry(self, artifact: str, input_size: int) -> tuple[Path, dict] | None:
        return self.store.load_file(self.key(artifact, input_size), SUFFIX,
                                    validate=_check_manifest)

    def file(self, artifact: str, input_size: int) -> Path | None:
        """The cached, verified package file, if made."""
        entry = self._entry(artifact, input_size)
        return entry[0] if entry is not None else None

    def facts(self, artifact: str, input_size: int) -> dict | None:
        """The facts in a made package's manifest (its file present, not hashed: nothing is
        loaded), or None when it is not made."""
        manifest = self.store.manifest(self.key(artifact, input_size), (SUFFIX,))
        try:
            _check_manifest(manifest or {})
        except ValueError:
            return None
        return manifest["facts"]

    def load(self, recipe: Recipe, artifact: str) -> tuple[nn.Module, dict] | None:
        """The loaded (and warmed-up) package with its facts, or None when not made."""
        entry = self._entry(artifact, recipe.input_size)
        if entry is None:
            return None
        path, manifest = entry
        start = time.perf_counter()
        with released():  # the package's constants, once oneDNN has its own copy
            model = load_package(path, recipe.input_size)
            warm_up(model, recipe.input_size, self.context.threads)
        log.info("Loaded %s's compiled package from the cache.", recipe.name)
        return model, {**manifest["facts"], "load_s": time.perf_counter() - start}

    def make(self, recipe: Recipe, model: nn.Module, facts: dict, artifact: str,
             on_state: Callable[[State], object], *, load: bool = True
             ) -> tuple[nn.Module, dict] | None:
        """Compile ``model`` (the artifact ``artifact`` with its ``facts``) unless another
        process made it meanwhile, store it, and load it (``load=False``: only store it, and
        return None); ``on_state`` hears "compiling"."""
        key = self.key(artifact, recipe.input_size)
        with self.store.lock(key):  # another process may be compiling it right now
            if not load and self.facts(artifact, recipe.input_size) is not None:
                return None
            found = self.load(recipe, artifact) if load else None
            if found is not None:
                return found
            on_state(State.COMPILING)
            log.info("Compiling %s for %d threads (one-off, then kept in the cache)",
                     recipe.name, self.context.threads)
            facts = {**facts, "macs": count_macs(model, recipe.input_size)}
            start = time.perf_counter()
            self.store.save_file(
                key, SUFFIX,
                lambda path: package(model, recipe.input_size, path,
                                     threads=self.context.threads),
                {"recipe": recipe.name, "artifact": artifact,
                 "context": self.context.on(INDUCTOR).record(),
                 "input_size": recipe.input_size, "facts": facts})
            compile_s = time.perf_counter() - start
        if not load:
            return None
        model, facts = self.load(recipe, artifact)
        return model, {**facts, "compile_s": compile_s}


def _check_manifest(manifest: dict) -> None:
    facts = manifest.get("facts")
    if not (isinstance(facts, dict) and all(isinstance(facts.get(k), int) for k in (
            "size_bytes", "params", "params_total", "macs"))):
        raise ValueError("the package's manifest lacks its facts")
