"""A-statistics for groups whose channels change axis on the way (torch.permute, movedim, transpose).

ConvNeXt's blocks move the channels last for their linear layers and back for the residual add.
The chain re-runs those moves between producers and consumers; its diagonal shortcut never takes
them (a transpose reorders entries, even where it keeps the shape), so the general forward-mode
path computes A. The exact and the matrix-free methods must give the oracle's A (one rewrite and
one autograd pass per column, :func:`tunnelgraph.testing.naive_a_matrix`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tunnelgraph as tg
from conftest import regression_data, relative, squared_error
from tunnelgraph.statistics.chain import GroupChain
from tunnelgraph.testing import naive_a_matrix
from zoo import ZOO_BY_NAME


def test_a_through_channels_last_blocks_is_the_oracles_a() -> None:
    entry = ZOO_BY_NAME["channels_last_blocks"]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64, batch=4)
    sites = tg.find_sites(model, data[0][0], through=("depthwise",))
    chosen = [site for site in sites if site.channel == 1]
    assert [site.group_name for site in chosen] == ["stem", "fc0a", "fc1a"]
    assert chosen[0].group.producers == ("stem", "fc0b", "fc1b")
    assert chosen[0].group.consumers == ("fc0a", "fc1a", "head")
    exact = tg.a_statistics(model, chosen, data, squared_error, method="exact", progress=False)
    free = tg.a_statistics(model, chosen, data, squared_error, method="matrix_free", progress=False)
    for site in chosen:
        reference = naive_a_matrix(model, site, data, squared_error)
        a = exact[site.name].a
        assert a is not None and relative(a, reference) <= 1e-10, site.name
        sigma = float(torch.linalg.svdvals(reference)[0])
        assert sigma > 0 and free[site.name].sigma == pytest.approx(sigma, rel=1e-6), site.name
        assert relative(free[site.name].gradient, reference.sum(1)) <= 1e-10, site.name


class _SquareTranspose(nn.Module):
    """conv -> tanh -> transpose of the two (equal) spatial axes -> conv: the shape stays, the entries move."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3)
        self.b = nn.Conv2d(3, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)).transpose(2, 3)).flatten(1)


@pytest.mark.parametrize("method", ["exact", "matrix_free"])
def test_a_transpose_that_keeps_the_shape_is_not_taken_for_a_diagonal_chain(method: str) -> None:
    torch.manual_seed(0)
    model = _SquareTranspose().double()
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        data = [(x, torch.randn_like(model(x)))]
    graph = tg.trace(model, x)
    sites = tg.find_sites(graph)
    assert [site.name for site in sites] == [f"a[{c}]" for c in range(3)]
    chain = GroupChain(model, graph, sites[0].group)
    assert chain.diagonal == ((False,),)
    stats = tg.a_statistics(model, sites, data, squared_error, method=method, progress=False)
    for site in sites:
        reference = naive_a_matrix(model, site, data, squared_error)
        if method == "exact":
            a = stats[site.name].a
            assert a is not None and relative(a, reference) <= 1e-10, site.name
        else:
            assert stats[site.name].sigma == pytest.approx(float(torch.linalg.svdvals(reference)[0]), rel=1e-6)
        assert relative(stats[site.name].gradient, reference.sum(1)) <= 1e-10, site.name
