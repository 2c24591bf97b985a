"""Captures of several batches merged into one: the same products with A, fewer and larger convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tunnelgraph as tg
from conftest import regression_data, relative, squared_error
from tunnelgraph.statistics.capture import Capture, Recorder, merge
from tunnelgraph.statistics.chain import GroupChain
from tunnelgraph.statistics.engine import linear_operators, run_batch
from zoo import ZOO_BY_NAME


def _captures(model: nn.Module, chain: GroupChain, data: list) -> list[Capture]:
    """The captures of ``data``'s batches, their inbound gradients dropped (the engine sums those as it goes)."""
    with Recorder(model, chain.source, [chain.tap()]) as recorder:
        captures = [run_batch(model, recorder, x, y, squared_error) for x, y in data]
    for capture in captures:
        capture.gradients.clear()
    return captures


def _chains(model: nn.Module, x: torch.Tensor) -> list[GroupChain]:
    graph = tg.trace(model, x)
    groups = {site.group.name: site.group for site in tg.find_sites(graph, through=tg.THROUGH_OPTIONS)}
    return [GroupChain(model, graph, group) for group in groups.values()]


@pytest.mark.parametrize("name", ["paper_cnn", "resnet_stack", "inception_concat", "squeeze_excite", "mlp_tanh"])
def test_merged_captures_give_the_products_of_the_separate_ones(name: str) -> None:
    """Batches of 5, 2 and 4 samples: errors weighted by each batch's share, values led by the batch joined."""
    entry = ZOO_BY_NAME[name]
    model = entry.build().double().eval()
    whole = regression_data(model, entry, torch.float64, batches=1, batch=11)[0]
    data = [(whole[0][a:b], whole[1][a:b]) for a, b in ((0, 5), (5, 7), (7, 11))]
    generator = torch.Generator().manual_seed(0)
    for chain in _chains(model, data[0][0]):
        separate = _captures(model, chain, data)
        one = merge(_captures(model, chain, data))
        assert len(one) == 1 and one[0].batch == 11
        channels = torch.arange(chain.group.size)
        v = torch.randn(chain.group.size, chain.outbound_size, generator=generator, dtype=torch.float64)
        u = torch.randn(chain.group.size, chain.inbound_size, generator=generator, dtype=torch.float64)
        products = [linear_operators(chain, captures, 11) for captures in (separate, one)]
        assert relative(products[1][0](v, channels), products[0][0](v, channels)) <= 1e-12, chain.group.name
        assert relative(products[1][1](u, channels), products[0][1](u, channels)) <= 1e-12, chain.group.name


def test_merging_empties_the_list_so_no_second_copy_is_held() -> None:
    entry = ZOO_BY_NAME["paper_cnn"]
    model = entry.build().double().eval()
    data = regression_data(model, entry, torch.float64, batches=3, batch=4)
    (chain,) = _chains(model, data[0][0])
    with Recorder(model, chain.source, [chain.tap()]) as recorder:
        with_gradients = [run_batch(model, recorder, x, y, squared_error) for x, y in data]
    assert merge(with_gradients) is with_gradients  # inbound gradients are summed by the engine, not merged
    captures = _captures(model, chain, data)
    merged = merge(captures)
    assert captures == [] and merged[0].batch == 12
    assert all(value.shape[0] == 12 for value in merged[0].inputs.values())


def test_captures_of_different_shapes_stay_separate_and_the_statistics_agree() -> None:
    """A fully convolutional network on 8x8 and 6x6 images: nothing to join, each capture is summed as before."""

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(torch.tanh(self.conv1(x))).mean((2, 3))

    model = Pooled().double().eval()
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, 2, size, size, generator=generator, dtype=torch.float64),
             torch.randn(3, 3, generator=generator, dtype=torch.float64)) for size in (8, 6)]
    (chain,) = _chains(model, data[0][0])
    captures = _captures(model, chain, data)
    assert merge(captures) is captures and len(captures) == 2
    sites = tg.find_sites(model, data[0][0])
    exact = tg.a_statistics(model, sites, data, squared_error, method="exact", progress=False)
    free = tg.a_statistics(model, sites, data, squared_error, method="matrix_free", progress=False)
    for site in sites:
        assert free[site.name].sigma == pytest.approx(exact[site.name].sigma, rel=1e-6)
