"""ONNX frontend: an ``onnx.ModelProto`` (or ``.onnx`` file) into the same :class:`Graph` as torch.fx.

Every ONNX node becomes one IR node named after its first output, except
that ``MatMul`` followed by an ``Add`` of a bias initializer becomes one
linear layer (how PyTorch's exporters write ``nn.Linear`` on 3-D inputs).
Layers are named after their weight initializers (``fc.weight`` -> ``fc``)
when the names have that form, so sites of an exported PyTorch model keep
their PyTorch names. Shapes come from ONNX shape inference. Operators this
module does not know become ``BLOCKING`` nodes naming their op type, so the
rule engine refuses the sites around them.

Constant tensors written as nodes (``Constant``, ``Identity`` of an
initializer) are read as initializers (see :func:`constants_as_initializers`);
a layer's parameter that is a graph input, or is computed at run time, blocks
the sites around the layer, with that reason. Activations and pooling get the
IR's framework-neutral names (``LeakyRelu`` -> ``leaky_relu``,
``AveragePool`` -> ``avg``), as the torch.fx frontend writes them.

``Transpose`` moves the channel axis, and ``Gather`` and ``GatherND`` with
stored indices pick positions of every channel (pooling ``gather``): their
nodes say where each axis goes (``attrs["axis_map"]``) and the analysis
follows the channels or blocks where they are gathered. Arithmetic with a
stored tensor and ``Where`` with a stored mask and fill are per-channel
where the stored tensors do not vary along the channel axis, which the
analysis checks (``attrs["constant_shapes"]``). This is how the dynamo
exporter writes adaptive average pooling (alexnet, the VGGs).

This module does not import torch. It needs the optional ``onnx`` extra;
without it, importing it raises :class:`~tunnelgraph.errors.MissingExtraError`
saying how to install it.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Union

import numpy as np

from tunnelgraph.errors import TraceError, missing_onnx

try:
    import onnx
    from onnx import numpy_helper
except ImportError as error:  # the optional extra is not installed
    raise missing_onnx(error) from error

from tunnelgraph.frontends.shapes import merged_range, permutation_axis_map
from tunnelgraph.ir import ChannelMap, Graph, Node, OpKind, ParamRef, activation_function

logger = logging.getLogger(__name__)

OnnxSource = Union[str, os.PathLike, bytes, onnx.ModelProto]
Dims = tuple[Any, ...]
"""A tensor's dimensions: each a size, a symbolic name (equal names are equal sizes) or None (unknown);
in reasoning about one reshape, an unknown size may be named by the :class:`Dim` that reads it."""

_ACTIVATIONS = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "Softsign", "HardSwish",
    "HardSigmoid", "Gelu", "Erf", "Celu", "Mish", "ThresholdedRelu", "Abs", "Neg", "Exp", "Log",
    "Sqrt", "Reciprocal", "Clip",
}
_ACTIVATION_NAMES = {"Clip": "clamp"}  # ONNX spellings that are not the IR's name up to case and '_'
_COMPARISONS = {"Greater": "gt", "Less": "lt", "GreaterOrEqual": "ge", "LessOrEqual": "le", "Equal": "eq"}
_POOLING = {
    "MaxPool": "max", "GlobalMaxPool": "max", "AveragePool": "avg", "GlobalAveragePool": "avg",
    "LpPool": "lp", "GlobalLpPool": "lp",
}
_REDUCTIONS = {"ReduceMean": "mean", "ReduceMax": "max"}  # over whole axes: pooling, as torch.mean is
_ELEMENTWISE = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}
_METADATA_OPS = {"Shape", "Size"}
_SHAPE_FOLLOWERS = {"Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Slice", "Mul", "Div", "Add", "Sub"}
_BLOCKING_DETAIL = {
    "Softmax": "softmax mixes channels",
    "LogSoftmax": "softmax mixes channels",
    "LayerNormalization": "layer norm mixes channels",
}
TRANSLATED_OPERATORS = frozenset(
    {"Conv", "Gemm", "MatMul", "PRelu", "Where", "BatchNormalization", "Dropout", "Identity",
     "Concat", "Flatten", "Reshape", "Constant", "Cast", "CastLike", "Transpose", "GatherND"}
    | set(_REDUCTIONS) | _ACTIVATIONS | set(_COMPARISONS) | set(_POOLING) | set(_ELEMENTWISE) | _METADATA_OPS
    | _SHAPE_FOLLOWERS | set(_BLOCKING_DETAIL)
)
"""The ONNX operators this frontend reads by name (softmax and layer norm as blocking nodes that say why).

Any other operator becomes a blocking node naming it, unless it computes on
shapes only (then it is metadata). :func:`tunnelgraph.to_torch` translates
every operator listed here.
"""


def read_onnx(source: OnnxSource) -> tuple[onnx.ModelProto, Path | None]:
    """Load an ONNX model safely; external data only from inside the model's folder.

    The model comes back with its constant tensors as initializers
    (:func:`constants_as_initializers`), the form every ONNX path of
    tunnelgraph (analysis, rewrites, :func:`~tunnelgraph.to_torch`) reads.
    A given ``ModelProto`` is never modified.

    Raises:
        TraceError: the file is missing, truncated or not ONNX, or an
            external-data location points outside the model's folder.
    """
    if isinstance(source, onnx.ModelProto):
        return _prepared(source, inplace=False), None
    if isinstance(source, bytes):
        return _prepared(_parse(source, "the given bytes"), inplace=True), None
    path = Path(source)
    if not path.is_file():
        raise TraceError(f"no ONNX file at '{path}'")
    model = _parse(path.read_bytes(), f"'{path}'")
    folder = path.resolve().parent
    external = [t for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if os.path.isabs(location) or os.path.commonpath([str(folder), str(target)]) != str(folder):
            raise TraceError(
                f"initializer '{tensor.name}' keeps its data at '{location}', outside the model's "
                f"folder '{folder}'; refusing to read it (move the data file beside the model)"
            )
        if not target.is_file():
            raise TraceError(f"initializer '{tensor.name}' keeps its data in '{location}', which is missing")
    if external:
        onnx.external_data_helper.load_external_data_for_model(model, str(folder))
    return _prepared(model, inplace=True), folder


def _prepared(model: onnx.ModelProto, *, inplace: bool) -> onnx.ModelProto:
    """The form every ONNX path reads: constants as initializers, no initializer read by two inputs.

    ``inplace`` for a model tunnelgraph parsed itself (no copy of a file's
    weights is made); a user's ``ModelProto`` is copied once at most.
    """
    converted = constants_as_initializers(model, inplace=inplace)
    # a copy made by the first step is tunnelgraph's own: the second changes it in place
    return split_shared_initializers(converted, inplace=inplace or converted is not model)


def split_shared_initializers(model: onnx.ModelProto, *, inplace: bool = False) -> onnx.ModelProto:
    """``model`` with every initializer that several node inputs read copied, one copy per input.

    Exporters store parameters of equal value once (the TorchScript
    exporter deduplicates initializers, e.g. the zero biases of freshly
    built layers, and reads them through ``Identity`` nodes): in an ONNX
    file a shared initializer is compression, not a tie the network relies
    on. Read as one parameter it would block every site whose layer uses it.
    Given its own copy of the (equal) values, each layer can be rewritten
    alone, and the function stays the same whatever is rewritten, since no
    two layers share storage any more (a layer genuinely applied twice
    becomes two layers with equal weights, which is exact too).

    The first input keeps the initializer's name; the others read
    ``<name>__<k>``. Only the main graph is changed, and nothing when the IR
    version is below 4 or no initializer is read twice.

    Returns:
        ``model`` itself when nothing is shared or with ``inplace`` (then
        changed), else a changed copy.
    """
    graph = model.graph
    if model.ir_version and model.ir_version < 4:
        return model
    # an initializer that is also a graph input can be overridden at run time: it stays one tensor
    initializers = {t.name for t in graph.initializer} - {value.name for value in graph.input}
    reads: dict[str, int] = {}
    for node in graph.node:
        for tensor in node.input:
            if tensor in initializers:
                reads[tensor] = reads.get(tensor, 0) + 1
    shared = {name for name, count in reads.items() if count > 1}
    if not shared:
        return model
    result = model if inplace else copy.deepcopy(model)
    by_name = {t.name: t for t in result.graph.initializer}
    taken = set(by_name) | {out for node in result.graph.node for out in node.output}
    taken |= {value.name for value in list(result.graph.input) + list(result.graph.output)}
    seen: dict[str, int] = {}
    copies = []
    for node in result.graph.node:
        for slot, tensor in enumerate(node.input):
            if tensor not in shared:
                continue
            seen[tensor] = seen.get(tensor, 0) + 1
            if seen[tensor] == 1:
                continue  # the first reader keeps the original
            index = seen[tensor] - 1
            name = f"{tensor}__{index}"
            while name in taken:
                index += 1
                name = f"{tensor}__{index}"
            taken.add(name)
            duplicate = onnx.TensorProto()
            duplicate.CopyFrom(by_name[tensor])
            duplicate.name = name
            copies.append(duplicate)
            node.input[slot] = name
    result.graph.initializer.extend(copies)
    logger.debug("gave %d reader(s) of %d shared initializer(s) their own copies", len(copies), len(shared))
    return result


def constants_as_initializers(model: onnx.ModelProto, *, inplace: bool = False) -> onnx.ModelProto:
    """``model`` with the constant tensors that nodes compute stored as initializers.

    A ``Constant`` node (of a tensor, a number or a list of numbers) and an
    ``Identity`` of an initializer (or of such a constant) compute a tensor
    known before the model runs. Each becomes an initializer under its
    output's name and the node is dropped, so the function is unchanged. An
    ``Identity`` output gets its own copy of the data: ``Identity`` copies,
    and the TorchScript exporter writes parameters of equal values (fresh
    batch norms) as ``Identity`` of one initializer, which are separate
    parameters in the exported network. A ``Reshape`` target computed from
    constants only (``Unsqueeze`` and ``Concat`` of numbers, as an export
    without constant folding writes it) becomes an initializer too, and the
    nodes that computed it, now unused, are dropped.

    Layers' parameters and reshape targets are then initializers, which the
    analysis reads and the rewrite backends edit, whatever node wrote them.
    Only the main graph is changed (not subgraphs or functions), and nothing
    when the model's IR version is below 4 (initializers would have to be
    graph inputs there) or for a tensor that is a graph output.

    Returns:
        ``model`` itself when it has no such node or with ``inplace`` (then
        changed), else a changed copy.
    """
    graph = model.graph
    if model.ir_version and model.ir_version < 4:
        return model
    initializers = {t.name: t for t in graph.initializer}
    outputs = {value.name for value in graph.output}
    arrays: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1 or node.output[0] in outputs:
            continue
        if node.op_type == "Constant":
            array = constant_value(node)
        elif node.op_type == "Identity" and node.input[0] in arrays:
            array = arrays[node.input[0]]
        elif node.op_type == "Identity" and node.input[0] in initializers:
            array = numpy_helper.to_array(initializers[node.input[0]])
        else:
            continue
        if array is not None:
            arrays[node.output[0]] = array

    def stored(tensor: str) -> np.ndarray | None:
        if tensor in arrays:
            return arrays[tensor]
        return numpy_helper.to_array(initializers[tensor]) if tensor in initializers else None

    producers = {out: node for node in graph.node for out in node.output if out}
    followed = ShapeValues(graph.node, stored, {})
    folded = False
    for node in graph.node:
        target = node.input[1] if node.op_type == "Reshape" and len(node.input) > 1 else ""
        if (not target or stored(target) is not None or target in outputs or target not in producers
                or len(producers[target].output) != 1):
            continue
        entries = followed.entries(target)
        if entries is not None and all(isinstance(entry, int) for entry in entries):
            arrays[target] = np.array(entries, dtype=np.int64)
            folded = True
    if not arrays:
        return model
    logger.debug("reading %d tensor(s) computed from constants as initializers", len(arrays))
    result = model if inplace else copy.deepcopy(model)
    kept = [node for node in result.graph.node if not (len(node.output) == 1 and node.output[0] in arrays)]
    graph_types = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    subgraphs = any(attribute.type in graph_types for node in kept for attribute in node.attribute)
    if folded and not subgraphs:  # drop what computed the folded targets (a subgraph may read outer tensors)
        needed = outputs.copy()
        used = []
        for node in reversed(kept):
            if any(out in needed for out in node.output):
                used.append(node)
                needed.update(node.input)
        kept = used[::-1]
    del result.graph.node[:]
    result.graph.node.extend(kept)
    result.graph.initializer.extend(numpy_helper.from_array(np.array(a), name) for name, a in arrays.items())
    return result


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node, or None for a sparse or missing one."""
    for attribute in node.attribute:
        if attribute.name == "sparse_value" or not attribute.name.startswith("value"):
            continue
        value = onnx.helper.get_attribute_value(attribute)
        if isinstance(value, onnx.TensorProto):
            return numpy_helper.to_array(value)
        if attribute.name == "value_float":
            return np.array(value, dtype=np.float32)
        if attribute.name == "value_floats":
            return np.array(list(value), dtype=np.float32)
        if attribute.name == "value_int":
            return np.array(value, dtype=np.int64)
        if attribute.name == "value_ints":
            return np.array(list(value), dtype=np.int64)
        return None  # strings: no layer reads them
    return None


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as error:  # protobuf raises DecodeError and friends
        raise TraceError(f"{where} is not an ONNX model or is truncated ({type(error).__name__})") from error
    if not model.graph.node and not model.graph.output:
        raise TraceError(f"{where} is not an ONNX model or is truncated (it has no graph)")
    return model


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return list(model.graph.initializer)


def load_onnx(source: OnnxSource) -> Graph:
    """Translate an ONNX model into tunnelgraph's unit DAG.

    Args:
        source: a path to an ``.onnx`` file, its bytes, or an ``onnx.ModelProto``.

    Returns:
        The graph; ``graph.source`` holds the ``ModelProto`` (with shapes
        inferred), ``graph.attrs``-like data lives on the nodes.
    """
    model, _ = read_onnx(source)
    try:
        inferred = _infer_shapes(model)
    except Exception as error:
        raise TraceError(f"ONNX shape inference failed ({type(error).__name__}: {error})") from error
    graph = _Translator(inferred, model).run()
    graph.source = model
    return graph


PROTOBUF_LIMIT = 2**31 - 2**26
"""Bytes of tensors above which a model cannot be serialised as one protobuf message (2 GiB, less a margin)."""


def tensor_size(tensor: onnx.TensorProto) -> int:
    """Bytes of one tensor's values, from its shape and type (without serialising it)."""
    return math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def tensor_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the model's initializers (and of the constant tensors its nodes hold), counted without serialising."""
    tensors = list(proto.graph.initializer) + [
        attribute.t for node in proto.graph.node for attribute in node.attribute if attribute.HasField("t")
    ]
    return sum(tensor_size(t) for t in tensors)


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its shapes inferred (ONNX shape inference with data propagation).

    Shape inference serialises the model, which protobuf cannot do past 2 GiB
    (regnet_y_128gf, vit_h_14). For such a model it runs on a copy of the
    graph whose tensors over 1 KiB have no data (marked as external data,
    which inference does not read): ``model`` is not touched, and the
    inferred model holds no copy of the weights (the translator reads
    tensor values from ``model``).
    """
    sizes = {t.name: tensor_size(t) for t in model.graph.initializer}
    if sum(sizes.values()) <= PROTOBUF_LIMIT:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    graph, tensors = model.graph, []
    for tensor in graph.initializer:
        if sizes[tensor.name] > 2**10:
            tensor = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                      data_location=onnx.TensorProto.EXTERNAL)
            tensor.external_data.add(key="location", value="not-read-by-shape-inference")
        tensors.append(tensor)
    shell = onnx.helper.make_model(
        onnx.helper.make_graph(graph.node, graph.name, graph.input, graph.output, tensors, value_info=graph.value_info,
                               sparse_initializer=graph.sparse_initializer),
        ir_version=model.ir_version, opset_imports=model.opset_import, functions=model.functions)
    return onnx.shape_inference.infer_shapes(shell, data_prop=True)


class _Translator:
    def __init__(self, model: onnx.ModelProto, values: onnx.ModelProto) -> None:
        """``model``: with shapes inferred; ``values``: the same model with every tensor's data."""
        self.model = model
        name = model.graph.name or "onnx"
        self.graph = Graph(name)
        self.initializers = {t.name: t for t in values.graph.initializer}
        self.constants: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        self.dims: dict[str, Dims | None] = {}  # with symbolic and unknown dimensions kept
        for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
            self.shapes[value.name] = value_shape(value)
            self.dims[value.name] = value_dims(value)
        for tensor in self.initializers.values():
            self.shapes[tensor.name] = tuple(tensor.dims)
            self.dims[tensor.name] = tuple(tensor.dims)
        self.graph_inputs = {value.name for value in model.graph.input} - set(self.initializers)
        self.producer: dict[str, str] = {}  # tensor name -> IR node name that produces it
        self.shape_values = ShapeValues(model.graph.node, self._value, self.dims)
        self.linear_patterns = linear_patterns(model)
        self.uses: dict[str, int] = {}
        for node in model.graph.node:
            for tensor in node.input:
                self.uses[tensor] = self.uses.get(tensor, 0) + 1
        self.fused: set[str] = set()  # Add nodes folded into a MatMul layer

    # -- helpers -------------------------------------------------------------------
    def _value(self, tensor: str) -> np.ndarray | None:
        if tensor in self.initializers:
            return numpy_helper.to_array(self.initializers[tensor])
        return self.constants.get(tensor)

    def _add(self, node: Node) -> None:
        self.graph.add(node)

    def _produced_by_metadata(self, tensor: str) -> bool:
        """Whether ``tensor`` comes out of a node that computes on shapes only."""
        return tensor in self.producer and self.graph[self.producer[tensor]].kind == OpKind.METADATA

    def _input_nodes(self, tensors: list[str]) -> tuple[str, ...]:
        names = []
        for tensor in tensors:
            if not tensor:
                continue
            if tensor not in self.producer:
                self._constant(tensor)
            names.append(self.producer[tensor])
        return tuple(names)

    def _constant(self, tensor: str) -> None:
        node = Node(name=tensor, kind=OpKind.CONSTANT, op="constant", shape=self.shapes.get(tensor),
                    attrs={"target": tensor})
        self._add(node)
        self.producer[tensor] = tensor

    def _param(self, tensor: str) -> ParamRef:
        array_shape = tuple(self.initializers[tensor].dims)
        return ParamRef(tensor, array_shape, self.uses.get(tensor, 0) > 1)

    def _layer_name(self, node: onnx.NodeProto, weight: str | None, bias: str | None = None) -> str:
        return layer_name(node, weight, bias)

    # -- translation -----------------------------------------------------------------
    def run(self) -> Graph:
        for value in self.model.graph.input:
            if value.name in self.initializers:
                continue
            self._add(Node(name=value.name, kind=OpKind.INPUT, op="input", shape=self.shapes.get(value.name)))
            self.producer[value.name] = value.name
        for node in self.model.graph.node:
            if node.op_type == "Constant":
                self._constant_node(node)
                continue
            if node.output[0] in self.fused:
                continue
            self._translate(node)
        outputs = tuple(self.producer[value.name] for value in self.model.graph.output if value.name in self.producer)
        self._add(Node(name="output", kind=OpKind.OUTPUT, op="output", inputs=outputs))
        return self.graph

    def _constant_node(self, node: onnx.NodeProto) -> None:
        value = constant_value(node)
        if value is not None:
            self.constants[node.output[0]] = value
        self.shapes[node.output[0]] = tuple(self.constants.get(node.output[0], np.zeros(0)).shape)

    def _node(self, node: onnx.NodeProto, kind: OpKind, op: str, inputs: list[str] | None = None, *,
              module: str | None = None, params: Mapping[str, ParamRef] | None = None,
              channel_axis: int | None = None, input_maps: Mapping[int, ChannelMap] | None = None,
              **attrs: Any) -> Node:
        """The IR node of ``node``, named after its first output; ``attrs["op_type"]`` records the operator."""
        name = node.output[0]
        return Node(
            name=name, kind=kind, op=op, inputs=self._input_nodes(list(inputs if inputs is not None else node.input)),
            module=module, params=params or {}, shape=self.shapes.get(name), channel_axis=channel_axis,
            attrs={"op_type": node.op_type, **attrs}, input_maps=input_maps or {},
        )

    def _finish(self, node: onnx.NodeProto, ir: Node) -> None:
        self._add(ir)
        for tensor in node.output:
            if tensor:
                self.producer[tensor] = ir.name

    def _translate(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.domain not in ("", "ai.onnx"):
            return self._blocking(node, f"custom operator {node.domain}::{op}")
        value = self._value(node.input[0]) if op in ("Cast", "CastLike") else None
        if value is not None:
            self.constants[node.output[0]] = value  # a constant, whatever its type
            self.shapes[node.output[0]] = tuple(value.shape)
            return None
        data_inputs = [t for t in node.input if t and t not in self.initializers and t not in self.constants]
        if data_inputs and all(self._produced_by_metadata(t) for t in data_inputs):
            return self._finish(node, self._node(node, OpKind.METADATA, "metadata"))
        if op == "Conv":
            return self._conv(node, attrs)
        if op == "Gemm":
            return self._gemm(node, attrs)
        if op == "MatMul":
            return self._matmul(node)
        if op in _ACTIVATIONS or (op == "PRelu" and self._numel(node.input[1]) == 1):
            if op == "Clip" and any(t and t not in self.initializers and t not in self.constants for t in node.input[1:]):
                return self._blocking(node, "Clip with bounds computed at run time")
            function = activation_function(_ACTIVATION_NAMES.get(op, op))
            return self._finish(node, self._node(node, OpKind.CHANNELWISE, "activation", inputs=[node.input[0]],
                                                 function=function))
        if op in _COMPARISONS:
            return self._elementwise(node, _COMPARISONS[op])
        if op == "Where":
            return self._elementwise(node, "where")
        if op in _REDUCTIONS:
            return self._reduce(node, attrs, _REDUCTIONS[op])
        if op == "BatchNormalization":
            return self._batchnorm(node, attrs)
        if op in _POOLING:
            return self._finish(node, self._node(node, OpKind.CHANNELWISE, "pooling", requires_axis=1,
                                                 function=_POOLING[op]))
        if op == "Dropout":
            return self._finish(node, self._node(node, OpKind.CHANNELWISE, "dropout", inputs=[node.input[0]]))
        if op == "Identity":
            return self._finish(node, self._node(node, OpKind.CHANNELWISE, "identity"))
        if op in _ELEMENTWISE:
            return self._elementwise(node, _ELEMENTWISE[op])
        if op == "Concat":
            return self._concat(node, attrs)
        if op in ("Flatten", "Reshape"):
            return self._reshape(node, attrs)
        if op == "Transpose":
            return self._transpose(node, attrs)
        if op in ("Gather", "GatherND"):
            return self._gather(node, attrs)
        if op in _METADATA_OPS:
            return self._finish(node, self._node(node, OpKind.METADATA, "metadata"))
        if op in _BLOCKING_DETAIL:
            return self._blocking(node, _BLOCKING_DETAIL[op], op.lower())
        return self._blocking(node, f"operator {op}")

    def _numel(self, tensor: str) -> int:
        shape = self.shapes.get(tensor)
        return math.prod(shape) if shape is not None else -1

    def _blocking(self, node: onnx.NodeProto, detail: str, op: str = "unknown") -> None:
        where = f" at node '{node.name}'" if node.name else ""
        self._finish(node, self._node(node, OpKind.BLOCKING, op, detail=f"{detail}{where}"))

    def _conv(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        weight = node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        unstored = self._unstored(node, {"weight": weight, "bias": bias})
        if unstored:
            return self._blocking(node, f"Conv whose {unstored}")
        groups = int(attrs.get("group", 1))
        shape = tuple(self.initializers[weight].dims)
        out_channels, in_per_group = shape[0], shape[1]
        depthwise = groups > 1 and in_per_group == 1 and groups == out_channels
        module, params = self._layer_name(node, weight, bias), self._layer_params(weight, bias)
        if depthwise:
            ir = self._node(node, OpKind.CHANNELWISE, "depthwise", inputs=[node.input[0]], module=module,
                            params=params, requires_axis=1)
        else:
            ir = self._node(node, OpKind.PARAMETRIC, "conv", inputs=[node.input[0]], module=module, params=params,
                            channel_axis=1, in_axis=1, groups=groups)
        self._finish(node, ir)

    def _layer_params(self, weight: str, bias: str | None) -> dict[str, ParamRef]:
        params = {"weight": self._param(weight)}
        if bias is not None:
            params["bias"] = self._param(bias)
        return params

    def _unstored(self, node: onnx.NodeProto, params: dict[str, str | None]) -> str | None:
        """Why the first of a layer's parameters that is not an initializer cannot be edited, or None."""
        for role, tensor in params.items():
            if tensor is None or tensor in self.initializers:
                continue
            if tensor in self.graph_inputs:
                return (f"{role} '{tensor}' is a graph input (given when the model runs, so tunnelgraph "
                        "cannot resize it; store it as an initializer)")
            return f"{role} '{tensor}' is computed at run time"
        return None

    def _batchnorm(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        roles = ("weight", "bias", "running_mean", "running_var")
        unstored = self._unstored(node, dict(zip(roles, node.input[1:5])))
        if unstored:
            return self._blocking(node, f"batch norm whose {unstored}", "batchnorm")
        scale = node.input[1]
        module = scale[: -len(".weight")] if scale.endswith(".weight") else node.name or node.output[0]
        params = {role: self._param(t) for role, t in zip(roles, node.input[1:5])}
        ir = self._node(node, OpKind.CHANNELWISE, "batchnorm", inputs=[node.input[0]], module=module, params=params,
                        requires_axis=1)
        return self._finish(node, ir)

    def _gemm(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        weight = node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if attrs.get("transA", 0):
            return self._blocking(node, "Gemm with transA=1 (its input is transposed)")
        unstored = self._unstored(node, {"weight": weight, "bias": bias})
        if unstored:
            return self._blocking(node, f"Gemm whose {unstored}")
        weight_shape = tuple(self.initializers[weight].dims)
        out_features = weight_shape[0] if attrs.get("transB", 0) else weight_shape[1]
        if bias is not None and tuple(self.initializers[bias].dims) != (out_features,):
            return self._blocking(node, f"Gemm bias of shape {tuple(self.initializers[bias].dims)} (broadcast)")
        axes = (0, 1) if attrs.get("transB", 0) else (1, 0)
        beta = float(attrs.get("beta", 1.0))
        scale = {"bias_scale": beta} if bias is not None and beta != 1.0 else {}
        self._linear(node, weight, bias, axes, [node.input[0]], node.output[0], **scale)

    def _matmul(self, node: onnx.NodeProto) -> None:
        weight = node.input[1]
        if weight not in self.initializers or len(self.initializers[weight].dims) != 2:
            if weight in self.initializers or weight in self.constants:
                return self._blocking(node, "MatMul with a weight that is not a matrix")
            return self._blocking(node, "MatMul of two computed tensors")
        bias, output = None, node.output[0]
        pattern = self.linear_patterns.get(node.output[0])
        if pattern is not None:
            bias, output = pattern
            self.fused.add(output)
        self._linear(node, weight, bias, (1, 0), [node.input[0]], output)

    def _linear(self, node: onnx.NodeProto, weight: str, bias: str | None, axes: tuple[int, int],
                inputs: list[str], output: str, **attrs: Any) -> None:
        shape = self.shapes.get(output)
        ir = Node(
            name=output, kind=OpKind.PARAMETRIC, op="linear", inputs=self._input_nodes(inputs),
            module=self._layer_name(node, weight, bias), params=self._layer_params(weight, bias), shape=shape,
            channel_axis=len(shape) - 1 if shape else None,
            attrs={"op_type": node.op_type, "in_axis": -1, "weight_axes": axes, **attrs},
        )
        self._add(ir)
        self.producer[node.output[0]] = ir.name
        self.producer[output] = ir.name

    def _elementwise(self, node: onnx.NodeProto, op: str) -> None:
        """Element-wise ops: of two computed tensors they couple; by a scalar constant they act per entry."""
        constant = [t for t in node.input if t in self.initializers or t in self.constants]
        coupling = "where" if op not in _ELEMENTWISE.values() else op  # comparisons and Where join like adds
        if not constant:
            return self._finish(node, self._node(node, OpKind.COUPLING, coupling))
        if op != "where" and len(constant) == 1 and len(node.input) == 2:
            value = self._value(constant[0])
            if value is not None and value.size == 1:
                data = [t for t in node.input if t != constant[0]]
                kind = "scale" if op in _ELEMENTWISE.values() else "activation"
                return self._finish(node, self._node(node, OpKind.CHANNELWISE, kind, inputs=data, function=op))
            # x + c, c * x, x / c with a stored tensor c: the same operation on every channel when c does
            # not vary along the channel axis, which the analysis checks (attrs["constant_shapes"])
            commutes = op in ("add", "mul")
            if op in _ELEMENTWISE.values() and (commutes or constant[0] == node.input[1]):
                shape = self.shapes.get(constant[0])
                data = [t for t in node.input if t != constant[0]]
                if shape is not None and self.shapes.get(node.output[0]) is not None:
                    return self._finish(node, self._node(node, OpKind.CHANNELWISE, "scale", inputs=data,
                                                         function=op, constant_shapes=(shape,)))
        if op == "where" and len(node.input) == 3 and node.input[0] in constant and len(constant) == 2:
            return self._masked_fill(node, constant)
        return self._blocking(node, f"element-wise {op} with a constant tensor")

    def _masked_fill(self, node: onnx.NodeProto, constant: list[str]) -> None:
        """``Where(mask, fill, x)`` (or ``Where(mask, x, fill)``) with a stored mask and fill: a masked fill.

        The dynamo exporter writes adaptive pooling with windows of unequal
        sizes this way (the padding of the shorter windows set to zero). It
        is the same operation on every channel when neither the mask nor the
        fill varies along the channel axis, which the analysis checks
        (``attrs["constant_shapes"]``).
        """
        data = [t for t in node.input[1:] if t not in constant]
        shapes = tuple(self.shapes.get(t) for t in constant)
        if any(shape is None for shape in shapes) or self.shapes.get(node.output[0]) is None:
            return self._blocking(node, "Where with a stored mask of unknown shape", "where")
        self._finish(node, self._node(node, OpKind.CHANNELWISE, "masked_fill", inputs=data, constant_shapes=shapes))

    def _transpose(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        """Transpose: the channels move to the axis the permutation sends theirs to (``attrs["axis_map"]``).

        Whether the consumers read them there (a conv reads axis 1, a flatten
        must merge them first) is the analysis's check, as for any channel axis.
        """
        shape = self.shapes.get(node.input[0])
        if shape is None:
            return self._blocking(node, "Transpose of an input of unknown rank", "transpose")
        perm = [int(p) for p in attrs.get("perm", reversed(range(len(shape))))]
        axis_map = permutation_axis_map(perm, len(shape))
        if axis_map is None or min(perm, default=0) < 0:
            return self._blocking(node, f"Transpose with perm {perm} of a rank-{len(shape)} input", "transpose")
        self._finish(node, self._node(node, OpKind.CHANNELWISE, "transpose", inputs=[node.input[0]],
                                      axis_map=axis_map, perm=tuple(perm)))

    def _gather(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        """Gather and GatherND with stored indices: positions picked (and repeated) along other axes than the channels'.

        As the dynamo exporter writes adaptive average pooling (``Transpose``,
        ``GatherND`` of the windows' positions, ``Transpose``, then a mean or
        a masked sum over the windows), this is pooling: it passes with
        ``through=("pooling",)``, as ``nn.AdaptiveAvgPool2d`` does in PyTorch.
        Every channel is gathered at the same positions; the channels move
        by ``attrs["axis_map"]``, where the indexed axes map to None (the
        analysis blocks a group whose channels are gathered).
        """
        data, indices = node.input[0], node.input[1]
        shape, index = self.shapes.get(data), self._value(indices)
        if data in self.initializers or data in self.constants:
            return self._blocking(node, f"{node.op_type} from a stored tensor (a lookup table)", "gather")
        if index is None:
            return self._blocking(node, f"{node.op_type} with indices computed at run time", "gather")
        if shape is None or self.shapes.get(node.output[0]) is None:
            return self._blocking(node, f"{node.op_type} of unknown shape", "gather")
        index_rank = np.asarray(index).ndim
        if node.op_type == "Gather":
            axis = int(attrs.get("axis", 0)) % len(shape)
            axis_map = tuple(None if i == axis else i if i < axis else i - 1 + index_rank for i in range(len(shape)))
            indexed: tuple[int, ...] = (axis,)
        else:
            batch_dims = int(attrs.get("batch_dims", 0))
            if batch_dims != 0:
                return self._blocking(node, f"GatherND with batch_dims={batch_dims}", "gather")
            depth = np.asarray(index).shape[-1] if index_rank else 0
            if index_rank == 0 or depth > len(shape):
                return self._blocking(node, f"GatherND with indices of shape {np.asarray(index).shape}", "gather")
            axis_map = tuple(None if i < depth else i - depth + index_rank - 1 for i in range(len(shape)))
            indexed = tuple(range(depth))
        self._finish(node, self._node(node, OpKind.CHANNELWISE, "pooling", inputs=[data], function="gather",
                                      axis_map=axis_map, indexes=indexed))

    def _reduce(self, node: onnx.NodeProto, attrs: dict[str, Any], function: str) -> None:
        """ReduceMean and ReduceMax over given axes: pooling over whole axes (``global`` pooling when spatial)."""
        in_shape = self.shapes.get(node.input[0])
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = self._value(node.input[1])
            axes = None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
        if in_shape is None or not axes:
            return self._blocking(node, f"{node.op_type} over all axes or over axes computed at run time")
        reduced = tuple(sorted(int(a) % len(in_shape) for a in axes))
        keepdim = bool(attrs.get("keepdims", 1))
        self._finish(node, self._node(node, OpKind.CHANNELWISE, "pooling", inputs=[node.input[0]],
                                      reduces=reduced, keepdim=keepdim, function=function))

    def _concat(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        shape = self.shapes.get(node.output[0])
        if shape is None:
            return self._blocking(node, "Concat of unknown shape")
        axis = int(attrs.get("axis", 0)) % len(shape)
        maps, offset = {}, 0
        for position, tensor in enumerate(node.input):
            tensor_shape = self.shapes.get(tensor)
            if tensor_shape is None:
                return self._blocking(node, "Concat of a tensor of unknown shape")
            maps[position] = ChannelMap(offset, 1)
            offset += tensor_shape[axis]
        self._finish(node, self._node(node, OpKind.COUPLING, "concat", input_maps=maps, dim=axis))

    def _reshape(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> None:
        """Flatten and Reshape: a flatten of adjacent axes passes channels on, anything else blocks.

        Sizes may be symbolic (a dynamic batch axis): the flatten is proven on
        the symbolic dimensions. A target shape computed at run time
        (``Shape`` -> ``Gather`` -> ``Concat``, as ``x.view(x.size(0), -1)``
        exports) is followed back to sizes of the reshaped tensor; a literal
        size in such a computation blocks, since rewrites could not update it.
        """
        literals: dict[int, tuple[tuple[int, ...], int]] = {}
        extra: dict[str, Any] = {}
        if node.op_type == "Flatten":
            both = flattened(node.input[0], int(attrs.get("axis", 1)), self.dims)
        else:
            target = self._value(node.input[1])
            entries: list[int | Dim]
            if target is not None:
                sizes = [int(v) for v in np.asarray(target).reshape(-1)]
                extra["shape_tensor"] = node.input[1]
                literals = {axis: ((axis,), size) for axis, size in enumerate(sizes) if size not in (-1, 0)}
                entries = list(sizes)
            else:
                followed = self.shape_values.entries(node.input[1])
                if followed is None:
                    return self._blocking(node, "Reshape whose target shape is computed at run time in a way "
                                                "tunnelgraph does not follow", "reshape")
                entries = followed
                foreign = [e for e in entries if isinstance(e, Dim) and e.tensor != node.input[0]]
                fixed = [e for e in entries if isinstance(e, int) and e not in (-1, 0)]
                if foreign or fixed:
                    what = (f"the literal size {fixed[0]}" if fixed
                            else f"a size of another tensor ('{foreign[0].tensor}')")
                    return self._blocking(node, f"Reshape whose target shape is computed at run time from {what}, "
                                                "which a rewrite could not update", "reshape")
            both = reshaped(node.input[0], entries, self.dims, bool(attrs.get("allowzero", 0)))
        if both is None:
            return self._blocking(node, f"{node.op_type} of unknown shape")
        in_dims, out_dims = both
        in_shape, out_shape = _sized(in_dims), _sized(out_dims)
        self.shapes[node.output[0]], self.dims[node.output[0]] = out_shape, stored_dims(out_dims)
        merged = flatten_range(in_dims, out_dims)
        if merged is None:
            return self._finish(node, self._node(node, OpKind.BLOCKING, "reshape", inputs=[node.input[0]],
                                                 detail=f"reshape {in_shape} -> {out_shape} is not a flatten"))
        start, end = merged
        inputs = [node.input[0]]
        literals = {axis: literal for axis, literal in literals.items() if axis < len(out_shape)}
        block = ChannelMap(0, math.prod(in_shape[start + 1:end + 1]))
        ir = self._node(node, OpKind.RESHAPE, "flatten", inputs=inputs, input_maps={0: block}, start=start,
                        end=end, literal_widths=literals, **extra)
        self._finish(node, ir)


class LinearPattern(NamedTuple):
    """The ``Add`` of a ``MatMul`` + ``Add`` pair that is one linear layer."""

    bias: str
    """The ``(out_features,)`` bias initializer the Add adds."""
    output: str
    """The Add's output: the linear layer's output."""


def linear_patterns(model: onnx.ModelProto) -> dict[str, LinearPattern]:
    """Every ``MatMul`` + ``Add`` pair that is one linear layer, by the MatMul's output.

    How PyTorch's exporters write ``nn.Linear`` on inputs of more than two
    dimensions: a MatMul by a stored ``(in, out)`` matrix whose output only
    an Add reads (and is no graph output), adding a stored ``(out,)`` bias.
    The frontend reads each pair as one linear layer and
    :func:`~tunnelgraph.to_torch` builds one ``nn.Linear`` for it.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    outputs = {value.name for value in model.graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for tensor in node.input:
            readers.setdefault(tensor, []).append(node)
    patterns = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        weight, product = initializers.get(node.input[1]), node.output[0]
        users = readers.get(product, [])
        if weight is None or len(weight.dims) != 2 or product in outputs or len(users) != 1:
            continue
        add = users[0]
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            continue
        other = [tensor for tensor in add.input if tensor != product]
        if len(other) == 1 and other[0] in initializers and tuple(initializers[other[0]].dims) == (weight.dims[1],):
            patterns[product] = LinearPattern(other[0], add.output[0])
    return patterns


def layer_name(node: onnx.NodeProto, weight: str | None, bias: str | None = None) -> str:
    """A layer's name: its weight's (``fc.weight`` -> ``fc``) or bias's, else the node's, else its output's."""
    for tensor, suffix in ((weight, ".weight"), (bias, ".bias")):
        if tensor and tensor.endswith(suffix) and len(tensor) > len(suffix):
            return tensor[: -len(suffix)]
    return node.name or node.output[0]


def value_shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """A value's inferred shape, unknown (symbolic) dimensions read as 1; None without a shape."""
    dims = value_dims(value)
    return None if dims is None else _sized(dims)


def value_dims(value: onnx.ValueInfoProto) -> Dims | None:
    """A value's inferred dimensions, symbolic ones by name and unknown ones as None; None without a shape."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param if dim.HasField("dim_param") and dim.dim_param else None)
    return tuple(dims)


def _sized(dims: Dims) -> tuple[int, ...]:
    """Dimensions as the IR records them: symbolic and unknown sizes read as 1."""
    return tuple(d if isinstance(d, int) else 1 for d in dims)


class Dim(NamedTuple):
    """An entry of a shape tensor that is read when the model runs: the size of ``tensor``'s axis ``axis``."""

    tensor: str
    axis: int


class ShapeValues:
    """The values of the small integer tensors that compute shapes, followed through the graph.

    ``Shape`` gives one :class:`Dim` per axis; ``Gather`` and ``Slice`` with
    constant indices pick entries, ``Concat`` joins them, ``Cast``,
    ``Identity``, ``Squeeze`` and ``Unsqueeze`` keep them, and constants are
    their integers. Any other operation is not followed.
    """

    def __init__(self, nodes: Iterable[onnx.NodeProto], constant: Callable[[str], np.ndarray | None],
                 dims: dict[str, Dims | None]) -> None:
        self.producers = {out: node for node in nodes for out in node.output if out}
        self.constant = constant
        self.dims = dims

    def entries(self, tensor: str) -> list[int | Dim] | None:
        """The flattened value of ``tensor``: integers and sizes read at run time; None if not followed."""
        value = self.constant(tensor)
        if value is not None:
            array = np.asarray(value)
            return [int(v) for v in array.reshape(-1)] if array.dtype.kind in "iu" else None
        node = self.producers.get(tensor)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        if op == "Shape":
            dims = self.dims.get(node.input[0])
            if dims is None:
                return None
            every: list[int | Dim] = [Dim(node.input[0], axis) for axis in range(len(dims))]
            return every[int(attrs.get("start", 0)):attrs.get("end", len(dims))]
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
            return self.entries(node.input[0])
        if op == "Concat":
            parts = [self.entries(t) for t in node.input]
            return None if any(p is None for p in parts) else [e for p in parts for e in p or []]
        if op == "Gather" and int(attrs.get("axis", 0)) == 0:
            data, indices = self.entries(node.input[0]), self.constant(node.input[1])
            if data is None or indices is None:
                return None
            picked = [int(i) for i in np.asarray(indices).reshape(-1)]
            if any(not -len(data) <= i < len(data) for i in picked):
                return None
            return [data[i] for i in picked]
        if op == "Slice" and len(node.input) >= 3:
            data = self.entries(node.input[0])
            bounds = [self.constant(t) if t else None for t in list(node.input[1:5]) + [""] * (5 - len(node.input))]
            starts, ends, axes, steps = bounds
            if data is None or starts is None or ends is None:
                return None
            if axes is not None and [int(a) for a in np.asarray(axes).reshape(-1)] not in ([0], [-1]):
                return None
            step = 1 if steps is None else int(np.asarray(steps).reshape(-1)[0])
            if step == 0:
                return None
            return data[int(np.asarray(starts).reshape(-1)[0]):int(np.asarray(ends).reshape(-1)[0]):step]
        return None


def reshaped(source: str, entries: list[int | Dim], dims: Mapping[str, Dims | None],
             allowzero: bool = False) -> tuple[Dims, Dims] | None:
    """The dimensions of ``source`` and of ONNX ``Reshape(source, entries)``; None if ``source``'s rank is unknown.

    A size nobody knows comes back as the :class:`Dim` that names it (equal
    only to itself), so a size the target copies (``0``, or a :class:`Dim`
    entry) is known to be equal on both sides. A single ``-1`` is solved from
    the element count when the symbolic sizes on both sides cancel, else it
    stays None (unknown).
    """
    in_dims = _named(source, dims)
    if in_dims is None:
        return None
    out: list[int | str | Dim | None] = []
    for axis, entry in enumerate(entries):
        if isinstance(entry, Dim):
            other = _named(entry.tensor, dims)
            out.append(other[entry.axis] if other is not None and entry.axis < len(other) else None)
        elif entry == 0 and not allowzero:
            out.append(in_dims[axis] if axis < len(in_dims) else None)
        elif entry == -1:
            out.append(None)
        else:
            out.append(int(entry))
    unknown = [axis for axis, d in enumerate(out) if d is None]
    if len(unknown) == 1:
        symbols_in = Counter(d for d in in_dims if not isinstance(d, int))
        symbols_out = Counter(d for d in out if d is not None and not isinstance(d, int))
        known_in = math.prod(d for d in in_dims if isinstance(d, int))
        known_out = math.prod(d for d in out if isinstance(d, int))
        if symbols_in == symbols_out and known_out and known_in % known_out == 0:
            out[unknown[0]] = known_in // known_out
    return in_dims, tuple(out)


def flattened(source: str, axis: int, dims: Mapping[str, Dims | None]) -> tuple[Dims, Dims] | None:
    """The dimensions of ``source`` and of ONNX ``Flatten(source, axis)`` (see :func:`reshaped`)."""
    in_dims = _named(source, dims)
    if in_dims is None:
        return None
    axis = axis + len(in_dims) if axis < 0 else axis
    return in_dims, (_product(in_dims[:axis]), _product(in_dims[axis:]))


def _named(tensor: str, dims: Mapping[str, Dims | None]) -> Dims | None:
    """``tensor``'s dimensions with each unknown size replaced by the :class:`Dim` that names it."""
    known = dims.get(tensor)
    if known is None:
        return None
    return tuple(Dim(tensor, axis) if d is None else d for axis, d in enumerate(known))


def stored_dims(dims: Dims) -> Dims:
    """Dimensions as they are stored: sizes named by a :class:`Dim` are unknown (None) again."""
    return tuple(None if isinstance(d, Dim) else d for d in dims)


def _product(dims: Dims) -> Any:
    """The product of sizes: an int, a single symbolic size (times ones), or None when it cannot be named."""
    symbols = [d for d in dims if not isinstance(d, int)]
    size = math.prod(d for d in dims if isinstance(d, int))
    if not symbols:
        return size
    if len(symbols) == 1 and symbols[0] is not None and size == 1:
        return symbols[0]
    return None


def flatten_range(in_dims: Dims, out_dims: Dims) -> tuple[int, int] | None:
    """The input axes ``start..end`` that a reshape from ``in_dims`` to ``out_dims`` merges, if it is a flatten.

    :func:`~tunnelgraph.frontends.shapes.merged_range` for symbolic sizes:
    a symbolic size equals only the same name, and an unknown one nothing.
    """
    if None in in_dims or None in out_dims:
        return None
    return merged_range(in_dims, out_dims, _product)


