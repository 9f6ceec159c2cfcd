import logging
import shutil

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from leanvgg.images import preprocess
from leanvgg.recipes import RECIPES
from leanvgg.store import Store
from leanvgg.variants import build_variants, resolve_names


def test_registry_holds_the_articles_five_and_the_fast_variants():
    article = [name for name, recipe in RECIPES.items() if recipe.article]
    assert article == ["baseline", "pruned", "quantized", "pruned_quantized", "res160"]
    fast = [name for name, recipe in RECIPES.items() if recipe.compiled]
    assert fast == ["int8_static", "bf16", "turbo", "turbo160", "turbo_svd"]
    assert RECIPES["res160"].input_size == RECIPES["turbo160"].input_size == 160


def test_res160_shares_the_baselines_weights_in_memory(variant_set):
    variants = variant_set.variants
    assert variants["res160"].model is variants["baseline"].model


def test_facts_are_measured_at_build_time(variant_set):
    facts = {name: v.facts for name, v in variant_set.variants.items()}
    assert facts["pruned"].fine_tuned is False
    assert [layer["after"] for layer in facts["pruned"].reports["pruning"]] == [231] + [461] * 8
    assert facts["quantized"].size_bytes < 0.4 * facts["baseline"].size_bytes
    assert facts["pruned_quantized"].size_bytes < facts["quantized"].size_bytes
    assert facts["pruned_quantized"].params_total == facts["pruned"].params_total
    assert isinstance(variant_set.variants["pruned_quantized"].model.classifier[0],
                      DynamicQuantizedLinear)


def test_cached_variants_reload_with_identical_outputs(variant_set, cache_dir, photo, caplog):
    caplog.set_level(logging.INFO)
    reloaded = build_variants(variant_set.baseline, ["quantized", "pruned_quantized"],
                              store=Store(cache_dir), progress=False)
    assert "Building" not in caplog.text and "from the cache" in caplog.text
    x = preprocess(photo, 224)
    with torch.inference_mode():
        for name, variant in reloaded.variants.items():
            assert torch.equal(variant.model(x), variant_set.variants[name].model(x)), name
            assert variant.facts == variant_set.variants[name].facts


@pytest.fixture(scope="module")
def _quantized(baseline, tmp_path_factory):
    """A cache holding only the quantized variant (the quickest to build), built once for the
    module, and its key."""
    home = tmp_path_factory.mktemp("quantized")
    built = build_variants(baseline, ["quantized"], store=Store(home), progress=False)
    return home, built.variants["quantized"].artifact


@pytest.fixture
def small_cache(_quantized, tmp_path):
    """This test's own copy of ``_quantized`` (tests damage it), and the entry's key."""
    home, key = _quantized
    return shutil.copytree(home, tmp_path / "cache"), key


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest"])
def test_a_corrupt_entry_is_detected_and_rebuilt(baseline, small_cache, caplog, damage):
    cache, key = small_cache
    weights_file, = cache.glob(f"{key}.*.pt")
    if damage == "flip":
        data = bytearray(weights_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights_file.write_bytes(bytes(data))
    elif damage == "truncate":
        weights_file.write_bytes(weights_file.read_bytes()[:1000])
    else:
        (cache / f"{key}.json").write_text("{not json")
    caplog.set_level(logging.INFO)
    rebuilt = build_variants(baseline, ["quantized"], store=Store(cache), progress=False)
    assert "corrupt or incomplete" in caplog.text and "Building quantized" in caplog.text
    assert rebuilt.variants["quantized"].artifact == key
    assert Store(cache).load(key) is not None


@pytest.mark.slow
def test_an_interrupted_write_keeps_the_previous_entry(baseline, small_cache, monkeypatch):
    cache, key = small_cache
    store = Store(cache)
    before = {p.name: p.read_bytes() for p in cache.iterdir()}

    def killed(obj, f, *args, **kwargs):
        f.write(b"half an artifact")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        store.save(key, {}, {})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before  # no temp files
    assert store.load(key) is not None


def test_unknown_variant_names_are_listed():
    with pytest.raises(ValueError, match="Known variants: baseline, pruned"):
        resolve_names(["baseline", "tiny"])
    assert resolve_names(["res160", "baseline"]) == ["baseline", "res160"]


def test_macs_are_counted_once_per_artifact_and_input_size(tmp_path, monkeypatch):
    import leanvgg.builder
    from leanvgg.measure import count_macs
    from tiny import tiny_baseline

    names = ["baseline", "quantized", "res160"]
    first = build_variants(tiny_baseline(), names, store=Store(tmp_path), progress=False)
    counted = []
    monkeypatch.setattr(leanvgg.builder, "count_macs",
                        lambda model, size: counted.append(size) or count_macs(model, size))
    again = build_variants(tiny_baseline(), names, store=Store(tmp_path), progress=False)
    assert counted == []  # every count read from the store
    for name in names:
        size = first.variants[name].recipe.input_size
        assert again.variants[name].facts.macs == first.variants[name].facts.macs == count_macs(
            first.variants[name].model, size)
    # the same weights at 224 and 160 px are two counts (res160 shares the baseline's file)
    assert again.variants["res160"].facts.macs < again.variants["baseline"].facts.macs
