"""Shape reasoning shared by the frontends (no framework imports)."""

from __future__ import annotations

import math


def merged_range(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The input axes ``start..end`` (inclusive) a reshape merges into one, if it is a flatten."""
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
            and math.prod(in_shape[start:end + 1]) == out_shape[start]
        ):
            return (start, end)
    return None
