import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddp_worker


@pytest.mark.slow
def test_two_ranks_match_one_process_over_the_same_global_batches(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(Path(ddp_worker.__file__)), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single, single_stats = ddp_worker.run()

    assert ranks[0]["stats"]["world_size"] == 2 and single_stats["world_size"] == 1
    assert ranks[0]["stats"]["images"] == single_stats["images"] == 40
    reference = single.state_dict()
    for name, tensor in reference.items():
        torch.testing.assert_close(ranks[0]["state_dict"][name], ranks[1]["state_dict"][name],
                                   rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["state_dict"][name], tensor, rtol=1e-4, atol=1e-6)
    # and training really moved the weights
    untrained = ddp_worker.tiny_vgg(dropout=False).state_dict()
    assert not torch.allclose(untrained["features.0.weight"], reference["features.0.weight"])


WORKER = Path(__file__).parent / "scale_worker.py"


def _run(args, *, ranks):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(ranks)] if ranks > 1 else [sys.executable])
    result = subprocess.run([*launcher, str(WORKER), *map(str, args)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_evaluate_under_torchrun_counts_exactly_what_one_process_counts(tmp_path):
    """7 images over 2 ranks (4 + 3): no image dropped, none counted twice."""
    from test_evaluate import write_colour_folder

    write_colour_folder(tmp_path)
    runs = {}
    for ranks in (2, 1):
        out = tmp_path / f"ranks{ranks}"
        out.mkdir()
        _run(["evaluate", out, tmp_path / "set", tmp_path / "mapping.json"], ranks=ranks)
        runs[ranks] = (json.loads((out / "voters.json").read_text()),
                       json.loads((out / "home" / "evaluation.report.json").read_text()))
    voters, report = runs[2]
    assert voters == runs[1][0] and report == runs[1][1]
    # and the hand count (tests/test_evaluate.py): 6 of 7 right, the swapped voter 3 of 7
    assert voters["baseline"]["top1"] == 6 / 7 and voters["baseline"]["images"] == 7
    assert voters["quantized"]["agreement"] == 3 / 7
    assert {row["variant"] for row in report.values()} == {"baseline", "quantized", "res160"}
    assert all(row["runtime"] == "pytorch" for row in report.values())
    assert all(row["images"] == 7 for row in report.values())


@pytest.mark.slow
def test_tune_under_torchrun_picks_what_one_process_picks(tmp_path):
    from tiny import write_cifar

    cifar = write_cifar(tmp_path / "cifar", per_class=3)
    results, timed = {}, {}
    for ranks in (2, 1):
        out = tmp_path / f"ranks{ranks}"
        out.mkdir()
        _run(["tune", out, cifar], ranks=ranks)
        results[ranks] = json.loads((out / "tune.json").read_text())
        timed[ranks] = [json.loads((out / f"timed{r}.json").read_text()) for r in range(ranks)]
    assert results[2] == results[1]  # same accuracies (29 images each), front and choice
    assert results[2]["chosen"] is not None
    assert all(images == 29 for _, images, _ in results[2]["accuracy"].values()
               if images is not None)
    # latency is measured by rank 0 alone, once per measured candidate
    assert timed[2][1] == [] and len(timed[2][0]) == len(timed[1][0]) > 0
    # only rank 0 wrote the report
    assert not (tmp_path / "ranks2" / "tune1.report.json").exists()
