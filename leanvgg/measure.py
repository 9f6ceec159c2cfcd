"""Measurements of a built model: size, parameters, MACs, latency and top-k predictions."""

from __future__ import annotations

import calendar
import io
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.ao.nn.quantized import Linear as QuantizedLinear
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm



class _ByteCounter(io.RawIOBase):
    """A write-only sink that only counts, so sizing a 548 MB state dict costs no memory."""

    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.count += n
        return n


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``, measured by serializing it."""
    sink = _ByteCounter()
    torch.save(model.state_dict(), sink)
    return sink.count


def _unpacked(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_quantized:
        return tensor.dequantize()
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    if type(data) is not torch.Tensor and hasattr(data, "dequantize"):  # torchao subclasses
        return data.dequantize()
    return tensor


def _weights(module: nn.Module) -> list[torch.Tensor]:
    """Every weight-like tensor held directly by a module, quantized ones unpacked."""
    if isinstance(module, QuantizedLinear):  # keeps its weights packed, outside parameters()
        tensors = [module.weight(), module.bias()]
    else:
        tensors = list(module.parameters(recurse=False))
        # PT2E graphs hold their INT8 weights as buffers (symmetric: 0 stays 0)
        tensors += [b for b in module.buffers(recurse=False) if b.dtype == torch.int8]
    return [_unpacked(t) for t in tensors if t is not None]


def count_params(model: nn.Module) -> int:
    """All parameters, quantized weights counted unpacked (one per original float)."""
    return param_counts(model)[1]


def count_nonzero_params(model: nn.Module) -> int:
    """Non-zero parameters: pruned (zeroed) entries excluded, quantized weights counted unpacked."""
    return param_counts(model)[0]


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(non-zero, all) parameters, each quantized weight unpacked once (unpacking fc6's
    dynamic INT8 weights takes 0.25 s)."""
    nonzero = total = 0
    with torch.no_grad():
        for module in model.modules():
            for tensor in _weights(module):
                nonzero += int(torch.count_nonzero(tensor))
                total += tensor.numel()
    return nonzero, total


def count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates of one forward pass on a 1×3×size×size input.

    Counted by hooks on conv and Linear modules (which also sees torch.ao's quantized ones,
    opaque to PyTorch's FLOP counter); a traced graph has no such modules, so its aten ops
    are counted by ``FlopCounterMode`` instead (2 FLOPs per MAC), on fake tensors: shapes
    alone, nothing computed (0.07 s instead of 2.2 s for int8_static's graph on one core).
    """
    total = 0

    def conv(module, _inputs, output) -> None:
        nonlocal total
        total += output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)

    def linear(module, _inputs, output) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if hasattr(module, "in_channels") and hasattr(module, "kernel_size"):
            handles.append(module.register_forward_hook(conv))
        elif hasattr(module, "in_features") and hasattr(module, "out_features"):
            handles.append(module.register_forward_hook(linear))
    example = torch.zeros(1, 3, input_size, input_size)
    if not handles:
        with (FakeTensorMode(allow_non_fake_inputs=True) as fake,
              FlopCounterMode(display=False) as counter, torch.inference_mode()):
            model(fake.from_tensor(example))
        return counter.get_total_flops() // 2
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return total


@dataclass(frozen=True)
class Latency:
    """Statistics of timed forward passes, in milliseconds, and the passes themselves (the
    report schema's latency, ``leanvgg.schema``)."""

    median: float
    p90: float
    min: float
    p10: float = 0.0
    mean: float = 0.0
    stdev: float = 0.0
    count: int = 1
    p99: float = 0.0
    max: float = 0.0
    samples: tuple[float, ...] = ()  # in the order they were measured

    def to_dict(self) -> dict:
        """As JSON holds it (samples a list), so a record survives a round trip unchanged."""
        return {**asdict(self), "samples": list(self.samples)}

    @classmethod
    def from_dict(cls, data: dict) -> Latency:
        """The latency ``to_dict`` gave (KeyError or TypeError when a field is missing)."""
        return cls(**{f: data[f] for f in ("median", "p90", "min", "p10", "mean", "stdev",
                                           "count", "p99", "max")},
                   samples=tuple(data["samples"]))

    @classmethod
    def from_seconds(cls, samples: list[float]) -> Latency:
        raw = tuple(s * 1e3 for s in samples)
        ms = sorted(raw)
        if len(ms) == 1:
            return cls(ms[0], ms[0], ms[0], ms[0], ms[0], 0.0, 1, ms[0], ms[0], raw)
        deciles = statistics.quantiles(ms, n=10, method="inclusive")
        return cls(statistics.median(ms), deciles[-1], ms[0], deciles[0], statistics.fmean(ms),
                   statistics.stdev(ms), len(ms),
                   statistics.quantiles(ms, n=100, method="inclusive")[-1], ms[-1], raw)


@dataclass(frozen=True)
class Profile:
    """A variant's latency on this machine, measured apart from any request (see service)."""

    latency: Latency
    measured_at: float  # time.time() when the last pass ended
    threads: int

    def to_dict(self) -> dict:
        return {**self.latency.to_dict(), "threads": self.threads,
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                             time.gmtime(self.measured_at)),
                "age_s": round(time.time() - self.measured_at, 1)}

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        return cls(Latency.from_dict(data), calendar.timegm(
            time.strptime(data["measured_at"], "%Y-%m-%dT%H:%M:%SZ")), data["threads"])


@contextmanager
def using_threads(n: int | None) -> Iterator[int]:
    """PyTorch's intra-op thread count set to ``n`` (None: unchanged) for the block, restored
    after; yields the count in force."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n or previous)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def warm_up(model: nn.Module, input_size: int, threads: int) -> None:
    """One untimed call on ``threads``: the first call of any runner prepares its kernels (and
    memory), which is not a request's cost."""
    with torch.inference_mode(), using_threads(threads):
        model(torch.zeros(1, 3, input_size, input_size))


def time_models(jobs: Mapping[str, tuple[nn.Module, torch.Tensor]], *, runs: int,
                warmup: int, progress: bool = False, threads: int | None = None,
                turns: Callable[[], AbstractContextManager] | None = None,
                primed: bool = False) -> dict[str, tuple[Latency, torch.Tensor]]:
    """Time each ``(model, batch)`` job, one forward pass at a time, never two at once.

    After ``warmup`` untimed passes per model, the ``runs`` timed passes go round-robin over the
    models, so slow drifts of the machine (frequency, other load) are shared fairly rather than
    landing on whichever model happens to be timed first. Each round but the last visits them
    in its own seeded random order, so that no model always runs right after the same one: a
    model timed after an eager PyTorch one runs slower for a few milliseconds (its OpenMP
    threads still spinning, the caches full of its weights: of two copies of int8_static's
    OpenVINO model, whichever ran right after res160 took 18.8–19.1 ms and the other 16.6–16.8
    ms, 2 threads, measured), which a fixed order charged to one model every round; a pause of
    ``SETTLE_S`` before each timed pass (of a measurement of several runs) removes most of
    the rest. The last round runs in job order, and each job's returned output is produced by
    its last timed pass, so predictions and timings come from the same computation.
    ``threads``: PyTorch's thread count meanwhile (None: unchanged); other runtimes run on the
    count their runners were built for. ``turns``: a lock on the machine (``Store.measuring``)
    held for each pass (its pause, and its untimed twin when ``primed``) and let go between
    them, so that whoever waits for it (a comparison) waits one pass, not a round nor the
    whole measurement (a round of four runtimes at batch 8 is about 1.5 s on 2 cores: with a
    comparison's own 1.7 s, uploads during a first start's runtime choice took up to 3.10 s). ``primed``: each
    timed pass right after an untimed one of the same model, so that it runs as the only model
    served would, whatever ran before it (twice the passes; for benchmarks that compare models
    of very different kinds: what a pause leaves of the slowdown after an eager model, its
    weights in the caches instead, is then paid by the untimed pass).
    """
    with using_threads(threads):
        return {name: (latency, output) for name, latency, output in
                time_models_iter(jobs, runs=runs, warmup=warmup, progress=progress,
                                 turns=turns, primed=primed)}


def time_models_iter(jobs: Mapping[str, tuple[nn.Module, torch.Tensor]], *, runs: int,
                     warmup: int, progress: bool = False,
                     turns: Callable[[], AbstractContextManager] | None = None,
                     primed: bool = False) -> Iterator[tuple[str, Latency, torch.Tensor]]:
    """``time_models``, yielding each job as soon as its last timed pass ends (in job order)."""
    samples: dict[str, list[float]] = {name: [] for name in jobs}
    finished = []
    passes = len(jobs) * (warmup + runs * (1 + primed))
    with torch.inference_mode(), tqdm(total=passes, desc="measuring", unit="pass",
                                      disable=not progress) as bar:
        for model, batch in jobs.values():
            for _ in range(warmup):
                with _turn(turns):
                    model(batch)
                bar.update()
        for round_, names in enumerate(round_orders(list(jobs), runs)):
            for name in names:
                model, batch = jobs[name]
                with _turn(turns):
                    if primed:
                        model(batch)
                        bar.update()
                    elif runs > 1:  # a single pass (an upload's prediction) is not held up
                        time.sleep(SETTLE_S)
                    start = time.perf_counter()
                    output = model(batch)
                    samples[name].append(time.perf_counter() - start)
                bar.update()
                if round_ == runs - 1:
                    job = name, Latency.from_seconds(samples[name]), output
                    if turns is None:  # each job as soon as it is done (a streamed row)
                        yield job
                    else:
                        finished.append(job)
    yield from finished  # after the last turn: the caller never holds it


def round_orders(names: Sequence[str], runs: int) -> list[list[str]]:
    """The order of each round of timed passes over ``names``: each round but the last in its
    own seeded random order, so that no model always runs right after the same one (see
    ``time_models``), the last in the order given."""
    shuffle = random.Random(0)
    return ([shuffle.sample(list(names), len(names)) for _ in range(runs - 1)]
            + [list(names)] * (runs > 0))


# The pause before each timed pass of a measurement: what the previous model left running
# (PyTorch's OpenMP threads spin for a while after a parallel region) stops before the next is
# timed (after res160, int8_static on OpenVINO took 18.7 ms with no pause and 17.3 ms after
# 10 ms, against 16.5-16.7 ms after another OpenVINO model; measured, 2 threads).
SETTLE_S = 0.01
# After a turn, the time a waiter woken by its release has to take the lock before the next
# turn asks for it again (flock hands it to whoever asks first, not to who waited longest).
HANDOVER_S = 0.005


@contextmanager
def _turn(turns: Callable[[], AbstractContextManager] | None) -> Iterator[None]:
    with (turns or nullcontext)():
        yield
    if turns is not None:
        time.sleep(HANDOVER_S)


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    prob: float


def top_k(logits: torch.Tensor, categories: Sequence[str], k: int = 3) -> list[Prediction]:
    """The k most probable classes (all, if fewer) of the first row of ``logits``."""
    probs = torch.softmax(logits[0].float(), dim=0)
    values, indices = torch.topk(probs, min(k, probs.numel()))
    return [Prediction(categories[i], i, float(p)) for p, i in zip(values, indices.tolist())]
