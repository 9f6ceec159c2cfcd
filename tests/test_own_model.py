"""A user's own VGG (issue 22): any torchvision layout and class count, from a state dict, a
checkpoint or safetensors, with its labels and its data, through every command, and the
README's walk-through run as written."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn
from torchvision.models import VGG, vgg16_bn
from torchvision.models.vgg import make_layers

from leanvgg import cache, cli
from leanvgg.compare import Settings, compare
from leanvgg.data import FolderImages, scan_folder
from leanvgg.images import decode, preprocess, read_file
from leanvgg.labels import Labels, LabelsError, read_labels
from leanvgg.measure import top_k
from leanvgg.models import (Baseline, WeightsError, arch_of, from_layout, layout_of,
                            load_baseline)
from leanvgg.store import Store
from leanvgg.variants import build_variants
from tests.tiny import TINY_LAYOUT

README = Path(__file__).parent.parent / "README.md"
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# VGG-11-BN's blocks (1, 1, 2, 2, 2 convs) at a fraction of its widths
SMALL_VGG11_BN = {"arch": "vgg", "batch_norm": True,
                  "cfg": [8, "M", 16, "M", 32, 32, "M", 32, 32, "M", 32, 32, "M"],
                  "linear_features": [32 * 7 * 7, 64, 64, 10]}
# the same blocks, wide enough to learn the digits in seconds (about 75 % on held-out images)
DIGITS_VGG11_BN = {"arch": "vgg", "batch_norm": True,
                   "cfg": [16, "M", 32, "M", 64, 64, "M", 64, 64, "M", 64, 64, "M"],
                   "linear_features": [64 * 7 * 7, 128, 128, 10]}


def initialised(layout: dict, seed: int = 0) -> VGG:
    torch.manual_seed(seed)
    model = from_layout(layout)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()  # BatchNorm: running mean 0, variance 1
    return model.eval()


def decisive(model: VGG, scale: float = 30.0) -> VGG:
    """Random weights whose top-1 varies by image: the last Linear scaled up."""
    with torch.no_grad():
        model.classifier[6].weight.mul_(scale)
    return model


def write_digits(root: Path, train: int = 100, val: int = 20) -> Path:
    """scikit-learn's handwritten digits as a labelled image folder: 32 × 32 PNGs in
    ``train/<label>/`` and ``val/<label>/``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen = {d: 0 for d in range(10)}
    for image, target in zip(digits.images, digits.target):
        count = seen[int(target)]
        if count >= train + val:
            continue
        part = "train" if count < train else "val"
        folder = root / part / DIGITS[target]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert("RGB").save(
            folder / f"{count:03d}.png")
        seen[int(target)] += 1
    return root


def train_digits(folder: Path, epochs: int = 20) -> VGG:
    """A small VGG-11-BN trained on the digits folder at 32 px (leanvgg's own preprocessing)."""
    model = initialised(DIGITS_VGG11_BN)
    data = FolderImages(scan_folder(folder, DIGITS), 32)
    images = torch.stack([data[i][0] for i in range(len(data))])
    targets = torch.tensor(data.targets)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(32):
            loss = nn.functional.cross_entropy(model(images[batch]), targets[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def checkpoint(model: nn.Module, path: Path) -> Path:
    """A training checkpoint as DDP leaves it: the state dict under 'model_state_dict', each
    name prefixed with 'module.', beside the epoch and the optimiser's settings."""
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "epoch": 3, "lr": 1e-3}, path)
    return path


# --- the three files of the issue, and what is refused -----------------------------------------

def test_a_state_dict_a_checkpoint_and_safetensors_load_as_the_model_they_hold(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    archs = {"vgg19-10.pt": ("vgg19 (custom widths)", 10),
             "vgg16bn-5.pt": ("vgg16_bn (custom widths)", 5),
             "vgg11.safetensors": ("vgg11_bn (custom widths)", 10)}
    for name, (path, model) in _three_files(tmp_path).items():
        arch, classes = archs[name]
        loaded = load_baseline(str(path))
        assert (loaded.arch, loaded.num_classes) == (arch, classes)
        assert loaded.weights_id.startswith("file-") and loaded.meaningful
        assert loaded.labels.names == tuple(f"class {i}" for i in range(classes))
        assert "no labels given" in loaded.labels.note
        with torch.inference_mode():
            assert torch.equal(loaded.model(x), model(x)), name


def test_torchvision_layouts_are_named_as_torchvision_names_them():
    assert arch_of(layout_of(vgg16_bn(num_classes=5, init_weights=False))) == "vgg16_bn"
    assert arch_of(layout_of(from_layout({"arch": "vgg", "batch_norm": False, "cfg": [
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
        512, 512, 512, 512, "M"], "linear_features": [25088, 4096, 4096, 1000]}))) == "vgg19"


@pytest.mark.parametrize(("content", "message"), [
    (lambda: {"epoch": 3, "optimizer": {"lr": 0.1}},
     r"holds a dict with keys \['epoch', 'optimizer'\], not a model's weights"),
    (lambda: {"encoder.0.weight": torch.zeros(4, 3, 3, 3)},
     "is not a torchvision VGG: no features.N conv weights"),
    # a conv whose input channels do not match the previous conv's outputs
    (lambda: {**initialised(SMALL_VGG11_BN).state_dict(),
              "features.4.weight": torch.zeros(16, 5, 3, 3)},
     "is a VGG whose tensors do not fit together: size mismatch for features.4.weight"),
    # a VGG with three blocks: no torchvision layout
    (lambda: from_layout({"arch": "vgg", "batch_norm": False, "cfg": [4, "M", 4, "M", 4, "M"],
                          "linear_features": [4 * 49, 8, 8, 3]}).state_dict(),
     r"3 convs in blocks of \[1, 1, 1\], which no torchvision VGG has"),
], ids=["checkpoint-without-model", "not-a-vgg", "shapes-do-not-chain", "three-blocks"])
def test_what_is_not_a_vgg_is_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "weights.pt"
    torch.save(content(), path)
    with pytest.raises(WeightsError, match=message) as caught:
        load_baseline(str(path))
    assert "\n" not in str(caught.value)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"model_state_dict": {"features.0.weight": torch.zeros(1)}, "hook": Payload()},
               tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match=r"refused by torch.load\(weights_only=True\)"):
        load_baseline(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "ran").exists()


def test_label_files_are_checked(tmp_path):
    def labels(text: bytes | str) -> Labels:
        path = tmp_path / "labels.txt"
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        return read_labels(path)

    assert labels("cat\ndog\n").names == ("cat", "dog")
    assert labels('["cat", "dog"]').names == ("cat", "dog")
    assert labels("\ufeffcat\r\ndog").names == ("cat", "dog")  # a BOM and CRLF, as Windows writes
    for text, problem in [("cat\n\ndog\n", "name 1 .line 2. is empty"),
                          ("cat\ndog\ncat\n", "'cat' is both name 0 and name 2"),
                          (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not UTF-8 text"),
                          ("cat\x00\ndog", "control characters"),
                          ('["cat", 3]', "must be a list of strings"),
                          ("", "no names")]:
        with pytest.raises(LabelsError, match=problem):
            labels(text)
    (tmp_path / "huge.txt").write_bytes(b"x\n" * (3 * 2**20))
    with pytest.raises(LabelsError, match="more than"):
        read_labels(tmp_path / "huge.txt")
    with pytest.raises(LabelsError, match="3 names for a model with 10 classes"):
        Baseline(initialised(SMALL_VGG11_BN), "m", "m", True, labels=Labels(("a", "b", "c"), "x"))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LEANVGG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _one_line_exit_2(argv: list[str], capsys, message: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leanvgg: error: "), err
    assert re.search(message, err[0]), err[0]


def test_bad_input_exits_2_with_one_line_and_caches_nothing(tmp_path, home, capsys, photo_path):
    model = decisive(initialised(SMALL_VGG11_BN))
    torch.save(model.state_dict(), tmp_path / "my_vgg.pt")
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    weights = ["--weights", str(tmp_path / "my_vgg.pt"), "--input-size", "32"]
    _one_line_exit_2(["compare", str(photo_path), *weights, "--labels",
                      str(tmp_path / "three.txt")], capsys, "3 names for a model with 10 classes")
    _one_line_exit_2(["serve", *weights, "--labels", str(tmp_path / "three.txt"), "--port",
                      "8799"], capsys, "3 names for a model with 10 classes")  # before serving
    torch.save({"epoch": 3}, tmp_path / "no-model.pt")
    _one_line_exit_2(["build", "--weights", str(tmp_path / "no-model.pt")], capsys,
                     "not a model's weights")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "not-vgg.pt")
    _one_line_exit_2(["evaluate", "--weights", str(tmp_path / "not-vgg.pt")], capsys,
                     "is not a torchvision VGG")
    data = write_digits(tmp_path / "digits", train=2, val=1)
    (tmp_path / "letters.txt").write_text("\n".join("abcdefghij"))
    _one_line_exit_2(["finetune", *weights, "--labels", str(tmp_path / "letters.txt"),
                      "--data", str(data / "train")], capsys,
                     r"10 sub-folder\(s\) named after no class of the model \('eight'")
    _one_line_exit_2(["finetune", *weights, "--data", str(tmp_path / "digits")], capsys,
                     "2 names for a model with 10 classes")  # train/ and val/ as labels
    assert cache.entries(Store(home)) == []
    assert not (home / "labels.report.json").exists()


def test_a_folder_skips_what_is_not_an_image_and_links_that_leave_it(tmp_path):
    data = write_digits(tmp_path / "digits", train=2, val=0) / "train"
    (data / "zero" / "notes.txt").write_text("not an image")
    (data / "zero" / "fake.png").write_bytes(b"\x89PNG but not really")
    secret = tmp_path / "secret.png"
    secret.write_bytes((data / "one" / "000.png").read_bytes())
    (data / "one" / "link.png").symlink_to(secret)
    (data / "two" / "inside.png").symlink_to(data / "one" / "000.png")
    scan = scan_folder(data, DIGITS)
    assert (scan.not_images, scan.outside) == (2, 1)
    assert len(scan.samples) == 21  # 2 per class and the link that stays inside
    assert "skipped 2 files that are not images and 1 links out of the folder" in \
        scan.skipped_note
    assert not any(path.name == "link.png" for path, _ in scan.samples)
    (tmp_path / "empty" / "zero").mkdir(parents=True)
    with pytest.raises(Exception, match="holds no images"):
        scan_folder(tmp_path / "empty", DIGITS)


# --- predictions against a plain torchvision model ---------------------------------------------

def prune_by_the_rule(model: VGG, ratio: float = 0.10) -> VGG:
    """The article's pruning written out for any VGG with BatchNorm: in the last conv of block 3
    and every conv of blocks 4 and 5, keep the filters of the highest L2 norm (n - int(ratio·n),
    in their order), with their BatchNorm channels; the next conv (or the first Linear's
    per-channel blocks of 7×7 columns) keeps the matching inputs."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    blocks, block = [], []
    for index, module in enumerate(model.features):
        if isinstance(module, nn.Conv2d):
            block.append(index)
        elif isinstance(module, nn.MaxPool2d):
            blocks.append(block)
            block = []
    convs = [i for b in blocks for i in b]
    targets = [blocks[2][-1], *blocks[3], *blocks[4]]
    cfg = []
    for index in convs:
        weight = model.features[index].weight
        n = weight.shape[0]
        if index in targets:
            norms = weight.flatten(1).norm(dim=1)
            keep = torch.sort(torch.topk(norms, n - int(ratio * n)).indices).values
            for name in ("weight", "bias"):
                state[f"features.{index}.{name}"] = state[f"features.{index}.{name}"][keep]
            for name in ("weight", "bias", "running_mean", "running_var"):
                state[f"features.{index + 1}.{name}"] = state[f"features.{index + 1}.{name}"][keep]
            later = [c for c in convs if c > index]
            if later:
                key = f"features.{later[0]}.weight"
                state[key] = state[key][:, keep]
            else:
                columns = (keep[:, None] * 49 + torch.arange(49)).flatten()
                state["classifier.0.weight"] = state["classifier.0.weight"][:, columns]
            n = len(keep)
        cfg.append(n)
        if index in (b[-1] for b in blocks):
            cfg.append("M")
    plain = VGG(make_layers(cfg, batch_norm=True), num_classes=model.classifier[6].out_features,
                init_weights=False)
    plain.classifier[0] = nn.Linear(state["classifier.0.weight"].shape[1], 64)
    plain.classifier[3] = nn.Linear(64, 64)
    plain.classifier[6] = nn.Linear(64, model.classifier[6].out_features)
    plain.load_state_dict(state)
    return plain.eval()


def test_top3_of_baseline_and_pruned_are_the_plain_models_with_the_users_labels(
        tmp_path, photo_path):
    model = decisive(initialised(SMALL_VGG11_BN))
    checkpoint(model, tmp_path / "my_vgg.pt")
    names = Labels(tuple(f"<b>{d}</b> & co" for d in DIGITS), "given")
    baseline = load_baseline(str(tmp_path / "my_vgg.pt"), labels=names, input_size=32)
    variant_set = build_variants(baseline, ["baseline", "pruned", "quantized", "res160"],
                                 store=Store(tmp_path / "home"), progress=False, threads=1)
    assert variant_set.variants["res160"].input_size == 32  # 160/224 of 32, at least 32
    picture = decode(read_file(photo_path))
    result = compare(picture, variant_set, Settings(runs=1, warmup=0))
    rows = {row.name: row for row in result.variants}
    x = preprocess(picture.square, 32)
    with torch.inference_mode():
        expected = {"baseline": top_k(model(x), names.names), "pruned": top_k(
            prune_by_the_rule(model)(x), names.names)}
    for name, plain in expected.items():
        got = rows[name].top3
        assert [p.index for p in got] == [p.index for p in plain], name
        assert [p.label for p in got] == [p.label for p in plain], name
        assert [p.prob for p in got] == pytest.approx([p.prob for p in plain], abs=1e-5), name
    assert rows["quantized"].top3[0].label in names.names
    report = result.to_dict()
    assert report["model"]["arch"] == "vgg11_bn (custom widths)"
    assert report["model"]["classes"] == 10 and report["model"]["labels"] == "given"
    assert report["results"][0]["top3"][0]["label"].startswith("<b>")
    # the same weights without --labels: the defaults, and the same cache entries
    again = load_baseline(str(tmp_path / "my_vgg.pt"), input_size=32)
    assert again.weights_id == baseline.weights_id and again.labels.source == "generic"


# --- the README's walk-through, as written ----------------------------------------------------

def _section(title: str) -> str:
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.slow
def test_the_readme_walk_through_runs_as_written(tmp_path, home):
    """Digits → a VGG-11-BN trained here → compare, finetune, evaluate, tune --max-drop 1,
    export tuned as ONNX → ONNX Runtime without leanvgg prints the right label names."""
    section = _section("Your own model")
    commands = [line for line in re.findall(r"```sh\n(.*?)```", section, flags=re.S)[0]
                .splitlines() if line.strip() and not line.startswith("#")]
    program = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    write_digits(tmp_path / "digits")
    model = train_digits(tmp_path / "digits" / "train")
    checkpoint(model, tmp_path / "my_vgg.pt")
    (tmp_path / "labels.txt").write_text("\n".join(DIGITS) + "\n")
    env = {**os.environ, "LEANVGG_HOME": str(home), "PYTHONPATH": str(README.parent)}
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "leanvgg"
        if argv[1] == "compare":
            (tmp_path / "digit.png").write_bytes(
                (tmp_path / "digits" / "val" / "seven" / "105.png").read_bytes())
        done = subprocess.run([sys.executable, "-m", "leanvgg", *argv[1:]], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=1500)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    compare_out, finetune_out, evaluate_out, tune_out, export_out = outputs
    assert re.search(r"  (zero|one|two|three|four|five|six|seven|eight|nine) \d",
                     compare_out.splitlines()[2])  # the baseline's top-1, by its name
    assert "model: vgg11_bn (custom widths), 10 classes (file labels.txt labels)" in compare_out
    assert "cross-entropy" in finetune_out
    assert "(folder digits/train labels)" not in finetune_out  # --labels were kept: file
    assert re.search(r"^baseline .*\(200 images, on pytorch\)", evaluate_out, flags=re.M)
    assert "Registered" in tune_out and "as 'tuned'" in tune_out
    exported = tmp_path / "exported"
    meta = json.loads((exported / "tuned.model.json").read_text())
    assert meta["labels"] == list(DIGITS) and meta["model"]["classes"] == 10
    # validation images through ONNX Runtime in a process without leanvgg: the names it prints
    # are the model's, for the class leanvgg's own tuned variant predicts
    import leanvgg

    tuned = leanvgg.build(str(tmp_path / "my_vgg.pt"), ["tuned"], input_size=32, home=home)
    hits = agree = 0
    images = sorted((tmp_path / "digits" / "val").glob("*/*.png"))[::10]
    for image in images:
        (tmp_path / "digit.png").write_bytes(image.read_bytes())
        done = subprocess.run([sys.executable, "-I", "-c", program], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        printed = done.stdout.strip()
        assert printed in DIGITS
        ours = leanvgg.compare(image, tuned, runs=1, warmup=0)
        agree += printed == next(r for r in ours.variants if r.name == "tuned").top3[0].label
        hits += printed == image.parent.name
    assert agree >= 0.9 * len(images), (agree, len(images))
    assert hits >= 0.5 * len(images), (hits, len(images))  # chance is 10 %


def test_batchnorm_is_folded_into_its_conv_before_static_int8():
    from leanvgg.quantize import quantize_static_int8

    model = initialised(SMALL_VGG11_BN)
    quantized = quantize_static_int8(model, torch.randn(8, 3, 32, 32))
    graphs = [m for m in quantized.modules() if isinstance(m, torch.fx.GraphModule)]
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert graphs and any("conv" in t for t in targets)
    assert not any("batch_norm" in t for t in targets)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():  # folded and quantized, the same classes come out
        assert torch.equal(quantized(x).argmax(1), model(x).argmax(1))


@pytest.mark.slow
def test_exports_carry_the_labels_where_the_format_has_a_place(tmp_path):
    import leanvgg
    from leanvgg.portable import read_spec

    names = [f"digit {d}" for d in DIGITS]
    variant_set = leanvgg.build(decisive(initialised(SMALL_VGG11_BN)), ["quantized"],
                                labels=names, input_size=32, home=tmp_path / "home", threads=1)
    out = tmp_path / "out"
    leanvgg.export(variant_set, "quantized", out, formats=["safetensors"])
    leanvgg.export(variant_set, "baseline", out, formats=["onnx", "openvino"])
    assert read_spec(out / "quantized.safetensors")["labels"] == names
    for variant in ("quantized", "baseline"):
        meta = json.loads((out / f"{variant}.model.json").read_text())
        assert meta["labels"] == names and meta["output"].startswith("logits, N×10 ")
    import onnx
    import openvino

    props = {p.key: p.value for p in onnx.load(str(out / "baseline.onnx")).metadata_props}
    assert json.loads(props["labels"]) == names
    ir = openvino.Core().read_model(str(out / "baseline.xml"))
    assert json.loads(ir.get_rt_info(["leanvgg", "labels"]).astype(str)) == names
    assert json.loads(ir.get_rt_info(["leanvgg", "model"]).astype(str))["classes"] == 10


def _three_files(tmp_path: Path) -> dict[str, tuple[Path, VGG]]:
    """The issue's three files, at test widths: a VGG-19 fine-tuned to 10 classes (a state
    dict), a VGG-16-BN with 5 classes (a DDP checkpoint), and a VGG-11-BN as safetensors."""
    vgg19_10 = decisive(initialised({**TINY_LAYOUT, "linear_features": [32 * 49, 64, 64, 10]}))
    vgg16_bn_5 = decisive(initialised({"arch": "vgg", "batch_norm": True,
                                       "cfg": [4, 4, "M", 8, 8, "M", 16, 16, 16, "M",
                                               32, 32, 32, "M", 32, 32, 32, "M"],
                                       "linear_features": [32 * 49, 64, 64, 5]}))
    vgg11_bn = decisive(initialised(SMALL_VGG11_BN))
    torch.save(vgg19_10.state_dict(), tmp_path / "vgg19-10.pt")
    checkpoint(vgg16_bn_5, tmp_path / "vgg16bn-5.pt")
    safetensors.torch.save_file(vgg11_bn.state_dict(), str(tmp_path / "vgg11.safetensors"))
    return {"vgg19-10.pt": (tmp_path / "vgg19-10.pt", vgg19_10),
            "vgg16bn-5.pt": (tmp_path / "vgg16bn-5.pt", vgg16_bn_5),
            "vgg11.safetensors": (tmp_path / "vgg11.safetensors", vgg11_bn)}


def test_the_three_files_through_compare_with_their_labels(tmp_path, home, capsys, photo_path):
    for name, (path, model) in _three_files(tmp_path).items():
        classes = model.classifier[6].out_features
        labels = tmp_path / f"{name}.labels"
        labels.write_text("\n".join(f"kind {chr(65 + i)}" for i in range(classes)))
        assert cli.main(["compare", str(photo_path), "--weights", str(path), "--labels",
                         str(labels), "--input-size", "32", "--variants", "pruned,quantized",
                         "--runs", "1", "--warmup", "0", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)  # stdout is the JSON alone
        assert report["model"]["classes"] == classes
        assert report["model"]["labels"] == f"file {labels}"
        x = preprocess(decode(read_file(photo_path)).square, 32)
        with torch.inference_mode():
            plain = top_k(model(x), [f"kind {chr(65 + i)}" for i in range(classes)])
        rows = {row["name"]: row for row in report["results"]}
        assert [(p["index"], p["label"]) for p in rows["baseline"]["top3"]] == [
            (p.index, p.label) for p in plain], name
        assert all(p["label"].startswith("kind ") for p in rows["pruned"]["top3"])
    # the labels travel with the weights: the next command without --labels shows them
    path = tmp_path / "vgg16bn-5.pt"
    assert cli.main(["build", "--weights", str(path), "--input-size", "32",
                     "--variants", "quantized"]) == 0
    assert capsys.readouterr().out.startswith(
        f"model: vgg16_bn (custom widths), 5 classes (file {tmp_path / 'vgg16bn-5.pt.labels'} "
        "labels), 32 px")


@pytest.mark.slow
def test_exported_onnx_and_pt2_keep_the_variants_top1(tmp_path, home, capsys, photo_path):
    import onnxruntime

    path, _ = _three_files(tmp_path)["vgg16bn-5.pt"]
    out = tmp_path / "exported"
    assert cli.main(["export", "pruned", "--weights", str(path), "--input-size", "32",
                     "--format", "onnx", "--format", "pt2", "--out", str(out),
                     "--threads", "1"]) == 0
    assert "pruned as onnx" in capsys.readouterr().out
    assert cli.main(["compare", str(photo_path), "--weights", str(path), "--input-size", "32",
                     "--variants", "pruned", "--runs", "1", "--warmup", "0", "--json",
                     "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = next(r for r in report["results"] if r["name"] == "pruned")["top3"][0]["index"]
    x = preprocess(decode(read_file(photo_path)).square, 32)
    session = onnxruntime.InferenceSession(str(out / "pruned.onnx"),
                                           providers=["CPUExecutionProvider"])
    assert int(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].argmax()) == \
        expected
    torch.set_num_threads(1)
    package = torch._inductor.aoti_load_package(str(out / "pruned.pt2"))
    with torch.inference_mode():
        assert int(package(x).argmax()) == expected


def test_a_folder_split_is_stratified_seeded_and_says_so(tmp_path):
    from leanvgg.evaluate import labelled_folder, split

    write_digits(tmp_path / "digits", train=10, val=0)
    train, val = split(labelled_folder(tmp_path / "digits" / "train", DIGITS))
    assert "20% of each class held out, seed 0" in val.name and "validation part" in val.name
    t, v = train.dataset(32), val.dataset(32)
    assert (len(t), len(v)) == (80, 20)
    assert sorted(v.targets) == sorted(list(range(10)) * 2)
    assert not set(t.indices) & set(v.indices)
    assert split(labelled_folder(tmp_path / "digits" / "train", DIGITS))[1].dataset(32).indices \
        == v.indices  # seeded


def test_vgg19_keys_are_unchanged():
    """ImageNet VGG-19's registered steps name exactly what they named before any layout
    could be given: same JSON, so the same cache keys and results."""
    from leanvgg.recipes import RECIPES, bind

    bound = bind(RECIPES["pruned_quantized"], load_baseline("random", progress=False).model)
    assert [s.to_json() for s in bound.steps] == [
        {"op": "prune", "criterion": "l2_norm", "ratio": 0.1,
         "layers": [16, 19, 21, 23, 25, 28, 30, 32, 34]},
        {"op": "finetune", "loss": "grouped-nll"},
        {"op": "quantize_dynamic_int8", "backend": "torch.ao", "dtype": "qint8"}]
