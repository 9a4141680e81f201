"""Loads the native ops and registers what the Python side owes them: fake (meta) kernels for
torch.compile / FakeTensor, and the activation table read from the C++ enum."""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.pyfastnn.*)

ops = torch.ops.pyfastnn

#: Names of the supported activations, in the order of the C++ enum (their integer codes).
ACTIVATIONS: tuple = tuple(_C.activation_names())

_ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
_ACTIVATION_CODES["none"] = _ACTIVATION_CODES["identity"]
_ACTIVATION_CODES[None] = _ACTIVATION_CODES["identity"]


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


def _output_shape(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> list:
    """The checks the C++ kernels make, for the fake kernels (which also run for "meta" tensors)."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != input.device:
            raise TypeError(f"pyfastnn: {name} is on {t.device} but input is on {input.device}")
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"pyfastnn: {name} dtype {t.dtype} does not match input dtype {input.dtype}")
    torch._check(weight.dim() == 2, lambda: f"pyfastnn: weight must be 2-D, got {weight.dim()}-D")
    torch._check(input.dim() >= 1, lambda: "pyfastnn: input must have at least 1 dimension")
    torch._check(
        input.shape[-1] == weight.shape[1],
        lambda: f"pyfastnn: input has in_features={input.shape[-1]} but weight expects {weight.shape[1]}",
    )
    return [*input.shape[:-1], weight.shape[0]]


@torch.library.register_fake("pyfastnn::fused_linear")
def _fused_linear_fake(input, weight, bias, activation, negative_slope):
    return input.new_empty(_output_shape(input, weight, bias))


@torch.library.register_fake("pyfastnn::fused_linear_forward")
def _fused_linear_forward_fake(input, weight, bias, activation, negative_slope, keep_preact):
    shape = _output_shape(input, weight, bias)
    return input.new_empty(shape), input.new_empty(shape if keep_preact else [0])


@torch.library.register_fake("pyfastnn::fused_linear_backward")
def _fused_linear_backward_fake(grad_output, input, weight, saved, activation, negative_slope, output_mask):
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else None
    grad_weight = weight.new_empty(weight.shape) if output_mask[1] else None
    grad_bias = weight.new_empty(weight.shape[:1]) if output_mask[2] else None
    return grad_input, grad_weight, grad_bias


def _rows(input: torch.Tensor):
    rows = 1
    for size in input.shape[:-1]:
        rows = rows * size
    return rows


def _mlp_output_shape(input, weights, biases, activations, dropout) -> list:
    """The C++ fused_mlp checks that shapes depend on, for the fake kernels."""
    torch._check(len(weights) >= 1, lambda: "pyfastnn: fused_mlp needs at least one weight")
    for name, values in (("biases", biases), ("activations", activations), ("dropout probabilities", dropout)):
        if len(values) != len(weights):
            raise ValueError(f"pyfastnn: got {len(values)} {name} for {len(weights)} layers")
    features = input
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        if not 0.0 <= dropout[layer] < 1.0:
            raise ValueError(f"pyfastnn: dropout probability must be in [0, 1), got {dropout[layer]} for layer {layer}")
        _output_shape(features, weight, bias)
        features = weight.new_empty((0, weight.shape[0])) if layer + 1 < len(weights) else features
    return [*input.shape[:-1], weights[-1].shape[0]]


@torch.library.register_fake("pyfastnn::fused_mlp")
def _fused_mlp_fake(input, weights, biases, activations, negative_slope, dropout, training):
    return input.new_empty(_mlp_output_shape(input, weights, biases, activations, dropout))


@torch.library.register_fake("pyfastnn::fused_mlp_forward")
def _fused_mlp_forward_fake(input, weights, biases, activations, negative_slope, dropout, training):
    output = input.new_empty(_mlp_output_shape(input, weights, biases, activations, dropout))
    rows = _rows(input)
    hidden = [input.new_empty((rows, w.shape[0])) for w in weights[:-1]]
    preacts = [input.new_empty((rows, w.shape[0]) if not _C.derivative_from_output(act, negative_slope) else (0,))
               for w, act in zip(weights, activations)]
    # CUDA relu hidden layers keep cuBLASLt's relu bit mask there instead (NOTE [relu bit masks] in
    # csrc/layer.h): uint8, each row padded to 128 bits.
    for layer, (w, act, p) in enumerate(zip(weights[:-1], activations, dropout)):
        if (input.device.type == "cuda" and act == ACTIVATIONS.index("relu") and not (training and p > 0)
                and input.dtype in (torch.float32, torch.float16, torch.bfloat16)):
            preacts[layer] = input.new_empty((rows, (w.shape[0] + 127) // 128 * 16), dtype=torch.uint8)
    masks = [input.new_empty((rows, w.shape[0]) if training and p > 0 else (0,), dtype=torch.uint8)
             for w, p in zip(weights, dropout)]
    return output, hidden, preacts, masks


@torch.library.register_fake("pyfastnn::fused_mlp_backward")
def _fused_mlp_backward_fake(grad_output, input, weights, output, hidden, preacts, keep_masks, activations,
                             negative_slope, dropout, output_mask):
    layers = len(weights)
    none = input.new_empty((0,))
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else none
    grad_weights = [w.new_empty(w.shape) if output_mask[1 + l] else none
                    for l, w in enumerate(weights)]
    grad_biases = [w.new_empty(w.shape[:1]) if output_mask[1 + layers + l] else none
                   for l, w in enumerate(weights)]
    return grad_input, grad_weights, grad_biases
