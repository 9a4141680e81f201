"""The lesson's commands, ``pyfastnn train`` and ``pyfastnn demo``: the whole lesson runs, and every
mistake or failure ends in one line with the right exit status."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from commands import cli, error_line, run_cli


def test_cli_demo_runs_the_whole_lesson(tmp_path, mnist_dir):
    """The README's main job (scripts/demo.sh) minus its setup: every section, pictures, fusion."""
    result = run_cli("demo", "--data", str(mnist_dir), "--out", str(tmp_path), "--mnist-steps", "20")
    assert result.returncode == 0, result.stderr
    for section in ("Perceptron", "XOR from scratch", "SimpleNN on XOR", "Quick benchmark",
                    "Whole-network fusion", "=> FusedMLP", "eval outputs equal: True", "test accuracy after 20 steps"):
        assert section in result.stdout, section
    # The lesson's own printout of its XOR run: the loss every 100 epochs, then each input's output.
    for line in ("Epoch 0, Loss: 0.2500", "Epoch 900, Loss: 0.2500", "[0 0] -> 0.5000 (expected: 0)",
                 "[1 1] -> 0.5000 (expected: 0)"):
        assert line in result.stdout.splitlines(), line
    for picture in ("activations.png", "xor_scratch_loss.png", "mnist/curves.png", "mnist/predictions.png"):
        assert (tmp_path / picture).stat().st_size > 0, picture
    # What each part concludes: one neuron learns AND and OR, never XOR; the worked example's numbers;
    # the larger init's XOR run and SimpleNN (from the demo's seed) solve XOR.
    lines = result.stdout.splitlines()
    for gate, verdict in (("AND", "learned"), ("OR", "learned"), ("XOR", "not learnable by one neuron")):
        assert any(line.strip().startswith(f"{gate}:") and line.endswith(f"-> {verdict}") for line in lines), gate
    assert "dloss/dw = 8.0 (autograd through the fused op: 8.0), new w = 2.92" in result.stdout
    xor_runs = [i for i, line in enumerate(lines) if line == "Predictions:"]
    broken_symmetry = [float(line.split("->")[1].split()[0]) for line in lines[xor_runs[1] + 1:xor_runs[1] + 5]]
    assert [round(v) for v in broken_symmetry] == [0, 1, 1, 0], broken_symmetry
    simple_nn = next(line for line in lines if line.startswith("Predictions: ["))
    assert [round(float(v)) for v in simple_nn.split("[")[1].rstrip("]").split(",")] == [0, 1, 1, 0], simple_nn


# --- Mistakes and failures: one line, exit status 2 for usage, 1 for failures, --debug for the traceback ---

@pytest.mark.parametrize("option,value,problem", [
    ("--lr", "0", "must be > 0"),
    ("--lr", "-1e-3", "must be > 0"),
    ("--lr", "nan", "finite number"),
    ("--lr", "inf", "finite number"),
    ("--batch-size", "0", "must be >= 1"),
    ("--epochs", "-1", "must be >= 0"),
    ("--dropout", "1", "must be < 1"),
    ("--dropout", "-0.1", "must be >= 0"),
    ("--dropout", "0.99999999999", "must be more than 2^-33 below 1"),  # the fused layers would draw no mask
    ("--max-steps", "0", "must be >= 1"),
    ("--seed", "-3", "must be >= 0"),
    ("--seed", str(2 ** 32), "must be <= 4294967295"),  # it would repeat seed 0's run
    ("--device", "gpu", "must be cpu, cuda or cuda:N"),
    ("--device", "cuda:99", "is not available"),
    ("--out", "", "must be a path, got an empty string"),
    ("--resume", " ", "must be a path, got an empty string"),
    ("--device", "cpu:1", "the CPU takes no device index"),
    ("--hidden-sizes", "256,0", "expected comma-separated widths >= 1 (e.g. 256,64), got '256,0'"),
    ("--hidden-sizes", "", "expected comma-separated widths >= 1"),
    ("--activation", "softmax", "invalid choice: 'softmax'"),
])
def test_train_bad_argument_values_are_usage_errors(capsys, tmp_path, tiny_mnist_dir, option, value, problem):
    out = tmp_path / "run"
    args = ["train", "mnist", "--data", str(tiny_mnist_dir), "--out", str(out), "--no-progress", f"{option}={value}"]
    status, stdout, err = cli(capsys, *args)
    line = error_line(err, "pyfastnn train")
    assert status == 2 and err.startswith("usage: pyfastnn train")
    assert f"argument {option}: " in line and problem in line, line
    assert not out.exists() and "epoch" not in stdout  # nothing trained, nothing written


def test_paths_on_the_command_line_expand_the_home_folder(capsys, tmp_path, tiny_mnist_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    status, stdout, _ = cli(capsys, "train", "mnist", "--data", str(tiny_mnist_dir), "--out=~/run", "--epochs", "1",
                            "--max-steps", "1", "--no-progress", "--no-plots")
    assert status == 0 and (tmp_path / "run" / "checkpoint.pt").is_file() and f"wrote {tmp_path}/run/" in stdout
    status, _, _ = cli(capsys, "train", "mnist", "--data", str(tiny_mnist_dir), "--out=~/again", "--epochs", "2",
                       "--max-steps", "1", "--no-progress", "--no-plots", "--resume=~/run/checkpoint.pt")
    assert status == 0 and (tmp_path / "again" / "checkpoint.pt").is_file()


def test_train_argparse_errors_keep_exit_status_2(capsys, tiny_mnist_dir, monkeypatch):
    monkeypatch.delenv("PYFASTNN_MNIST", raising=False)  # it would stand for --data
    assert cli(capsys, "train", "mnist", "--data", str(tiny_mnist_dir), "--lr", "fast")[0] == 2
    assert cli(capsys, "train", "mnist")[0] == 2  # --data missing
    assert cli(capsys, "train", "cifar", "--data", str(tiny_mnist_dir))[0] == 2


def test_train_missing_data_folder_is_one_line_naming_it(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    status, _, err = cli(capsys, "train", "mnist", "--data", str(missing), "--out", str(tmp_path / "run"))
    assert status == 1
    assert error_line(err, "pyfastnn train") == f"pyfastnn train: error: data folder {missing} does not exist"
    assert len(err.strip().splitlines()) == 1


def test_train_corrupt_data_file_is_one_line_naming_it(capsys, tmp_path, tiny_mnist_dir):
    data = tmp_path / "data"
    data.mkdir()
    for source in tiny_mnist_dir.iterdir():
        (data / source.name).write_bytes(source.read_bytes())
    (data / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not gzip at all")
    status, _, err = cli(capsys, "train", "mnist", "--data", str(data), "--out", str(tmp_path / "run"))
    line = error_line(err, "pyfastnn train")
    assert status == 1 and "train-labels-idx1-ubyte.gz: cannot read" in line, line


@pytest.mark.parametrize("case", ["out_is_a_file", "parent_is_a_file", "out_is_a_link_to_nowhere", "out_in_proc"])
def test_train_unwritable_out_fails_before_loading_or_training(capsys, tmp_path, tiny_mnist_dir, case):
    if case == "out_in_proc" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, where no folder can be made")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    out = {"out_is_a_file": blocker, "parent_is_a_file": blocker / "run", "out_is_a_link_to_nowhere": tmp_path / "link",
           "out_in_proc": Path("/proc/pyfastnn-run")}[case]
    if case == "out_is_a_link_to_nowhere":
        out.symlink_to(tmp_path / "gone")
    status, stdout, err = cli(capsys, "train", "mnist", "--data", str(tiny_mnist_dir), "--out", str(out))
    line = error_line(err, "pyfastnn train")
    problem = {"out_is_a_link_to_nowhere": f"is a symbolic link to {tmp_path / 'gone'}, which does not exist",
               "out_in_proc": "cannot be created ("}.get(case, "is a file")
    assert status == 1 and f"output folder {out}" in line and problem in line, line
    assert "epoch" not in stdout + err
    assert blocker.read_text() == "a file, not a folder"


class _Unsafe:
    """Unpickling this would import and run code: a checkpoint must never do that."""


@pytest.mark.parametrize("content,problem", [
    ("empty", "not a checkpoint file (truncated, damaged"),
    ("garbage", "not a checkpoint file (truncated, damaged"),
    ("truncated", "not a checkpoint file (truncated, damaged"),
    ("damaged", "cannot be read, damaged"),
    ("other_torch_file", "not a pyfastnn training checkpoint (no model, optimizer, history, epoch, rng_state)"),
    ("code", "holds objects other than tensors and plain data"),
    ("numpy_archive", "not a checkpoint file (a zip archive torch.save did not write)"),
    ("torchscript", "a TorchScript module (torch.jit.save), not a training checkpoint"),
])
def test_train_corrupt_resume_checkpoint_is_one_line_naming_it(capsys, tmp_path, tiny_mnist_dir, content, problem):
    checkpoint = tmp_path / "checkpoint.pt"
    if content in ("other_torch_file", "truncated", "damaged"):
        torch.save({"weights": torch.arange(5000.0)}, checkpoint)  # a torch file, but not a training checkpoint
        data = checkpoint.read_bytes()
        if content == "truncated":
            checkpoint.write_bytes(data[: len(data) // 2])
        if content == "damaged":  # the archive's directory intact, the tensor's bytes and checksum not
            middle = len(data) // 2
            checkpoint.write_bytes(data[:middle] + bytes(64) + data[middle + 64:])
    elif content == "code":
        torch.save({"model": _Unsafe()}, checkpoint)
    elif content == "numpy_archive":
        with open(checkpoint, "wb") as f:
            np.savez(f, weights=np.zeros(3))
    elif content == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript is deprecated upstream
            torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), checkpoint)
    else:
        checkpoint.write_bytes(b"" if content == "empty" else b"\x00garbage" * 40)
    out = tmp_path / "run"
    status, stdout, err = cli(capsys, "train", "mnist", "--data", str(tiny_mnist_dir), "--out", str(out),
                               "--resume", str(checkpoint))
    line = error_line(err, "pyfastnn train")
    assert status == 1 and f"checkpoint {checkpoint}: " in line and problem in line, line
    assert "Errno" not in line and "epoch" not in stdout


def test_a_checkpoint_saved_again_in_torchs_older_format_resumes_and_a_damaged_one_is_named(capsys, tmp_path,
                                                                                            tiny_mnist_dir):
    """torch.save(..., _use_new_zipfile_serialization=False) writes the format before the zip archive,
    which torch.load(weights_only=True) reads: such a copy of a checkpoint continues the run."""
    from pyfastnn.lesson.train import TrainConfig, train

    common = dict(data=str(tiny_mnist_dir), max_steps=1, progress=False, plots=False)
    train(TrainConfig(epochs=1, out=str(tmp_path / "a"), **common))
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    older = tmp_path / "older.pt"
    torch.save(state, older, _use_new_zipfile_serialization=False)
    straight = train(TrainConfig(epochs=2, out=None, **common))
    resumed = train(TrainConfig(epochs=2, out=str(tmp_path / "b"), resume=str(older), **common))
    assert [h["epoch"] for h in resumed.metrics["history"]] == [1, 2]
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    # Cut short, or holding code, it is refused in one line as a zip checkpoint would be.
    data = older.read_bytes()
    capsys.readouterr()
    for content, problem in ((data[: len(data) // 2], "not a checkpoint file (truncated, damaged or another kind"),
                             (data[:40], "not a checkpoint file (truncated, damaged or another kind")):
        older.write_bytes(content)
        status, stdout, err = cli(capsys, "train", "mnist", "--data", str(tiny_mnist_dir), "--epochs", "2",
                                  "--resume", str(older), "--out", str(tmp_path / "c"))
        line = error_line(err, "pyfastnn train")
        assert status == 1 and f"checkpoint {older}: {problem}" in line and "epoch" not in stdout, line
    torch.save({"model": _Unsafe()}, older, _use_new_zipfile_serialization=False)
    status, _, err = cli(capsys, "train", "mnist", "--data", str(tiny_mnist_dir), "--resume", str(older), "--out",
                         str(tmp_path / "c"))
    assert status == 1 and "holds objects other than tensors and plain data" in error_line(err, "pyfastnn train")


def test_train_resume_of_missing_file_or_other_model(capsys, tmp_path, tiny_mnist_dir):
    missing = tmp_path / "missing.pt"
    status, _, err = cli(capsys, "train", "mnist", "--data", str(tiny_mnist_dir), "--resume", str(missing),
                          "--out", str(tmp_path / "a"))
    assert status == 1 and error_line(err, "pyfastnn train").endswith(f"checkpoint {missing}: no such file")
    for other, what in ((tmp_path, "is a folder, not a file"), ("/dev/null", "is not a regular file (a device or a pipe)")):
        status, _, err = cli(capsys, "train", "mnist", "--data", str(tiny_mnist_dir), "--resume", str(other),
                             "--out", str(tmp_path / "a"))
        assert status == 1 and error_line(err, "pyfastnn train").endswith(f"checkpoint {other}: {what}")

    from pyfastnn.lesson.train import TrainConfig, train

    first = tmp_path / "first"
    train(TrainConfig(data=str(tiny_mnist_dir), epochs=1, max_steps=1, out=str(first), progress=False, plots=False))
    state = torch.load(first / "checkpoint.pt", weights_only=True)
    state["model"]["layers.0.weight"] = torch.zeros(5, 5)
    torch.save(state, tmp_path / "other.pt")
    status, _, err = cli(capsys, "train", "mnist", "--data", str(tiny_mnist_dir), "--epochs", "2",
                          "--resume", str(tmp_path / "other.pt"), "--out", str(tmp_path / "b"))
    line = error_line(err, "pyfastnn train")
    assert status == 1 and "other.pt: does not fit this model" in line, line


@pytest.mark.parametrize("edit,problem", [
    (lambda state: state.update(epoch="2"), "epoch is str, not int"),
    (lambda state: state.update(epoch=-1), "epoch is -1"),
    (lambda state: state.update(epoch=3), "epoch is 3 but history holds 1 epoch(s)"),  # would skip 2 epochs
    (lambda state: state.update(history={}), "history is dict, not list"),
    (lambda state: state["history"][0].pop("seconds"), "history entry 0 lacks a number"),
    (lambda state: state.update(model=[1, 2]), "model is list, not dict"),
    (lambda state: state.update(rng_state=[0]), "rng_state is list, not Tensor"),
    (lambda state: state.update(rng_state=torch.zeros(3)), "random-number generator state cannot be restored"),
    (lambda state: state["model"].update({"layers.0.weight": "w"}), "does not fit this model"),
    # Adam's fused kernel would read or write moments of another shape out of bounds at the first step.
    (lambda state: state["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)),
     "its optimizer state does not fit this run's Adam: parameter 0's exp_avg is (3,) float32 (the parameter: "
     "(256, 784) float32)"),
    (lambda state: state["optimizer"]["state"][0].update(exp_avg=torch.zeros(256, 784).to_sparse()),
     "parameter 0's exp_avg is (256, 784) float32 sparse_coo (the parameter: (256, 784) float32)"),
    (lambda state: state["optimizer"]["param_groups"][0].update(lr=-1.0), "Adam: lr -1.0"),
    (lambda state: state["optimizer"]["state"][1].pop("exp_avg_sq"), "parameter 1's state holds ['exp_avg', 'step']"),
    (lambda state: state["optimizer"]["param_groups"][0].update(betas=(2.0, 3.0)),
     "betas (2.0, 3.0) (this run: (0.9, 0.999))"),
    (lambda state: state["optimizer"]["param_groups"][0].update(eps=1e-3), "eps 0.001 (this run: 1e-08)"),
    (lambda state: state["optimizer"]["param_groups"][0].update(weight_decay=0.1), "weight_decay 0.1 (this run: 0"),
    (lambda state: state["optimizer"]["param_groups"][0].update(maximize=True), "maximize True (this run: False)"),
    (lambda state: state["optimizer"]["param_groups"][0].update(lr="x"), "optimizer state does not fit this run's Adam: lr 'x'"),
    # The lr Adam would go on with, whatever the run's recorded settings say (or where there are none).
    (lambda state: state["optimizer"]["param_groups"][0].update(lr=0.5), "lr 0.5 (this run: 0.001)"),
    (lambda state: [state.pop("config"), state["optimizer"]["param_groups"][0].update(lr=0.5)],
     "lr 0.5 (this run: 0.001)"),
    (lambda state: state["optimizer"].update(param_groups=[]), "not the state of one Adam parameter group"),
    # Values no Adam run leaves behind: training would turn to NaN.
    (lambda state: state["optimizer"]["state"][0].update(step=torch.tensor(-5.0)),
     "parameter 0's step is -5.0, not a count of steps"),
    (lambda state: state["optimizer"]["state"][2].update(step=torch.tensor(float("nan"))), "parameter 2's step is nan"),
    (lambda state: state["optimizer"]["state"][1]["exp_avg_sq"].fill_(-1.0), "parameter 1's exp_avg_sq holds negative"),
    (lambda state: state.update(world_size=2), "was trained with 2 process(es) (asked: 1)"),  # torchrun's shards
    # Settings that say nothing would let every settings check pass unseen.
    (lambda state: state.update(config=None), "not a pyfastnn training checkpoint (config is NoneType, not dict)"),
    (lambda state: state.update(config={}), "(config lacks dataset, backend, lr, batch_size, dropout, seed)"),
    (lambda state: state["config"].pop("lr"), "(config lacks lr)"),
    # After an epoch every parameter has Adam's moments: fresh ones would not continue the run.
    (lambda state: state["optimizer"].update(state={}),
     "optimizer state does not fit this run's Adam: no state for parameter(s) 0, 1, 2, 3, 4, 5 after 1 epoch(s)"),
    (lambda state: state["optimizer"]["state"].pop(4), "no state for parameter(s) 4 after 1 epoch(s) of training"),
])
def test_train_resume_of_an_edited_checkpoint_names_what_is_wrong(capsys, tmp_path, tiny_mnist_dir, edit, problem):
    from pyfastnn.lesson.train import TrainConfig, train

    train(TrainConfig(data=str(tiny_mnist_dir), epochs=1, max_steps=1, out=str(tmp_path / "a"), progress=False,
                      plots=False))
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "edited.pt")
    status, _, err = cli(capsys, "train", "mnist", "--data", str(tiny_mnist_dir), "--epochs", "2", "--no-plots",
                         "--resume", str(tmp_path / "edited.pt"), "--out", str(tmp_path / "b"))
    line = error_line(err, "pyfastnn train")
    assert status == 1 and f"checkpoint {tmp_path / 'edited.pt'}: " in line and problem in line, line


def test_a_new_run_never_replaces_another_runs_files_unless_asked(capsys, tmp_path, tiny_mnist_dir):
    common = ["train", "mnist", "--data", str(tiny_mnist_dir), "--max-steps", "1", "--no-progress", "--no-plots"]
    out = tmp_path / "run"
    assert cli(capsys, *common, "--epochs", "1", "--out", str(out))[0] == 0
    trained = (out / "checkpoint.pt").read_bytes()
    status, _, err = cli(capsys, *common, "--epochs", "0", "--out", str(out))
    line = error_line(err, "pyfastnn train")
    assert status == 1 and f"output folder {out} holds another run (checkpoint.pt, metrics.json)" in line, line
    assert "--resume" in line and "--overwrite" in line and (out / "checkpoint.pt").read_bytes() == trained
    # A resume is suggested only where it would be accepted: not with another seed.
    status, _, err = cli(capsys, *common, "--epochs", "1", "--seed", "1", "--out", str(out))
    line = error_line(err, "pyfastnn train")
    assert status == 1 and "holds another run" in line and "--resume" not in line and "--overwrite" in line, line
    # Resuming in place continues that run; --overwrite starts a new one there.
    assert cli(capsys, *common, "--epochs", "2", "--out", str(out), "--resume", str(out / "checkpoint.pt"))[0] == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert cli(capsys, *common, "--epochs", "0", "--out", str(out), "--overwrite")[0] == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0
    # Pictures alone under the names a run writes are someone's too: kept unless asked.
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "curves.png").write_bytes(b"mine")
    status, _, err = cli(capsys, *common, "--epochs", "1", "--out", str(pictures))
    assert status == 1 and f"output folder {pictures} holds another run (curves.png)" in error_line(err, "pyfastnn train")
    assert (pictures / "curves.png").read_bytes() == b"mine"


def test_resuming_a_runs_own_checkpoint_continues_in_its_folder_and_hints_say_what_would_work(
        capsys, tmp_path, tiny_mnist_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default --out would go
    common = ["train", "mnist", "--data", str(tiny_mnist_dir), "--max-steps", "1", "--no-progress", "--no-plots"]
    out = tmp_path / "run"
    assert cli(capsys, *common, "--epochs", "1", "--out", str(out))[0] == 0
    # The same command again: the run it finds has its epochs done, so resuming needs more of them.
    status, _, err = cli(capsys, *common, "--epochs", "1", "--out", str(out))
    line = error_line(err, "pyfastnn train")
    assert status == 1 and f"continue it with --resume {out / 'checkpoint.pt'} and --epochs above 1," in line, line
    # Without --out, a run's own checkpoint continues in its folder (not in the default one).
    assert cli(capsys, *common, "--epochs", "2", "--resume", str(out / "checkpoint.pt"))[0] == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert json.loads((out / "metrics.json").read_text())["checkpoint_epoch"] == 2
    assert not (tmp_path / "runs").exists()
    # A checkpoint file of another name is no run folder's: the default --out holds the new run.
    (tmp_path / "saved.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    assert cli(capsys, *common, "--epochs", "3", "--resume", str(tmp_path / "saved.pt"))[0] == 0
    assert torch.load(tmp_path / "runs" / "mnist" / "checkpoint.pt", weights_only=True)["epoch"] == 3
    # A run stopped in its first epoch left a metrics.json naming no checkpoint: the message says so.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "metrics.json").write_text(json.dumps({"completed": False, "checkpoint_epoch": None}))
    status, _, err = cli(capsys, *common, "--epochs", "1", "--out", str(stopped))
    line = error_line(err, "pyfastnn train")
    assert status == 1 and "holds another run (metrics.json), which stopped before its first checkpoint" in line, line


def test_train_resume_refuses_other_run_settings(capsys, tmp_path, tiny_mnist_dir):
    common = ["train", "mnist", "--data", str(tiny_mnist_dir), "--max-steps", "1", "--no-progress", "--no-plots"]
    assert cli(capsys, *common, "--epochs", "1", "--out", str(tmp_path / "a"))[0] == 0
    checkpoint = tmp_path / "a" / "checkpoint.pt"
    # The optimizer state carries the learning rate: another one would be recorded but not applied.
    status, _, err = cli(capsys, *common, "--epochs", "2", "--lr", "0.5", "--dropout", "0.5",
                         "--resume", str(checkpoint), "--out", str(tmp_path / "b"))
    line = error_line(err, "pyfastnn train")
    assert status == 1 and "was trained with lr 0.001 (asked: 0.5), dropout 0.2 (asked: 0.5)" in line, line
    assert not (tmp_path / "b").exists()
    # Every setting that makes another run is named, each alone.
    for option, value, named in (("--batch-size", "32", "batch_size 64 (asked: 32)"),
                                 ("--backend", "torch", "backend 'fused' (asked: 'torch')"),
                                 ("--seed", "7", "seed 0 (asked: 7)"),
                                 ("--hidden-sizes", "256,64", "hidden_sizes (256, 128) (asked: (256, 64))"),
                                 ("--activation", "tanh", "activation 'relu' (asked: 'tanh')")):
        status, _, err = cli(capsys, *common, "--epochs", "2", option, value,
                             "--resume", str(checkpoint), "--out", str(tmp_path / "b"))
        line = error_line(err, "pyfastnn train")
        assert status == 1 and f"was trained with {named}; resume with" in line, line
    assert cli(capsys, *common, "--epochs", "2", "--resume", str(checkpoint), "--out", str(tmp_path / "c"))[0] == 0


def test_a_diverged_run_writes_valid_json(tmp_path, tiny_mnist_dir):
    import json

    from pyfastnn.lesson.train import TrainConfig, train

    out = tmp_path / "diverged"
    train(TrainConfig(data=str(tiny_mnist_dir), epochs=1, lr=1e30, out=str(out), progress=False, plots=False))
    text = (out / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"metrics.json holds bare {name}"))
    assert metrics["history"][0]["train_loss"] is None  # NaN, written as null


def test_debug_flag_and_environment_show_the_traceback(capsys, tmp_path, monkeypatch):
    from pyfastnn.cli import main
    from pyfastnn.lesson.data import IDXError

    args = ["train", "mnist", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]
    with pytest.raises(IDXError, match="does not exist"):
        main(args + ["--debug"])
    monkeypatch.setenv("PYFASTNN_DEBUG", "1")
    with pytest.raises(IDXError, match="does not exist"):
        main(args)
    monkeypatch.setenv("PYFASTNN_DEBUG", "0")
    assert main(args) == 1


def test_python_m_pyfastnn_exit_statuses_and_one_line_errors(tmp_path):
    missing = tmp_path / "nowhere"
    failed = run_cli("train", "mnist", "--data", str(missing), "--out", str(tmp_path / "run"))
    assert failed.returncode == 1
    assert failed.stderr.strip() == f"pyfastnn train: error: data folder {missing} does not exist"
    usage = run_cli("train", "mnist", "--data", str(missing), "--batch-size", "0")
    assert usage.returncode == 2 and usage.stderr.strip().endswith("argument --batch-size: must be >= 1, got 0")
    traced = subprocess.run([sys.executable, "-m", "pyfastnn", "train", "mnist", "--data", str(missing)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYFASTNN_DEBUG": "1"},
                            cwd=tmp_path)  # its default --out, runs/mnist, is made there, not in the checkout
    assert traced.returncode == 1 and "Traceback" in traced.stderr and "IDXError" in traced.stderr
    assert run_cli("nonsense").returncode == 2
    assert run_cli("info", "--bogus").returncode == 2


def test_demo_missing_data_folder_is_named_before_the_lesson_runs(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    status, stdout, err = cli(capsys, "demo", "--data", str(missing), "--out", str(tmp_path / "pictures"))
    assert status == 1
    assert error_line(err, "pyfastnn demo") == f"pyfastnn demo: error: data folder {missing} does not exist"
    assert "Perceptron" not in stdout and not (tmp_path / "pictures").exists()


def test_demo_refuses_to_run_under_torchrun(capsys, tmp_path, monkeypatch):
    # Every process would run the whole lesson into one folder and race for it.
    monkeypatch.setenv("WORLD_SIZE", "2")
    status, stdout, err = cli(capsys, "demo", "--out", str(tmp_path / "pictures"))
    assert status == 1 and "pyfastnn demo runs in one process, not under torchrun (WORLD_SIZE=2)" in error_line(
        err, "pyfastnn demo")
    assert "Perceptron" not in stdout and not (tmp_path / "pictures").exists()


def test_demo_damaged_training_file_is_named_before_the_lesson_runs(capsys, tmp_path, tiny_mnist_dir):
    data = tmp_path / "data"
    data.mkdir()
    for source in tiny_mnist_dir.iterdir():
        (data / source.name).write_bytes(source.read_bytes())
    damaged = next(data.glob("train-images*"))
    damaged.write_bytes(damaged.read_bytes()[:100])
    status, stdout, err = cli(capsys, "demo", "--data", str(data), "--out", str(tmp_path / "pictures"))
    assert status == 1 and damaged.name in error_line(err, "pyfastnn demo")
    assert "Perceptron" not in stdout


def test_demo_checks_pyfastnn_mnist_and_its_mnist_folder_before_the_lesson_runs(capsys, tmp_path, tiny_mnist_dir,
                                                                               monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for source in tiny_mnist_dir.iterdir():
        (data / source.name).write_bytes(source.read_bytes())
    monkeypatch.setenv("PYFASTNN_MNIST", str(data))
    out = tmp_path / "pictures"
    out.mkdir()
    (out / "mnist").write_text("a file where the MNIST run's folder goes")
    status, stdout, err = cli(capsys, "demo", "--out", str(out))
    assert status == 1 and f"{out / 'mnist'} is a file" in error_line(err, "pyfastnn demo") and "Perceptron" not in stdout
    damaged = next(data.glob("train-labels*"))
    damaged.write_bytes(b"\x1f\x8b not gzip at all")
    status, stdout, err = cli(capsys, "demo", "--out", str(tmp_path / "other"))
    assert status == 1 and damaged.name in error_line(err, "pyfastnn demo") and "Perceptron" not in stdout


def test_demo_bad_arguments(capsys, tmp_path, tiny_mnist_dir):
    status, _, err = cli(capsys, "demo", "--mnist-steps", "0")
    assert status == 2 and "argument --mnist-steps: must be >= 1, got 0" in error_line(err, "pyfastnn demo")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    status, stdout, err = cli(capsys, "demo", "--data", str(tiny_mnist_dir), "--out", str(blocker))
    assert status == 1 and f"output folder {blocker} is a file" in error_line(err, "pyfastnn demo")
    assert "Perceptron" not in stdout
    # A device no machine has (cuda:99) is refused before the lesson, not at its MNIST part.
    status, stdout, err = cli(capsys, "demo", "--data", str(tiny_mnist_dir), "--out", str(tmp_path / "out"),
                              "--device", "cuda:99")
    assert status == 2 and "argument --device: 'cuda:99' is not available" in error_line(err, "pyfastnn demo")
    assert "Perceptron" not in stdout and not (tmp_path / "out").exists()


def test_pipes_where_output_files_go_are_refused_up_front(capsys, tmp_path, tiny_mnist_dir):
    """Writing into (or reading) a pipe would block the command: refused like a folder in that place."""
    for command, name in (("train", "checkpoint.pt"), ("demo", "activations.png")):
        out = tmp_path / command
        out.mkdir()
        os.mkfifo(out / name)
        args = (["train", "mnist", "--no-progress"] if command == "train" else ["demo", "--no-bench"])
        status, _, err = cli(capsys, *args, "--data", str(tiny_mnist_dir), "--out", str(out), "--overwrite")
        line = error_line(err, f"pyfastnn {command}")
        assert status == 1 and f"holds {name}, which is not a regular file (a pipe, socket or device)" in line, line
        assert sorted(p.name for p in out.iterdir()) == [name]


def test_a_link_into_a_missing_folder_where_an_output_file_goes_is_refused_up_front(capsys, tmp_path,
                                                                                     tiny_mnist_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").symlink_to(tmp_path / "gone" / "checkpoint.pt")  # written there, after an epoch
    status, stdout, err = cli(capsys, "train", "mnist", "--no-progress", "--data", str(tiny_mnist_dir), "--out",
                              str(out), "--overwrite")
    line = error_line(err, "pyfastnn train")
    assert status == 1 and "holds checkpoint.pt, a symbolic link to" in line and "does not exist" in line, line
    assert "epoch 1" not in stdout and sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_bench_mnist_refuses_a_wrong_data_folder_before_benchmarking(tmp_path, mnist_dir):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_mnist.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--full-script", "--data", str(tmp_path)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYFASTNN_MNIST": str(mnist_dir)})  # not taken instead
    assert result.returncode == 2 and str(tmp_path) in error_line(result.stderr, "bench_mnist.py")
    assert "train step" not in result.stdout
    # A folder with the test files only: the missing training files are named before any benchmark.
    test_only = tmp_path / "test_only"
    test_only.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        source = next(mnist_dir.glob(name + "*"))
        (test_only / source.name).write_bytes(source.read_bytes())
    result = subprocess.run([sys.executable, str(script), "--quick", "--full-script", "--data", str(test_only)],
                            capture_output=True, text=True, timeout=120)
    error = error_line(result.stderr, "bench_mnist.py")
    assert result.returncode == 2 and "train-images-idx3-ubyte" in error and "--download" not in error, error
    assert "train step" not in result.stdout
    # A wrong $PYFASTNN_MNIST is refused the same way, not replaced by ../shared/data/mnist ...
    wrong = {**os.environ, "PYFASTNN_MNIST": str(tmp_path)}
    result = subprocess.run([sys.executable, str(script), "--quick", "--full-script"], capture_output=True, text=True,
                            timeout=120, env=wrong)
    error = error_line(result.stderr, "bench_mnist.py")
    assert result.returncode == 2 and error.startswith("bench_mnist.py: error: $PYFASTNN_MNIST: ")
    assert str(tmp_path) in error and error.endswith("point --data or $PYFASTNN_MNIST at the folder that holds them")
    assert "train step" not in result.stdout
    # ... where the run reads MNIST: the steps alone need none.
    result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300,
                            env=wrong)
    assert result.returncode == 0 and "train step" in result.stdout, result.stderr


def test_demo_never_replaces_another_runs_files_unless_asked(capsys, tmp_path, tiny_mnist_dir):
    """``train --out runs/mnist`` then ``demo --out runs``: the demo's MNIST run goes to the same folder."""
    from pyfastnn.lesson.train import TrainConfig, train

    train(TrainConfig(data=str(tiny_mnist_dir), epochs=1, max_steps=1, out=str(tmp_path / "mnist"), progress=False,
                      plots=False))
    trained = (tmp_path / "mnist" / "checkpoint.pt").read_bytes()
    status, stdout, err = cli(capsys, "demo", "--data", str(tiny_mnist_dir), "--out", str(tmp_path), "--no-bench")
    line = error_line(err, "pyfastnn demo")
    assert status == 1 and f"output folder {tmp_path / 'mnist'} holds another run" in line, line
    assert "--overwrite" in line and "--resume" not in line  # demo has no --resume
    assert "Perceptron" not in stdout and (tmp_path / "mnist" / "checkpoint.pt").read_bytes() == trained
    # With --overwrite it runs; it reports the steps run (one epoch of 96 images: 2 steps), not those asked.
    status, stdout, err = cli(capsys, "demo", "--data", str(tiny_mnist_dir), "--out", str(tmp_path), "--no-bench",
                              "--overwrite", "--mnist-steps", "100000")
    assert status == 0, err
    assert "test accuracy after 2 steps" in stdout and "100000" not in stdout.split("=== MNIST")[1].split("\n", 1)[1]
    # That folder now holds the demo's own run: the next demo (the main job run again) replaces it.
    replaced = (tmp_path / "mnist" / "checkpoint.pt").read_bytes()
    status, stdout, err = cli(capsys, "demo", "--data", str(tiny_mnist_dir), "--out", str(tmp_path), "--no-bench",
                              "--mnist-steps", "1")
    assert status == 0, err
    assert "test accuracy after 1 steps" in stdout and (tmp_path / "mnist" / "checkpoint.pt").read_bytes() != replaced
    # A train run written there since is another run again.
    train(TrainConfig(data=str(tiny_mnist_dir), epochs=1, max_steps=1, out=str(tmp_path / "mnist"), progress=False,
                      plots=False, overwrite=True))
    status, stdout, err = cli(capsys, "demo", "--data", str(tiny_mnist_dir), "--out", str(tmp_path), "--no-bench")
    assert status == 1 and "holds another run" in error_line(err, "pyfastnn demo")


def test_demo_never_replaces_a_picture_it_did_not_draw_unless_asked(capsys, tmp_path, monkeypatch, tiny_mnist_dir):
    from pyfastnn.lesson.demo import DEMO_RUN_LABEL
    from pyfastnn.lesson.plots import drawn_by_pyfastnn

    monkeypatch.delenv("PYFASTNN_MNIST", raising=False)  # the lesson's sections alone
    mine = tmp_path / "activations.png"
    mine.write_bytes(b"a picture of the user's own")
    status, stdout, err = cli(capsys, "demo", "--out", str(tmp_path), "--no-bench")
    line = error_line(err, "pyfastnn demo")
    assert status == 1 and f"{tmp_path} holds activations.png, which pyfastnn did not draw" in line, line
    assert "--overwrite" in line and "Perceptron" not in stdout and mine.read_bytes() == b"a picture of the user's own"
    assert not (tmp_path / "xor_scratch_loss.png").exists()
    # Refused with MNIST data too, before the folder of its MNIST run is made.
    status, _, err = cli(capsys, "demo", "--out", str(tmp_path), "--no-bench", "--data", str(tiny_mnist_dir))
    assert status == 1 and "which pyfastnn did not draw" in error_line(err, "pyfastnn demo")
    assert not (tmp_path / "mnist").exists()
    # With --overwrite the demo draws its own pictures; those, the next demo replaces unasked (the main job again).
    assert cli(capsys, "demo", "--out", str(tmp_path), "--no-bench", "--overwrite")[0] == 0
    assert drawn_by_pyfastnn(mine) and drawn_by_pyfastnn(tmp_path / "xor_scratch_loss.png")
    status, stdout, err = cli(capsys, "demo", "--out", str(tmp_path), "--no-bench")
    assert status == 0, err
    # A folder holding a demo's MNIST run holds that demo's pictures, also from before they were marked.
    older = tmp_path / "older"
    (older / "mnist").mkdir(parents=True)
    (older / "mnist" / "metrics.json").write_text(json.dumps({"config": {"label": DEMO_RUN_LABEL}}))
    (older / "activations.png").write_bytes(b"an unmarked picture")
    assert cli(capsys, "demo", "--out", str(older), "--no-bench")[0] == 0
    assert drawn_by_pyfastnn(older / "activations.png")


def test_an_interrupted_demo_run_is_replaced_by_the_next_demo(capsys, tmp_path, tiny_mnist_dir):
    """A demo stopped while training leaves a metrics.json with its label and "completed": false:
    the next demo takes that folder as its own; an interrupted train run there is another run."""
    from pyfastnn.lesson.demo import DEMO_RUN_LABEL

    (tmp_path / "mnist").mkdir()
    metrics = tmp_path / "mnist" / "metrics.json"
    metrics.write_text(json.dumps({"completed": False, "config": {"label": DEMO_RUN_LABEL}}))
    status, stdout, err = cli(capsys, "demo", "--data", str(tiny_mnist_dir), "--out", str(tmp_path), "--no-bench",
                              "--mnist-steps", "1")
    assert status == 0, err
    assert json.loads(metrics.read_text())["completed"]
    metrics.write_text(json.dumps({"completed": False, "config": {"label": None}}))  # a train run, interrupted
    status, _, err = cli(capsys, "demo", "--data", str(tiny_mnist_dir), "--out", str(tmp_path), "--no-bench")
    assert status == 1 and "holds another run" in error_line(err, "pyfastnn demo")


def test_demo_missing_mnist_files_suggest_only_demo_options(capsys, tmp_path):
    status, stdout, err = cli(capsys, "demo", "--data", str(tmp_path), "--out", str(tmp_path / "pictures"))
    line = error_line(err, "pyfastnn demo")
    assert status == 1 and "not found under" in line and "point --data at the folder" in line, line
    assert "--download" not in line and "download=True" not in line


def test_demo_missing_mnist_files_name_pyfastnn_mnist_where_it_gave_the_folder(capsys, tmp_path, tiny_mnist_dir,
                                                                               monkeypatch):
    partial = tmp_path / "partial"
    partial.mkdir()
    for source in tiny_mnist_dir.glob("t10k-*"):  # the test split only
        (partial / source.name).write_bytes(source.read_bytes())
    monkeypatch.setenv("PYFASTNN_MNIST", str(partial))
    status, stdout, err = cli(capsys, "demo", "--out", str(tmp_path / "pictures"), "--no-bench")
    line = error_line(err, "pyfastnn demo")
    assert status == 1 and line.startswith("pyfastnn demo: error: $PYFASTNN_MNIST: train-") and str(partial) in line
    assert line.endswith("point it, or --data, at the folder that holds them") and "Perceptron" not in stdout


def test_demo_takes_a_pyfastnn_mnist_without_mnist_for_the_mistake_a_wrong_data_is(capsys, tmp_path, monkeypatch):
    """The variable set is a folder asked for, as --data is: one that holds no MNIST stops the demo
    before the lesson, naming the variable (train stops too); unset, the demo skips its MNIST part."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for named, problem in ((tmp_path / "nosuch", f"data folder {tmp_path / 'nosuch'} does not exist"),
                           (empty, f"t10k-images-idx3-ubyte[.gz] not found under {empty}")):
        monkeypatch.setenv("PYFASTNN_MNIST", str(named))
        status, stdout, err = cli(capsys, "demo", "--out", str(tmp_path / "pictures"), "--no-bench")
        line = error_line(err, "pyfastnn demo")
        assert status == 1 and line.startswith(f"pyfastnn demo: error: $PYFASTNN_MNIST: {problem}"), line
        assert "Perceptron" not in stdout and not (tmp_path / "pictures").exists()
    monkeypatch.setenv("PYFASTNN_MNIST", " ")  # blank: as if unset
    status, stdout, err = cli(capsys, "demo", "--out", str(tmp_path / "pictures"), "--no-bench")
    assert status == 0 and "=== MNIST: skipped (no data; pass --data DIR or set PYFASTNN_MNIST" in stdout, err


@pytest.mark.parametrize("name", ["checkpoint.pt", "metrics.json", "curves.png"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_where_an_output_file_goes_is_refused_before_loading(capsys, tmp_path, tiny_mnist_dir, name,
                                                                       overwrite, monkeypatch):
    import pyfastnn.lesson.train as train_module

    monkeypatch.setattr(train_module, "LOADERS", {"mnist": None})  # the data is never loaded
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)
    status, _, err = cli(capsys, "train", "mnist", "--data", str(tiny_mnist_dir), "--out", str(out), *overwrite)
    line = error_line(err, "pyfastnn train")
    assert status == 1 and f"output folder {out} holds a folder named {name}" in line and "--resume" not in line, line


def test_a_second_demo_into_a_folder_in_use_stops_before_the_lesson(capsys, tmp_path):
    from pyfastnn.files import hold_folder

    with hold_folder(tmp_path):  # as a demo running there holds it
        status, stdout, err = cli(capsys, "demo", "--out", str(tmp_path), "--no-bench")
    assert status == 1 and "is in use by another run" in error_line(err, "pyfastnn demo")
    assert "Perceptron" not in stdout and not list(tmp_path.iterdir())


def test_a_run_whose_paths_the_terminal_cannot_show_still_succeeds(tmp_path, tiny_mnist_dir):
    out = tmp_path / "r\u00e9sum\u00e9 \u65e5"
    result = run_cli("train", "mnist", "--data", str(tiny_mnist_dir), "--epochs", "1", "--max-steps", "1",
                     "--no-plots", "--no-progress", "--out", str(out),
                     env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert "r\\xe9sum\\xe9 \\u65e5" in result.stdout and (out / "metrics.json").is_file()


def test_demo_refuses_a_folder_where_a_picture_goes(capsys, tmp_path):
    (tmp_path / "activations.png").mkdir()
    status, stdout, err = cli(capsys, "demo", "--out", str(tmp_path), "--no-bench")
    assert status == 1 and "holds a folder named activations.png" in error_line(err, "pyfastnn demo")
    assert "Perceptron" not in stdout


def test_sigterm_during_a_save_cleans_up_and_exits_143(tmp_path, tiny_mnist_dir):
    """What torchrun, docker and SLURM send: handled like Ctrl-C, so the temporary file is removed."""
    out = tmp_path / "run"
    script = f"""
import contextlib, os, signal, sys
import pyfastnn.lesson.train as train_module
from pyfastnn.cli import main
original = train_module.atomic_write

@contextlib.contextmanager
def terminated_while_writing(path):
    with original(path) as f:
        f.write(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        yield f

train_module.atomic_write = terminated_while_writing
sys.exit(main(["train", "mnist", "--data", {str(tiny_mnist_dir)!r}, "--out", {str(out)!r}, "--no-progress"]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip() == "pyfastnn train: interrupted"
    assert not out.exists()  # no hidden temporary file left, so the folder made for the run went too


def test_an_ignored_sigterm_stays_ignored(tmp_path, tiny_mnist_dir):
    """The handler replaces only the default action: a parent that ignores SIGTERM keeps it ignored."""
    out = tmp_path / "run"
    script = f"""
import os, signal, sys
from pyfastnn.cli import main
import pyfastnn.lesson.train as train_module
signal.signal(signal.SIGTERM, signal.SIG_IGN)
original = train_module.write_json

def terminated_while_writing(path, data):
    os.kill(os.getpid(), signal.SIGTERM)
    original(path, data)

train_module.write_json = terminated_while_writing
sys.exit(main(["train", "mnist", "--data", {str(tiny_mnist_dir)!r}, "--out", {str(out)!r}, "--no-progress",
               "--epochs", "1", "--no-plots"]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "metrics.json").read_text())["completed"]


def test_a_second_sigterm_during_the_cleanup_is_ignored():
    import signal

    from pyfastnn.command import Terminated, terminate_on_sigterm

    with pytest.raises(Terminated), terminate_on_sigterm():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause() if hasattr(signal, "pause") else None  # the handler raises before this returns
        finally:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # another one now changes nothing
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_sigterm_as_the_command_ends_keeps_its_status_without_a_traceback(capsys, monkeypatch):
    """torchrun stops the other ranks once one fails: the SIGTERM can land while the handler is being
    removed, after the command has printed its error and returned."""
    import contextlib

    from pyfastnn import cli as cli_module
    from pyfastnn.command import Terminated

    @contextlib.contextmanager
    def signalled_on_exit():
        yield
        raise Terminated()

    monkeypatch.setattr(cli_module, "terminate_on_sigterm", signalled_on_exit)
    monkeypatch.setattr(cli_module, "_main", lambda argv: 1)
    assert cli_module.main(["info"]) == 1
    assert capsys.readouterr().err == ""


def test_sigterm_handler_is_only_installed_while_the_command_runs(capsys):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert cli(capsys, "info", "--json")[0] == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_every_commands_help_ends_with_examples_its_parser_takes(capsys):
    """The examples under --help are whole command lines, and each one parses (DIR a folder)."""
    import shlex

    from pyfastnn.command import command_parser
    from pyfastnn.lesson.train import add_arguments

    examples = {}
    for command in ("info", "bench", "train", "demo"):
        status, stdout, _ = cli(capsys, command, "--help")
        assert status == 0 and "\nexamples:\n" in stdout, command
        examples[command] = [line.strip() for line in stdout.split("\nexamples:\n")[1].splitlines() if line.strip()]
        assert all(f"pyfastnn {command}" in line for line in examples[command]), examples[command]
    parser = command_parser("pyfastnn train")
    add_arguments(parser)
    for line in examples["train"]:
        words = shlex.split(line.split("#")[0])
        args = parser.parse_args(words[words.index("train") + 1:])
        assert args.data == "DIR", line


def test_train_help_shows_the_defaults(capsys):
    status, stdout, _ = cli(capsys, "train", "--help")
    assert status == 0
    for shown in ("(default: 5)", "(default: 64)", "(default: 0.001)", "(default: 0.2)", "(default: fused)",
                  "(default: cpu)", "(default: runs/mnist; with --resume of a run's own checkpoint.pt, that run's folder)"):
        assert shown in " ".join(stdout.split()), shown


def test_pictures_leave_the_users_matplotlib_backend_as_it_was(tmp_path):
    import matplotlib

    from pyfastnn.lesson.plots import plot_loss, plot_training_curves

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # as a notebook or a GUI session would have chosen its own
    try:
        plot_loss([1.0, 0.5], tmp_path / "loss.png")
        history = [{"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.0 / e, "train_accuracy": 0.5,
                    "test_accuracy": 0.5} for e in (1, 2)]
        plot_training_curves(history, tmp_path / "curves.svg")
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (tmp_path / "curves.svg").read_bytes()[:1000]
    finally:
        matplotlib.use(before)


def test_picture_arguments_are_checked(tmp_path):
    from pyfastnn.lesson.plots import plot_activations, plot_predictions

    with pytest.raises(ValueError, match="columns must be >= 1, got 0"):
        plot_predictions(torch.zeros(2, 28, 28), torch.zeros(2), torch.zeros(2), tmp_path / "p.png", columns=0)
    with pytest.raises(ValueError, match="needs at least one activation name"):
        plot_activations(tmp_path / "a.png", names=())
    plot_activations(tmp_path / "a.png", names="relu")  # one name, not its letters
    with pytest.raises(NotADirectoryError, match="folder for picture .*a.png is a file, not a folder"):
        plot_activations(tmp_path / "a.png" / "b.png", names="relu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


@pytest.fixture
def drawn_figures(monkeypatch):
    """The matplotlib figures the pictures are made of, as they are saved: what they show is read
    from their lines and texts."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: (figures.append(fig), save(fig, *args,
                                                                                                   **kwargs))[1])
    return figures


def test_the_pictures_draw_what_they_name(tmp_path, drawn_figures):
    from pyfastnn.lesson.plots import PLOTTED_NEGATIVE_SLOPE, plot_activations, plot_predictions, plot_training_curves
    from pyfastnn.testing import REFERENCE_ACTIVATIONS

    history = [{"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.5 / e, "train_accuracy": 0.5 + e / 10,
                "test_accuracy": 0.4 + e / 20} for e in (1, 2, 3)]
    plot_training_curves(history, tmp_path / "curves.png")
    (loss_ax, accuracy_ax), = [fig.axes for fig in drawn_figures]
    for ax, quantity in ((loss_ax, "loss"), (accuracy_ax, "accuracy")):
        for line in ax.lines:
            assert list(line.get_xdata()) == [1, 2, 3]
            assert list(line.get_ydata()) == [h[f"{line.get_label()}_{quantity}"] for h in history], quantity
        assert sorted(line.get_label() for line in ax.lines) == ["test", "train"]
    with pytest.raises(ValueError, match="the history holds no epoch to plot"):
        plot_training_curves([], tmp_path / "none.png")

    names = ["sigmoid", "relu", "tanh", "leaky_relu", "gelu", "silu"]
    plot_activations(tmp_path / "activations.png", names)
    for ax, name in zip(drawn_figures[1].axes, names):
        (x, y), (_, dy) = [(torch.tensor(line.get_xdata()), torch.tensor(line.get_ydata())) for line in ax.lines]
        assert [line.get_label() for line in ax.lines] == [name, "derivative"]
        x = x.clone().requires_grad_()
        expected = REFERENCE_ACTIVATIONS[name](x, PLOTTED_NEGATIVE_SLOPE)
        (expected_dy,) = torch.autograd.grad(expected.sum(), x)
        torch.testing.assert_close(y, expected.detach(), msg=name)
        torch.testing.assert_close(dy, expected_dy, msg=name)

    plot_predictions(torch.rand(3, 28, 28), torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]), tmp_path / "p.png")
    captions = [(text.get_text(), text.get_color()) for text in drawn_figures[2].axes[0].texts]
    assert captions == [("\u2713 1", "green"), ("\u2713 2", "green"), ("\u2717 4 (true 3)", "red")]


def test_a_one_epoch_run_plots_whole_epochs_and_the_predictions_say_what_they_show(tmp_path):
    """A run of one epoch (every demo's) is drawn at epoch 1, not on an axis of fractions
    (0.95 ... 1.05); the grid of predictions is titled (its red tiles are picked mistakes)."""
    import matplotlib

    from pyfastnn.lesson.plots import plot_predictions, plot_training_curves

    history = [{"epoch": 1, "train_loss": 0.5, "test_loss": 0.25, "train_accuracy": 0.8, "test_accuracy": 0.9}]
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text kept as text in the SVG
        plot_training_curves(history, tmp_path / "curves.svg")
        plot_predictions(torch.zeros(3, 28, 28), torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]),
                         tmp_path / "predictions.svg", title="The first 2 test images, then 1 later one")
    curves = (tmp_path / "curves.svg").read_text()
    assert ">1<" in curves and "0.95" not in curves and "1.05" not in curves
    assert ">The first 2 test images, then 1 later one<" in (tmp_path / "predictions.svg").read_text()
