"""The channel-edit algebra on its own: clone, merge, reorganise, remove, fold, composition."""

from __future__ import annotations

import numpy as np
import pytest

from tunnelgraph.rewrite import edits


def _dense(edit: edits.ChannelEdit, inbound: bool, length: int = 3) -> np.ndarray:
    """The edit as a (new, old, L) array of coefficients."""
    terms = edit.inbound if inbound else edit.outbound
    matrix = np.zeros((edit.new_size, edit.size, length))
    for new, row in enumerate(terms):
        for old, factor in row.items():
            matrix[new, old] += np.broadcast_to(factor, (length,))
    return matrix


def test_clone_appends_a_copy_and_splits_outbound() -> None:
    lam = np.array([0.2, 0.7, -1.0])
    edit = edits.clone(4, 1, lam)
    assert edit.new_size == 5 and edit.delta == 1
    assert edit.inbound[4] == {1: 1.0}
    np.testing.assert_allclose(edit.outbound[1][1], lam)
    np.testing.assert_allclose(edit.outbound[4][1], 1 - lam)
    assert edit.is_copy(4, inbound=True) == 1 and edit.is_copy(1, inbound=False) is None


def test_merge_after_clone_is_the_identity() -> None:
    lam = np.array([0.2, 0.7, -1.0])
    round_trip = edits.clone(4, 2, lam).then(edits.merge(5, 4, into=2))
    np.testing.assert_allclose(_dense(round_trip, True), _dense(edits.identity(4), True))
    np.testing.assert_allclose(_dense(round_trip, False), _dense(edits.identity(4), False))


def test_merge_averages_inbound_and_sums_outbound() -> None:
    edit = edits.merge(3, 0, into=2)
    assert edit.new_size == 2
    assert edit.inbound[1] == {2: 0.5, 0: 0.5}
    assert edit.outbound[1] == {2: 1.0, 0: 1.0}
    assert edit.inbound[0] == {1: 1.0}


def test_reorganize_keeps_the_size_and_fills_the_freed_slot() -> None:
    edit = edits.reorganize(5, merged=1, into=3, cloned=4, lam=0.25)
    assert edit.new_size == 5
    assert edit.inbound[1] == {4: 1.0}
    assert edit.outbound[1] == {4: 0.75}
    assert edit.outbound[4] == {4: 0.25}
    assert edit.inbound[3] == {3: 0.5, 1: 0.5}
    assert edit.outbound[3] == {3: 1.0, 1: 1.0}
    assert [edit.is_copy(j, True) for j in (0, 2)] == [0, 2]
    with pytest.raises(ValueError, match="merged away"):
        edits.reorganize(5, merged=1, into=3, cloned=1, lam=0.5)


def test_remove_and_fold() -> None:
    assert edits.remove(3, 1).inbound == ({0: 1.0}, {2: 1.0})
    fold = edits.fold(3, 0, into=2, sign=-1.0)
    assert fold.outbound[1] == {2: 1.0, 0: -1.0}
    assert fold.inbound[1] == {2: 1.0}


def test_bad_channels_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        edits.clone(3, 3, 0.5)
    with pytest.raises(ValueError, match="itself"):
        edits.merge(3, 1, 1)
    with pytest.raises(ValueError, match="compose"):
        edits.clone(3, 0, 0.5).then(edits.identity(3))
