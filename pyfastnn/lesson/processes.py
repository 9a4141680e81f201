"""The processes of one training run: how many train it together (torchrun's WORLD_SIZE, or a
process group its caller set up), how each joins the others without hanging where Ctrl-C cannot
reach it, the device and the seed of each, their epoch's tallies summed, and the one line said when
another process of the run stops.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import time
from typing import Callable, Optional, Tuple

import torch

from ..command import InvalidArgument


def launched_processes() -> int:
    """How many processes train this run together: the size of the process group this process has
    joined already (one its caller set up, say under ``torch.multiprocessing.spawn``), else the
    WORLD_SIZE torchrun sets, 1 outside both; a WORLD_SIZE that is no count is refused by name, not
    run as a single process."""
    import torch.distributed as dist  # imported by torch itself: costs nothing here

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"the environment variable WORLD_SIZE (set by torchrun) must be a count of processes "
                         f">= 1, got {value!r}")
    return int(value)


def torchrun_local_rank() -> Optional[int]:
    """This process's index among those torchrun started on its node (LOCAL_RANK); None without it
    (one process, or a process group its caller set up)."""
    value = os.environ.get("LOCAL_RANK")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise ValueError(f"the environment variable LOCAL_RANK (set by torchrun) must be an index >= 0, got {value!r}")
    return int(value)


def _process_device(device: str, backend: str) -> str:
    """The device this process of a multi-process run trains on, made current where it is a GPU:
    under torchrun cuda:$LOCAL_RANK; in a process group its caller set up, the GPU ``device`` names,
    else the current one (such callers set it per process). A group whose backend cannot reach the
    device is refused by name (nccl reduces CUDA tensors only)."""
    if not device.startswith("cuda"):
        if backend == "nccl":
            raise InvalidArgument("device", f"{device!r}: the run's process group uses nccl, which reduces CUDA "
                                            f"tensors only (train on cuda, or set up a gloo group)")
        return device
    local_rank = torchrun_local_rank()
    index = local_rank if local_rank is not None else torch.device(device).index
    device = f"cuda:{torch.cuda.current_device() if index is None else index}"
    torch.cuda.set_device(device)
    return device


#: Seconds the processes of a run may take to meet before a line says what each one waits for.
RENDEZVOUS_NOTICE_S = 10.0


def join_run(device: str) -> Tuple[int, int, str]:
    """This process's rank, the number of processes of its run and the device it trains on; where
    there are several (torchrun), joined to their process group first (gloo on the CPU, nccl on
    CUDA), unless its caller joined it already."""
    world_size = launched_processes()
    if world_size <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if not dist.is_initialized():
        join_process_group("nccl" if device.startswith("cuda") else "gloo", world_size)
    return dist.get_rank(), dist.get_world_size(), _process_device(device, dist.get_backend())


@dataclasses.dataclass
class _Join:
    """One join of the run's processes: its backend, set ``done`` when it ended, and its failure."""

    backend: str
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    failure: Optional[BaseException] = None


# The last join; one interrupted by Ctrl-C goes on in the background.
_last_join: Optional[_Join] = None
_join_lock = threading.Lock()


def join_process_group(backend: str, world_size: int,
                       init_process_group: Optional[Callable[..., None]] = None) -> None:
    """Joins this process to its run: ``init_process_group(backend=backend)`` (torch.distributed's
    by default), waited for from a helper thread. torch waits up to 30 minutes in native code for the
    run's other processes, where Ctrl-C and SIGTERM cannot stop it (a WORLD_SIZE left in the shell, a
    process stuck at startup); the calling thread stays in Python and can. After
    RENDEZVOUS_NOTICE_S seconds one line says what it waits for. A join interrupted so goes on in
    the background (torch cannot cancel it): a later call in the same interpreter waits for that one
    rather than joining a second time as the same rank. With nccl the device is set after the join,
    on the calling thread (the helper thread's current device is its own)."""
    global _last_join
    import torch.distributed as dist

    init = init_process_group or dist.init_process_group
    with _join_lock:  # one join at a time: two would join as the same rank
        join = _last_join
        if join is not None and not join.done.is_set():  # interrupted earlier, still under way
            if join.backend != backend:
                raise RuntimeError(f"an interrupted {join.backend} join of this run's processes is still under way; "
                                   f"a {backend} one cannot start beside it (restart the interpreter)")
        elif join is not None and join.failure is None and dist.is_initialized():
            return  # that join ended meanwhile: the process group is there
        else:
            join = _last_join = _Join(backend)

            def run(join: _Join = join) -> None:
                try:
                    init(backend=backend)
                except BaseException as error:  # noqa: BLE001 - raised again on the waiting thread
                    join.failure = error
                finally:
                    join.done.set()

            threading.Thread(target=run, name="pyfastnn-rendezvous", daemon=True).start()
    # An event, not Thread.join: a join interrupted by Ctrl-C may mark a running thread as stopped.
    notice_at = time.monotonic() + RENDEZVOUS_NOTICE_S
    # Short waits: Python runs its signal handlers between them, whichever thread got the signal.
    while not join.done.wait(0.1):
        if notice_at is not None and time.monotonic() >= notice_at:
            notice_at = None
            where = f"{os.environ.get('MASTER_ADDR', 'localhost')}:{os.environ.get('MASTER_PORT', '?')}"
            print(f"rank {os.environ.get('RANK', '?')} waits for the other processes of the run at {where} "
                  f"(WORLD_SIZE={world_size} in the environment, as torchrun sets it); Ctrl-C stops",
                  file=sys.stderr, flush=True)
    if join.failure is not None:
        raise join.failure


# What gloo and NCCL say when another process of the run has gone (killed, crashed, stopped).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited")


def another_process_stopped(error: RuntimeError, rank: int) -> Optional[ConnectionError]:
    """A one-line ConnectionError for a collective that failed because another process of the run
    stopped (gloo's message starts with its source file and goes on for lines), else None."""
    text = str(error)
    if not any(marker in text for marker in _PEER_GONE):
        return None
    reason = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0]).split(". ")[0]
    return ConnectionError(f"another process of the run stopped, so rank {rank} stops too ({reason})")


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s random numbers (dropout masks) after the weights are made:
    distinct per rank of a run (the ranks' seeds spread over 64 bits by golden-ratio steps)."""
    return (seed + rank * 0x9E3779B97F4A7C15) % 2 ** 64


def global_tally(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, world_size: int) -> Tuple[float, int, int]:
    """(summed loss, correct predictions, samples) of the epoch over all processes: each rank
    tallied only its own shard."""
    if world_size == 1:
        return loss_sum.item(), correct.item(), seen
    import torch.distributed as dist

    tally = torch.stack([loss_sum.to(torch.float64), correct.to(torch.float64),
                         torch.tensor(float(seen), dtype=torch.float64, device=loss_sum.device)])
    dist.all_reduce(tally)  # on the training device: nccl reduces only GPU tensors
    loss, right, samples = tally.tolist()
    return loss, int(right), int(samples)
