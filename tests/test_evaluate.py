import json

import pytest
import torch
from PIL import Image
from torch import nn

from leanvgg.builder import evaluation_key
from leanvgg.context import RunContext
from leanvgg.evaluate import (MappingError, evaluate, image_folder, load_mapping, save_report)
from leanvgg.recipes import RECIPES
from leanvgg.documents import EVALUATION
from leanvgg.store import Store
from leanvgg.variants import Variant, VariantSet, build_variants
from leanvgg.facts import ArtifactFacts
from tiny import tiny_baseline

NO_FACTS = ArtifactFacts(size_bytes=0, params=0, params_total=0, macs=0)

COLOURS = {"red": ((255, 0, 0), 3), "green": ((0, 255, 0), 2), "blue": ((0, 0, 255), 1),
           "gray": ((128, 128, 128), 1)}
MAPPING = {"red": [1], "green": [2], "blue": [3], "gray": [4]}


class ChannelVoter(nn.Module):
    """Logit of ImageNet class 1 + c = 5 × mean of channel ``order[c]``; every other class 0."""

    def __init__(self, order=(0, 1, 2)):
        super().__init__()
        self.order = order

    def forward(self, x):
        logits = torch.zeros(len(x), 1000)
        for c, channel in enumerate(self.order):
            logits[:, 1 + c] = 5 * x[:, channel].mean(dim=(1, 2))
        return logits


def write_colour_folder(root):
    """7 solid-colour images in 4 class folders under root/set, and root/mapping.json."""
    for name, (rgb, count) in COLOURS.items():
        (root / "set" / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (40, 40), rgb).save(root / "set" / name / f"{i}.png")
    (root / "mapping.json").write_text(json.dumps(MAPPING))
    return root


@pytest.fixture
def colour_folder(tmp_path):
    return write_colour_folder(tmp_path)


def test_accuracy_and_agreement_equal_the_hand_count(colour_folder):
    labelled = image_folder(colour_folder / "set", load_mapping(colour_folder / "mapping.json"))
    variants = {
        "baseline": Variant(RECIPES["baseline"], ChannelVoter(), NO_FACTS, "a", RunContext(threads=1)),
        # green and blue swapped: right on the 3 reds only
        "quantized": Variant(RECIPES["quantized"], ChannelVoter((0, 2, 1)), NO_FACTS, "b", RunContext(threads=1)),
    }
    results = evaluate(VariantSet(tiny_baseline(), variants), labelled, batch_size=3,
                       progress=False)
    # baseline: red, green, blue right (6 images); gray's largest channel is blue: wrong
    assert results["baseline"].top1 == pytest.approx(6 / 7)
    assert results["baseline"].top3 == pytest.approx(6 / 7)  # gray's group scores last of 4
    assert results["baseline"].agreement == 1.0
    assert results["quantized"].top1 == pytest.approx(3 / 7)
    assert results["quantized"].agreement == pytest.approx(3 / 7)
    assert results["quantized"].images == 7 and results["quantized"].artifact == "b"


def test_reports_reach_compare_only_for_the_weights_they_measured(colour_folder, tmp_path):
    baseline, store = tiny_baseline(), Store(tmp_path / "cache")
    variant_set = build_variants(baseline, ["baseline", "quantized"], store=store, progress=False)
    labelled = image_folder(colour_folder / "set", MAPPING)
    save_report(store, evaluate(variant_set, labelled, progress=False))
    shown = build_variants(baseline, ["baseline", "quantized"], store=store, progress=False)
    accuracy = shown.variants["quantized"].summary().accuracy
    assert accuracy.images == 7 and accuracy.dataset == "set" and 0 <= accuracy.top1 <= 1
    assert accuracy.runtime == "pytorch"  # what ran it, as its record says
    assert accuracy.key == evaluation_key(shown.variants["quantized"])
    stored = store.documents.load(EVALUATION)
    key = evaluation_key(shown.variants["quantized"])
    assert stored[key]["variant"] == "quantized"
    # the same figures filed under other weights, or under another runtime: never shown
    artifact = shown.variants["quantized"].artifact
    elsewhere = {k.replace(artifact, "weights-no-longer-cached"): v for k, v in stored.items()
                 if k == key}
    elsewhere |= {k.replace("runtime=pytorch", "runtime=openvino"): v
                  for k, v in stored.items() if k == key}
    store.documents.save(EVALUATION, {k: v for k, v in stored.items() if k != key} | elsewhere)
    again = build_variants(baseline, ["baseline", "quantized"], store=store, progress=False)
    assert again.variants["quantized"].summary().accuracy is None
    assert again.variants["baseline"].summary().accuracy.images == 7


def test_bad_mappings_are_named(colour_folder):
    with pytest.raises(MappingError, match=r"leaves out \['gray'\]"):
        image_folder(colour_folder / "set", {k: v for k, v in MAPPING.items() if k != "gray"})
    with pytest.raises(MappingError, match="invalid"):
        image_folder(colour_folder / "set", {**MAPPING, "red": [1000]})
    with pytest.raises(MappingError, match="1000 WordNet-id folders"):
        image_folder(colour_folder / "set")
    (colour_folder / "bad.json").write_text("[1, 2]")
    with pytest.raises(MappingError, match="JSON object"):
        load_mapping(colour_folder / "bad.json")


@pytest.mark.slow
def test_accuracy_is_of_the_runtime_that_serves(colour_folder, tmp_path):
    """An INT8 variant served by OpenVINO runs its INT8 model on OpenVINO's kernels: its
    accuracy is measured there and shown only where it runs there (it used to be Inductor's
    figure)."""
    from leanvgg.runtimes import installed

    if not installed("openvino"):
        pytest.skip("openvino is not installed (leanvgg[export])")
    baseline, store = tiny_baseline(), Store(tmp_path / "cache")
    names = ["baseline", "int8_static"]
    served = build_variants(baseline, names, store=store, progress=False, runtime="openvino",
                            threads=1)
    labelled = image_folder(colour_folder / "set", MAPPING)
    results = evaluate(served, labelled, progress=False)
    assert results["int8_static"].runtime == "openvino"
    assert results["baseline"].runtime == "pytorch"
    save_report(store, results)
    again = build_variants(baseline, names, store=store, progress=False, runtime="openvino",
                           threads=1)
    assert again.variants["int8_static"].summary().accuracy.runtime == "openvino"
    on_inductor = build_variants(baseline, names, store=store, progress=False,
                                 runtime="inductor", threads=1)
    assert on_inductor.variants["int8_static"].summary().accuracy is None  # measured elsewhere
    assert on_inductor.variants["baseline"].summary().accuracy.images == 7
