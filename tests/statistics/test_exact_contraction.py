"""The diagonal chain's contraction (the exact path's inner loop) in each of its layouts.

``GroupChain.contract_diagonal`` folds the chain's scale into the error or
into the rows, whichever is smaller, and works through the positions (and,
for wide groups, the channels) in slabs; every combination must give the
oracle's A (one rewrite and one autograd pass per column).
"""

from __future__ import annotations

import functools
from typing import Callable

import pytest
import torch
import torch.nn as nn

import tunnelgraph as tg
from conftest import relative, squared_error
from tunnelgraph.statistics.chain import GroupChain
from tunnelgraph.testing import naive_a_matrix


def conv_to_linear() -> nn.Module:
    # rows 2*3*3 + 1 = 19 > 4 outputs: the scale is folded into the error
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def linear_to_linear() -> nn.Module:
    # rows 6 + 1 = 7 < 9 outputs: the scale is folded into the rows
    return nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 9))


@pytest.mark.parametrize("build, shape", [(conv_to_linear, (2, 6, 6)), (linear_to_linear, (6,))])
@pytest.mark.parametrize("slab", [None, 1, 40])
def test_contraction_slabs_match_the_oracle(
    build: Callable[[], nn.Module], shape: tuple[int, ...], slab: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """slab 1: one channel of one position at a time; 40: a few positions or channels; None: the default."""
    torch.manual_seed(0)
    model = build().double()
    generator = torch.Generator().manual_seed(2)
    data = []
    for size in (5, 3):
        x = torch.randn(size, *shape, generator=generator, dtype=torch.float64)
        data.append((x, torch.randn(size, model(x).shape[1], generator=generator, dtype=torch.float64)))
    if slab is not None:
        contract = functools.partialmethod(GroupChain.contract_diagonal, slab=slab)
        monkeypatch.setattr(GroupChain, "contract_diagonal", contract)
    sites = tg.find_sites(model, data[0][0])
    stats = tg.a_statistics(model, sites, data, squared_error, method="exact", progress=False)
    for site in sites:
        a = stats[site.name].a
        assert a is not None
        reference = naive_a_matrix(model, site, data, squared_error)
        assert relative(a, reference) <= 1e-10, site.name
