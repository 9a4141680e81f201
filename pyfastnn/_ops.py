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
    # Computed as (input^T @ grad)^T, so it comes out with transposed strides.
    grad_weight = weight.new_empty((weight.shape[1], weight.shape[0])).t() if output_mask[1] else None
    grad_bias = weight.new_empty(weight.shape[:1]) if output_mask[2] else None
    return grad_input, grad_weight, grad_bias
