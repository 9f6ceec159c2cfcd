import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import encode
from leanvgg import cache
from leanvgg.cli import main
from leanvgg.recipes import RECIPES
from leanvgg.variants import default_names
from hostile import png_header

VARIANT_KEYS = {"name", "description", "input_size", "size_mb", "params", "params_total", "macs",
                "latency_ms", "speedup", "top3", "fine_tuned", "steps", "article", "preparation_s",
                "latency_source", "image_ms", "profile", "runtime", "placement", "threads",
                "context", "speedup_note"}


@pytest.fixture
def warm_cache(variant_set, cache_dir, monkeypatch):
    monkeypatch.setenv("LEANVGG_HOME", str(cache_dir))
    return cache_dir


def test_compare_json_schema(warm_cache, photo_path, capsys):
    code = main(["compare", str(photo_path), "--weights", "random", "--runs", "2",
                 "--warmup", "0", "--threads", "1", "--runtime", "inductor", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["weights"] == "random" and result["threads"] == 1
    assert result["predictions_meaningful"] is False and "meaningless" in result["note"]
    assert result["runs"] == 2 and result["warmup"] == 0
    assert result["machine"]["threads"] == 1 and result["machine"]["torch"].startswith("2.14")
    variants = {v["name"]: v for v in result["results"]}
    assert list(variants) == default_names()
    for v in variants.values():
        assert VARIANT_KEYS <= v.keys()
        assert set(v["latency_ms"]) == {"median", "p90", "min", "p10", "mean", "stdev", "count",
                                       "p99", "max", "samples"}
        assert v["latency_source"] == "request" and v["latency_ms"]["count"] == 2
        assert 0 < v["latency_ms"]["min"] <= v["latency_ms"]["median"] <= v["latency_ms"]["p90"]
        assert v["size_mb"] > 0 and v["params"] > 0 and v["macs"] > 0 and v["speedup"] > 0
        assert len(v["top3"]) == 3
        assert all({"label", "index", "prob"} == p.keys() for p in v["top3"])
        assert all(0 <= p["index"] < 1000 and 0 <= p["prob"] <= 1 for p in v["top3"])
        compiled = RECIPES[v["name"]].compiled
        assert v["runtime"] == ("inductor" if compiled else "pytorch")  # as --runtime says
    assert variants["baseline"]["speedup"] == 1.0
    assert variants["res160"]["input_size"] == 160
    assert variants["pruned"]["fine_tuned"] is False and variants["quantized"]["fine_tuned"] is None


def test_compare_table_on_a_subset(warm_cache, photo_path, capsys):
    code = main(["compare", str(photo_path), "--weights", "random", "--runs", "1",
                 "--warmup", "0", "--variants", "res160"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line.split()[0] for line in out.splitlines()[2:4]]
    assert rows == ["baseline", "res160"]
    assert "predictions are meaningless" in out


def _bad_inputs(tmp_path, photo):
    jpeg = encode(photo, "JPEG")
    files = {
        "text.jpg": b"hello, I am not a picture\n",
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "empty.png": b"",
        "two-pixels.png": encode(photo.resize((2, 1)), "PNG"),
        "huge-header.png": png_header(100_000, 100_000),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [tmp_path / "missing.jpg", *(tmp_path / name for name in files)]


def test_bad_images_exit_2_with_one_line(tmp_path, photo, capsys):
    for path in _bad_inputs(tmp_path, photo):
        assert main(["compare", str(path), "--weights", "random"]) == 2, path.name
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("leanvgg: error: "), captured.err


def test_bad_weights_exit_2(tmp_path, photo_path, capsys):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"junk")
    assert main(["compare", str(photo_path), "--weights", str(bad)]) == 2
    assert "is not a PyTorch weights file" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["compare"], ["compare", "x.png", "--runs", "0"],
                                  ["compare", "x.png", "--variants", "tiny"], ["frobnicate"]])
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0]


@pytest.mark.slow
def test_console_script_never_shows_a_traceback(tmp_path, photo):
    path = _bad_inputs(tmp_path, photo)[2]  # truncated JPEG
    result = subprocess.run([sys.executable, "-m", "leanvgg", "compare", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leanvgg: error: Corrupt or truncated JPEG")


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    for option in ("--weights", "--runs", "--warmup", "--threads", "--json", "--variants"):
        assert option in text


@pytest.mark.slow
def test_finetune_then_evaluate_from_the_command_line(tmp_path, monkeypatch, capsys, photo_path,
                                                      tiny_cifar_files):
    from test_evaluate import COLOURS, MAPPING
    from tiny import write_cifar

    monkeypatch.setenv("LEANVGG_HOME", str(tmp_path / "home"))
    data = write_cifar(tmp_path / "cifar", per_class=1)
    assert main(["finetune", "--weights", "random", "--data", str(data), "--subset", "10",
                 "--batch-size", "5"]) == 0
    assert "fine-tuned on 10 images × 1 epoch(s)" in capsys.readouterr().out

    folder = tmp_path / "colours"
    for name, (rgb, _) in COLOURS.items():
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), rgb).save(folder / name / "0.png")
    (tmp_path / "mapping.json").write_text(json.dumps(MAPPING))
    assert main(["evaluate", "--weights", "random", "--dataset", "folder", "--data", str(folder),
                 "--mapping", str(tmp_path / "mapping.json"), "--variants", "pruned"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("model: vgg19, 1000 classes (imagenet labels)")
    assert table.splitlines()[2].startswith("baseline") and "(4 images, on pytorch)" in table

    assert main(["compare", str(photo_path), "--weights", "random", "--runs", "1", "--warmup",
                 "0", "--variants", "pruned_quantized,pruned", "--json"]) == 0
    rows = {v["name"]: v for v in json.loads(capsys.readouterr().out)["results"]}
    assert rows["pruned"]["fine_tuned"] is True and rows["pruned_quantized"]["fine_tuned"] is True
    assert rows["pruned"]["finetune"]["images"] == 10
    assert rows["pruned"]["accuracy"]["images"] == 4
    assert rows["pruned_quantized"]["accuracy"] is None  # never evaluated


def test_missing_data_exits_2(tmp_path, capsys):
    assert main(["finetune", "--weights", "random", "--data", str(tmp_path)]) == 2
    assert "holds no cifar-10-batches-py/" in capsys.readouterr().err
    assert main(["evaluate", "--weights", "random", "--dataset", "folder",
                 "--data", str(tmp_path)]) == 2
    assert "needs --mapping FILE" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_stops_cleanly_on_sigterm(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "LEANVGG_HOME": str(tmp_path)}
    server = subprocess.Popen(
        [sys.executable, "-m", "leanvgg", "serve", "--weights", "random", "--port", str(port)],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in server.stderr:
            if "Dashboard on http://127.0.0.1:" in line:
                break
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == 0
    assert "Received SIGTERM; shutting down." in err and "Server stopped." in err
    assert "Traceback" not in err


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leanvgg"), result.stderr
    assert "error:" in lines[0]
    return lines[0]


def _leanvgg(*args: str, home, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leanvgg", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "LEANVGG_HOME": str(home)},
                          **kwargs)


@pytest.mark.slow
def test_bad_command_lines_exit_2_with_one_line(tmp_path, photo_path):
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    home = tmp_path / "home"
    assert "cannot be read" in _one_line_error(_leanvgg("compare", str(loop), home=home))
    assert "not an existing folder" in _one_line_error(_leanvgg(
        "compare", str(photo_path), "--calibration", str(tmp_path / "missing"), home=home))
    assert "1..65535" in _one_line_error(_leanvgg("serve", "--port", "70000", home=home))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert "writable by other users" in _one_line_error(
        _leanvgg("compare", str(photo_path), "--weights", "random", home=shared))


@pytest.mark.slow
def test_an_output_that_cannot_be_written_exits_2_before_any_work(tmp_path, photo_path):
    """An unwritable --output or export --out used to end in a traceback after the work."""
    home, a_file = tmp_path / "home", tmp_path / "a-file"
    a_file.write_text("not a folder")
    assert "is not a folder" in _one_line_error(_leanvgg(
        "compare", str(photo_path), "--weights", "random", "--output",
        str(a_file / "report.json"), home=home))
    assert "cannot write" in _one_line_error(_leanvgg(
        "export", "baseline", "--weights", "random", "--out", "/proc/leanvgg-out", home=home))
    assert "it is a folder" in _one_line_error(_leanvgg(
        "tune", "--max-drop", "1", "--output", str(tmp_path), home=home))
    assert not home.exists() or not any(home.glob("*.pt"))  # nothing was built


def test_finetune_subset_larger_than_the_data_exits_2(tmp_path, tiny_cifar_files, capsys):
    from tiny import write_cifar

    root = write_cifar(tmp_path / "cifar", per_class=2)
    code = main(["finetune", "--weights", "random", "--data", str(root), "--subset", "1000"])
    assert code == 2
    assert "Invalid subset size 1000: the data set has 100 images" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_on_a_taken_port_exits_2_at_once(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        started = time.monotonic()
        line = _one_line_error(_leanvgg("serve", "--weights", "random", "--port",
                                        str(taken.getsockname()[1]), home=tmp_path / "home"))
    assert "cannot listen on 127.0.0.1" in line and "in use" in line
    assert time.monotonic() - started < 60  # before any variant is loaded or built


def test_cache_list_and_clear(tmp_path, monkeypatch, capsys):
    from leanvgg.documents import EVALUATION
    from leanvgg.store import Store
    from leanvgg.variants import build_variants
    from tiny import tiny_baseline

    home = tmp_path / "home"
    monkeypatch.setenv("LEANVGG_HOME", str(home))
    store = Store(home)
    built = build_variants(tiny_baseline(), ["baseline", "quantized", "pruned"], store=store,
                           progress=False)
    store.documents.save(EVALUATION, {"note": "a document, not an entry"})
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("quantized", "pruned"):
        assert built.variants[name].artifact in out
    assert "2 entries" in out and "quantize_dynamic_int8 on" in out and "prune on" in out

    old = next(e for e in cache.entries(store) if e.key == built.variants["quantized"].artifact)
    for path in old.paths:  # written ten days ago
        os.utime(path, (time.time() - 10 * 86400,) * 2)
    assert main(["cache", "clear", "--older-than", "7"]) == 0
    assert "Removed 1 of 2 entries" in capsys.readouterr().out
    assert [e.key for e in cache.entries(store)] == [built.variants["pruned"].artifact]
    assert main(["cache", "clear"]) == 0
    assert cache.entries(store) == []
    assert store.documents.load(EVALUATION) is not None  # the documents are kept
    assert main(["cache", "clear", "--older-than", "-1"]) == 2
    assert "at least 0 days" in capsys.readouterr().err
    # a cleared cache rebuilds on demand
    again = build_variants(tiny_baseline(), ["baseline", "quantized"], store=store,
                           progress=False)
    assert again.variants["quantized"].artifact == built.variants["quantized"].artifact


_IMPORTS_THAT_WARN = """
import logging, sys
from leanvgg import cli
before = [m for m in ("torchao", "torch.utils.cpp_extension") if m in sys.modules]
logging.basicConfig(level=logging.DEBUG if sys.argv[1] == "debug" else logging.WARNING)
if sys.argv[2] == "filtered":
    cli._notices_to_the_debug_log()
import torchao, torch.utils.cpp_extension
logging.getLogger("torch.utils._pytree").warning("a warning of its own")
print(before)
"""


@pytest.mark.slow  # fresh interpreters importing torch
def test_torchs_irrelevant_notices_go_to_the_debug_log_only():
    def run(level, mode):
        done = subprocess.run([sys.executable, "-c", _IMPORTS_THAT_WARN, level, mode],
                              capture_output=True, text=True, timeout=300, check=True)
        assert done.stdout.strip() == "[]"  # the imports below are the first: they warn
        return done.stderr

    notices = {"torch.utils._pytree": "is an Enum subclass and is now natively supported",
               "torch.utils.cpp_extension": "No CUDA runtime is found"}  # CUDA_HOME found
    unfiltered = run("warning", "unfiltered")
    logged = {name: text for name, text in notices.items() if text in unfiltered}
    if not logged:
        pytest.skip("this torch and torchao log neither notice here")
    quiet = run("warning", "filtered")
    assert not any(text in quiet for text in logged.values())
    assert "a warning of its own" in quiet  # the loggers' other warnings still show
    debug = run("debug", "filtered")
    for name, text in logged.items():
        assert f"{name} said: " in debug and text in debug
