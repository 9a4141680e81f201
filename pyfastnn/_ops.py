"""The one place that loads the native ops, and what the Python side owes them: the activation
table read from the C++ enum, the calls of the ops with their argument vocabulary (activation
codes, dropout probabilities), fake (meta) kernels for torch.compile / FakeTensor and vmap rules."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch.utils.flop_counter import register_flop_formula

from .extension import load_extension

#: The compiled extension, ``pyfastnn._C``; loading it registers ``torch.ops.pyfastnn.*``.
native = load_extension()

ops = torch.ops.pyfastnn

#: Names of the supported activations, in the order of the C++ enum (their integer codes).
ACTIVATIONS: Tuple[str, ...] = tuple(native.activation_names())

#: The dtypes the kernels compute in (the ops refuse any other), read from csrc/checks.h.
DTYPES: Tuple[torch.dtype, ...] = tuple(getattr(torch, name) for name in native.compute_dtype_names())

#: ``leaky_relu``'s slope for negative inputs when none is given (torch.nn.LeakyReLU's default).
DEFAULT_NEGATIVE_SLOPE = 0.01

_ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
_ACTIVATION_CODES["none"] = _ACTIVATION_CODES["identity"]
_ACTIVATION_CODES[None] = _ACTIVATION_CODES["identity"]


def dropout_runs(p: float, training: bool) -> bool:
    """Whether a layer's fused dropout draws a mask (and keeps it for backward): in training, with
    ``p > 0``, the rule of the kernels (``dropout_runs`` in csrc/dropout.h).

    Example:
        >>> dropout_runs(0.2, training=True), dropout_runs(0.2, training=False), dropout_runs(0.0, training=True)
        (True, False, False)
    """
    return training and p > 0


def activation_code(activation: Union[str, None]) -> int:
    """The enum code of an activation name (``None`` and ``"none"`` mean identity)."""
    try:
        return _ACTIVATION_CODES[activation]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)} (or None)"
        ) from None


def canonical_activation(activation: Union[str, None]) -> str:
    """The canonical name of an activation (``None``/``"none"`` -> ``"identity"``)."""
    return ACTIVATIONS[activation_code(activation)]


def output_kept_for_backward(activation: Union[str, None]) -> bool:
    """Whether backward of a fused layer (its output layer, for ``fused_mlp``) reads the layer's own
    output: relu, sigmoid and tanh take their derivative from it, as torch's do, and keep doing so
    after the layer's dropout, where torch would have kept the output before dropout as a tensor of
    its own. Changing what such a layer returns in place then makes backward raise torch's in-place
    error.

    Example:
        >>> output_kept_for_backward("relu"), output_kept_for_backward("gelu"), output_kept_for_backward(None)
        (True, False, False)
    """
    code = activation_code(activation)
    return code != _ACTIVATION_CODES["identity"] and native.derivative_from_output(code, DEFAULT_NEGATIVE_SLOPE, False)


def _real_number(value: object, what: str) -> float:
    """``value`` as a float, or TypeError naming ``what`` unless it is a real number (``bool``, a
    string or a tensor would otherwise pass through ``float()``); ValueError for a number beyond any
    float (``float()``'s bare OverflowError names nothing)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"pyfastnn: {what} must be a real number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        size = f"an integer of {abs(int(value)).bit_length()} bits" if isinstance(value, numbers.Integral) else \
            f"a {type(value).__name__} beyond that range"
        raise ValueError(f"pyfastnn: {what} must be a number a float can hold, got {size}") from None


def slope_value(negative_slope: float) -> float:
    """``negative_slope`` as a float, or TypeError / ValueError unless it is a real number that is
    finite in float32, where the kernels of every dtype but float64 multiply by it. It is checked
    before the dtype is known (a layer's slope when the layer is made), so float64 is held to it too,
    where ``F.leaky_relu`` refuses such slopes for the other dtypes only. A 0-d tensor that needs no
    gradient counts as its value: the slope is not learned.

    Example:
        >>> slope_value(0.2)
        0.2
        >>> slope_value("0.2")
        Traceback (most recent call last):
        ...
        TypeError: pyfastnn: negative_slope must be a real number, got '0.2'
        >>> slope_value(float("inf"))
        Traceback (most recent call last):
        ...
        ValueError: pyfastnn: negative_slope must be finite, got inf
        >>> slope_value(1e39)
        Traceback (most recent call last):
        ...
        ValueError: pyfastnn: negative_slope must be finite in float32 (at most 3.4028234663852886e+38 in magnitude), got 1e+39
    """
    if isinstance(negative_slope, torch.Tensor) and negative_slope.dim() == 0 and not negative_slope.requires_grad:
        # A trace (torch.export, torch.compile with fullgraph=True) cannot know a tensor's value, which
        # the ops take as a number; torch.compile otherwise breaks the graph here and runs this eagerly.
        if torch.compiler.is_compiling() or isinstance(value := negative_slope.item(), torch.SymFloat):
            raise TypeError("pyfastnn: negative_slope is a tensor, whose value is data to a trace (torch.export, "
                            "torch.compile); the ops take the slope as a number: pass a Python float")
        negative_slope = value
    negative_slope = _real_number(negative_slope, "negative_slope")
    if not torch.compiler.is_compiling():  # dynamo cannot trace the binding; the op checks the slope again anyway
        native.check_negative_slope(negative_slope)
    return negative_slope


def dropout_probability(p: float) -> float:
    """``p`` as a float, or ValueError unless it is a dropout probability the kernels take: in
    [0, 1) and more than 2^-33 below 1 (the 32-bit random draws would keep nothing).

    The check and its message are the kernels' own (``check_dropout_probability``, also run by
    ``check_fused_mlp_args``); this is the entry for values given before any tensor exists (layer
    attributes, one value for every layer). NaN is rejected too.

    Example:
        >>> dropout_probability(0.2)
        0.2
        >>> dropout_probability(1)
        Traceback (most recent call last):
        ...
        ValueError: pyfastnn: dropout probability must be in [0, 1), got 1
        >>> dropout_probability(float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: pyfastnn: dropout probability must be in [0, 1), got nan
        >>> dropout_probability("0.5")
        Traceback (most recent call last):
        ...
        TypeError: pyfastnn: dropout probability must be a real number, got '0.5'
    """
    p = _real_number(p, "dropout probability")
    if not torch.compiler.is_compiling():  # dynamo cannot trace the binding; the op checks p again anyway
        native.check_dropout_probability(p)
    return p


def check_flag(owner: str, name: str, value: object) -> bool:
    """``value`` if it is True or False, else TypeError: a string such as ``"no"`` or a number would
    otherwise pass for a flag by its truth value.

    Example:
        >>> check_flag("fused_mlp", "training", False)
        False
        >>> check_flag("fused_mlp", "training", "no")
        Traceback (most recent call last):
        ...
        TypeError: fused_mlp: training must be True or False, got 'no'
    """
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")
    return value


_fused_linear_op = ops.fused_linear.default
_fused_mlp_op = ops.fused_mlp.default


def run_fused_linear(input, weight, bias, code: int, negative_slope: float) -> torch.Tensor:
    """Calls the fused_linear op with an activation code; turns the dispatcher's generic error for a
    non-tensor argument into a TypeError naming it."""
    try:
        return _fused_linear_op(input, weight, bias, code, negative_slope)
    except (RuntimeError, TypeError, AttributeError):  # the latter two from meta tensors' fake kernels
        _name_the_refused_argument([("input", input), ("weight", weight)], [("bias", bias)])
        raise


def run_fused_mlp(input, weights, biases, codes, negative_slope: float, dropout, training: bool) -> torch.Tensor:
    """Calls the fused_mlp op with activation codes; names a non-tensor argument in a TypeError
    instead of the dispatcher's error."""
    try:
        return _fused_mlp_op(input, weights, biases, codes, negative_slope, dropout, training)
    except (RuntimeError, TypeError, AttributeError):  # the latter two from meta tensors' fake kernels
        _name_the_refused_argument([("input", input)], [])  # first: the lists may be the problem too
        _name_the_refused_argument([(f"weights[{i}]", w) for i, w in enumerate(weights)],
                                   [(f"biases[{i}]", b) for i, b in enumerate(biases)])
        raise


def _name_the_refused_argument(required: Sequence[Tuple[str, object]], optional: Sequence[Tuple[str, object]]) -> None:
    """After the dispatcher refused a call, the error that names the argument instead: TypeError for
    one that is no tensor (None allowed for the ``optional`` ones), NotImplementedError for a tensor
    no kernel reads (nested, sparse, mkldnn, quantized: the kernels' own check, ``check_readable``,
    names it and what to pass instead). Returns where every argument looks right."""
    arguments = [(name, value, False) for name, value in required] + [(name, value, True) for name, value in optional]
    for name, value, may_be_none in arguments:
        if not isinstance(value, torch.Tensor) and not (may_be_none and value is None):
            raise TypeError(f"pyfastnn: {name} must be a torch.Tensor, got {type(value).__name__}") from None
    for name, tensor, _ in arguments:
        if tensor is not None and not tensor._is_zerotensor():  # the dispatcher gives the op plain zeros
            try:
                native.check_readable(name, tensor)
            except NotImplementedError as e:
                raise NotImplementedError(str(e)) from None


def _output_shape(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: int,
                  negative_slope: float) -> list:
    """Runs the C++ kernels' own argument checks (same exception types and messages) for the fake
    kernels, which also run for "meta" tensors; returns the output shape."""
    native.check_fused_linear_args(input, weight, bias, activation, negative_slope)
    return [*input.shape[:-1], weight.shape[0]]


@torch.library.register_fake("pyfastnn::fused_linear")
def _fused_linear_fake(input, weight, bias, activation, negative_slope):
    return input.new_empty(_output_shape(input, weight, bias, activation, negative_slope))


@torch.library.register_fake("pyfastnn::fused_linear_forward")
def _fused_linear_forward_fake(input, weight, bias, activation, negative_slope, keep_preact):
    shape = _output_shape(input, weight, bias, activation, negative_slope)
    return input.new_empty(shape), input.new_empty(shape if keep_preact else [0])


@torch.library.register_fake("pyfastnn::fused_linear_backward")
def _fused_linear_backward_fake(grad_output, input, weight, saved, activation, negative_slope, output_mask):
    native.check_fused_linear_backward_args(grad_output, input, weight, saved, activation, negative_slope)
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else None
    grad_weight = weight.new_empty(weight.shape) if output_mask[1] else None
    grad_bias = weight.new_empty(weight.shape[:1]) if output_mask[2] else None
    return grad_input, grad_weight, grad_bias


def _rows(shape: Sequence) -> int:
    """The rows of the GEMM for an input of ``shape``: its leading dimensions flattened (SymInts too)."""
    return math.prod(shape[:-1])


def _mlp_output_shape(input, weights, biases, activations, negative_slope, dropout) -> list:
    """The C++ fused_mlp argument checks (one source, see _output_shape); returns the output shape."""
    native.check_fused_mlp_args(input, list(weights), list(biases), list(activations), negative_slope, list(dropout))
    return [*input.shape[:-1], weights[-1].shape[0]]


@torch.library.register_fake("pyfastnn::fused_mlp")
def _fused_mlp_fake(input, weights, biases, activations, negative_slope, dropout, training):
    return input.new_empty(_mlp_output_shape(input, weights, biases, activations, negative_slope, dropout))


@torch.library.register_fake("pyfastnn::fused_mlp_forward")
def _fused_mlp_forward_fake(input, weights, biases, activations, negative_slope, dropout, training):
    output = input.new_empty(_mlp_output_shape(input, weights, biases, activations, negative_slope, dropout))
    rows = _rows(input.shape)
    hidden = [input.new_empty((rows, w.shape[0])) for w in weights[:-1]]
    last = len(weights) - 1
    preacts = [input.new_empty((0,) if native.derivative_from_output(act, negative_slope, layer < last)
                               else (rows, w.shape[0]))
               for layer, (w, act) in enumerate(zip(weights, activations))]
    # CUDA relu hidden layers keep a relu bit mask there instead (NOTE [relu bit masks] in
    # csrc/layer.h): uint8, each row padded to 128 bits.
    for layer, (w, act) in enumerate(zip(weights[:-1], activations)):
        if native.keeps_relu_mask(input, act, False):
            preacts[layer] = input.new_empty((rows, native.relu_mask_row_bytes(w.shape[0])), dtype=torch.uint8)
    masks = [input.new_empty((rows, w.shape[0]) if dropout_runs(p, training) else (0,), dtype=torch.uint8)
             for w, p in zip(weights, dropout)]
    return output, hidden, preacts, masks


@torch.library.register_fake("pyfastnn::fused_mlp_backward")
def _fused_mlp_backward_fake(grad_output, input, weights, output, hidden, preacts, keep_masks, activations,
                             negative_slope, dropout, output_mask):
    layers = len(weights)
    native.check_fused_mlp_backward_args(grad_output, input, list(weights), output, list(hidden), list(preacts),
                                         list(keep_masks), list(activations), negative_slope, list(dropout),
                                         len(output_mask))

    def none() -> torch.Tensor:  # one empty tensor per gradient not asked for: outputs must not alias
        return input.new_empty((0,))

    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else none()
    grad_weights = [w.new_empty(w.shape) if output_mask[1 + l] else none()
                    for l, w in enumerate(weights)]
    grad_biases = [w.new_empty(w.shape[:1]) if output_mask[1 + layers + l] else none()
                   for l, w in enumerate(weights)]
    return grad_input, grad_weights, grad_biases


# FLOP counts for torch.utils.flop_counter.FlopCounterMode, counted as its formulas count aten.mm
# (2 per multiply-add) for the GEMMs each op runs; the element-wise passes are not counted, as
# FlopCounterMode counts none for aten's activations either. The formulas receive shapes.
def _gemm_flops(rows_shape, weight_shape) -> int:
    return 2 * _rows(rows_shape) * weight_shape[0] * weight_shape[1]


@register_flop_formula([ops.fused_linear, ops.fused_linear_forward])
def _fused_linear_flops(input, weight, *args, out_shape=None, **kwargs) -> int:
    return _gemm_flops(input, weight)


@register_flop_formula(ops.fused_linear_backward)
def _fused_linear_backward_flops(grad_output, input, weight, saved, activation, negative_slope, output_mask,
                                 out_shape=None, **kwargs) -> int:
    return _gemm_flops(input, weight) * (bool(output_mask[0]) + bool(output_mask[1]))


@register_flop_formula([ops.fused_mlp, ops.fused_mlp_forward])
def _fused_mlp_flops(input, weights, *args, out_shape=None, **kwargs) -> int:
    return sum(_gemm_flops(input, w) for w in weights)


@register_flop_formula(ops.fused_mlp_backward)
def _fused_mlp_backward_flops(grad_output, input, weights, output, hidden, preacts, keep_masks, activations,
                              negative_slope, dropout, output_mask, out_shape=None, **kwargs) -> int:
    # As the kernel walks: from the top down to the lowest layer with a gradient to give; each layer
    # there computes its weight gradient if asked and its input gradient unless it is the lowest one
    # and the input needs none.
    layers = len(weights)
    wanted = [l for l in range(layers) if output_mask[1 + l] or output_mask[1 + layers + l]]
    lowest = 0 if output_mask[0] else (wanted[0] if wanted else layers)
    flops = 0
    for l in range(lowest, layers):
        gemm = _gemm_flops(input, weights[l])
        flops += gemm * (bool(output_mask[1 + l]) + (l > lowest or bool(output_mask[0])))
    return flops


# vmap: a batched input is just more leading dimensions for the ops, so vmap over data runs the
# fused kernels once; batched parameters (model ensembles) run them once per sample. Samples that
# are 0-d take the per-sample path too, where the op refuses them as it does outside vmap (moved to
# the front, the vmap dimension would pass for the features).
def _batch_as_rows(input: torch.Tensor, dim: Optional[int]) -> bool:
    return dim is not None and input.dim() > 1


def _select(t: Optional[torch.Tensor], dim: Optional[int], index: int) -> Optional[torch.Tensor]:
    return t if t is None or dim is None else t.select(dim, index)


def _meta_sample(t: Optional[torch.Tensor], dim: Optional[int]) -> Optional[torch.Tensor]:
    """A meta tensor shaped like one sample of ``t`` (which may hold none)."""
    if t is None:
        return None
    shape = list(t.shape)
    if dim is not None:
        del shape[dim]
    return torch.empty(shape, dtype=t.dtype, device="meta")


def _per_sample(info, run: Callable[[Callable], torch.Tensor],
                arguments: Sequence[Tuple[Optional[torch.Tensor], Optional[int]]]) -> Tuple[torch.Tensor, int]:
    """Stacks ``run(pick)`` over the vmap samples, ``pick(t, dim)`` giving each argument's sample;
    ``arguments``: the op's tensors with their vmap dimensions.

    An empty batch runs the op once on meta samples: its checks still apply, and its output's shape
    gives the empty result's, which is tied to the arguments so that autograd sees it depend on them.
    """
    if info.batch_size == 0:
        sample = run(_meta_sample)
        device = next(t.device for t, _ in arguments if t is not None)
        empty = torch.empty((0, *sample.shape), dtype=sample.dtype, device=device)
        return empty + sum(t.narrow(dim, 0, 0).sum() for t, dim in arguments if t is not None and dim is not None), 0
    return torch.stack([run(lambda t, dim: _select(t, dim, i)) for i in range(info.batch_size)]), 0


@torch.library.register_vmap("pyfastnn::fused_linear")
def _fused_linear_vmap(info, in_dims, input, weight, bias, activation, negative_slope):
    input_dim, weight_dim, bias_dim = in_dims[:3]
    if _batch_as_rows(input, input_dim) and weight_dim is None and bias_dim is None:
        return ops.fused_linear(input.movedim(input_dim, 0), weight, bias, activation, negative_slope), 0
    return _per_sample(info, lambda pick: ops.fused_linear(pick(input, input_dim), pick(weight, weight_dim),
                                                           pick(bias, bias_dim), activation, negative_slope),
                       [(input, input_dim), (weight, weight_dim), (bias, bias_dim)])


@torch.library.register_vmap("pyfastnn::fused_mlp")
def _fused_mlp_vmap(info, in_dims, input, weights, biases, activations, negative_slope, dropout, training):
    input_dim, weight_dims, bias_dims = in_dims[:3]
    if any(dropout_runs(p, training) for p in dropout) and info.randomness != "different":
        # Like torch's own random ops under vmap: each sample's mask must be asked for explicitly.
        raise RuntimeError(f"vmap: fused_mlp draws dropout masks in training mode, which vmap's randomness="
                           f"{info.randomness!r} does not allow; use torch.vmap(..., randomness='different') "
                           f"(each sample draws its own masks) or eval mode")
    if _batch_as_rows(input, input_dim) and all(d is None for d in (*weight_dims, *bias_dims)):
        return ops.fused_mlp(input.movedim(input_dim, 0), weights, biases, activations, negative_slope, dropout,
                             training), 0
    return _per_sample(info, lambda pick: ops.fused_mlp(pick(input, input_dim),
                                                        [pick(w, d) for w, d in zip(weights, weight_dims)],
                                                        [pick(b, d) for b, d in zip(biases, bias_dims)],
                                                        activations, negative_slope, dropout, training),
                       [(input, input_dim), *zip(weights, weight_dims), *zip(biases, bias_dims)])
