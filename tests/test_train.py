"""The training command: files it writes, resume, backends agreeing, DDP under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyfastnn.models import MNISTClassifier
from pyfastnn.train import TrainConfig, evaluate, train

ROOT = Path(__file__).resolve().parents[1]


def test_train_cli_writes_metrics_checkpoint_and_plots(tmp_path, mnist_dir):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "pyfastnn", "train", "mnist", "--data", str(mnist_dir), "--epochs", "1",
         "--max-steps", "60", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.8 < metrics["test_accuracy"] <= 1.0
    assert metrics["history"][0]["steps"] == 60
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


def test_fused_and_torch_backends_agree(mnist_dir):
    common = dict(data=str(mnist_dir), epochs=1, max_steps=100, dropout=0.0, out=None, progress=False, plots=False)
    fused = train(TrainConfig(backend="fused", **common))
    plain = train(TrainConfig(backend="torch", **common))
    assert abs(fused.metrics["test_accuracy"] - plain.metrics["test_accuracy"]) < 0.003
    assert abs(fused.metrics["history"][0]["train_loss"] - plain.metrics["history"][0]["train_loss"]) < 1e-3


def test_ddp_two_processes_match_one_process_on_the_global_batch(tmp_path, mnist_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path), str(mnist_dir)],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = train(TrainConfig(data=str(mnist_dir), epochs=1, batch_size=64, max_steps=3, dropout=0.0, out=None,
                               progress=False, plots=False)).model.state_dict()
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
        # The allreduce sums the two half-batch gradients in another order than one process does;
        # Adam's g / sqrt(v) turns that rounding into up to ~1e-6 for near-zero gradients.
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-5, msg=name)


def test_device_and_graph_options_are_checked_before_any_work(mnist_dir):
    common = dict(data=str(mnist_dir), out=None, progress=False, plots=False)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        train(TrainConfig(device="gpu", **common))
    with pytest.raises(ValueError, match="device must be cpu or cuda, got 'meta'"):
        train(TrainConfig(device="meta", **common))
    with pytest.raises(ValueError, match="--cuda-graph needs --device cuda"):
        train(TrainConfig(cuda_graph=True, **common))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"torch.cuda.is_available\(\) is False"):
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


def test_evaluate_in_one_forward_matches_chunks():
    torch.manual_seed(0)
    model = MNISTClassifier()
    x, y = torch.randn(2500, 784), torch.randint(0, 10, (2500,))
    chunked, whole = evaluate(model, x, y, batch_size=1000), evaluate(model, x, y, batch_size=None)
    assert abs(chunked[0] - whole[0]) < 1e-5 and chunked[1] == whole[1] and torch.equal(chunked[2], whole[2])
    assert model.training  # left in the mode it was in
