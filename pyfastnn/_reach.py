"""Which modules of a model some code may call, or reach into, past their owner's ``forward``:
what :func:`pyfastnn.fuse` must leave unfused, since such a call would get a fused run's output
(``self.block.fc(x)`` after ``fc`` absorbed the ReLU after it), or go on calling the original
module held elsewhere. Read from the traced graphs, the forward hooks, what modules hold outside
the module tree, and the source of every method of each module's class (with the limits the README
states: fuse() reads code, it does not run it).
"""

from __future__ import annotations

import ast
import collections.abc
import contextlib
import functools
import inspect
import numbers
import textwrap
import types
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

import torch
from torch import nn

from ._patterns import runs_in_sequence
from ._tracing import is_plain_attribute, plain_attribute_names, trace_forward
from .nn import FusedLinear, FusedMLP

__all__ = ["reached_past_their_owner"]


def reached_past_their_owner(model: nn.Module) -> Set[int]:
    """ids of the modules some code of a module's class may call past their owner (``self.block.fc(x)``,
    ``self.mlp[0](x)``): what its traced graph calls, what its class's source reaches
    (:func:`_reached_in_source`), which also sees branches and modes the trace did not take, and
    what a module holds outside the module tree (:func:`_held_outside_the_tree`)."""
    pinned = _held_outside_the_tree(model)
    sources: Dict[type, Optional[List[Tuple[ast.Module, Optional[str]]]]] = {}  # each class's parsed source, read once
    for module in model.modules():
        if module._modules and (module._forward_hooks or module._forward_pre_hooks):
            pinned |= _reached_by_hooks(module)
        if type(module) is not nn.Sequential and runs_in_sequence(module) and module._modules:
            pinned |= _reached_in_source(module, sources)  # a subclass's own methods may index it: self[0](x)
            continue
        # Only a module with grandchildren can call past its children.
        if (not any(child._modules for child in module.children()) or isinstance(module, (FusedLinear, FusedMLP))
                or runs_in_sequence(module)):
            continue
        pinned |= _reached_in_source(module, sources)
        try:
            graph = trace_forward(module).graph
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
        for name in plain_attribute_names(module):
            collect(vars(module)[name], depth=6, by_function=False)
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


def _reached_in_source(module: nn.Module, sources: Dict[type, Optional[List[Tuple[ast.Module, Optional[str]]]]]
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

    In a Sequential subclass, ``self[i]``, ``for m in self`` and its children methods pin its own children.
    ``sources`` caches each class's parsed source (None: unreadable) across the modules of one model."""
    below = _below_children(module)
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
        names = _self_chain(node, me)
        if names is None:
            continue
        path, target = _submodule_path(module, names)
        if not path:
            own = (names[0] in module._parameters or names[0] in module._buffers
                   or is_plain_attribute(module, names[0]))
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
        if isinstance(node, ast.Attribute) and (names := _self_chain(node, me)) is not None:
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
    names = _self_chain(call.func, me)
    return bool(names) and len(_submodule_path(module, names)[0]) == len(names)


def _self_chain(node: ast.expr, me: str) -> Optional[List[str]]:
    """The attribute names of a chain read from the module, ``self.a.b`` -> ``["a", "b"]`` (``me``
    is the name ``self`` goes by), or None where ``node`` is no such chain (``self`` alone: [])."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return names[::-1] if isinstance(node, ast.Name) and node.id == me else None


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
