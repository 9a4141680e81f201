"""The lesson's MNIST classifier: pyfastnn vs the plain PyTorch model, side by side in one process.

    python benchmarks/bench_mnist.py [--quick] [--full-script --data DIR] [--json PATH]

1. Training step (zero_grad + forward + loss + backward + Adam step) at batch 64 and 256:
   pyfastnn's MNISTClassifier (one FusedMLP) with fused Adam, vs the lesson's eager model with the
   lesson's ``optim.Adam``, vs eager with torch's fused Adam, vs ``pyfastnn.fuse`` of the eager
   model with fused Adam, vs ``torch.compile`` of the eager model; and the floor no implementation
   can go below: the step's eight GEMMs plus torch's fused Adam kernel.
2. Inference latency at batch 1 and 64 (eval mode, no grad).
3. Activation memory of a training step: bytes autograd keeps for backward beyond parameters and
   input (exact, from saved-tensor hooks).
4. One epoch over in-memory batches (60,000 samples) per variant, alternating, median of 3.
5. ``--full-script``: the lesson's complete 5-epoch script (per-sample Dataset + DataLoader, eager
   model, optim.Adam) against ``pyfastnn train`` on the same data: wall time and test accuracy.
All times are medians of interleaved rounds; CPU, float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from pyfastnn import fuse
from pyfastnn.benchmark import _time_interleaved, saved_for_backward_bytes, train_step
from pyfastnn.data import MNIST_MEAN, MNIST_STD, find_mnist, load_mnist
from pyfastnn.info import info
from pyfastnn.models import MNISTClassifier
from pyfastnn.train import TrainConfig, make_adam, train

ROOT = Path(__file__).resolve().parents[1]


def _models():
    torch.manual_seed(0)
    fused = MNISTClassifier()
    return fused, fused.to_torch()


def _floor_step(batch):
    """The arithmetic no implementation of the step can skip: its eight GEMMs (3 forward; weight
    gradients of all 3 layers and input gradients of the top 2) and torch's fused Adam kernel."""
    sizes = (784, 256, 128, 10)
    x = torch.randn(batch, 784)
    weights = [torch.randn(n, k) for k, n in zip(sizes[:-1], sizes[1:])]
    acts = [x] + [torch.randn(batch, n) for n in sizes[1:]]
    params = [torch.nn.Parameter(w.clone()) for w in weights] + [torch.nn.Parameter(torch.zeros(n)) for n in sizes[1:]]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = make_adam(params, 1e-3)

    def step():
        for layer, w in enumerate(weights):
            torch.mm(acts[layer], w.t())
            torch.mm(acts[layer + 1].t(), acts[layer])
            if layer > 0:
                torch.mm(acts[layer + 1], w)
        optimizer.step()
    return step


def bench_steps(batch_sizes, rounds, target_s, with_compile, log):
    rows = []
    for batch in batch_sizes:
        x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
        fused, plain = _models()
        variants = {
            "pyfastnn": train_step(fused, make_adam(fused.parameters(), 1e-3), x, y),
            "eager": train_step(plain, torch.optim.Adam(plain.parameters(), lr=1e-3), x, y),
        }
        plain_fused_adam = _models()[1]
        variants["eager+fusedAdam"] = train_step(plain_fused_adam, make_adam(plain_fused_adam.parameters(), 1e-3), x, y)
        converted = fuse(_models()[1])
        variants["fuse(eager)"] = train_step(converted, make_adam(converted.parameters(), 1e-3), x, y)
        variants["GEMM+Adam floor"] = _floor_step(batch)
        if with_compile:
            plain_c = _models()[1]
            variants["compile"] = train_step(torch.compile(plain_c), torch.optim.Adam(plain_c.parameters(), lr=1e-3), x, y)
        times = _time_interleaved(variants, rounds, target_s)
        rows.append(_report(f"train step B={batch}", times, log))
    return rows


def bench_inference(batch_sizes, rounds, target_s, with_compile, log):
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, 784)
        fused, plain = _models()
        fused.eval(), plain.eval()
        variants = {"pyfastnn": lambda: fused(x), "eager": lambda: plain(x)}
        if with_compile:
            compiled = torch.compile(_models()[1].eval())
            variants["compile"] = lambda: compiled(x)
        with torch.no_grad():
            times = _time_interleaved(variants, rounds, target_s)
        rows.append(_report(f"inference B={batch}", times, log))
    return rows


def bench_memory(log, batch=64):
    fused, plain = _models()
    x = torch.randn(batch, 784)
    sizes = {"pyfastnn": saved_for_backward_bytes(fused, x), "eager": saved_for_backward_bytes(plain, x)}
    return _report(f"saved for backward B={batch}", {k: float(v) for k, v in sizes.items()}, log, unit="KiB",
                   scale=1 / 1024)


def bench_epoch(log, batch=64, n=60000, rounds=3):
    """One pass over n in-memory samples per variant (no data pipeline); the variants alternate,
    `rounds` epochs each, and each reports its median epoch."""
    x, y = torch.randn(n, 784), torch.randint(0, 10, (n,))
    fused, plain = _models()
    steps = {"pyfastnn": (fused, make_adam(fused.parameters(), 1e-3)),
             "eager": (plain, torch.optim.Adam(plain.parameters(), lr=1e-3))}
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (model, optimizer) in steps.items():
            start = time.perf_counter()
            for i in range(0, n, batch):
                train_step(model, optimizer, x[i:i + batch], y[i:i + batch])()
            samples[name].append(time.perf_counter() - start)
    times = {name: statistics.median(values) for name, values in samples.items()}
    return _report("epoch B=64 (60k samples)", times, log, unit="s", scale=1.0)


class _LessonDataset(torch.utils.data.Dataset):
    """The lesson's per-sample pipeline: ToTensor + Normalize on each item (without torchvision)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i].to(torch.float32).div(255).unsqueeze(0)  # ToTensor: 1x28x28 in [0, 1]
        return (image - MNIST_MEAN) / MNIST_STD, int(self.labels[i])


def lesson_script(data, epochs=5):
    """The lesson's MNIST script as written: DataLoader, eager model, optim.Adam(1e-3), batch 64."""
    torch.manual_seed(0)
    train_set = _LessonDataset(*load_mnist(data, train=True))
    test_set = _LessonDataset(*load_mnist(data, train=False))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=64)
    model = MNISTClassifier().to_torch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for images, targets in train_loader:
            optimizer.zero_grad()
            criterion(model(images), targets).backward()
            optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, targets in test_loader:
            correct += (model(images).argmax(1) == targets).sum().item()
    return correct / len(test_set)


def bench_full_script(data, log, epochs=5):
    start = time.perf_counter()
    lesson_accuracy = lesson_script(data, epochs)
    lesson_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = train(TrainConfig(data=str(data), epochs=epochs, out=None, progress=False, plots=False))
    ours_seconds = time.perf_counter() - start
    row = {"name": f"full {epochs}-epoch script", "lesson_s": lesson_seconds, "pyfastnn_s": ours_seconds,
           "speedup": lesson_seconds / ours_seconds, "lesson_accuracy": lesson_accuracy,
           "pyfastnn_accuracy": result.metrics["test_accuracy"]}
    log(f"{row['name']:>26}: lesson script {lesson_seconds:7.1f} s (acc {lesson_accuracy:.4f}) | "
        f"pyfastnn train {ours_seconds:7.1f} s (acc {row['pyfastnn_accuracy']:.4f}) | {row['speedup']:.2f}x")
    return row


def _report(name, times, log, unit="us", scale=1e6):
    row = {"name": name, **{f"{k}_{unit}": v * scale for k, v in times.items()}}
    base = times["pyfastnn"]
    row.update({f"speedup_vs_{k}": v / base for k, v in times.items() if k != "pyfastnn"})
    cells = " | ".join(f"{k} {v * scale:9.1f} {unit}" + ("" if k == "pyfastnn" else f" ({v / base:.2f}x)")
                       for k, v in times.items())
    log(f"{name:>26}: {cells}")
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="steps and inference only, no compile")
    parser.add_argument("--full-script", action="store_true", help="also the 5-epoch lesson script vs pyfastnn train")
    parser.add_argument("--data", help="MNIST folder for --full-script (default: $PYFASTNN_MNIST or ../shared/data/mnist)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    build = info()
    print(f"pyfastnn {build['pyfastnn']} | torch {build['torch']} | {build['threads']} threads | "
          f"(Nx) = that variant's time / pyfastnn's")
    results = bench_steps((64, 256), 5 if args.quick else 9, 0.05, not args.quick, print)
    results += bench_inference((1, 64), 5 if args.quick else 9, 0.02, not args.quick, print)
    results.append(bench_memory(print))
    if not args.quick:
        results.append(bench_epoch(print))
    if args.full_script:
        data = find_mnist(args.data) or find_mnist(str(ROOT.parent / "shared" / "data" / "mnist"))
        if data is None:
            parser.error("--full-script needs MNIST (--data DIR)")
        results.append(bench_full_script(data, print, args.epochs))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": build, "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
