"""Torch backend: apply a :class:`RewritePlan` to an ``nn.Module``.

The result is an ordinary module: the same classes (``nn.Linear``,
``nn.Conv2d``, ``nn.BatchNorm2d``, ...) with resized parameters and
consistent attributes, so ``state_dict``, saving, loading and
``torch.onnx.export`` work. Only when the forward hard-codes a width in a
reshape (``x.view(-1, 4608)``) is the result a ``torch.fx.GraphModule``
carrying the updated constant.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from tunnelgraph.analysis.groups import ChannelGroup, WidthLiteral
from tunnelgraph.errors import RewriteError
from tunnelgraph.rewrite.passes import RewriteRecord, TensorChange
from tunnelgraph.rewrite.plan import ArrayOps, RewritePlan, TensorEdit, check_shapes, edit_array
from tunnelgraph.runtime import preserved

logger = logging.getLogger(__name__)


def apply_plan(model: nn.Module, plan: RewritePlan, *, inplace: bool = False) -> nn.Module:
    """Apply ``plan`` to ``model`` and return the rewritten module.

    Every new tensor is computed before anything is assigned, so a failure
    leaves ``model`` untouched; unless ``inplace`` is true, ``model`` is
    deep-copied and the copy is edited. Modules and ``nn.Parameter`` objects
    are kept: a parameter's ``data`` is replaced (and its ``.grad`` dropped
    when its shape no longer fits), so references to them stay valid.
    """
    state = _tensors(model)
    check_fits(model, plan.group, state)
    if inplace and plan.literals:
        nodes = ", ".join(sorted({literal.node for literal in plan.literals}))
        raise RewriteError(
            f"the forward hard-codes a width that this rewrite changes (node(s) {nodes}), which "
            "cannot be updated in place; call with inplace=False to get a torch.fx.GraphModule "
            "with the new width, or write the reshape as x.flatten(1)"
        )
    new_tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for tensor_edit in plan.tensors:
            name = tensor_edit.slice.param
            new_tensors[name] = edit_tensor(new_tensors.get(name, state[name].detach()), tensor_edit)
    target = model if inplace else copy.deepcopy(model)
    _install(target, new_tensors)
    if plan.literals:
        target = _patch_literals(target, plan.group.literals, plan.literals)
    return target


def _install(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put the new tensors into ``model`` by name and make its layers' size attributes follow.

    A Parameter object stays (an optimizer or a hook that holds it keeps a
    valid reference); only its data and, where its shape changed, its stale
    ``.grad`` and autograd's cached accumulator are replaced.
    """
    modules = []
    for name, tensor in tensors.items():
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attribute in module._parameters:
            parameter = module._parameters[attribute]
            assert parameter is not None
            if parameter.shape != tensor.shape:
                _drop_grad_accumulator(parameter)
                parameter.grad = None
            parameter.data = tensor
        else:
            module._buffers[attribute] = tensor
        if module not in modules:
            modules.append(module)
    for module in modules:
        _resize(module)


def _drop_grad_accumulator(parameter: nn.Parameter) -> None:
    """Make autograd forget the parameter's gradient accumulator before its shape changes.

    Autograd caches one accumulator per leaf, with the leaf's shape, for as
    long as any graph holds it (a training loop's last ``loss`` does), and
    ``.data =`` renews it only when the dtype or device changes, not the
    shape; the next backward would then check gradients against the old
    shape. Passing the data through another dtype renews it.
    """
    other = torch.float64 if parameter.dtype != torch.float64 else torch.float32
    parameter.data = parameter.data.to(other)


def apply_change(value: torch.Tensor, change: TensorChange, *, what: str = "tensor") -> torch.Tensor:
    """``value`` after one :class:`TensorChange`: block ``j`` of the group's range copies old block
    ``copies[j]``, or is zero where the record has a new combination (``None``).

    Used for a rewrite's parameters (:func:`replay`) and for per-entry optimizer state.

    Raises:
        RewriteError: ``value`` is too small along the change's axis for the
            record (it belongs to another model, or the records are not the
            ones made since ``value`` last matched).
    """
    axis, block, offset = change.axis, change.block, change.offset
    if value.dim() <= axis or value.shape[axis] < offset + change.old_size * block:
        raise RewriteError(
            f"the {what} '{change.name}' has shape {tuple(value.shape)}, too small along axis {axis} for a record "
            f"that expects {change.old_size} channels of {block} entries from offset {offset}: the records are not "
            "the ones made since it matched (or come from another model class)"
        )
    segment = value.narrow(axis, offset, change.old_size * block)
    blocks = [
        segment.narrow(axis, old * block, block) if old is not None else torch.zeros_like(segment.narrow(axis, 0, block))
        for old in change.copies
    ]
    head = value.narrow(axis, 0, offset)
    tail_start = offset + change.old_size * block
    tail = value.narrow(axis, tail_start, value.shape[axis] - tail_start)
    return torch.cat([head, *blocks, tail], dim=axis).contiguous()


def replay(model: nn.Module, records: list[RewriteRecord]) -> None:
    """Give ``model`` (edited in place) the shapes the rewrites of ``records`` produced.

    Every parameter and buffer a record names is resized slice by slice
    (kept channels copied, new combinations zero: a ``load_state_dict`` of
    the rewritten model fills them), and the modules' size attributes follow.
    Everything is checked before anything changes.

    Raises:
        RewriteError: a record names a tensor ``model`` does not have, or one
            of the wrong size; ``model`` is unchanged then.
    """
    current: dict[str, torch.Tensor] = dict(model.named_parameters())
    current.update(model.named_buffers())
    new: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for index, record in enumerate(records):
            for change in record.tensors:
                if change.name not in current:
                    raise RewriteError(
                        f"record {index} (group '{record.group}') edits '{change.name}', which this model does not "
                        f"have: replay needs a model of the class that was rewritten"
                    )
                source = new.get(change.name, current[change.name].detach())
                new[change.name] = apply_change(source, change, what="parameter or buffer")
    _install(model, new)


def check_fits(
    model: nn.Module, group: ChannelGroup, state: dict[str, torch.Tensor] | None = None
) -> None:
    """Raise :class:`SiteError` unless ``model``'s parameters have the shapes ``group`` expects.

    ``state`` is ``model``'s parameters and buffers by name, when the caller already has them.
    """
    state = _tensors(model) if state is None else state
    check_shapes(group, {name: tuple(tensor.shape) for name, tensor in state.items()})


TORCH_OPS: ArrayOps[torch.Tensor] = ArrayOps(
    narrow=torch.narrow,
    concat=lambda tensors, axis: torch.cat(list(tensors), dim=axis),
    zeros_like=torch.zeros_like,
    coefficient=lambda factor, like: torch.as_tensor(factor, dtype=like.dtype, device=like.device),
)
"""The array operations of :func:`~tunnelgraph.rewrite.plan.edit_array` on torch tensors."""


def edit_tensor(tensor: torch.Tensor, tensor_edit: TensorEdit) -> torch.Tensor:
    """The rewritten copy of ``tensor`` (see :class:`TensorEdit`), on its device, in its dtype."""
    return edit_array(tensor, tensor_edit, TORCH_OPS).contiguous()


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors


def _resize(module: nn.Module) -> None:
    """Make a module's size attributes agree with its (already resized) tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        out_channels = module.weight.shape[0]
        was_depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if was_depthwise:
            module.groups = module.in_channels = module.out_channels = out_channels
        else:
            module.out_channels = out_channels
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        reference = module.running_mean if module.running_mean is not None else module.weight
        module.num_features = reference.shape[0]
    # any other module holds tensors that a functional call reads (F.conv2d(x, self.w)); the call
    # takes its sizes from the tensors, so there is no attribute to follow


def _patch_literals(
    model: nn.Module, before: tuple[WidthLiteral, ...], after: tuple[WidthLiteral, ...]
) -> torch.fx.GraphModule:
    """Re-trace ``model`` and rewrite hard-coded reshape widths to their new values.

    The GraphModule keeps ``model``'s submodules (their classes, and the
    tensors the forward does not read: a batch norm's ``num_batches_tracked``
    in a module fx traces through, a layer it never calls), so the
    ``state_dict`` has the same keys and the result can be rewritten again.
    """
    way_out = "rewrite the forward with x.flatten(1) or x.view(x.size(0), -1)"
    try:
        module = torch.fx.symbolic_trace(model)
    except Exception as error:  # fx raises many types; all mean "cannot trace"
        raise RewriteError(
            f"the forward hard-codes a width that this rewrite changes, and torch.fx cannot trace "
            f"{type(model).__name__} to update it ({type(error).__name__}: {error}); {way_out}"
        ) from error
    _keep_unread(model, module)
    nodes = {node.name: node for node in module.graph.nodes}
    for old, new in zip(before, after):
        node = nodes.get(new.node)
        if node is None or _read(node.args, new.path) != old.value:
            raise RewriteError(
                f"could not find the literal width {old.value} of node '{new.node}' again when "
                "re-tracing the model with torch.fx (the nodes of a site found on a torch.export "
                f"capture are not fx's); {way_out}"
            )
        node.args = _write(node.args, new.path, new.value)
    module.recompile()
    logger.info(
        "the forward hard-codes %d reshape width(s); returning a torch.fx.GraphModule with "
        "the updated values", len(after),
    )
    return module


def _keep_unread(model: nn.Module, module: torch.fx.GraphModule) -> None:
    """Give ``module`` (traced from ``model``) the model's own submodules and every tensor fx left out.

    fx copies only what the graph reads: the layers it calls, and the
    tensors it reads from modules it traces through, on plain stand-in
    modules. The model's own submodules replace the stand-ins (the same
    objects the graph reads, of their own classes, with the tensors the
    forward does not read, such as a batch norm's ``num_batches_tracked``,
    and layers it never calls), and the root's unread tensors are
    registered as they were (persistent or not; tied ones stay tied).
    """
    for name, child in model.named_children():
        module.add_module(name, child)
    for name, parameter in model._parameters.items():
        if name not in module._parameters and parameter is not None:
            module.register_parameter(name, parameter)
    for name, buffer in model._buffers.items():
        if name not in module._buffers and buffer is not None:
            module.register_buffer(name, buffer, persistent=name not in model._non_persistent_buffers_set)


def _read(args: Any, path: tuple[int, ...]) -> Any:
    """The argument at ``path``, or None where the arguments have no such place."""
    for index in path:
        if not isinstance(args, (tuple, list)) or not -len(args) <= index < len(args):
            return None
        args = args[index]
    return args


def _write(args: Any, path: tuple[int, ...], value: int) -> Any:
    items = list(args)
    items[path[0]] = value if len(path) == 1 else _write(items[path[0]], path[1:], value)
    return type(args)(items) if isinstance(args, (tuple, list)) else items


def weights_of(model: nn.Module) -> dict[str, Any]:
    """Every parameter and buffer of ``model`` as a read-only numpy array, by name (for the analysis).

    float32 and float64 tensors on the CPU are read where they lie (no
    copy of the model's weights); other types and devices are copied, as
    float64. The analysis converts what it compares to float64 itself.
    """
    arrays = {}
    for name, tensor in _tensors(model).items():
        tensor = tensor.detach()
        if tensor.device.type != "cpu" or tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.cpu().double()
        array = tensor.numpy()
        array.setflags(write=False)
        arrays[name] = array
    return arrays


def consumer_inputs(
    model: nn.Module, modules: list[str], example_inputs: tuple[torch.Tensor, ...]
) -> dict[str, torch.Tensor]:
    """The input each named module receives when ``model`` runs on ``example_inputs`` (eval mode)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in modules:
        def hook(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            seen[name] = args[0].detach().clone()

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with preserved(model, train=False), torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def bias_shift(module: nn.Module, weight_slice: Any, channel: int, values: torch.Tensor) -> torch.Tensor:
    """What ``module``'s output gains from ``channel`` carrying the fixed input ``values``, as a bias.

    ``values`` is the channel's entries of one input sample (shape of the
    module's input without the batch axis, restricted to the channel's
    positions along the input-channel axis). Raises :class:`RewriteError`
    when the contribution is not the same at every output position (a conv
    that pads its input sees the constant only away from the border), since
    it is then not a bias.
    """
    positions = torch.arange(weight_slice.block, device=values.device) + weight_slice.offset + channel * weight_slice.block
    weight = module.weight.detach().index_select(1, positions)
    if isinstance(module, nn.Linear):
        contribution = values.reshape(-1, values.shape[-1]) @ weight.T
        contribution = contribution.reshape(-1, weight.shape[0])
    elif isinstance(module, nn.modules.conv._ConvNd):
        contribution = module._conv_forward(values.unsqueeze(0), weight, None)[0]
        contribution = contribution.reshape(weight.shape[0], -1).T
    else:
        raise RewriteError(f"cannot fold a constant into a {type(module).__name__}")
    first = contribution[0]
    scale = float(first.abs().max()) + float(contribution.abs().max())
    if scale and float((contribution - first).abs().max()) > 1e-9 * scale:
        raise RewriteError(
            "its contribution differs between output positions (the consumer pads or the value "
            "varies along the layer's input), so it is not a bias"
        )
    return first


def constant_bias_shift(
    module: nn.Module, weight_slice: Any, channel: int, seen: torch.Tensor, offset: float | None
) -> np.ndarray:
    """What ``module`` gains, as a bias (float64), from ``channel`` of its input being constant.

    ``seen`` is the module's recorded input (every sample). The channel's
    value is its recorded entries, checked to be the same for every sample,
    when ``offset`` is None; else ``offset`` at every position (an affine
    relation's offset). Raises :class:`RewriteError` when the module has no
    bias, the recorded values vary between samples, or the contribution
    varies between output positions (see :func:`bias_shift`).
    """
    if getattr(module, "bias", None) is None:
        raise RewriteError(f"consumer '{weight_slice.module}' has no bias to take the constant")
    axis = seen.dim() - 1 if isinstance(module, nn.Linear) else 1
    values = seen.narrow(axis, weight_slice.offset + channel * weight_slice.block, weight_slice.block)
    if offset is None:
        scale = float(values.abs().max())
        if scale and float((values - values[:1]).abs().max()) > 1e-9 * scale:
            raise RewriteError("its activation differs between samples, so it is not constant")
        value = values[0]
    else:
        value = torch.full_like(values[0], offset)
    return np.asarray(bias_shift(module, weight_slice, channel, value).detach().cpu().double().numpy())
