"""Run by tests/test_distributed.py, under torchrun or alone, with the same arguments.

evaluate OUT FOLDER MAPPING: the library's ``evaluate`` on the colour voters (hand counts known)
  and ``leanvgg evaluate`` on the tiny VGG; rank 0 writes both reports under OUT.
tune OUT CIFAR: ``search`` on the tiny VGG over 29 images (odd: the shards are uneven) with a
  latency measured from MACs (deterministic), recording which ranks measured latency.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torchvision.datasets.cifar as tv_cifar  # noqa: E402

from leanvgg import cli  # noqa: E402
from leanvgg.context import RunContext  # noqa: E402
from leanvgg.data import cifar10, group_index_tensor  # noqa: E402
from leanvgg.distributed import distributed_context  # noqa: E402
from leanvgg.evaluate import Labelled, evaluate, image_folder  # noqa: E402
from leanvgg.measure import Latency  # noqa: E402
from leanvgg.recipes import RECIPES  # noqa: E402
from leanvgg.store import Store  # noqa: E402
from leanvgg.tune import Space, search  # noqa: E402
from leanvgg.variants import Variant, VariantSet  # noqa: E402
from leanvgg.facts import ArtifactFacts  # noqa: E402
from test_evaluate import ChannelVoter  # noqa: E402
from tiny import tiny_baseline  # noqa: E402

NO_FACTS = ArtifactFacts(size_bytes=0, params=0, params_total=0, macs=0)


def run_evaluate(out: Path, folder: str, mapping: str) -> None:
    labelled = image_folder(folder, json.loads(Path(mapping).read_text()))
    voters = {"baseline": Variant(RECIPES["baseline"], ChannelVoter(), NO_FACTS, "a", RunContext(threads=1)),
              "quantized": Variant(RECIPES["quantized"], ChannelVoter((0, 2, 1)), NO_FACTS, "b", RunContext(threads=1))}
    results = evaluate(VariantSet(tiny_baseline(), voters), labelled, batch_size=2,
                       progress=False)
    rank, _ = distributed_context()
    if rank == 0:
        (out / "voters.json").write_text(json.dumps(
            {name: accuracy.to_dict() for name, accuracy in results.items()}))
    os.environ["LEANVGG_HOME"] = str(out / "home")
    cli.load_baseline = lambda weights, **_: tiny_baseline()
    code = cli.main(["evaluate", "--dataset", "folder", "--data", folder, "--mapping", mapping,
                     "--variants", "quantized,res160", "--batch-size", "2"])
    assert code == 0


def run_tune(out: Path, cifar: str) -> None:
    tv_cifar.check_integrity = lambda path, md5=None: True
    rank, _ = distributed_context()
    timed = []

    def latency(variant, sample, runs, warmup):
        timed.append(variant.name)
        ms = variant.facts.macs / 1e6
        return Latency(median=ms, p90=1.01 * ms, min=ms, p10=0.99 * ms, count=runs)

    validation = Labelled("tiny-cifar", lambda size: cifar10(cifar, train=False, size=size),
                          group_index_tensor()).subset(29)
    space = Space(resolutions=(64, 32), prune_ratios=(0.0, 0.5), precisions=("fp32",),
                  neuron_ratios=(0.0, 0.5))
    result = search(tiny_baseline(), validation, max_drop=15.0, space=space,
                    layers=(28, 30, 32, 34), multiple_of=1, runs=2, warmup=0,
                    store=Store(out / "cache"), report=out / f"tune{rank}.report.json",
                    progress=False, latency=latency)
    (out / f"timed{rank}.json").write_text(json.dumps(timed))
    if rank == 0:
        (out / "tune.json").write_text(json.dumps(
            {"chosen": result.chosen, "front": result.front,
             "accuracy": {k: [getattr(r, "accuracy", None), getattr(r, "images", None),
                              getattr(r, "agreement", None)]
                          for k, r in result.candidates.items()},
             "sensitivity": result.sensitivity}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    {"evaluate": run_evaluate, "tune": run_tune}[mode](out, *sys.argv[3:])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
