"""The channel-edit algebra shared by opening, closing, reorganising and reducing.

A :class:`ChannelEdit` rewrites the ``n`` channels of one group into ``n'``
channels. New channel ``j`` is described twice:

- its **inbound** entries (producer rows, biases, per-channel parameters
  such as batch-norm statistics) are ``sum_k a_jk * old_k`` with scalar
  ``a_jk``;
- its **outbound** entries (consumer columns) are ``sum_k b_jk * old_k``,
  where ``b_jk`` is a scalar or a vector with one factor per outbound
  weight of a channel (the length-L lambda of a tunnel).

Every rewrite of the paper is such an edit: opening a tunnel (clone),
closing one (merge), the shape-preserving reorganisation (merge then clone
into the freed slot), and Sussmann reductions (remove; fold into a partner).
Edits compose with :meth:`ChannelEdit.then`, and a plan maps one edit onto
every parameter that the group's channels own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import numpy as np

Coefficient = Union[float, np.ndarray]
"""A scalar, or one factor per outbound weight of a channel (length L)."""

Terms = Mapping[int, Coefficient]


def _combine(outer: Terms, inner: tuple[Terms, ...]) -> dict[int, Coefficient]:
    """``sum_m outer[m] * inner[m]`` as a new term map."""
    result: dict[int, Coefficient] = {}
    for middle, factor in outer.items():
        for old, coefficient in inner[middle].items():
            product = factor * coefficient
            result[old] = result[old] + product if old in result else product
    return result


@dataclass(frozen=True, eq=False)
class ChannelEdit:
    """A linear rewrite of a group's channels (see the module docstring).

    Attributes:
        size: channels before the edit.
        inbound: for each channel after the edit, ``{old channel: factor}``
            for its inbound and per-channel entries.
        outbound: for each channel after the edit, ``{old channel: factor}``
            for its outbound entries; a factor may be a length-L vector.
    """

    size: int
    inbound: tuple[Terms, ...]
    outbound: tuple[Terms, ...]

    def __post_init__(self) -> None:
        if len(self.inbound) != len(self.outbound):
            raise ValueError("inbound and outbound must describe the same channels")
        for terms in self.inbound + self.outbound:
            if any(not 0 <= old < self.size for old in terms):
                raise ValueError(f"edit refers to a channel outside 0..{self.size - 1}")

    @property
    def new_size(self) -> int:
        return len(self.inbound)

    @property
    def delta(self) -> int:
        return self.new_size - self.size

    def then(self, other: "ChannelEdit") -> "ChannelEdit":
        """This edit followed by ``other`` (whose ``size`` must be this one's ``new_size``)."""
        if other.size != self.new_size:
            raise ValueError(f"cannot compose: {self.new_size} channels out, {other.size} expected")
        return ChannelEdit(
            self.size,
            tuple(_combine(terms, self.inbound) for terms in other.inbound),
            tuple(_combine(terms, self.outbound) for terms in other.outbound),
        )

    def is_copy(self, new: int, inbound: bool) -> int | None:
        """The old channel that new channel ``new`` copies unchanged, if it does."""
        terms = (self.inbound if inbound else self.outbound)[new]
        if len(terms) == 1:
            (old, factor), = terms.items()
            if isinstance(factor, (int, float)) and factor == 1.0:
                return old
        return None


def identity(size: int) -> ChannelEdit:
    """The edit that changes nothing."""
    terms = tuple({channel: 1.0} for channel in range(size))
    return ChannelEdit(size, terms, terms)


def clone(size: int, channel: int, lam: Coefficient, position: int | None = None) -> ChannelEdit:
    """Open a tunnel: copy ``channel`` into a new channel at ``position`` (default: last).

    Inbound entries are copied; outbound entries become ``lam * w`` on the
    original and ``(1 - lam) * w`` on the clone (docs/MATH.md section 3, case C).
    """
    _check_channel(size, channel)
    position = size if position is None else position
    if not 0 <= position <= size:
        raise ValueError(f"position {position} is outside 0..{size}")
    inbound: list[Terms] = [{old: 1.0} for old in range(size)]
    outbound: list[Terms] = [{old: 1.0} for old in range(size)]
    outbound[channel] = {channel: lam}
    inbound.insert(position, {channel: 1.0})
    outbound.insert(position, {channel: 1.0 - lam})
    return ChannelEdit(size, tuple(inbound), tuple(outbound))


def merge(size: int, channel: int, into: int) -> ChannelEdit:
    """Close a tunnel: fold ``channel`` into ``into`` and delete it (docs/MATH.md section 6).

    Inbound entries of ``into`` become the mean of both; outbound entries
    are summed. Exact when the two channels are equal (right after a clone).
    """
    _check_channel(size, channel)
    _check_channel(size, into)
    if channel == into:
        raise ValueError(f"cannot merge channel {channel} into itself")
    inbound: list[Terms] = [{old: 1.0} for old in range(size)]
    outbound: list[Terms] = [{old: 1.0} for old in range(size)]
    inbound[into] = {into: 0.5, channel: 0.5}
    outbound[into] = {into: 1.0, channel: 1.0}
    del inbound[channel], outbound[channel]
    return ChannelEdit(size, tuple(inbound), tuple(outbound))


def remove(size: int, channel: int) -> ChannelEdit:
    """Delete ``channel`` with its inbound and outbound entries (exact when it is inconsequential)."""
    _check_channel(size, channel)
    kept = [old for old in range(size) if old != channel]
    terms = tuple({old: 1.0} for old in kept)
    return ChannelEdit(size, terms, terms)


def fold(size: int, channel: int, into: int, sign: float = 1.0) -> ChannelEdit:
    """Sussmann (1c): add ``sign`` times ``channel``'s outbound entries to ``into``'s, delete ``channel``."""
    _check_channel(size, channel)
    _check_channel(size, into)
    if channel == into:
        raise ValueError(f"cannot fold channel {channel} into itself")
    kept = [old for old in range(size) if old != channel]
    inbound = tuple({old: 1.0} for old in kept)
    outbound = tuple({old: 1.0, channel: sign} if old == into else {old: 1.0} for old in kept)
    return ChannelEdit(size, inbound, outbound)


def reorganize(size: int, merged: int, into: int, cloned: int, lam: Coefficient) -> ChannelEdit:
    """Shape-preserving reorganisation: merge ``merged`` into ``into``, clone ``cloned`` into the freed slot."""
    if cloned == merged:
        raise ValueError("the cloned channel cannot be the one merged away")
    first = merge(size, merged, into)
    shifted = cloned - (1 if cloned > merged else 0)
    return first.then(clone(size - 1, shifted, lam, position=merged))


def _check_channel(size: int, channel: int) -> None:
    if not 0 <= channel < size:
        raise ValueError(f"channel {channel} is outside the group's {size} channels 0..{size - 1}")
