"""``pyfastnn.fuse(model)``: swaps ``Linear -> activation (-> Dropout)`` runs for fused modules.

Two passes, innermost modules first:

* inside every ``nn.Sequential`` (nested ones too), each maximal run of ``nn.Linear``, optional
  supported activation, optional ``nn.Dropout`` layers becomes one :class:`~pyfastnn.FusedMLP`
  (two or more layers) or :class:`~pyfastnn.FusedLinear` (one layer); a Sequential that is one
  run altogether (and holds no parameter, buffer or attribute of its own) is replaced by a
  FusedMLP with the same state-dict keys. In a Sequential that
  keeps other modules, the fused module takes the index of the run's first module and the
  modules it absorbed become :class:`Absorbed` placeholders, so indices stay; the Sequential's
  state dict keeps the original keys (its state-dict hooks map ``"1.3.weight"`` of a FusedMLP at 1
  to ``"4.weight"``), and its pre-hooks refuse a run whose slots were changed afterwards
  (:class:`FusedSlots`);
* any other module with ``nn.Linear`` children (say ``forward`` calls ``self.layer1``, then
  ``self.relu``) is traced with ``torch.fx``; each Linear called at one place only, whose only use
  is a supported activation (then optionally an ``nn.Dropout``), becomes a FusedLinear under the
  Linear's own name, and the module becomes a ``torch.fx.GraphModule``. Modules that cannot be
  traced, modules whose traced graph differs between ``train()`` and ``eval()`` (a
  ``self.training`` branch or ``F.dropout(..., self.training)``, a child's flag too; a graph would
  freeze one mode), and forwards doing what a graph does not record (taking more than one input,
  assigning to the module, setting grad mode, inference mode or autocast, making tensors that differ
  between traces, reading mutable or class-level values or missing attributes) are left as they
  are, and so is a Sequential whose ``forward`` or ``__iter__`` is not Sequential's (a subclass's,
  or a forward set on the instance). Tracing runs on a copy sharing the
  tensors, so forward's writes never reach the model. The immutable attributes a traced forward
  reads are frozen into its graph, whose first step raises if one changed.

Modules with hooks are never absorbed (fusion would bypass the hooks), nor replaced (a Sequential
with hooks is fused in place, a traced module with hooks is left as it is); :func:`fuse` warns about
the Linears and the modules holding Linears it leaves for their hooks (an activation or Dropout with
hooks just stays). A Linear in a dtype the kernels lack (complex, say) is left as it is. A module
some ``forward`` calls from outside its owner (``self.block.fc(x)``) is never absorbed either: that
call would get the fused activation too (such calls are read from the traced graph and from the
source of the module's class, every method of it), and neither is a module some module also holds
outside the module tree (a plain attribute, a list, a ``functools.partial``: whoever calls it there
would go on calling the original). The fused modules hold the very same parameter
tensors; everything else is left alone.
"""

from __future__ import annotations

import ast
import collections.abc
import contextlib
import copy
import enum
import functools
import inspect
import numbers
import operator
import re
import sys
import textwrap
import threading
import types
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, NamedTuple, Optional, Set, Tuple

import torch
from torch import nn

from ._ops import DEFAULT_NEGATIVE_SLOPE, check_flag
from ._patterns import (ACTIVATION_MODULES, FUNCTION_ACTIVATIONS, METHOD_ACTIVATIONS, Layer, activation_of,
                        dropout_joining, dropout_of, fusable_linear, has_hooks, is_plain, linear_dtype_problem,
                        parse_layers)
from .nn import FusedLinear, FusedMLP, fused_layers

__all__ = ["fuse", "FusedRun", "Absorbed", "SAFE_GLOBALS"]


@dataclass(frozen=True)
class FusedRun:
    """One replacement made by :func:`fuse`: where, which modules, and what replaced them.

    Example:
        >>> from torch import nn
        >>> from pyfastnn import fuse
        >>> report = []
        >>> _ = fuse(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), report=report)
        >>> print(report[0])
        <root>: Linear(4, 8) -> ReLU -> Linear(8, 2) => FusedMLP
    """

    path: str                 # qualified name of the new module in the returned model
    replaced: Tuple[str, ...]  # what it replaced, e.g. ("Linear(784, 256)", "ReLU", "Dropout(0.2)", ...)
    module: str               # "FusedMLP" or "FusedLinear"

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {' -> '.join(self.replaced)} => {self.module}"


def _describe(module: nn.Module) -> str:
    if type(module) is nn.Linear:
        return f"Linear({module.in_features}, {module.out_features})"
    if type(module) is nn.Dropout:
        return f"Dropout({module.p})"
    return type(module).__name__


class Absorbed(nn.Identity):
    """Stands in a partly fused Sequential at the index of a module :func:`fuse` folded into the
    fused module before it, passing its input through. Where that module was an ``nn.Linear``, its
    ``weight`` and ``bias`` live on a layer of the fused module, under that layer's own names:
    assigned or registered here (say by ``torch.func.functional_call`` given the original keys), they
    would change nothing, so they are refused, never ignored. Hooks registered here raise
    ``RuntimeError`` at the call: they would see the fused run's output, not the module's.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from pyfastnn import fuse
        >>> seq = fuse(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Softmax(-1)))
        >>> seq[2]
        Absorbed(nn.Linear fused into module 0 as its layer '2')
        >>> seq[2].weight = nn.Parameter(torch.zeros(2, 8))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        AttributeError: this module stands for an nn.Linear that fuse() folded into module 0, whose layer '2' holds its weight (0.2.weight ...
    """

    def __init__(self, fused_into: Optional[str] = None, layer_name: Optional[str] = None,
                 has_bias: bool = True) -> None:
        super().__init__()
        # fused_into: the fused module's path in the model fuse() returned; layer_name: its layer
        # holding the parameters, where the absorbed module was an nn.Linear.
        self.fused_into, self.layer_name, self.has_bias = fused_into, layer_name, has_bias

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # nn.Module.__call__ runs hooks only where some are registered; without any this costs nothing.
        if self._forward_pre_hooks or self._forward_hooks or self._backward_hooks or self._backward_pre_hooks:
            where = f" into module {self.fused_into}" if self.fused_into is not None else ""
            raise RuntimeError(f"pyfastnn: this Absorbed placeholder has hooks, but fuse() folded the module that "
                               f"stood here{where}, which computes it; the placeholder only passes that module's "
                               f"output on, so hooks here would never see the absorbed module's input, output or "
                               f"gradient. Register them on the model before fuse() (a module with hooks is left "
                               f"unfused), or on the fused module")
        return input

    def _refuse(self, name: str) -> None:
        if name not in ("weight", "bias") or self.__dict__.get("layer_name") is None:
            return
        where = f"this module stands for an nn.Linear that fuse() folded into module {self.fused_into}"
        if name == "bias" and not self.has_bias:
            raise AttributeError(f"{where}; that nn.Linear had no bias, and one set here would change nothing")
        raise AttributeError(f"{where}, whose layer {self.layer_name!r} holds its {name} "
                             f"({self.fused_into}.{self.layer_name}.{name} in the named_parameters() of the model "
                             f"fuse() returned, the name torch.func.functional_call takes); set here, it would "
                             f"change nothing")

    def __setattr__(self, name: str, value) -> None:
        self._refuse(name)
        super().__setattr__(name, value)

    def register_parameter(self, name: str, param: Optional[nn.Parameter]) -> None:
        self._refuse(name)
        super().register_parameter(name, param)

    def register_buffer(self, name: str, tensor: Optional[torch.Tensor], persistent: bool = True) -> None:
        self._refuse(name)
        super().register_buffer(name, tensor, persistent)

    def extra_repr(self) -> str:
        if self.fused_into is None:
            return ""
        if self.layer_name is None:
            return f"fused into module {self.fused_into}"
        return f"nn.Linear fused into module {self.fused_into} as its layer {self.layer_name!r}"


def _runs_as(module: nn.Module, target: nn.Module) -> bool:
    """Whether ``module`` is ``target`` or wraps it alone, through modules of one child each
    (``checkpoint_wrapper``, FSDP's wrapper, DDP), which run it as it is."""
    while module is not target:
        children = list(module.children())
        if len(children) != 1:
            return False
        module = children[0]
    return True


class FusedSlots:
    """Keeps a partly fused Sequential as :func:`fuse` left it: each run's fused module computes the
    whole run from the index of its first module, so a module put in a placeholder's place
    (``seq[3] = nn.Linear(...)``), a fused module replaced, or indices shifted by ``insert`` or
    ``del`` would run out of place, and the original state-dict keys (:class:`SaveOriginalKeys`)
    would name other modules. Registered on the Sequential as its forward, state-dict and
    load-state-dict pre-hook (all three called with the Sequential first): each call, ``state_dict()``
    and ``load_state_dict()`` checks that every slot holds the module fuse() put there, or a wrapper
    that runs just that module (say ``apply_activation_checkpointing``'s), and raises ``RuntimeError``
    naming the slot otherwise. ``slots`` maps each slot's name to (that module, the name of its run's
    first slot); ``path`` is the Sequential's in the model fuse() returned."""

    def __init__(self, slots: Dict[str, Tuple[nn.Module, str]], path: str = "") -> None:
        self.slots, self.path = slots, path

    def __call__(self, seq: nn.Module, *hook_args) -> None:
        modules = seq._modules  # a dict lookup per slot: getattr would take nn.Module's slow __getattr__
        for name, (module, run_start) in self.slots.items():
            current = modules.get(name)
            if current is module:
                continue
            if current is not None and _runs_as(current, module):
                self.slots[name] = (current, run_start)  # a wrapper, checked once
                continue
            run = [slot for slot, (_, start) in self.slots.items() if start == run_start]
            where = f"Sequential {self.path!r}" if self.path else "this Sequential"
            raise RuntimeError(
                f"pyfastnn: module {name!r} of {where} was replaced, moved or deleted after fuse() folded modules "
                f"{run[0]}..{run[-1]} into module {run_start}, which computes all of them: the Sequential would no "
                f"longer compute what its modules say, and state_dict() would save the wrong modules under the "
                f"original keys. Make the change on the model before fuse() and fuse it again, or put back the "
                f"module fuse() left there")


def _fused_module(layers: List[Layer], fusion: "_Fusion", as_mlp: bool = False) -> nn.Module:
    # Each fused layer takes its Linear's train/eval mode (parse_layers absorbed only Dropouts in
    # that mode), so a model fused in eval() stays in eval(). A Linear used at several places becomes
    # one FusedLinear, wherever its uses are (_Fusion.made).
    fused = fused_layers(layers, fusion.made)
    return fused[0] if len(fused) == 1 and not as_mlp else FusedMLP.from_layers(fused)


def _shared_modules_to_leave(model: nn.Module, pinned: Set[int]) -> Set[int]:
    """ids of the modules held at several places of ``model`` that fusion would make several of,
    left as they are everywhere:

    - a Linear that no one fused layer can stand for at all its places: fused at one and not at
      another (held there by a module other than a plain Sequential, whose forward may call it in
      any way, or outside any run worth fusing), or followed by another activation or dropout. One
      fused alike at all its places becomes one FusedLinear (fused_layers);
    - an activation or Dropout module with a setting (a LeakyReLU's slope, a GELU's form, a Dropout's
      p) absorbed at some of its places only: the fused layers would copy the setting, which would no
      longer follow the module that stays. Absorbed at all of them, no module is left to differ.

    Leaving one alone can change the runs around it, so the set grows until it is stable."""
    leave: Set[int] = set()
    while True:
        linear_places: Dict[int, List[Optional[Tuple]]] = {}
        absorbed_at: Dict[int, List[bool]] = {}  # a module with settings: absorbed at each of its places?
        for module in model.modules():
            children = list(module._modules.values())
            fused_at, absorbed = _fused_places(children, pinned | leave) if _is_sequential(module) else ({}, set())
            for i, child in enumerate(children):
                if isinstance(child, nn.Linear):
                    linear_places.setdefault(id(child), []).append(fused_at.get(i))
                elif child is not None and not isinstance(child, _STATELESS_ACTIVATIONS) and (
                        activation_of(child) is not None or dropout_of(child) is not None):
                    absorbed_at.setdefault(id(child), []).append(i in absorbed)
        more = {linear for linear, found in linear_places.items()
                if len(found) > 1 and (None in found or len(set(found)) > 1)}
        more |= {other for other, found in absorbed_at.items() if len(found) > 1 and not all(found)}
        more -= leave
        if not more:
            return leave
        leave |= more


def _runs(modules: List[nn.Module], pinned: Set[int]) -> Iterator[Tuple[int, int, List[Layer], List[int]]]:
    """The runs of ``modules`` (a Sequential's) worth fusing, first to last, as _fuse_sequential fuses
    them: each one's first index, the index past it, its layers and the indices of their Linears."""
    i = 0
    while i < len(modules):
        layers, end = parse_layers(modules, i, pinned)
        if not _worth_fusing(layers):
            i += 1
            continue
        yield i, end, layers, [j for j in range(i, end) if any(modules[j] is layer.linear for layer in layers)]
        i = end


def _fused_places(modules: List[nn.Module], pinned: Set[int]) -> Tuple[Dict[int, Tuple], Set[int]]:
    """Where _fuse_sequential fuses in ``modules`` (a Sequential's): the positions of the Linears it
    fuses, each with the (activation, slope, dropout) after it, and the positions of the modules it
    absorbs after them."""
    fused_at: Dict[int, Tuple] = {}
    absorbed: Set[int] = set()
    for start, end, layers, linears in _runs(modules, pinned):
        fused_at.update((j, tuple(layer[1:])) for j, layer in zip(linears, layers))
        absorbed |= set(range(start, end)) - set(linears)
    return fused_at, absorbed


def _worth_fusing(layers: List[Layer]) -> bool:
    """A lone Linear with nothing after it gains nothing from fusion."""
    return bool(layers) and (len(layers) > 1 or layers[0].activation != "identity" or layers[0].dropout > 0.0)


def _rename(key: str, table: Dict[str, str], levels: int) -> str:
    parts = key.split(".")
    head = ".".join(parts[:levels])
    if len(parts) > levels and head in table:
        return table[head] + "." + ".".join(parts[levels:])
    return key


class SaveOriginalKeys:
    """State-dict post-hook of a Sequential whose runs became FusedMLP modules in place: saves the
    layer that stood at index ``i`` of the original Sequential as ``"i.*"``, not as
    ``"<FusedMLP index>.<layer index>.*"``. ``renames`` maps ``{"4": "1.3", ...}``."""

    def __init__(self, renames: Dict[str, str]) -> None:
        self.originals = {fused: original for original, fused in renames.items()}

    def __call__(self, module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
        entries = [(k, state_dict.pop(k)) for k in [k for k in state_dict if k.startswith(prefix)]]
        for key, value in entries:  # re-inserted in the same order, renamed where needed
            state_dict[prefix + _rename(key[len(prefix):], self.originals, levels=2)] = value


class LoadOriginalKeys:
    """The load_state_dict pre-hook matching :class:`SaveOriginalKeys` (original keys load; so do the
    module's own, those of its ``named_parameters()``); :class:`NameOriginalKeys` is its post-hook."""

    def __init__(self, renames: Dict[str, str]) -> None:
        self.renames = dict(renames)
        self.originals = {fused: original for original, fused in renames.items()}
        self.prefix = ""  # the module's prefix in the load under way
        self.error_msgs: List[str] = []  # ... and its error messages

    def __call__(self, module: nn.Module, state_dict, prefix: str, local_metadata, strict, missing_keys,
                 unexpected_keys, error_msgs) -> None:
        self.prefix, self.error_msgs = prefix, error_msgs
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if ".".join(key[len(prefix):].split(".")[:2]) in self.originals:  # already the module's own key
                continue
            renamed = prefix + _rename(key[len(prefix):], self.renames, levels=1)
            if renamed != key and renamed not in state_dict:  # given both ways, the original stays unexpected
                state_dict[renamed] = state_dict.pop(key)

    def _original(self, key: str) -> str:
        return self.prefix + _rename(key[len(self.prefix):], self.originals, levels=2) if key.startswith(self.prefix) else key

    def name_original_keys(self, module: nn.Module, incompatible_keys) -> None:
        # (Once the post-hook itself: models pickled then still call it so.)
        for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
            keys[:] = [self._original(key) for key in keys]
        self.error_msgs[:] = [_KEY_IN_LOAD_ERROR.sub(lambda m: m[1] + self._original(m[2]), message)
                              for message in self.error_msgs]
        self.error_msgs = []  # the load is over: its list is not kept alive


#: The key in torch's load_state_dict errors: ``size mismatch for 0.2.weight: ...``, ``While copying
#: the parameter named "0.2.weight", ...``.
_KEY_IN_LOAD_ERROR = re.compile(r'^(size mismatch for |While \w+ the parameter named ")([^\s":]+)')


class NameOriginalKeys:
    """The load_state_dict post-hook of :class:`LoadOriginalKeys`: missing and unexpected keys, and
    the keys torch's errors name, are reported by their original names too. (An object rather than
    the bound method, which pickle would store through ``getattr``, a global ``torch.load(...,
    weights_only=True)`` refuses.)"""

    def __init__(self, loader: LoadOriginalKeys) -> None:
        self.loader = loader

    def __call__(self, module: nn.Module, incompatible_keys) -> None:
        self.loader.name_original_keys(module, incompatible_keys)


#: The classes a saved pyfastnn module may hold beyond the user's own modules: for loading a whole
#: model with ``torch.load(path, weights_only=True)`` under ``torch.serialization.safe_globals``
#: (with the model's own classes, ``nn.Sequential`` and the like). Torch's ``_WrappedHook`` wraps
#: the hooks a partly fused Sequential keeps its state-dict keys with.
SAFE_GLOBALS: Tuple[type, ...] = (FusedLinear, FusedMLP, Absorbed, FusedSlots, SaveOriginalKeys, LoadOriginalKeys,
                                  NameOriginalKeys) + tuple(
    hook for hook in [getattr(torch.nn.modules.module, "_WrappedHook", None)] if hook is not None)


def _fuse_sequential(seq: nn.Sequential, path: str, fusion: "_Fusion", replace_whole: bool = True) -> nn.Module:
    names, modules = list(seq._modules), list(seq._modules.values())
    report = fusion.report
    layers, end = parse_layers(modules, 0, fusion.pinned)
    # A FusedMLP in the Sequential's place would lose any parameter, buffer or attribute of its own.
    if replace_whole and _worth_fusing(layers) and end == len(modules) and is_plain(seq, nn.Sequential, True):
        # The whole Sequential is one run: a FusedMLP takes its place, and its layers take the
        # Linear modules' indices, so the state-dict keys stay exactly the same.
        fused = _fused_module(layers, fusion, as_mlp=True)
        if list(fused.state_dict()) == list(seq.state_dict()):
            report.append(FusedRun(path.rstrip("."), tuple(_describe(m) for m in modules), "FusedMLP"))
            return fused
    # Otherwise each run is replaced where it stands: the fused module under the name of the run's
    # first module, Absorbed placeholders under the others' (indices, len() and append() keep working).
    renames: Dict[str, str] = {}
    slots: Dict[str, Tuple[nn.Module, str]] = {}
    for i, end, layers, linears in _runs(modules, fusion.pinned):
        fused = _fused_module(layers, fusion)
        report.append(FusedRun(f"{path}{names[i]}", tuple(_describe(m) for m in modules[i:end]), type(fused).__name__))
        setattr(seq, names[i], fused)
        slots[names[i]] = (fused, names[i])
        # Every layer's name, a layer used twice (one Linear at two places) under both.
        layer_names = dict(zip(linears, fused._modules)) if isinstance(fused, FusedMLP) else {}
        for j in range(i + 1, end):
            if j in layer_names:
                placeholder = Absorbed(f"{path}{names[i]}", layer_names[j], has_bias=modules[j].bias is not None)
            else:
                placeholder = Absorbed(f"{path}{names[i]}")
            setattr(seq, names[j], placeholder)
            slots[names[j]] = (placeholder, names[i])
        for j, layer_name in layer_names.items():
            renames[names[j]] = f"{names[i]}.{layer_name}"
    if slots:
        guard = FusedSlots(slots, path.rstrip("."))
        seq.register_forward_pre_hook(guard)
        seq.register_state_dict_pre_hook(guard)
        seq.register_load_state_dict_pre_hook(guard)
    if renames:
        seq.register_state_dict_post_hook(SaveOriginalKeys(renames))
        loader = LoadOriginalKeys(renames)
        seq.register_load_state_dict_pre_hook(loader)
        seq.register_load_state_dict_post_hook(NameOriginalKeys(loader))
    return seq


def _execution_modes() -> Tuple:
    """The thread's modes a traced graph does not record: grad mode, inference mode, autocast per device."""
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            *((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")))


class _ShallowTracer(torch.fx.Tracer):
    """Keeps every submodule a leaf (each module level is fused on its own), and notes whether the
    modes a graph does not record (grad mode, inference mode, autocast) differ anywhere in ``forward``
    from those the trace began in. :func:`_trace` traces each module twice, in opposite modes, so
    ``with torch.no_grad():``, ``torch.enable_grad()``, ``torch.autocast(...)`` in either sense show
    up in one of the two. (These modes are the thread's own; torch.fx's tracing itself, though,
    patches ``nn.Module.__call__`` for every thread while it runs: see :func:`fuse`.)"""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def trace(self, root, concrete_args=None):
        self.modes = _execution_modes()
        self.switches_modes = False
        graph = super().trace(root, concrete_args)
        self.switches_modes |= _execution_modes() != self.modes
        return graph

    def create_node(self, *args, **kwargs):
        self.switches_modes |= _execution_modes() != self.modes
        return super().create_node(*args, **kwargs)


#: Activation modules without settings (GELU's approximation and LeakyReLU's slope are settings): one
#: shared instance may be absorbed at each of its calls.
_STATELESS_ACTIVATIONS = tuple(kind for name, (kind, attributes) in ACTIVATION_MODULES.items()
                               if not attributes and name != "leaky_relu")


def _node_activation(gm: torch.fx.GraphModule, node: torch.fx.Node, source: torch.fx.Node):
    """(name, slope) when `node` applies a supported activation to `source` and nothing else."""
    if node.args[:1] != (source,) or len(node.args) > 1:
        return None
    if node.op == "call_module":
        return None if node.kwargs else activation_of(gm.get_submodule(node.target))
    if node.op == "call_function" and node.target in FUNCTION_ACTIVATIONS:
        if node.kwargs.get("inplace", False) or set(node.kwargs) - {"inplace"}:
            return None
        return FUNCTION_ACTIVATIONS[node.target], DEFAULT_NEGATIVE_SLOPE
    if node.op == "call_method" and node.target in METHOD_ACTIVATIONS and not node.kwargs:
        return METHOD_ACTIVATIONS[node.target], DEFAULT_NEGATIVE_SLOPE
    return None


@dataclass
class _Trace:
    graph: torch.fx.Graph
    constants: Dict[str, torch.Tensor]  # tensors forward creates: the tracer keeps them as _tensor_constant0...
    reads: Dict[str, object]  # "path.name" -> value: the plain attributes forward read, frozen into the graph
    frozen: Optional[str]  # why the graph cannot stand for forward, if it cannot


#: What every nn.Module holds in its __dict__ (training, _parameters, the hook dicts...): not the user's.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
#: Values a graph may freeze: immutable, with an equality that says whether they changed (numbers
#: include numpy's scalars; functions, like ``self.act = F.relu``, compare by identity).
_FREEZABLE = (type(None), bool, numbers.Number, str, bytes, torch.dtype, torch.device, enum.Enum,
              types.FunctionType, types.BuiltinFunctionType)

_reads = threading.local()  # while a traced forward runs on this thread: {module: (path, plain names)}, reads
_recording_classes: "weakref.WeakKeyDictionary[type, type]" = weakref.WeakKeyDictionary()
_UNFOLLOWABLE = object()  # the value noted for a read no check could follow: never frozen


def _recording_class(cls: type) -> type:
    """The class a module of class `cls` takes while it (or the module that owns it) is traced: it
    notes the plain attributes forward reads, the module's own and its submodules' (the graph freezes
    their values), optional buffers and parameters it finds None, and what no check could follow:
    class-level values, ``__dict__``, ``__class__`` (the tracing class stands in for it) and
    attributes it probes but that are missing (``getattr(self, "t", 1.0)``). Made once per class:
    class creation runs the user's ``__init_subclass__``, and the name keeps it apart from the
    user's classes."""
    if cls not in _recording_classes:
        def note(module, name, value):
            watched = getattr(_reads, "watched", None)
            if watched is not None and module in watched and not _read_by_torch(sys._getframe(2)):
                path, _ = watched[module]
                _reads.values.setdefault(f"{path}{name}", value)

        def __getattribute__(self, name):
            value = cls.__getattribute__(self, name)
            watched = getattr(_reads, "watched", None)
            if watched is not None and self in watched:
                if name in watched[self][1] or name in ("__dict__", "__class__"):
                    note(self, name, value if name != "__class__" else _UNFOLLOWABLE)
                elif name not in _MODULE_INTERNALS and _is_class_data(cls, name):
                    note(self, f"{name} (a class attribute)", _UNFOLLOWABLE)
            return value

        def __getattr__(self, name):  # parameters, buffers, submodules, and misses
            try:
                value = cls.__getattr__(self, name)
            except AttributeError:
                note(self, f"{name} (missing)", _UNFOLLOWABLE)
                raise
            if value is None:  # an optional buffer or parameter: `if self.mean is not None` is frozen
                note(self, name, None)
            return value

        _recording_classes[cls] = type(f"_PyfastnnTraced{cls.__name__}", (cls,),
                                       {"__getattribute__": __getattribute__, "__getattr__": __getattr__,
                                        "__module__": cls.__module__})
    return _recording_classes[cls]


def _read_by_torch(frame) -> bool:
    """Whether a read comes from torch itself (the tracer, nn.Module's machinery), not from forward."""
    module = frame.f_globals.get("__name__", "")
    return module == "torch" or module.startswith("torch.")


def _is_class_data(cls: type, name: str) -> bool:
    """Whether ``name`` is a plain value on the class (``scale = 1.0``), not a method or descriptor."""
    try:
        found = inspect.getattr_static(cls, name)
    except AttributeError:
        return False
    return not (callable(found) or hasattr(found, "__get__"))


def _frozen_value(value: object) -> bool:
    return isinstance(value, _FREEZABLE) or (isinstance(value, tuple) and all(map(_frozen_value, value)))


def _tracing_copy(module: nn.Module) -> nn.Module:
    """A copy of `module`'s structure and plain attributes sharing its tensors: tracing runs forward
    on proxies, and whatever forward writes (``self.last = h``, ``self.history.append(h)``, into a
    child) lands in the copy, never in the module fused or given back."""
    memo: Dict[int, object] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        memo[id(tensor)] = tensor
    return copy.deepcopy(module, memo)


def _trace(module: nn.Module, flip_modes: bool = False) -> _Trace:
    """`module.forward` traced on a :func:`_tracing_copy` as it stands (grad mode on, autocast off),
    or with the train/eval flag of the module and of each of its submodules flipped (grad mode off,
    inference mode on, float16 autocast on). ``frozen`` says why the graph cannot stand for
    ``forward`` where it cannot (a copy raising on deepcopy raises here: the module is not traced)."""
    module = _tracing_copy(module)
    named = list(module.named_modules())
    before = {m: (dict(vars(m)), *(dict(getattr(m, name)) for name in ("_parameters", "_buffers", "_modules")))
              for _, m in named}
    watched = {m: (f"{path}." if path else "", set(vars(m)) - _MODULE_INTERNALS) for path, m in named}
    if flip_modes:
        for _, m in named:
            m.training = not m.training
    tracer = _ShallowTracer()
    with contextlib.ExitStack() as modes:
        if flip_modes:
            modes.enter_context(torch.inference_mode())
            modes.enter_context(torch.autocast("cpu", dtype=torch.float16))
        else:
            modes.enter_context(torch.enable_grad())
            modes.enter_context(torch.autocast("cpu", enabled=False))
        for _, m in named:
            m.__class__ = _recording_class(type(m))
        _reads.watched, _reads.values = watched, {}
        try:
            graph = tracer.trace(module)
            reads = _reads.values
        finally:
            _reads.watched = _reads.values = None
    attributes, parameters, buffers, children = before[module]
    existing = set(attributes) | set(parameters) | set(buffers) | set(children)
    constants = {node.target: getattr(module, node.target) for node in graph.nodes
                 if node.op == "get_attr" and node.target.split(".")[0] not in existing}
    changed = set()
    for path, m in named:  # assignments anywhere in the subtree: the graph would not make them
        now = (vars(m), m._parameters, m._buffers, m._modules)
        for was, is_ in zip(before[m], now):
            changed |= {f"{path}.{key}" if path else key for key in set(was) | set(is_)
                        if key not in ("training", "__class__") and is_.get(key) is not was.get(key)
                        and not (m is module and key in constants)}
    unfreezable = sorted(name for name, value in reads.items() if not _frozen_value(value))
    frozen = (f"forward assigns {', '.join(sorted(changed))}" if changed else
              "forward sets grad mode, inference mode or autocast" if tracer.switches_modes else
              f"forward reads {', '.join(unfreezable)}, which a graph cannot follow" if unfreezable else None)
    return _Trace(graph, constants, reads, frozen)


_IN_PLACE_OPERATORS = frozenset({operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                 operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                                 operator.ixor, operator.ilshift, operator.irshift, operator.imatmul})
# The same as methods, which the tracer records where the tensor written is no proxy (``acc[i] = h``).
_IN_PLACE_DUNDERS = frozenset(f"__{op.__name__}__" for op in _IN_PLACE_OPERATORS)
_VIEW_METHODS = frozenset({"view", "view_as", "reshape", "expand", "expand_as", "narrow", "select", "t", "transpose",
                           "permute", "squeeze", "unsqueeze", "flatten", "unflatten", "as_strided", "unbind",
                           "split", "chunk", "diagonal", "movedim", "contiguous", "detach", "__getitem__"})


def _constant_escapes(graph: torch.fx.Graph, constants: Dict[str, torch.Tensor]) -> bool:
    """Whether a tensor forward creates (a graph constant, made once) is changed in place or returned:
    forward makes a fresh one per call (``acc = torch.zeros(2); acc += y``), the graph would share one."""
    reached = [node for node in graph.nodes if node.op == "get_attr" and node.target in constants]
    seen = set(reached)
    while reached:
        node = reached.pop()
        for user in node.users:
            name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
            if (user.op in ("output", "call_module")  # returned, or handed to a module that may change it
                    or user.kwargs.get("out") is node  # written into (torch.add(a, b, out=acc))
                    or (user.args[:1] == (node,) and (user.target in _IN_PLACE_OPERATORS or name in _IN_PLACE_DUNDERS
                                                      or user.kwargs.get("inplace")
                                                      or (name.endswith("_") and not name.endswith("__"))))):
                return True
            # A view of it, by a method or by indexing (``acc[i]``: operator.getitem, or the method
            # ``__getitem__`` where the index is a tensor; followed whether it gives a view or a
            # copy): changing the view changes it.
            if user not in seen and (user.target is operator.getitem or name in _VIEW_METHODS):
                seen.add(user)
                reached.append(user)
    return False


def _same_constants(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    """Whether two traces made the same tensors (a random draw, or a value picked by a mode, differs)."""
    first, second = list(a.values()), list(b.values())
    return len(first) == len(second) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.detach().cpu(), y.detach().cpu())
        for x, y in zip(first, second))


def _comparable_source(graph: torch.fx.Graph) -> str:
    """The graph's code with its tensor constants numbered in order of appearance: the tracer numbers
    them from a counter shared by all traces, so two traces of one forward may differ there alone."""
    renumbered: Dict[str, str] = {}
    return re.sub(r"_tensor_constant\d+",
                  lambda m: renumbered.setdefault(m.group(), f"_tensor_constant#{len(renumbered)}"),
                  graph.python_code("self").src)


def _forward_is_traceable(module: nn.Module) -> bool:
    """Whether tracing can stand for every call: ``forward(self, x)``, one input, which the trace
    stands in for with a proxy. A second argument may be a flag (``neg is True`` would be traced as
    False and frozen), a defaulted one ``None`` (an ``if scale is not None`` branch frozen), and
    ``*args``/``**kwargs`` anything."""
    if type(module).__call__ is not nn.Module.__call__:
        return False  # its own __call__ (say, scaling the input first) would be lost in a GraphModule
    if _overrides_module_machinery(type(module)):
        return False
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return (len(parameters) == 1 and parameters[0].default is inspect.Parameter.empty
            and parameters[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


#: nn.Module methods torch itself calls (train/eval, .to(), state dicts) that a class may override
#: (a frozen BatchNorm kept in eval by train(), extra state, a checkpoint migration): a GraphModule
#: made from its forward would have none of them.
_MODULE_MACHINERY = ("train", "_apply", "state_dict", "_save_to_state_dict", "_load_from_state_dict",
                     "load_state_dict", "get_extra_state", "set_extra_state")


def _overrides_module_machinery(cls: type) -> bool:
    """Whether ``cls`` overrides what torch calls on modules (:data:`_MODULE_MACHINERY`) or versions
    its state dict (``_version``)."""
    return (any(getattr(cls, name, None) is not getattr(nn.Module, name, None) for name in _MODULE_MACHINERY)
            or getattr(cls, "_version", 1) != nn.Module._version)


def _absorbable(module: nn.Module, fusion: "_Fusion") -> bool:
    return id(module) not in fusion.pinned


class _KeepingGraphModule(torch.fx.GraphModule):
    """A GraphModule that keeps all of the module it was traced from. GraphModule alone keeps only
    what its graph uses, when built and again when copied or unpickled: unused submodules,
    parameters and buffers (and their state-dict keys) would be lost, and with them the plain
    attributes (``self.num_classes``), which buffers are non-persistent, and hooks added later.

    The graph froze the plain attributes forward read (``if self.return_hidden:``; only immutable
    values are let through, see :func:`_trace`): a call after one of them changed raises instead of
    computing what the old value said."""

    # What GraphModule's own constructor and copies would not keep; the plain attributes' names are
    # listed in _plain_names, the values forward read while traced in _traced_with.
    _KEPT = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set", "_plain_names", "_traced_with",
             *sorted(name for name in _MODULE_INTERNALS if "hook" in name))

    @classmethod
    def keeping(cls, module: nn.Module, trace: _Trace) -> "_KeepingGraphModule":
        """A GraphModule running ``trace.graph`` with all of `module`, and the graph's tensor constants."""
        vars(module).update(trace.constants)  # where GraphModule looks for what the graph reads
        try:
            gm = cls(module, trace.graph, class_name=type(module).__name__)
        finally:
            for name in trace.constants:
                del vars(module)[name]
        # The tensors forward creates stay plain attributes, as forward made them: outside the state
        # dict, and not following .to() / .half() (the original makes them anew, in their own dtype).
        plain = {**{name: vars(module)[name] for name in _plain_attribute_names(module)}, **trace.constants}
        kept = {"_modules": OrderedDict(module._modules), "_parameters": OrderedDict(module._parameters),
                "_buffers": OrderedDict(module._buffers),
                "_non_persistent_buffers_set": set(module._non_persistent_buffers_set),
                "_plain_names": tuple(plain), "_traced_with": dict(trace.reads)}
        gm._restore({**kept, **plain}, type(module).__name__)
        return gm

    def _insert_check(self) -> None:
        """Starts forward with :func:`_check_unchanged` of the attributes the graph froze: inside
        forward, so torch.compile sees it in nested modules too. (Unpickling re-traces the generated
        code, which would run the check once and drop it: it is inserted again then.)"""
        if not self._traced_with:
            return
        first = next(node for node in self.graph.nodes if node.op != "placeholder")
        with self.graph.inserting_before(first), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # get_attr of plain attributes, which FX expects less
            now = tuple(self.graph.get_attr(name) for name in self._traced_with)
            self.graph.call_function(_check_unchanged,
                                     (type(self).__name__, self.graph.get_attr("_traced_with"), now))
        self.recompile()

    def _restore(self, kept: Dict[str, object], class_name: str) -> None:
        self.__dict__.update(kept)
        for members in (self._parameters, self._buffers, self._modules):
            for name in members:  # GraphModule copies a None buffer the graph reads as a plain attribute
                self.__dict__.pop(name, None)
        type(self).__name__ = class_name  # each GraphModule has a class of its own

    def _kept(self) -> Dict[str, object]:
        return {name: self.__dict__[name] for name in self._KEPT + self._plain_names if name in self.__dict__}

    def __deepcopy__(self, memo):
        clone = super().__deepcopy__(memo)  # copied self.__dict__ through memo: the kept values are those copies
        clone._restore(copy.deepcopy(self._kept(), memo), type(self).__name__)
        return clone

    def __copy__(self):
        clone = _KeepingGraphModule(self, self.graph, class_name=type(self).__name__)
        clone.meta = self.meta
        clone._restore({name: copy.copy(value) if name in self._KEPT else value
                        for name, value in self._kept().items()}, type(self).__name__)
        return clone

    def __reduce__(self):
        rebuild, arguments = super().__reduce__()
        return _unpickle_keeping_graph_module, (rebuild, arguments, self._kept(), type(self).__name__)


def _plain_attribute_names(module: nn.Module) -> List[str]:
    """The user's own attributes of `module` (``self.num_classes``, ``self._scale``): what its
    __dict__ holds beyond nn.Module's internals."""
    return [name for name in vars(module) if name not in _MODULE_INTERNALS]


_GRAPH_MODULE_NAMES: Set[str] = set()


def _clashes_with_graph_module(module: nn.Module) -> List[str]:
    """The user's attributes a GraphModule has too (``meta``, ``graph``, ``code``...): a traced
    module with one of them cannot keep it."""
    if not _GRAPH_MODULE_NAMES:
        _GRAPH_MODULE_NAMES.update(set(vars(torch.fx.GraphModule(nn.Module(), torch.fx.Graph()))) - _MODULE_INTERNALS)
        _GRAPH_MODULE_NAMES.update(dir(torch.fx.GraphModule))
    return [name for name in _plain_attribute_names(module) if name in _GRAPH_MODULE_NAMES]


def _check_unchanged(class_name: str, traced_with: Dict[str, object], now: Tuple) -> None:
    """The first step of a traced module's forward: raises if an attribute its graph froze changed."""
    for (name, traced), value in zip(traced_with.items(), now):
        if not _same(value, traced):
            # Under torch.compile a changed number may be symbolic, which an f-string cannot show there.
            now_text = "it has changed since" if torch.compiler.is_compiling() else f"it is now {value!r}"
            raise RuntimeError(
                f"this {class_name} was fused by pyfastnn.fuse with its forward traced while {name} was "
                f"{traced!r}; {now_text}, which the traced forward cannot follow: fuse the original "
                f"module again after changing {name}")


def _same(a: object, b: object) -> bool:
    """Whether a frozen value (:data:`_FREEZABLE`, or a tuple of them) is unchanged: the same type
    and equal, NaN equal to NaN."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    # NaN by self-inequality, not math.isnan: torch.compile traces this check with the value symbolic.
    return bool(a == b) or (isinstance(a, float) and a != a and b != b)


def _unpickle_keeping_graph_module(rebuild, arguments, kept: Dict[str, object], class_name: str) -> _KeepingGraphModule:
    gm = rebuild(*arguments)  # a plain GraphModule holding what the graph uses
    restored = _KeepingGraphModule(gm, gm.graph)
    restored._restore(kept, class_name)
    restored.training = gm.training
    if not any(node.target is _check_unchanged for node in restored.graph.nodes):
        restored._insert_check()
    return restored


def _fuse_traced(module: nn.Module, path: str, fusion: "_Fusion") -> nn.Module:
    """`module` as a GraphModule with its Linear -> activation runs fused, or `module` itself where
    tracing cannot stand for its forward (see the module docstring)."""
    if not _forward_is_traceable(module):
        return module
    try:
        trace = _trace(module)
        other = _trace(module, flip_modes=True)
    except Exception:  # data-dependent control flow, values torch.fx cannot record: leave it alone
        return module
    if (trace.frozen or other.frozen or _clashes_with_graph_module(module)
            # a graph differing between the traces read a training flag or a mode: it would keep one forever
            or _comparable_source(trace.graph) != _comparable_source(other.graph)
            or not _same_constants(trace.constants, other.constants)
            or _constant_escapes(trace.graph, trace.constants)):
        return module
    try:
        fused_before = len(fusion.report)
        return _fused_graph_module(module, path, fusion, trace)
    except Exception:  # an attribute GraphModule cannot hold, and the like: leave it alone
        del fusion.report[fused_before:]
        return module


def _fused_graph_module(module: nn.Module, path: str, fusion: "_Fusion", trace: _Trace) -> nn.Module:
    gm = _KeepingGraphModule.keeping(module, trace)
    absorbed: Set[str] = set()  # the activation and Dropout modules the fused layers took over
    fused_before = len(fusion.report)
    call_counts: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            call_counts[node.target] = call_counts.get(node.target, 0) + 1
    # Per activation module: its calls right after a Linear the loop below may fuse (a child called
    # once, used once, not pinned). A call after any other (a Linear called in a loop) keeps it.
    after_linear: Dict[str, int] = {}
    for node in gm.graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if (isinstance(source, torch.fx.Node) and source.op == "call_module" and "." not in source.target
                and len(source.users) == 1 and call_counts[source.target] == 1
                and fusable_linear(linear := gm.get_submodule(source.target)) and _absorbable(linear, fusion)):
            after_linear[node.target] = after_linear.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or "." in node.target:  # a grandchild: its owner's business
            continue
        linear = gm.get_submodule(node.target)
        if not fusable_linear(linear) or not _absorbable(linear, fusion):
            continue
        if len(node.users) != 1 or call_counts[node.target] != 1:
            # A Linear called at several places must stay one: fusing it (swapped by name) would
            # give every call site the activation of one of them.
            continue
        act_node = next(iter(node.users))
        # An activation module with settings (LeakyReLU's slope, GELU's form) called elsewhere too stays
        # one module: absorbing it at one call site would split it (a new slope would reach one call
        # only). One without settings (a shared `self.relu`) is absorbed wherever it follows a Linear.
        if act_node.op == "call_module" and (
                not _absorbable(activation_module_at := gm.get_submodule(act_node.target), fusion)
                or (call_counts[act_node.target] != 1
                    and (type(activation_module_at) not in _STATELESS_ACTIVATIONS
                         # used elsewhere too: replacing it after fusion would reach those calls only
                         or after_linear.get(act_node.target) != call_counts[act_node.target]))):
            continue
        activation = _node_activation(gm, act_node, node)
        if activation is None:
            continue
        last, p, described = act_node, 0.0, [_describe(linear), getattr(act_node.target, "__name__", str(act_node.target))]
        if len(act_node.users) == 1:
            after = next(iter(act_node.users))
            if (after.op == "call_module" and after.args == (act_node,) and not after.kwargs
                    and call_counts[after.target] == 1
                    and _absorbable(dropout := gm.get_submodule(after.target), fusion)
                    and (found_p := dropout_joining(linear, dropout)) is not None):
                p = found_p
                last = after
                described.append(_describe(dropout))
        # The FusedLinear its uses elsewhere got, if any (a Linear of a Sequential called here too).
        (fused,) = fused_layers([Layer(linear, activation[0], activation[1], p)], fusion.made)
        # The fused layer takes the Linear's name, so its parameters keep their state-dict keys.
        setattr(gm, node.target, fused)
        last.replace_all_uses_with(node)
        for dead in ([last, act_node] if last is not act_node else [act_node]):
            if dead.op == "call_module":
                absorbed.add(dead.target)
            gm.graph.erase_node(dead)
        fusion.report.append(FusedRun(f"{path}{node.target}", tuple(described), "FusedLinear"))
    if len(fusion.report) == fused_before:  # nothing fused here
        return module
    still_used = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    still_used |= {name.split(".")[0] for name in trace.reads if "." in name}  # forward reads their attributes
    for name in absorbed - still_used:
        delattr(gm, name)
    gm.graph.lint()
    gm._insert_check()  # after lint: a frozen None (an optional buffer) reads as missing to lint
    gm.recompile()
    gm.training = module.training  # its own flag only: the children keep theirs (a Dropout on in eval())
    return gm


def _is_sequential(module: nn.Module) -> bool:
    """An nn.Sequential that runs its modules one after the other as Sequential's own forward does (a
    subclass's forward or ``__iter__``, or a forward set on the instance, may compute something else)."""
    return (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
            and type(module).__iter__ is nn.Sequential.__iter__ and "forward" not in vars(module))


@dataclass
class _Fusion:
    report: List[FusedRun]
    pinned: Set[int]   # ids of modules called from outside their owner's forward
    hooked: List[str]  # modules left unfused for their hooks
    compiled: List[str]  # torch.compile wrappers left as they are
    done: Dict[int, Tuple[nn.Module, nn.Module]] = field(default_factory=dict)  # id -> (module, its result)
    made: Dict[Tuple, FusedLinear] = field(default_factory=dict)  # fused_layers' (Linear's id, settings) -> layer


def _compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper. It calls the module it wrapped through a
    method bound when it was made, so a module fused in its place (``_orig_mod``) would never run."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not loaded: nothing was compiled
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def _called_from_outside(model: nn.Module) -> Set[int]:
    """ids of the modules some code of a module's class may call past their owner (``self.block.fc(x)``,
    ``self.mlp[0](x)``): what its traced graph calls, what its class's source reaches
    (:func:`_reached_in_source`), which also sees branches and modes the trace did not take, and
    what a module holds outside the module tree (:func:`_held_outside_the_tree`)."""
    pinned = _held_outside_the_tree(model)
    sources: Dict[type, Optional[List[Tuple[ast.Module, Optional[str]]]]] = {}  # each class's parsed source, read once
    for module in model.modules():
        if module._modules and (module._forward_hooks or module._forward_pre_hooks):
            pinned |= _reached_by_hooks(module)
        if type(module) is not nn.Sequential and _is_sequential(module) and module._modules:
            pinned |= _reached_in_source(module, sources)  # a subclass's own methods may index it: self[0](x)
            continue
        # Only a module with grandchildren can call past its children.
        if (not any(child._modules for child in module.children()) or isinstance(module, (FusedLinear, FusedMLP))
                or _is_sequential(module)):
            continue
        pinned |= _reached_in_source(module, sources)
        try:
            graph = _trace(module).graph
        except Exception:
            continue
        for node in graph.nodes:
            if node.op == "call_module" and "." in node.target:
                pinned.add(id(module.get_submodule(node.target)))
    return pinned


def _held_outside_the_tree(model: nn.Module) -> Set[int]:
    """ids of the modules of ``model`` that some module also holds outside its children, and all
    below them: as a plain attribute, in a container (list, tuple, set, mapping, deque), a
    ``functools.partial``, a bound method, a closure, or an object's attributes and slots
    (``self.taps = [self.seq[0]]``, ``self.first = self.seq[0].forward``). Whatever calls them there
    would go on calling the original after fusion, and a fused layer's parameters, once rebuilt
    (``load_state_dict(assign=True)``, ``to_empty``), would no longer be theirs. A module holding
    itself or a module above it (a bound method of its own, a GraphModule's graph, a child keeping
    its root) reaches nothing that way but through the tree; held by a function or a partial
    (``self.pre = partial(first_layer, self)``, a closure over ``self``), though, it may be reached
    into, so all below it is taken."""
    held: List[Tuple[nn.Module, bool]] = []  # each module found, and whether a function holds it
    seen: Set[int] = set()

    def cell_filled(cell) -> bool:
        try:
            cell.cell_contents
        except ValueError:  # a cell not yet filled
            return False
        return True

    def collect(value: object, depth: int, by_function: bool) -> None:
        if isinstance(value, nn.Module):
            held.append((value, by_function))
            return
        if depth == 0 or id(value) in seen or isinstance(value, (str, bytes, numbers.Number, torch.Tensor, type,
                                                                   types.ModuleType)):
            return
        seen.add(id(value))
        try:
            if isinstance(value, types.FunctionType):  # a closure: what its cells and defaults hold
                items = [cell.cell_contents for cell in value.__closure__ or () if cell_filled(cell)]
                items += [*(value.__defaults__ or ()), *(value.__kwdefaults__ or {}).values()]
                by_function = True
            elif isinstance(value, functools.partial):
                items = [value.func, *value.args, *value.keywords.values()]
                by_function = True
            elif isinstance(value, collections.abc.Mapping):
                items = list(value.values())
            elif isinstance(value, (list, tuple, set, frozenset, collections.deque)):
                items = list(value)
            elif isinstance(value, types.MethodType):
                items = [value.__self__]
            else:  # a dataclass or any other object: what its attributes (and slots) hold
                items = list(vars(value).values()) if isinstance(getattr(value, "__dict__", None), dict) else []
                items += [getattr(value, name) for klass in type(value).__mro__
                          for name in _slot_names(klass) if hasattr(value, name)]
        except Exception:  # a container that cannot be read is not looked into
            return
        for item in items:
            collect(item, depth - 1, by_function)

    above: Dict[int, Set[int]] = {id(model): set()}  # each module's ancestors
    for module in model.modules():
        for child in module.children():
            above.setdefault(id(child), set()).update(above[id(module)] | {id(module)})
    pinned: Set[int] = set()
    for module in model.modules():
        held.clear()
        seen.clear()
        for name, value in vars(module).items():
            if name not in _MODULE_INTERNALS:
                collect(value, depth=6, by_function=False)
        for other, by_function in held:
            own = other is module or id(other) in above[id(module)]
            if not own or by_function:  # (itself or above it, it is called through the tree anyway)
                pinned |= {id(below) for below in other.modules()} - ({id(other)} if own else set())
    return pinned & {id(m) for m in model.modules()}


def _slot_names(klass: type) -> Tuple[str, ...]:
    slots = vars(klass).get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(slots)


#: Module methods that give its children (calling one runs its own forward); a ModuleDict's too.
_CHILDREN_METHODS = frozenset({"children", "named_children", "_modules", "__getitem__", "__iter__", "values", "items"})

#: Module methods that reach modules below it: its children, or any module below (modules(),
#: get_submodule(), apply(), and the attribute machinery a forward could take a child by).
_STRUCTURE_METHODS = _CHILDREN_METHODS | frozenset({"modules", "named_modules", "get_submodule", "apply", "__dict__",
                                                   "__getattr__", "__getattribute__"})

#: Calling a module by these runs its forward, as calling it does.
_CALL_METHODS = frozenset({"forward", "__call__", "_call_impl", "_wrapped_call_impl"})

#: Builtins that take a module without calling into it.
_HARMLESS_BUILTINS = frozenset({"len", "isinstance", "issubclass", "type", "id", "repr", "str", "hash", "print",
                                "hasattr", "callable", "bool"})

#: Builtins whose result holds the modules they are given, as they are (iterating, listing them).
_TRANSPARENT_BUILTINS = frozenset({"list", "tuple", "iter", "enumerate", "zip", "reversed", "sorted", "dict", "set",
                                   "frozenset"})

#: Functions that call the module given as their first argument, and nothing else of it
#: (torch.utils.checkpoint.checkpoint(block, x) runs block(x)).
_CALLING_FUNCTIONS = frozenset({"checkpoint"})

#: Functions that call the children of the module given first, one after the other, as a Sequential
#: does (torch.utils.checkpoint.checkpoint_sequential, timm's checkpoint_seq).
_CHILDREN_CALLING_FUNCTIONS = frozenset({"checkpoint_sequential", "checkpoint_seq"})


def _function_name(call: ast.Call) -> str:
    """The name a call is made by: ``len`` for ``len(x)``, ``checkpoint`` for ``torch.utils.checkpoint.checkpoint(...)``."""
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


class _Uses:
    """How one method's source uses the expressions it takes from ``self`` (see _reached_in_source).
    ``strict``: a method ``forward`` runs, where handing a module on (``f(self.a)``) counts as
    reaching anything below it; in the others, only calls do (init code hands modules to
    initialisers, walks and reads them)."""

    def __init__(self, function: ast.AST, me: str, module: nn.Module, strict: bool) -> None:
        self.me, self.module, self.strict = me, module, strict
        self.parents = {child: node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}
        # The attribute names that take a module somewhere below `module` (`.fc`, `.layers`, and the
        # structure methods): reading any other (`.weight`, `.out_features`) reads a module's state.
        self.reaching_names = {name for m in module.modules() for name in m._modules} | _STRUCTURE_METHODS
        self.aliases = _aliases(function, me, module)
        # Whether any alias is read into (indexed, a submodule taken), handed to code that may reach
        # below it, or called.
        self.aliases_reached_into = self.aliases_called = False
        for node in ast.walk(function):
            if isinstance(node, ast.Name) and node.id in self.aliases and isinstance(node.ctx, ast.Load):
                if self.called(node):
                    self.aliases_called = True
                elif self.read_into(node) or (strict and self.escapes(node)):
                    self.aliases_reached_into = True

    def outer(self, node: ast.AST) -> ast.AST:
        """The expression that holds ``node``'s modules as they are: ``enumerate(self.blocks)`` for
        ``self.blocks`` there, ``list(self.children())`` for ``self.children()``, ``(a if c else
        b)`` for ``a``; else ``node``."""
        parent = self.parents.get(node)
        while ((isinstance(parent, ast.Call) and node is not parent.func and isinstance(parent.func, ast.Name)
                and parent.func.id in _TRANSPARENT_BUILTINS)
               or (isinstance(parent, ast.IfExp) and node is not parent.test) or isinstance(parent, ast.BoolOp)
               or (isinstance(parent, ast.NamedExpr) and node is parent.value)
               or (isinstance(parent, (ast.ListComp, ast.SetComp, ast.GeneratorExp)) and node is parent.elt)):
            node, parent = parent, self.parents.get(parent)  # a if c else b, a or b, (b := a)
        return node

    def called(self, node: ast.AST) -> bool:
        """Whether the value of ``node`` is called (``node(x)``, ``node.forward(x)``, ``checkpoint(node, x)``)."""
        node = self.outer(node)
        parent = self.parents.get(node)
        if isinstance(parent, ast.Call):
            return parent.func is node or (_function_name(parent) in _CALLING_FUNCTIONS and parent.args[:1] == [node])
        return (isinstance(parent, ast.Attribute) and parent.attr in _CALL_METHODS
                and isinstance(self.parents.get(parent), ast.Call) and self.parents[parent].func is parent)

    def read_into(self, node: ast.AST) -> bool:
        """Whether a module below the one ``node`` gives is taken (indexed, a submodule or structure
        method: ``node[0]``, ``node.fc``, ``node.children()``) and called, bound to a name or (in a
        method ``forward`` runs) handed on; reading its state (``node[0].weight``) is not."""
        node, depth = self.outer(node), 0
        while True:
            parent = self.parents.get(node)
            if not ((isinstance(parent, ast.Subscript) and parent.value is node) or (
                    isinstance(parent, ast.Attribute) and parent.value is node and parent.attr in self.reaching_names)):
                break
            node, depth = self.outer(parent), depth + 1
        return depth > 0 and (self.called(node) or self.bound(node) or (self.strict and self.escapes(node)))

    def escapes(self, node: ast.AST) -> bool:
        """Whether ``node``'s value goes where unseen code may reach below it: an argument of a call
        (other than the harmless builtins and the calling functions), returned, yielded, stored in a
        container or an attribute."""
        node = self.outer(node)
        parent = self.parents.get(node)
        if isinstance(parent, ast.Call):
            return (node is not parent.func and not self.called(node)
                    and _function_name(parent) not in _HARMLESS_BUILTINS | _CHILDREN_CALLING_FUNCTIONS)
        if isinstance(parent, ast.keyword):
            return True
        if isinstance(parent, (ast.Return, ast.Yield, ast.YieldFrom, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.Starred)):
            return not (isinstance(parent, (ast.Tuple, ast.List)) and isinstance(parent.ctx, ast.Store))
        if isinstance(parent, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node is parent.value:
            targets = parent.targets if isinstance(parent, ast.Assign) else [parent.target]
            return any(isinstance(inner, (ast.Attribute, ast.Subscript)) for target in targets
                       for inner in ast.walk(target))  # self.cache = ..., d[k] = ...: stored
        return False

    def reached_beyond(self, node: ast.AST) -> bool:
        """Whether the module (or modules) ``node`` gives is read into, bound to a name that is, or
        (in a method ``forward`` runs) handed on."""
        return (self.read_into(node) or (self.strict and self.escapes(node))
                or (self.bound(node) and self.aliases_reached_into))

    def bound(self, node: ast.AST) -> bool:
        """Whether ``node``'s value is bound to a name (assigned, iterated by a loop, a with item), also
        where it is held by a container or handed to a call whose result may hold it (``with
        nullcontext(self.blocks) as blocks``, ``bs = [self.blocks]``), as _aliases takes such values.
        A call's output (``h = self.embed(x)``, ``checkpoint(...)``) or a builtin's answer about it
        (``n = len(self.blocks)``) binds no module."""
        node = self.outer(node)
        parent = self.parents.get(node)
        while (isinstance(parent, (ast.keyword, ast.Starred, ast.Dict))
               or (isinstance(parent, (ast.List, ast.Tuple, ast.Set)) and not isinstance(getattr(parent, "ctx", None),
                                                                                         ast.Store))
               or (isinstance(parent, ast.Call) and node is not parent.func
                   and not _gives_an_output(parent, self.me, self.module, self.aliases)
                   and _function_name(parent) not in _HARMLESS_BUILTINS)):
            node = self.outer(parent)
            parent = self.parents.get(node)
        return isinstance(parent, (ast.Assign, ast.AnnAssign, ast.NamedExpr, ast.For, ast.AsyncFor, ast.comprehension,
                                   ast.withitem, ast.arguments, ast.Match))


class _Method(NamedTuple):
    function: ast.AST  # a def or a lambda
    name: str          # the class attribute holding it
    me: str            # its first parameter: the module
    accessor: bool     # a property's: read, not run with inputs


#: Decorators of functions that take no module first, and of accessors.
_NOT_METHODS = frozenset({"staticmethod", "classmethod"})
_ACCESSORS = frozenset({"property", "cached_property", "setter", "getter", "deleter"})


def _decorator_names(decorators: List[ast.expr]) -> Set[str]:
    """``{"property", "no_grad"}`` for ``@property``, ``@torch.no_grad()``."""
    names = set()
    for node in decorators:
        node = node.func if isinstance(node, ast.Call) else node
        names.add(node.id if isinstance(node, ast.Name) else getattr(node, "attr", ""))
    return names


def _methods(trees: List[Tuple[ast.Module, Optional[str]]]) -> List[_Method]:
    """The methods of the classes in ``trees`` (defined under an ``if`` or ``try`` too, or as a
    lambda: ``first = lambda self, x: ...``, ``Model.first = lambda self, x: ...``) and the functions
    written elsewhere that they hold, named by the class attribute holding them (static and class
    methods are no methods of a module)."""
    found: List[Tuple[ast.AST, str, bool]] = []

    def visit(statements: List[ast.stmt], bound_name: Optional[str]) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                decorators = _decorator_names(node.decorator_list)
                if not decorators & _NOT_METHODS:
                    found.append((node, bound_name or node.name, bool(decorators & _ACCESSORS)))
            elif isinstance(node, ast.Assign):  # first = lambda self, x: ..., p = property(lambda self: ...)
                names = [target.id if isinstance(target, ast.Name) else target.attr for target in node.targets
                         if isinstance(target, (ast.Name, ast.Attribute))]
                wrapper = _function_name(node.value) if isinstance(node.value, ast.Call) else ""
                if wrapper not in _NOT_METHODS:
                    found.extend((inner, name, wrapper in _ACCESSORS) for inner in ast.walk(node.value)
                                 if isinstance(inner, ast.Lambda) for name in names)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", []),
                              *(handler.body for handler in getattr(node, "handlers", []))):
                    visit(block, bound_name)

    for tree, bound_name in trees:
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, None)
            else:
                visit([node], bound_name)
    return [_Method(function, name, parameters[0].arg, accessor) for function, name, accessor in found
            for parameters in [function.args.posonlyargs + function.args.args] if parameters]


def _run_by_forward(methods: List[_Method]) -> Set[str]:
    """The names of the methods ``forward`` runs: itself, and those it (or one of them) reaches as
    ``self.name``, but accessors (a ``dtype`` property reads parameters, it runs nothing)."""
    by_name: Dict[str, List[Tuple[ast.AST, str]]] = {}
    for function, name, me, accessor in methods:
        if not accessor:
            by_name.setdefault(name, []).append((function, me))
    run, todo = set(), ["forward"]
    while todo:
        name = todo.pop()
        if name in run or name not in by_name:
            continue
        run.add(name)
        todo += [node.attr for function, me in by_name[name] for node in ast.walk(function)
                 if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == me]
    return run


def _reached_in_source(module: nn.Module, sources: Optional[Dict[type, Optional[List[Tuple[ast.Module, Optional[str]]]]]] = None
                       ) -> Set[int]:
    """ids of the modules below `module`'s children that the source of its class may call (or reach
    and read) past their owner, read from every method but what ``__init__`` runs at once; the
    rules marked (forward) hold in ``forward`` and the methods it runs (:func:`_run_by_forward`; in
    a Sequential subclass, all), where handing a module on counts, not in init code and the like:

    - ``self.a.b(...)``, ``self.a.b.forward(...)``, ``checkpoint(self.a.b, x)`` pin ``a.b``; so does
      reading ``self.a.b.weight`` (after fusion ``a.b`` could be a placeholder, or another layer);
    - ``self.a`` indexed, iterated or aliased pins a's children (``for blk in self.blocks: blk(x)``);
      and everything below ``a`` where a module below is taken and called or bound
      (``self.heads[0][0](x)``, ``h[0](x)`` of an alias ``h``, ``blk.fc(x)``) or (forward) where
      ``a`` is handed on (``f(self.a)``, ``return self.a.b``);
    - (forward) ``self.modules()``, ``self.named_modules()``, ``self.get_submodule(...)`` and the
      children methods (``self.named_children()``, ``self._modules[...]``, ``getattr(self, name)``),
      wherever their modules are called below the children, read into or handed on;
      ``self.apply(fn)`` in ``forward`` itself;
    - (forward) ``self`` itself used otherwise than as the root of an attribute, called, compared
      or given to a harmless builtin (``first_layer(self, x)``, ``vars(self)``, ``m = self``,
      ``[self]``) pins everything below, as does the whole class where its source cannot be read.

    In a Sequential subclass, ``self[i]``, ``for m in self`` and its children methods pin its own children."""
    below = _below_children(module)
    sources = {} if sources is None else sources
    if type(module) not in sources:
        try:
            sources[type(module)] = [(_parse(source), name) for source, name in _class_sources(type(module))]
        except (OSError, TypeError, SyntaxError):
            sources[type(module)] = None
    trees = sources[type(module)]
    if trees is None:
        return below
    reached: Set[int] = set()
    methods = _methods(trees)
    # A Sequential subclass's methods are called on it from outside (self.seq.embed(x)): all are run.
    run = {method.name for method in methods} if isinstance(module, nn.Sequential) else _run_by_forward(methods)
    for function, name, me, _ in methods:
        # __init__'s closures and what it stores run later, maybe from forward
        uses = _Uses(function, me, module, strict=name in run or name == "__init__")
        if name == "__init__":  # only what runs later: closures, and self bound for later (functools.partial(f, self))
            nodes = [node for inner in ast.walk(function) if isinstance(inner, (ast.Lambda, ast.FunctionDef))
                     and inner is not function for node in ast.walk(inner)]
            nodes += [node for call in ast.walk(function) if isinstance(call, ast.Call)
                      and _function_name(call) in ("partial", "partialmethod", "MethodType")
                      for node in call.args + [keyword.value for keyword in call.keywords] if isinstance(node, ast.Name)]
        else:
            nodes = list(ast.walk(function))
        reached |= _reached_in_nodes(nodes, uses, name == "forward", below)
        if reached >= below:
            break
    return reached & below


def _below_children(module: nn.Module) -> Set[int]:
    """ids of the modules a call past ``module``'s children reaches: all below its children (a
    Sequential's own children too, which its methods may call one by one)."""
    below = {id(m) for m in module.modules()} - {id(module)}
    if not isinstance(module, nn.Sequential):
        below -= {id(m) for m in module.children()}
    return below


def _reached_by_hooks(module: nn.Module) -> Set[int]:
    """What the forward hooks of ``module`` reach below its children, each read as a method that
    ``forward`` runs, with its first parameter as the module (a function or lambda whose source can
    be read); all below for any other hook (a bound method, a callable object, a lambda among others
    on its line)."""
    below = _below_children(module)
    reached: Set[int] = set()
    for hook in [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]:
        if type(hook).__module__.startswith(__name__.rpartition(".")[0] + "."):
            continue  # pyfastnn's own FusedSlots
        function = hook.func if isinstance(hook, functools.partial) and not hook.args else hook
        try:
            tree = _parse(inspect.getsource(function)) if isinstance(function, types.FunctionType) else None
        except (OSError, TypeError, SyntaxError):
            tree = None
        name = getattr(function, "__name__", "")
        nodes = [node for node in ast.walk(tree) if (isinstance(node, ast.Lambda) and name == "<lambda>") or (
            isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name)] if tree else []
        parameters = nodes[0].args.posonlyargs + nodes[0].args.args if len(nodes) == 1 else []
        if not parameters:
            return below
        uses = _Uses(nodes[0], parameters[0].arg, module, strict=True)
        reached |= _reached_in_nodes(list(ast.walk(nodes[0])), uses, True, below)
    return reached & below


def _reached_in_nodes(nodes: List[ast.AST], uses: _Uses, in_forward: bool, below: Set[int]) -> Set[int]:
    """The part of :func:`_reached_in_source` one method's ``nodes`` reach."""
    me, module = uses.me, uses.module
    reached: Set[int] = set()
    for node in nodes:
        parent = uses.parents.get(node)
        if isinstance(node, ast.Call) and _function_name(node) == "super" and isinstance(node.func, ast.Name):
            if uses.strict and isinstance(parent, ast.Attribute) and parent.attr in (
                    "__getattr__", "__getattribute__", "__dict__"):
                reached |= below  # super().__getattr__("seq")[0](x)
            continue
        if isinstance(node, ast.Call) and _getattr_of(node, me):
            if (uses.strict and isinstance(module, nn.Sequential)) or uses.reached_beyond(node):
                reached |= below  # getattr(self, "seq")[0](x), or its alias indexed: any child's children
            continue
        if isinstance(node, ast.Name) and node.id == me and isinstance(node.ctx, ast.Load):
            harmless = (isinstance(parent, ast.Attribute)  # the root of a chain: read below
                        or (isinstance(parent, ast.Call) and (parent.func is node or _getattr_of(parent, me)
                                                              or _function_name(parent) in _HARMLESS_BUILTINS
                                                              or _function_name(parent) == "super"))
                        or isinstance(parent, (ast.Compare, ast.Return)))
            if not harmless and uses.strict:
                reached |= below  # first_layer(self, x), vars(self), m = self, [self], for m in self, self[0]
            continue
        if (not isinstance(node, ast.Attribute) or isinstance(parent, ast.Attribute)
                or isinstance(node.ctx, (ast.Store, ast.Del))):
            continue  # only whole chains read: self.a.b, not its self.a part, nor `self.a = ...`
        names, root = [], node
        while isinstance(root, ast.Attribute):
            names.append(root.attr)
            root = root.value
        if not (isinstance(root, ast.Name) and root.id == me):
            continue
        names.reverse()
        path, target = _submodule_path(module, names)
        if not path:
            own = names[0] in module._parameters or names[0] in module._buffers or (
                names[0] in vars(module) and names[0] not in _MODULE_INTERNALS)
            if not own:
                reached |= _reached_by_structure(node, names[0], uses, in_forward, below)  # not `self.values`, a buffer
            continue
        target_below = {id(m) for m in target.modules()} - {id(target)}
        past_children = {id(target)} if len(path) > 1 else set()  # self.a.b: a module below a child
        if len(path) == len(names):
            if uses.called(node):
                reached |= past_children  # self.a.b(x)
            elif isinstance(parent, ast.Subscript) and parent.value is node:
                # self.a[i]: one of a's children, called (its own forward) or read into
                reached |= past_children | (target_below if uses.reached_beyond(parent) else
                                            {id(m) for m in target.children()})
            elif (uses.strict and uses.escapes(node)) or (uses.bound(node) and uses.aliases_reached_into):
                reached |= past_children | target_below  # f(self.a), return self.a.b, blk = self.a; blk.fc(x)
            elif not (isinstance(parent, ast.Compare)
                      or (isinstance(parent, ast.Call) and _function_name(parent) in _HARMLESS_BUILTINS)):
                reached |= past_children | {id(m) for m in target.children()}  # iterated, aliased and called
        elif names[len(path)] in _CALL_METHODS:
            reached |= past_children  # self.a.b.forward(x)
        elif names[len(path)] in _STRUCTURE_METHODS:
            taken = _child_taken(node, uses.parents)
            if names[len(path)] in _CHILDREN_METHODS and not uses.reached_beyond(taken):
                reached |= past_children | {id(m) for m in target.children()}  # self.a.children(), each called
            else:
                reached |= past_children | target_below  # self.a.modules(), self.a.get_submodule(...), ...
        else:
            reached |= past_children  # self.a.b.weight: read past a
    return reached


def _reached_by_structure(node: ast.Attribute, method: str, uses: _Uses, in_forward: bool,
                          below: Set[int]) -> Set[int]:
    """What ``self.<method>`` reaches, ``method`` being no submodule's name (``self.named_children()``,
    ``self._modules``, ``self.modules()``, ``self.config``, ``self.helper(x)``): everything below
    the children, or nothing."""
    if method not in _STRUCTURE_METHODS:
        return set()  # an attribute or method of the module's own
    if method == "apply":
        return below if in_forward else set()  # apply(init_fn) in other methods initialises
    taken = _child_taken(node, uses.parents)
    if method in _CHILDREN_METHODS and not isinstance(uses.module, nn.Sequential):
        # a child called runs its own forward: only a module below it, reached, counts
        return below if uses.reached_beyond(taken) else set()
    if uses.strict and method not in ("modules", "named_modules"):
        return below  # a Sequential's own children, self.get_submodule(...), vars(self) in forward
    # self.modules() (init code walks it), or any of them in other methods: where a module is used
    used = uses.called(taken) or uses.reached_beyond(taken) or (uses.bound(taken) and uses.aliases_called)
    return below if used else set()


def _getattr_of(node: ast.AST, me: str) -> bool:
    """Whether ``node`` is ``getattr(self, ...)``: a child by a name the source does not spell."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
            and bool(node.args) and isinstance(node.args[0], ast.Name) and node.args[0].id == me)


def _child_taken(node: ast.AST, parents: Dict[ast.AST, ast.AST]) -> ast.AST:
    """The expression taking one module through ``node``, a whole attribute chain (``self._modules``,
    ``self.children``, ``self._modules.get``, ...), where the source takes one there: ``self._modules["a"]``, ``self._modules.get("a")``,
    ``self.__getitem__(0)``, ``next(self.children())``, ``list(self.children())[0]``; else the
    method's result (or ``node``, not called)."""
    parent = parents.get(node)
    if isinstance(parent, ast.Subscript) and parent.value is node:
        return parent  # self._modules["a"]
    if not (isinstance(parent, ast.Call) and parent.func is node):
        return node
    outer = parents.get(parent)  # the method's result: a module, or an iterable of them
    if isinstance(outer, ast.Call) and isinstance(outer.func, ast.Name) and parent in outer.args:
        if outer.func.id == "next":
            return outer
        wrapper = parents.get(outer)
        if outer.func.id in ("list", "tuple", "dict") and isinstance(wrapper, ast.Subscript) and wrapper.value is outer:
            return wrapper
    return parent


def _gives_an_output(call: ast.Call, me: str, module: nn.Module, aliases: Set[str]) -> bool:
    """Whether a call's result is an output, not a module it is given: a module's call
    (``self.embed(x)``, ``getattr(self, name)(x)``, ``self.heads[i](x)``, ``blk(x)`` with ``blk`` one of
    ``aliases``) or a calling function's (``checkpoint(self.block, x)``)."""
    return (_submodule_called(call, me, module) or isinstance(call.func, (ast.Call, ast.Subscript))
            or (isinstance(call.func, ast.Name) and call.func.id in aliases)
            or _function_name(call) in _CALLING_FUNCTIONS | _CHILDREN_CALLING_FUNCTIONS)


def _aliases(function: ast.AST, me: str, module: nn.Module) -> Set[str]:
    """Names a function binds to modules reached from ``self``, also through other such names
    (``for b in self.blocks``, ``for i, b in enumerate(self.blocks)``, ``blk = self.block``,
    ``first = self.mlp[0]``, ``s = blk[0]``). What a module's call returns is its output, no such
    thing (``h = self.embed(x)``, ``h = F.relu(self.fc(x))``, ``h = getattr(self, name)(x)``,
    ``h = blk(x)``, ``[head(x) for head in self.heads]``), and so is an attribute that is not a
    module (``w = self.fc.weight``, ``cfg = self.config``), whatever it was given."""
    bound: Set[str] = set()

    def from_self(node) -> bool:
        if isinstance(node, ast.Name):
            return node.id == me or node.id in bound
        if isinstance(node, ast.Call) and _gives_an_output(node, me, module, bound):
            return False
        if isinstance(node, ast.Attribute):
            names, root = [], node
            while isinstance(root, ast.Attribute):
                names.append(root.attr)
                root = root.value
            if isinstance(root, ast.Name) and root.id == me:
                names.reverse()
                path = _submodule_path(module, names)[0]
                return len(path) == len(names) or names[len(path)] in _STRUCTURE_METHODS
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp)):
            return from_self(node.elt)
        if isinstance(node, ast.DictComp):
            return from_self(node.value)
        return any(from_self(child) for child in ast.iter_child_nodes(node))

    def names(target) -> Set[str]:
        return {inner.id for inner in ast.walk(target) if isinstance(inner, ast.Name)}

    while True:
        before = len(bound)
        for node in ast.walk(function):
            if isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)) and from_self(node.iter):
                bound |= names(node.target)
            elif isinstance(node, ast.Assign) and from_self(node.value):
                bound |= {name for target in node.targets for name in names(target)}
            elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None and from_self(node.value):
                bound |= names(node.target)
            elif isinstance(node, ast.withitem) and node.optional_vars is not None and from_self(node.context_expr):
                bound |= names(node.optional_vars)
            elif isinstance(node, ast.arguments):  # lambda b=self.blocks[0]: b.fc(x)
                positional = node.posonlyargs + node.args
                pairs = list(zip(positional[len(positional) - len(node.defaults):], node.defaults))
                pairs += [(arg, default) for arg, default in zip(node.kwonlyargs, node.kw_defaults) if default]
                bound |= {arg.arg for arg, default in pairs if from_self(default)}
            elif isinstance(node, ast.Match) and from_self(node.subject):  # match self.blocks: case [first, *_]:
                bound |= {inner.name for case in node.cases for inner in ast.walk(case.pattern)
                          if isinstance(getattr(inner, "name", None), str)}
                bound |= {inner.rest for case in node.cases for inner in ast.walk(case.pattern)
                          if isinstance(inner, ast.MatchMapping) and inner.rest}
        bound -= {me}
        if len(bound) == before:
            return bound


def _submodule_called(call: ast.Call, me: str, module: nn.Module) -> bool:
    """Whether ``call`` calls a submodule by its attribute path (``self.embed(x)``, ``self.a.b(x)``)."""
    names, node = [], call.func
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not (names and isinstance(node, ast.Name) and node.id == me):
        return False
    names.reverse()
    return len(_submodule_path(module, names)[0]) == len(names)


def _parse(source: str) -> ast.Module:
    """A method's or class's source parsed wherever it was indented (a class inside a function whose
    strings reach column 0 cannot be dedented)."""
    try:
        return ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return ast.parse("if True:\n" + source)


def _class_sources(cls: type) -> List[Tuple[str, Optional[str]]]:
    """The source of `cls` and of its bases up to nn.Module, and of every function they hold that is
    written elsewhere (``forward = shared_forward``), with the name of the class attribute holding
    it (functions without a source, like those ``dataclass`` generates, are skipped)."""
    sources: List[Tuple[str, Optional[str]]] = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.startswith("torch."):
            continue
        sources.append((inspect.getsource(klass), None))
        for name, value in vars(klass).items():
            for function in _functions_held(value):
                if not function.__qualname__.startswith(klass.__qualname__ + "."):  # written elsewhere
                    for held in [function, *_closed_over(function)]:  # a wrapper: what it runs too
                        with contextlib.suppress(OSError, TypeError):
                            sources.append((inspect.getsource(held), name))
    return sources


def _functions_held(value: object) -> List[types.FunctionType]:
    """The functions a class attribute runs: itself, a method's, a property's accessors, a
    ``functools.partialmethod``'s, each unwrapped from its decorators (an attribute whose lookup or
    unwrapping fails holds none; a ``__getattr__`` of its own is not asked)."""
    candidates = [value]
    for name in ("__func__", "fget", "fset", "fdel", "func"):
        with contextlib.suppress(Exception):
            candidates.append(object.__getattribute__(value, name))
    functions: List[types.FunctionType] = []
    for candidate in candidates:
        try:
            function = inspect.unwrap(candidate)
        except Exception:  # noqa: BLE001 - e.g. a wrapper loop
            continue
        if inspect.isfunction(function) and function not in functions:
            functions.append(function)
    return functions


def _closed_over(function: types.FunctionType) -> List[types.FunctionType]:
    """The functions ``function`` closes over: what a decorator's wrapper without functools.wraps runs."""
    functions = []
    for cell in function.__closure__ or ():
        with contextlib.suppress(ValueError):  # a cell not yet filled
            if inspect.isfunction(cell.cell_contents):
                functions.append(cell.cell_contents)
    return functions


def _submodule_path(module: nn.Module, names: List[str]) -> Tuple[List[str], nn.Module]:
    """The longest start of `names` naming submodules (through ``_modules`` only: no property runs),
    and the submodule it names."""
    path = []
    for name in names:
        child = module._modules.get(name)
        if child is None:
            break
        path.append(name)
        module = child
    return path, module


def _fuse_tree(module: nn.Module, path: str, fusion: _Fusion, keep_root: bool = False) -> nn.Module:
    """Fuses `module`'s subtree; with `keep_root`, `module` itself is changed in place, never replaced.
    A module found at several places (``self.a = self.b = block``) is fused once, and its result
    takes every one of them, so they stay one module."""
    seen = fusion.done.get(id(module))
    if seen is not None:
        return seen[1]
    fusion.done[id(module)] = (module, module)  # met again inside itself (a cycle): left as it is there
    fused = _fuse_subtree(module, path, fusion, keep_root)
    fusion.done[id(module)] = (module, fused)  # the original kept alive: its id is not reused meanwhile
    return fused


def _fuse_subtree(module: nn.Module, path: str, fusion: _Fusion, keep_root: bool) -> nn.Module:
    if isinstance(module, (FusedLinear, FusedMLP)):
        return module
    if _compiled(module):
        fusion.compiled.append(path.rstrip("."))
        return module
    for name, child in list(module._modules.items()):  # every name, a module's second one too
        if child is None:
            continue
        new_child = _fuse_tree(child, f"{path}{name}.", fusion)
        if new_child is not child:
            setattr(module, name, new_child)
    keep = keep_root or has_hooks(module)
    if _is_sequential(module):
        # Only a plain Sequential may become a FusedMLP: a subclass would lose its class and methods.
        return _fuse_sequential(module, path, fusion, replace_whole=not keep and type(module) is nn.Sequential)
    if isinstance(module, nn.Sequential):
        return module  # a subclass with its own forward: tracing would take its indexing and methods away
    if any(fusable_linear(child) for child in module.children()):
        if keep and not keep_root:
            fusion.hooked.append(path.rstrip(".") or type(module).__name__)
            return module
        # Its own report and fused layers, kept only if the traced module replaces this one.
        found = _Fusion([], fusion.pinned, fusion.hooked, fusion.compiled, fusion.done, dict(fusion.made))
        traced = _fuse_traced(module, path, found)
        if keep_root and traced is not module:
            warnings.warn(f"pyfastnn.fuse(inplace=True) left the forward of the top-level {type(module).__name__} "
                          f"unfused: fusing it replaces the module by a torch.fx.GraphModule, which cannot happen "
                          f"in place; use `model = pyfastnn.fuse(model)` for that", stacklevel=4)
            return module
        fusion.report.extend(found.report)
        if traced is not module:
            fusion.made.update(found.made)
        return traced
    return module


def _names(names: List[str]) -> str:
    """Names of modules or parameters for a message, quoted: ``'0', 'head.fc'`` (a bare 2 would read
    as a count)."""
    return ", ".join(repr(name) for name in names)


#: Held while fuse() runs (see fuse).
_FUSING = threading.RLock()


def _parameter_extras(model: nn.Module) -> List[str]:
    """Names of the parameters carrying what copy.deepcopy drops: tensor hooks (``register_hook``,
    ``register_post_accumulate_grad_hook``) and attributes set on them (not the markers torch.compile
    leaves on the parameters of a model it ran, ``_dynamo_static_input_type``: it sets them again)."""
    return [name for name, p in model.named_parameters(remove_duplicate=False)
            if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)
            or any(not attribute.startswith("_dynamo") for attribute in vars(p))]


def fuse(model: nn.Module, inplace: bool = False, *, report: Optional[List[FusedRun]] = None,
         verbose: bool = False) -> nn.Module:
    """Returns ``model`` with its ``Linear -> activation (-> Dropout)`` runs fused.

    Supported activations: ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.Sigmoid``, ``nn.Tanh``, ``nn.GELU``
    (both forms), ``nn.SiLU``, ``nn.Identity`` (and, in traced modules, ``torch.relu``,
    ``F.relu``, ``torch.sigmoid``, ``torch.tanh``, ``F.silu``, ``F.gelu``). Outputs equal the original
    model's (to float rounding) in ``eval()``, and gradients too in ``train()`` without dropout;
    dropout masks are drawn differently from ``nn.Dropout``'s but with the same distribution.

    Args:
        model: any module; it is deep-copied first unless ``inplace``.
        inplace: modify ``model`` itself (the fused modules then share its parameter tensors) and
            return it: a Sequential that is one run keeps its class (the run becomes a FusedMLP at
            index 0), and a top-level module whose own ``forward`` would need tracing is left
            unfused with a warning (only a new ``GraphModule`` could run the fused graph).
        report: a list that receives one :class:`FusedRun` per replacement.
        verbose: print the replacements.

    A ``torch.compile``'d model is refused (``TypeError``): fuse first, then compile. Compiled
    submodules, like modules with hooks, are left as they are, with a warning. The copy keeps no
    tensor hooks or attributes set on parameters (``copy.deepcopy`` drops them): fuse warns where
    there were some. Tracing uses ``torch.fx``, which replaces ``nn.Module.__call__`` for the whole
    process while it traces: calls to ``fuse`` run one at a time, and other threads should not run
    modules while one does. Tracing draws no random numbers from torch's CPU generator as far as
    the model can see: its state is restored afterwards.

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
    check_flag("fuse", "inplace", inplace)  # "False" would pass for True and change the caller's model
    check_flag("fuse", "verbose", verbose)
    if report is not None and not isinstance(report, list):  # checked before the work it would lose
        raise TypeError(f"fuse's report must be a list (it receives the replacements), got {type(report).__name__}")
    if _compiled(model):
        raise TypeError("pyfastnn.fuse got a torch.compile'd model, which would go on running the module it "
                        "compiled: fuse first, then compile (torch.compile(pyfastnn.fuse(model)); the original is "
                        "its _orig_mod)")
    # torch.fx patches nn.Module process-wide while it traces: one fuse at a time. The generator is
    # forked around the whole fusion, not each trace: traces of a forward that draws random numbers
    # must differ (so it is left alone), and the caller's stream must not move.
    with _FUSING, torch.random.fork_rng(devices=[]):
        return _fuse(model, inplace, report, verbose)


def _fuse(model: nn.Module, inplace: bool, report: Optional[List[FusedRun]], verbose: bool) -> nn.Module:
    lost = _parameter_extras(model) if not inplace else []
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as error:  # e.g. torch.nn.utils.prune's derived weights refuse deepcopy
            raise RuntimeError(f"pyfastnn.fuse could not copy the model ({error}); fuse it in place with "
                               f"inplace=True, or remove what stops the copy first") from error
    hooked = [name or type(model).__name__ for name, module in model.named_modules()
              if type(module) is nn.Linear and has_hooks(module) and linear_dtype_problem(module) is None]
    pinned = _called_from_outside(model)
    fusion = _Fusion([], pinned | _shared_modules_to_leave(model, pinned), [], [])
    model = _fuse_tree(model, "", fusion, keep_root=inplace)
    hooked += fusion.hooked
    if hooked:
        warnings.warn(f"pyfastnn.fuse left {_names(hooked)} unfused: they have hooks (or a hook-based "
                      f"reparametrization such as prune), which a fused or traced module would bypass",
                      stacklevel=3)
    if fusion.compiled:
        warnings.warn(f"pyfastnn.fuse left {_names(fusion.compiled)} unfused: torch.compile wrappers go on "
                      f"running the module they compiled (fuse before compiling)", stacklevel=3)
    if lost:
        warnings.warn(f"pyfastnn.fuse's copy of the model (copy.deepcopy) has none of the tensor hooks or attributes "
                      f"set on parameters {_names(lost)}: register them again on the result, or fuse with "
                      f"inplace=True", stacklevel=3)
    runs = fusion.report
    if verbose:
        for run in runs:
            print(f"pyfastnn.fuse: {run}")
        if not runs:
            print("pyfastnn.fuse: nothing to fuse")
    if report is not None:
        report.extend(runs)
    return model
