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
from tunnelgraph.statistics.engine import ExactSums
from tunnelgraph.testing import naive_a_matrix


def conv_to_linear() -> nn.Module:
    # rows 2*3*3 + 1 = 19 > 4 outputs: the scale is folded into the error
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def conv_to_linear_through_views() -> nn.Module:
    # no element-wise map between the layers: the chain's Jacobian diagonal comes back from autograd as the
    # broadcast ones it was given
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def linear_to_linear() -> nn.Module:
    # rows 6 + 1 = 7 < 9 outputs: the scale is folded into the rows
    return nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 9))


@pytest.mark.parametrize("build, shape", [
    (conv_to_linear, (2, 6, 6)), (conv_to_linear_through_views, (2, 6, 6)), (linear_to_linear, (6,))
])
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


def test_float32_sums_go_into_float64_every_sixteen_captures() -> None:
    """A diagonal block of float32 captures is summed in float32, straight from the products, and moved into its
    float64 sum every 16 captures and at the end: nothing is lost or counted twice on the way."""
    torch.manual_seed(0)
    model, x = conv_to_linear(), torch.randn(2, 2, 6, 6)
    site = tg.find_sites(model, x)[0]
    chain = GroupChain(model, tg.trace(model, x), site.group)
    working = ExactSums(chain, [0, 2], torch.float64, x.device, working=torch.float32)
    direct = ExactSums(chain, [0, 2], torch.float64, x.device)
    assert working.diagonal(0, 0).dtype == torch.float32 and direct.diagonal(0, 0).dtype == torch.float64
    for capture in range(1, 20):
        term = torch.randn(working.diagonal(0, 0).shape, dtype=torch.float64)
        working.diagonal(0, 0).add_(term.float())
        direct.diagonal(0, 0).add_(term.float().double())
        working.captured()
        direct.captured()
        flushed = working.pending[(0, 0)]
        assert bool((flushed == 0).all()) == (capture < 16), capture
        if capture == 16:
            assert not working.recent[(0, 0)].any() and relative(flushed, direct.pending[(0, 0)]) <= 1e-6
    assert relative(working.total(), direct.total()) <= 1e-6 and not working.recent


def test_float32_data_over_many_batches_match_float64() -> None:
    """40 float32 batches (two flushes and a remainder) give the float64 statistics to float32 rounding."""
    torch.manual_seed(0)
    model = conv_to_linear()
    generator = torch.Generator().manual_seed(3)
    data = [(torch.randn(6, 2, 6, 6, generator=generator), torch.randn(6, 4, generator=generator)) for _ in range(40)]
    sites = tg.find_sites(model, data[0][0])
    single = tg.a_statistics(model, sites, data, squared_error, method="exact", progress=False)
    double = tg.a_statistics(model.double(), sites, [(x.double(), y.double()) for x, y in data], squared_error,
                             method="exact", progress=False)
    for site in sites:
        a32, a64 = single[site.name].a, double[site.name].a
        assert a32 is not None and a64 is not None
        assert relative(a32, a64) <= 1e-5, site.name
