import io

import pytest
import torch
from torch import nn
from torchvision.models import vgg11

from leanvgg.measure import (Latency, count_macs, count_nonzero_params, count_params,
                             state_dict_bytes, time_models, top_k)


def conv_and_linear_macs(model: nn.Module, size: int) -> int:
    """VGG MACs from layer shapes: 3×3 same-padding convs, 2×2 pools, a 7×7 pooled classifier."""
    total, side = 0, size
    for module in model.features:
        if isinstance(module, nn.Conv2d):
            total += side * side * module.in_channels * module.out_channels * 9
        elif isinstance(module, nn.MaxPool2d):
            side //= 2
    return total + sum(m.in_features * m.out_features for m in model.classifier
                       if isinstance(m, nn.Linear))


def test_macs_match_the_layer_shapes(baseline):
    macs = count_macs(baseline.model, 224)
    assert macs == conv_and_linear_macs(baseline.model, 224)
    assert macs == pytest.approx(19.6e9, rel=0.01)  # torchvision's documented 19.63 GFLOPS


def test_a_traced_int8_graph_counts_its_float_models_macs():
    """A PT2E graph has no conv modules to hook: its aten ops are counted (on fake tensors),
    the same count as its float model's hooks, and the graph's constants stay as they were."""
    from leanvgg.quantize import static_int8_skeleton

    model = vgg11(num_classes=10).eval()
    graph = static_int8_skeleton(model, 64)
    before = [b.clone() for b in graph.buffers()]
    assert count_macs(graph, 64) == conv_and_linear_macs(model, 64)
    assert all(torch.equal(a, b) for a, b in zip(before, graph.buffers()))
    with torch.inference_mode():  # and it still runs on real tensors
        assert graph(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_dynamic_int8_weights_are_counted_unpacked_once_each(monkeypatch):
    layers = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        for parameter in layers.parameters():
            parameter.fill_(0.5)
        layers[0].weight[0] = 0  # a pruned row: counted, but not as non-zero
    quantized = torch.ao.quantization.quantize_dynamic(layers, {nn.Linear}, dtype=torch.qint8)
    from leanvgg import measure

    unpacked = []
    real = measure._unpacked
    monkeypatch.setattr(measure, "_unpacked", lambda t: unpacked.append(1) or real(t))
    total = 16 * 8 + 8 + 8 * 4 + 4
    assert measure.param_counts(quantized) == (total - 16, total)
    assert len(unpacked) == 4  # two weights, two biases


def test_160px_macs_scale_with_pixels(variant_set):
    base = variant_set.variants["baseline"].facts.macs
    small = variant_set.variants["res160"].facts.macs
    assert small / base == pytest.approx((160 / 224) ** 2, rel=0.01)


def test_state_dict_bytes_is_the_serialized_size():
    model = vgg11(init_weights=False)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert state_dict_bytes(model) == len(buffer.getvalue())


def test_nonzero_count_excludes_zeroed_filters():
    model = nn.Conv2d(4, 8, 3)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(1.0)
        model.weight[:3] = 0
    assert count_params(model) == 8 * 4 * 9 + 8
    assert count_nonzero_params(model) == 5 * 4 * 9 + 8


def test_latency_statistics():
    stats = Latency.from_seconds([0.010 * i for i in range(1, 11)])
    assert stats.median == pytest.approx(55.0)
    assert stats.min == pytest.approx(10.0)
    assert stats.p90 == pytest.approx(91.0)
    assert stats.p10 == pytest.approx(19.0) and stats.mean == pytest.approx(55.0)
    assert stats.stdev == pytest.approx(30.2765, rel=1e-4) and stats.count == 10  # sample stdev
    # inclusive percentiles: p99 sits 0.91 of the way from the 9th (90) to the 10th (100)
    assert stats.p99 == pytest.approx(99.1) and stats.max == pytest.approx(100.0)
    shuffled = Latency.from_seconds([0.003, 0.001, 0.002])
    assert shuffled.samples == pytest.approx((3.0, 1.0, 2.0))  # in the order measured
    assert Latency.from_seconds([0.005]) == Latency(5.0, 5.0, 5.0, 5.0, 5.0, 0.0, 1, 5.0, 5.0,
                                                          (5.0,))


def recording(names, calls: list, batch=lambda name: torch.zeros(1, 3)) -> dict:
    """Jobs of identity models, each appending its name to ``calls`` when it runs."""
    jobs = {}
    for name in names:
        model = nn.Identity()
        model.register_forward_hook(lambda *_, name=name: calls.append(name))
        jobs[name] = (model, batch(name))
    return jobs


def test_time_models_warms_up_then_alternates_timed_runs():
    calls = []
    jobs = recording("ab", calls, lambda name: torch.full((1, 3), float(ord(name))))
    results = time_models(jobs, runs=3, warmup=2)
    assert calls[:4] == ["a", "a", "b", "b"]
    assert [sorted(calls[i:i + 2]) for i in (4, 6, 8)] == [["a", "b"]] * 3  # one pass each
    assert calls[8:] == ["a", "b"]  # the last round in job order
    for name, (stats, output) in results.items():
        assert torch.equal(output, jobs[name][1])
        assert 0 < stats.min <= stats.median <= stats.p90


def test_no_model_is_always_timed_right_after_the_same_one():
    """A model timed right after an eager one runs a few ms slower (measured): each round but
    the last goes in its own seeded order, so every model follows every other one."""
    calls = []
    jobs = recording("abcd", calls)
    time_models(jobs, runs=30, warmup=0)
    rounds = [calls[i:i + 4] for i in range(0, len(calls), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds) and rounds[-1] == list("abcd")
    after = {(first, second) for first, second in zip(calls, calls[1:])}
    assert after >= {(x, y) for x in "abcd" for y in "abcd" if x != y}
    calls.clear()
    time_models(jobs, runs=30, warmup=0)
    assert [calls[i:i + 4] for i in range(0, len(calls), 4)] == rounds  # seeded: repeatable


def test_primed_passes_are_timed_right_after_one_of_their_own():
    calls = []
    jobs = recording("ab", calls)
    results = time_models(jobs, runs=5, warmup=1, primed=True)
    passes = calls[2:]
    assert len(passes) == 20 and all(passes[i] == passes[i + 1] for i in range(0, 20, 2))
    assert {name: stats.count for name, (stats, _) in results.items()} == {"a": 5, "b": 5}


def test_time_models_takes_turns_on_the_machine_lock_pass_by_pass(tmp_path):
    """With ``turns``, the lock is held for each pass, never across two; whoever waits for it
    (another process's comparison) gets it within a pass."""
    import contextlib
    import threading
    import time

    from leanvgg.store import Store

    calls = []

    @contextlib.contextmanager
    def turn():
        calls.append("take")
        yield
        calls.append("give")

    time_models(recording("ab", calls), runs=3, warmup=2, turns=turn)
    turns = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(calls) == 3 * (2 * 2 + 3 * 2)  # every pass in its own turn
    assert all(t[0] == "take" and t[1] in "ab" and t[2] == "give" for t in turns)
    assert [t[1] for t in turns[:4]] == ["a", "a", "b", "b"]  # the warm-up
    assert all(sorted(t[1] for t in turns[i:i + 2]) == ["a", "b"] for i in (4, 6, 8))

    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return x

    store, waited, done = Store(tmp_path), [], threading.Event()

    def other_process():  # its own lock file description, as another process has
        time.sleep(0.3)
        asked = time.monotonic()
        with store.measuring():
            waited.append((time.monotonic() - asked, done.is_set()))

    waiter = threading.Thread(target=other_process)
    waiter.start()
    time_models({name: (Slow(), torch.zeros(1)) for name in "abcd"}, runs=10,
                warmup=1, turns=store.measuring)  # 2.2 s in all
    done.set()
    waiter.join()
    (seconds, after_the_end), = waited
    assert not after_the_end and seconds < 0.15  # a pass is 0.05 s, a round 0.2 s


def test_top_k_orders_by_probability():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    top = top_k(logits, ["a", "b", "c", "d"], 3)
    assert [(p.label, p.index) for p in top] == [("b", 1), ("d", 3), ("c", 2)]
    assert sum(p.prob for p in top) == pytest.approx(
        float(torch.softmax(logits[0], 0)[[1, 3, 2]].sum()))
