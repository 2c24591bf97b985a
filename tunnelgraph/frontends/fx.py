"""PyTorch frontend: ``torch.fx`` tracing plus shape propagation into a :class:`Graph`.

Every fx node becomes one IR node. Operations this module does not know
become ``BLOCKING`` nodes that name the operation, so the rule engine can
refuse the sites whose paths cross them instead of guessing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from tunnelgraph.errors import TraceError
from tunnelgraph.frontends.export import exported_module
from tunnelgraph.frontends.shapes import merged_range, permutation_axis_map
from tunnelgraph.ir import ChannelMap, Graph, Node, OpKind, ParamRef, activation_function
from tunnelgraph.runtime import preserved

logger = logging.getLogger(__name__)

Frontend = Literal["auto", "fx", "export"]

_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus,
    nn.Hardswish, nn.ReLU6, nn.Hardtanh, nn.Hardsigmoid, nn.Mish, nn.SELU, nn.CELU,
    nn.Softsign, nn.Tanhshrink,
)
_POOLING_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)
_DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_BATCHNORM_MODULES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_MODULES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

_ACTIVATION_FUNCTIONS: set[Callable[..., Any]] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, F.leaky_relu_, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, F.gelu, F.silu, F.elu, F.softplus, F.hardswish, F.relu6,
    F.hardtanh, F.hardsigmoid, F.mish, F.selu, F.celu, F.softsign, torch.exp, torch.abs,
    torch.neg, torch.square, operator.neg, torch.erf, torch.log, torch.sqrt, torch.reciprocal,
    F.softsign, F.mish, F.selu,
}
_COMPARISON_FUNCTIONS: set[Callable[..., Any]] = {
    torch.gt, torch.lt, torch.ge, torch.le, torch.eq, operator.gt, operator.lt, operator.ge, operator.le,
}
_ACTIVATION_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "square",
}
_POOLING_FUNCTIONS: set[Callable[..., Any]] = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
_DROPOUT_FUNCTIONS: set[Callable[..., Any]] = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
_ELEMENTWISE_FUNCTIONS: dict[Callable[..., Any], str] = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
}
_ELEMENTWISE_METHODS = {
    "add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul",
    "div": "div", "div_": "div",
}
# function -> (IR op, spatial dimensions): a layer called as a function on its own tensors
_LAYER_FUNCTIONS: dict[Callable[..., Any], tuple[str, int]] = {
    F.linear: ("linear", 0), F.conv1d: ("conv", 1), F.conv2d: ("conv", 2), F.conv3d: ("conv", 3),
    torch.conv1d: ("conv", 1), torch.conv2d: ("conv", 2), torch.conv3d: ("conv", 3),
}
_CONCAT_FUNCTIONS: set[Callable[..., Any]] = {torch.cat, torch.concat, torch.concatenate}
_RESHAPE_FUNCTIONS: set[Callable[..., Any]] = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
# the spellings of a transpose, by how their arguments say where the axes go; in-place forms
# (x.transpose_) change the tensor other nodes read, so they are not here and block
_TRANSPOSE_FUNCTIONS: dict[Callable[..., Any], str] = {
    torch.permute: "permute", torch.transpose: "transpose", torch.swapaxes: "transpose",
    torch.swapdims: "transpose", torch.movedim: "movedim", torch.moveaxis: "movedim", torch.t: "t",
}
_TRANSPOSE_METHODS = {
    "permute": "permute", "transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose",
    "movedim": "movedim", "moveaxis": "movedim", "t": "t",
}
_TRANSPOSE_ATTRIBUTES = {"T": "T", "mT": "mT"}
# argument names after the tensor, by spelling (torch's own keyword names, swapaxes' included)
_TRANSPOSE_KEYWORDS = {
    "permute": (("dims",),), "transpose": (("dim0", "axis0"), ("dim1", "axis1")),
    "movedim": (("source",), ("destination",)), "t": (), "T": (), "mT": (),
}
_METADATA_METHODS = {"size", "dim", "numel"}
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}


def trace(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    concrete_args: dict[str, Any] | None = None,
    tracer: torch.fx.Tracer | None = None,
    frontend: Frontend = "auto",
) -> Graph:
    """Trace ``model`` with ``torch.fx`` (or capture it with ``torch.export``) and record every tensor's shape.

    Args:
        model: the network. It is not modified: shapes are recorded in eval
            mode under ``torch.no_grad()``, and every training flag and buffer
            is restored afterwards (see :func:`tunnelgraph.runtime.preserved`).
        example_inputs: one tensor or a sequence of tensors, passed
            positionally to ``model``.
        concrete_args: forwarded to ``torch.fx.symbolic_trace`` to fix
            arguments that drive Python control flow.
        tracer: a custom tracer, e.g. one whose ``is_leaf_module`` keeps an
            untraceable submodule opaque (it then blocks the sites around it).
        frontend: ``"fx"`` traces with ``torch.fx.symbolic_trace``;
            ``"export"`` captures with ``torch.export`` at the example
            inputs' shapes (control flow on shapes is specialised; see
            :mod:`tunnelgraph.frontends.export`); ``"auto"`` (default) uses
            fx and falls back to ``torch.export`` where fx cannot trace. An
            exported graph calls every layer as a function on its module's
            tensors: sites and rewrites are the same, and A-statistics are
            not measured for them (``ChannelGroup.unmeasured`` says so).

    Returns:
        The graph. ``graph.source`` holds the ``torch.fx.GraphModule``;
        ``graph.frontend`` says which capture made it.

    Raises:
        TraceError: neither capture could take the model, or the example
            inputs do not fit it. The message names the cause and the ways
            out.
    """
    if frontend not in ("auto", "fx", "export"):
        raise ValueError(f"frontend must be 'auto', 'fx' or 'export', got {frontend!r}")
    if frontend != "fx" and (concrete_args is not None or tracer is not None):
        if frontend == "export":
            raise ValueError("concrete_args and tracer are options of the fx frontend; drop them or use frontend='fx'")
        frontend = "fx"
    inputs = _as_tuple(example_inputs)
    # tracing runs the forward's Python code, and the traced module shares the model's
    # submodules and tensors: a forward traced in training mode calls F.batch_norm with
    # training=True baked in, so both run inside one preserved(), which puts every buffer back
    with preserved(model):
        used = "fx"
        if frontend == "export":
            model.eval()
            module, used = exported_module(model, inputs), "export"
        else:
            try:
                module = _symbolic_trace(model, concrete_args, tracer)
            except TraceError as fx_error:
                if frontend == "fx":
                    raise
                model.eval()
                try:
                    module, used = exported_module(model, inputs), "export"
                except TraceError as export_error:
                    raise TraceError(f"{fx_error} Falling back to torch.export failed too: {export_error}") from fx_error
                logger.info("torch.fx could not trace %s; captured it with torch.export", type(model).__name__)
        model.eval()
        try:
            with torch.no_grad():
                # on copies: a forward that writes into its input (x.mul_(2)) must not change the caller's
                ShapeProp(module).propagate(*(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs))
        except Exception as error:
            raise TraceError(
                f"running {type(model).__name__} on the example inputs failed "
                f"({type(error).__name__}: {error}); pass example_inputs with the shapes and "
                "dtypes the model's forward expects."
            ) from error

    graph = _Translator(model, module, exported=used == "export").run()
    graph.source = module
    graph.frontend = used
    logger.debug("traced %s into %d nodes", type(model).__name__, len(graph))
    return graph


def _symbolic_trace(
    model: nn.Module, concrete_args: dict[str, Any] | None, tracer: torch.fx.Tracer | None
) -> torch.fx.GraphModule:
    try:
        if tracer is not None:
            fx_graph = tracer.trace(model, concrete_args=concrete_args)
            module = torch.fx.GraphModule(tracer.root, fx_graph, model.__class__.__name__)
        else:
            module = torch.fx.symbolic_trace(model, concrete_args=concrete_args)
    except Exception as error:  # fx raises many types; all mean "cannot trace"
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(error).__name__}: {error}. "
            "Ways out: pass concrete_args to fix the arguments that drive Python control "
            "flow, or pass a tracer whose is_leaf_module() keeps the offending submodule "
            "opaque (its neighbourhood is then reported as blocked), or rewrite the forward "
            "without data-dependent branches."
        ) from error
    return module


def _pooling_kind(name: str) -> str:
    """The framework-neutral pooling kind of a torch pooling module or function name.

    ``MaxPool2d``, ``AdaptiveMaxPool1d`` and ``max_pool3d`` are ``"max"``;
    the average pools (adaptive included) ``"avg"``; ``LPPool*`` ``"lp"``.
    """
    squashed = name.lower().replace("_", "")
    for marker, kind in (("maxpool", "max"), ("avgpool", "avg"), ("lppool", "lp")):
        if marker in squashed:
            return kind
    return squashed  # unknown to the analyses, which then claim nothing that depends on it


def _as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def _shape(fx_node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = fx_node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(size) for size in meta.shape)


class _Translator:
    """Turns one traced GraphModule into IR nodes, fx node by fx node."""

    def __init__(self, model: nn.Module, module: torch.fx.GraphModule, *, exported: bool = False) -> None:
        self.model = model
        self.module = module
        self.exported = exported  # a torch.export capture: its reshape sizes are literals of the capture
        self.graph = Graph(type(model).__name__)
        self.aliases = self._parameter_aliases(model)

    @staticmethod
    def _parameter_aliases(model: nn.Module) -> set[str]:
        """Names of parameters whose storage is reachable under more than one name."""
        by_id: dict[int, list[str]] = {}
        tensors = list(model.named_parameters(remove_duplicate=False))
        tensors += list(model.named_buffers(remove_duplicate=False))
        for name, tensor in tensors:
            by_id.setdefault(id(tensor), []).append(name)
        return {name for names in by_id.values() if len(names) > 1 for name in names}

    def run(self) -> Graph:
        for fx_node in self.module.graph.nodes:
            self.graph.add(self._translate(fx_node))
        return self.graph

    def _kind(self, name: str) -> OpKind:
        """The kind of an earlier node (fx lists nodes in execution order, so it is in the graph)."""
        return self.graph[name].kind

    # -- helpers -----------------------------------------------------------
    def _tensor_inputs(self, fx_node: torch.fx.Node) -> tuple[str, ...]:
        names: list[str] = []

        def visit(arg: Any) -> None:
            if isinstance(arg, torch.fx.Node):
                names.append(arg.name)
            elif isinstance(arg, (tuple, list)):
                for item in arg:
                    visit(item)
            elif isinstance(arg, dict):
                for item in arg.values():
                    visit(item)

        visit(fx_node.args)
        visit(fx_node.kwargs)
        return tuple(names)

    def _params(self, module_name: str, roles: Sequence[str]) -> dict[str, ParamRef]:
        sub = self.module.get_submodule(module_name)
        refs = {}
        for role in roles:
            tensor = getattr(sub, role, None)
            if isinstance(tensor, torch.Tensor):
                name = f"{module_name}.{role}"
                refs[role] = ParamRef(name, tuple(tensor.shape), name in self.aliases)
        return refs

    def _node(
        self,
        fx_node: torch.fx.Node,
        kind: OpKind,
        op: str,
        *,
        params: Mapping[str, ParamRef] | None = None,
        channel_axis: int | None = None,
        input_maps: Mapping[int, ChannelMap] | None = None,
        **attrs: Any,
    ) -> Node:
        """The IR node of ``fx_node``, every field given; a ``call_module`` node's ``module`` is the layer it calls."""
        return Node(
            name=fx_node.name,
            kind=kind,
            op=op,
            inputs=self._tensor_inputs(fx_node),
            module=str(fx_node.target) if fx_node.op == "call_module" else None,
            params=params or {},
            shape=_shape(fx_node),
            channel_axis=channel_axis,
            attrs=attrs,
            input_maps=input_maps or {},
        )

    def _blocking(self, fx_node: torch.fx.Node, detail: str) -> Node:
        return self._node(fx_node, OpKind.BLOCKING, "unknown", detail=detail)

    # -- dispatch ----------------------------------------------------------
    def _translate(self, fx_node: torch.fx.Node) -> Node:
        if fx_node.op == "placeholder":
            return self._node(fx_node, OpKind.INPUT, "input")
        if fx_node.op == "output":
            return self._node(fx_node, OpKind.OUTPUT, "output")
        if fx_node.op == "get_attr":
            target = str(fx_node.target)
            return self._node(fx_node, OpKind.CONSTANT, "constant", target=target, stored=(target,))
        if fx_node.op == "call_module":
            return self._module_node(fx_node)
        sources = self._tensor_inputs(fx_node)
        if sources and _shape(fx_node) is not None and all(self._kind(name) == OpKind.CONSTANT for name in sources):
            # computed from stored tensors alone (a standardised weight, a reshaped layer scale): no channels flow
            stored = sorted({
                target for name in sources for target in self.graph[name].attrs.get("stored", (name,))
            })
            return self._node(
                fx_node, OpKind.CONSTANT, "constant", stored=tuple(stored),
                target=f"{', '.join(stored)}' through '{fx_node.name}",
            )
        if fx_node.op == "call_function":
            return self._function(fx_node, fx_node.target)
        if fx_node.op == "call_method":
            return self._method(fx_node, str(fx_node.target))
        return self._blocking(fx_node, f"fx opcode {fx_node.op}")

    def _module_node(self, fx_node: torch.fx.Node) -> Node:
        """A ``call_module`` node: the layer's kind, parameters and channel axis come from its class."""
        name = str(fx_node.target)
        sub = self.module.get_submodule(name)
        if isinstance(sub, nn.Linear):
            rank = len(_shape(fx_node) or (0, 0))
            return self._node(
                fx_node, OpKind.PARAMETRIC, "linear", params=self._params(name, ("weight", "bias")),
                channel_axis=rank - 1, in_axis=-1,
            )
        if isinstance(sub, _CONV_MODULES):
            depthwise = sub.groups > 1 and sub.groups == sub.in_channels == sub.out_channels
            padding: dict[str, Any] = {"padding_mode": sub.padding_mode} if sub.padding_mode != "zeros" else {}
            params = self._params(name, ("weight", "bias"))
            if depthwise:
                return self._node(
                    fx_node, OpKind.CHANNELWISE, "depthwise", params=params, requires_axis=1, **padding
                )
            return self._node(
                fx_node, OpKind.PARAMETRIC, "conv", params=params, channel_axis=1, in_axis=1, groups=sub.groups,
                **padding,
            )
        if isinstance(sub, _BATCHNORM_MODULES):
            params = self._params(name, ("weight", "bias", "running_mean", "running_var"))
            return self._node(fx_node, OpKind.CHANNELWISE, "batchnorm", params=params, requires_axis=1)
        if isinstance(sub, _ACTIVATION_MODULES) or (
            isinstance(sub, nn.PReLU) and sub.num_parameters == 1
        ):
            return self._node(
                fx_node, OpKind.CHANNELWISE, "activation", function=activation_function(type(sub).__name__)
            )
        if isinstance(sub, _POOLING_MODULES):
            return self._node(
                fx_node, OpKind.CHANNELWISE, "pooling", requires_axis=1, function=_pooling_kind(type(sub).__name__)
            )
        if isinstance(sub, _DROPOUT_MODULES):
            return self._node(fx_node, OpKind.CHANNELWISE, "dropout")
        if isinstance(sub, nn.Identity):
            return self._node(fx_node, OpKind.CHANNELWISE, "identity")
        if isinstance(sub, nn.Flatten):
            return self._reshape(fx_node)
        if isinstance(sub, nn.LayerNorm):
            return self._node(fx_node, OpKind.BLOCKING, "layernorm", detail="layer norm mixes channels")
        if isinstance(sub, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            return self._node(fx_node, OpKind.BLOCKING, "softmax", detail="softmax mixes channels")
        return self._blocking(fx_node, f"module {type(sub).__name__}")

    def _function(self, fx_node: torch.fx.Node, target: Any) -> Node:
        if target is F.batch_norm:
            return self._functional_batchnorm(fx_node)
        if target in _LAYER_FUNCTIONS:
            return self._functional_layer(fx_node, _LAYER_FUNCTIONS[target])
        if target is F.pad:
            return self._pad(fx_node)
        if target in _ACTIVATION_FUNCTIONS:
            return self._node(
                fx_node, OpKind.CHANNELWISE, "activation", function=activation_function(target.__name__)
            )
        if target in _POOLING_FUNCTIONS:
            return self._node(
                fx_node, OpKind.CHANNELWISE, "pooling", requires_axis=1, function=_pooling_kind(target.__name__)
            )
        if target in _DROPOUT_FUNCTIONS:
            return self._node(fx_node, OpKind.CHANNELWISE, "dropout")
        if target in _ELEMENTWISE_FUNCTIONS:
            return self._elementwise(fx_node, _ELEMENTWISE_FUNCTIONS[target])
        if target in _COMPARISON_FUNCTIONS or target is torch.where:
            return self._select(fx_node, getattr(target, "__name__", "compare"))
        if target is torch.clamp and all(
            not isinstance(arg, torch.fx.Node) for arg in list(fx_node.args[1:]) + list(fx_node.kwargs.values())
        ):
            return self._node(fx_node, OpKind.CHANNELWISE, "activation", function="clamp")
        if target in _CONCAT_FUNCTIONS:
            return self._concat(fx_node)
        if target in _RESHAPE_FUNCTIONS:
            return self._reshape(fx_node)
        if target is torch.mean:
            return self._mean(fx_node)
        if target in _TRANSPOSE_FUNCTIONS:
            return self._transpose(fx_node, _TRANSPOSE_FUNCTIONS[target], f"function {target.__name__}")
        if target is getattr and fx_node.args[1] in _TRANSPOSE_ATTRIBUTES and self._tensor_inputs(fx_node) and (
            self._kind(self._tensor_inputs(fx_node)[0]) != OpKind.METADATA
        ):
            attribute = str(fx_node.args[1])
            return self._transpose(fx_node, _TRANSPOSE_ATTRIBUTES[attribute], f"attribute .{attribute}")
        if target is operator.getitem or target is getattr:
            return self._metadata_or_blocking(fx_node, "indexing")
        if _shape(fx_node) is None and all(
            self._kind(name) == OpKind.METADATA for name in self._tensor_inputs(fx_node)
        ):
            return self._node(fx_node, OpKind.METADATA, "metadata")
        name = getattr(target, "__name__", str(target))
        return self._blocking(fx_node, f"function {name}")

    def _functional_batchnorm(self, fx_node: torch.fx.Node) -> Node:
        """``F.batch_norm`` on one module's own tensors (timm's ``BatchNormAct2d``): a batch norm of that module.

        The node reads its ``running_mean``, ``running_var``, ``weight`` and
        ``bias`` through ``get_attr`` nodes named ``<module>.<role>``; they
        become the node's parameters, as for an ``nn.BatchNorm2d`` call, and
        the data input is its only input. Anything else (computed tensors,
        tensors of several modules) blocks, with that reason.
        """
        roles = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        bound = dict(zip(roles, fx_node.args))
        bound.update(fx_node.kwargs)
        source = bound.get("input")
        owners = set()
        for role in roles[1:5]:
            arg = bound.get(role)
            if arg is None:
                continue
            if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr":
                return self._blocking(fx_node, f"function batch_norm with a computed {role}")
            module_name, _, attribute = str(arg.target).rpartition(".")
            if attribute != role:
                return self._blocking(fx_node, f"function batch_norm reading '{arg.target}' as its {role}")
            owners.add(module_name)
        if len(owners) != 1 or not isinstance(source, torch.fx.Node):
            return self._blocking(fx_node, "function batch_norm without the tensors of one module")
        owner = owners.pop()
        params = self._params(owner, ("weight", "bias", "running_mean", "running_var"))
        node = self._node(fx_node, OpKind.CHANNELWISE, "batchnorm", params=params, requires_axis=1)
        return dataclasses.replace(node, inputs=(source.name,), module=owner)

    def _functional_layer(self, fx_node: torch.fx.Node, layer: tuple[str, int]) -> Node:
        """``F.conv2d(x, self.weight, self.bias, ...)`` or ``F.linear``: a layer on stored tensors.

        The weight is either a stored tensor (timm's ``Conv2dSame`` pads, then
        calls ``F.conv2d`` on its own weight) or computed in forward from one
        module's tensors by a function that treats every output filter alike
        and on its own (weight standardisation: timm's ``StdConv2d`` and
        ``ScaledStdConv2d``), which is checked numerically here. Cloning an
        output filter then clones its computed filter, so such a layer is an
        exact producer; splitting its input columns would change what the
        computation sees, so it is recorded (``computed_weight``) and the
        rule engine refuses it as a consumer. The node's only input is the
        data; its parameters are the stored tensors, by qualified name.
        """
        op, dims = layer
        roles = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(roles, fx_node.args))
        bound.update(fx_node.kwargs)
        source, weight, bias = bound.get("input"), bound.get("weight"), bound.get("bias")
        name = getattr(fx_node.target, "__name__", str(fx_node.target))
        if not isinstance(source, torch.fx.Node) or not isinstance(weight, torch.fx.Node):
            return self._blocking(fx_node, f"function {name} without a tensor weight")
        stored = self._stored_weight(weight)
        if isinstance(stored, str):
            return self._blocking(fx_node, f"function {name} whose weight is {stored}")
        owner, refs, computed = stored
        if bias is not None:
            if not isinstance(bias, torch.fx.Node) or bias.op != "get_attr":
                return self._blocking(fx_node, f"function {name} with a computed bias")
            refs["bias"] = self._ref(str(bias.target))
        groups = bound.get("groups", 1)
        if not isinstance(groups, int):
            return self._blocking(fx_node, f"function {name} with a computed number of groups")
        if groups != 1 and not self._own_groups(owner, refs, groups):
            # the count is a number written into forward (timm's BlurPool2d: groups=self.channels):
            # a clone adds a filter the number does not count, so the call would no longer run
            return self._blocking(
                fx_node,
                f"function {name} with groups={groups} written as a number in forward, which a clone "
                "cannot update (use an nn.Conv module, whose groups the rewrite updates)",
            )
        attrs: dict[str, Any] = {"computed_weight": computed} if computed else {}  # what computes it
        weight_shape = refs["weight"].shape
        if op == "linear":
            rank = len(_shape(fx_node) or (0, 0))
            node = self._node(fx_node, OpKind.PARAMETRIC, "linear", params=refs, channel_axis=rank - 1, in_axis=-1, **attrs)
        elif groups > 1 and not computed and groups == weight_shape[0] and weight_shape[1] == 1 and (
            (_shape(source) or (0, 0))[1] == groups
        ):
            node = self._node(fx_node, OpKind.CHANNELWISE, "depthwise", params=refs, requires_axis=1)
        else:
            node = self._node(
                fx_node, OpKind.PARAMETRIC, "conv", params=refs, channel_axis=1, in_axis=1, groups=groups, **attrs
            )
        return dataclasses.replace(
            node, inputs=(source.name,), module=owner or None, attrs={**node.attrs, "functional": name}
        )

    def _own_groups(self, owner: str, refs: dict[str, ParamRef], groups: int) -> bool:
        """Whether a grouped functional conv is its ``nn.Conv`` module's own call (``groups=self.groups``).

        The rewrite updates a conv module's ``groups`` with its channels, so
        the call follows when it reads the module's weight and its count (a
        ``torch.export`` capture writes every module conv this way, and so do
        subclasses such as timm's ``Conv2dSame``). Any other count is a number
        written into forward that a clone cannot update.
        """
        try:
            module = self.model.get_submodule(owner) if owner else None
        except AttributeError:  # a bare parameter's qualified name: no module owns the call
            return False
        return (
            isinstance(module, nn.modules.conv._ConvNd)
            and module.groups == groups
            and refs["weight"].name == f"{owner}.weight"
        )

    def _pad(self, fx_node: torch.fx.Node) -> Node:
        """``F.pad`` with literal sizes: per channel while it pads only axes after the channels'.

        The pads apply to the last ``len(pad) // 2`` axes; a cloned channel is
        padded as its original (the same constant, reflection or border), so
        the pad passes channels on any earlier axis (``first_padded`` records
        where the padded axes start).
        """
        pads = fx_node.args[1] if len(fx_node.args) > 1 else fx_node.kwargs.get("pad")
        shape = _shape(fx_node)
        if shape is None or not isinstance(pads, (tuple, list)) or not all(isinstance(p, int) for p in pads):
            return self._blocking(fx_node, "function pad with computed sizes")
        return self._node(
            fx_node, OpKind.CHANNELWISE, "pad", first_padded=len(shape) - len(pads) // 2
        )

    def _ref(self, target: str) -> ParamRef:
        tensor = _attribute(self.module, target)
        return ParamRef(target, tuple(tensor.shape), target in self.aliases)

    def _stored_weight(self, weight: torch.fx.Node) -> tuple[str, dict[str, ParamRef], str] | str:
        """(owner module, parameters by role, what computes it or "") of a functional layer's weight, or why not.

        A stored weight is a ``get_attr`` node. A computed one must come from
        tensors of one module only (never from activations), keep the stored
        weight's shape, and act on each output filter alike and alone:
        permuting the filters (and every per-filter tensor with them)
        permutes the result, and changing one filter changes only its result.
        """
        if weight.op == "get_attr":
            return _layer_name(str(weight.target)), {"weight": self._ref(str(weight.target))}, ""
        ancestors: dict[str, torch.fx.Node] = {}
        stack = [weight]
        while stack:
            node = stack.pop()
            if node.name in ancestors:
                continue
            ancestors[node.name] = node
            if node.op in ("placeholder", "call_module"):
                return "computed from activations"
            stack.extend(node.all_input_nodes)
        leaves = {str(node.target): node for node in ancestors.values() if node.op == "get_attr"}
        owners = {target.rpartition(".")[0] for target in leaves}
        weights = [target for target in leaves if target.rpartition(".")[2] == "weight"]
        if len(owners) != 1 or len(weights) != 1:
            return "computed from tensors of several modules" if len(owners) > 1 else "computed without a stored weight"
        owner = _layer_name(weights[0])
        order = [node for node in self.module.graph.nodes if node.name in ancestors]
        values = {target: _attribute(self.module, target).detach().double() for target in leaves}
        filters = values[weights[0]].shape[0]
        per_filter = [t for t, v in values.items() if v.dim() >= 1 and v.shape[0] == filters and (
            t == weights[0] or math.prod(v.shape[1:]) == 1)]
        others = [t for t, v in values.items() if t not in per_filter and v.numel() > 1]
        if others:
            return f"computed with '{others[0]}', which is not one value per output filter"
        if not _acts_per_filter(order, values, per_filter, filters):
            return "computed by a function that mixes output filters"
        refs = {target.rpartition(".")[2]: self._ref(target) for target in per_filter}
        refs = {"weight": refs.pop("weight"), **refs}
        kinds = sorted({getattr(node.target, "__name__", str(node.target)) for node in order if node.op != "get_attr"})
        return owner, refs, ", ".join(kinds)

    def _method(self, fx_node: torch.fx.Node, method: str) -> Node:
        if method in _ACTIVATION_METHODS:
            return self._node(fx_node, OpKind.CHANNELWISE, "activation", function=activation_function(method))
        if method in _ELEMENTWISE_METHODS:
            return self._elementwise(fx_node, _ELEMENTWISE_METHODS[method])
        if method in _RESHAPE_METHODS:
            return self._reshape(fx_node)
        if method in _METADATA_METHODS:
            return self._node(fx_node, OpKind.METADATA, "metadata")
        if method == "mean":
            return self._mean(fx_node)
        if method == "contiguous":
            return self._node(fx_node, OpKind.CHANNELWISE, "identity")
        if method in _TRANSPOSE_METHODS:
            return self._transpose(fx_node, _TRANSPOSE_METHODS[method], f"method .{method}()")
        return self._blocking(fx_node, f"method .{method}()")

    def _transpose(self, fx_node: torch.fx.Node, spelling: str, what: str) -> Node:
        """permute, transpose, movedim and their kin with dims written as numbers: the channels move.

        The node says where each input axis goes (``attrs["axis_map"]``) and
        which input axis each output axis is (``attrs["perm"]``), as the ONNX
        frontend writes ``Transpose``; whether the consumers read the
        channels where they land (a conv reads axis 1, a linear layer the
        last) is the analysis's check. Dims computed at run time (from
        ``x.dim()``, say) would move with the shapes: such a call blocks.
        """
        source = fx_node.args[0] if fx_node.args else None
        in_shape = _shape(source) if isinstance(source, torch.fx.Node) else None
        out_shape = _shape(fx_node)
        if not isinstance(source, torch.fx.Node) or in_shape is None or out_shape is None:
            return self._blocking(fx_node, f"{what} of a tensor of unknown shape")
        rank = len(in_shape)
        arguments = _transpose_arguments(fx_node, spelling)
        if arguments is None:
            return self._blocking(fx_node, f"{what} with arguments {fx_node.args[1:]} {dict(fx_node.kwargs)}")
        if any(isinstance(node, torch.fx.Node) for node in _flat(arguments)):
            return self._blocking(
                fx_node,
                f"{what} with dims computed at run time (tunnelgraph follows a transpose whose dims are "
                "written as numbers)",
            )
        perm = _permutation(spelling, arguments, rank)
        axis_map = permutation_axis_map(perm, rank) if perm is not None else None
        if perm is None or axis_map is None or tuple(in_shape[axis % rank] for axis in perm) != out_shape:
            return self._blocking(fx_node, f"{what} with dims {arguments} of a rank-{rank} tensor")
        perm = tuple(axis % rank for axis in perm)
        node = self._node(fx_node, OpKind.CHANNELWISE, "transpose", axis_map=axis_map, perm=perm)
        return dataclasses.replace(node, inputs=(source.name,))

    def _metadata_or_blocking(self, fx_node: torch.fx.Node, what: str) -> Node:
        sources = self._tensor_inputs(fx_node)
        if fx_node.target is getattr and fx_node.args[1] in _METADATA_ATTRIBUTES:
            return self._node(fx_node, OpKind.METADATA, "metadata")
        if sources and all(self._kind(name) == OpKind.METADATA for name in sources[:1]):
            return self._node(fx_node, OpKind.METADATA, "metadata")
        return self._blocking(fx_node, what)

    def _elementwise(self, fx_node: torch.fx.Node, op: str) -> Node:
        tensors = [
            arg for arg in fx_node.args
            if isinstance(arg, torch.fx.Node) and self._kind(arg.name) != OpKind.METADATA
        ]
        others = [arg for arg in fx_node.args if arg not in tensors]
        if any(isinstance(arg, torch.fx.Node) for arg in others):
            # x / x.size(1): the factor may count channels, and would change with them
            return self._blocking(fx_node, f"element-wise {op} by a value computed from shapes")
        if len(tensors) == 1 and all(isinstance(arg, (int, float)) for arg in others):
            return self._node(fx_node, OpKind.CHANNELWISE, "scale", function=op)
        if len(tensors) == 2 and not fx_node.kwargs.get("alpha") and not fx_node.kwargs.get("rounding_mode"):
            return self._node(fx_node, OpKind.COUPLING, op)
        return self._blocking(fx_node, f"element-wise {op} with arguments {fx_node.args}")

    def _select(self, fx_node: torch.fx.Node, name: str) -> Node:
        """Comparisons and torch.where: element-wise, so they act per channel or couple like adds."""
        tensors = [arg for arg in fx_node.args if isinstance(arg, torch.fx.Node)]
        numbers = [arg for arg in fx_node.args if isinstance(arg, (int, float, bool))]
        if fx_node.kwargs or len(tensors) + len(numbers) != len(fx_node.args):
            return self._blocking(fx_node, f"{name} with arguments {fx_node.args}")
        if name != "where" and len(tensors) == 1 and len(numbers) == 1:
            return self._node(fx_node, OpKind.CHANNELWISE, "activation", function=activation_function(name))
        if len(tensors) == len(fx_node.args) and len(tensors) >= 2:
            return self._node(fx_node, OpKind.COUPLING, "where")
        return self._blocking(fx_node, f"{name} with a constant operand")

    def _concat(self, fx_node: torch.fx.Node) -> Node:
        tensors = fx_node.args[0]
        dim = fx_node.args[1] if len(fx_node.args) > 1 else fx_node.kwargs.get("dim", 0)
        shape = _shape(fx_node)
        if shape is None or not isinstance(dim, int) or not isinstance(tensors, (list, tuple)):
            return self._blocking(fx_node, "concat with a computed dimension")
        dim = dim % len(shape)
        maps: dict[int, ChannelMap] = {}
        offset = 0
        for position, tensor in enumerate(tensors):
            maps[position] = ChannelMap(offset, 1)
            tensor_shape = _shape(tensor)
            if tensor_shape is None:
                return self._blocking(fx_node, "concat of a non-tensor")
            offset += tensor_shape[dim]
        return self._node(fx_node, OpKind.COUPLING, "concat", input_maps=maps, dim=dim)

    def _mean(self, fx_node: torch.fx.Node) -> Node:
        source = fx_node.args[0]
        in_shape = _shape(source) if isinstance(source, torch.fx.Node) else None
        dims = fx_node.args[1] if len(fx_node.args) > 1 else fx_node.kwargs.get("dim")
        keepdim = fx_node.args[2] if len(fx_node.args) > 2 else fx_node.kwargs.get("keepdim", False)
        if in_shape is None or dims is None:
            return self._blocking(fx_node, "mean over all dimensions")
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        reduced = tuple(sorted(d % len(in_shape) for d in dims))
        return self._node(
            fx_node, OpKind.CHANNELWISE, "pooling", reduces=reduced, keepdim=bool(keepdim), function="mean"
        )

    def _reshape(self, fx_node: torch.fx.Node) -> Node:
        source = fx_node.args[0] if fx_node.args else None
        in_shape = _shape(source) if isinstance(source, torch.fx.Node) else None
        out_shape = _shape(fx_node)
        if in_shape is None or out_shape is None:
            return self._blocking(fx_node, "reshape of unknown shape")
        merged = _flatten_range(fx_node, self.module, len(in_shape), len(out_shape)) or merged_range(in_shape, out_shape)
        if merged is None:
            return self._node(
                fx_node, OpKind.BLOCKING, "reshape",
                detail=f"reshape {in_shape} -> {out_shape} is not a flatten",
            )
        start, end = merged
        literals = _literal_widths(fx_node, len(out_shape))
        # the capture of torch.export writes every size as a number, whatever the user's forward
        # computes; a rewrite edits that forward's module, not this graph, so such a width cannot follow
        frozen = {"frozen_literals": True} if self.exported and literals else {}
        # a channel on the first merged axis becomes a block of this many features
        block = ChannelMap(0, math.prod(in_shape[start + 1:end + 1]))
        return self._node(
            fx_node, OpKind.RESHAPE, "flatten", input_maps={0: block}, start=start, end=end,
            literal_widths=literals, **frozen,
        )


def _transpose_arguments(fx_node: torch.fx.Node, spelling: str) -> tuple[Any, ...] | None:
    """The arguments after the tensor of a transpose call, in torch's order; None when they do not bind."""
    keywords = _TRANSPOSE_KEYWORDS[spelling]
    if fx_node.op == "call_function" and fx_node.target is getattr:
        return ()
    given = list(fx_node.args[1:])
    if spelling == "permute" and fx_node.op == "call_method" and given and not isinstance(given[0], (tuple, list)):
        given = [tuple(given)]  # x.permute(0, 2, 3, 1): the dims as separate arguments
    if len(given) > len(keywords):
        return None
    bound = list(given)
    remaining = dict(fx_node.kwargs)
    for names in keywords[len(given):]:
        name = next((name for name in names if name in remaining), None)
        if name is None:
            return None
        bound.append(remaining.pop(name))
    return None if remaining else tuple(bound)


def _flat(value: Any) -> list[Any]:
    """The items of nested tuples and lists, in order."""
    if isinstance(value, (tuple, list)):
        return [item for part in value for item in _flat(part)]
    return [value]


def _permutation(spelling: str, arguments: tuple[Any, ...], rank: int) -> tuple[int, ...] | None:
    """Which input axis each output axis is (axes may be negative), for a transpose spelled ``spelling``.

    None when the dims do not say (out of range, repeated, not numbers);
    the caller then blocks.
    """
    if not all(isinstance(dim, int) and not isinstance(dim, bool) for dim in _flat(arguments)):
        return None
    if any(not -rank <= dim < rank for dim in _flat(arguments)):
        return None
    if spelling == "permute":
        (dims,) = arguments
        return tuple(dims)
    if spelling in ("transpose", "mT", "t", "T"):
        if spelling == "T" or (spelling == "t" and rank < 2):
            return tuple(reversed(range(rank)))
        if spelling == "mT" and rank < 2:
            return None
        first, second = arguments if spelling == "transpose" else (rank - 2, rank - 1)
        perm = list(range(rank))
        perm[first], perm[second] = perm[second], perm[first]
        return tuple(perm)
    source, destination = arguments  # movedim: numpy's moveaxis
    sources = [source] if isinstance(source, int) else list(source)
    destinations = [destination] if isinstance(destination, int) else list(destination)
    sources, destinations = [s % rank for s in sources], [d % rank for d in destinations]
    if len(sources) != len(destinations) or len(set(sources)) != len(sources) or len(set(destinations)) != len(destinations):
        return None
    moved: list[int | None] = [None] * rank
    for s, d in zip(sources, destinations):
        moved[d] = s
    rest = iter(axis for axis in range(rank) if axis not in sources)
    return tuple(axis if axis is not None else next(rest) for axis in moved)


def _layer_name(weight: str) -> str:
    """The name of the layer a functional call on the stored ``weight`` makes.

    ``conv.weight`` (a module's own weight: ``Conv2dSame``, ``StdConv2d``, an
    exported ``nn.Conv2d``) is the layer ``conv``; any other tensor names its
    own layer (``mlp.w1``, ``w2``), so two calls on tensors of one module
    are two layers with two names.
    """
    owner, _, attribute = weight.rpartition(".")
    return owner if attribute == "weight" and owner else weight


def _attribute(module: nn.Module, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` node reads."""
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor):
        raise TraceError(f"'{target}' is read as a tensor but is a {type(value).__name__}")
    return value


def _evaluate(order: Sequence[torch.fx.Node], values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Run the fx nodes ``order`` (ancestors of the last, inputs from ``values`` by target) and return the last's value."""
    env: dict[str, Any] = {}

    def load(arg: torch.fx.Node) -> Any:
        return env[arg.name]

    for node in order:
        args = torch.fx.node.map_arg(node.args, load)
        kwargs = torch.fx.node.map_arg(node.kwargs, load)
        if node.op == "get_attr":
            env[node.name] = values[str(node.target)]
        elif node.op == "call_function":
            env[node.name] = node.target(*args, **kwargs)  # type: ignore[operator]
        else:
            env[node.name] = getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return env[order[-1].name]


def _acts_per_filter(
    order: Sequence[torch.fx.Node], values: Mapping[str, torch.Tensor], per_filter: Sequence[str], filters: int
) -> bool:
    """Whether the computation ``order`` treats output filters alike and alone (checked in float64).

    Two probes: a permutation of the filters (and of every per-filter
    tensor) must permute the result, and a change of the first filter must
    leave every other filter's result as it was. Together they make the
    result of a filter a function of that filter's tensors alone, the same
    for every filter, so a cloned filter computes a cloned result.
    """
    generator = torch.Generator().manual_seed(0)
    probe = {t: torch.randn(v.shape, generator=generator, dtype=torch.float64) if t in per_filter else v
             for t, v in values.items()}
    try:
        with torch.no_grad():
            base = _evaluate(order, probe)
            weight_shape = next(v.shape for t, v in probe.items() if t.rpartition(".")[2] == "weight")
            if base.shape != weight_shape:
                return False
            permutation = torch.randperm(filters, generator=generator)
            permuted = _evaluate(order, {t: v[permutation] if t in per_filter else v for t, v in probe.items()})
            changed = {t: v.clone() for t, v in probe.items()}
            for t in per_filter:
                changed[t][0] += torch.randn(changed[t][0].shape, generator=generator, dtype=torch.float64)
            moved = _evaluate(order, changed)
    except Exception:  # the computation does not run on probes: it is not one this rule understands
        return False
    scale = float(base.abs().max()) or 1.0
    return bool(
        (permuted - base[permutation]).abs().max() <= 1e-9 * scale
        and (moved[1:] - base[1:]).abs().max() <= 1e-9 * scale
        and (moved[0] - base[0]).abs().max() > 1e-9 * scale
    )


def _flatten_range(fx_node: torch.fx.Node, root: nn.Module, rank: int, out_rank: int) -> tuple[int, int] | None:
    """The axes ``start..end`` a flatten call names (``torch.flatten``, ``x.flatten``, ``nn.Flatten``), else None.

    Its own range, not one read off the shapes: with axes of size 1 the
    shapes fit several (``(N, 1, 4) -> (N, 4)`` is ``flatten(x, 1)`` or
    ``flatten(x, 0, 1)``), and only the call says which.
    """
    if fx_node.op == "call_module":
        sub = root.get_submodule(str(fx_node.target))
        if not isinstance(sub, nn.Flatten):
            return None
        start, end = sub.start_dim, sub.end_dim
    elif fx_node.target in (torch.flatten, "flatten"):
        start = fx_node.args[1] if len(fx_node.args) > 1 else fx_node.kwargs.get("start_dim", 0)
        end = fx_node.args[2] if len(fx_node.args) > 2 else fx_node.kwargs.get("end_dim", -1)
    else:
        return None
    if not isinstance(start, int) or not isinstance(end, int) or not rank:
        return None
    start, end = start % rank, end % rank
    if end < start or rank - (end - start) != out_rank:
        return None
    return start, end


def _literal_widths(fx_node: torch.fx.Node, rank: int) -> dict[int, tuple[tuple[int, ...], int]]:
    """Output axis -> (argument path, value) for sizes written as literals in view/reshape."""
    if fx_node.op == "call_module" or fx_node.target in ("flatten", torch.flatten):
        return {}
    sizes: Any = fx_node.args[1:]
    base: tuple[int, ...] = ()
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes, base = sizes[0], (1,)
    else:
        sizes, base = list(sizes), ()
    found = {}
    for axis, size in enumerate(sizes):
        if isinstance(size, int) and size != -1 and axis < rank:
            path = base + (axis,) if base else (1 + axis,)
            found[axis] = (path, size)
    return found
