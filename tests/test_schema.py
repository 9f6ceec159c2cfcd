"""The one report schema (leanvgg.schema): what it rejects, and every producer's output checked
against it (compare's JSON and --output here; the real server's /api/compare in
test_front_door; tune's report in test_tune; the benchmarks validate at write time)."""

import ast
import json
from pathlib import Path

import pytest

from leanvgg import schema
from leanvgg.cli import main
from leanvgg.measure import Latency

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _report() -> dict:
    latency = Latency.from_seconds([0.010, 0.012, 0.011])
    return schema.document("benchmark/example", [
        {"name": "a", "latency_ms": latency.to_dict(),
         "throughput": schema.Throughput.of(4, latency).to_dict()}],
        config={"runs": 3}, threads=1)


def test_a_complete_report_passes_and_each_missing_fact_is_named():
    report = _report()
    schema.validate(report)
    assert report["results"][0]["throughput"]["images_per_s"] == pytest.approx(4 / 0.011)
    assert report["machine"]["threads"] == 1 and "torch" in report["machine"]["versions"]
    for path, message in [(("results", 0, "latency_ms", "p99"), "results/0/latency_ms"),
                          (("machine", "flags"), "machine"), (("results", 0, "name"), "results/0")]:
        broken = json.loads(json.dumps(report))
        owner = broken
        for key in path[:-1]:
            owner = owner[key]
        del owner[path[-1]]
        with pytest.raises(schema.SchemaError, match=f"at {message}:"):
            schema.validate(broken)
    with pytest.raises(schema.SchemaError, match="schema_version"):
        schema.validate({**report, "schema_version": 0})


def test_write_refuses_an_invalid_report_and_leaves_the_old_file(tmp_path):
    path = tmp_path / "report.json"
    schema.write(path, _report())
    before = path.read_bytes()
    with pytest.raises(schema.SchemaError):
        schema.write(path, {**_report(), "results": [{"latency_ms": {}}]})
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_compare_json_and_output_follow_the_schema(variant_set, cache_dir, monkeypatch,
                                                   photo_path, capsys, tmp_path):
    monkeypatch.setenv("LEANVGG_HOME", str(cache_dir))
    out = tmp_path / "reports" / "compare.json"
    assert main(["compare", str(photo_path), "--weights", "random", "--runs", "2", "--warmup",
                 "0", "--threads", "1", "--variants", "res160", "--batch-size", "2",
                 "--output", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    assert printed == saved
    schema.validate(saved)
    assert saved["kind"] == "compare" and saved["config"]["batch_size"] == 2
    for row in saved["results"]:
        latency, throughput = row["latency_ms"], row["throughput"]
        assert latency["count"] == len(latency["samples"]) == 2
        assert latency["min"] <= latency["median"] <= latency["max"]
        assert throughput["batch_size"] == 2 and throughput["latency_ms"]["count"] == 2
        assert throughput["images_per_s"] == pytest.approx(
            2 / (throughput["latency_ms"]["median"] / 1e3))


def test_every_benchmark_builds_its_json_through_the_schema():
    """Each benchmark makes its report with schema.document and saves it with schema.write
    (which validates it at run time; tune_digits saves the search's own schema report, and
    quantization_backends prints its report after validating it); none writes JSON of its
    own shape."""
    for script in sorted(BENCHMARKS.glob("*.py")):
        source = script.read_text()
        calls = {ast.unparse(node.func) for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.Call)}
        assert calls & {"schema.document", "to_document", "search"}, script.name
        assert calls & {"schema.write", "write_report", "schema.validate"}, script.name
        assert ".write_text(json.dumps" not in source, script.name
