"""Run by tests/test_distributed.py under torchrun: fine-tune the tiny VGG, save this rank's weights."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from leanvgg.data import group_index_tensor
from leanvgg.finetune import finetune

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_vgg  # noqa: E402


def synthetic_dataset() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(40, 3, 32, 32, generator=generator)
    return torch.utils.data.TensorDataset(images, torch.arange(40) % 10)


def run() -> tuple[torch.nn.Module, dict]:
    trained, stats = finetune(tiny_vgg(dropout=False), synthetic_dataset(), group_index_tensor(),
                              epochs=2, lr=1e-3, batch_size=8, progress=False)
    return trained, stats.to_dict()


if __name__ == "__main__":
    model, stats = run()
    rank = dist.get_rank()
    torch.save({"state_dict": model.state_dict(), "stats": stats},
               Path(sys.argv[1]) / f"rank{rank}.pt")
    dist.destroy_process_group()
