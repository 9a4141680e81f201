"""Run under torchrun by tests/lesson/test_train.py (gloo) and test_cuda_train.py (nccl, third argument "cuda"):
a few DDP steps, then each rank saves its parameters."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pyfastnn.lesson.train import TrainConfig, train


def main(out: Path, data: str, device: str = "cpu") -> None:
    result = train(TrainConfig(data=data, epochs=1, batch_size=32, max_steps=3, dropout=0.0, out=None,
                               progress=False, plots=False, device=device))
    torch.save(result.model.state_dict(), out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
