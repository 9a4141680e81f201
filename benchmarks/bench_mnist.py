"""The lesson's MNIST classifier: pyfastnn vs the plain PyTorch model, side by side in one process.

    python benchmarks/bench_mnist.py [--quick] [--full-script --data DIR] [--json PATH]
    python benchmarks/bench_mnist.py --device cuda [--quick] [--data DIR] [--json PATH]
    python benchmarks/bench_mnist.py --device cuda --profile [--json PATH]

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
6. ``--whole-process N``: the same two as fresh processes, from interpreter start to exit (imports,
   data loading, training, evaluation and, for ``pyfastnn train``, checkpoints, metrics.json and
   pictures), alternating, N rounds, medians.
All times are medians of interleaved rounds; CPU, float32.

With ``--device cuda``: the training step at batch 64 and 8192 of the lesson's model (dropout 0.2)
eager (nn.Sequential, fused Adam), eager+graph, FusedMLP, FusedMLP+graph (``pyfastnn.cuda_graph_step``
with capturable fused Adam), each timed between device synchronizations; then (with MNIST found)
the 5-epoch ``pyfastnn train --device cuda`` with and without the graph, and the lesson's script on
the GPU (DataLoader, batches copied to the device as the lesson does). ``--profile`` instead lists
the kernels of the FusedMLP and eager steps at batches 64 and 8192 with their device time (a graph
replays the same kernels without the launch gaps between them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import torch.nn.functional as F

from pyfastnn import cuda_graph_step, fuse
from pyfastnn.benchmark import (cuda_kernels, format_kernels, results_record, run_benchmark, saved_for_backward_bytes,
                                time_interleaved, train_step, write_results)
from pyfastnn.command import command_parser, output_file_argument, path_argument, positive_int
from pyfastnn.lesson.data import MNIST_MEAN, MNIST_STD, find_mnist, load_mnist
from pyfastnn.info import info
from pyfastnn.lesson.models import MNISTClassifier
from pyfastnn.lesson.train import TrainConfig, make_adam, train

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
        times = time_interleaved(variants, rounds, target_s)
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
            times = time_interleaved(variants, rounds, target_s)
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


def lesson_script(data, epochs=5, device="cpu"):
    """The lesson's MNIST script as written: DataLoader, eager model, optim.Adam(1e-3), batch 64,
    each batch moved to ``device``."""
    torch.manual_seed(0)
    train_set = _LessonDataset(*load_mnist(data, train=True))
    test_set = _LessonDataset(*load_mnist(data, train=False))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=64)
    model = MNISTClassifier().to_torch().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for images, targets in train_loader:
            images, targets = images.to(device), targets.to(device)
            optimizer.zero_grad()
            criterion(model(images), targets).backward()
            optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, targets in test_loader:
            images, targets = images.to(device), targets.to(device)
            correct += (model(images).argmax(1) == targets).sum().item()
    return correct / len(test_set)


def bench_full_script(data, log, epochs=5):
    start = time.perf_counter()
    lesson_accuracy = lesson_script(data, epochs)
    lesson_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = train(TrainConfig(data=str(data), epochs=epochs, out=None, progress=False, summaries=False,
                               plots=False))
    ours_seconds = time.perf_counter() - start
    row = {"name": f"full {epochs}-epoch script", "lesson_s": lesson_seconds, "pyfastnn_s": ours_seconds,
           "speedup": lesson_seconds / ours_seconds, "lesson_accuracy": lesson_accuracy,
           "pyfastnn_accuracy": result.metrics["test_accuracy"]}
    log(f"{row['name']:>26}: lesson script {lesson_seconds:7.1f} s (acc {lesson_accuracy:.4f}) | "
        f"pyfastnn train {ours_seconds:7.1f} s (acc {row['pyfastnn_accuracy']:.4f}) | {row['speedup']:.2f}x")
    return row


def _time_cuda(fns, rounds, iters):
    """Median seconds per call of each fn: `iters` calls between two device synchronizations, in
    interleaved rounds (after a warm-up that also lets the graphed steps capture)."""
    for fn in fns.values():
        for _ in range(5):
            fn()
    torch.cuda.synchronize()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_cuda_steps(batch_sizes, rounds, iters, log):
    """The lesson's model (dropout 0.2) on the GPU: eager and FusedMLP steps, each also as one graph."""
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, 784, device="cuda")
        y = torch.randint(0, 10, (batch,), device="cuda")
        variants = {}
        for name, make in (("FusedMLP", lambda: _models()[0]), ("eager", lambda: _models()[1])):
            model = make().cuda()
            variants[name] = train_step(model, make_adam(model.parameters(), 1e-3), x, y)
            graphed = make().cuda()
            step = cuda_graph_step(graphed, F.cross_entropy, make_adam(graphed.parameters(), 1e-3, capturable=True),
                                   (x, y))
            variants[f"{name}+graph"] = step.replay
        times = _time_cuda(variants, rounds, iters)
        times = {"FusedMLP+graph": times.pop("FusedMLP+graph"), **times}  # the ratios are against it
        rows.append(_report(f"cuda train step B={batch}", times, log, base_name="FusedMLP+graph"))
    return rows


def profile_cuda_steps(batch, log):
    """The kernels of one FusedMLP and one eager training step of the lesson's model (dropout 0.2)."""
    x = torch.randn(batch, 784, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")
    rows = []
    for name, make in (("FusedMLP", lambda: _models()[0]), ("eager", lambda: _models()[1])):
        model = make().cuda()
        kernels = cuda_kernels(train_step(model, make_adam(model.parameters(), 1e-3), x, y))
        rows.append({"name": f"cuda train step B={batch} kernels: {name}",
                     "kernel_us": sum(row["us"] for row in kernels), "kernels": kernels})
        log(format_kernels(rows[-1]["name"], kernels))
    return rows


def bench_cuda_training(data, log, epochs=5):
    """5 epochs of `pyfastnn train --device cuda`, graphed and not, and the lesson's script on the GPU."""
    common = dict(data=str(data), epochs=epochs, device="cuda", out=None, progress=False, summaries=False,
                  plots=False)
    row = {"name": f"cuda {epochs}-epoch training"}
    for label, graph in (("graph", True), ("eager", False)):
        start = time.perf_counter()
        result = train(TrainConfig(cuda_graph=graph, **common))
        row[f"{label}_process_s"] = time.perf_counter() - start
        row[f"{label}_train_s"] = result.metrics["train_seconds"]
        row[f"{label}_accuracy"] = result.metrics["test_accuracy"]
    start = time.perf_counter()
    row["lesson_accuracy"] = lesson_script(data, epochs, device="cuda")
    row["lesson_s"] = time.perf_counter() - start
    # Whole call against whole call: each loads its data, trains and evaluates.
    row["speedup_graph_vs_lesson"] = row["lesson_s"] / row["graph_process_s"]
    log(f"{row['name']:>26}: graph: train loop {row['graph_train_s']:.2f} s, whole call {row['graph_process_s']:.2f} s "
        f"(acc {row['graph_accuracy']:.4f}) | no graph: {row['eager_train_s']:.2f} s (acc {row['eager_accuracy']:.4f})"
        f" | lesson script {row['lesson_s']:.1f} s (acc {row['lesson_accuracy']:.4f}) -> whole calls "
        f"{row['speedup_graph_vs_lesson']:.1f}x")
    return row


def bench_whole_process(data, log, rounds=3, epochs=5):
    """Both runs as fresh processes, interpreter start to exit, alternating; medians of `rounds`.
    Beside the wall time, each child's CPU time (user + system): on a machine shared with other work
    it varies less than wall time."""
    import resource
    import subprocess
    import tempfile

    def children_cpu_s():
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    samples = {"lesson": [], "pyfastnn": []}
    cpu_samples = {"lesson": [], "pyfastnn": []}
    accuracy = {}
    # The floor's step, timed before the rounds and after them: the lower of the two (the machine's
    # load may change while the processes run).
    batch = TrainConfig().batch_size  # the lesson's, as both runs use
    step_floor_before_s = time_interleaved({"floor": _floor_step(batch)}, 9, 0.05)["floor"]
    with tempfile.TemporaryDirectory() as scratch:
        commands = {
            "lesson": [sys.executable, str(Path(__file__).resolve()), "--lesson-script", "--data", str(data),
                       "--epochs", str(epochs)],
            "pyfastnn": [sys.executable, "-m", "pyfastnn", "train", "mnist", "--data", str(data), "--epochs",
                         str(epochs), "--out", str(Path(scratch) / "run"), "--overwrite"],  # each round anew
        }
        # The fixed cost any script pays before its first step: the interpreter, torch, and the
        # torch._dynamo that torch.optim imports when an optimizer first runs.
        commands["import torch + torch._dynamo"] = [sys.executable, "-c", "import torch, torch._dynamo"]
        samples["import torch + torch._dynamo"] = []
        cpu_samples["import torch + torch._dynamo"] = []
        for _ in range(rounds):
            for name, command in commands.items():
                start, cpu_start = time.perf_counter(), children_cpu_s()
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
                samples[name].append(time.perf_counter() - start)
                cpu_samples[name].append(children_cpu_s() - cpu_start)
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
                if name == "lesson":
                    accuracy[name] = float(done.stdout.split()[-1])
                elif name == "pyfastnn":
                    accuracy[name] = json.loads((Path(scratch) / "run" / "metrics.json").read_text())["test_accuracy"]
    times = {name: statistics.median(values) for name, values in samples.items()}
    cpu = {name: statistics.median(values) for name, values in cpu_samples.items()}
    # The floor of any 5-epoch run: that fixed cost plus every batch's step at the GEMM+Adam floor
    # (no data loading, loss, autograd, evaluation or output files counted).
    steps = epochs * -(-len(load_mnist(data, train=True)[1]) // batch)
    step_floor_s = min(step_floor_before_s, time_interleaved({"floor": _floor_step(batch)}, 9, 0.05)["floor"])
    floor_s = times["import torch + torch._dynamo"] + steps * step_floor_s
    row = {"name": f"whole process, {epochs} epochs", "lesson_s": times["lesson"], "pyfastnn_s": times["pyfastnn"],
           "lesson_samples_s": samples["lesson"], "pyfastnn_samples_s": samples["pyfastnn"],
           "speedup": times["lesson"] / times["pyfastnn"], "lesson_cpu_s": cpu["lesson"],
           "pyfastnn_cpu_s": cpu["pyfastnn"], "cpu_ratio": cpu["lesson"] / cpu["pyfastnn"],
           "lesson_accuracy": accuracy["lesson"], "pyfastnn_accuracy": accuracy["pyfastnn"],
           "import_torch_dynamo_s": times["import torch + torch._dynamo"], "step_floor_us": step_floor_s * 1e6,
           "floor_s": floor_s, "floor_speedup": times["lesson"] / floor_s}
    log(f"{row['name']:>26}: lesson script {times['lesson']:6.1f} s (acc {accuracy['lesson']:.4f}) | "
        f"pyfastnn train {times['pyfastnn']:6.1f} s (acc {accuracy['pyfastnn']:.4f}) | {row['speedup']:.2f}x wall, "
        f"{row['cpu_ratio']:.2f}x CPU time ({cpu['lesson']:.1f} / {cpu['pyfastnn']:.1f} s) "
        f"(medians of {rounds}; all wall: {', '.join(f'{v:.1f}' for v in samples['lesson'])} | "
        f"{', '.join(f'{v:.1f}' for v in samples['pyfastnn'])})")
    log(f"{'floor':>26}: import torch + torch._dynamo {row['import_torch_dynamo_s']:.2f} s + {steps} steps x "
        f"{row['step_floor_us']:.0f} us GEMM+Adam = {floor_s:.1f} s: no run can beat the lesson script by more "
        f"than {row['floor_speedup']:.2f}x")
    if row["speedup"] > row["floor_speedup"]:  # the bound held for the machine as the floor found it
        log(f"{'':>26}  (this run beat that bound: the machine's load changed between the processes and the "
            f"floor's timing; rerun on a quiet machine)")
    return row


def _report(name, times, log, unit="us", scale=1e6, base_name="pyfastnn"):
    row = {"name": name, **{f"{k}_{unit}": v * scale for k, v in times.items()}}
    base = times[base_name]
    row.update({f"speedup_vs_{k}": v / base for k, v in times.items() if k != base_name})
    cells = " | ".join(f"{k} {v * scale:9.1f} {unit}" + ("" if k == base_name else f" ({v / base:.2f}x)")
                       for k, v in times.items())
    log(f"{name:>26}: {cells}")
    return row


def main(argv=None) -> int:
    parser = command_parser("bench_mnist.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the training steps, inference and memory rows only, fewer rounds, no torch.compile "
                             "and no epoch row")
    parser.add_argument("--full-script", action="store_true", help="also the 5-epoch lesson script vs pyfastnn train")
    parser.add_argument("--data", type=path_argument,
                        help="MNIST folder for --full-script, --whole-process and --device cuda's training run "
                             "(default: $PYFASTNN_MNIST or ../shared/data/mnist); the other rows use random data")
    parser.add_argument("--epochs", type=positive_int, default=5,
                        help="epochs of --full-script, --whole-process and --device cuda's training run "
                             "(default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", type=output_file_argument,
                        help="write the results as JSON here (- for standard output, the tables then on stderr)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--profile", action="store_true",
                        help="with --device cuda: the kernels of the training steps instead of their timing")
    parser.add_argument("--whole-process", type=positive_int, metavar="ROUNDS",
                        help="also the lesson script vs `pyfastnn train` as whole processes, ROUNDS alternations")
    parser.add_argument("--lesson-script", action="store_true", help=argparse.SUPPRESS)  # one run, for --whole-process
    args = parser.parse_args(argv)
    if args.device == "cuda" and (args.full_script or args.whole_process):
        parser.error("--full-script and --whole-process run on the CPU; --device cuda has a 5-epoch run of its own")
    return run_benchmark(parser, args, lambda: _run(args, parser))


def _run(args, parser) -> int:
    if args.lesson_script:
        print(f"lesson test accuracy {lesson_script(args.data, args.epochs):.4f}")
        return 0
    uses_data = args.full_script or args.whole_process or (args.device == "cuda" and not (args.quick or args.profile))
    data = _mnist_folder(args.data, uses_data, parser)  # before minutes of benchmarks
    if (args.full_script or args.whole_process) and data is None:
        parser.error("--full-script and --whole-process need MNIST (--data DIR)")
    build = info()
    if args.profile and args.device != "cuda":
        parser.error("--profile lists CUDA kernels: it needs --device cuda")
    if args.device == "cuda":
        return _main_cuda(args, parser, build, data)
    print(f"pyfastnn {build['pyfastnn']} | torch {build['torch']} | {build['threads']} threads | "
          f"(Nx) = that variant's time / pyfastnn's")
    results = bench_steps((64, 256), 5 if args.quick else 9, 0.05, not args.quick, print)
    results += bench_inference((1, 64), 5 if args.quick else 9, 0.02, not args.quick, print)
    results.append(bench_memory(print))
    if not args.quick:
        results.append(bench_epoch(print))
    if args.full_script:
        results.append(bench_full_script(data, print, args.epochs))
    if args.whole_process:
        results.append(bench_whole_process(data, print, args.whole_process, args.epochs))
    _write_json(args, build, results)
    return 0


def _main_cuda(args, parser, build, data) -> int:
    if not build["cuda_available"]:
        parser.error("--device cuda needs a CUDA GPU and a CUDA build of pyfastnn (see pyfastnn info)")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as on the CPU
    print(f"pyfastnn {build['pyfastnn']} | torch {build['torch']} | {torch.cuda.get_device_name()} | "
          f"(Nx) = that variant's time / FusedMLP+graph's")
    if args.profile:
        _write_json(args, build, [row for batch in (64, 8192) for row in profile_cuda_steps(batch, print)])
        return 0
    results = bench_cuda_steps((64, 8192), 5 if args.quick else 9, 100 if args.quick else 500, print)
    if data is not None and not args.quick:
        results.append(bench_cuda_training(data, print, args.epochs))
    elif not args.quick:
        print("5-epoch run skipped: no MNIST (--data DIR or $PYFASTNN_MNIST)")
    _write_json(args, build, results)
    return 0


def _mnist_folder(data, uses_data: bool, parser):
    """--data when given, else $PYFASTNN_MNIST when set and the run reads MNIST (either checked: a
    wrong folder is an error, not replaced by another), else ../shared/data/mnist beside the project
    if it holds MNIST, else None."""
    if data is not None:
        what = "--data"
    elif not uses_data:
        return None
    elif os.environ.get("PYFASTNN_MNIST"):
        data, what = os.environ["PYFASTNN_MNIST"], "$PYFASTNN_MNIST"
    else:
        return find_mnist(ROOT.parent / "shared" / "data" / "mnist")
    try:  # both splits, before minutes of benchmarks: a damaged training file would otherwise fail last
        for training_split in (False, True):
            load_mnist(data, train=training_split, missing_hint="point --data or $PYFASTNN_MNIST at the folder that holds them")
    except (OSError, ValueError) as error:
        parser.error(f"{what}: {error}")
    return Path(data)


def _write_json(args, build, results) -> None:
    if args.json:
        write_results(args.json, results_record(args, build, results=results))


if __name__ == "__main__":
    sys.exit(main())
