"""The README's Python API examples run as written (offline, random weights), in order, in one
namespace, from a folder holding the photo they name."""

import re
import shutil
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def _python_api_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_the_python_api_examples_run(tmp_path, monkeypatch, photo_path, capsys):
    blocks = _python_api_blocks()
    assert len(blocks) == 2
    monkeypatch.setenv("LEANVGG_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(photo_path, tmp_path / "photo.jpg")
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # their asserts are the checks
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["baseline", "quantized", "res160"]
    assert (tmp_path / "exported" / "quantized.safetensors").is_file()
    assert (tmp_path / "exported" / "quantized.model.json").is_file()
    assert [e.format for e in namespace["exported"]] == ["safetensors"]
