"""The statistics on a CUDA device against the oracle and against the CPU (skipped where torch sees no GPU).

Both paths run on the GPU: the exact one against the slow oracle (one
rewrite and one autograd pass per column of A, on the same device), and
the matrix-free one against the exact one, as on the CPU
(``test_matrix_free.py``, with its tolerances), and its current gradient
against the CPU's. Everything is float64.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tunnelgraph as tg
from conftest import regression_data, relative, squared_error
from tunnelgraph.statistics.engine import measurable
from tunnelgraph.testing import naive_a_matrix
from zoo import ZOO_BY_NAME

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device here")

NAMES = ["paper_cnn", "resnet_stack", "conv_bn_pool_avg", "inception_concat", "squeeze_excite", "paper_deep_cnn"]


def _on(device: str, name: str) -> tuple[torch.nn.Module, list, list]:
    entry = ZOO_BY_NAME[name]
    torch.manual_seed(0)
    model = entry.build().double().eval()
    data = regression_data(model, entry, torch.float64)
    model = model.to(device)
    data = [(x.to(device), y.to(device)) for x, y in data]
    sites = tg.find_sites(model, data[0][0], through=tg.THROUGH_OPTIONS)
    return model, data, [site for site in sites if measurable(site)]


@pytest.mark.parametrize("name", NAMES)
def test_the_exact_a_on_the_gpu_is_the_oracles(name: str) -> None:
    model, data, sites = _on("cuda", name)
    picked = [sites[0], sites[-1]]
    stats = tg.a_statistics(model, picked, data, squared_error, method="exact", progress=False)
    for site in picked:
        reference = naive_a_matrix(model, site, data, squared_error)
        assert relative(stats[site.name].a.cpu(), reference.cpu()) < 1e-8


@pytest.mark.parametrize("name", NAMES)
def test_the_matrix_free_statistics_on_the_gpu_are_the_exact_ones_and_the_cpus(name: str) -> None:
    model, data, sites = _on("cuda", name)
    free = tg.a_statistics(model, sites, data, squared_error, method="matrix_free", progress=False)
    exact = tg.a_statistics(model, sites, data, squared_error, method="exact", progress=False)
    cpu_model = copy.deepcopy(model).cpu()
    cpu_data = [(x.cpu(), y.cpu()) for x, y in data]
    cpu_sites = [site for site in tg.find_sites(cpu_model, cpu_data[0][0], through=tg.THROUGH_OPTIONS)
                 if site.name in free]
    on_cpu = tg.a_statistics(cpu_model, cpu_sites, cpu_data, squared_error, method="matrix_free", progress=False)
    for site in sites:
        ours, reference = free[site.name], exact[site.name]
        assert ours.a is None and ours.method == "matrix_free" and ours.direction.device.type == "cpu"
        assert ours.sigma == pytest.approx(reference.sigma, rel=1e-3), site.name
        if reference.sigma > 0:
            assert abs(float(ours.direction @ reference.direction)) >= 0.999, site.name
        assert relative(ours.gradient, reference.gradient) <= 1e-6, site.name
        assert relative(ours.gradient, on_cpu[site.name].gradient) <= 1e-10, site.name
