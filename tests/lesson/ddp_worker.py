"""Run under torchrun by tests/lesson/test_train.py (gloo) and test_cuda_train.py (nccl): a few DDP
steps, then each rank saves what the test compares.

    ddp_worker.py OUT DATA [DEVICE] [SCENARIO]
    ddp_worker.py OUT DATA cpu caller_group RANK      # started twice, without torchrun

SCENARIO "sync" (the default): one short run without dropout; each rank saves its parameters and its
metrics' history. "dropout_resume": with dropout, two epochs in one go, and one epoch then a resume
for the second; each rank saves both results' parameters and its generator state. "caller_group":
"sync" in a two-process gloo group the worker sets up itself (a file rendezvous in OUT), as a caller
of train() under torch.multiprocessing.spawn does; each rank saves what "sync" saves, and the run's
process count."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pyfastnn.lesson.train import TrainConfig, train


def main(out: Path, data: str, device: str = "cpu", scenario: str = "sync", rank: str = "") -> None:
    if scenario == "caller_group":
        dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=int(rank), world_size=2)
    if scenario in ("sync", "caller_group"):
        result = train(TrainConfig(data=data, epochs=1, batch_size=32, max_steps=3, dropout=0.0, out=None,
                                   progress=False, plots=False, device=device))
        rank = dist.get_rank()
        torch.save(result.model.state_dict(), out / f"rank{rank}.pt")
        torch.save(result.metrics["history"], out / f"history{rank}.pt")
        torch.save(result.metrics["world_size"], out / f"world_size{rank}.pt")
    elif scenario == "dropout_resume":
        common = dict(data=data, batch_size=32, max_steps=2, dropout=0.2, progress=False, plots=False, device=device)
        whole = train(TrainConfig(epochs=2, out=str(out / "whole"), **common))
        rng_after_whole = torch.get_rng_state()
        dist.barrier()
        train(TrainConfig(epochs=1, out=str(out / "part"), **common))
        dist.barrier()  # rank 0 has written the checkpoint every rank resumes from
        resumed = train(TrainConfig(epochs=2, out=str(out / "part"), resume=str(out / "part" / "checkpoint.pt"),
                                    **common))
        rank = dist.get_rank()
        torch.save({"whole": whole.model.state_dict(), "resumed": resumed.model.state_dict(),
                    "rng_state": rng_after_whole}, out / f"dropout_resume{rank}.pt")
    else:
        raise SystemExit(f"ddp_worker.py: unknown scenario {scenario!r}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
