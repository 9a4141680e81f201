""":func:`pyfastnn.fuse`'s pass over modules other than Sequentials: ``forward`` traced with
``torch.fx`` (twice, in opposite modes), and each Linear it calls at one place only, whose only use
is a supported activation (then optionally an ``nn.Dropout``), replaced by a FusedLinear under the
Linear's own name in a GraphModule that keeps all of the module. Here too: what a trace cannot
stand for (the cases :mod:`pyfastnn.fuse` lists), and the check, at the start of every call, that
the values a graph froze did not change.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import inspect
import numbers
import operator
import random
import re
import sys
import threading
import types
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import AbstractSet, Callable, Dict, List, NamedTuple, Optional, Set, Tuple

import torch
from torch import nn

from ._ops import DEFAULT_NEGATIVE_SLOPE, output_kept_for_backward
from ._patterns import (FUNCTION_ACTIVATIONS, METHOD_ACTIVATIONS, STATELESS_ACTIVATIONS, Layer, activation_of,
                        describe, dropout_joining, function_activation, fusable_linear, has_call_hooks,
                        runs_in_sequence)
from .nn import FusedLinear, FusedMLP, fused_layers

__all__ = ["ShallowTracer", "Trace", "check_unchanged", "dropout_may_end_layer", "fuse_traced", "is_plain_attribute",
           "keeps_its_input", "plain_attribute_names", "trace_forward", "unpickle_keeping_graph_module"]


def _execution_modes() -> Tuple:
    """The thread's modes a traced graph does not record: grad mode, inference mode, autocast per device."""
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            *((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")))


class ShallowTracer(torch.fx.Tracer):
    """Keeps every submodule a leaf (each module level is fused on its own), and notes whether the
    modes a graph does not record (grad mode, inference mode, autocast) differ anywhere in ``forward``
    from those the trace began in. :func:`fuse_traced` traces each module twice, in opposite modes, so
    ``with torch.no_grad():``, ``torch.enable_grad()``, ``torch.autocast(...)`` in either sense show
    up in one of the two. (These modes are the thread's own; torch.fx's tracing itself, though,
    patches ``nn.Module.__call__`` for every thread while it runs: see :func:`pyfastnn.fuse`.)

    Buffers are proxies too, as parameters are: forward's in-place updates of a buffer
    (``self.avg.mul_(0.9)``) are recorded in the graph instead of running on the buffer while
    traced, and a buffer's value turned into a Python one (``float(self.scale)``, ``if
    self.flag:``), which a graph would freeze, fails the trace, so the module is left alone; so does
    an assignment to an attribute of a traced value (``self.ema.data = ...``), which a graph does
    not record either."""

    proxy_buffer_attributes = True

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _NoAssignmentProxy(node, self)

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


class _NoAssignmentProxy(torch.fx.Proxy):
    """A traced value refusing attribute assignment (``self.ema.data = new``, ``w.grad = g``): the
    graph would not record it, so the fused module would silently skip it."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("node", "tracer"):  # what the proxy itself is made of
            object.__setattr__(self, name, value)
        else:
            raise torch.fx.proxy.TraceError(f"forward assigns .{name} of a traced value, which a graph does not record")


def _node_activation(gm: torch.fx.GraphModule, node: torch.fx.Node, source: torch.fx.Node):
    """(name, slope) when `node` applies a supported activation to `source` and nothing else."""
    if node.args[:1] != (source,):
        return None
    if node.op == "call_function" and node.target in FUNCTION_ACTIVATIONS:
        return function_activation(node.target, node.args[1:], node.kwargs)
    if len(node.args) > 1 or node.kwargs:
        return None
    if node.op == "call_module":
        return activation_of(gm.get_submodule(node.target))
    if node.op == "call_method" and node.target in METHOD_ACTIVATIONS:
        return METHOD_ACTIVATIONS[node.target], DEFAULT_NEGATIVE_SLOPE
    return None


def _describe_call(node: torch.fx.Node) -> str:
    """How fuse()'s report names an activation the graph applies: a module's path, or a function or
    method with the settings it was called with (``gelu(approximate='tanh')``; ``inplace=False``,
    which torch.fx adds to every call that takes it, left out)."""
    name = getattr(node.target, "__name__", str(node.target))
    settings = [repr(value) for value in node.args[1:]] + [f"{key}={value!r}" for key, value in node.kwargs.items()
                                                          if (key, value) != ("inplace", False)]
    return f"{name}({', '.join(settings)})" if settings else name


@dataclass
class Trace:
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


class _RandomStates(NamedTuple):
    """The states of the global generators a forward may draw from outside the graph: Python's
    ``random``, numpy's ``np.random`` (where numpy is loaded), torch's CPU generator and, where CUDA
    is started, each GPU's default one. Compared around a trace (a draw there is frozen into the
    graph: ``if random.random() < p:`` takes one branch forever) and restored after it (``fuse``
    draws nothing from the caller's streams). A generator of forward's own (a module-level
    ``np.random.default_rng()``) is not among them."""

    python: object
    numpy: Optional[tuple]
    torch_cpu: torch.Tensor
    torch_cuda: Optional[List[torch.Tensor]]

    @staticmethod
    def now() -> "_RandomStates":
        numpy = sys.modules.get("numpy")
        return _RandomStates(random.getstate(), numpy.random.get_state() if numpy is not None else None,
                             torch.random.get_rng_state(),
                             torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)

    def same_as(self, other: "_RandomStates") -> bool:
        return (self.python == other.python and _equal_states(self.numpy, other.numpy)
                and _equal_states(self.torch_cpu, other.torch_cpu) and _equal_states(self.torch_cuda, other.torch_cuda))

    def restore(self) -> None:
        random.setstate(self.python)
        if self.numpy is not None:
            sys.modules["numpy"].random.set_state(self.numpy)
        torch.random.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)


def _equal_states(a: object, b: object) -> bool:
    """Equality of generator states, which hold arrays and tensors (numpy's, torch's) in tuples and lists."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b)
                and all(map(_equal_states, a, b)))
    if hasattr(a, "shape") or hasattr(b, "shape"):  # numpy's key array
        return bool(sys.modules["numpy"].array_equal(a, b))
    return a == b


def trace_forward(module: nn.Module, flip_modes: bool = False) -> Trace:
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
    tracer = ShallowTracer()
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
        random_states = _RandomStates.now()
        try:
            graph = tracer.trace(module)
            reads = _reads.values
            draws = not _RandomStates.now().same_as(random_states)
        finally:
            _reads.watched = _reads.values = None
            random_states.restore()
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
              "forward draws random numbers outside the graph (Python's, numpy's or torch's generator)" if draws else
              f"forward reads {', '.join(unfreezable)}, which a graph cannot follow" if unfreezable else None)
    return Trace(graph, constants, reads, frozen)


_IN_PLACE_OPERATORS = frozenset({operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                 operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                                 operator.ixor, operator.ilshift, operator.irshift, operator.imatmul})
# The same as methods, which the tracer records where the tensor written is no proxy (``acc[i] = h``).
_IN_PLACE_DUNDERS = frozenset(f"__{op.__name__}__" for op in _IN_PLACE_OPERATORS)
_VIEW_METHODS = frozenset({"view", "view_as", "reshape", "expand", "expand_as", "narrow", "select", "t", "transpose",
                           "permute", "squeeze", "unsqueeze", "flatten", "unflatten", "as_strided", "unbind",
                           "split", "chunk", "diagonal", "movedim", "contiguous", "detach", "__getitem__"})


def keeps_its_input(module: Optional[nn.Module]) -> bool:
    """Whether calling ``module`` leaves its input as it is and keeps it to itself: a Linear or a fused
    layer (plain, without hooks), or a plain Sequential whose first module does. A Dropout whose
    output only such modules read may join a fused layer that keeps its output for backward (NOTE
    [A Dropout ending a fused layer])."""
    if module is None or has_call_hooks(module) or "forward" in vars(module):  # its own forward may do anything
        return False
    if type(module) in (nn.Linear, FusedLinear, FusedMLP):
        return True
    first = next(iter(module._modules.values()), None)
    return runs_in_sequence(module) and keeps_its_input(first)


def dropout_may_end_layer(activation: str, output_read_safely: bool) -> bool:
    """Whether a Dropout after ``activation`` may join the fused layer as its last step: where
    backward does not read the layer's output, or where only modules keeping their input read the
    Dropout's (NOTE [A Dropout ending a fused layer] in :mod:`pyfastnn.fuse`)."""
    return output_read_safely or not output_kept_for_backward(activation)


def _passes_in_place(user: torch.fx.Node) -> bool:
    """Whether the call `user` asks for in place: ``inplace=True``, by keyword or by position."""
    if user.kwargs.get("inplace"):
        return True
    if user.op != "call_function":
        return False
    try:
        call = inspect.signature(user.target).bind(*user.args, **user.kwargs)
    except (TypeError, ValueError):  # no signature to read, or not this call's
        return False
    call.apply_defaults()  # a function changing its input unless told otherwise
    return bool(call.arguments.get("inplace"))


def _changed_or_passed_on(starts: List[torch.fx.Node],
                          module_keeps_input: Callable[[torch.fx.Node], bool] = lambda call: False) -> bool:
    """Whether the value of the nodes `starts` (or a view of it) is changed in place, written into,
    returned, or handed to a module whose call ``module_keeps_input`` does not vouch for."""
    reached = list(starts)
    seen = set(reached)
    while reached:
        node = reached.pop()
        for user in node.users:
            name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
            if (user.op == "output"
                    or (user.op == "call_module" and not module_keeps_input(user))
                    or user.kwargs.get("out") is node  # written into (torch.add(a, b, out=acc))
                    or (user.args[:1] == (node,) and (user.target in _IN_PLACE_OPERATORS or name in _IN_PLACE_DUNDERS
                                                      or _passes_in_place(user)
                                                      or (name.endswith("_") and not name.endswith("__"))))):
                return True
            # A view of it, by a method, an attribute (``h.data``, ``h.T``) or by indexing (``acc[i]``:
            # operator.getitem, or the method ``__getitem__`` where the index is a tensor; followed
            # whether it gives a view or a copy): changing the view changes it.
            if user not in seen and (user.target in (operator.getitem, getattr) or name in _VIEW_METHODS):
                seen.add(user)
                reached.append(user)
    return False


def _constant_escapes(graph: torch.fx.Graph, constants: Dict[str, torch.Tensor]) -> bool:
    """Whether a tensor forward creates (a graph constant, made once) is changed in place or returned:
    forward makes a fresh one per call (``acc = torch.zeros(2); acc += y``), the graph would share one."""
    return _changed_or_passed_on([node for node in graph.nodes if node.op == "get_attr" and node.target in constants])


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


class _KeepingGraphModule(torch.fx.GraphModule):
    """A GraphModule that keeps all of the module it was traced from. GraphModule alone keeps only
    what its graph uses, when built and again when copied or unpickled: unused submodules,
    parameters and buffers (and their state-dict keys) would be lost, and with them the plain
    attributes (``self.num_classes``), which buffers are non-persistent, and hooks added later.

    The graph froze the plain attributes forward read (``if self.return_hidden:``; only immutable
    values are let through, see :func:`trace_forward`): a call after one of them changed raises instead of
    computing what the old value said."""

    # What GraphModule's own constructor and copies would not keep; the plain attributes' names are
    # listed in _plain_names, the values forward read while traced in _traced_with.
    _KEPT = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set", "_plain_names", "_traced_with",
             *sorted(name for name in _MODULE_INTERNALS if "hook" in name))

    @classmethod
    def keeping(cls, module: nn.Module, trace: Trace) -> "_KeepingGraphModule":
        """A GraphModule running ``trace.graph`` with all of `module`, and the graph's tensor constants."""
        vars(module).update(trace.constants)  # where GraphModule looks for what the graph reads
        try:
            gm = cls(module, trace.graph, class_name=type(module).__name__)
        finally:
            for name in trace.constants:
                del vars(module)[name]
        # The tensors forward creates stay plain attributes, as forward made them: outside the state
        # dict, and not following .to() / .half() (the original makes them anew, in their own dtype).
        plain = {**{name: vars(module)[name] for name in plain_attribute_names(module)}, **trace.constants}
        kept = {"_modules": OrderedDict(module._modules), "_parameters": OrderedDict(module._parameters),
                "_buffers": OrderedDict(module._buffers),
                "_non_persistent_buffers_set": set(module._non_persistent_buffers_set),
                "_plain_names": tuple(plain), "_traced_with": dict(trace.reads)}
        gm._restore({**kept, **plain}, type(module).__name__)
        return gm

    def _insert_check(self) -> None:
        """Starts forward with :func:`check_unchanged` of the attributes the graph froze: inside
        forward, so torch.compile sees it in nested modules too. (Unpickling re-traces the generated
        code, which would run the check once and drop it: it is inserted again then.)"""
        if not self._traced_with:
            return
        first = next(node for node in self.graph.nodes if node.op != "placeholder")
        with self.graph.inserting_before(first), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # get_attr of plain attributes, which FX expects less
            now = tuple(self.graph.get_attr(name) for name in self._traced_with)
            self.graph.call_function(check_unchanged,
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
        return unpickle_keeping_graph_module, (rebuild, arguments, self._kept(), type(self).__name__)


def is_plain_attribute(module: nn.Module, name: str) -> bool:
    """Whether ``name`` is one of the user's own attributes of `module` (``self.num_classes``,
    ``self._scale``): held in its __dict__, and not one of nn.Module's internals."""
    return name in vars(module) and name not in _MODULE_INTERNALS


def plain_attribute_names(module: nn.Module) -> List[str]:
    """The user's own attributes of `module` (:func:`is_plain_attribute`), in their order."""
    return [name for name in vars(module) if is_plain_attribute(module, name)]


_GRAPH_MODULE_NAMES: Set[str] = set()


def _clashes_with_graph_module(module: nn.Module) -> List[str]:
    """The user's attributes a GraphModule has too (``meta``, ``graph``, ``code``...): a traced
    module with one of them cannot keep it."""
    if not _GRAPH_MODULE_NAMES:
        _GRAPH_MODULE_NAMES.update(set(vars(torch.fx.GraphModule(nn.Module(), torch.fx.Graph()))) - _MODULE_INTERNALS)
        _GRAPH_MODULE_NAMES.update(dir(torch.fx.GraphModule))
    return [name for name in plain_attribute_names(module) if name in _GRAPH_MODULE_NAMES]


def check_unchanged(class_name: str, traced_with: Dict[str, object], now: Tuple) -> None:
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


def unpickle_keeping_graph_module(rebuild, arguments, kept: Dict[str, object], class_name: str) -> _KeepingGraphModule:
    gm = rebuild(*arguments)  # a plain GraphModule holding what the graph uses
    restored = _KeepingGraphModule(gm, gm.graph)
    restored._restore(kept, class_name)
    restored.training = gm.training
    if not any(node.target is check_unchanged for node in restored.graph.nodes):
        restored._insert_check()
    return restored


def fuse_traced(module: nn.Module, path: str, pinned: AbstractSet[int], made: Dict[Tuple, FusedLinear]
                ) -> Tuple[nn.Module, List[Tuple[str, Tuple[str, ...]]]]:
    """`module` (at `path`, ``"a.b."``) as a GraphModule with its Linear -> activation (-> Dropout)
    calls fused, and each FusedLinear made: its path and the modules it replaced, described; or
    `module` itself and ``[]`` where tracing cannot stand for its forward (the cases
    :mod:`pyfastnn.fuse` lists) or nothing was fused. Modules whose ids are in `pinned` are neither
    fused nor absorbed. The fused layers come from, and go to, `made`
    (:func:`~pyfastnn.nn.fused_layers`), also where `module` is given back: pass a copy, kept if
    the GraphModule is."""
    if not _forward_is_traceable(module):
        return module, []
    try:
        trace = trace_forward(module)
        other = trace_forward(module, flip_modes=True)
    except Exception:  # data-dependent control flow, values torch.fx cannot record: leave it alone
        return module, []
    if (trace.frozen or other.frozen or _clashes_with_graph_module(module)
            # a graph differing between the traces read a training flag or a mode: it would keep one forever
            or _comparable_source(trace.graph) != _comparable_source(other.graph)
            or not _same_constants(trace.constants, other.constants)
            or _constant_escapes(trace.graph, trace.constants)):
        return module, []
    try:
        return _fused_graph_module(module, path, pinned, made, trace)
    except Exception:  # an attribute GraphModule cannot hold, and the like: leave it alone
        return module, []


def _fused_graph_module(module: nn.Module, path: str, pinned: AbstractSet[int], made: Dict[Tuple, FusedLinear],
                        trace: Trace) -> Tuple[nn.Module, List[Tuple[str, Tuple[str, ...]]]]:
    gm = _KeepingGraphModule.keeping(module, trace)
    absorbed: Set[str] = set()  # the activation and Dropout modules the fused layers took over
    runs: List[Tuple[str, Tuple[str, ...]]] = []
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
                and fusable_linear(linear := gm.get_submodule(source.target)) and id(linear) not in pinned):
            after_linear[node.target] = after_linear.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or "." in node.target:  # a grandchild: its owner's business
            continue
        linear = gm.get_submodule(node.target)
        if not fusable_linear(linear) or id(linear) in pinned:
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
                id(activation_module_at := gm.get_submodule(act_node.target)) in pinned
                or (call_counts[act_node.target] != 1
                    and (type(activation_module_at) not in STATELESS_ACTIVATIONS
                         # used elsewhere too: replacing it after fusion would reach those calls only
                         or after_linear.get(act_node.target) != call_counts[act_node.target]))):
            continue
        activation = _node_activation(gm, act_node, node)
        if activation is None:
            continue
        last, p, described = act_node, 0.0, [describe(linear), _describe_call(act_node)]
        if len(act_node.users) == 1:
            after = next(iter(act_node.users))
            if (after.op == "call_module" and after.args == (act_node,) and not after.kwargs
                    and call_counts[after.target] == 1
                    and id(dropout := gm.get_submodule(after.target)) not in pinned
                    and (found_p := dropout_joining(linear, dropout)) is not None
                    and dropout_may_end_layer(activation[0], not _changed_or_passed_on(
                        [after], lambda call: keeps_its_input(gm.get_submodule(call.target))))):
                p = found_p
                last = after
                described.append(describe(dropout))
        # The FusedLinear its uses elsewhere got, if any (a Linear of a Sequential called here too).
        (fused,) = fused_layers([Layer(linear, activation[0], activation[1], p)], made)
        # The fused layer takes the Linear's name, so its parameters keep their state-dict keys.
        setattr(gm, node.target, fused)
        last.replace_all_uses_with(node)
        for dead in ([last, act_node] if last is not act_node else [act_node]):
            if dead.op == "call_module":
                absorbed.add(dead.target)
            gm.graph.erase_node(dead)
        runs.append((f"{path}{node.target}", tuple(described)))
    if not runs:
        return module, []
    still_used = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    still_used |= {name.split(".")[0] for name in trace.reads if "." in name}  # forward reads their attributes
    for name in absorbed - still_used:
        delattr(gm, name)
    gm.graph.lint()
    gm._insert_check()  # after lint: a frozen None (an optional buffer) reads as missing to lint
    gm.recompile()
    gm.training = module.training  # its own flag only: the children keep theirs (a Dropout on in eval())
    return gm, runs


