"""``pyfastnn demo``: the neural-network lesson end to end, on pyfastnn's kernels, offline.

Perceptron AND/OR (and why not XOR), the chain-rule example, the from-scratch XOR network and its
fused twin, SimpleNN on XOR, the activation plot, a quick benchmark and, when MNIST is found
(``--data`` or ``$PYFASTNN_MNIST``), a short MNIST run.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..benchmark import run as run_bench
from ..benchmark import run_cuda, time_interleaved, train_step
from ..command import command_parser, path_argument, positive_int, run_command
from ..files import check_output_names, ensure_writable_folder, hold_folder
from ..functional import fused_linear
from ..fuse import fuse
from . import models
from .data import IDXError, find_mnist, load_mnist, mnist_folder_from_environment
from .plots import drawn_by_pyfastnn, plot_activations, plot_loss
from .processes import launched_processes
from .settings import TrainConfig
from .train import PLOT_FILES, RUN_FILES, check_device, check_no_other_run, make_adam, read_run_metrics, train


def _section(title: str) -> None:
    print(f"\n=== {title} ===")


def chain_rule_example(x: float = 2.0, w: float = 3.0, b: float = 1.0, target: float = 5.0, lr: float = 0.01):
    """The lesson's worked example: y = w x + b, loss = (y - target)^2, one gradient step on w.

    Done by hand and by autograd through the fused op; both give dloss/dw = 8, w_new = 2.92.
    """
    y = w * x + b
    loss = (y - target) ** 2
    by_hand = 2 * (y - target) * x
    w_t = torch.tensor([[w]], dtype=torch.float64, requires_grad=True)
    y_t = fused_linear(torch.tensor([[x]], dtype=torch.float64), w_t, torch.tensor([b], dtype=torch.float64),
                       activation=None)
    ((y_t - target) ** 2).sum().backward()
    return {"y": y, "loss": loss, "dloss_dw": by_hand, "dloss_dw_autograd": w_t.grad.item(),
            "w_new": w - lr * by_hand}


def _fuse_demo() -> float:
    """Fuses the plain-PyTorch MNIST network and times one training step of each, side by side."""
    torch.manual_seed(0)
    plain = models.MNISTClassifier().to_torch()
    runs: list = []
    fused = fuse(plain, report=runs)
    for run_ in runs:
        print("fused", run_)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    fused.eval(), plain.eval()
    print("eval outputs equal:", torch.allclose(fused(x), plain(x), atol=1e-5))
    fused.train(), plain.train()

    times = time_interleaved({"fused": train_step(fused, make_adam(fused.parameters(), 1e-3), x, y),
                              "eager": train_step(plain, torch.optim.Adam(plain.parameters(), lr=1e-3), x, y)},
                             5, 0.05)
    speedup = times["eager"] / times["fused"]
    print(f"train step: fused {times['fused'] * 1e6:.0f} us, eager (optim.Adam) {times['eager'] * 1e6:.0f} us "
          f"-> {speedup:.2f}x")
    return speedup


#: The pictures the demo writes into its --out folder (the MNIST run writes into its mnist folder).
DEMO_PICTURES = ("xor_scratch_loss.png", "activations.png")
#: The label the demo's MNIST run records in its metrics.json (TrainConfig.label): a later demo
#: replaces a run with this label without --overwrite (re-running the main job works, also after an
#: interrupted demo), never a run written there since by ``train``, which records no such label.
DEMO_RUN_LABEL = "pyfastnn demo"


def _holds_a_demo_run(mnist_out: Path) -> bool:
    metrics = read_run_metrics(mnist_out)
    try:
        return metrics["config"]["label"] == DEMO_RUN_LABEL
    except (KeyError, TypeError):  # no metrics.json, or not the demo's
        return False


def _refuse_foreign_pictures(out: Path, overwrite: bool) -> None:
    """A file of a picture's name that no lesson command drew is the user's: replaced only when asked
    (or where the folder holds a demo's MNIST run: the pictures of a demo that predates the mark)."""
    foreign = [name for name in DEMO_PICTURES if (out / name).exists() and not drawn_by_pyfastnn(out / name)]
    if foreign and not overwrite and not _holds_a_demo_run(out / "mnist"):
        them = "it" if len(foreign) == 1 else "them"
        raise FileExistsError(f"output folder {out} holds {', '.join(foreign)}, which pyfastnn did not draw: "
                              f"choose another --out, or pass --overwrite to replace {them}")


def run(out: Path, data: Optional[str] = None, mnist_steps: int = 300, bench: bool = True,
        device: str = "cpu", overwrite: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    _refuse_foreign_pictures(out, overwrite)
    summary = {}
    X = models.XOR_INPUTS

    _section("Perceptron (one fused neuron, step output)")
    for gate, targets in (("AND", models.AND_TARGETS), ("OR", models.OR_TARGETS), ("XOR", models.XOR_TARGETS)):
        p = models.Perceptron(2, seed=0).fit(X, targets, epochs=100, lr=0.1)
        predicted = p.predict(X)
        learned = bool((predicted == targets.reshape(-1)).all())
        summary[f"perceptron_{gate.lower()}"] = learned
        print(f"{gate:>3}: predictions {predicted.tolist()} targets {targets.reshape(-1).astype(int).tolist()} -> "
              f"{'learned' if learned else 'not learnable by one neuron'}")

    _section("Chain rule: y = w x + b, loss = (y - target)^2")
    c = chain_rule_example()
    print(f"y = {c['y']}, loss = {c['loss']}, dloss/dw = {c['dloss_dw']} (autograd through the fused op: "
          f"{c['dloss_dw_autograd']}), new w = {c['w_new']:.2f}")
    summary["chain_rule"] = c

    _section("XOR from scratch (numpy) and on fused sigmoid layers, lr 1.0")
    curves = {}
    # The lesson's run (its init, 1000 epochs, its printout), then one whose larger init learns XOR.
    for init_scale, epochs, print_every in ((0.01, 1000, 100), (1.0, 5000, 1000)):
        print(f"init randn*{init_scale}, {epochs} epochs:")
        scratch = models.NumpyTwoLayerNet(2, 4, 1, seed=0, init_scale=init_scale)
        fused = models.TwoLayerNet.from_numpy(scratch)
        losses = scratch.fit(X, models.XOR_TARGETS, epochs=epochs, learning_rate=1.0, print_every=print_every)
        fused_losses = fused.fit(X, models.XOR_TARGETS, epochs=epochs, learning_rate=1.0)
        gap = max(abs(a - b) for a, b in zip(losses, fused_losses))
        print("Predictions:")
        for inputs, prediction, expected in zip(X.astype(int), scratch.forward(X), models.XOR_TARGETS.astype(int)):
            print(f"{inputs} -> {prediction[0]:.4f} (expected: {expected[0]})")
        print(f"the fused twin ends at MSE {fused_losses[-1]:.4f} (largest gap to numpy's {gap:.1e})")
        summary[f"xor_scratch_final_loss_init_{init_scale}"] = losses[-1]
        curves[f"init randn*{init_scale}" + (" (the lesson's)" if init_scale == 0.01 else "")] = losses
    print("(the lesson's 0.01 init leaves all hidden units alike: training sits on the 0.25 saddle)")
    plot_loss(curves, out / DEMO_PICTURES[0], "XOR, from-scratch network (MSE)")

    _section("SimpleNN on XOR (BCE + Adam, lr 0.1)")
    torch.manual_seed(0)
    net = models.SimpleNN(2, 4, 1)
    inputs, targets = torch.tensor(X, dtype=torch.float32), torch.tensor(models.XOR_TARGETS, dtype=torch.float32)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    for epoch in range(1000):
        loss = torch.nn.functional.binary_cross_entropy(net(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if epoch % 100 == 0:
            print(f"Epoch {epoch}, Loss: {loss.item():.4f}")
    with torch.no_grad():
        predictions = net(inputs).reshape(-1)
    print("Predictions:", [round(v, 4) for v in predictions.tolist()])
    summary["simple_nn_solved"] = bool(((predictions > 0.5).float() == targets.reshape(-1)).all())

    _section("Activation functions (computed by the fused op and its backward)")
    print("wrote", plot_activations(out / DEMO_PICTURES[1]))

    if bench:
        if torch.device(device).type == "cuda":  # the device the lesson trains on
            _section("Quick benchmark on the GPU: fused_linear vs PyTorch eager and the bare GEMMs (bfloat16, "
                     "microseconds; the columns: pyfastnn bench --help)")
            with torch.cuda.device(torch.device(device)):
                run_cuda(shapes=((8192, 1024, 1024),), dtypes=(torch.bfloat16,), activations=("relu", "gelu"),
                         mlp=None, min_run_time=0.05)
        else:
            _section("Quick benchmark: fused_linear vs PyTorch eager (float32, medians)")
            run_bench(shapes=((64, 784, 256), (1, 784, 256)), activations=("relu", "gelu"),
                      threads=(torch.get_num_threads(),), with_compile=False, rounds=5, target_s=0.01)

        _section("Whole-network fusion: pyfastnn.fuse on the lesson's MNIST network (CPU train step, batch 64)")
        summary["fuse_step_speedup"] = _fuse_demo()

    root = find_mnist(data)
    if root is None:
        env = mnist_folder_from_environment()
        fetch = "pyfastnn train mnist --download --data DIR fetches the files"
        _section(f"MNIST: skipped ($PYFASTNN_MNIST={env} holds no MNIST files; pass --data DIR; {fetch})" if env else
                 f"MNIST: skipped (no data; pass --data DIR or set PYFASTNN_MNIST; {fetch})")
    else:
        _section(f"MNIST: at most {mnist_steps} training steps (one epoch) of the 784-256-128-10 classifier on {device} ({root})")
        mnist_out = out / "mnist"
        result = train(TrainConfig(data=str(root), epochs=1, max_steps=mnist_steps, out=str(mnist_out),
                                   progress=True, device=device, label=DEMO_RUN_LABEL,
                                   overwrite=overwrite or _holds_a_demo_run(mnist_out)))
        summary["mnist_test_accuracy"] = result.metrics["test_accuracy"]
        steps = sum(h["steps"] for h in result.metrics["history"])  # an epoch may hold fewer than asked
        print(f"test accuracy after {steps} steps: {result.metrics['test_accuracy']:.4f} "
              f"(full run: pyfastnn train mnist --data {shlex.quote(str(root))} --device {device})")
    print(f"\nPictures are in {out.resolve()}")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = command_parser(
        "pyfastnn demo",
        description=(
            "The neural-network lesson end to end on pyfastnn's kernels, offline: perceptron, XOR, "
            "the chain rule, MNIST, a quick benchmark."),
        examples=("pyfastnn demo --data DIR --out demo_output", "pyfastnn demo --no-bench --mnist-steps 100"))
    parser.add_argument("--data", type=path_argument, help="MNIST folder (default: $PYFASTNN_MNIST)")
    parser.add_argument("--out", type=path_argument, default="demo_output",
                        help="folder for the pictures and the MNIST run (in its mnist folder) (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a train run found in the --out folder's mnist folder, and files of the "
                             "demo's picture names that pyfastnn did not draw (a previous demo's are replaced "
                             "anyway)")
    parser.add_argument("--mnist-steps", type=positive_int, default=300,
                        help="at most this many MNIST training steps, one epoch at most (default: %(default)s)")
    parser.add_argument("--no-bench", action="store_true", help="skip the quick benchmark and the fusion timing")
    parser.add_argument("--device", default="cpu",
                        help="where the MNIST run trains (and the quick benchmark runs): cpu, cuda or cuda:N "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    return run_command(parser, args, lambda: _demo(args))


DEMO_MISSING_HINT = "point --data at the folder that holds them"


def _demo(args) -> int:
    processes = launched_processes()
    if processes > 1:  # each process would run the whole lesson into the same folder
        where = f"under torchrun (WORLD_SIZE={processes})" if "WORLD_SIZE" in os.environ else \
            f"in a process group of {processes} processes"
        raise ValueError(f"pyfastnn demo runs in one process, not {where}; pyfastnn train is the command that "
                         "trains across processes")
    # Mistakes in --data, --device or --out fail now, naming the problem, not after minutes of lesson.
    check_device(args.device, "fused")
    # --data, else $PYFASTNN_MNIST: a folder either names is checked alike (only with neither is MNIST skipped)
    data = args.data if args.data is not None else mnist_folder_from_environment()
    if data is not None:  # both splits: a damaged training file would otherwise fail last
        hint = DEMO_MISSING_HINT if args.data is not None else "point it, or --data, at the folder that holds them"
        try:
            for train_split in (False, True):
                load_mnist(data, train=train_split, missing_hint=hint)
        except IDXError as error:
            if args.data is not None:
                raise
            raise IDXError(f"$PYFASTNN_MNIST: {error}") from error  # no --data: it says where the folder came from
    out = ensure_writable_folder(args.out)
    with hold_folder(out):  # a second demo into this folder stops now, not after rewriting its pictures
        check_output_names(out, DEMO_PICTURES)
        _refuse_foreign_pictures(out, args.overwrite)  # before the mnist folder below is made
        if data is not None:
            mnist_out = ensure_writable_folder(out / "mnist", "folder for the MNIST run")
            check_output_names(mnist_out, RUN_FILES + PLOT_FILES)
            if not args.overwrite and not _holds_a_demo_run(mnist_out):
                # another run there (``train --out`` + "/mnist") is not replaced unasked
                check_no_other_run(mnist_out, None)
        run(out, data, args.mnist_steps, bench=not args.no_bench, device=args.device, overwrite=args.overwrite)
    return 0
