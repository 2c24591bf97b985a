"""Shape reasoning shared by the frontends (no framework imports)."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence


def merged_range(
    in_shape: Sequence[Any], out_shape: Sequence[Any], product: Callable[[Sequence[Any]], Any] = math.prod
) -> tuple[int, int] | None:
    """The input axes ``start..end`` (inclusive) a reshape merges into one, if it is a flatten.

    Sizes are compared with ``==``; ``product`` multiplies the merged ones
    (symbolic sizes need their own, see the ONNX frontend's ``flatten_range``).
    Axes of size 1 can make several ranges fit (``(N, 1, 4) -> (N, 4)``
    merges ``N, 1`` or ``1, 4``, and which one a reshape means depends on
    what it does at other sizes); the first one is taken, so a channel axis
    of size 1 reads as merged with the axis before it, which blocks its
    group ("interleaves the channels") rather than pass it wrongly. A call
    that names its range (``flatten(x, 1)``) is read by its range instead.
    """
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if in_shape == out_shape:
        return (0, 0)
    merged_count = len(in_shape) - len(out_shape) + 1
    if merged_count < 1:
        return None
    for start in range(len(out_shape)):
        end = start + merged_count - 1
        if (
            in_shape[:start] == out_shape[:start]
            and in_shape[end + 1:] == out_shape[start + 1:]
            and product(in_shape[start:end + 1]) == out_shape[start]
        ):
            return (start, end)
    return None


def permutation_axis_map(perm: Sequence[int], rank: int) -> tuple[int, ...] | None:
    """Where each input axis goes under a transpose whose output axis ``i`` is input axis ``perm[i]``.

    The inverse permutation, as a transpose node's ``attrs["axis_map"]``
    gives it (:mod:`tunnelgraph.ir.graph`): ``(0, 2, 3, 1)`` (channels
    last) sends axis 1 to axis 3, so its map is ``(0, 3, 1, 2)``. Negative
    axes count from the end. None when ``perm`` is not a permutation of
    ``range(rank)``.
    """
    if len(perm) != rank or not all(isinstance(axis, int) and -rank <= axis < rank for axis in perm):
        return None
    normalised = [axis % rank for axis in perm]
    if sorted(normalised) != list(range(rank)):
        return None
    return tuple(normalised.index(axis) for axis in range(rank))
