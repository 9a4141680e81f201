"""A whole training step (forward, loss, backward, optimizer step) as one CUDA graph.

A small network's training step on a GPU is bound by kernel launches, not arithmetic: the lesson's
784-256-128-10 MLP launches dozens of kernels per step, each costing microseconds of CPU time.
Captured once in a ``torch.cuda.CUDAGraph`` and replayed, the step costs one launch. The recipe is
PyTorch's "whole network capture": warm-up steps on a side stream, a capturable optimizer (its
step count and learning-rate math stay on the GPU), static input buffers the batches are copied
into, and gradients the captured backward writes in place on every replay.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["CUDAGraphStep", "cuda_graph_step"]


class CUDAGraphStep:
    """A training step replayed from a CUDA graph; made by :func:`cuda_graph_step`.

    Calling it with a batch copies the batch into :attr:`inputs` and runs one step: the first
    ``warmup_steps`` calls eagerly on a side stream (they are real training steps), the next one
    captures the graph and replays it, later ones only replay it. :meth:`replay` runs a step on
    whatever :attr:`inputs` already hold, for loops that write batches into them directly.

    Attributes:
        inputs: the static batch buffers (same shapes, dtypes and device as the example batch).
        output: the model's output of the latest step (detached; overwritten by the next step).
        loss: the loss of the latest step (detached; overwritten by the next step).
        captured: whether the graph has been captured (after the warm-up calls).

    Example (a loop writing each batch into the buffers itself; runs where a GPU is):
        >>> import torch, torch.nn.functional as F, pyfastnn
        >>> if torch.cuda.is_available() and pyfastnn.info()["backends"]["cuda"]:
        ...     model = pyfastnn.FusedMLP([16, 32, 4]).cuda()
        ...     optimizer = torch.optim.Adam(model.parameters(), fused=True, capturable=True)
        ...     x, y = torch.randn(8, 16, device="cuda"), torch.randint(0, 4, (8,), device="cuda")
        ...     step = pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, (x, y))
        ...     for _ in range(5):  # 3 eager warm-up steps, a capture, a replay
        ...         torch.randn(8, 16, out=step.inputs[0])
        ...         loss = step.replay()
        ...     assert step.captured and isinstance(step, pyfastnn.CUDAGraphStep)

    On any machine the arguments are checked before anything runs:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> pyfastnn.CUDAGraphStep(model, F.cross_entropy, optimizer, (torch.randn(8, 4), torch.zeros(8).long()),
        ...                        warmup_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: cuda_graph_step: warmup_steps must be an int >= 1 (the optimizer makes its state in the first step, which a capture cannot do), got 0
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer,
                 example_batch: Sequence[torch.Tensor], warmup_steps: int = 3) -> None:
        _check_arguments(model, loss_fn, optimizer, example_batch, warmup_steps)
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.warmup_steps = int(warmup_steps)
        self.inputs: Tuple[torch.Tensor, ...] = tuple(torch.empty_like(t) for t in example_batch)
        with torch.no_grad():  # data, not a node of the user's graph: no history on the buffers
            for buffer, example in zip(self.inputs, example_batch):
                buffer.copy_(example)
        self.output: Optional[torch.Tensor] = None
        self.loss: Optional[torch.Tensor] = None
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._steps = 0
        self._training = model.training
        self._side_stream = torch.cuda.Stream(device=self.inputs[0].device)

    @property
    def captured(self) -> bool:
        """Whether the step has been captured (after ``warmup_steps`` eager steps): each call then
        replays the graph."""
        return self.graph is not None

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        """One training step on ``batch`` (laid out like the example batch); returns the loss."""
        if len(batch) != len(self.inputs):
            raise ValueError(f"cuda_graph_step: got {len(batch)} tensors, the example batch had {len(self.inputs)}")
        for i, (tensor, buffer) in enumerate(zip(batch, self.inputs)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"cuda_graph_step: batch[{i}] must be a tensor, got {type(tensor).__name__}")
            if tensor.shape != buffer.shape or tensor.dtype != buffer.dtype:
                raise ValueError(
                    f"cuda_graph_step: batch[{i}] is {tuple(tensor.shape)} {tensor.dtype}, but the graph was made for "
                    f"{tuple(buffer.shape)} {buffer.dtype}; a graph replays fixed shapes, so make one step per batch "
                    f"shape (e.g. another for the last, smaller batch)")
            if tensor.device != buffer.device:
                raise ValueError(f"cuda_graph_step: batch[{i}] is on {tensor.device}, the graph runs on {buffer.device}")
        with torch.no_grad():
            for tensor, buffer in zip(batch, self.inputs):
                if tensor.data_ptr() != buffer.data_ptr():
                    buffer.copy_(tensor, non_blocking=True)
        return self.replay()

    def replay(self) -> torch.Tensor:
        """One training step on the batch currently in :attr:`inputs`; returns the loss."""
        if self.model.training != self._training:
            raise RuntimeError(f"cuda_graph_step: the model was in {'train' if self._training else 'eval'} mode when "
                               f"the step was made and is not any more; a graph replays the mode it was made in")
        if not torch.is_grad_enabled():
            raise RuntimeError("cuda_graph_step: a training step needs gradients; it was called under torch.no_grad()")
        if self._steps < self.warmup_steps:
            self._warmup_step()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        self._steps += 1
        return self.loss

    def _forward_backward_step(self) -> None:
        output = self.model(self.inputs[0])
        loss = self.loss_fn(output, *self.inputs[1:])
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"cuda_graph_step: loss_fn must return a one-element tensor, got "
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
        loss.backward()
        self.optimizer.step()
        self.output = output.detach() if isinstance(output, torch.Tensor) else output
        self.loss = loss.detach()

    def _warmup_step(self) -> None:
        # Warm-up runs on a side stream, as capture does, so that lazily made state (optimizer
        # moments, autograd's and cuBLAS's workspaces) belongs to that stream.
        current = torch.cuda.current_stream(self.inputs[0].device)
        self._side_stream.wait_stream(current)
        with torch.cuda.stream(self._side_stream):
            self.optimizer.zero_grad(set_to_none=True)
            self._forward_backward_step()
        current.wait_stream(self._side_stream)

    def _capture(self) -> None:
        # Gradients set to None are allocated by the captured backward from the graph's own memory
        # pool; every replay writes them anew there (no zero_grad needed, none must happen).
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.inputs[0].device)
        try:
            # On the batch's device and the warm-up's stream: torch.cuda.graph's own default stream
            # belongs to whichever device was current when it was first made, and a capture there
            # would record none of this device's kernels.
            with torch.cuda.device(self.inputs[0].device), torch.cuda.graph(graph, stream=self._side_stream):
                self._forward_backward_step()
        except RuntimeError as e:
            # torch.cuda.graph's exit ends the capture before it restores the stream; when ending the
            # failed capture raises, the side stream would stay current for the user's later work.
            with torch.cuda.device(current.device):  # set_stream also makes the stream's device current
                torch.cuda.set_stream(current)
            # Ending a capture that an operation broke raises a generic error; what broke it is its context.
            cause = f"{e.__context__}; then: {e}" if e.__context__ is not None else str(e)
            raise RuntimeError(f"cuda_graph_step: capturing the step failed ({cause}). Everything in a captured "
                               f"step must stay on the GPU: no .item(), .cpu(), printing of tensors, data-dependent "
                               f"shapes or CPU tensors. A failed capture can leave torch's CUDA random number "
                               f"generator unusable in this process: restart the process before training again") from e
        self.graph = graph


def cuda_graph_step(model: nn.Module, loss_fn: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer,
                    example_batch: Sequence[torch.Tensor], warmup_steps: int = 3) -> CUDAGraphStep:
    """The training step ``loss_fn(model(batch[0]), *batch[1:])``, backward, ``optimizer.step()``,
    as one CUDA graph replayed per batch.

    The returned :class:`CUDAGraphStep` is called with each batch, laid out like ``example_batch``
    (e.g. ``(inputs, targets)``); it returns the loss (a tensor on the GPU, overwritten by the next
    step: ``.item()`` or ``.clone()`` it to keep it). Its first ``warmup_steps`` calls run eagerly as
    ordinary training steps; the next captures the graph. The results equal an ordinary loop's
    (``zero_grad``, forward, loss, backward, ``step``) up to float reassociation.

    Rules of a graphed step: the model, loss and optimizer must run on one GPU with nothing moved to
    the CPU; the optimizer must be made with ``capturable=True`` (``torch.optim.Adam(params,
    fused=True, capturable=True)``), or be ``torch.optim.SGD``, which needs no such option; every
    batch has the example's shapes (make a second step for a smaller last batch); the model stays
    in the train/eval mode it had; hyper-parameters set as Python numbers (a learning rate changed
    later) are baked into the graph.

    Example (the lesson's classifier and loss; runs where a GPU is):
        >>> import torch, torch.nn.functional as F, pyfastnn
        >>> if torch.cuda.is_available() and pyfastnn.info()["backends"]["cuda"]:
        ...     model = pyfastnn.FusedMLP([784, 256, 128, 10], dropout=0.2).cuda()
        ...     optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=True)
        ...     x, y = torch.randn(64, 784, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
        ...     step = pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, (x, y))
        ...     losses = [step(x, y).item() for _ in range(10)]  # 3 eager warm-up steps, then replays
        ...     assert step.captured and losses[-1] < losses[0]

    On a machine without CUDA the arguments are still checked:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torch.optim.Adam(model.parameters())
        >>> pyfastnn.cuda_graph_step(model, F.cross_entropy, optimizer, (torch.randn(8, 4), torch.zeros(8).long()))
        Traceback (most recent call last):
        ...
        ValueError: cuda_graph_step: batch[0] is on cpu; a CUDA graph needs the batch on a CUDA device
    """
    return CUDAGraphStep(model, loss_fn, optimizer, example_batch, warmup_steps)


def _check_arguments(model, loss_fn, optimizer, example_batch, warmup_steps) -> None:
    """Each misuse named before anything runs (a failed capture leaves the CUDA context unusable)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"cuda_graph_step: model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"cuda_graph_step: loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"cuda_graph_step: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 1:
        raise ValueError(f"cuda_graph_step: warmup_steps must be an int >= 1 (the optimizer makes its state in the "
                         f"first step, which a capture cannot do), got {warmup_steps!r}")
    if isinstance(example_batch, torch.Tensor) or not isinstance(example_batch, (list, tuple)) or not example_batch:
        raise TypeError("cuda_graph_step: example_batch must be a non-empty tuple of tensors, e.g. (inputs, targets)")
    for i, tensor in enumerate(example_batch):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"cuda_graph_step: batch[{i}] must be a tensor, got {type(tensor).__name__}")
    device = example_batch[0].device
    if device.type != "cuda":
        raise ValueError(f"cuda_graph_step: batch[0] is on {device}; a CUDA graph needs the batch on a CUDA device")
    for i, tensor in enumerate(example_batch[1:], 1):
        if tensor.device != device:
            raise ValueError(f"cuda_graph_step: batch[{i}] is on {tensor.device}, batch[0] on {device}")
    for name, parameter in model.named_parameters():
        if parameter.device != device:
            raise ValueError(f"cuda_graph_step: model parameter {name!r} is on {parameter.device}, the batch on "
                             f"{device}; move the model there first (model.to({str(device)!r}))")
    for g, group in enumerate(optimizer.param_groups):
        if isinstance(optimizer, torch.optim.SGD):
            pass  # keeps no step count on the host: graph-safe as it is (PyTorch's own capture example)
        elif "capturable" not in group:
            raise ValueError(f"cuda_graph_step: {type(optimizer).__name__} cannot be captured in a CUDA graph (it has "
                             f"no capturable option); use e.g. torch.optim.Adam(params, fused=True, capturable=True)")
        elif not group["capturable"]:
            raise ValueError(f"cuda_graph_step: the optimizer's param group {g} is not capturable; make it with "
                             f"capturable=True, e.g. {type(optimizer).__name__}(params, fused=True, capturable=True)")
        for parameter in group["params"]:
            if parameter.device != device:
                raise ValueError(f"cuda_graph_step: an optimizer parameter is on {parameter.device}, the batch on "
                                 f"{device}")
