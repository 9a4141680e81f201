"""``pyfastnn.fuse(model)``: swaps ``Linear -> activation (-> Dropout)`` runs for fused modules.

Two passes, innermost modules first:

* inside every ``nn.Sequential`` (nested ones too), each maximal run of ``nn.Linear``, optional
  supported activation, optional ``nn.Dropout`` layers becomes one :class:`~pyfastnn.FusedMLP`
  (two or more layers) or :class:`~pyfastnn.FusedLinear` (one layer); a Sequential that is one
  run altogether is replaced by a FusedMLP with the same state-dict keys;
* any other module with ``nn.Linear`` children (say ``forward`` calls ``self.layer1``, then
  ``self.relu``) is traced with ``torch.fx``; each Linear whose only use is a supported activation
  (then optionally an ``nn.Dropout``) becomes a FusedLinear under the Linear's own name, and the
  module becomes a ``torch.fx.GraphModule``. Modules that cannot be traced are left as they are.

The fused modules hold the very same parameter tensors; everything else is left alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .nn import FusedLinear, FusedMLP

__all__ = ["fuse", "FusedRun"]


@dataclass(frozen=True)
class FusedRun:
    """One replacement made by :func:`fuse`: where, which modules, and what replaced them."""

    path: str                 # qualified name of the new module in the returned model
    replaced: Tuple[str, ...]  # what it replaced, e.g. ("Linear(784, 256)", "ReLU", "Dropout(0.2)", ...)
    module: str               # "FusedMLP" or "FusedLinear"

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {' -> '.join(self.replaced)} => {self.module}"


def _activation_of(module: nn.Module) -> Optional[Tuple[str, float]]:
    """(activation name, negative_slope) for the activation modules the kernels implement, else None.
    Exact types only: a subclass may change what forward does."""
    kind = type(module)
    if kind is nn.ReLU:
        return "relu", 0.01
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if kind is nn.GELU:
        return ("gelu" if module.approximate == "none" else "gelu_tanh"), 0.01
    simple = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.SiLU: "silu", nn.Identity: "identity"}
    return (simple[kind], 0.01) if kind in simple else None


def _dropout_of(module: nn.Module) -> Optional[float]:
    if type(module) is nn.Dropout and 0.0 <= module.p < 1.0:
        return float(module.p)
    return None


# One parsed layer: (linear, activation name, negative_slope, dropout probability).
Layer = Tuple[nn.Linear, str, float, float]


def _chains(previous: Layer, layer: Layer) -> bool:
    """Whether `layer` can run in the same fused op as `previous`."""
    a, b = previous[0], layer[0]
    same_slope = previous[1] != "leaky_relu" or layer[1] != "leaky_relu" or previous[2] == layer[2]
    return (a.out_features == b.in_features and a.weight.dtype == b.weight.dtype
            and a.weight.device == b.weight.device and same_slope)


def parse_layers(modules: List[nn.Module], start: int) -> Tuple[List[Layer], int]:
    """The longest fusable run of ``Linear (activation) (Dropout)`` layers from ``modules[start]``,
    and the index just past it."""
    layers: List[Layer] = []
    i = start
    while i < len(modules) and type(modules[i]) is nn.Linear:
        j = i + 1
        activation, slope, p = "identity", 0.01, 0.0
        if j < len(modules) and (found := _activation_of(modules[j])) is not None:
            activation, slope = found
            j += 1
        if j < len(modules) and (found_p := _dropout_of(modules[j])) is not None:
            p = found_p
            j += 1
        layer = (modules[i], activation, slope, p)
        if layers and not _chains(layers[-1], layer):
            break
        layers.append(layer)
        i = j
    return layers, i


def _describe(module: nn.Module) -> str:
    if type(module) is nn.Linear:
        return f"Linear({module.in_features}, {module.out_features})"
    if type(module) is nn.Dropout:
        return f"Dropout({module.p})"
    return type(module).__name__


def _fused_module(layers: List[Layer], as_mlp: bool = False) -> nn.Module:
    fused = [FusedLinear.from_linear(linear, activation, negative_slope=slope, dropout=p)
             for linear, activation, slope, p in layers]
    module = fused[0] if len(fused) == 1 and not as_mlp else FusedMLP.from_layers(fused)
    return module.train(layers[0][0].training)  # a model fused in eval() stays in eval()


def _worth_fusing(layers: List[Layer]) -> bool:
    """A lone Linear with nothing after it gains nothing from fusion."""
    return bool(layers) and (len(layers) > 1 or layers[0][1] != "identity" or layers[0][3] > 0.0)


def _fuse_sequential(seq: nn.Sequential, path: str, report: List[FusedRun]) -> nn.Module:
    modules = list(seq)
    layers, end = parse_layers(modules, 0)
    if _worth_fusing(layers) and end == len(modules):
        # The whole Sequential is one run: a FusedMLP takes its place, and its layers take the
        # Linear modules' indices, so the state-dict keys stay exactly the same.
        fused = _fused_module(layers, as_mlp=True)
        if list(fused.state_dict()) == list(seq.state_dict()):
            report.append(FusedRun(path.rstrip("."), tuple(_describe(m) for m in modules), "FusedMLP"))
            return fused
    kept: List[nn.Module] = []
    i = 0
    while i < len(modules):
        layers, end = parse_layers(modules, i)
        if _worth_fusing(layers):
            fused = _fused_module(layers)
            report.append(FusedRun(f"{path}{len(kept)}", tuple(_describe(m) for m in modules[i:end]),
                                   type(fused).__name__))
            kept.append(fused)
            i = end
        else:
            kept.append(modules[i])
            i += 1
    if len(kept) != len(modules):
        # Renumbered 0..n-1 like any Sequential (gaps would make Sequential.append overwrite).
        for name in list(seq._modules):
            del seq._modules[name]
        for index, module in enumerate(kept):
            seq.add_module(str(index), module)
    return seq


# Functions (and tensor methods) the traced pass accepts as activations when called on the Linear's
# output alone.
_FUNCTION_ACTIVATIONS = {torch.relu: "relu", F.relu: "relu", torch.sigmoid: "sigmoid", torch.tanh: "tanh",
                         F.silu: "silu", F.gelu: "gelu"}
_METHOD_ACTIVATIONS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}


class _ShallowTracer(torch.fx.Tracer):
    """Keeps every submodule a leaf: each module level is fused on its own."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _node_activation(gm: torch.fx.GraphModule, node: torch.fx.Node, source: torch.fx.Node):
    """(name, slope) when `node` applies a supported activation to `source` and nothing else."""
    if node.args[:1] != (source,) or len(node.args) > 1:
        return None
    if node.op == "call_module":
        return None if node.kwargs else _activation_of(gm.get_submodule(node.target))
    if node.op == "call_function" and node.target in _FUNCTION_ACTIVATIONS:
        if node.kwargs.get("inplace", False) or set(node.kwargs) - {"inplace"}:
            return None
        return _FUNCTION_ACTIVATIONS[node.target], 0.01
    if node.op == "call_method" and node.target in _METHOD_ACTIVATIONS and not node.kwargs:
        return _METHOD_ACTIVATIONS[node.target], 0.01
    return None


def _fuse_traced(module: nn.Module, path: str, report: List[FusedRun]) -> nn.Module:
    try:
        graph = _ShallowTracer().trace(module)
    except Exception:  # data-dependent control flow and the like: leave the module alone
        return module
    gm = torch.fx.GraphModule(module, graph, class_name=type(module).__name__)
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not nn.Linear:
            continue
        if len(node.users) != 1:
            continue
        act_node = next(iter(node.users))
        activation = _node_activation(gm, act_node, node)
        if activation is None:
            continue
        last, p, described = act_node, 0.0, [_describe(gm.get_submodule(node.target)), str(act_node.target)]
        if len(act_node.users) == 1:
            after = next(iter(act_node.users))
            if (after.op == "call_module" and after.args == (act_node,) and not after.kwargs
                    and (found_p := _dropout_of(gm.get_submodule(after.target))) is not None):
                p = found_p
                last = after
                described.append(_describe(gm.get_submodule(after.target)))
        linear = gm.get_submodule(node.target)
        fused = FusedLinear.from_linear(linear, activation[0], negative_slope=activation[1], dropout=p)
        fused.train(linear.training)
        # The fused layer takes the Linear's name, so its parameters keep their state-dict keys.
        owner_name, _, attr = node.target.rpartition(".")
        setattr(gm.get_submodule(owner_name) if owner_name else gm, attr, fused)
        last.replace_all_uses_with(node)
        for dead in ([last, act_node] if last is not act_node else [act_node]):
            gm.graph.erase_node(dead)
        report.append(FusedRun(f"{path}{node.target}", tuple(described), "FusedLinear"))
        changed = True
    if not changed:
        return module
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.train(module.training)
    return gm


def _fuse_tree(module: nn.Module, path: str, report: List[FusedRun]) -> nn.Module:
    if isinstance(module, (FusedLinear, FusedMLP)):
        return module
    for name, child in list(module.named_children()):
        new_child = _fuse_tree(child, f"{path}{name}.", report)
        if new_child is not child:
            setattr(module, name, new_child)
    if isinstance(module, nn.Sequential):
        return _fuse_sequential(module, path, report)
    if any(type(child) is nn.Linear for child in module.children()):
        return _fuse_traced(module, path, report)
    return module


def fuse(model: nn.Module, inplace: bool = False, *, report: Optional[list] = None,
         verbose: bool = False) -> nn.Module:
    """Returns ``model`` with its ``Linear -> activation (-> Dropout)`` runs fused.

    Supported activations: ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.Sigmoid``, ``nn.Tanh``, ``nn.GELU``
    (both forms), ``nn.SiLU``, ``nn.Identity`` (and, in traced modules, ``torch.relu``,
    ``F.relu``, ``torch.sigmoid``, ``torch.tanh``, ``F.silu``, ``F.gelu``). Outputs equal the original
    model's (to float rounding) in ``eval()``, and gradients too in ``train()`` without dropout;
    dropout masks are drawn differently from ``nn.Dropout``'s but with the same distribution.

    Args:
        model: any module; it is deep-copied first unless ``inplace``.
        inplace: modify ``model`` itself (the fused modules then share its parameter tensors).
        report: a list that receives one :class:`FusedRun` per replacement.
        verbose: print the replacements.

    Example:
        >>> import torch, pyfastnn
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10))
        >>> runs = []
        >>> fused = pyfastnn.fuse(model, report=runs)
        >>> print(runs[0])
        <root>: Linear(784, 256) -> ReLU -> Dropout(0.2) -> Linear(256, 10) => FusedMLP
        >>> fused.load_state_dict(model.state_dict())  # the same keys
        <All keys matched successfully>
        >>> x = torch.randn(3, 784)
        >>> torch.allclose(fused.eval()(x), model.eval()(x), atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    runs: List[FusedRun] = []
    model = _fuse_tree(model, "", runs)
    if verbose:
        for run in runs:
            print(f"pyfastnn.fuse: {run}")
        if not runs:
            print("pyfastnn.fuse: nothing to fuse")
    if report is not None:
        report.extend(runs)
    return model
