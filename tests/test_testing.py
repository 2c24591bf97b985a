"""The naive oracle of tunnelgraph.testing against the statistics engine (docs/MATH.md section 4)."""

from __future__ import annotations

import pytest
import torch

import tunnelgraph as tg
from tunnelgraph.testing import inbound_gradient, naive_a_matrix
from zoo import ZOO_BY_NAME, example_input


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean()


@pytest.mark.parametrize("name", ["mlp_tanh", "inception_concat"])
def test_naive_a_matrix_is_the_engines_a(name: str) -> None:
    entry = ZOO_BY_NAME[name]
    model = entry.build().double().train()
    data = []
    for batch in (3, 5):  # unequal batches: the mean is over samples, not batches
        x = example_input(entry, torch.float64, batch=batch)
        with torch.no_grad():
            data.append((x, torch.randn_like(model(x))))
    site = max(tg.find_sites(model, data[0][0]), key=lambda s: (s.group.size > 1, -s.outbound_size))
    exact = tg.a_statistics(model, [site], data, squared_error, method="exact", progress=False)[site.name]
    naive = naive_a_matrix(model, site, data, squared_error)
    assert naive.dtype == torch.float64 and naive.shape == (site.inbound_size, site.outbound_size)
    assert torch.allclose(naive, exact.a, rtol=1e-10, atol=1e-12 * float(exact.a.abs().max()))
    columns = [site.outbound_size - 1, 0]
    assert torch.equal(naive_a_matrix(model, site, data, squared_error, columns=columns), naive[:, columns])
    # A @ 1 is the current gradient: the channel's inbound gradient in the unopened model
    assert torch.allclose(inbound_gradient(model, site, data, squared_error), naive.sum(1), rtol=1e-10, atol=1e-12)
    assert model.training  # the oracle puts copies in eval mode, never the model
