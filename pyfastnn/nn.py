"""Drop-in layers built on the fused ops."""

from __future__ import annotations

import operator
from collections import OrderedDict
from copy import copy as shallow_copy
from copy import deepcopy
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._ops import (DEFAULT_NEGATIVE_SLOPE, activation_code, canonical_activation, dropout_probability, dropout_runs,
                   run_fused_linear, run_fused_mlp, slope_value)
from ._patterns import (Layer, activation_module, chain_mismatch, dropout_of, has_call_hooks, is_plain_linear,
                        kept_for_its_own_state, linear_dtype_problem, link_mismatch, parse_layers)

__all__ = ["FusedLinear", "FusedMLP", "activation_module"]


_LEAKY_RELU = activation_code("leaky_relu")


#: FusedLinear's settings, each a property that checks what it is given.
_CHECKED_SETTINGS = ("activation", "negative_slope", "dropout")


class FusedLinear(nn.Module):
    """``nn.Linear`` followed by an activation (and optionally dropout), one fused op each way.

    Parameters are named, shaped and initialised exactly like ``nn.Linear``'s (``weight`` of shape
    ``(out_features, in_features)``, optional ``bias``), so state dicts move freely between the two.
    ``activation``, ``negative_slope`` and ``dropout`` are read on every call: assigning one changes
    what the layer computes (and is checked like the constructor argument).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether to learn an additive bias.
        activation: one of :data:`pyfastnn.ACTIVATIONS` (``None``/``"none"`` mean identity).
        negative_slope: ``leaky_relu``'s slope for negative inputs.
        dropout: probability of zeroing each output in ``train()`` mode, inside the fused pass (like
            ``nn.Dropout`` after the activation; identity in ``eval()``).

    Example:
        >>> import torch, pyfastnn
        >>> layer = pyfastnn.FusedLinear(784, 256, activation="relu")
        >>> layer.load_state_dict(torch.nn.Linear(784, 256).state_dict())
        <All keys matched successfully>
        >>> layer(torch.randn(64, 784)).shape
        torch.Size([64, 256])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: Optional[str] = "relu",
        *,
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
        dropout: float = 0.0,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dropout = dropout
        self.in_features = _feature_count(in_features, "in_features")
        self.out_features = _feature_count(out_features, "out_features")
        self.activation = activation
        self.negative_slope = negative_slope
        self.weight = nn.Parameter(torch.empty((self.out_features, self.in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # The very same initialisation as nn.Linear (kaiming-uniform weight, fan-in-uniform bias).
    reset_parameters = nn.Linear.reset_parameters

    def __setattr__(self, name: str, value) -> None:
        # Each setting's property checks what it is given. nn.Module's own __setattr__ would take a
        # module given for one as a submodule (never read) and a parameter as a name clash.
        if name in _CHECKED_SETTINGS:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __setstate__(self, state: dict) -> None:
        # Modules pickled whole before these attributes became properties kept them as plain values.
        for name in _CHECKED_SETTINGS:
            if name in state:
                state["_" + name] = state.pop(name)
        if "_activation" in state:
            state["_activation_code"] = activation_code(state["_activation"])
        super().__setstate__(state)

    @property
    def activation(self) -> str:
        """The activation's canonical name; assigning a name (or ``None``) changes the computation."""
        return self._activation

    @activation.setter
    def activation(self, value: Optional[str]) -> None:
        code = activation_code(value)  # raises ValueError for an unknown name
        self._activation, self._activation_code = canonical_activation(value), code

    @property
    def negative_slope(self) -> float:
        """``leaky_relu``'s slope for negative inputs."""
        return self._negative_slope

    @negative_slope.setter
    def negative_slope(self, value: float) -> None:
        self._negative_slope = slope_value(value)

    @property
    def dropout(self) -> float:
        """Dropout probability after the activation in ``train()`` mode; must be in ``[0, 1)`` (and
        more than 2^-33 below 1)."""
        return self._dropout

    @dropout.setter
    def dropout(self, value: float) -> None:
        self._dropout = dropout_probability(value)

    def __prepare_scriptable__(self) -> nn.Module:
        raise _NotScriptable(type(self).__name__)  # torch.jit.script asks each module first

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``act(input @ weight.T + bias)`` for ``input`` of shape ``(*, in_features)``, then dropout
        in training mode."""
        if dropout_runs(self.dropout, self.training):  # a one-layer fused MLP with dropout after it
            return run_fused_mlp(input, [self.weight], [self.bias], [self._activation_code], self.negative_slope,
                              [self.dropout], True)
        return run_fused_linear(input, self.weight, self.bias, self._activation_code, self.negative_slope)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        activation: Optional[str] = "relu",
        *,
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
        dropout: float = 0.0,
        copy: bool = False,
    ) -> "FusedLinear":
        """A FusedLinear computing ``dropout(activation(linear(x)))``, in ``linear``'s train/eval mode.

        By default it shares ``linear``'s parameters (training one trains the other); ``copy=True``
        gives it independent copies instead. Only a plain ``nn.Linear`` converts: a subclass, a
        parametrized Linear (``weight_norm``, ``spectral_norm``, ``prune``, ``parametrize``), one with
        hooks or with attributes of its own raises ``ValueError``, since the fused layer would drop
        what they add (as :meth:`FusedMLP.from_sequential` and :func:`pyfastnn.fuse` leave them); one
        in a dtype the kernels lack (complex, say) raises ``TypeError``.

        Example:
            >>> from torch import nn
            >>> from pyfastnn import FusedLinear
            >>> linear = nn.Linear(4, 3)
            >>> layer = FusedLinear.from_linear(linear, "gelu")
            >>> layer.weight is linear.weight, FusedLinear.from_linear(linear, copy=True).weight is linear.weight
            (True, False)
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear.weight, nn.parameter.UninitializedParameter):
            raise ValueError("from_linear got an uninitialized nn.LazyLinear (in_features is not known yet); "
                             "run one forward pass through it first")
        if not is_plain_linear(linear):
            raise ValueError(f"from_linear got a {type(linear).__name__} that is not a plain nn.Linear (a subclass, "
                             f"parametrizations, hooks, or attributes, parameters, buffers or modules of its own), "
                             f"which the fused layer would silently drop")
        if (problem := linear_dtype_problem(linear)) is not None:
            raise TypeError(f"from_linear got a Linear the fused layer cannot compute: {problem}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    activation=activation, negative_slope=negative_slope, dropout=dropout, device="meta")
        take = _copied_parameter if copy else (lambda p: p)
        layer.weight = take(linear.weight)
        if linear.bias is not None:
            layer.bias = take(linear.bias)
        layer.training = linear.training
        return layer

    def to_linear(self) -> nn.Sequential:
        """The plain-PyTorch equivalent (``nn.Linear``, activation module, ``nn.Dropout`` if any),
        sharing parameters, in this layer's train/eval mode.

        Example:
            >>> from pyfastnn import FusedLinear
            >>> FusedLinear(4, 3, activation="tanh", dropout=0.1).to_linear()
            Sequential(
              (0): Linear(in_features=4, out_features=3, bias=True)
              (1): Tanh()
              (2): Dropout(p=0.1, inplace=False)
            )
        """
        return nn.Sequential(*self._plain_modules(keep_identity=True)).train(self.training)

    def _plain_modules(self, keep_identity: bool) -> List[nn.Module]:
        """The layer as torch.nn modules, each in this layer's train/eval mode."""
        modules: List[nn.Module] = [self._plain_linear()]
        if keep_identity or self.activation != "identity":
            modules.append(activation_module(self.activation, self.negative_slope))
        if self.dropout > 0.0:
            modules.append(nn.Dropout(self.dropout))
        return [module.train(self.training) for module in modules]

    def _plain_linear(self) -> nn.Linear:
        """An ``nn.Linear`` sharing this layer's parameters, and the state of its parametrizations if
        it has any, through views of them (``_module_view``): a parametrization registered on the
        copy, or its train/eval mode, stays the copy's."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        for name in ("weight", "bias"):
            if parametrize.is_parametrized(self, name):
                # A placeholder parametrization gives `linear` the parametrized class and property;
                # then a view of the layer's ParametrizationList (its original tensors) replaces it.
                parametrize.register_parametrization(linear, name, nn.Identity(), unsafe=True)
                linear.parametrizations[name] = _module_view(self.parametrizations[name])
            elif name in self._parameters:
                setattr(linear, name, self._parameters[name])
            else:
                raise RuntimeError(
                    f"pyfastnn: this layer's {name} is computed by a forward pre-hook (torch.nn.utils.prune, "
                    f"weight_norm or spectral_norm), which an nn.Linear copy would not run; remove it first "
                    f"(e.g. prune.remove) or use torch.nn.utils.parametrize / parametrizations, which are "
                    f"carried over")
        return linear

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation}")
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        if self.dropout > 0.0:
            text += f", dropout={self.dropout}"
        return text


class FusedMLP(nn.Module):
    """A whole MLP as ONE fused op forward and ONE backward: ``Linear -> activation (-> dropout)``
    for each hidden layer, then ``Linear -> output_activation``.

    Its layers are :class:`FusedLinear` modules that hold the parameters (initialised like
    ``nn.Linear``), registered under the indices the equivalent ``nn.Sequential`` gives its
    ``nn.Linear`` modules, so the state dicts of the two are interchangeable as they are
    (:meth:`to_sequential`, :meth:`from_sequential`; the indices are given when the layers are set,
    and stay when a layer's activation or dropout changes later). The layers are run by the fused
    op, not called one by one; each layer's dropout follows that layer's train/eval mode, as each
    ``nn.Dropout`` of a Sequential follows its own. Their parameters, activation, dropout and
    ``negative_slope`` are read on every call (assigning a new layer or attribute takes effect; the
    same names assigned on the FusedMLP raise ``AttributeError``); their forward pre-hooks run before the fused op (with the network's
    input for the first layer and no input for the others, whose inputs are never separate
    tensors), so ``torch.nn.utils.prune`` and the hook-based ``weight_norm`` / ``spectral_norm``
    work, as do ``torch.nn.utils.parametrize`` parametrizations; forward and backward hooks on a
    layer raise ``RuntimeError`` (the layer's output is never a separate tensor).

    Args:
        sizes: ``[in_features, hidden_1, ..., out_features]`` (at least two entries).
        activation: hidden layers' activation (one of :data:`pyfastnn.ACTIVATIONS`).
        output_activation: the last layer's activation (default identity: logits).
        dropout: probability after each hidden activation, in ``train()`` mode only.
        bias: whether the layers have biases.
        negative_slope: ``leaky_relu``'s slope.

    Example:
        >>> import torch, pyfastnn
        >>> mlp = pyfastnn.FusedMLP([784, 256, 128, 10], activation="relu", dropout=0.2)
        >>> mlp(torch.randn(64, 784)).shape
        torch.Size([64, 10])
        >>> plain = mlp.to_sequential()  # Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
        >>> plain.load_state_dict(mlp.state_dict())
        <All keys matched successfully>
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: Optional[str] = "relu",
        output_activation: Optional[str] = "identity",
        dropout: float = 0.0,
        bias: bool = True,
        *,
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        sizes = _layer_sizes(sizes)
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least in_features and out_features, got {sizes}")
        for name, value in (("activation", activation), ("dropout", dropout)):
            if isinstance(value, (list, tuple)):
                raise TypeError(f"FusedMLP takes one {name} for every hidden layer, got {value!r}; for settings per "
                                "layer, build the layers: FusedMLP.from_layers([FusedLinear(...), ...])")
        dropout = dropout_probability(dropout)
        activation = canonical_activation(activation)  # checked even when there is no hidden layer
        last = len(sizes) - 2
        layers = [FusedLinear(fan_in, fan_out, bias, activation if i < last else output_activation,
                              negative_slope=negative_slope, dropout=dropout if i < last else 0.0,
                              device=device, dtype=dtype)
                  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]))]
        self._set_layers(layers)

    def _set_layers(self, layers: Sequence[FusedLinear], names: Optional[Sequence[str]] = None) -> None:
        """Registers ``layers`` under ``names``; by default the indices nn.Sequential gives their Linears."""
        _check_layers(layers)
        if names is None:
            names, index = [], 0
            for layer in layers:  # the indices nn.Sequential gives the nn.Linear modules
                names.append(str(index))
                index += 1 + (layer.activation != "identity") + (layer.dropout > 0.0)
        for name, layer in zip(names, layers):
            self.add_module(name, layer)

    def __setattr__(self, name: str, value) -> None:
        # These settings live on the layers and are read from them on every call: a value of the
        # same name on the FusedMLP would change nothing (torch.func.functional_call given the keys
        # of the Sequential a FusedMLP replaced in place sets "weight" here). A parameter under such a name is
        # refused too unless a subclass's own forward may read it; one registered explicitly
        # (register_parameter / register_buffer) may be reassigned. A module would be taken for a layer.
        own_parameter = isinstance(value, nn.Parameter) and type(self).forward is not FusedMLP.forward
        registered = name in self._buffers or name in self._parameters
        if name in _LAYER_SETTINGS and not own_parameter and not registered:
            # Named from the FusedMLP itself: it does not know its own name in a model holding it.
            where = (f"its parameters are its layers' ({', '.join(n for n, _ in self.named_parameters())}), "
                     f"named from the FusedMLP itself: in a model holding it they follow its name there (see "
                     f"that model's named_parameters())"
                     if name in ("weight", "bias") else f"set it on the layers instead (for layer in mlp: "
                                                        f"layer.{name} = ...)")
            raise AttributeError(f"FusedMLP reads {name!r} from its layers on every call; {where}")
        super().__setattr__(name, value)

    @property
    def negative_slope(self) -> float:
        """The ``leaky_relu`` slope of its leaky layers (they must agree; 0.01 when there are none)."""
        return _common_negative_slope(list(self))

    @classmethod
    def from_layers(cls, layers: Iterable[FusedLinear]) -> "FusedMLP":
        """A FusedMLP running the given layers (sharing their parameters, activations, dropout and
        train/eval modes); it is in ``train()`` mode if they all are.

        Example:
            >>> import torch
            >>> from pyfastnn import FusedLinear, FusedMLP
            >>> mlp = FusedMLP.from_layers([FusedLinear(8, 16, activation="silu"), FusedLinear(16, 2, activation=None)])
            >>> mlp(torch.randn(5, 8)).shape
            torch.Size([5, 2])
        """
        return cls._assembled(list(layers))

    @classmethod
    def _assembled(cls, layers: List[FusedLinear], names: Optional[List[str]] = None) -> "FusedMLP":
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        mlp._set_layers(layers, names)
        mlp.training = all(layer.training for layer in mlp)
        return mlp

    @classmethod
    def from_sequential(cls, sequential: nn.Sequential, *, copy: bool = False) -> "FusedMLP":
        """The FusedMLP equivalent to ``Linear, activation, (Dropout,) ..., Linear, (activation)``,
        sharing its parameters (or copies of them with ``copy=True``), each layer under its Linear's
        name there (so the state dicts have the same keys).

        Example:
            >>> from torch import nn
            >>> from pyfastnn import FusedMLP
            >>> plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
            >>> mlp = FusedMLP.from_sequential(plain)
            >>> list(mlp.state_dict()) == list(plain.state_dict())
            True
        """
        modules = list(sequential)
        layers, used = parse_layers(modules, 0)
        if used != len(modules) or not layers:
            stop = modules[used] if used < len(modules) else None
            why = ""
            if layers and dropout_of(stop) is not None and stop.training != layers[-1].linear.training:
                why = (f" (a Dropout in {_mode(stop)} mode after a Linear in {_mode(layers[-1].linear)} mode: a fused "
                       "layer has one mode; call .train() or .eval() on the Sequential first)")
            elif layers and (following := parse_layers(modules, used)[0]):
                why = f" ({chain_mismatch(layers, following[0])})"
            elif isinstance(stop, nn.Linear) and (problem := linear_dtype_problem(stop)) is not None:
                why = f" ({problem})"
            elif stop is not None and kept_for_its_own_state(stop):
                why = (" (it has hooks, or a forward, parameter, buffer or attribute of its own, which a fused "
                       "layer would bypass or lose)")
            raise ValueError("from_sequential needs a Sequential of Linear -> activation (-> Dropout) "
                             f"layers only; stopped at module {used}: {stop}{why}")
        fused = fused_layers(layers)
        if copy:
            # One copy of each parameter, as copy.deepcopy of the Sequential makes: a Linear used twice,
            # or a weight tied between Linears, stays one parameter in the copy.
            copies: Dict[int, nn.Parameter] = {}
            for layer in {id(layer): layer for layer in fused}.values():  # a layer used twice: once
                for name, parameter in list(layer.named_parameters(recurse=False)):
                    if id(parameter) not in copies:
                        copies[id(parameter)] = _copied_parameter(parameter)
                    setattr(layer, name, copies[id(parameter)])
        # Each layer under its Linear's name in the Sequential, by position (a Linear used twice is two
        # layers): the state dicts load either way, also where a layer's activation or dropout came or
        # went since the indices were given.
        names, position = [], 0
        for layer in layers:
            while modules[position] is not layer.linear:
                position += 1
            names.append(list(sequential._modules)[position])
            position += 1
        return cls._assembled(fused, names)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[FusedLinear]:
        """The layers, in order."""
        return iter(self._modules.values())  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> FusedLinear:
        """The index-th layer (by position, like a list).

        Slices are refused: a FusedMLP counts layers where the ``nn.Sequential`` it stands for
        counts modules, so ``model[:-1]`` of a fused model would silently cut elsewhere than the
        same slice of the original. The layers' names are the Sequential's indices of their Linears
        (``"0"``, ``"2"``, ``"4"``, the state dict's ``"2.*"``): ``model.get_submodule("2")`` takes
        a layer by name.

        Example:
            >>> mlp = FusedMLP([8, 16, 12, 4])
            >>> mlp[-1].out_features, len(list(mlp)[1:])
            (4, 2)
        """
        return list(self._modules.values())[_layer_position(index, len(self._modules))]  # type: ignore[return-value]

    def __setitem__(self, index: int, layer: FusedLinear) -> None:
        """Replaces the index-th layer (by position); it keeps that layer's name, so the state-dict keys
        stay. The layers must still chain (checked now, not at the next call)."""
        index = _layer_position(index, len(self._modules))
        layers = list(self)
        layers[index] = layer
        _check_layers(layers, list(self._modules))
        setattr(self, list(self._modules)[index], layer)

    def to_sequential(self) -> nn.Sequential:
        """The plain-PyTorch equivalent (``nn.Linear``/activation/``nn.Dropout`` modules), sharing
        parameters, each module in its layer's train/eval mode; its state dict has the same keys as
        this module's.

        Example:
            >>> from pyfastnn import FusedMLP
            >>> mlp = FusedMLP([8, 16, 2], activation="gelu")
            >>> plain = mlp.to_sequential()
            >>> [type(m).__name__ for m in plain], plain[0].weight is mlp[0].weight
            (['Linear', 'GELU', 'Linear'], True)
        """
        modules: Dict[str, nn.Module] = {}
        plain_of: Dict[int, List[nn.Module]] = {}  # a layer used at several places: its modules, at each
        for name, layer in self._modules.items():
            if id(layer) not in plain_of:
                plain_of[id(layer)] = layer._plain_modules(keep_identity=False)  # type: ignore[union-attr]
            for k, module in enumerate(plain_of[id(layer)]):
                # Each Linear under its layer's name; the modules after it under the next indices,
                # unless a layer's activation or dropout was added since the indices were given.
                key = name if k == 0 else (str(int(name) + k) if name.isdigit() else f"{name}_{k}")
                taken = key in modules or (k > 0 and key in self._modules)  # by an earlier module; another layer's
                if taken:
                    key = f"{name}_{type(module).__name__.lower()}"
                modules[key] = module
        plain = nn.Sequential(OrderedDict(modules))
        plain.training = self.training
        return plain

    def __prepare_scriptable__(self) -> nn.Module:
        raise _NotScriptable(type(self).__name__)  # torch.jit.script asks each module first

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """The whole network on ``input`` of shape ``(*, sizes[0])`` as one fused op (its backward
        one op too), each layer in its own train/eval mode."""
        # Everything is read from the layers on every call (a few microseconds): replacing a layer,
        # assigning a parameter or an attribute, export's attribute snapshots, parametrizations and
        # hook-based reparametrizations are all seen.
        weights, biases, codes, dropout = [], [], [], []
        slope: Optional[float] = None
        for name, layer in self._modules.items():
            _check_layer(layer, name)
            if has_call_hooks(layer):
                _run_layer_pre_hooks(layer, name, (input,) if not weights else ())
            parameters = layer._parameters
            # A parametrized or hook-reparametrized layer computes its weight on access.
            weights.append(parameters["weight"] if "weight" in parameters else layer.weight)
            biases.append(parameters["bias"] if "bias" in parameters else layer.bias)
            code = layer._activation_code
            if code == _LEAKY_RELU:
                if slope is not None and layer._negative_slope != slope:
                    _common_negative_slope(list(self))  # raises, naming the slopes
                slope = layer._negative_slope
            codes.append(code)
            dropout.append(layer._dropout if layer.training else 0.0)  # each layer's own mode
        slope = DEFAULT_NEGATIVE_SLOPE if slope is None else slope
        return run_fused_mlp(input, weights, biases, codes, slope, dropout, any(p > 0.0 for p in dropout))


_LAYER_SETTINGS = frozenset({"activation", "output_activation", "dropout", "negative_slope", "weight", "bias"})


def _module_view(module: nn.Module) -> nn.Module:
    """Another module object on ``module``'s state: the same parameter, buffer and hook dicts (so
    training, loading a state dict or ``.to()`` through either is seen by both), but its own
    train/eval flag and submodule dict, each submodule such a view too (so registering a module on
    it, or ``eval()``, leaves ``module`` as it is)."""
    view = shallow_copy(module)
    view._modules = {name: None if child is None else _module_view(child) for name, child in module._modules.items()}
    return view


def _copied_parameter(parameter: nn.Parameter) -> nn.Parameter:
    """A new parameter holding a copy of ``parameter``'s values, with its requires_grad and class (a
    Parameter subclass carrying sharding or quantization metadata stays one), as copy.deepcopy makes."""
    return deepcopy(parameter)


def fused_layers(layers: Sequence[Layer], made: Optional[Dict[Tuple, FusedLinear]] = None) -> List[FusedLinear]:
    """The FusedLinear of each parsed layer, sharing its Linear's parameters. A Linear used at several
    places with the same activation and dropout (``nn.Sequential(*[nn.Linear(8, 8), nn.Tanh()] * 3)``)
    gets one FusedLinear for all of them, as it is one module there: its uses stay one layer through
    whatever rebuilds parameters module by module (``to_empty``, ``load_state_dict(assign=True)``, a
    parametrization per module). Followed by another activation or dropout at another use, it takes
    one FusedLinear per kind of use, sharing the parameters as weights tied between modules do (which
    such rebuilds untie in PyTorch too). ``made``: the FusedLinear of each (Linear's id, activation,
    slope, dropout) made before, by earlier runs; updated."""
    made = {} if made is None else made
    fused = []
    for layer in layers:
        key = (id(layer.linear), *layer[1:])
        if key not in made:
            made[key] = FusedLinear.from_linear(layer.linear, layer.activation, negative_slope=layer.slope,
                                                dropout=layer.dropout)
        fused.append(made[key])
    return fused


def _feature_count(value, name: str) -> int:
    """A layer's ``in_features`` / ``out_features``: an integer >= 0 (as ``nn.Linear`` takes), else a
    TypeError or ValueError naming it."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {count}")
    if count > _MAX_FEATURES:  # torch would fail unpacking it, with a C++ backtrace for a message
        raise ValueError(f"{name} must be < 2**63, got an integer of {len(str(count))} digits")
    return count


_MAX_FEATURES = 2 ** 63 - 1  # a tensor dimension is an int64


def _layer_sizes(sizes) -> List[int]:
    """``FusedMLP``'s ``sizes``, each checked as :func:`_feature_count` checks a layer's: a sequence
    of integers >= 0."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise TypeError(f"sizes must be a sequence of integers, got {type(sizes).__name__}")
    return [_feature_count(n, f"sizes[{i}]") for i, n in enumerate(sizes)]


def _check_layers(layers: Sequence[FusedLinear], names: Optional[Sequence[str]] = None) -> None:
    """The layers of one FusedMLP (named in errors by ``names``, where given): at least one, each a
    plain FusedLinear, one leaky_relu slope, each layer's outputs the next one's inputs, and one
    dtype and device."""
    if not layers:
        raise ValueError("a FusedMLP needs at least one layer")
    names = list(names) if names is not None else [None] * len(layers)
    for layer, name in zip(layers, names):
        _check_layer(layer, name)
    _common_negative_slope(layers)
    for i in range(len(layers) - 1):
        before, after = layers[i], layers[i + 1]
        which = f" {names[i]!r} and {names[i + 1]!r}" if names[i] is not None else ""
        if (why := link_mismatch(before, after)) is not None:
            raise ValueError(f"FusedMLP layers{which} do not chain: {why}")


def _check_layer(layer, name: Optional[str] = None) -> None:
    """A FusedMLP layer: a FusedLinear whose forward is FusedLinear's own. The FusedMLP never calls a
    layer's forward (it reads weight, bias, activation and dropout into one fused op), so a subclass
    or an instance with a forward of its own would be computed as a plain layer, silently."""
    where = f"FusedMLP layer {name!r}" if name is not None else "a FusedMLP layer"
    if not isinstance(layer, FusedLinear):
        raise TypeError(f"pyfastnn: {where} must be a FusedLinear, got {type(layer).__name__}")
    if type(layer).forward is not FusedLinear.forward or "forward" in layer.__dict__:
        raise TypeError(f"pyfastnn: {where} ({type(layer).__name__}) has a forward of its own, which a FusedMLP "
                        f"would never call (it runs its layers' weights and activations in one fused op); "
                        f"put such a layer in an nn.Sequential instead")


def _layer_position(index: object, count: int) -> int:
    """The position in ``range(count)`` a FusedMLP index names (negative ones count from the end)."""
    if isinstance(index, slice):
        raise TypeError("FusedMLP indexes layers, not the modules of its nn.Sequential equivalent, so it refuses "
                        "slices; slice the layers (FusedMLP.from_layers(list(mlp)[1:])) or the plain modules "
                        "(mlp.to_sequential()[2:])")
    try:
        position = operator.index(index)
    except TypeError:
        raise TypeError(f"FusedMLP indices are integers (a layer by position), got {type(index).__name__}; "
                        f"take a layer by name with get_submodule (its Linear's index in the nn.Sequential: "
                        f"'0', '2', ...)") from None
    if not -count <= position < count:
        raise IndexError(f"FusedMLP index {position} is out of range: it has {count} layer{'s' * (count != 1)}")
    return position % count


class _NotScriptable(torch.jit.frontend.NotSupportedError):
    """What ``torch.jit.script`` raises for pyfastnn's modules, at every attempt (scripting them
    anyway would fail deep in the compiler, and differently the second time)."""

    def __init__(self, module_name: str) -> None:
        self.msg = (f"pyfastnn: {module_name} cannot be compiled by torch.jit.script (TorchScript is deprecated "
                    f"upstream); use torch.compile or torch.export, or torch.jit.trace for FusedLinear")
        Exception.__init__(self, self.msg)  # no source range to report: the refusal is the module's own
        self.module_name = module_name

    def __str__(self) -> str:
        return self.msg

    def __reduce__(self):
        return type(self), (self.module_name,)


def _common_negative_slope(layers: Sequence[FusedLinear]) -> float:
    slopes = {layer.negative_slope for layer in layers if layer.activation == "leaky_relu"}
    if len(slopes) > 1:
        raise ValueError(f"all leaky_relu layers of one FusedMLP need the same negative_slope, got {sorted(slopes)}")
    return slopes.pop() if slopes else DEFAULT_NEGATIVE_SLOPE


def _run_layer_pre_hooks(layer: nn.Module, name: str, inputs: tuple) -> None:
    """Runs a layer's forward pre-hooks before the fused op, so that hook-based reparametrizations
    (``torch.nn.utils.prune``, old-style ``weight_norm`` / ``spectral_norm``) recompute its weight.
    ``inputs`` is the layer's input where it exists (the first layer's), else empty: a hidden
    layer's input is never a separate tensor, and the network's input would pass for it unnoticed.
    Hooks that need the layer's own output cannot work inside one fused op: refused."""
    if layer._forward_hooks or layer._backward_hooks or layer._backward_pre_hooks:
        raise RuntimeError(
            f"pyfastnn: FusedMLP layer {name!r} has forward or backward hooks, but the FusedMLP runs all "
            f"its layers inside one fused op, so they would never see the layer's output or gradient; "
            f"register them on the FusedMLP itself, or use to_sequential() (torch.distributed.fsdp.fully_shard "
            f"registers such hooks: shard the whole FusedMLP, not its layers)")
    for hook_id, hook in list(layer._forward_pre_hooks.items()):
        with_kwargs = hook_id in layer._forward_pre_hooks_with_kwargs
        result = hook(layer, inputs, {}) if with_kwargs else hook(layer, inputs)
        if not _same_input(result, inputs, with_kwargs):
            raise RuntimeError(
                f"pyfastnn: a forward pre-hook of FusedMLP layer {name!r} returned a replacement input, which "
                f"cannot be applied inside the fused op (the layer's input is not a separate tensor); "
                f"use to_sequential() for such hooks")


def _same_input(result, inputs: tuple, with_kwargs: bool) -> bool:
    """Whether a forward pre-hook's result leaves the input as it was (None, or the same tensors),
    read the way nn.Module.__call__ reads it."""
    if result is None:
        return True
    if with_kwargs:
        if not (isinstance(result, tuple) and len(result) == 2) or result[1]:
            return False
        result = result[0]
    result = result if isinstance(result, tuple) else (result,)
    return len(result) == len(inputs) and all(a is b for a, b in zip(result, inputs))


def _mode(module: nn.Module) -> str:
    return "train" if module.training else "eval"
