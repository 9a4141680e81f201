"""The torch.nn vocabulary the fused layers speak, shared by :mod:`pyfastnn.nn` and :mod:`pyfastnn.fuse`
(with its passes' modules): which ``torch.nn`` module (and, in traced code, which function)
computes each activation, and the one parser of ``Linear -> activation (-> Dropout)`` runs.

Only exact module types count: a subclass may change what ``forward`` does, and a module with hooks
would have them bypassed by a fused op.
"""

from __future__ import annotations

from typing import AbstractSet, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._ops import ACTIVATIONS, DEFAULT_NEGATIVE_SLOPE, DTYPES, canonical_activation, dropout_probability, slope_value

__all__ = ["ACTIVATION_MODULES", "FUNCTION_ACTIVATIONS", "METHOD_ACTIVATIONS", "STATELESS_ACTIVATIONS", "Layer",
           "activation_module", "activation_of", "chain_mismatch", "describe", "dropout_joining", "dropout_of",
           "function_activation", "fusable_linear", "has_call_hooks", "has_hooks", "is_plain", "is_plain_linear",
           "kept_for_its_own_state", "link_mismatch", "linear_dtype_problem", "parse_layers", "runs_in_sequence"]

#: The one table of activation name -> (torch.nn module type, the attributes that select it).
#: ``leaky_relu``'s ``negative_slope`` is a parameter of the activation, not part of its identity.
ACTIVATION_MODULES: Dict[str, Tuple[type, Dict[str, object]]] = {
    "identity": (nn.Identity, {}),
    "relu": (nn.ReLU, {}),
    "leaky_relu": (nn.LeakyReLU, {}),
    "sigmoid": (nn.Sigmoid, {}),
    "tanh": (nn.Tanh, {}),
    "gelu": (nn.GELU, {"approximate": "none"}),
    "gelu_tanh": (nn.GELU, {"approximate": "tanh"}),
    "silu": (nn.SiLU, {}),
}
if set(ACTIVATION_MODULES) != set(ACTIVATIONS):  # the kernels' enum and this table must agree
    raise ImportError(f"pyfastnn: the kernels implement {sorted(ACTIVATIONS)}, but the torch.nn table names "
                      f"{sorted(ACTIVATION_MODULES)}; rebuild the extension from the same sources")
#: Activation modules without settings (GELU's approximation and LeakyReLU's slope are settings): one
#: shared instance may be absorbed at each of its calls.
STATELESS_ACTIVATIONS = tuple(kind for name, (kind, attributes) in ACTIVATION_MODULES.items()
                              if not attributes and name != "leaky_relu")
#: The module types a fused layer stands in for.
_FUSABLE_KINDS = frozenset({nn.Linear, nn.Dropout, *(kind for kind, _ in ACTIVATION_MODULES.values())})

#: Functions a traced ``forward`` may apply to a Linear's output: the activation, and the settings
#: the function takes after its input (positionally or by keyword, in this order), which
#: :func:`function_activation` reads. Tensor methods, called without arguments, likewise.
FUNCTION_ACTIVATIONS: Dict[Callable, Tuple[str, Tuple[str, ...]]] = {
    torch.relu: ("relu", ()), F.relu: ("relu", ("inplace",)), torch.sigmoid: ("sigmoid", ()),
    torch.tanh: ("tanh", ()), F.silu: ("silu", ("inplace",)), F.gelu: ("gelu", ("approximate",)),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
}
METHOD_ACTIVATIONS: Dict[str, str] = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}


def activation_module(activation: Optional[str], negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> nn.Module:
    """The ``torch.nn`` module computing the named activation (the reference for our kernels).

    Example:
        >>> from pyfastnn import activation_module
        >>> activation_module("gelu_tanh")
        GELU(approximate='tanh')
        >>> activation_module(None)
        Identity()
    """
    name = canonical_activation(activation)
    kind, attributes = ACTIVATION_MODULES[name]
    slope = slope_value(negative_slope)  # checked for every activation, as a FusedLinear checks it
    return kind(slope) if name == "leaky_relu" else kind(**attributes)


def has_call_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own, which ``nn.Module.__call__`` runs
    around its ``forward``."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has hooks of its own, which a fused module in its place would not have:
    forward/backward hooks (bypassed) and state-dict hooks (a key renamed or added for it lost)."""
    return has_call_hooks(module) or bool(
        module._state_dict_hooks or module._state_dict_pre_hooks or module._load_state_dict_pre_hooks
        or module._load_state_dict_post_hooks)


def is_plain(module: nn.Module, kind: type, with_children: bool = False) -> bool:
    """Whether ``module`` is exactly a ``kind`` that a fused module can stand in for: no hooks, and
    nothing a freshly made ``kind`` lacks (a parameter, buffer, instance attribute such as a
    ``forward`` assigned to the instance, or, unless ``with_children``, a submodule), which the fused
    module would lose or bypass. The markers torch leaves on modules it compiled or scripted do not
    count.

    Example:
        >>> relu = nn.ReLU()
        >>> is_plain(relu, nn.ReLU), is_plain(relu, nn.Tanh)
        (True, False)
        >>> relu.forward = torch.sigmoid  # it computes something else now
        >>> is_plain(relu, nn.ReLU)
        False
    """
    if type(module) is not kind or has_hooks(module):
        return False
    fresh = _FRESH.get(kind)
    if fresh is None:  # made on the meta device: no memory, and no random numbers drawn
        fresh = _FRESH[kind] = kind(1, 1, device="meta") if kind is nn.Linear else kind()
    return (set(module._parameters) <= set(fresh._parameters) and set(module._buffers) <= set(fresh._buffers)
            and (with_children or not module._modules) and set(vars(module)) - _TORCH_MARKERS <= set(vars(fresh)))


def kept_for_its_own_state(module: nn.Module) -> bool:
    """Whether ``module`` is of a kind the fused layers stand in for (Linear, a supported activation,
    Dropout) but not :func:`is_plain`: it has hooks, or state of its own, which fusion would bypass or lose.

    Example:
        >>> gelu = nn.GELU()
        >>> gelu.register_buffer("calls", torch.zeros(()))
        >>> kept_for_its_own_state(gelu), kept_for_its_own_state(nn.GELU()), kept_for_its_own_state(nn.Softplus())
        (True, False, False)
    """
    kind = type(module)
    return kind in _FUSABLE_KINDS and not is_plain(module, kind)


_FRESH: Dict[type, nn.Module] = {}  # a freshly made module of each kind is_plain was asked about
#: What torch.compile and torch.jit.script set on the modules they saw (even one never run since).
_TORCH_MARKERS = frozenset({"_is_torch_compile", "_compiled_call_impl", "__overloads__"})


def activation_of(module: nn.Module) -> Optional[Tuple[str, float]]:
    """(activation name, negative_slope) for an activation module the kernels implement, else None.

    Example:
        >>> activation_of(nn.LeakyReLU(0.2)), activation_of(nn.GELU()), activation_of(nn.Softplus())
        (('leaky_relu', 0.2), ('gelu', 0.01), None)
    """
    for name, (kind, attributes) in ACTIVATION_MODULES.items():
        if is_plain(module, kind) and all(getattr(module, key) == value for key, value in attributes.items()):
            if name != "leaky_relu":
                return name, DEFAULT_NEGATIVE_SLOPE
            try:
                return name, slope_value(module.negative_slope)
            except (TypeError, ValueError):  # a slope the fused layers refuse (nan, inf, beyond float32)
                return None
    return None


def function_activation(function: Callable, args: Sequence[object],
                        kwargs: Dict[str, object]) -> Optional[Tuple[str, float]]:
    """(activation name, negative_slope) for ``function(input, *args, **kwargs)``, a call of
    :data:`FUNCTION_ACTIVATIONS` whose settings the kernels implement, else None: ``approximate``
    ``"none"`` or ``"tanh"``, a slope the fused layers take, never ``inplace`` (conservatively: the
    in-place form could be meant for the Linear's output that other code also reads).

    Example:
        >>> function_activation(F.gelu, (), {"approximate": "tanh"}), function_activation(F.leaky_relu, (0.2,), {})
        (('gelu_tanh', 0.01), ('leaky_relu', 0.2))
        >>> function_activation(F.relu, (), {"inplace": True}) is None
        True
    """
    name, parameters = FUNCTION_ACTIVATIONS[function]
    if len(args) > len(parameters) or set(kwargs) - set(parameters[len(args):]):
        return None  # a call eager would refuse, or a setting this table does not know
    settings = {**dict(zip(parameters, args)), **kwargs}
    if settings.get("inplace", False) is not False:
        return None
    if name == "gelu":
        approximate = settings.get("approximate", "none")
        if approximate not in ("none", "tanh"):  # also a value computed in forward (a graph node)
            return None
        return ("gelu" if approximate == "none" else "gelu_tanh"), DEFAULT_NEGATIVE_SLOPE
    slope = settings.get("negative_slope", DEFAULT_NEGATIVE_SLOPE)
    if isinstance(slope, bool) or not isinstance(slope, (int, float)):  # a graph node, a tensor
        return None
    try:
        return name, slope_value(slope)
    except (TypeError, ValueError):  # a slope the fused layers refuse (nan, inf, beyond float32)
        return None


def dropout_of(module: nn.Module) -> Optional[float]:
    """The probability of an ``nn.Dropout`` the kernels can apply, else None (``p = 1`` and a ``p``
    within 2^-33 of it included)."""
    if not is_plain(module, nn.Dropout):
        return None
    try:
        return dropout_probability(module.p)
    except (TypeError, ValueError):  # p = 1, or a p torch takes that is no float (a tensor, a bool)
        return None


def dropout_joining(linear: nn.Module, module: nn.Module) -> Optional[float]:
    """The probability of ``module`` if it is a Dropout that can join ``linear``'s fused layer: one
    :func:`dropout_of` takes, in ``linear``'s train/eval mode (a fused layer has one mode; a Dropout
    switched on or off by itself stays a Dropout), else None."""
    p = dropout_of(module)
    return p if p is not None and module.training == linear.training else None


class Layer(NamedTuple):
    """One parsed ``Linear (activation) (Dropout)`` layer."""

    linear: nn.Linear
    activation: str  # a name of ACTIVATIONS ("identity" when none follows)
    slope: float  # leaky_relu's negative slope (the default for every other activation)
    dropout: float  # the probability of the Dropout that follows, 0.0 when none does


def is_plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` is exactly an ``nn.Linear`` holding only its weight and bias, without hooks
    (a fused layer can replace it; an extra parameter, buffer, submodule or attribute would be lost)."""
    return is_plain(module, nn.Linear)


def linear_dtype_problem(linear: nn.Linear) -> Optional[str]:
    """Why the kernels cannot compute ``linear`` in its dtype, or None if they can (:data:`DTYPES`).

    Example:
        >>> linear_dtype_problem(nn.Linear(2, 2)) is None
        True
        >>> linear_dtype_problem(nn.Linear(2, 2, dtype=torch.complex64))
        'its weight is torch.complex64; the fused kernels compute in float32, float64, bfloat16 or float16'
    """
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor):  # deleted or set to None
        return "it has no weight tensor"
    dtype = weight.dtype
    if dtype in DTYPES:
        return None
    names = [str(d).replace("torch.", "") for d in DTYPES]
    return f"its weight is {dtype}; the fused kernels compute in {', '.join(names[:-1])} or {names[-1]}"


def fusable_linear(module: nn.Module) -> bool:
    """Whether a fused layer can replace ``module``: :func:`is_plain_linear`, in a dtype the kernels
    compute in (a complex Linear, say, stays as it is)."""
    return is_plain_linear(module) and linear_dtype_problem(module) is None


def link_mismatch(before: nn.Module, after: nn.Module) -> Optional[str]:
    """Why the linear layer ``after`` (an ``nn.Linear`` or a ``FusedLinear``) cannot follow ``before``
    in one fused op, or None if it can: its inputs must be ``before``'s outputs, in one dtype on one
    device.

    Example:
        >>> link_mismatch(nn.Linear(4, 8), nn.Linear(5, 2))
        '8 features out of one layer, 5 into the next'
    """
    if before.out_features != after.in_features:
        return f"{before.out_features} features out of one layer, {after.in_features} into the next"
    a, b = before.weight, after.weight
    if a.dtype != b.dtype or a.device != b.device:
        return (f"layers in {a.dtype} on {a.device} and {b.dtype} on {b.device}: one fused op runs in one dtype on "
                "one device")
    return None


def chain_mismatch(run: Sequence[Layer], layer: Layer) -> Optional[str]:
    """Why `layer` cannot join the fused op of the layers in `run` (non-empty), or None if it can."""
    if (why := link_mismatch(run[-1].linear, layer.linear)) is not None:
        return why
    # Any earlier leaky_relu of the run, not only the adjacent layer: one fused op has one slope.
    run_slope = next((earlier.slope for earlier in run if earlier.activation == "leaky_relu"), None)
    if layer.activation == "leaky_relu" and run_slope is not None and run_slope != layer.slope:
        return f"LeakyReLU slopes {run_slope} and {layer.slope} (one fused op has one slope)"
    return None


def runs_in_sequence(module: nn.Module) -> bool:
    """Whether ``module`` is an nn.Sequential that runs its modules one after the other as
    Sequential's own forward does (a subclass's forward or ``__iter__``, or a forward set on the
    instance, may compute something else)."""
    return (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
            and type(module).__iter__ is nn.Sequential.__iter__ and "forward" not in vars(module))


def describe(module: nn.Module) -> str:
    """How a fusion report names a module it replaced.

    Example:
        >>> describe(nn.Linear(784, 256)), describe(nn.Dropout(0.2)), describe(nn.ReLU())
        ('Linear(784, 256)', 'Dropout(0.2)', 'ReLU')
    """
    if type(module) is nn.Linear:
        return f"Linear({module.in_features}, {module.out_features})"
    if type(module) is nn.Dropout:
        return f"Dropout({module.p})"
    return type(module).__name__


def parse_layers(modules: List[nn.Module], start: int,
                 pinned: AbstractSet[int] = frozenset()) -> Tuple[List[Layer], int]:
    """The longest fusable run of ``Linear (activation) (Dropout)`` layers from ``modules[start]``,
    and the index just past it.

    A Dropout joins its Linear as :func:`dropout_joining` says. Modules whose ``id`` is in
    ``pinned`` (called from elsewhere too) are never absorbed.

    Example:
        >>> modules = [nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2), nn.Softmax(-1)]
        >>> layers, end = parse_layers(modules, 0)
        >>> [(layer.activation, layer.dropout) for layer in layers], end
        ([('relu', 0.1), ('identity', 0.0)], 4)
    """
    layers: List[Layer] = []
    i = start
    def usable(k: int) -> bool:
        return k < len(modules) and id(modules[k]) not in pinned

    while usable(i) and fusable_linear(modules[i]):
        j = i + 1
        activation, slope, p = "identity", DEFAULT_NEGATIVE_SLOPE, 0.0
        if usable(j) and (found := activation_of(modules[j])) is not None:
            activation, slope = found
            j += 1
        if usable(j) and (found_p := dropout_joining(modules[i], modules[j])) is not None:
            p = found_p
            j += 1
        layer = Layer(modules[i], activation, slope, p)
        if layers and chain_mismatch(layers, layer) is not None:
            break
        layers.append(layer)
        i = j
    return layers, i

