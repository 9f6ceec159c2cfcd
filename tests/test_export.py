"""Exports run without leanvgg: each is loaded in a fresh Python where importing leanvgg fails,
fed the photos the way its model.json says, and compared with leanvgg's own variant."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from leanvgg import cli
from leanvgg.data import CALIBRATION_PHOTOS
from leanvgg.images import decode, read_file
from leanvgg.models import Baseline, from_layout
from leanvgg.store import Store
from leanvgg.variants import build_variants
from tiny import TINY_LAYOUT

PHOTOS = sorted(p for p in CALIBRATION_PHOTOS.glob("*.jpg"))  # scikit-image's bundled photos
# Measured on this suite's tiny model (max |logit difference| over the photos, relative to the
# largest |logit|): the FP32 package against eager PyTorch 1.19e-07 / 0.13 (about 1e-6); the
# INT8 export is leanvgg's own package, bit-identical (0). Bounds: ten times that, and 1e-6.
BOUNDS = {"baseline": 1e-5, "int8_static": 1e-6}

RUNNER = r"""
import json, sys
from pathlib import Path
sys.modules["leanvgg"] = None  # importing leanvgg here raises: the export must stand alone
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

spec_path = Path(sys.argv[1])
spec = json.loads(spec_path.read_text())
pre = spec["preprocessing"]
model = torch._inductor.aoti_load_package(str(spec_path.parent / spec["file"]))
transform = v2.Compose([
    v2.Resize(pre["resize_shorter_side"], interpolation=InterpolationMode.BILINEAR,
              antialias=pre["antialias"]),
    v2.CenterCrop(pre["centre_crop"]), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
    v2.Normalize(pre["mean"], pre["std"])])
logits = {}
for photo in sys.argv[2:]:
    x = transform(Image.open(photo).convert(pre["colour"])).unsqueeze(0)
    if pre["contiguous"]:  # torchvision's tensor is a channels-last view of the pixels
        x = x.contiguous()
    with torch.inference_mode():
        logits[Path(photo).name] = model(x)[0].tolist()
print(json.dumps(logits))
"""


def decisive_baseline() -> Baseline:
    """The tiny VGG, seeded, with torchvision's VGG initialisation (Kaiming convs, zero biases:
    unlike PyTorch's default init its features still differ from photo to photo) and its last
    Linear scaled so that logits are far apart."""
    torch.manual_seed(0)
    model = from_layout(TINY_LAYOUT)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)
        model.classifier[6].weight.mul_(40)
    return Baseline(model.eval(), "tiny-decisive", "tiny-vgg-init-seed0", meaningful=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    home, out = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LEANVGG_HOME", str(home))
        patch.setattr(cli, "load_baseline", lambda weights, **_: decisive_baseline())
        assert cli.main(["export", "baseline", "int8_static", "--out", str(out)]) == 0
    variants = build_variants(decisive_baseline(), ["baseline", "int8_static"],
                              store=Store(home), progress=False).variants
    return out, variants


def _leanvgg_logits(variant) -> dict[str, torch.Tensor]:
    size = variant.input_size
    with torch.inference_mode():
        return {p.name: variant.model(decode(read_file(p)).batches({size}).tensors[size])[0]
                for p in PHOTOS}


@pytest.mark.parametrize("name", ["baseline", "int8_static"])
def test_a_pt2_export_runs_without_leanvgg_and_agrees_with_it(exported, name):
    out, variants = exported
    result = subprocess.run([sys.executable, "-c", RUNNER, str(out / f"{name}.model.json"),
                             *map(str, PHOTOS)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    theirs = {k: torch.tensor(v) for k, v in json.loads(result.stdout).items()}
    ours = _leanvgg_logits(variants[name])
    top1 = {k: int(v.argmax()) for k, v in ours.items()}
    assert {k: int(v.argmax()) for k, v in theirs.items()} == top1
    assert len(set(top1.values())) > 1  # the photos are told apart: top-1 is not a constant
    spread = max(float(v.abs().max()) for v in ours.values())
    worst = max(float((theirs[k] - ours[k]).abs().max()) for k in ours)
    print(f"{name}: worst |logit difference| {worst:.3g}, largest |logit| {spread:.3g}")
    assert worst <= BOUNDS[name] * spread, (worst, spread)


def test_model_json_says_how_to_feed_it_and_what_it_is(exported):
    out, variants = exported
    spec = json.loads((out / "int8_static.model.json").read_text())
    assert spec["preprocessing"]["resize_shorter_side"] == 256
    assert spec["preprocessing"]["centre_crop"] == [224, 224]
    assert spec["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert spec["recipe"]["steps"][0]["op"] == "quantize_static_int8"
    assert spec["artifact"] == variants["int8_static"].artifact
    assert spec["facts"]["calibration"]["source"] == "bundled photos"
    assert spec["versions"]["torch"] == torch.__version__ and spec["machine"]["capability"]
    assert spec["run"] == "torch._inductor.aoti_load_package('int8_static.pt2')(x)"


def test_what_a_format_cannot_hold_is_refused_with_what_can(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEANVGG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cli, "load_baseline", lambda weights, **_: decisive_baseline())
    assert cli.main(["export", "quantized", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "quantized cannot be exported as pt2" in err and "int8_static" in err
    assert len(err.strip().splitlines()) == 1
