"""Training the lesson's MNIST classifier: ``pyfastnn train mnist --data DIR ...``.

One process by default; under ``torchrun --nproc-per-node N`` the same command trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA), each rank on its shard of every batch order,
and rank 0 alone writes files.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cuda_graph import CUDAGraphStep, cuda_graph_step
from .data import Batches, load_fashion_mnist, load_mnist, normalize
from .info import info
from .models import MNISTClassifier

LOADERS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}


@dataclasses.dataclass
class TrainConfig:
    dataset: str = "mnist"
    data: Optional[str] = None
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    dropout: float = 0.2
    backend: str = "fused"  # "fused" (pyfastnn layers) or "torch" (the plain nn.Linear twin)
    device: str = "cpu"
    seed: int = 0
    out: Optional[str] = "runs/mnist"
    resume: Optional[str] = None
    max_steps: Optional[int] = None  # stop each epoch after this many steps (quick runs, tests)
    progress: bool = True
    plots: bool = True
    download: bool = False
    cuda_graph: Optional[bool] = None  # the whole step as one CUDA graph; None: on CUDA in one process


@dataclasses.dataclass
class TrainResult:
    model: nn.Module  # the trained model (unwrapped from DDP)
    metrics: Dict


def build_model(config: TrainConfig) -> nn.Module:
    """The lesson's classifier; the torch backend gets the plain twin with the very same weights."""
    model = MNISTClassifier(dropout=config.dropout)
    if config.backend == "torch":
        model = model.to_torch()
    elif config.backend != "fused":
        raise ValueError(f"backend must be 'fused' or 'torch', got {config.backend!r}")
    return model


def make_adam(params, lr: float, capturable: bool = False) -> torch.optim.Optimizer:
    """The lesson's Adam, with torch's fused (single-kernel) implementation where this torch has it;
    ``capturable=True`` keeps its step count on the GPU, so that a CUDA graph can replay the step."""
    params = list(params)
    options = {"capturable": True} if capturable else {}
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, **options)


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict) -> None:
    """Loads a checkpoint's optimizer state but keeps this optimizer's implementation flags (a
    checkpoint written on a GPU with ``capturable=True`` resumes on the CPU and the other way round)."""
    flags = [{key: group[key] for key in ("fused", "foreach", "capturable") if key in group}
             for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)
        on_param_device = group.get("fused") or group.get("capturable")
        for parameter in group["params"]:
            step = optimizer.state.get(parameter, {}).get("step")
            if isinstance(step, torch.Tensor):  # fused and capturable Adam count steps where the parameter is
                optimizer.state[parameter]["step"] = step.to(parameter.device if on_param_device else "cpu",
                                                             torch.float32)


def _check_device(device: str) -> str:
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu or cuda (or cuda:N)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this torch sees no CUDA GPU "
                             f"(torch.cuda.is_available() is False)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def _distributed(device: str):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return rank, dist.get_world_size(), device


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: Optional[int] = 1000):
    """(mean cross-entropy, accuracy, predictions) over the whole set, in eval mode; in chunks of
    ``batch_size`` rows, or in one forward with ``batch_size=None`` (on a GPU, one launch per layer)."""
    was_training = model.training
    model.eval()
    total_loss, predictions = 0.0, []
    batch_size = batch_size or max(1, inputs.shape[0])
    for start in range(0, inputs.shape[0], batch_size):
        logits = model(inputs[start:start + batch_size])
        total_loss += F.cross_entropy(logits, targets[start:start + batch_size], reduction="sum").item()
        predictions.append(logits.argmax(1))
    model.train(was_training)
    predicted = torch.cat(predictions) if predictions else targets.new_empty(0)
    n = max(1, inputs.shape[0])
    return total_loss / n, (predicted == targets).float().mean().item() if inputs.shape[0] else 0.0, predicted


def train(config: TrainConfig) -> TrainResult:
    """Trains per ``config``; writes checkpoint, metrics.json and plots to ``config.out`` (rank 0)."""
    if config.dataset not in LOADERS:
        raise ValueError(f"dataset must be one of {sorted(LOADERS)}, got {config.dataset!r}")
    if config.data is None:
        raise ValueError("no data folder given (--data DIR)")
    rank, world_size, device = _distributed(_check_device(config.device))
    on_cuda = device.startswith("cuda")
    if on_cuda and config.backend == "fused" and not info()["backends"]["cuda"]:
        raise ValueError("this pyfastnn build has no CUDA kernels (see `pyfastnn info`); rebuild it with "
                         "PYFASTNN_CUDA=1, or train the plain twin with --backend torch")
    graphed = _use_cuda_graph(config.cuda_graph, on_cuda, world_size)
    torch.manual_seed(config.seed)
    load = LOADERS[config.dataset]
    optimizer_import = _import_in_background("torch._dynamo")
    try:
        train_images, train_labels = load(config.data, train=True, download=config.download)
        test_images, test_labels = load(config.data, train=False, download=config.download)
        # Moved to the device once; every batch is then gathered there.
        x_train, x_test = normalize(train_images).to(device), normalize(test_images).to(device)
        y_train, y_test = train_labels.to(device), test_labels.to(device)
        model = build_model(config).to(device)
    finally:
        optimizer_import.join()
    optimizer = make_adam(model.parameters(), config.lr, capturable=graphed)
    history: List[Dict] = []
    start_epoch = 0
    if config.resume:
        state = torch.load(config.resume, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        _load_optimizer_state(optimizer, state["optimizer"])
        history, start_epoch = state["history"], state["epoch"]
        torch.set_rng_state(state["rng_state"].cpu())  # dropout masks continue exactly where they stopped
        if on_cuda and state.get("cuda_rng_state") is not None:
            torch.cuda.set_rng_state(state["cuda_rng_state"].cpu())
    trained = model
    if world_size > 1:
        trained = nn.parallel.DistributedDataParallel(model)

    batches = Batches(x_train, y_train, config.batch_size, shuffle=True, seed=config.seed,
                      rank=rank, world_size=world_size)
    out = Path(config.out) if config.out and rank == 0 else None
    # The epoch's running sums stay on the device (no sync per step); a CUDA graph captures their
    # in-place updates, so they are zeroed in place each epoch, never replaced.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)

    def loss_and_tally(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, y)
        with torch.no_grad():
            loss_sum.add_(loss * y.shape[0])
            correct.add_((logits.argmax(1) == y).sum())
        return loss

    graph_steps: Dict[int, CUDAGraphStep] = {}  # one graph per batch size (the last batch is smaller)
    predicted = None
    for epoch in range(start_epoch, config.epochs):
        batches.set_epoch(epoch)
        trained.train()
        steps = len(batches) if config.max_steps is None else min(len(batches), config.max_steps)
        progress = _progress(steps, f"epoch {epoch + 1}/{config.epochs}", config.progress and rank == 0)
        loss_sum.zero_()
        correct.zero_()
        seen, started = 0, time.perf_counter()
        for step, index in enumerate(batches.batch_indices()):
            if step >= steps:
                break
            if graphed:
                graph_step = graph_steps.get(len(index))
                if graph_step is None:  # its example batch is this batch; later ones are gathered into it
                    graph_step = graph_steps[len(index)] = cuda_graph_step(
                        trained, loss_and_tally, optimizer, (x_train[index], y_train[index]),
                        warmup_steps=1 if graph_steps else 3)  # the first graph's warm-up made the lazy state
                else:
                    torch.index_select(x_train, 0, index, out=graph_step.inputs[0])
                    torch.index_select(y_train, 0, index, out=graph_step.inputs[1])
                graph_step.replay()
            else:
                x, y = x_train.index_select(0, index), y_train.index_select(0, index)
                optimizer.zero_grad(set_to_none=True)
                loss_and_tally(trained(x), y).backward()
                optimizer.step()
            seen += len(index)
            if progress is not None:
                progress.update(1)
                if step % 50 == 0 or step == steps - 1:
                    rate = seen * world_size / (time.perf_counter() - started)
                    progress.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                                         acc=f"{correct.item() / seen:.4f}", samples_s=f"{rate:,.0f}")
        if progress is not None:
            progress.close()
        train_loss, train_correct = loss_sum.item(), correct.item()  # waits for the epoch's last step
        seconds = time.perf_counter() - started
        test_loss, test_accuracy, predicted = evaluate(model, x_test, y_test, batch_size=None if on_cuda else 1000)
        history.append({
            "epoch": epoch + 1, "steps": steps, "train_loss": train_loss / max(seen, 1),
            "train_accuracy": train_correct / max(seen, 1), "test_loss": test_loss,
            "test_accuracy": test_accuracy, "seconds": seconds,
            "samples_per_s": seen * world_size / max(seconds, 1e-9),
        })
        if rank == 0 and config.progress:
            h = history[-1]
            print(f"epoch {h['epoch']}: train loss {h['train_loss']:.4f} acc {h['train_accuracy']:.4f} | "
                  f"test loss {h['test_loss']:.4f} acc {h['test_accuracy']:.4f} | {seconds:.1f} s")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "history": history, "epoch": epoch + 1, "config": dataclasses.asdict(config),
                        "rng_state": torch.get_rng_state(),
                        "cuda_rng_state": torch.cuda.get_rng_state() if on_cuda else None},
                       out / "checkpoint.pt")

    metrics = {
        "dataset": config.dataset, "backend": config.backend, "device": device, "world_size": world_size,
        "cuda_graph": graphed, "config": dataclasses.asdict(config), "history": history,
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
        "train_seconds": sum(h["seconds"] for h in history),
    }
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if config.plots and history:
            from .plots import plot_predictions, plot_training_curves

            plot_training_curves(history, out / "curves.png")
            if predicted is None:  # resumed from a finished run: nothing trained, nothing evaluated yet
                _, _, predicted = evaluate(model, x_test, y_test, batch_size=None if on_cuda else 1000)
            # The first 24 test images, then up to 8 the model gets wrong (marked in red).
            predicted = predicted.cpu()
            wrong = (predicted != test_labels).nonzero().flatten()[:8]
            shown = torch.cat([torch.arange(min(24, len(test_labels))), wrong])
            plot_predictions(test_images[shown], test_labels[shown], predicted[shown], out / "predictions.png")
    return TrainResult(model=model, metrics=metrics)


def _import_in_background(module: str) -> threading.Thread:
    """Starts importing ``module`` on a helper thread. torch.optim imports torch._dynamo when an
    optimizer is made (about a second of a short run); reading and decoding the data meanwhile runs
    mostly outside the GIL, so the two overlap. The caller joins the thread before it needs the
    module, and imports nothing else until then (two threads importing at once could deadlock)."""
    thread = threading.Thread(target=importlib.import_module, args=(module,), name=f"import {module}", daemon=True)
    thread.start()
    return thread


def _use_cuda_graph(requested: Optional[bool], on_cuda: bool, world_size: int) -> bool:
    """Whether the step runs as a CUDA graph: by default on a GPU in one process."""
    if requested is None:
        return on_cuda and world_size == 1
    if requested and not on_cuda:
        raise ValueError("--cuda-graph needs --device cuda")
    if requested and world_size > 1:
        raise ValueError("--cuda-graph is not supported with DistributedDataParallel (torchrun); "
                         "use --no-cuda-graph")
    return requested


def _progress(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", dynamic_ncols=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=sorted(LOADERS))
    parser.add_argument("--data", required=True, help="folder with the IDX files (flat or <Name>/raw)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--backend", choices=("fused", "torch"), default="fused")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="run each training step as one CUDA graph replay (default: on with --device cuda "
                             "in one process)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/mnist", help="checkpoint, metrics.json and plots go here")
    parser.add_argument("--resume", help="checkpoint to continue from")
    parser.add_argument("--max-steps", type=int, help="at most this many steps per epoch")
    parser.add_argument("--download", action="store_true", help="fetch missing files from the public mirrors")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-plots", action="store_true")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pyfastnn train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    config = TrainConfig(
        dataset=args.dataset, data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        dropout=args.dropout, backend=args.backend, device=args.device, seed=args.seed, out=args.out,
        resume=args.resume, max_steps=args.max_steps, progress=not args.no_progress,
        plots=not args.no_plots, download=args.download, cuda_graph=args.cuda_graph,
    )
    result = train(config)
    if int(os.environ.get("RANK", "0")) == 0 and config.out:
        print(f"test accuracy {result.metrics['test_accuracy']:.4f}; wrote {config.out}/metrics.json, "
              f"checkpoint.pt" + (", curves.png, predictions.png" if config.plots else ""))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0
