import json

import pytest
import torch
from PIL import Image
from torch import nn

from leanvgg.evaluate import (MappingError, evaluate, image_folder, load_mapping, save_report)
from leanvgg.recipes import RECIPES
from leanvgg.store import EVALUATION, Store
from leanvgg.variants import Variant, VariantSet, build_variants
from tiny import tiny_baseline

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
        "baseline": Variant(RECIPES["baseline"], ChannelVoter(), {}, "a"),
        # green and blue swapped: right on the 3 reds only
        "quantized": Variant(RECIPES["quantized"], ChannelVoter((0, 2, 1)), {}, "b"),
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
    assert accuracy["images"] == 7 and accuracy["dataset"] == "set" and 0 <= accuracy["top1"] <= 1
    stale = store.load_json(EVALUATION)
    stale["quantized"]["artifact"] = "weights that are no longer cached"
    store.save_json(EVALUATION, stale)
    again = build_variants(baseline, ["baseline", "quantized"], store=store, progress=False)
    assert again.variants["quantized"].summary().accuracy is None
    assert again.variants["baseline"].summary().accuracy["images"] == 7


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
