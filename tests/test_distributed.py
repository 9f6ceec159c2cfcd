import subprocess
import sys
from pathlib import Path

import torch

import ddp_worker


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
