"""Training the lesson's MNIST classifier: ``pyfastnn train mnist --data DIR ...``.

One process by default; under ``torchrun --nproc-per-node N`` the same command trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA), each rank on its shard of every batch order,
and rank 0 alone writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import numbers
import os
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import ACTIVATIONS, FusedLinear
from ..command import InvalidArgument, check_number, command_parser, path_argument, run_command
from ..cuda_graph import CUDAGraphStep, cuda_graph_step
from ..denormals import flush_denormals
from ..files import atomic_write, check_output_names, json_bytes, output_folder
from ..info import info
from .checkpoint import (CheckpointError, check_resume_settings, load_checkpoint, restore_checkpoint,
                         rng_states_of_every_rank, save_checkpoint)
from .data import Batches, find_mnist, load_fashion_mnist, load_mnist, mnist_folder_from_environment, normalize
from .models import MNISTClassifier, check_hidden_sizes
from .plots import plot_predictions, plot_training_curves
from .processes import (another_process_stopped, global_tally, join_run, launched_processes, rank_seed,
                        torchrun_local_rank)
from .settings import TrainConfig, check_seed

LOADERS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}
BACKENDS = ("fused", "torch")
PLOT_FILES = ("curves.png", "predictions.png")
CHECKPOINT_FILE, METRICS_FILE = "checkpoint.pt", "metrics.json"
RUN_FILES = (CHECKPOINT_FILE, METRICS_FILE)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the trained ``model`` (unwrapped from DDP) and its ``metrics``,
    the content of metrics.json (settings, per-epoch history, ``test_accuracy``, ``completed``)."""

    model: nn.Module
    metrics: Dict


def plain_settings(config: TrainConfig) -> TrainConfig:
    """``config`` with paths, a ``torch.device`` and numbers of other types (numpy scalars) turned
    into the plain str, int and float that the checks expect and metrics.json and the checkpoint hold;
    a path's ``~`` is the home folder, for ``out`` and ``resume`` as for ``data`` (the loaders')."""
    changes = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in ("out", "resume") and isinstance(value, (str, bytes, os.PathLike)) and os.fspath(value):
            changes[field.name] = str(os.fsdecode(os.path.expanduser(os.fspath(value))))
        elif isinstance(value, (bytes, os.PathLike)):
            changes[field.name] = os.fsdecode(value)
        elif isinstance(value, torch.device):
            changes[field.name] = str(value)
        elif isinstance(value, str) and type(value) is not str:  # numpy's str_ and other subclasses
            changes[field.name] = str(value)
        elif isinstance(value, np.bool_):
            changes[field.name] = bool(value)
        elif field.name == "hidden_sizes" and isinstance(value, (list, tuple)):  # a tuple of plain ints
            if type(value) is not tuple or any(type(width) is not int for width in value):  # == misses numpy's
                changes[field.name] = tuple(int(width) if isinstance(width, numbers.Integral)
                                            and not isinstance(width, bool) else width for width in value)
        # Exact types: numpy's float64 subclasses float, yet a checkpoint (read with weights_only)
        # and metrics.json must hold plain numbers.
        elif isinstance(value, numbers.Integral) and type(value) not in (bool, int):
            changes[field.name] = int(value)
        elif isinstance(value, numbers.Real) and type(value) not in (bool, int, float):
            changes[field.name] = float(value)
    return dataclasses.replace(config, **changes) if changes else config


#: The settings that are True or False (the fields declared ``bool``; a string while annotations are postponed).
FLAG_SETTINGS = tuple(field.name for field in dataclasses.fields(TrainConfig) if field.type in (bool, "bool"))


def check_config(config: TrainConfig) -> None:
    """Raises :class:`~pyfastnn.command.InvalidArgument` naming the first setting that cannot work.

    Only values are checked here (files are checked when opened), so a run fails before it loads
    data or trains, and the command line reports it as a usage error.

    Example:
        >>> check_config(TrainConfig(data="mnist"))
        >>> check_config(TrainConfig(data="mnist", dropout=1.0))
        Traceback (most recent call last):
        ...
        pyfastnn.command.InvalidArgument: dropout must be < 1, got 1.0
    """
    if config.dataset not in LOADERS:
        raise InvalidArgument("dataset", f"must be one of {', '.join(sorted(LOADERS))}, got {config.dataset!r}")
    if not config.data:
        raise InvalidArgument("data", "is required: the folder with the IDX files")
    check_number("epochs", config.epochs, 0, integer=True)
    check_number("batch_size", config.batch_size, 1, integer=True)
    check_number("lr", config.lr, 0, include_minimum=False)
    check_number("dropout", config.dropout, 0, 1, include_maximum=False)
    try:  # the fused layers' own limit (a p within 2^-33 of 1 too), for both backends' runs alike
        FusedLinear(1, 1, dropout=config.dropout, device="meta")  # on meta: no memory, no random draws
    except ValueError as error:
        raise InvalidArgument("dropout", str(error).split("dropout probability ", 1)[-1]) from None
    check_hidden_sizes(config.hidden_sizes)
    if config.activation not in ACTIVATIONS:
        raise InvalidArgument("activation", f"must be one of {', '.join(ACTIVATIONS)}, got {config.activation!r}")
    check_seed(config.seed)
    if config.max_steps is not None:
        check_number("max_steps", config.max_steps, 1, integer=True)
    for name in FLAG_SETTINGS:
        if not isinstance(getattr(config, name), bool):
            raise InvalidArgument(name, f"must be True or False, got {getattr(config, name)!r}")
    if config.label is not None and not isinstance(config.label, str):
        raise InvalidArgument("label", f"must be text or None, got {config.label!r}")
    if config.cuda_graph is not None and not isinstance(config.cuda_graph, bool):
        raise InvalidArgument("cuda_graph", f"must be True, False or None, got {config.cuda_graph!r}")
    if config.out is not None and not str(config.out):
        raise InvalidArgument("out", "must be a folder (or None for no files), got ''")
    _check_backend(config.backend)
    check_device(config.device, config.backend)
    if config.cuda_graph and not config.device.startswith("cuda"):
        raise InvalidArgument("cuda_graph", "needs --device cuda")
    if config.cuda_graph and launched_processes() > 1:
        raise InvalidArgument("cuda_graph", "is not supported with DistributedDataParallel (a run of several "
                                            "processes); use --no-cuda-graph")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InvalidArgument("backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")


def check_device(device: str, backend: str) -> None:
    """Raises :class:`~pyfastnn.command.InvalidArgument` unless ``backend`` can train on ``device`` here."""
    usage = f"must be cpu, cuda or cuda:N, got {device!r}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidArgument("device", usage) from None
    if parsed.type == "cpu":
        if parsed.index not in (None, 0):
            raise InvalidArgument("device", f"{device!r}: the CPU takes no device index (use cpu)")
        return
    if parsed.type != "cuda":
        raise InvalidArgument("device", usage)
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise InvalidArgument("device", f"{device!r} is not available: {why} (torch {torch.__version__})")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InvalidArgument("device", f"{device!r} is not available: {torch.cuda.device_count()} CUDA device(s)")
    # torchrun: each process trains on cuda:$LOCAL_RANK (a single process ignores a stray LOCAL_RANK)
    if launched_processes() > 1 and (local_rank := torchrun_local_rank()) is not None:
        if parsed.index is not None and parsed.index != local_rank:
            raise InvalidArgument("device", f"{device!r}: under torchrun each process trains on cuda:$LOCAL_RANK "
                                            f"(here cuda:{local_rank}; pass cuda)")
        if local_rank >= torch.cuda.device_count():
            raise InvalidArgument("device", f"'cuda' for the process of LOCAL_RANK {local_rank}: "
                                            f"{torch.cuda.device_count()} CUDA device(s), one per process of a node")
    if backend == "fused":
        if not info()["backends"]["cuda"]:
            raise InvalidArgument("device", f"{device!r} needs pyfastnn's CUDA kernels, which this build lacks "
                                            "(rebuild with CUDA, or train the plain twin: --backend torch)")


def build_model(config: TrainConfig) -> nn.Module:
    """The lesson's classifier; the torch backend gets the plain twin with the very same weights."""
    _check_backend(config.backend)
    model = MNISTClassifier(hidden_sizes=config.hidden_sizes, dropout=config.dropout, activation=config.activation)
    if config.backend == "torch":
        model = model.to_torch()
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


def check_no_other_run(out: Path, resume: Optional[str], resume_as: Optional[TrainConfig] = None) -> None:
    """Raises FileExistsError where ``out`` holds files of a run other than the one resumed (or
    pictures of the names a run writes): a new run would replace its checkpoint after the first epoch
    and its pictures at once. ``resume_as``: the settings of a command that has ``--resume``, which
    the message suggests where that run's checkpoint would continue with them."""
    held = [name for name in RUN_FILES + PLOT_FILES if (out / name).exists()]
    if not held or (resume is not None and CHECKPOINT_FILE in held and os.path.samefile(resume, out / CHECKPOINT_FILE)):
        return
    resume_hint = ""
    if resume_as is not None and CHECKPOINT_FILE in held:
        try:  # only a resume that would be accepted is suggested
            state = load_checkpoint(out / CHECKPOINT_FILE)
            check_resume_settings(state, out / CHECKPOINT_FILE, resume_as)
            more = f" and --epochs above {state['epoch']}" if state["epoch"] >= resume_as.epochs else ""
            resume_hint = f"continue it with --resume {out / CHECKPOINT_FILE}{more}, "
        except (CheckpointError, OSError):
            pass
    stopped = ", which stopped before its first checkpoint" if _stopped_before_a_checkpoint(out, held) else ""
    raise FileExistsError(f"output folder {out} holds another run ({', '.join(held)}){stopped}: {resume_hint}start "
                          f"over there with --overwrite, or choose another --out")


def read_run_metrics(out: Path) -> Optional[Dict]:
    """The metrics.json a run left in ``out``, or None where none is readable (missing, not JSON,
    not an object)."""
    try:
        metrics = json.loads((out / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def _stopped_before_a_checkpoint(out: Path, held: List[str]) -> bool:
    """Whether ``out`` holds a run's metrics.json that says no checkpoint was written (the run was
    stopped in its first epoch), and no checkpoint."""
    metrics = read_run_metrics(out) if CHECKPOINT_FILE not in held else None
    return metrics is not None and metrics.get("completed") is False and metrics.get("checkpoint_epoch") is None


def run_metrics(config: TrainConfig, device: str, world_size: int, graphed: bool, history: List[Dict],
                completed: bool, checkpoint_epoch: Optional[int]) -> Dict:
    """The content of metrics.json: ``completed`` stays false until every file of the run is written,
    ``checkpoint_epoch`` is the epoch of the checkpoint.pt this run wrote (None before its first)."""
    return {
        "completed": completed, "checkpoint_epoch": checkpoint_epoch,
        "dataset": config.dataset, "backend": config.backend, "device": device, "world_size": world_size,
        "cuda_graph": graphed, "config": dataclasses.asdict(config), "history": history,
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
        "train_seconds": sum(h["seconds"] for h in history),
    }


def write_json(path, data: Dict) -> None:
    """``data`` as indented JSON, written atomically."""
    # A diverged run's NaN or inf losses are written as null: bare NaN is not JSON.
    with atomic_write(path) as f:
        f.write(json_bytes(data))


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
             batch_size: Optional[int] = 1000) -> Tuple[float, float, torch.Tensor]:
    """(mean cross-entropy, accuracy, predictions) over the whole set, in eval mode; in chunks of
    ``batch_size`` rows, or in one forward with ``batch_size=None`` (on a GPU, one launch per layer)."""
    if batch_size is not None:  # 0 or less would slice no chunk, or chunks of the wrong rows
        check_number("batch_size", batch_size, 1, integer=True)
    was_training = model.training
    model.eval()
    total_loss, predictions = 0.0, []
    batch_size = max(1, inputs.shape[0]) if batch_size is None else batch_size
    for start in range(0, inputs.shape[0], batch_size):
        logits = model(inputs[start:start + batch_size])
        total_loss += F.cross_entropy(logits, targets[start:start + batch_size], reduction="sum").item()
        predictions.append(logits.argmax(1))
    model.train(was_training)
    predicted = torch.cat(predictions) if predictions else targets.new_empty(0)
    n = max(1, inputs.shape[0])
    # correct / total, as the lesson counts it (a float32 mean would write 0.9645000100135803)
    return total_loss / n, (predicted == targets).sum().item() / n if inputs.shape[0] else 0.0, predicted


def train(config: TrainConfig) -> TrainResult:
    """Trains per ``config``; writes checkpoint, metrics.json and plots to ``config.out`` (rank 0).

    Settings, the resume checkpoint and the output folder are checked before the data is loaded.
    metrics.json is written first with ``completed: false`` and rewritten after every epoch beside
    its checkpoint; only the last write, after the plots, says ``completed: true``.
    """
    config = plain_settings(config)
    check_config(config)
    resumed = load_checkpoint(config.resume) if config.resume else None
    if resumed is not None:
        check_resume_settings(resumed, config.resume, config)
    rank, world_size, device = join_run(config.device)
    try:
        if config.out is None or rank > 0:
            return _run(config, resumed, None, rank, world_size, device)
        # Held before the check: a run started at the same moment finds it held. Folders made for a
        # run that stops before its first file are removed again.
        with output_folder(config.out) as out:
            check_output_names(out, RUN_FILES + PLOT_FILES)
            if not config.overwrite:
                check_no_other_run(out, config.resume, resume_as=config)
            return _run(config, resumed, out, rank, world_size, device)
    except RuntimeError as error:
        stopped = another_process_stopped(error, rank) if world_size > 1 else None
        if stopped is None:
            raise
        raise stopped from error


def _run(config: TrainConfig, resumed: Optional[Dict], out: Optional[Path], rank: int, world_size: int,
         device: str) -> TrainResult:
    """:func:`train` once its settings and output folder are checked (``out``: rank 0's, held)."""
    on_cuda = device.startswith("cuda")
    graphed = _use_cuda_graph(config.cuda_graph, on_cuda, world_size)
    torch.manual_seed(config.seed)
    load = LOADERS[config.dataset]
    optimizer_import = _import_in_background("torch._dynamo")
    try:  # only file reading and gzip decoding overlap the import: they import nothing
        train_images, train_labels = load(config.data, train=True, download=config.download)
        test_images, test_labels = load(config.data, train=False, download=config.download)
    finally:
        optimizer_import.join()
    # Moved to the device once; every batch is then gathered there.
    x_train, x_test = normalize(train_images).to(device), normalize(test_images).to(device)
    y_train, y_test = train_labels.to(device), test_labels.to(device)
    model = build_model(config).to(device)
    if rank > 0:  # the same initial weights on every rank, but each rank its own dropout masks
        torch.manual_seed(rank_seed(config.seed, rank))
    optimizer = make_adam(model.parameters(), config.lr, capturable=graphed)
    history: List[Dict] = []
    start_epoch = 0
    if resumed is not None:
        history, start_epoch = restore_checkpoint(resumed, config.resume, model, optimizer, device, rank)
    asked_epochs = config.epochs
    if start_epoch > asked_epochs:  # nothing to train: the files record the epochs the run holds, not fewer
        config = dataclasses.replace(config, epochs=start_epoch)
    # Made before the folder is touched: too few training samples for the processes is refused here.
    batches = Batches(x_train, y_train, config.batch_size, shuffle=True, seed=config.seed,
                      rank=rank, world_size=world_size)
    checkpoint_epoch: Optional[int] = None

    def write_metrics(completed: bool = False) -> None:  # the run so far, naming the checkpoint on disk
        write_json(out / METRICS_FILE, run_metrics(config, device, world_size, graphed, history, completed,
                                                   checkpoint_epoch))

    if out is not None and not _finishes_its_own_run(out, config, start_epoch):
        for name in PLOT_FILES:  # the previous run's pictures would pass for this run's
            (out / name).unlink(missing_ok=True)
        write_metrics()

    def save_state(epochs_done: int) -> None:
        # Every rank's generator state goes into rank 0's checkpoint: a collective, so every rank
        # calls this at the same points (config.out is the same on all of them).
        nonlocal checkpoint_epoch
        rank_rng = rng_states_of_every_rank(device, world_size)
        if out is not None:
            path = out / CHECKPOINT_FILE
            before = _file_identity(path)
            try:
                save_checkpoint(path, model, optimizer, history, epochs_done, config, device, world_size, rank_rng)
            finally:  # metrics.json names the checkpoint on disk: the new one once it replaced the old (a new file)
                if _file_identity(path) != before:
                    checkpoint_epoch = epochs_done

    trained = model
    if world_size > 1:
        trained = nn.parallel.DistributedDataParallel(model)

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

    def train_epoch(epoch: int, steps: int) -> Tuple[int, float]:
        """Runs the epoch's steps (the running sums zeroed first): (samples seen, when its steps began)."""
        batches.set_epoch(epoch)
        trained.train()
        progress = _progress(steps, f"epoch {epoch + 1}/{config.epochs}", config.progress and rank == 0)
        loss_sum.zero_()
        correct.zero_()
        seen, started = 0, time.perf_counter()
        try:  # an interrupted epoch closes its bar too, so what is printed next starts a line
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
        finally:
            if progress is not None:
                progress.close()
        return seen, started

    def evaluate_test_set() -> Tuple[float, float, torch.Tensor]:
        return evaluate(model, x_test, y_test, batch_size=None if on_cuda else 1000)

    predicted = None
    # Adam's moments of units that stop learning decay into denormals, which slow every CPU thread's
    # arithmetic from the second epoch on (NOTE [Denormals on every thread] in csrc/cpu/denormals.h).
    with flush_denormals(config.flush_denormals and not on_cuda):
        for epoch in range(start_epoch, config.epochs):
            steps = len(batches) if config.max_steps is None else min(len(batches), config.max_steps)
            seen, started = train_epoch(epoch, steps)
            # waits for the epoch's last step; under DDP the sums of every rank's shard
            train_loss, train_correct, total_seen = global_tally(loss_sum, correct, seen, world_size)
            seconds = time.perf_counter() - started
            test_loss, test_accuracy, predicted = evaluate_test_set()
            history.append({
                "epoch": epoch + 1, "steps": steps, "train_loss": train_loss / max(total_seen, 1),
                "train_accuracy": train_correct / max(total_seen, 1), "test_loss": test_loss,
                "test_accuracy": test_accuracy, "seconds": seconds,
                "samples_per_s": total_seen / max(seconds, 1e-9),
            })
            if rank == 0 and config.summaries:  # --no-progress hides the bar, not the epoch's summary
                h = history[-1]
                print(f"epoch {h['epoch']}: train loss {h['train_loss']:.4f} acc {h['train_accuracy']:.4f} | "
                      f"test loss {h['test_loss']:.4f} acc {h['test_accuracy']:.4f} | {seconds:.1f} s")
            try:
                if config.out is not None:
                    save_state(epoch + 1)
            except BaseException:  # also when interrupted while saving: metrics.json names the checkpoint kept
                if out is not None:
                    with contextlib.suppress(OSError):  # the save's own error (a full disk) is the one to report
                        write_metrics()
                raise
            if out is not None:
                write_metrics()

    if rank == 0 and config.summaries and start_epoch >= config.epochs:
        done = f"the checkpoint has {start_epoch} epoch(s) done, " if resumed is not None else ""
        print(f"nothing to train: {done}epochs is {asked_epochs}")
    if start_epoch >= config.epochs and config.out is not None:  # no epoch ran: the folder still gets its state
        save_state(start_epoch)
    metrics = run_metrics(config, device, world_size, graphed, history, True, checkpoint_epoch)
    if out is not None:
        if config.plots and history:
            if predicted is None:  # resumed from a finished run: nothing trained, nothing evaluated yet
                _, _, predicted = evaluate_test_set()
            _write_pictures(out, history, predicted.cpu(), test_images, test_labels)
        write_json(out / METRICS_FILE, metrics)
    return TrainResult(model=model, metrics=metrics)


def _write_pictures(out: Path, history: List[Dict], predicted: torch.Tensor, test_images: torch.Tensor,
                    test_labels: torch.Tensor) -> None:
    """curves.png (the history's losses and accuracies) and predictions.png (test images with the
    model's labels) into ``out``."""
    plot_training_curves(history, out / "curves.png")
    shown = pictured_examples(predicted, test_labels)
    plot_predictions(test_images[shown], test_labels[shown], predicted[shown], out / "predictions.png",
                     title=predictions_title(len(test_labels), len(shown), history[-1]["test_accuracy"]))


#: predictions.png shows the first PICTURED_FIRST test images (three rows of eight), then up to
#: PICTURED_WRONG later ones the model gets wrong.
PICTURED_FIRST, PICTURED_WRONG = 24, 8


def pictured_examples(predicted: torch.Tensor, labels: torch.Tensor, first: int = PICTURED_FIRST,
                      wrong: int = PICTURED_WRONG) -> torch.Tensor:
    """The indices of the test images predictions.png shows: the first ``first``, then up to
    ``wrong`` later ones the model gets wrong (marked in red there), none twice.

    Example:
        >>> pictured_examples(torch.tensor([0, 9, 2, 9, 4, 9]), torch.arange(6), first=2, wrong=1).tolist()
        [0, 1, 3]
    """
    first = min(first, len(labels))
    missed = (predicted[first:] != labels[first:]).nonzero().flatten()[:wrong] + first
    return torch.cat([torch.arange(first), missed])


def predictions_title(test_images: int, shown: int, accuracy: Optional[float]) -> str:
    """predictions.png's title: what its tiles are (the mistakes are picked, so their share of the
    grid says nothing of the accuracy, which it gives).

    Example:
        >>> predictions_title(10000, 32, 0.9793)
        'The first 24 test images, then 8 later ones the model gets wrong; test accuracy 97.93 %'
    """
    first = min(PICTURED_FIRST, test_images)
    title = f"The first {first} test images"
    if shown > first:
        title += f", then {shown - first} later one{'s' if shown - first > 1 else ''} the model gets wrong"
    return title + ("" if accuracy is None else f"; test accuracy {100 * accuracy:.2f} %")


def _file_identity(path: Path) -> Optional[Tuple[int, int]]:
    """Which file ``path`` names (device and inode), None if none: an atomic replace changes it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _finishes_its_own_run(out: Path, config: TrainConfig, start_epoch: int) -> bool:
    """Whether the run resumes the checkpoint of its own folder with nothing left to train: its
    pictures and metrics then stay as they are (a later step redraws them, or --no-plots keeps them)."""
    if config.resume is None or start_epoch < config.epochs:
        return False
    own = out / CHECKPOINT_FILE
    return own.is_file() and os.path.samefile(config.resume, own)


def _import_in_background(module: str) -> threading.Thread:
    """Starts importing ``module`` on a helper thread. torch.optim imports torch._dynamo when an
    optimizer is made (about a second of a short run); reading and gzip-decoding the data meanwhile
    runs mostly outside the GIL, so the two overlap. The caller joins the thread before it imports or
    builds anything else (two threads importing at once may see each other's half-made modules)."""

    def import_quietly() -> None:
        try:
            importlib.import_module(module)
        except BaseException:  # noqa: BLE001 - the main thread's own import raises it again, where it is reported
            pass

    thread = threading.Thread(target=import_quietly, name=f"import {module}", daemon=True)
    thread.start()
    return thread


def _use_cuda_graph(requested: Optional[bool], on_cuda: bool, world_size: int) -> bool:
    """Whether the step runs as a CUDA graph: by default on a GPU in one process (check_config has
    refused the combinations that cannot be graphed)."""
    return on_cuda and world_size == 1 if requested is None else requested


def _progress(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", dynamic_ncols=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=sorted(LOADERS))
    parser.add_argument("--data", type=path_argument,
                        help="folder with the IDX files (flat or <Name>/raw; for mnist, default: $PYFASTNN_MNIST)")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs,
                        help="passes over the training set (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                        help="samples per step, per process under torchrun (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="Adam's learning rate (default: %(default)s)")
    parser.add_argument("--dropout", type=float, default=TrainConfig.dropout,
                        help="dropout probability of the hidden layers (default: %(default)s)")
    parser.add_argument("--hidden-sizes", type=layer_widths, default=TrainConfig.hidden_sizes, metavar="N,N,...",
                        help="widths of the hidden layers, comma-separated, e.g. 256,64 for the lesson's funnel "
                             "(default: 256,128)")
    parser.add_argument("--activation", choices=ACTIVATIONS, default=TrainConfig.activation, metavar="NAME",
                        help=f"activation of the hidden layers: {', '.join(ACTIVATIONS)} (default: %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default=TrainConfig.backend,
                        help="fused: pyfastnn's layers; torch: the plain nn.Linear twin (default: %(default)s)")
    parser.add_argument("--device", default=TrainConfig.device, help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="run each training step as one CUDA graph replay (default: on with --device cuda "
                             "in one process)")
    parser.add_argument("--flush-denormals", action=argparse.BooleanOptionalAction,
                        default=TrainConfig.flush_denormals,
                        help="on the CPU, flush denormal floats to zero on every thread while training "
                             "(default: on; they slow each step as Adam's moments of idle units decay)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed,
                        help="seeds the weights, the shuffle and dropout: 0 to 2**32 - 1 (default: %(default)s)")
    parser.add_argument("--out", type=path_argument,
                        help=f"checkpoint, metrics.json and plots go here (default: {TrainConfig.out}; with --resume "
                             f"of a run's own {CHECKPOINT_FILE}, that run's folder)")
    parser.add_argument("--resume", type=path_argument, help="checkpoint to continue from")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --out folder that holds another run (its files are replaced)")
    parser.add_argument("--max-steps", type=int, help="at most this many steps per epoch (default: all)")
    parser.add_argument("--download", action="store_true", help="fetch missing files from the public mirrors")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (the per-epoch summary lines are still printed)")
    parser.add_argument("--no-plots", action="store_true", help="skip curves.png and predictions.png")


def layer_widths(text: str) -> Tuple[int, ...]:
    """Hidden layer widths on the command line: ``256,64`` -> ``(256, 64)``.

    Example:
        >>> layer_widths("256, 64")
        (256, 64)
        >>> layer_widths("256,0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: expected comma-separated widths >= 1 (e.g. 256,64), got '256,0'
    """
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths >= 1 (e.g. 256,64), got {text!r}")
    return widths


layer_widths.__name__ = "layer widths"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = command_parser(
        "pyfastnn train",
        description=(
            "Train the lesson's MNIST classifier (784-256-128-10, ReLU, dropout, Adam) on pyfastnn's "
            "fused layers, or another architecture or activation (--hidden-sizes, --activation); under "
            "torchrun, with DistributedDataParallel."),
        examples=("pyfastnn train mnist --data DIR --out runs/mnist               # the lesson's run: 5 epochs",
                  "pyfastnn train mnist --data DIR --out runs/mnist --epochs 8 --resume runs/mnist/checkpoint.pt",
                  "pyfastnn train mnist --data DIR --hidden-sizes 256,64 --activation gelu --out runs/funnel",
                  "pyfastnn train mnist --data DIR --download --out runs/mnist    # fetch MNIST into DIR first",
                  "torchrun --nproc-per-node 2 -m pyfastnn train mnist --data DIR --out runs/ddp"))
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.data is None:
        args.data = _mnist_from_environment(parser, args.dataset, args.download)
    config = TrainConfig(
        dataset=args.dataset, data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        dropout=args.dropout, hidden_sizes=args.hidden_sizes, activation=args.activation, backend=args.backend,
        device=args.device, seed=args.seed, out=args.out if args.out is not None else _default_out(args.resume),
        resume=args.resume, max_steps=args.max_steps, progress=not args.no_progress,
        plots=not args.no_plots, download=args.download, cuda_graph=args.cuda_graph,
        flush_denormals=args.flush_denormals, overwrite=args.overwrite,
    )
    return run_command(parser, args, lambda: _train_and_report(config))


def _default_out(resume: Optional[str]) -> str:
    """--out where none is given: the folder of the --resume checkpoint where that is a run's own
    checkpoint.pt (metrics.json beside it), so the run continues in place; else TrainConfig.out."""
    if resume is not None:
        folder = Path(resume).parent
        if Path(resume).name == CHECKPOINT_FILE and (folder / METRICS_FILE).is_file():
            return str(folder)
    return TrainConfig.out


def _mnist_from_environment(parser: argparse.ArgumentParser, dataset: str, download: bool) -> str:
    """The MNIST folder $PYFASTNN_MNIST names (as ``pyfastnn demo`` reads it), where no --data was
    given; a folder there without MNIST (unless --download fills it) is a usage error naming the
    variable."""
    if dataset != "mnist":
        parser.error("the following arguments are required: --data")
    folder = mnist_folder_from_environment()  # ~ expanded, as for --data
    if folder is None:
        parser.error("the following arguments are required: --data (or $PYFASTNN_MNIST, the MNIST folder)")
    if not download and find_mnist(folder) is None:
        parser.error(f"$PYFASTNN_MNIST={folder} holds no MNIST files (flat or MNIST/raw): point it, or --data, at "
                     "the folder that holds them (or add --download)")
    return folder


def _train_and_report(config: TrainConfig) -> int:
    result = train(config)
    rank = 0
    if launched_processes() > 1:  # the rank train() joined the group as, not $RANK read again
        import torch.distributed as dist

        rank = dist.get_rank()
        dist.destroy_process_group()
    if rank == 0:
        accuracy = result.metrics["test_accuracy"]
        summary = "no epoch trained" if accuracy is None else f"test accuracy {accuracy:.4f}"
        if config.out:
            plots = ", " + ", ".join(PLOT_FILES) if config.plots and result.metrics["history"] else ""
            summary += f"; wrote {config.out}/metrics.json, checkpoint.pt{plots}"
        print(summary)
    return 0
