"""From a channel edit and a group's layout to concrete, per-parameter edits.

A :class:`RewritePlan` is framework-free: it names parameters, axes and
index blocks, with coefficient arrays already cut and shaped for each
consumer. A backend applies it to its own storage (torch tensors, ONNX
initializers) through :func:`edit_array`, giving the few array operations
it needs as an :class:`ArrayOps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, Protocol, Sequence, TypeVar

import numpy as np

from tunnelgraph.analysis.groups import ChannelGroup, ParamSlice, WidthLiteral
from tunnelgraph.errors import SiteError
from tunnelgraph.rewrite.edits import ChannelEdit, Coefficient


@dataclass(frozen=True, eq=False)
class TensorEdit:
    """How one parameter changes along one axis.

    The group's channels occupy ``slice.offset`` to
    ``slice.offset + size * slice.block`` along ``slice.axis``; after the edit
    that range holds ``len(sources)`` channel blocks. New block ``j`` is
    ``sum(coefficient * old block k for k, coefficient in sources[j])``; each
    coefficient is a float or an array of shape ``slice.slice_shape()``.
    ``copies[j]`` is the old block that new block ``j`` copies unchanged (its
    ``sources[j]`` is then empty), or ``None`` when it is a combination.
    """

    slice: ParamSlice
    size: int
    sources: tuple[tuple[tuple[int, Coefficient], ...], ...]
    copies: tuple[int | None, ...]

    @property
    def new_shape(self) -> tuple[int, ...]:
        shape = list(self.slice.shape)
        shape[self.slice.axis] += (len(self.sources) - self.size) * self.slice.block
        return tuple(shape)


@dataclass(frozen=True, eq=False)
class RewritePlan:
    """Everything a backend needs to apply one channel edit to one group.

    Attributes:
        group: the group as it is before the edit.
        edit: the channel edit.
        tensors: one :class:`TensorEdit` per parameter entry the group owns,
            outbound ones first; a backend applies them in this order, each
            to the result of the ones before on the same parameter.
        literals: reshape literals with the values they must have afterwards.
        result: the group as it is after the edit.
    """

    group: ChannelGroup
    edit: ChannelEdit
    tensors: tuple[TensorEdit, ...]
    literals: tuple[WidthLiteral, ...]
    result: ChannelGroup


class _ArrayLike(Protocol):
    """What :func:`edit_array` uses of an array directly: its shape and its arithmetic."""

    @property
    def shape(self) -> Sequence[int]: ...

    def __add__(self, other: Any) -> Any: ...

    def __mul__(self, other: Any) -> Any: ...


Array = TypeVar("Array", bound=_ArrayLike)


@dataclass(frozen=True)
class ArrayOps(Generic[Array]):
    """The array operations :func:`edit_array` needs, for one array type (numpy, torch).

    Attributes:
        narrow: ``narrow(array, axis, start, length)``, entries ``start`` to
            ``start + length`` along ``axis`` (a view where the type has them).
        concat: ``concat(arrays, axis)``, a new array.
        zeros_like: an array of zeros of the same shape, dtype and device.
        coefficient: ``coefficient(factor, like)``, a :data:`Coefficient` as an
            array of ``like``'s dtype and device, so the arithmetic happens in
            the array's own precision.
    """

    narrow: Callable[[Array, int, int, int], Array]
    concat: Callable[[Sequence[Array], int], Array]
    zeros_like: Callable[[Array], Array]
    coefficient: Callable[[Coefficient, Array], Array]


def _numpy_narrow(array: np.ndarray, axis: int, start: int, length: int) -> np.ndarray:
    return array[(slice(None),) * axis + (slice(start, start + length),)]


NUMPY_OPS: ArrayOps[np.ndarray] = ArrayOps(
    narrow=_numpy_narrow,
    concat=lambda arrays, axis: np.concatenate(arrays, axis=axis),
    zeros_like=np.zeros_like,
    coefficient=lambda factor, like: np.asarray(factor, dtype=like.dtype),
)


def edit_array(array: Array, tensor_edit: TensorEdit, ops: ArrayOps[Array]) -> Array:
    """The rewritten copy of one parameter (see :class:`TensorEdit`), in ``array``'s own type and dtype.

    The group's span along the slice's axis is cut into channel blocks; each
    new block is a copy of an old one or a combination of old ones, and the
    entries before and after the span stay as they are. Copies of
    consecutive old blocks are taken as one piece (most of a clone or a
    merge is the identity).
    """
    param_slice = tensor_edit.slice
    axis, block, offset = param_slice.axis, param_slice.block, param_slice.offset
    copies = tensor_edit.copies
    end = offset + tensor_edit.size * block

    def old_blocks(first: int, count: int = 1) -> Array:
        return ops.narrow(array, axis, offset + first * block, count * block)

    parts = [ops.narrow(array, axis, 0, offset)]
    new = 0
    while new < len(copies):
        copied = copies[new]
        if copied is None:
            value = ops.zeros_like(old_blocks(0))
            for old, factor in tensor_edit.sources[new]:
                value = value + ops.coefficient(factor, array) * old_blocks(old)
            parts.append(value)
            new += 1
            continue
        run = 1
        while new + run < len(copies) and copies[new + run] == copied + run:
            run += 1
        parts.append(old_blocks(copied, run))
        new += run
    parts.append(ops.narrow(array, axis, end, array.shape[axis] - end))
    return ops.concat(parts, axis)


def plan_edit(group: ChannelGroup, edit: ChannelEdit) -> RewritePlan:
    """Map ``edit`` onto every parameter entry of ``group``.

    Vector coefficients (lambda) have ``group.outbound_size`` entries and are
    cut consumer by consumer, in the order of the group's outbound slices.
    """
    if edit.size != group.size:
        raise ValueError(f"edit is for {edit.size} channels, group '{group.name}' has {group.size}")
    outbound_cuts: dict[int, tuple[int, int]] = {}
    start = 0
    for index, param_slice in enumerate(group.slices):
        if param_slice.role == "outbound":
            outbound_cuts[index] = (start, start + param_slice.channel_numel)
            start += param_slice.channel_numel
    copies = {
        inbound: tuple(edit.is_copy(new, inbound) for new in range(edit.new_size))
        for inbound in (True, False)
    }
    tensors = []
    for index, param_slice in enumerate(group.slices):
        inbound = param_slice.role != "outbound"
        cut = outbound_cuts.get(index)
        terms = edit.inbound if inbound else edit.outbound
        sources = tuple(
            ()
            if copied is not None
            else tuple(
                (old, _shape_coefficient(factor, param_slice, cut, group))
                for old, factor in terms[new].items()
            )
            for new, copied in enumerate(copies[inbound])
        )
        tensors.append(TensorEdit(param_slice, group.size, sources, copies[inbound]))
    # outbound edits first: a layer that reads and writes the group has both on one weight, and
    # its lambda entries are cut for the weight's rows as they are before the rows change
    tensors.sort(key=lambda tensor_edit: tensor_edit.slice.role != "outbound")
    result = group.resized(edit.delta)
    return RewritePlan(group, edit, tuple(tensors), result.literals if edit.delta else (), result)


def _shape_coefficient(
    factor: Coefficient, param_slice: ParamSlice, cut: tuple[int, int] | None, group: ChannelGroup
) -> Coefficient:
    if np.ndim(factor) == 0:
        return float(factor)
    if cut is None:
        raise ValueError("vector coefficients apply to outbound weights only")
    vector = np.asarray(factor, dtype=np.float64)
    if vector.shape != (group.outbound_size,):
        raise ValueError(
            f"lambda has {vector.size} entries; group '{group.name}' has {group.outbound_size} "
            "outbound weights per channel"
        )
    part = vector[cut[0]:cut[1]]
    assert part.size == math.prod(param_slice.slice_shape())
    return part.reshape(param_slice.slice_shape())


def check_shapes(
    group: ChannelGroup, shapes: Mapping[str, tuple[int, ...]], error: type[Exception] = SiteError
) -> None:
    """Raise ``error`` unless every parameter ``group`` refers to exists in ``shapes`` with the shape it expects.

    ``shapes`` maps a model's parameter (or initializer) names to their
    shapes; a mismatch means the group was found on another model.
    """
    for param_slice in group.slices:
        shape = shapes.get(param_slice.param)
        if shape is None:
            raise error(
                f"the model has no parameter '{param_slice.param}' that group '{group.name}' refers to; "
                "find the sites on this model with tg.find_sites"
            )
        if tuple(shape) != param_slice.shape:
            raise error(
                f"group '{group.name}' does not fit this model: it was found where '{param_slice.param}' "
                f"has shape {param_slice.shape}, but here it has {tuple(shape)}; find the sites on this "
                "model with tg.find_sites"
            )
