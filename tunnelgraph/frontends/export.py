"""PyTorch's second capture: ``torch.export``, normalised into the fx graph the translator reads.

``torch.fx.symbolic_trace`` runs a forward on proxies, so Python control
flow on shapes (timm's ``Conv2dSame`` computing its "same" padding,
MobileViT's patch sizes) stops it. ``torch.export`` runs the forward on
real shapes and specialises such control flow, which is exactly what a
rewrite of the model at these shapes needs. Its graph is written in ATen
operators (``aten.conv2d.default``) over the model's own tensors, read by
``get_attr`` under their qualified names (``layer1.0.conv1.weight``), so a
rewrite still edits the user's ``nn.Module`` by name.

:func:`exported_module` exports a model and maps every ATen operator that
has a ``torch`` or ``torch.nn.functional`` counterpart to it, arguments
reordered where they differ, so the fx translator
(:mod:`tunnelgraph.frontends.fx`) reads the graph as it reads a traced
forward that calls functions: layers become layers of the modules that own
their tensors, and an operator without a counterpart stays as it is and
blocks the sites around it by name.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from tunnelgraph.errors import TraceError

_aten = torch.ops.aten


def _same(function: Callable[..., Any]) -> Callable[[tuple[Any, ...], dict[str, Any]], tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]:
    """The counterpart takes the same arguments in the same order."""
    return lambda args, kwargs: (function, args, kwargs)


def _batch_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    # aten: (input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled)
    bound = dict(zip(("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"), args))
    bound.update({key: value for key, value in kwargs.items() if key != "cudnn_enabled"})
    order = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    return F.batch_norm, tuple(bound.get(key) for key in order), {}


def _binary(function: Callable[..., Any]) -> Callable[[tuple[Any, ...], dict[str, Any]], tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]:
    """``aten.add.Tensor(a, b, alpha=1)``: the operator when alpha is 1, else unmapped."""

    def convert(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        if set(kwargs) - {"alpha"} or kwargs.get("alpha", 1) != 1 or len(args) != 2:
            raise LookupError
        return function, args, {}

    return convert


def _constant_pad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    value = args[2] if len(args) > 2 else kwargs.get("value", 0.0)
    return F.pad, (args[0], args[1]), {"value": value}


def _elu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """``aten.elu(x, alpha, scale, input_scale)``: ``F.elu`` when both scales are 1."""
    bound = dict(zip(("input", "alpha", "scale", "input_scale"), args))
    bound.update(kwargs)
    if bound.get("scale", 1) != 1 or bound.get("input_scale", 1) != 1:
        raise LookupError
    return F.elu, (bound["input"], bound.get("alpha", 1.0)), {}


def _dropout(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    bound = dict(zip(("input", "p", "train"), args))
    bound.update(kwargs)
    return F.dropout, (bound["input"],), {"p": bound.get("p", 0.5), "training": bool(bound.get("train", False))}


def _numpy_t(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """``aten.numpy_T(x)`` (``x.T``): every axis reversed, a permute once the capture's rank is known."""
    value = args[0].meta.get("val") if isinstance(args[0], torch.fx.Node) else None
    if kwargs or len(args) != 1 or not isinstance(value, torch.Tensor):
        raise LookupError
    return torch.permute, (args[0], tuple(reversed(range(value.dim())))), {}


_Converter = Callable[[tuple[Any, ...], dict[str, Any]], tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]


def _table() -> dict[str, _Converter]:
    """ATen operator name (``"conv2d"``, or ``"view.default"`` for one overload) -> its converter."""
    table: dict[str, _Converter] = {}

    def add(names: Sequence[str], converter: _Converter) -> None:
        for name in names:
            table[name] = converter

    for dims, conv in ((1, F.conv1d), (2, F.conv2d), (3, F.conv3d)):
        add([f"conv{dims}d"], _same(conv))
    add(["linear"], _same(F.linear))
    add(["batch_norm"], _batch_norm)
    add(["elu", "elu_"], _elu)
    add(["celu", "celu_"], _same(F.celu))
    activations: dict[str, Callable[..., Any]] = {
        "relu": torch.relu, "relu_": torch.relu, "sigmoid": torch.sigmoid, "sigmoid_": torch.sigmoid,
        "tanh": torch.tanh, "tanh_": torch.tanh, "gelu": F.gelu, "gelu_": F.gelu, "silu": F.silu, "silu_": F.silu,
        "hardswish": F.hardswish, "hardswish_": F.hardswish, "hardsigmoid": F.hardsigmoid,
        "hardsigmoid_": F.hardsigmoid, "hardtanh": F.hardtanh, "hardtanh_": F.hardtanh, "relu6": F.relu6,
        "leaky_relu": F.leaky_relu, "leaky_relu_": F.leaky_relu, "mish": F.mish,
        "mish_": F.mish, "softplus": F.softplus, "selu": F.selu, "exp": torch.exp,
        "abs": torch.abs, "neg": torch.neg, "erf": torch.erf, "sqrt": torch.sqrt, "reciprocal": torch.reciprocal,
        "square": torch.square, "log": torch.log,
    }
    for name, function in activations.items():
        add([name], _same(function))
    pools: dict[str, Callable[..., Any]] = {
        "max_pool1d": F.max_pool1d, "max_pool2d": F.max_pool2d, "max_pool3d": F.max_pool3d,
        "avg_pool1d": F.avg_pool1d, "avg_pool2d": F.avg_pool2d, "avg_pool3d": F.avg_pool3d,
        "adaptive_avg_pool1d": F.adaptive_avg_pool1d, "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
        "adaptive_avg_pool3d": F.adaptive_avg_pool3d, "adaptive_max_pool1d": F.adaptive_max_pool1d,
        "adaptive_max_pool2d": F.adaptive_max_pool2d, "adaptive_max_pool3d": F.adaptive_max_pool3d,
    }
    for name, function in pools.items():
        add([name], _same(function))
    add(["mean"], _same(torch.mean))
    for name, function in (("add", operator.add), ("sub", operator.sub), ("mul", operator.mul), ("div", operator.truediv)):
        add([name, name + "_"], _binary(function))
    add(["cat", "concat", "concatenate"], _same(torch.cat))
    add(["view.default", "reshape.default", "_unsafe_view.default"], _same(torch.reshape))
    add(["flatten.using_ints"], _same(torch.flatten))
    add(["dropout", "dropout_", "feature_dropout"], _dropout)
    add(["pad"], _same(F.pad))
    add(["constant_pad_nd"], _constant_pad)
    for name, function in (("gt", torch.gt), ("lt", torch.lt), ("ge", torch.ge), ("le", torch.le)):
        add([name], _same(function))
    add(["where"], _same(torch.where))
    # transposes, by overload: the in-place forms (transpose_) and named dims (transpose.Dimname) stay
    add(["permute.default"], _same(torch.permute))
    add(["transpose.int", "swapaxes.default", "swapdims.default"], _same(torch.transpose))
    add(["movedim.int", "movedim.intlist", "moveaxis.int", "moveaxis.intlist"], _same(torch.movedim))
    add(["t.default"], _same(torch.t))
    add(["mT.default"], lambda args, kwargs: (torch.transpose, (*args, -2, -1), kwargs))
    add(["numpy_T.default"], _numpy_t)
    return table


_TABLE = _table()
_PASSTHROUGH = {"clone", "alias", "contiguous", "lift_fresh_copy"}


def _names(target: Any) -> tuple[str, str]:
    """(``"conv2d"``, ``"conv2d.default"``) for ``torch.ops.aten.conv2d.default``; empty for anything else."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return "", ""
    packet = target.name().split("::", 1)[1].split(".", 1)[0]
    return packet, f"{packet}.{target._overloadname}"


# operators that return (values, indices): read as the pooling alone where only the values are used
_WITH_INDICES: dict[str, Callable[..., Any]] = {
    "adaptive_max_pool1d": F.adaptive_max_pool1d, "adaptive_max_pool2d": F.adaptive_max_pool2d,
    "adaptive_max_pool3d": F.adaptive_max_pool3d, "max_pool1d_with_indices": F.max_pool1d,
    "max_pool2d_with_indices": F.max_pool2d, "max_pool3d_with_indices": F.max_pool3d,
}


def _drop_indices(graph: torch.fx.Graph, node: torch.fx.Node, function: Callable[..., Any]) -> None:
    """``values, indices = aten.adaptive_max_pool2d(x, size)``, values read by ``getitem(., 0)``: one pooling node.

    Kept as it is (blocking by name) when anything reads the indices.
    """
    users = list(node.users)
    if not all(user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0 for user in users):
        return
    for user in users:
        user.replace_all_uses_with(node)
        graph.erase_node(user)
    node.target = function


def exported_module(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    """``torch.export`` ``model`` (already in the mode to capture) on ``inputs``; its graph in ``torch`` functions.

    Raises:
        TraceError: ``torch.export`` could not capture the model (data-
            dependent control flow, an unsupported Python construct); the
            message carries torch's reason.
    """
    try:
        program = torch.export.export(model, inputs, strict=False)
    except Exception as error:  # export raises many types; all mean "cannot capture"
        raise TraceError(
            f"torch.export could not capture {type(model).__name__}: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    module = program.module()
    normalize(module)
    return module


def normalize(module: torch.fx.GraphModule) -> None:
    """Rewrite an exported graph in place into ``torch`` / ``torch.nn.functional`` calls where they exist.

    Guard calls and copies that change nothing (``clone``, ``alias``) are
    removed; an ATen operator without a counterpart is kept, so the
    translator names it when it blocks.
    """
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and not node.users and str(node.target).startswith("_guards"):
            graph.erase_node(node)
            continue
        if node.op != "call_function":
            continue
        packet, overload = _names(node.target)
        if packet in _PASSTHROUGH and node.args and isinstance(node.args[0], torch.fx.Node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        if packet in _WITH_INDICES:
            _drop_indices(graph, node, _WITH_INDICES[packet])
            continue
        converter = _TABLE.get(overload, _TABLE.get(packet))
        if converter is None:
            continue
        try:
            target, args, kwargs = converter(tuple(node.args), dict(node.kwargs))
        except LookupError:
            continue
        node.target, node.args, node.kwargs = target, args, kwargs
    graph.lint()
    module.recompile()
