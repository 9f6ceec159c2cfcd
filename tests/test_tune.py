"""The accuracy-budgeted search on a VGG-19-shaped tiny model and a tiny CIFAR folder."""

import json
import shutil

import pytest
import torch

from leanvgg import schema, tune, tune_report
from leanvgg.data import cifar10, group_index_tensor
from leanvgg.evaluate import Labelled
from leanvgg.recipes import Candidate
from leanvgg.stats import wilson
from leanvgg.store import Store
from leanvgg.tune import Space, search
from leanvgg.measure import Latency
from leanvgg.tune_report import Measured, pareto_front
from tiny import tiny_baseline, write_cifar

SPACE = Space(resolutions=(64, 32), prune_ratios=(0.0, 0.5), precisions=("fp32", "int8"))
FP32_SPACE = Space(resolutions=(64, 32), prune_ratios=(0.0, 0.5), precisions=("fp32",))
LAYERS = (28, 30, 32, 34)


def _validation(root):
    return Labelled("tiny-cifar", lambda size: cifar10(root, train=False, size=size),
                    group_index_tensor())


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("cifar"), per_class=3)


@pytest.fixture(scope="module")
def searched(cifar_root, tmp_path_factory):
    """One search over the 8-candidate space, shared by the tests that only read it."""
    with pytest.MonkeyPatch.context() as patch:
        import torchvision.datasets.cifar as tv_cifar

        patch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: True)
        home = tmp_path_factory.mktemp("tune")
        report = home / "tune.json"
        return _search(_validation(cifar_root), report), report


def _search(validation, report, space=SPACE, **kwargs):
    return search(tiny_baseline(), validation, space=space, layers=LAYERS,
                  multiple_of=1, runs=2, warmup=1, report=report,
                  store=Store(report.parent / "cache"), progress=False,
                  **{"max_drop": 100.0, **kwargs})


def _dominates(a, b):
    return a.median_ms <= b.median_ms and a.accuracy >= b.accuracy and (
        a.median_ms < b.median_ms or a.accuracy > b.accuracy)


def _record(ms, p10, p90, accuracy, size_mb=100.0, **candidate):
    """A measured record with the figures a test cares about (the rest filler)."""
    return Measured(Candidate(**{"prune_ratio": 0.0, "precision": "fp32", "resolution": 224,
                                 **candidate}),
                    accuracy, (accuracy, accuracy), accuracy, (accuracy, accuracy), 1.0,
                    (1.0, 1.0), 100, Latency(median=ms, p90=p90, min=p10, p10=p10), size_mb,
                    0, 0, 0.0, "key", ())


def test_pareto_front_keeps_exactly_the_undominated():
    points = {name: _record(ms, ms, ms, acc, resolution=size) for name, ms, acc, size in
              [("a", 10, 0.90, 224), ("b", 5, 0.80, 192), ("c", 7, 0.85, 160),
               ("d", 8, 0.70, 128), ("e", 12, 0.90, 96)]}
    names = {r.key: name for name, r in points.items()}
    assert [names[p.key] for p in pareto_front(list(points.values()))] == ["b", "c", "a"]


def test_a_record_survives_its_json_round_trip():
    record = _record(10, 9, 11, 0.8, precision="int8", neuron_ratio=0.5, rank=64)
    assert tune_report.record_of(json.loads(json.dumps(record.to_dict()))) == record
    skipped = tune_report.Skipped(Candidate(0.3, "int8", 128), "dominated")
    assert tune_report.record_of(json.loads(json.dumps(skipped.to_dict()))) == skipped


def test_a_candidate_is_skipped_when_a_safer_one_already_broke_the_budget():
    base = _record(10, 10, 10, 0.9)
    failed = _record(10, 10, 10, 0.8, prune_ratio=0.1, precision="int8", resolution=160)
    done = {"failed": failed}
    assert "dominated" in tune._skip_reason(Candidate(0.3, "int8", 128), done, base, 1.0)
    assert tune._skip_reason(Candidate(0.3, "int8", 192), done, base, 1.0) is None  # larger
    assert tune._skip_reason(Candidate(0.3, "fp32", 128), done, base, 1.0) is None  # other kind
    assert tune._skip_reason(Candidate(0.3, "int8", 128), done, base, 20.0) is None  # in budget
    # classifier compression: more of it is dominated, less of it is not
    done = {"failed": _record(10, 10, 10, 0.8, prune_ratio=0.1, precision="int8",
                              resolution=160, neuron_ratio=0.5, rank=256)}
    assert "dominated" in tune._skip_reason(Candidate(0.3, "int8", 128, neuron_ratio=0.75,
                                                      rank=128), done, base, 1.0)
    assert tune._skip_reason(Candidate(0.3, "int8", 128, neuron_ratio=0.5), done, base,
                             1.0) is None  # not factorised: less compressed
    assert tune._skip_reason(Candidate(0.3, "int8", 128, neuron_ratio=0.25, rank=128), done,
                             base, 1.0) is None


def test_search_front_and_choice(searched):
    result, _ = searched
    measured = result.measured()
    assert len(measured) == len(result.candidates) == 8 and result.complete
    front = [measured[k] for k in result.front]
    for point in front:
        assert not any(_dominates(other, point) for other in measured.values())
    for key, record in measured.items():
        if key not in result.front:
            assert any(_dominates(point, record) for point in front)
    # a 100-point budget admits everything: the choice is simply the fastest candidate
    fastest = min(measured.values(), key=lambda r: r.median_ms)
    assert tune_report.ties(measured[result.chosen], fastest)
    assert set(result.sensitivity) == {str(layer) for layer in LAYERS}
    int8 = measured["prune0-int8-64px"]
    assert int8.size_mb < 0.35 * measured["prune0-fp32-64px"].size_mb
    assert measured["prune0.5-fp32-64px"].macs < measured["prune0-fp32-64px"].macs
    for record in measured.values():  # every accuracy with its count and interval
        low, high = record.accuracy_ci
        assert record.images == 30 and low <= record.accuracy <= high
        assert record.agreement_ci[0] <= record.agreement <= record.agreement_ci[1]
    assert measured[SPACE.baseline.key].agreement == 1.0
    summary = tune_report.summarize(tune_report.from_document(
        json.loads(searched[1].read_text())))
    assert summary["chosen"] == result.chosen and summary["front"] == result.front


def test_the_report_follows_the_report_schema(searched):
    result, report = searched
    document = json.loads(report.read_text())
    schema.validate(document)
    assert document["kind"] == "tune" and document["config"]["max_drop"] == result.max_drop
    measured = [r for r in document["results"] if "accuracy" in r]
    assert {r["name"] for r in document["results"]} == set(result.candidates)
    assert all(r["latency_ms"]["count"] == len(r["latency_ms"]["samples"]) for r in measured)


def test_the_choice_respects_the_budget(searched):
    result, _ = searched
    base = result.baseline
    for max_drop in (0.0, 5.0, 20.0):
        key = tune_report.choose(result.candidates, SPACE.baseline.key, max_drop)
        chosen = result.candidates[key]
        assert chosen.drop(base) <= max_drop
        faster = [r for r in result.measured().values() if r.median_ms < chosen.median_ms]
        # a faster candidate within the budget may only be a latency tie, and no more accurate
        assert all(r.drop(base) > max_drop
                   or (tune_report.ties(r, chosen) and r.accuracy <= chosen.accuracy)
                   for r in faster)


def test_latency_ties_are_broken_by_accuracy_then_size():
    base = _record(100, 95, 105, 0.90, 500)
    fast = _record(50, 48, 53, 0.85, 120, precision="int8")  # the fastest
    tie = _record(52, 51, 56, 0.89, 100, precision="int8", resolution=192)  # overlaps: a tie
    tie_smaller = _record(51, 49, 54, 0.89, 60, precision="int8", resolution=160)
    slower = _record(60, 58, 62, 0.90, 90, precision="bf16")  # no overlap: slower
    records = {"base": base, "fast": fast, "tie": tie, "small": tie_smaller, "slow": slower}
    chosen = tune_report.choose(records, "base", max_drop=10.0)
    assert chosen == "prune0-int8-160px"  # as accurate as the 192 px tie, and smaller
    # out of the budget, the tie no longer counts; the fastest within it wins
    assert tune_report.choose(records, "base", max_drop=3.0) == "prune0-int8-160px"
    assert tune_report.choose(records, "base", max_drop=0.5) == "prune0-bf16-224px"


def test_a_finished_search_measures_nothing_again(searched, cifar_root, monkeypatch,
                                                  tiny_cifar_files):
    result, report = searched
    monkeypatch.setattr(tune, "_measure", lambda *a, **k: pytest.fail("measured again"))
    again = _search(_validation(cifar_root), report)
    assert again.candidates == result.candidates and again.chosen == result.chosen


def test_an_interrupted_search_resumes_where_it_stopped(cifar_root, tmp_path, monkeypatch,
                                                        tiny_cifar_files):
    report, validation = tmp_path / "tune.json", _validation(cifar_root)
    measure = tune._measure
    calls = []

    def counted(candidate, *args, **kwargs):
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        calls.append(candidate.key)
        return measure(candidate, *args, **kwargs)

    monkeypatch.setattr(tune, "_measure", counted)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        _search(validation, report, FP32_SPACE)
    first = list(calls)
    assert len(first) == 2 and set(_candidates(report)) == set(first)
    calls.clear()
    interrupt = False
    result = _search(validation, report, FP32_SPACE)
    assert len(calls) == 2 and not set(calls) & set(first)  # only the unfinished ones
    assert all(isinstance(r, Measured) for r in result.candidates.values())


def test_the_time_budget_stops_the_search(cifar_root, tmp_path, tiny_cifar_files):
    """A budget spent before anything was measured still measures the reference (every drop
    is counted against it): the search ends with it alone, and its report reads (this raised
    a TypeError when the reference was left unmeasured)."""
    result = _search(_validation(cifar_root), tmp_path / "tune.json", FP32_SPACE, budget_s=0.0)
    assert not result.complete and list(result.candidates) == [FP32_SPACE.baseline.key]
    assert result.chosen == FP32_SPACE.baseline.key  # nothing else to choose, and in budget
    assert FP32_SPACE.baseline.key in tune_report.format_front(result)
    tune_report.summarize(tune_report.from_document(
        json.loads((tmp_path / "tune.json").read_text())))


def test_the_drop_is_measured_against_the_unpruned_model_whatever_the_ratios(
        cifar_root, tmp_path, tiny_cifar_files):
    """Without 0 among --prune-ratios, the reference is still the unpruned FP32 model (it was
    the least pruned candidate, so drops were measured against a pruned model)."""
    space = Space(resolutions=(32,), prune_ratios=(0.5,), precisions=("fp32",))
    assert space.baseline == Candidate(0.0, "fp32", 32)
    assert space.grid(fine_tune=False)[0] == space.baseline
    result = _search(_validation(cifar_root), tmp_path / "tune.json", space)
    reference = result.candidates[space.baseline.key]
    assert reference.candidate.prune_ratio == 0.0 and reference.agreement == 1.0
    assert set(result.candidates) == {space.baseline.key, "prune0.5-fp32-32px"}


def test_tune_command_registers_the_choice_for_compare_and_the_dashboard(
        cifar_root, tmp_path, monkeypatch, capsys, tiny_cifar_files, photo_path):
    from leanvgg import cli
    from leanvgg.compare import Settings
    from leanvgg.service import ComparisonService
    from leanvgg.store import Store
    from leanvgg.variants import build_variants
    from leanvgg.web import create_app
    from tiny import tiny_baseline

    monkeypatch.setenv("LEANVGG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cli, "load_baseline", lambda weights, **_: tiny_baseline())
    args = ["tune", "--max-drop", "100", "--data", str(cifar_root), "--subset", "20",
            "--resolutions", "64,32", "--prune-ratios", "0,0.5", "--precisions", "fp32",
            "--neuron-ratios", "0", "--runs", "2", "--warmup", "0",
            "--output", str(tmp_path / "out" / "search.json")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "← chosen" in out and "Registered" in out and "95% CI" in out
    home = tmp_path / "home"
    assert (home / "tune.png").stat().st_size > 10_000 and (home / "tune.report.json").exists()
    assert (tmp_path / "out" / "search.json").read_text() == \
        (home / "tune.report.json").read_text().rstrip("\n") + "\n"

    variant_set = build_variants(tiny_baseline(), ["baseline", "tuned"], store=Store(home),
                                 progress=False)
    tuned = variant_set.variants["tuned"]
    config = json.loads((home / "tuned.report.json").read_text())
    chosen = config["candidate"]
    assert tuned.input_size == chosen["resolution"] and "leanvgg tune" in tuned.recipe.description
    record = _candidates(home / "tune.report.json")[config["key"]]
    assert tuned.artifact == record.artifact == config["artifact"]  # the entry measured

    service = ComparisonService(settings=Settings(runs=1, warmup=0), variant_set=variant_set,
                                store=Store(home))
    client = create_app(service, {"TESTING": True}).test_client()
    body = client.get("/api/tune").json["search"]
    assert body["chosen"] == tuned.recipe.description.split("(")[1].split(")")[0]
    assert len(body["candidates"]) == 4 and any(c["on_front"] for c in body["candidates"])
    empty = ComparisonService(settings=Settings(), variant_set=variant_set,
                              store=Store(tmp_path / "empty"))
    response = create_app(empty, {"TESTING": True}).test_client().get(
        "/api/tune")
    assert response.json["search"] is None and "leanvgg tune" in response.json["message"]

    assert cli.main(["tune", "--max-drop", "1", "--precisions", "fp64"]) == 2
    assert "Invalid precisions" in capsys.readouterr().err


def test_a_report_made_with_other_settings_is_kept_aside_not_resumed(searched, cifar_root,
                                                                     monkeypatch,
                                                                     tiny_cifar_files, caplog):
    result, report = searched
    fresh = report.parent / "settings" / "tune.report.json"
    # the search's cache comes along: measuring anew is timing and evaluating, not building
    shutil.copytree(report.parent / "cache", fresh.parent / "cache")
    fresh.write_text(report.read_text())
    calls = []
    measure = tune._measure
    monkeypatch.setattr(tune, "_measure",
                        lambda c, *a, **k: calls.append(c.key) or measure(c, *a, **k))
    again = _search(_validation(cifar_root), fresh, max_drop=50.0)  # another budget
    assert len(calls) == len(result.candidates)  # every candidate measured anew
    assert again.max_drop == 50.0
    kept = [p for p in fresh.parent.glob("*.report.json") if p != fresh]
    assert len(kept) == 1 and _candidates(kept[0]) == result.candidates
    assert "other settings" in caplog.text


def _candidates(report) -> dict:
    return tune_report.records_of(tune_report.from_document(json.loads(report.read_text())))


@pytest.mark.parametrize("document", [{"format": 2}, {"candidates": []}, {"space": 3}, []])
def test_a_report_with_wrong_fields_never_makes_the_api_fail(tmp_path, document):
    from leanvgg.compare import Settings
    from leanvgg.service import ComparisonService
    from leanvgg.store import Store
    from leanvgg.web import create_app

    store = Store(tmp_path)
    (tmp_path / "tune.report.json").write_text(json.dumps(document))
    service = ComparisonService(settings=Settings(), store=store)  # the report needs no model
    response = create_app(service, {"TESTING": True}).test_client().get("/api/tune")
    assert response.status_code == 200
    assert response.json["search"] is None and "unreadable" in response.json["message"]


@pytest.mark.slow
def test_the_tuned_variant_is_the_cache_entry_the_search_built_and_trained(
        cifar_root, tmp_path, monkeypatch, tiny_cifar_files):
    """No second build, no second fine-tune, no second compilation: the same entries."""
    import dataclasses

    from leanvgg import finetune, packages, recipes
    from leanvgg.tune_report import tuned_config
    from leanvgg.variants import build_variants, register_tuned

    validation = _validation(cifar_root)
    train = Labelled("tiny-train", lambda size: cifar10(cifar_root, train=True, size=size),
                     group_index_tensor())
    space = Space(resolutions=(32,), prune_ratios=(0.0, 0.5), precisions=("int8",))
    report = tmp_path / "tune.report.json"
    result = _search(validation, report, space, train=train, finetune_lr=1e-3)
    key = "prune0.5-int8-32px-finetuned"
    record = result.candidates[key]
    assert not hasattr(record, "reason"), record.reason
    assert record.candidate.fine_tuned
    assert {"op": "finetune"}.items() <= record.steps[1].items()
    assert record.steps[1]["data"] == "tiny-train"

    def rebuilt(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(finetune, "finetune", rebuilt)
    monkeypatch.setattr(packages, "package", rebuilt)
    for step in (recipes.Prune, recipes.QuantizeStaticInt8):
        monkeypatch.setattr(step, "apply", rebuilt)
    store = Store(tmp_path / "cache")
    baseline = tiny_baseline()
    register_tuned(baseline, tuned_config(dataclasses.replace(result, chosen=key)), store)
    tuned = build_variants(baseline, ["tuned"], store=store, progress=False).variants["tuned"]
    assert tuned.artifact == record.artifact and tuned.facts.fine_tuned is True
    assert tuned.facts.size_bytes / 2**20 == pytest.approx(record.size_mb)
    with torch.inference_mode():
        assert tuned.model(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)


def test_the_budget_warning_fires_when_the_subset_cannot_resolve_it(cifar_root, tmp_path,
                                                                     tiny_cifar_files, caplog):
    result = _search(_validation(cifar_root).subset(20), tmp_path / "tune.report.json",
                     FP32_SPACE, max_drop=1.0, budget_s=0.0)
    accuracy = json.loads((tmp_path / "tune.report.json").read_text())["reference_accuracy"]
    low, high = wilson(round(accuracy * 20), 20)
    assert len(result.warnings) == 1 and "--max-drop 1 is smaller" in result.warnings[0]
    assert f"±{100 * (high - low) / 2:.1f}-point" in result.warnings[0]
    assert "20 validation images" in caplog.text
    assert tune._budget_warnings(100 * (high - low) / 2 + 0.01, accuracy, 20) == []
    assert len(tune._budget_warnings(0.5, 0.9, 50_000)) == 0  # ImageNet's 50,000 resolve it


def test_the_tuned_variant_runs_where_tune_measured_it(tmp_path):
    """tune measures accuracy and latency on Inductor (PT2E INT8): its budget holds there, not
    for another runtime's own quantization, so ``tuned`` is pinned to Inductor whatever
    --runtime says, and says why."""
    from leanvgg.builder import Builder
    from leanvgg.recipes import tuned_recipe
    from leanvgg.runtimes import plan
    from tiny import tiny_baseline

    config = {"candidate": {"prune_ratio": 0.0, "precision": "int8", "resolution": 64},
              "max_drop": 1.0, "layers": [], "multiple_of": 1}
    recipe = tuned_recipe(config)
    assert recipe.runtime == "inductor"
    fp32 = tuned_recipe({**config, "candidate": {**config["candidate"], "precision": "fp32"}})
    assert fp32.runtime is None  # eager: PyTorch, as measured
    builder = Builder(tiny_baseline(), Store(tmp_path))
    for asked in ("auto", "openvino", "onnxruntime"):
        placement = plan(recipe, builder, asked)
        assert (placement.runtime, placement.batch_runtime, placement.how) == \
            ("inductor", "inductor", "pinned")
        assert "measured on inductor" in placement.reason and placement.asked == asked
