"""A training run's checkpoint.pt: what it holds (weights, Adam's state, the history, every
rank's generator states, the run's settings), written atomically, and read back for ``--resume``
only after the checks that let a run continue exactly or refuse the file by name (damaged, another
program's, another model's or another run's: :class:`CheckpointError`).
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..files import atomic_write
from .processes import launched_processes
from .settings import TrainConfig

#: What every checkpoint holds; its ``config``, ``world_size`` and CUDA generator states are read where present.
CHECKPOINT_KEYS = ("model", "optimizer", "history", "epoch", "rng_state")


class CheckpointError(ValueError):
    """A ``--resume`` checkpoint is missing, unreadable, or not one that fits this model."""


#: The optimizer settings a checkpoint's param_groups must share with this run's Adam. Its lr is the
#: run's --lr, also checked with the run's settings; here against the lr Adam would really go on
#: with (a checkpoint without its settings, or whose settings and optimizer disagree).
ADAM_SETTINGS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


def _optimizer_state_problems(optimizer: torch.optim.Optimizer, state: Dict, epochs_done: int) -> List[str]:
    """What in a checkpoint's optimizer state does not fit ``optimizer``, after ``epochs_done`` epochs
    of training: torch's load_state_dict checks only the parameter counts, and Adam's fused kernel
    reads moment tensors of another shape out of bounds (a crash, or memory silently overwritten) at
    the first step."""
    groups, per_parameter = state.get("param_groups"), state.get("state")
    if not isinstance(groups, list) or not isinstance(per_parameter, dict) or len(groups) != len(optimizer.param_groups):
        return ["it is not the state of one Adam parameter group"]
    problems = []
    for group, own in zip(groups, optimizer.param_groups):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            return ["its parameter group is not a dict listing its parameters"]
        lr = group.get("lr")
        bad_lr = not (_is_number(lr) and math.isfinite(lr) and lr > 0)
        if bad_lr:
            problems.append(f"lr {lr!r}")
        problems += [f"{key} {group.get(key)!r} (this run: {own[key]!r})" for key in ADAM_SETTINGS
                     if key in own and group.get(key) != own[key] and not (key == "lr" and bad_lr)]
        if len(group["params"]) != len(own["params"]):
            problems.append(f"{len(group['params'])} parameters (this model: {len(own['params'])})")
            continue
        stateless = []
        for index, parameter in zip(group["params"], own["params"]):
            moments = per_parameter.get(index)
            if moments is None:  # a parameter that never stepped has no state yet
                stateless.append(index)
                continue
            wanted = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if own.get("amsgrad") else set())
            if not isinstance(moments, dict) or set(moments) != wanted:
                problems.append(f"parameter {index}'s state holds {sorted(moments) if isinstance(moments, dict) else moments!r}"
                                f" (Adam's: {sorted(wanted)})")
                continue
            for name in sorted(wanted - {"step"}):
                tensor = moments[name]
                if not (isinstance(tensor, torch.Tensor) and tensor.shape == parameter.shape
                        and tensor.dtype == parameter.dtype and tensor.layout == torch.strided):
                    problems.append(f"parameter {index}'s {name} is {_describe_tensor(tensor)} "
                                    f"(the parameter: {_describe_tensor(parameter)})")
                elif name.endswith("exp_avg_sq") and bool((tensor < 0).any()):  # averages of squares
                    problems.append(f"parameter {index}'s {name} holds negative values")
            step = moments["step"]
            if not ((isinstance(step, torch.Tensor) and step.numel() == 1) or _is_number(step)):
                problems.append(f"parameter {index}'s step is {step!r}")
            else:  # a parameter with state has taken a whole, positive number of steps
                count = float(step.item() if isinstance(step, torch.Tensor) else step)
                if not (math.isfinite(count) and count >= 1 and count == int(count)):
                    problems.append(f"parameter {index}'s step is {count!r}, not a count of steps")
        # Every step updates every parameter of the classifier: after an epoch each has Adam's moments,
        # and going on with fresh ones would not continue the run.
        if stateless and epochs_done > 0:
            problems.append(f"no state for parameter(s) {', '.join(map(str, stateless))} after {epochs_done} "
                            f"epoch(s) of training")
    return problems


def _describe_tensor(value) -> str:
    """``(256, 784) float32``, with the layout where it is not a dense tensor's; a non-tensor's type."""
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    layout = "" if value.layout == torch.strided else f" {str(value.layout).replace('torch.', '')}"
    return f"{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}{layout}"


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict, path, epochs_done: int) -> None:
    """Loads a checkpoint's optimizer state (of a run ``epochs_done`` epochs in) but keeps this
    optimizer's implementation flags (a checkpoint written on a GPU with ``capturable=True`` resumes
    on the CPU and the other way round)."""
    problems = _optimizer_state_problems(optimizer, state, epochs_done)
    if problems:
        raise CheckpointError(f"checkpoint {path}: its optimizer state does not fit this run's Adam: "
                              f"{'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}")
    flags = [{key: group[key] for key in ("fused", "foreach", "capturable") if key in group}
             for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)
        on_param_device = group.get("fused") or group.get("capturable")
        for parameter in group["params"]:
            moments = optimizer.state.get(parameter, {})
            step = moments.get("step")
            if isinstance(step, torch.Tensor):  # fused and capturable Adam count steps where the parameter is
                moments["step"] = step.to(parameter.device if on_param_device else "cpu", torch.float32)
            for name, moment in moments.items():
                # Laid out as the parameter: fused Adam walks the moments in the parameter's element
                # order, so one saved transposed (same values, other strides) would be updated wrongly.
                if name != "step" and moment.stride() != parameter.stride():
                    moments[name] = torch.empty_like(parameter).copy_(moment)


def load_checkpoint(path) -> Dict:
    """Reads a checkpoint written by :func:`save_checkpoint` (tensors on the CPU); :class:`CheckpointError`
    names the file.

    Only tensors and plain data are unpickled (``weights_only=True``): a checkpoint cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        what = ("is a folder, not a file" if path.is_dir() else "is not a regular file (a device or a pipe)"
                if path.exists() else "no such file")
        raise CheckpointError(f"checkpoint {path}: {what}")
    # torch.save writes a zip archive; anything else is the format before it (which torch.save writes with
    # _use_new_zipfile_serialization=False, and torch.load still reads), or damaged, or another file.
    legacy = not zipfile.is_zipfile(path)
    if not legacy:
        _check_archive(path)
    not_a_checkpoint = f"checkpoint {path}: not a checkpoint file (truncated, damaged or another kind of file)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line), "")
        if legacy and "Unsupported global" not in detail:  # not even the older format's pickles: another file
            raise CheckpointError(not_a_checkpoint) from e
        raise CheckpointError(f"checkpoint {path}: holds objects other than tensors and plain data, which are not "
                              f"loaded ({detail or type(e).__name__})") from e
    except Exception as e:  # torch reports a damaged file as RuntimeError, OSError, EOFError or struct.error
        if legacy:  # without an archive's directory to tell, a file cut short or another file look alike
            raise CheckpointError(not_a_checkpoint) from e
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path}: cannot be read, damaged ({reason})") from e
    missing = [key for key in CHECKPOINT_KEYS if key not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise CheckpointError(f"checkpoint {path}: not a pyfastnn training checkpoint (no {', '.join(missing)})")
    wrong = _misshapen_entries(state)
    if wrong:
        raise CheckpointError(f"checkpoint {path}: not a pyfastnn training checkpoint ({'; '.join(wrong)})")
    return state


def _check_archive(path: Path) -> None:
    """Raises :class:`CheckpointError` unless the zip archive at ``path`` is whole and one that
    torch.save wrote (torch.load does not verify the archive's checksums: damaged tensor bytes would
    load silently)."""
    try:
        with zipfile.ZipFile(path) as archive:
            failing = archive.testzip()
            names = archive.namelist()
        damaged = None if failing is None else f"{failing} fails its checksum"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        damaged = str(e) or type(e).__name__
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path}: cannot be read, damaged ({damaged})")
    # torch.save's archive holds <name>/data.pkl; TorchScript's (torch.jit.save) also its code.
    if not any(name.endswith("/data.pkl") for name in names):
        raise CheckpointError(f"checkpoint {path}: not a checkpoint file (a zip archive torch.save did not write)")
    if any(name.endswith("/constants.pkl") for name in names):
        raise CheckpointError(f"checkpoint {path}: a TorchScript module (torch.jit.save), not a training checkpoint")


#: What each history entry holds (metrics.json and the plots read them all).
HISTORY_FIELDS = ("epoch", "steps", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds",
                  "samples_per_s")


def _is_number(value) -> bool:
    """An int or a float, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _misshapen_entries(state: Dict) -> List[str]:
    """What in a checkpoint's entries is not what :func:`save_checkpoint` writes (edited, or another program's)."""
    wrong = [f"{key} is {type(state[key]).__name__}, not {kind.__name__}"
             for key, kind in (("model", dict), ("optimizer", dict), ("history", list), ("epoch", int),
                               ("rng_state", torch.Tensor))
             if not isinstance(state[key], kind) or isinstance(state[key], bool)]
    if isinstance(state["epoch"], int) and state["epoch"] < 0:
        wrong.append(f"epoch is {state['epoch']}")
    elif (isinstance(state["epoch"], int) and isinstance(state["history"], list)
          and state["epoch"] != len(state["history"])):  # one history entry per epoch done
        wrong.append(f"epoch is {state['epoch']} but history holds {len(state['history'])} epoch(s)")
    if "config" in state:  # every checkpoint save_checkpoint wrote records the run's settings there
        config = state["config"]
        if not isinstance(config, dict):
            wrong.append(f"config is {type(config).__name__}, not dict")
        else:  # without them the resume checks would compare nothing
            missing = [name for name in RUN_SETTINGS if name not in config and name not in SETTINGS_BEFORE_RECORDED]
            if missing:
                wrong.append(f"config lacks {', '.join(missing)}")
    if isinstance(state["history"], list):
        for i, entry in enumerate(state["history"]):
            if not isinstance(entry, dict) or not all(_is_number(entry.get(name)) for name in HISTORY_FIELDS):
                wrong.append(f"history entry {i} lacks a number for one of {', '.join(HISTORY_FIELDS)}")
                break
    return wrong


#: The settings that define a run: a resumed run continues with the checkpoint's (its optimizer state
#: carries the learning rate), so asking for others is refused rather than recorded but not applied.
RUN_SETTINGS = ("dataset", "backend", "lr", "batch_size", "dropout", "hidden_sizes", "activation", "seed")


#: The run settings checkpoints have not always recorded, with the value every run had before.
SETTINGS_BEFORE_RECORDED = {"hidden_sizes": (256, 128), "activation": "relu"}


def check_resume_settings(state: Dict, path, config: TrainConfig) -> None:
    """Raises :class:`CheckpointError` naming each run setting of ``config`` that differs from the
    checkpoint's (``epochs``, ``max_steps``, the device and the output options may change)."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        return  # written without its settings (load_checkpoint refuses an edited entry): nothing to compare
    wanted = dataclasses.asdict(config)
    saved = {**SETTINGS_BEFORE_RECORDED, **saved}  # a checkpoint older than a setting trained with its value then
    if isinstance(saved.get("seed"), int) and saved["seed"] >= 2 ** 32:
        # Taken before seeds were held to 32 bits: torch's generator trained it with the low 32 bits.
        saved = {**saved, "seed": saved["seed"] % 2 ** 32}
    differ = [f"{name} {saved[name]!r} (asked: {wanted[name]!r})" for name in RUN_SETTINGS
              if name in saved and _setting(saved[name]) != _setting(wanted[name])]
    # Each process trains on its shard of every epoch: another count is another run.
    processes = launched_processes()
    if state.get("world_size", processes) != processes:
        differ.append(f"{state['world_size']!r} process(es) (asked: {processes})")
    if differ:
        raise CheckpointError(f"checkpoint {path}: was trained with {', '.join(differ)}; resume with the "
                              f"checkpoint's settings, or start a new run without --resume")


def _setting(value):
    """A setting as compared: the layer widths as a tuple, whether a list or a tuple holds them."""
    return tuple(value) if isinstance(value, list) else value


def _renamed_from_earlier_layouts(weights: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Checkpoints written before the classifier took the lesson's keys in every case (the plain
    twin's ``1.weight``, ``4.weight`` ...; at dropout 0, ``layers.2.weight`` ...) hold the same
    tensors in the same order: they get this model's keys. Anything else is returned as it is."""
    expected = model.state_dict()
    if list(weights) == list(expected) or len(weights) != len(expected):
        return weights
    if [tuple(t.shape) for t in weights.values()] != [tuple(t.shape) for t in expected.values()]:
        return weights
    return dict(zip(expected, weights.values()))


def restore_checkpoint(state: Dict, path, model: nn.Module, optimizer: torch.optim.Optimizer, device: str,
                       rank: int = 0):
    """Puts a loaded checkpoint's weights, optimizer state and RNG state (``rank``'s own, under DDP)
    back; returns (history, epoch)."""
    try:
        model.load_state_dict(_renamed_from_earlier_layouts(state["model"], model))
        _load_optimizer_state(optimizer, state["optimizer"], path, state["epoch"])
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        # load_state_dict's first line is only a header ("Error(s) in loading state_dict for ...:").
        reason = " ".join(line.strip() for line in str(e).strip().splitlines()[:2]) or type(e).__name__
        raise CheckpointError(f"checkpoint {path}: does not fit this model ({reason})") from e
    try:  # dropout masks continue exactly where they stopped
        rng_state, cuda_rng_state = state["rng_state"], state.get("cuda_rng_state")
        if state.get("rank_rng_states") is not None:  # a DDP run: each rank its own
            rng_state, cuda_rng_state = state["rank_rng_states"][rank]
        torch.set_rng_state(rng_state.cpu())
        if device.startswith("cuda") and cuda_rng_state is not None:
            torch.cuda.set_rng_state(cuda_rng_state.cpu(), device)
    except (RuntimeError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its random-number generator state cannot be restored "
                              f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from e
    return list(state["history"]), int(state["epoch"])


def _rng_state(device: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """This process's generator states: the CPU's, and the device's where it is a GPU."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.startswith("cuda") else None


def rng_states_of_every_rank(device: str, world_size: int) -> Optional[List]:
    """Under DDP, every rank's generator states (each draws its own dropout masks), for rank 0's
    checkpoint; None for one process. Every rank must call it at the same point."""
    if world_size == 1:
        return None
    import torch.distributed as dist

    states: List = [None] * world_size
    dist.all_gather_object(states, _rng_state(device))
    return states


def save_checkpoint(path, model: nn.Module, optimizer: torch.optim.Optimizer, history: List[Dict], epoch: int,
                    config: TrainConfig, device: str, world_size: int = 1,
                    rank_rng_states: Optional[List] = None) -> None:
    """Everything :func:`restore_checkpoint` needs to continue exactly, written atomically
    (``rank_rng_states``: under DDP, every rank's generator states, see :func:`rng_states_of_every_rank`)."""
    # Serialized in memory first: torch.save writing into a full disk reports only "unexpected pos";
    # the file write then fails with the system's own reason, naming the file.
    serialized = io.BytesIO()
    rng_state, cuda_rng_state = _rng_state(device)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "history": history, "epoch": epoch, "config": dataclasses.asdict(config), "world_size": world_size,
                "rng_state": rng_state, "cuda_rng_state": cuda_rng_state,
                "rank_rng_states": [list(states) for states in rank_rng_states] if rank_rng_states else None},
               serialized)
    with atomic_write(path) as f:
        f.write(serialized.getbuffer())
