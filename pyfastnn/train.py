"""Training the lesson's MNIST classifier: ``pyfastnn train mnist --data DIR ...``.

One process by default; under ``torchrun --nproc-per-node N`` the same command trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA), each rank on its shard of every batch order,
and rank 0 alone writes files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batches, load_fashion_mnist, load_mnist, normalize
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


def make_adam(params, lr: float) -> torch.optim.Optimizer:
    """The lesson's Adam, with torch's fused (single-kernel) implementation where this torch has it."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


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
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 1000):
    """(mean cross-entropy, accuracy, predictions) over the whole set, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, predictions = 0.0, []
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
    rank, world_size, device = _distributed(config.device)
    torch.manual_seed(config.seed)
    load = LOADERS[config.dataset]
    train_images, train_labels = load(config.data, train=True, download=config.download)
    test_images, test_labels = load(config.data, train=False, download=config.download)
    x_train, x_test = normalize(train_images).to(device), normalize(test_images).to(device)
    y_train, y_test = train_labels.to(device), test_labels.to(device)

    model = build_model(config).to(device)
    optimizer = make_adam(model.parameters(), config.lr)
    history: List[Dict] = []
    start_epoch = 0
    if config.resume:
        state = torch.load(config.resume, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch = state["history"], state["epoch"]
        torch.set_rng_state(state["rng_state"])  # dropout masks continue exactly where they stopped
        if device.startswith("cuda") and state.get("cuda_rng_state") is not None:
            torch.cuda.set_rng_state(state["cuda_rng_state"])
    trained = model
    if world_size > 1:
        trained = nn.parallel.DistributedDataParallel(model)

    batches = Batches(x_train, y_train, config.batch_size, shuffle=True, seed=config.seed,
                      rank=rank, world_size=world_size)
    out = Path(config.out) if config.out and rank == 0 else None
    for epoch in range(start_epoch, config.epochs):
        batches.set_epoch(epoch)
        trained.train()
        steps = len(batches) if config.max_steps is None else min(len(batches), config.max_steps)
        progress = _progress(steps, f"epoch {epoch + 1}/{config.epochs}", config.progress and rank == 0)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen, started = 0, time.perf_counter()
        for step, (x, y) in enumerate(batches):
            if step >= steps:
                break
            optimizer.zero_grad(set_to_none=True)
            logits = trained(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.shape[0]
            if progress is not None:
                progress.update(1)
                if step % 50 == 0 or step == steps - 1:
                    rate = seen * world_size / (time.perf_counter() - started)
                    progress.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                                         acc=f"{correct.item() / seen:.4f}", samples_s=f"{rate:,.0f}")
        if progress is not None:
            progress.close()
        seconds = time.perf_counter() - started
        test_loss, test_accuracy, _ = evaluate(model, x_test, y_test)
        history.append({
            "epoch": epoch + 1, "steps": steps, "train_loss": loss_sum.item() / max(seen, 1),
            "train_accuracy": correct.item() / max(seen, 1), "test_loss": test_loss,
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
                        "cuda_rng_state": torch.cuda.get_rng_state() if device.startswith("cuda") else None},
                       out / "checkpoint.pt")

    metrics = {
        "dataset": config.dataset, "backend": config.backend, "device": device, "world_size": world_size,
        "config": dataclasses.asdict(config), "history": history,
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
        "train_seconds": sum(h["seconds"] for h in history),
    }
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if config.plots and history:
            from .plots import plot_predictions, plot_training_curves

            plot_training_curves(history, out / "curves.png")
            # The first 24 test images, then up to 8 the model gets wrong (marked in red).
            _, _, predicted = evaluate(model, x_test, y_test)
            predicted = predicted.cpu()
            wrong = (predicted != test_labels).nonzero().flatten()[:8]
            shown = torch.cat([torch.arange(min(24, len(test_labels))), wrong])
            plot_predictions(test_images[shown], test_labels[shown], predicted[shown], out / "predictions.png")
    return TrainResult(model=model, metrics=metrics)


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
        plots=not args.no_plots, download=args.download,
    )
    result = train(config)
    if int(os.environ.get("RANK", "0")) == 0 and config.out:
        print(f"test accuracy {result.metrics['test_accuracy']:.4f}; wrote {config.out}/metrics.json, "
              f"checkpoint.pt" + (", curves.png, predictions.png" if config.plots else ""))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0
