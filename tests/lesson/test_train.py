"""The training command: files it writes, resume, backends agreeing, DDP under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyfastnn.lesson.models import MNISTClassifier
from pyfastnn.lesson.train import TrainConfig, evaluate, train

ROOT = Path(__file__).resolve().parents[2]


def test_train_cli_writes_metrics_checkpoint_and_plots(tmp_path, mnist_dir):
    out = tmp_path / "run"
    # The pictures are files, drawn with Agg whatever MPLBACKEND names (an unknown name there would
    # stop `import matplotlib` itself).
    env = {**os.environ, "MPLBACKEND": "no-such-backend"}
    result = subprocess.run(
        [sys.executable, "-m", "pyfastnn", "train", "mnist", "--data", str(mnist_dir), "--epochs", "1",
         "--max-steps", "60", "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.8 < metrics["test_accuracy"] <= 1.0 and metrics["completed"] is True and metrics["checkpoint_epoch"] == 1
    assert metrics["history"][0]["steps"] == 60
    assert metrics["train_seconds"] == metrics["history"][0]["seconds"] > 0
    assert 0.3 < metrics["history"][0]["train_accuracy"] <= 1.0 and 0 < metrics["history"][0]["train_loss"] < 2.3
    assert metrics["dataset"] == "mnist" and metrics["device"] == "cpu" and metrics["world_size"] == 1
    for name in ("checkpoint.pt", "curves.png", "predictions.png"):
        assert (out / name).stat().st_size > 0, name
    assert "epoch 1" in result.stdout + result.stderr


def test_resume_continues_from_checkpoint(tmp_path, mnist_dir):
    common = dict(data=str(mnist_dir), max_steps=20, progress=False, plots=False)
    straight = train(TrainConfig(epochs=2, out=str(tmp_path / "a"), **common))
    train(TrainConfig(epochs=1, out=str(tmp_path / "b"), **common))
    resumed = train(TrainConfig(epochs=2, out=str(tmp_path / "c"), resume=str(tmp_path / "b" / "checkpoint.pt"),
                                **common))
    assert [h["epoch"] for h in resumed.metrics["history"]] == [1, 2]
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)


def test_the_lessons_five_epochs_reach_its_accuracy_on_the_cpu(mnist_dir):
    """The lesson's run with its settings (784-256-128-10, dropout 0.2, Adam 1e-3, batch 64, 5
    epochs), from seed 0 (benchmarks/RESULTS.md: 97.77-98.10 % over seeds 0-2, either backend)."""
    result = train(TrainConfig(data=str(mnist_dir), out=None, progress=False, plots=False))
    assert len(result.metrics["history"]) == 5 and result.metrics["test_accuracy"] >= 0.975


def test_the_exercises_train_other_architectures_and_activations_and_resume_only_as_such(tmp_path, tiny_mnist_dir):
    """The lesson's exercises: another architecture (a funnel) and another activation, on both
    backends, recorded with the run, and a checkpoint continues only as the network it holds."""
    from pyfastnn.lesson.checkpoint import CheckpointError

    common = dict(data=str(tiny_mnist_dir), epochs=1, max_steps=2, dropout=0.0, progress=False, plots=False)
    funnel = dict(hidden_sizes=(32, 16), activation="gelu")
    fused = train(TrainConfig(out=str(tmp_path / "run"), **funnel, **common))
    plain = train(TrainConfig(out=None, backend="torch", **funnel, **common))
    assert [tuple(p.shape) for p in fused.model.parameters()] == [(32, 784), (32,), (16, 32), (16,), (10, 16), (10,)]
    assert [type(m).__name__ for m in plain.model.layers] == ["Linear", "GELU", "Dropout"] * 2 + ["Linear"]
    for a, b in zip(fused.metrics["history"], plain.metrics["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]
    assert saved["hidden_sizes"] == [32, 16] and saved["activation"] == "gelu"
    resume = dict(out=str(tmp_path / "run"), resume=str(tmp_path / "run" / "checkpoint.pt"), **{**common, "epochs": 2})
    with pytest.raises(CheckpointError, match=r"hidden_sizes \(32, 16\) \(asked: \(256, 128\)\), "
                                              r"activation 'gelu' \(asked: 'relu'\)"):
        train(TrainConfig(**resume))
    resumed = train(TrainConfig(hidden_sizes=[32, 16], activation="gelu", **resume))  # a list names them too
    assert [h["epoch"] for h in resumed.metrics["history"]] == [1, 2]
    # A checkpoint from before these settings were recorded trained 784-256-128-10 with relu.
    train(TrainConfig(out=str(tmp_path / "old"), **common))
    checkpoint = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)
    del checkpoint["config"]["hidden_sizes"], checkpoint["config"]["activation"]
    torch.save(checkpoint, tmp_path / "old.pt")
    old = dict(resume=str(tmp_path / "old.pt"), out=None, **{**common, "epochs": 2})
    with pytest.raises(CheckpointError, match=r"activation 'relu' \(asked: 'sigmoid'\)"):
        train(TrainConfig(activation="sigmoid", **old))
    assert [h["epoch"] for h in train(TrainConfig(**old)).metrics["history"]] == [1, 2]


def test_fused_and_torch_backends_agree(mnist_dir):
    common = dict(data=str(mnist_dir), epochs=1, max_steps=100, dropout=0.0, out=None, progress=False, plots=False)
    fused = train(TrainConfig(backend="fused", **common))
    plain = train(TrainConfig(backend="torch", **common))
    assert abs(fused.metrics["test_accuracy"] - plain.metrics["test_accuracy"]) < 0.003
    assert abs(fused.metrics["history"][0]["train_loss"] - plain.metrics["history"][0]["train_loss"]) < 1e-3


def test_ddp_two_processes_match_one_process_on_the_global_batch(tmp_path, mnist_dir, torch_threads):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "lesson" / "ddp_worker.py"), str(tmp_path), str(mnist_dir)],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # One thread like each rank: the GEMMs round differently with another thread count, and Adam's
    # first steps turn any rounding of a near-zero gradient into a step of up to lr.
    torch_threads(1)
    single_run = train(TrainConfig(data=str(mnist_dir), epochs=1, batch_size=64, max_steps=3, dropout=0.0,
                                   out=None, progress=False, plots=False))
    single = single_run.model.state_dict()
    # The epoch's train loss and accuracy are over every rank's shard: the global batch's, like one process.
    for rank in (0, 1):
        (epoch,) = torch.load(tmp_path / f"history{rank}.pt")
        (expected,) = single_run.metrics["history"]
        # Within one sample: the allreduce's rounding may flip a near-tie argmax.
        assert epoch["train_accuracy"] == pytest.approx(expected["train_accuracy"], abs=1.01 / (3 * 64)), rank
        assert epoch["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5), rank
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
        # The allreduce sums the two half-batch gradients in another order than one process does;
        # Adam's g / sqrt(v) turns that rounding into up to ~1e-6 for near-zero gradients.
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-5, msg=name)


def test_train_uses_a_process_group_its_caller_set_up(tmp_path, tiny_mnist_dir):
    """Processes that joined a group themselves (torch.multiprocessing.spawn, no torchrun variables)
    train across it: each trained alone on the whole data, all as rank 0 into one folder."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    workers = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "lesson" / "ddp_worker.py"), str(tmp_path),
                                 str(tiny_mnist_dir), "cpu", "caller_group", str(rank)],
                                stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert [torch.load(tmp_path / f"world_size{r}.pt") for r in (0, 1)] == [2, 2]
    for name in rank0:  # DDP kept the ranks' weights equal
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"


def test_a_callers_process_group_trains_on_the_gpu_named_or_current_and_nccl_refuses_the_cpu(tiny_mnist_dir,
                                                                                               monkeypatch):
    """Without torchrun's LOCAL_RANK, a caller that set up the group (mp.spawn) names each process's
    GPU (cuda:N) or makes it current; a group whose backend cannot reduce on the device is named."""
    import torch.distributed as dist

    import pyfastnn.lesson.train as train_module

    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    backend = "gloo"
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(train_module, "info", lambda: {"backends": {"cuda": True}})
    monkeypatch.setattr(train_module, "_run", lambda config, resumed, out, rank, world_size, device:
                        (rank, world_size, device))
    config = lambda device: TrainConfig(data=str(tiny_mnist_dir), out=None, progress=False, device=device)  # noqa: E731
    assert train(config("cuda:0")) == (1, 2, "cuda:0")  # the GPU the caller names
    assert train(config("cuda")) == (1, 2, "cuda:1")  # else the one it made current
    assert made_current == ["cuda:0", "cuda:1"]
    backend = "nccl"
    with pytest.raises(ValueError, match="'cpu': the run's process group uses nccl, which reduces CUDA tensors only"):
        train(config("cpu"))


def test_ddp_ranks_draw_their_own_dropout_masks_and_resume_exactly(tmp_path, mnist_dir):
    """Each rank draws its own masks (the same seed on every rank would give every shard the same
    masks), the weights stay equal across ranks, and a resumed run continues every rank's generator."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "lesson" / "ddp_worker.py"), str(tmp_path), str(mnist_dir), "cpu", "dropout_resume"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"dropout_resume{r}.pt") for r in (0, 1))
    assert not torch.equal(rank0["rng_state"], rank1["rng_state"])
    for name, value in rank0["whole"].items():
        assert torch.equal(value, rank1["whole"][name]), f"{name} differs between ranks"
        for rank in (rank0, rank1):
            assert torch.equal(rank["resumed"][name], value), f"{name}: the resumed run differs"


def test_device_and_graph_options_are_checked_before_any_work(mnist_dir):
    common = dict(data=str(mnist_dir), out=None, progress=False, plots=False)
    with pytest.raises(ValueError, match="must be cpu, cuda or cuda:N, got 'gpu'"):
        train(TrainConfig(device="gpu", **common))
    with pytest.raises(ValueError, match="must be cpu, cuda or cuda:N, got 'meta'"):
        train(TrainConfig(device="meta", **common))
    with pytest.raises(ValueError, match="cuda_graph needs --device cuda"):
        train(TrainConfig(cuda_graph=True, **common))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' is not available"):
            train(TrainConfig(device="cuda", **common))


def test_cpu_run_is_not_graphed_and_says_so(mnist_dir):
    result = train(TrainConfig(data=str(mnist_dir), epochs=1, max_steps=5, out=None, progress=False, plots=False))
    assert result.metrics["cuda_graph"] is False and result.metrics["config"]["cuda_graph"] is None


def test_resume_from_a_gpu_checkpoint_keeps_this_optimizers_flags(tmp_path, mnist_dir):
    # A checkpoint written by a graphed GPU run has capturable Adam groups; resumed on the CPU the
    # optimizer keeps its own (fused, not capturable) implementation and continues exactly.
    common = dict(data=str(mnist_dir), max_steps=20, progress=False, plots=False)
    straight = train(TrainConfig(epochs=2, out=str(tmp_path / "a"), **common))
    train(TrainConfig(epochs=1, out=str(tmp_path / "b"), **common))
    checkpoint = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    for group in checkpoint["optimizer"]["param_groups"]:
        group["capturable"] = True
    torch.save(checkpoint, tmp_path / "b" / "gpu.pt")
    resumed = train(TrainConfig(epochs=2, out=str(tmp_path / "c"), resume=str(tmp_path / "b" / "gpu.pt"), **common))
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_resume_with_moments_saved_in_another_layout_continues_exactly(tmp_path, tiny_mnist_dir):
    # Same values, other strides (a checkpoint converted by other code): fused Adam walks the moments
    # in the parameter's element order, so they are laid out as the parameter again on loading.
    common = dict(data=str(tiny_mnist_dir), batch_size=32, max_steps=3, progress=False, plots=False)
    straight = train(TrainConfig(epochs=2, out=str(tmp_path / "a"), **common))
    train(TrainConfig(epochs=1, out=str(tmp_path / "b"), **common))
    checkpoint = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for moments in checkpoint["optimizer"]["state"].values():
        for name in ("exp_avg", "exp_avg_sq"):
            if moments[name].dim() == 2:
                moments[name] = moments[name].t().contiguous().t()
    torch.save(checkpoint, tmp_path / "transposed.pt")
    resumed = train(TrainConfig(epochs=2, out=str(tmp_path / "c"), resume=str(tmp_path / "transposed.pt"), **common))
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_checkpoint_with_a_seed_beyond_32_bits_resumes_as_the_seed_torch_used(tmp_path, tiny_mnist_dir):
    # Seeds were taken up to 2**63 - 1 before; torch's generator trained such a run with the low 32 bits.
    common = dict(data=str(tiny_mnist_dir), batch_size=32, max_steps=3, progress=False, plots=False, seed=5)
    train(TrainConfig(epochs=1, out=str(tmp_path / "a"), **common))
    checkpoint = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    checkpoint["config"]["seed"] = 2 ** 32 + 5
    torch.save(checkpoint, tmp_path / "wide_seed.pt")
    resumed = train(TrainConfig(epochs=2, out=str(tmp_path / "b"), resume=str(tmp_path / "wide_seed.pt"), **common))
    assert [h["epoch"] for h in resumed.metrics["history"]] == [1, 2]


def test_evaluate_in_one_forward_matches_chunks():
    torch.manual_seed(0)
    model = MNISTClassifier()
    x, y = torch.randn(2500, 784), torch.randint(0, 10, (2500,))
    chunked, whole = evaluate(model, x, y, batch_size=1000), evaluate(model, x, y, batch_size=None)
    assert abs(chunked[0] - whole[0]) < 1e-5 and chunked[1] == whole[1] and torch.equal(chunked[2], whole[2])
    assert model.training  # left in the mode it was in
    # correct / total, as the lesson counts it: 0.9645, not float32's 0.9645000100135803 in metrics.json
    assert whole[1] == int((whole[2] == y).sum()) / 2500
    evaluate(model.eval(), x, y)
    assert not model.training


@pytest.mark.parametrize("batch_size,problem", [(0, "must be >= 1, got 0"), (-5, "must be >= 1, got -5"),
                                                (2.5, "must be an integer, got 2.5")])
def test_evaluate_refuses_a_batch_size_that_is_not_a_chunk_of_rows(batch_size, problem):
    model, x, y = MNISTClassifier(hidden_sizes=(8,)), torch.randn(10, 784), torch.randint(0, 10, (10,))
    with pytest.raises(ValueError, match=f"batch_size {problem}"):  # None is the one forward over all rows
        evaluate(model, x, y, batch_size=batch_size)


def test_max_steps_trains_that_many_steps(tmp_path, tiny_mnist_dir):
    out = tmp_path / "run"
    train(TrainConfig(data=str(tiny_mnist_dir), epochs=1, max_steps=1, batch_size=8, out=str(out), progress=False,
                      plots=False))
    state = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    assert {float(moments["step"]) for moments in state.values()} == {1.0}


# --- The files a run leaves: metrics.json says whether it completed; every file is replaced atomically ---

def _train_cli(*args):
    from pyfastnn.cli import main

    return main(["train", "mnist", "--no-progress", *args])


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_epochs_zero_writes_metrics_and_checkpoint(tmp_path, tiny_mnist_dir, capsys):
    out = tmp_path / "run"
    assert _train_cli("--data", str(tiny_mnist_dir), "--epochs", "0", "--out", str(out)) == 0
    metrics = _metrics(out)
    assert metrics["completed"] is True and metrics["history"] == [] and metrics["test_accuracy"] is None
    assert metrics["checkpoint_epoch"] == 0 and torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert not (out / "curves.png").exists()  # nothing to plot
    assert "no epoch trained" in capsys.readouterr().out


def test_the_data_folder_defaults_to_the_environments_as_the_demos_does(tmp_path, tiny_mnist_dir, monkeypatch, capsys):
    from pyfastnn.cli import main

    monkeypatch.setenv("PYFASTNN_MNIST", str(tiny_mnist_dir))
    assert _train_cli("--epochs", "0", "--out", str(tmp_path / "run")) == 0
    monkeypatch.setenv("PYFASTNN_MNIST", str(tmp_path / "elsewhere"))  # --data wins
    assert _train_cli("--data", str(tiny_mnist_dir), "--epochs", "0", "--out", str(tmp_path / "run2")) == 0
    capsys.readouterr()
    monkeypatch.setenv("PYFASTNN_MNIST", str(tmp_path))  # no MNIST there: named as the variable
    with pytest.raises(SystemExit) as usage:
        _train_cli("--epochs", "0")
    assert usage.value.code == 2 and f"$PYFASTNN_MNIST={tmp_path} holds no MNIST files" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mnist").symlink_to(tiny_mnist_dir)
    monkeypatch.setenv("PYFASTNN_MNIST", "~/mnist")  # expanded as --data's ~ is
    assert _train_cli("--epochs", "0", "--out", str(tmp_path / "run3")) == 0
    monkeypatch.setenv("PYFASTNN_MNIST", " ")  # blank: as if unset
    with pytest.raises(SystemExit) as usage:
        _train_cli("--epochs", "0")
    assert usage.value.code == 2 and "the following arguments are required: --data" in capsys.readouterr().err
    monkeypatch.setenv("PYFASTNN_MNIST", str(tiny_mnist_dir))
    for args in (["--epochs", "0"], ["--epochs", "0", "--download"]):  # another dataset: never read or written there
        with pytest.raises(SystemExit) as usage:
            main(["train", "fashion-mnist", "--no-progress", *args])
        assert usage.value.code == 2 and "the following arguments are required: --data" in capsys.readouterr().err
    monkeypatch.delenv("PYFASTNN_MNIST")
    with pytest.raises(SystemExit) as usage:
        _train_cli("--epochs", "0")
    assert usage.value.code == 2 and "required: --data (or $PYFASTNN_MNIST, the MNIST folder)" in capsys.readouterr().err


def test_resume_of_a_finished_run_trains_nothing_and_writes_its_files(tmp_path, tiny_mnist_dir, capsys):
    common = ["--data", str(tiny_mnist_dir), "--batch-size", "32", "--epochs", "2", "--no-plots"]
    assert _train_cli(*common, "--out", str(tmp_path / "a")) == 0
    finished = _metrics(tmp_path / "a")
    from pyfastnn.cli import main

    capsys.readouterr()
    assert main(["train", "mnist", *common, "--resume", str(tmp_path / "a" / "checkpoint.pt"),
                 "--out", str(tmp_path / "b")]) == 0
    assert "nothing to train: the checkpoint has 2 epoch(s) done, epochs is 2" in capsys.readouterr().out
    resumed = _metrics(tmp_path / "b")
    assert resumed["completed"] is True and resumed["history"] == finished["history"]
    before = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    after = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert after["epoch"] == 2
    for name, tensor in before["model"].items():
        assert torch.equal(tensor, after["model"][name]), name


def test_a_resume_that_trains_nothing_records_the_epochs_its_run_holds(tmp_path, tiny_mnist_dir, capsys):
    """Asked for fewer epochs than the checkpoint has done, nothing trains: the files it writes (in the
    run's own folder, or a new one) say as many epochs as their history holds, not the number asked."""
    common = ["--data", str(tiny_mnist_dir), "--batch-size", "32", "--max-steps", "1", "--no-plots"]
    run = tmp_path / "run"
    assert _train_cli(*common, "--epochs", "2", "--out", str(run)) == 0
    checkpoint = run / "checkpoint.pt"
    for asked, out in (("0", run), ("1", run), ("1", tmp_path / "elsewhere")):
        capsys.readouterr()
        assert _train_cli(*common, "--epochs", asked, "--resume", str(checkpoint), "--out", str(out)) == 0
        assert f"nothing to train: the checkpoint has 2 epoch(s) done, epochs is {asked}" in capsys.readouterr().out
        metrics, state = _metrics(out), torch.load(out / "checkpoint.pt", weights_only=True)
        assert len(metrics["history"]) == metrics["config"]["epochs"] == 2 and metrics["completed"] is True, asked
        assert state["epoch"] == state["config"]["epochs"] == 2, asked
        assert metrics["config"]["max_steps"] == state["config"]["max_steps"] == 1  # the rest as given


def test_resuming_a_finished_run_in_its_own_folder_keeps_its_pictures(tmp_path, tiny_mnist_dir):
    common = ["--data", str(tiny_mnist_dir), "--batch-size", "32", "--epochs", "1", "--max-steps", "2"]
    out = tmp_path / "a"
    assert _train_cli(*common, "--out", str(out)) == 0
    pictures = {name: (out / name).read_bytes() for name in ("curves.png", "predictions.png")}
    metrics = (out / "metrics.json").read_text()
    assert _train_cli(*common, "--no-plots", "--out", str(out), "--resume", str(out / "checkpoint.pt")) == 0
    assert {name: (out / name).read_bytes() for name in pictures} == pictures
    assert json.loads((out / "metrics.json").read_text())["history"] == json.loads(metrics)["history"]


@pytest.mark.parametrize("backend,old_keys", [("torch", ["1", "4", "7"]), ("fused", ["layers.0", "layers.2", "layers.4"])])
def test_checkpoints_of_the_earlier_key_layouts_resume(tmp_path, tiny_mnist_dir, backend, old_keys):
    # Written before the classifier took the lesson's keys everywhere: the plain twin was a bare
    # Sequential (Flatten first), and the fused model at dropout 0 had no Dropout indices.
    common = ["--data", str(tiny_mnist_dir), "--batch-size", "32", "--backend", backend, "--dropout", "0"]
    assert _train_cli(*common, "--epochs", "1", "--out", str(tmp_path / "a")) == 0
    checkpoint = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert [k.rsplit(".", 1)[0] for k in checkpoint["model"]][::2] == ["layers.0", "layers.3", "layers.6"]
    checkpoint["model"] = {f"{old}.{kind}": tensor for old, (kind, tensor) in
                           zip([k for k in old_keys for _ in (0, 1)],
                               [(k.rsplit(".", 1)[1], t) for k, t in checkpoint["model"].items()])}
    torch.save(checkpoint, tmp_path / "old.pt")
    assert _train_cli(*common, "--epochs", "2", "--out", str(tmp_path / "b"), "--resume", str(tmp_path / "old.pt")) == 0
    assert _metrics(tmp_path / "b")["completed"] is True


def test_a_folder_in_use_by_another_run_is_refused_before_any_work(tmp_path, tiny_mnist_dir, capsys):
    from pyfastnn.files import hold_folder

    out = tmp_path / "run"
    out.mkdir()
    with hold_folder(out):  # as another process's run would hold it, --overwrite or not
        assert _train_cli("--data", str(tiny_mnist_dir), "--out", str(out), "--overwrite") == 1
    assert capsys.readouterr().err.strip() == (f"pyfastnn train: error: output folder {out} is in use by another "
                                               f"run; wait for it to end or choose another folder")
    assert list(out.iterdir()) == []
    assert _train_cli("--data", str(tiny_mnist_dir), "--out", str(out), "--max-steps", "2", "--epochs", "1") == 0
    with hold_folder(out):  # the finished run let it go
        pass


def test_a_run_that_fails_before_its_first_file_leaves_no_folders_behind(tmp_path, capsys):
    assert _train_cli("--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "runs" / "a")) == 1
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_epoch_closes_its_progress_bar_before_the_message(tmp_path, tiny_mnist_dir, monkeypatch,
                                                                       capsys):
    import tqdm.auto

    class InterruptedAtTheThirdStep(tqdm.auto.tqdm):
        def update(self, n=1):
            if self.n == 2:
                raise KeyboardInterrupt
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", InterruptedAtTheThirdStep)
    from pyfastnn.cli import main

    assert main(["train", "mnist", "--data", str(tiny_mnist_dir), "--batch-size", "32", "--out",
                 str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "epoch 1/" in err and err.endswith("\npyfastnn train: interrupted\n")


def test_a_single_process_ignores_a_stray_rank_and_refuses_a_bad_world_size(tmp_path, tiny_mnist_dir, monkeypatch,
                                                                           capsys):
    import pyfastnn.lesson.train as train_module

    monkeypatch.setenv("LOCAL_RANK", "x")  # left in the shell: no run of several processes reads it
    train_module.check_device("cpu", "fused")
    monkeypatch.delenv("LOCAL_RANK")
    common = ["--data", str(tiny_mnist_dir), "--batch-size", "32", "--epochs", "1", "--no-plots"]
    for rank in ("", "1", "x"):  # left over in the shell: torchrun sets RANK together with WORLD_SIZE
        monkeypatch.setenv("RANK", rank)
        assert _train_cli(*common, "--out", str(tmp_path / f"rank{rank}")) == 0
        assert "test accuracy" in capsys.readouterr().out
    for world_size in ("", "abc", "0"):
        monkeypatch.setenv("WORLD_SIZE", world_size)
        assert _train_cli(*common, "--out", str(tmp_path / "bad")) != 0
        error = capsys.readouterr().err
        assert f"WORLD_SIZE (set by torchrun) must be a count of processes >= 1, got {world_size!r}" in error, error
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_a_process_waiting_for_the_others_of_its_run_says_so_and_stops_when_asked(tmp_path, tiny_mnist_dir, stop):
    """WORLD_SIZE left in the shell, or a process of the run stuck at startup: torch would wait 30
    minutes in native code, deaf to Ctrl-C and SIGTERM."""
    import select
    import signal
    import socket

    with socket.socket() as free:  # a port no process listens on, held (bound, not listening) to the end so
        free.bind(("127.0.0.1", 0))  # that no other test's process is given it meanwhile
        port = free.getsockname()[1]
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        program = ("import sys, pyfastnn.lesson.processes as p; p.RENDEZVOUS_NOTICE_S = 0.5; "
                   "from pyfastnn.cli import run; "
                   f"sys.argv = ['pyfastnn', 'train', 'mnist', '--data', {str(tiny_mnist_dir)!r}, '--out', "
                   f"{str(tmp_path / 'run')!r}]; run()")
        process = subprocess.Popen([sys.executable, "-c", program], stderr=subprocess.PIPE, text=True, env=env)
        try:
            ready, _, _ = select.select([process.stderr], [], [], 120)  # never torch's 30 minutes
            assert ready, "no notice within 120 s"
            notice = process.stderr.readline()
            waits = f"rank 1 waits for the other processes of the run at 127.0.0.1:{port} (WORLD_SIZE=2"
            assert waits in notice, notice
            process.send_signal(getattr(signal, stop))
            status = process.wait(timeout=30)
        finally:
            process.kill()
        assert status == (130 if stop == "SIGINT" else 143)
        assert process.stderr.read() == "pyfastnn train: interrupted\n"


def test_a_collective_broken_by_another_process_stopping_ends_in_one_line(tmp_path, tiny_mnist_dir, monkeypatch,
                                                                        capsys):
    import pyfastnn.lesson.train as train_module

    gloo = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
            "[127.0.0.1]:41708. This is typically caused by a remote worker crashing. See the logs.")

    def broken(*args, **kwargs):
        raise RuntimeError(gloo)

    monkeypatch.setattr(train_module, "join_run", lambda device: (1, 2, "cpu"))
    monkeypatch.setattr(train_module, "_run", broken)
    assert _train_cli("--data", str(tiny_mnist_dir), "--out", str(tmp_path / "run")) == 1
    assert capsys.readouterr().err == ("pyfastnn train: error: another process of the run stopped, so rank 1 stops "
                                       "too (Connection closed by peer [127.0.0.1]:41708)\n")
    monkeypatch.setattr(train_module, "join_run", lambda device: (0, 1, "cpu"))  # one process: not another's
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        train(TrainConfig(data=str(tiny_mnist_dir), out=None, progress=False))


def test_a_gpu_per_process_under_torchrun(monkeypatch):
    import pyfastnn.lesson.train as train_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(train_module, "info", lambda: {"backends": {"cuda": True}})
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    train_module.check_device("cuda", "fused")  # process 0 has its GPU
    train_module.check_device("cuda:0", "fused")  # and may name it
    with pytest.raises(ValueError, match=r"'cuda:1': under torchrun each process trains on cuda:\$LOCAL_RANK "
                                         r"\(here cuda:0; pass cuda\)"):
        train_module.check_device("cuda:1", "fused")  # would be replaced unsaid
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK 2: 2 CUDA device"):
        train_module.check_device("cuda", "fused")  # more processes than GPUs on the node


def test_a_join_interrupted_by_ctrl_c_is_waited_for_not_repeated(monkeypatch):
    """torch cannot cancel a join: a train() called again in the same interpreter (a notebook) waits
    for the one under way rather than joining a second time as the same rank."""
    import _thread
    import threading

    from pyfastnn.lesson import processes

    release, calls = threading.Event(), []

    def init_process_group(backend):
        calls.append(backend)
        release.wait(60)

    monkeypatch.setattr(processes, "RENDEZVOUS_NOTICE_S", 0.05)
    threading.Timer(0.3, _thread.interrupt_main).start()  # Ctrl-C while it waits
    with pytest.raises(KeyboardInterrupt):
        processes.join_process_group("gloo", 2, init_process_group)
    with pytest.raises(RuntimeError, match="an interrupted gloo join of this run's processes is still under way"):
        processes.join_process_group("nccl", 2, init_process_group)
    threading.Timer(0.3, release.set).start()
    processes.join_process_group("gloo", 2, init_process_group)
    assert calls == ["gloo"]


def test_more_processes_than_training_samples_are_refused_before_the_folder_is_touched(tmp_path, tiny_mnist_dir,
                                                                                       monkeypatch, capsys):
    import pyfastnn.lesson.train as train_module

    out = tmp_path / "run"
    common = ["--data", str(tiny_mnist_dir), "--batch-size", "32", "--out", str(out), "--epochs", "1"]
    assert _train_cli(*common) == 0  # a previous, finished run in the same folder
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    # Rank 0 of 97 processes, as torchrun would start them, for the 96 training images.
    monkeypatch.setattr(train_module, "join_run", lambda device: (0, 97, "cpu"))
    assert _train_cli(*common, "--overwrite") == 1
    assert "96 samples cannot be shared among 97 processes" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # metrics.json and pictures as they were


def test_interrupted_run_leaves_its_folder_marked_incomplete(tmp_path, tiny_mnist_dir, monkeypatch, capsys):
    import pyfastnn.lesson.train as train_module

    out = tmp_path / "run"
    common = ["--data", str(tiny_mnist_dir), "--batch-size", "32", "--out", str(out)]
    assert _train_cli(*common, "--epochs", "1") == 0  # a previous, finished run in the same folder
    assert _metrics(out)["completed"] is True and (out / "curves.png").exists()

    saves = []
    real_save = train_module.save_checkpoint

    def save_then_interrupt(*args, **kwargs):  # Ctrl-C during the second epoch
        if saves:
            raise KeyboardInterrupt
        saves.append(args)
        real_save(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_interrupt)
    assert _train_cli(*common, "--epochs", "3", "--seed", "1", "--overwrite") == 130
    assert capsys.readouterr().err.strip().endswith("pyfastnn train: interrupted")
    metrics = _metrics(out)
    assert metrics["completed"] is False and metrics["config"]["epochs"] == 3 and metrics["config"]["seed"] == 1
    # The second epoch was trained and evaluated, its checkpoint never written: metrics.json says both.
    assert [h["epoch"] for h in metrics["history"]] == [1, 2] and metrics["checkpoint_epoch"] == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (out / "curves.png").exists()  # the previous run's pictures are gone, not passed off as this run's
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json"]  # no temporary files

    def interrupt_after_saving(*args, **kwargs):  # Ctrl-C between the checkpoint and metrics.json
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", interrupt_after_saving)
    assert _train_cli(*common, "--epochs", "3", "--overwrite") == 130
    metrics = _metrics(out)
    assert metrics["checkpoint_epoch"] == torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert [h["epoch"] for h in metrics["history"]] == [1] and metrics["completed"] is False


def test_failed_writes_leave_the_previous_files_whole(tmp_path, tiny_mnist_dir, monkeypatch, capsys):
    out = tmp_path / "run"
    common = ["--data", str(tiny_mnist_dir), "--batch-size", "32", "--out", str(out), "--epochs", "1"]
    assert _train_cli(*common) == 0
    common.append("--overwrite")  # the runs below replace that one
    checkpoint = (out / "checkpoint.pt").read_bytes()
    real_fsync = os.fsync

    def disk_full(descriptor):  # the checkpoint's bytes were written, but the disk is full
        if "checkpoint.pt" in os.readlink(f"/proc/self/fd/{descriptor}"):
            raise OSError(28, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", disk_full)
    assert _train_cli(*common, "--seed", "1") == 1
    assert capsys.readouterr().err.strip() == f"pyfastnn train: error: {out / 'checkpoint.pt'}: No space left on device"
    assert (out / "checkpoint.pt").read_bytes() == checkpoint  # the old checkpoint, whole
    assert _metrics(out)["completed"] is False

    disk_is_full = []

    def disk_fills_at_the_checkpoint(descriptor):  # metrics.json, written next, fails too
        if disk_is_full or "checkpoint.pt" in os.readlink(f"/proc/self/fd/{descriptor}"):
            disk_is_full.append(descriptor)
            raise OSError(28, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", disk_fills_at_the_checkpoint)
    assert _train_cli(*common, "--seed", "2") == 1
    assert len(disk_is_full) == 2  # the error reported is the first one, the checkpoint's
    assert capsys.readouterr().err.strip() == f"pyfastnn train: error: {out / 'checkpoint.pt'}: No space left on device"
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    monkeypatch.setattr(os, "fsync", real_fsync)

    from matplotlib.figure import Figure

    assert _train_cli(*common) == 0
    picture = (out / "curves.png").read_bytes()

    def broken_savefig(self, f, *args, **kwargs):
        (open(f, "wb") if isinstance(f, (str, os.PathLike)) else f).write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    from pyfastnn.lesson.plots import plot_loss

    with pytest.raises(OSError, match="No space"):
        plot_loss([1.0, 0.5], out / "curves.png")
    assert (out / "curves.png").read_bytes() == picture
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_config_checks_for_library_users(tiny_mnist_dir):
    from pyfastnn.command import InvalidArgument

    common = dict(data=str(tiny_mnist_dir), out=None, progress=False, plots=False)
    for bad in (dict(lr=0.0), dict(batch_size=0), dict(epochs=1.5), dict(dropout=1.0), dict(device="tpu"),
                dict(backend="jax"), dict(dataset="cifar"), dict(data=None), dict(max_steps=0),
                dict(hidden_sizes=()), dict(hidden_sizes=(256, 0)), dict(hidden_sizes=(2.5,)),
                dict(hidden_sizes="256,64"), dict(hidden_sizes=(2 ** 31,)), dict(activation="softmax"),
                dict(activation=None)):
        with pytest.raises(InvalidArgument):
            train(TrainConfig(**{**common, **bad}))



@pytest.mark.parametrize("flag, flush", [((), True), (("--no-flush-denormals",), False)])
def test_cpu_training_flushes_denormals_unless_asked_not_to_and_restores_the_mode(
        tmp_path, tiny_mnist_dir, monkeypatch, flag, flush):
    from pyfastnn.lesson import train as train_module

    def calling_thread_flushes() -> bool:
        return bool(torch.tensor(1e-30) * 1e-10 == 0)  # 1e-40 is denormal in float32

    modes = []  # the calling thread's mode at every forward
    build_model = train_module.build_model

    def recording_build_model(config):
        model = build_model(config)
        model.register_forward_pre_hook(lambda module, args: modes.append(calling_thread_flushes()))
        return model

    monkeypatch.setattr(train_module, "build_model", recording_build_model)
    out = tmp_path / "run"
    assert _train_cli("--data", str(tiny_mnist_dir), "--epochs", "1", "--max-steps", "3", "--no-plots",
                      "--out", str(out), *flag) == 0
    assert modes and set(modes) == {flush}  # training steps and evaluation alike
    assert _metrics(out)["config"]["flush_denormals"] is flush
    assert not calling_thread_flushes()


def test_settings_of_other_types_are_taken_as_plain_values(tmp_path, tiny_mnist_dir):
    """A Path out, a torch.device and numpy numbers are what the user means, not a late crash."""
    import numpy as np

    for lr in (np.float32(1e-3), np.float64(1e-3)):  # float64 subclasses float: converted all the same
        out = tmp_path / f"run_{type(lr).__name__}"
        result = train(TrainConfig(data=tiny_mnist_dir, out=out, device=torch.device("cpu"), lr=lr,
                                   batch_size=np.int64(32), epochs=1, max_steps=1, plots=np.bool_(False),
                                   progress=False, hidden_sizes=(np.int64(32), 16)))
        saved = json.loads((out / "metrics.json").read_text())["config"]
        assert saved["out"] == str(out) and saved["device"] == "cpu" and saved["batch_size"] == 32
        assert saved["hidden_sizes"] == [32, 16]
        assert saved["lr"] == pytest.approx(1e-3) and result.metrics["completed"]
        # The checkpoint holds plain numbers: read back with weights_only, it resumes.
        train(TrainConfig(data=str(tiny_mnist_dir), out=str(out), resume=str(out / "checkpoint.pt"), epochs=2,
                          max_steps=1, plots=False, progress=False, lr=float(lr), batch_size=32, hidden_sizes=(32, 16)))


def test_numpy_strings_are_stored_as_plain_text(tmp_path, tiny_mnist_dir):
    import numpy as np

    out = tmp_path / "run"
    train(TrainConfig(data=np.str_(tiny_mnist_dir), dataset=np.str_("mnist"), backend=np.str_("fused"),
                      device=np.str_("cpu"), out=np.str_(out), epochs=1, max_steps=1, plots=False, progress=False))
    train(TrainConfig(data=str(tiny_mnist_dir), out=str(out), resume=str(out / "checkpoint.pt"), epochs=2,
                      max_steps=1, plots=False, progress=False))  # read back with weights_only


@pytest.mark.parametrize("name", ["progress", "summaries", "plots", "download", "flush_denormals", "overwrite"])
def test_flag_settings_must_be_bools_before_any_work(name, tiny_mnist_dir):
    with pytest.raises(ValueError, match=f"{name} must be True or False, got 0"):
        train(TrainConfig(data=str(tiny_mnist_dir), out=None, **{name: 0}))


def test_summaries_false_prints_nothing(tmp_path, tiny_mnist_dir, capsys):
    train(TrainConfig(data=str(tiny_mnist_dir), epochs=1, max_steps=1, out=None, plots=False, progress=False,
                      summaries=False))
    assert capsys.readouterr().out == ""


def test_no_progress_hides_only_the_bar(tmp_path, tiny_mnist_dir, capsys):
    common = dict(data=str(tiny_mnist_dir), max_steps=1, plots=False, progress=False)
    train(TrainConfig(epochs=1, out=str(tmp_path / "run"), **common))
    assert capsys.readouterr().out.startswith("epoch 1: train loss ")
    train(TrainConfig(epochs=1, out=str(tmp_path / "run"), resume=str(tmp_path / "run" / "checkpoint.pt"), **common))
    assert "nothing to train: the checkpoint has 1 epoch(s) done" in capsys.readouterr().out


def test_a_home_folder_in_the_settings_paths_is_expanded(monkeypatch, tmp_path):
    import numpy as np

    from pyfastnn.lesson.train import plain_settings

    monkeypatch.setenv("HOME", str(tmp_path))  # a folder literally named "~" would be made in the working folder
    config = plain_settings(TrainConfig(data="~/mnist", out=Path("~/runs"), resume=np.str_("~/runs/checkpoint.pt")))
    assert config.out == str(tmp_path / "runs") and type(config.out) is str
    assert config.resume == str(tmp_path / "runs" / "checkpoint.pt") and type(config.resume) is str


def test_each_epoch_shuffles_anew_from_the_runs_seed(tmp_path, tiny_mnist_dir, monkeypatch):
    """As the lesson's DataLoader(shuffle=True): every epoch its own order, drawn from the run's seed."""
    import pyfastnn.lesson.train as train_module

    orders = []

    class RecordingBatches(train_module.Batches):
        def batch_indices(self):
            order = []
            orders.append(order)
            for index in super().batch_indices():
                order.extend(index.tolist())
                yield index

    monkeypatch.setattr(train_module, "Batches", RecordingBatches)

    def epoch_orders(seed, name):
        orders.clear()
        train(TrainConfig(data=str(tiny_mnist_dir), epochs=2, max_steps=3, seed=seed, out=str(tmp_path / name),
                          progress=False, plots=False))
        return [list(order) for order in orders]

    first, again, other = epoch_orders(0, "a"), epoch_orders(0, "b"), epoch_orders(1, "c")
    assert len(first) == 2 and len(first[0]) == len(first[1]) > TrainConfig.batch_size
    assert first[0] != first[1] and first == again and other[0] != first[0]
