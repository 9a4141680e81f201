"""``pyfastnn.fuse(model)``: swaps ``Linear -> activation (-> Dropout)`` runs for fused modules.

Two passes, innermost modules first:

* inside every ``nn.Sequential`` (nested ones too), each maximal run of ``nn.Linear``, optional
  supported activation, optional ``nn.Dropout`` layers becomes one :class:`~pyfastnn.FusedMLP`
  (two or more layers) or :class:`~pyfastnn.FusedLinear` (one layer), but for a Dropout ending
  the run after relu, sigmoid or tanh where code after the run may change its output in place (NOTE
  [A Dropout ending a fused layer]); a Sequential that is one
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
  Linear's own name, and the module becomes a ``torch.fx.GraphModule`` (:mod:`pyfastnn._tracing`).
  Modules that cannot be traced, modules whose traced graph differs between ``train()`` and
  ``eval()`` (a ``self.training`` branch or ``F.dropout(..., self.training)``, a child's flag too;
  a graph would freeze one mode), and forwards doing what a graph does not record (taking more
  than one input, assigning to the module, setting grad mode, inference mode or autocast, making
  tensors that differ between traces, drawing random numbers outside the graph, turning a buffer
  into a Python value, reading mutable or class-level values or missing attributes) are left as
  they are, and so is a Sequential whose ``forward`` or ``__iter__`` is
  not Sequential's (a subclass's, or a forward set on the instance). Tracing runs on a copy
  sharing the tensors, so forward's writes never reach the model. The immutable attributes a
  traced forward reads are frozen into its graph, whose first step raises if one changed.

Modules with hooks are never absorbed (fusion would bypass the hooks), nor replaced (a Sequential
with hooks is fused in place, a traced module with hooks is left as it is); :func:`fuse` warns about
the Linears and the modules holding Linears it leaves for their hooks (an activation or Dropout with
hooks just stays). A Linear in a dtype the kernels lack (complex, say) is left as it is. A module
some ``forward`` calls from outside its owner (``self.block.fc(x)``) is never absorbed either: that
call would get the fused activation too (such calls are read from the traced graph and from the
source of the module's class, every method of it: :mod:`pyfastnn._reach`), and neither is a module
some module also holds outside the module tree (a plain attribute, a list, a ``functools.partial``:
whoever calls it there would go on calling the original). The fused modules hold the very same
parameter tensors; everything else is left alone.
"""

from __future__ import annotations

import copy
import re
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn

from ._ops import check_flag
from ._patterns import (STATELESS_ACTIVATIONS, Layer, activation_of, describe, dropout_of, fusable_linear,
                        has_call_hooks, has_hooks, is_plain, linear_dtype_problem, parse_layers, runs_in_sequence)
from ._reach import reached_past_their_owner
from ._tracing import (ShallowTracer, check_unchanged, dropout_may_end_layer, fuse_traced, keeps_its_input,
                       unpickle_keeping_graph_module)
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

    def __init__(self, fused_into: str, layer_name: Optional[str] = None, has_bias: bool = True) -> None:
        super().__init__()
        # fused_into: the fused module's path in the model fuse() returned; layer_name: its layer
        # holding the parameters, where the absorbed module was an nn.Linear.
        self.fused_into, self.layer_name, self.has_bias = fused_into, layer_name, has_bias

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Hooks would run around this forward (nn.Module.__call__), seeing the input passed through.
        if has_call_hooks(self):
            raise RuntimeError(f"pyfastnn: this Absorbed placeholder has hooks, but fuse() folded the module that "
                               f"stood here into module {self.fused_into}, which computes it; the placeholder only "
                               f"passes that module's output on, so hooks here would never see the absorbed module's "
                               f"input, output or gradient. Register them on the model before fuse() (a module with "
                               f"hooks is left unfused), or on the fused module")
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


def _shared_modules_to_leave(model: nn.Module, pinned: Set[int], read_safely: Set[int]) -> Set[int]:
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
            fused_at, absorbed = (_fused_places(children, pinned | leave, id(module) in read_safely)
                                  if runs_in_sequence(module) else ({}, set()))
            for i, child in enumerate(children):
                if isinstance(child, nn.Linear):
                    linear_places.setdefault(id(child), []).append(fused_at.get(i))
                elif child is not None and not isinstance(child, STATELESS_ACTIVATIONS) and (
                        activation_of(child) is not None or dropout_of(child) is not None):
                    absorbed_at.setdefault(id(child), []).append(i in absorbed)
        more = {linear for linear, found in linear_places.items()
                if len(found) > 1 and (None in found or len(set(found)) > 1)}
        more |= {other for other, found in absorbed_at.items() if len(found) > 1 and not all(found)}
        more -= leave
        if not more:
            return leave
        leave |= more


def _runs(modules: List[nn.Module], pinned: Set[int],
          read_safely: bool) -> Iterator[Tuple[int, int, List[Layer], List[int]]]:
    """The runs of ``modules`` (a Sequential's, whose output is read as ``read_safely`` says) worth
    fusing, first to last, as _fuse_sequential fuses them: each one's first index, the index past it,
    its layers and the indices of their Linears."""
    i = 0
    while i < len(modules):
        layers, end = _parse_run(modules, i, pinned, read_safely)
        if not _worth_fusing(layers):
            i += 1
            continue
        yield i, end, layers, [j for j in range(i, end) if any(modules[j] is layer.linear for layer in layers)]
        i = end


def _fused_places(modules: List[nn.Module], pinned: Set[int], read_safely: bool) -> Tuple[Dict[int, Tuple], Set[int]]:
    """Where _fuse_sequential fuses in ``modules`` (a Sequential's): the positions of the Linears it
    fuses, each with the (activation, slope, dropout) after it, and the positions of the modules it
    absorbs after them."""
    fused_at: Dict[int, Tuple] = {}
    absorbed: Set[int] = set()
    for start, end, layers, linears in _runs(modules, pinned, read_safely):
        fused_at.update((j, tuple(layer[1:])) for j, layer in zip(linears, layers))
        absorbed |= set(range(start, end)) - set(linears)
    return fused_at, absorbed


# NOTE [A Dropout ending a fused layer]
# Backward of a relu, sigmoid or tanh layer reads the layer's output, also after its fused dropout
# (output_kept_for_backward), where torch's Dropout gives a tensor of its own that nothing keeps:
# code may change it in place (a residual block's `h += x`) and still train. A Dropout that would
# end a fused run after such an activation therefore joins it only where what reads the run's
# output keeps it as it is (keeps_its_input: a Linear, a fused layer, a Sequential starting with
# one): the next module of the Sequential or, past its end, whatever reads the Sequential's output
# where a plain Sequential holds it and nothing else sees it (no hooks, no calls from elsewhere:
# _outputs_read_safely); in a traced forward, the graph's uses. Anywhere else it stays a Dropout
# after the fused layer.
def _parse_run(modules: List[nn.Module], start: int, pinned: Set[int], read_safely: bool) -> Tuple[List[Layer], int]:
    """parse_layers' run from ``modules[start]``, without a last Dropout that must stay a Dropout
    (NOTE [A Dropout ending a fused layer]); ``read_safely``: whether the Sequential's own output is
    read only by modules keeping their input."""
    layers, end = parse_layers(modules, start, pinned)
    if (layers and modules[end - 1] is not layers[-1].linear and dropout_of(modules[end - 1]) is not None
            and not dropout_may_end_layer(layers[-1].activation,
                                          keeps_its_input(modules[end]) if end < len(modules) else read_safely)):
        layers[-1] = layers[-1]._replace(dropout=0.0)
        end -= 1
    return layers, end


def _outputs_read_safely(model: nn.Module, reached: Set[int]) -> Set[int]:
    """ids of the Sequentials (below ``model``) whose output, at every place they are held, only
    modules keeping their input read: the next module of the plain Sequential holding them or, past
    its end, what reads that Sequential's output. A module held by any other module, whose forward
    may do anything with what it returns, or by none (``model``'s output goes to the caller), is not
    one, and neither is one with call hooks (which see its output) or one in ``reached`` (called
    from elsewhere too), nor anything inside such a one past its end."""
    verdicts: Dict[int, bool] = {}
    visited: Set[Tuple[int, bool]] = set()  # a module below a place read alike gives the same verdicts

    def visit(module: nn.Module, read_safely: bool) -> None:
        if (id(module), read_safely) in visited:  # also a module holding one above it
            return
        visited.add((id(module), read_safely))
        children = list(module._modules.values())
        in_sequence = runs_in_sequence(module)
        for i, child in enumerate(children):
            if child is not None:
                safe = (in_sequence and not has_call_hooks(child) and id(child) not in reached
                        and (keeps_its_input(children[i + 1]) if i + 1 < len(children) else read_safely))
                verdicts[id(child)] = verdicts.get(id(child), True) and safe
                visit(child, safe)

    visit(model, False)
    return {module for module, safe in verdicts.items() if safe}


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

# Whole models fused and saved by earlier versions name these here (a traced module's pickle, its
# tracer and the code its graph generated): they load as they did.
_unpickle_keeping_graph_module = unpickle_keeping_graph_module
_ShallowTracer = ShallowTracer
_check_unchanged = check_unchanged


def _fuse_sequential(seq: nn.Sequential, path: str, fusion: "_Fusion", replace_whole: bool = True) -> nn.Module:
    names, modules = list(seq._modules), list(seq._modules.values())
    report = fusion.report
    read_safely = id(seq) in fusion.read_safely
    layers, end = _parse_run(modules, 0, fusion.pinned, read_safely)
    # A FusedMLP in the Sequential's place would lose any parameter, buffer or attribute of its own.
    if replace_whole and _worth_fusing(layers) and end == len(modules) and is_plain(seq, nn.Sequential, True):
        # The whole Sequential is one run: a FusedMLP takes its place, and its layers take the
        # Linear modules' indices, so the state-dict keys stay exactly the same.
        fused = _fused_module(layers, fusion, as_mlp=True)
        if list(fused.state_dict()) == list(seq.state_dict()):
            report.append(FusedRun(path.rstrip("."), tuple(describe(m) for m in modules), "FusedMLP"))
            return fused
    # Otherwise each run is replaced where it stands: the fused module under the name of the run's
    # first module, Absorbed placeholders under the others' (indices, len() and append() keep working).
    renames: Dict[str, str] = {}
    slots: Dict[str, Tuple[nn.Module, str]] = {}
    for i, end, layers, linears in _runs(modules, fusion.pinned, read_safely):
        fused = _fused_module(layers, fusion)
        report.append(FusedRun(f"{path}{names[i]}", tuple(describe(m) for m in modules[i:end]), type(fused).__name__))
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


@dataclass
class _Fusion:
    report: List[FusedRun]
    pinned: Set[int]   # ids of modules left as they are: reached past their owner, or shared so fusion would split them
    hooked: List[str]  # modules left unfused for their hooks
    compiled: List[str]  # torch.compile wrappers left as they are
    read_safely: Set[int]  # ids of the Sequentials whose output only modules keeping their input read
    done: Dict[int, Tuple[nn.Module, nn.Module]] = field(default_factory=dict)  # id -> (module, its result)
    made: Dict[Tuple, FusedLinear] = field(default_factory=dict)  # fused_layers' (Linear's id, settings) -> layer


def _compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper. It calls the module it wrapped through a
    method bound when it was made, so a module fused in its place (``_orig_mod``) would never run."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not loaded: nothing was compiled
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


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
    if runs_in_sequence(module):
        # Only a plain Sequential may become a FusedMLP: a subclass would lose its class and methods.
        return _fuse_sequential(module, path, fusion, replace_whole=not keep and type(module) is nn.Sequential)
    if isinstance(module, nn.Sequential):
        return module  # a subclass with its own forward: tracing would take its indexing and methods away
    if any(fusable_linear(child) for child in module.children()):
        if keep and not keep_root:
            fusion.hooked.append(path.rstrip(".") or type(module).__name__)
            return module
        made = dict(fusion.made)  # the fused layers it makes, kept only if the traced module replaces this one
        traced, runs = fuse_traced(module, path, fusion.pinned, made)
        if keep_root and traced is not module:
            warnings.warn(f"pyfastnn.fuse(inplace=True) left the forward of the top-level {type(module).__name__} "
                          f"unfused: fusing it replaces the module by a torch.fx.GraphModule, which cannot happen "
                          f"in place; use `model = pyfastnn.fuse(model)` for that", stacklevel=4)
            return module
        if traced is not module:
            fusion.report.extend(FusedRun(run_path, replaced, "FusedLinear") for run_path, replaced in runs)
            fusion.made.update(made)
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
    (both forms), ``nn.SiLU``, ``nn.Identity`` (and, in traced modules, ``torch.relu``, ``F.relu``,
    ``torch.sigmoid``, ``torch.tanh``, ``F.silu``, ``F.gelu`` (both forms), ``F.leaky_relu`` and the
    methods ``x.relu()``, ``x.sigmoid()``, ``x.tanh()``; not in place). Outputs equal the original
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
    modules while one does. Tracing draws no random numbers as far as the caller can see: the
    states of torch's, Python's and numpy's generators are restored afterwards.

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
    # torch.fx patches nn.Module process-wide while it traces: one fuse at a time. The caller's
    # stream must not move: the generator is forked around the whole fusion (each trace also puts
    # back the generators it watches for a forward's own draws: _tracing.trace_forward).
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
    pinned = reached_past_their_owner(model)
    read_safely = _outputs_read_safely(model, pinned)
    fusion = _Fusion([], pinned | _shared_modules_to_leave(model, pinned, read_safely), [], [], read_safely)
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
