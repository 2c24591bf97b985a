"""The matrix-free path (Lanczos on products with A and A^T) against the exact path."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch

import tunnelgraph as tg
from conftest import regression_data, relative, squared_error
from zoo import ZOO_BY_NAME

KINDS = [
    "mlp_tanh",  # fully connected to fully connected
    "paper_cnn",  # conv -> flatten -> linear
    "conv_stride_pad_dilation",  # conv -> conv with stride, padding, dilation
    "conv1d",
    "resnet_stack",  # residual coupling, batch norm
    "inception_concat",  # concat coupling
    "conv_bn_pool_avg",  # batch norm and pooling inside the chain
    "squeeze_excite",  # a broadcast gate
    "global_mean_pool",  # a global pool into the head (a reduced pair)
    "resnet_downsample",  # strided convolutions beside a strided shortcut
]


@pytest.mark.parametrize("name", KINDS)
def test_matrix_free_matches_exact(name: str) -> None:
    entry = ZOO_BY_NAME[name]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64, batch=6)
    sites = tg.find_sites(model, data[0][0], through=tg.THROUGH_OPTIONS)
    exact = tg.a_statistics(model, sites, data, squared_error, method="exact", progress=False)
    free = tg.a_statistics(model, sites, data, squared_error, method="matrix_free", progress=False)
    _assert_matches_exact(sites, free, exact)


def _assert_matches_exact(sites: list, free: dict, exact: dict) -> None:
    """Matrix-free statistics against the exact path: sigma, lambda* (|cos|), the gradient, the residual."""
    for site in sites:
        e, f = exact[site.name], free[site.name]
        assert f.a is None and f.method == "matrix_free" and f.steps >= 1
        assert f.sigma == pytest.approx(e.sigma, rel=1e-3), site.name
        if e.sigma > 0:
            assert abs(float(f.direction @ e.direction)) >= 0.999, site.name
            assert f.residual <= 1e-4, site.name  # the stopping rule's tol
        assert relative(f.gradient, e.gradient) <= 1e-6, site.name


def test_matrix_free_in_float32_reaches_the_float64_answer() -> None:
    entry = ZOO_BY_NAME["conv_stride_pad_dilation"]
    model = entry.build()
    data = regression_data(model, entry, torch.float32, batch=8)
    sites = tg.find_sites(model, data[0][0])
    free = tg.a_statistics(model, sites, data, squared_error, method="matrix_free", progress=False)
    data64 = [(x.double(), y.double()) for x, y in data]
    exact = tg.a_statistics(model.double(), sites, data64, squared_error, method="exact", progress=False)
    for site in sites:
        assert free[site.name].sigma == pytest.approx(exact[site.name].sigma, rel=1e-3)
        assert free[site.name].direction.dtype == torch.float32  # the precision the products ran in
        assert abs(float(free[site.name].direction.double() @ exact[site.name].direction)) >= 0.999


def test_auto_picks_the_cheaper_path() -> None:
    """Few inbound rows (the paper's CNN): exact; a 64-to-64 conv layer: matrix-free."""
    entry = ZOO_BY_NAME["paper_cnn"]
    model = entry.build()
    data = regression_data(model, entry, torch.float32, batches=1, batch=2)
    sites = tg.find_sites(model, data[0][0])
    stats = tg.a_statistics(model, sites[:1], data, squared_error, progress=False)
    assert stats[sites[0].name].method == "exact"

    model = torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3, padding=1)
    )
    x = torch.randn(2, 64, 8, 8)
    data = [(x, torch.randn(2, 64, 8, 8))]
    sites = tg.find_sites(model, x)
    stats = tg.a_statistics(model, sites[:2], data, squared_error, progress=False)
    assert {s.method for s in stats.values()} == {"matrix_free"}


@pytest.mark.parametrize("method", ["exact", "matrix_free"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_statistics_come_in_the_models_precision_one_tensor_per_group(method: str, dtype: torch.dtype) -> None:
    """lambda* and A 1 in the precision the products ran in; a group's sites are rows of one tensor each."""
    entry = ZOO_BY_NAME["resnet_stack"]
    model = entry.build().to(dtype)
    data = regression_data(model, entry, dtype, batches=2, batch=3)
    sites = tg.find_sites(model, data[0][0], through=tg.THROUGH_OPTIONS)
    stats = tg.a_statistics(model, sites, data, squared_error, method=method, progress=False)
    storages: dict[str, set[tuple[int, int]]] = {}
    for entry_ in stats.values():
        assert entry_.direction.dtype == entry_.gradient.dtype == dtype, entry_.name
        assert entry_.direction.device.type == entry_.gradient.device.type == "cpu"
        storages.setdefault(entry_.site.group_name, set()).add(
            (entry_.direction.untyped_storage().data_ptr(), entry_.gradient.untyped_storage().data_ptr())
        )
    assert len(storages) > 1 and all(len(pairs) == 1 for pairs in storages.values())


STREAMED = [
    ("resnet_stack", "matrix_free"),  # residual coupling, batch norm: diagonal chains
    ("squeeze_excite", "matrix_free"),  # a broadcast gate: the chain linearised per capture
    ("paper_deep_cnn", "auto"),  # max pools (a selection chain); some groups exact, the others replayed
    ("global_mean_pool", "auto"),  # a reduced pair into the head, beside an exact group
]


@pytest.mark.parametrize("name, method", STREAMED)
def test_recompute_mode_matches_the_stored_mode(name: str, method: str) -> None:
    """store=False re-runs the pass for every product: the same answer as over stored captures.

    Up to where a channel stops (as with chunks of channels, below): the stored captures are merged into one batch
    and the replayed ones summed batch by batch, so rounding differs and may move a residual across tol, which
    moves sigma by about tol^2 and lambda* by about tol. The gradient is a plain sum.
    """
    entry = ZOO_BY_NAME[name]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64, batches=3, batch=4)
    sites = tg.find_sites(model, data[0][0], through=tg.THROUGH_OPTIONS)
    stored = tg.a_statistics(model, sites, data, squared_error, method=method, progress=False)
    again = tg.a_statistics(model, sites, data, squared_error, method=method, progress=False, store=False)
    assert "matrix_free" in {entry_.method for entry_ in again.values()}
    assert [entry_.method for entry_ in again.values()] == [entry_.method for entry_ in stored.values()]
    for site in sites:
        assert again[site.name].sigma == pytest.approx(stored[site.name].sigma, rel=1e-6), site.name
        assert relative(again[site.name].direction, stored[site.name].direction) <= 1e-3, site.name
        assert relative(again[site.name].gradient, stored[site.name].gradient) <= 1e-12, site.name
    with pytest.raises(tg.StatisticsError, match="re-iterable"):
        tg.a_statistics(model, sites, iter(data), squared_error, method="matrix_free", store=False)


@pytest.mark.parametrize("name, method", [("resnet_stack", "matrix_free"), ("paper_deep_cnn", "auto")])
def test_recompute_mode_with_a_frozen_weight(name: str, method: str) -> None:
    """A frozen first weight: the first pass differentiates for the inputs and sums no inbound gradient, so the
    replayed products give A 1 as well; the same answer as over stored captures, and the flag is left as it was."""
    entry = ZOO_BY_NAME[name]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64, batches=3, batch=4)
    sites = tg.find_sites(model, data[0][0], through=tg.THROUGH_OPTIONS)
    frozen = next(iter(model.parameters())).requires_grad_(False)
    stored = tg.a_statistics(model, sites, data, squared_error, method=method, progress=False)
    again = tg.a_statistics(model, sites, data, squared_error, method=method, progress=False, store=False)
    assert not frozen.requires_grad
    for site in sites:
        assert again[site.name].sigma == pytest.approx(stored[site.name].sigma, rel=1e-6), site.name
        assert relative(again[site.name].gradient, stored[site.name].gradient) <= 1e-12, site.name


@pytest.mark.parametrize("name, method", STREAMED)
def test_recompute_mode_holds_one_batch_at_a_time(name: str, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under store=False nothing recorded from a batch outlives it, so memory does not grow with the data.

    The first pass keeps no value of the groups solved matrix-free (their inbound gradients are summed as it
    goes), and when a pass starts, no value an earlier one recorded, nor anything a product derived from one
    (a chain's Jacobian diagonal, a selection's factors, a linearised chain), is still held.
    """
    from tunnelgraph.statistics import engine
    from tunnelgraph.statistics.chain import GroupChain

    recorded: list[weakref.ref] = []  # what the passes so far recorded or derived
    passes: list[Any] = []
    original = engine.run_batch

    def run_batch(*args: Any, **kwargs: Any) -> Any:
        held = sum(ref() is not None for ref in recorded)
        assert held == 0, f"pass {len(passes)}: {held} values of earlier passes are still held"
        capture = original(*args, **kwargs)
        passes.append(capture.batch)
        values = [v for key in ("inputs", "outputs", "errors", "externals") for v in getattr(capture, key).values()]
        if len(passes) == 1:  # the first pass (store=False reads the data again only for the matrix-free groups)
            free = {node for node in free_producers if node in capture.outputs}
            assert not free, f"the first pass recorded {sorted(free)}, which the solves replay"
        recorded.extend(weakref.ref(value) for value in values if isinstance(value, torch.Tensor))
        return capture

    def tracked(method_name: str) -> Any:
        real = getattr(GroupChain, method_name)

        def derived(self: GroupChain, *args: Any, **kwargs: Any) -> Any:
            made = real(self, *args, **kwargs)
            for value in _tensors(made):
                recorded.append(weakref.ref(value))
            return made

        return derived

    entry = ZOO_BY_NAME[name]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64, batches=3, batch=4)
    sites = tg.find_sites(model, data[0][0], through=tg.THROUGH_OPTIONS)
    kinds = tg.a_statistics(model, sites, data, squared_error, method=method, progress=False)
    graph = tg.trace(model, data[0][0])
    free_groups = {entry_.site.group.name: entry_.site.group for entry_ in kinds.values()
                   if entry_.method == "matrix_free"}
    free_producers = {spec.node for group in free_groups.values() for spec in GroupChain(model, graph, group).producers}
    monkeypatch.setattr(engine, "run_batch", run_batch)
    for method_name in ("diagonal_scales", "restrict_scale", "selection_factors", "linearise"):
        monkeypatch.setattr(GroupChain, method_name, tracked(method_name))
    tg.a_statistics(model, sites, data, squared_error, method=method, progress=False, store=False)
    assert len(passes) > len(data), "no pass was replayed"


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value``: a tensor, nested lists and tuples, or an object's attributes (not a module's: the
    model's weights are not made from the data)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module):
        return [t for item in vars(value).values() for t in _tensors(item)]
    return []


@pytest.mark.parametrize("name", ["paper_cnn", "resnet_stack", "inception_concat", "conv_bn_pool_avg", "mlp_tanh",
                                  "global_mean_pool", "squeeze_excite", "residual_net_3"])
def test_products_on_a_subset_of_channels_are_those_rows_of_a(name: str) -> None:
    """Per-channel stopping asks the operators for the running channels only: A_c v_c and A_c^T u_c exactly."""
    from tunnelgraph.statistics.capture import Recorder
    from tunnelgraph.statistics.chain import GroupChain
    from tunnelgraph.statistics.engine import linear_operators, run_batch

    entry = ZOO_BY_NAME[name]
    model = entry.build().double().eval()
    data = regression_data(model, entry, torch.float64, batch=5)
    sites = tg.find_sites(model, data[0][0], through=tg.THROUGH_OPTIONS)
    exact = tg.a_statistics(model, sites, data, squared_error, method="exact", progress=False)
    graph = tg.trace(model, data[0][0])
    groups = {}
    for site in sites:
        groups.setdefault(site.group.name, site.group)
    generator = torch.Generator().manual_seed(0)
    for group in groups.values():
        chain = GroupChain(model, graph, group)
        with Recorder(model, chain.source, [chain.tap()]) as recorder:
            captures = [run_batch(model, recorder, x, y, squared_error) for x, y in data]
        product, transposed = linear_operators(chain, captures, sum(c.batch for c in captures))
        channels = torch.arange(0, group.size, 2)  # every other channel
        a = torch.stack([exact[f"{group.name}[{c}]"].a for c in channels.tolist()])  # (n, K, L)
        v = torch.randn(channels.numel(), a.shape[2], generator=generator, dtype=torch.float64)
        u = torch.randn(channels.numel(), a.shape[1], generator=generator, dtype=torch.float64)
        assert relative(product(v, channels), torch.einsum("nkl,nl->nk", a, v)) <= 1e-10, group.name
        assert relative(transposed(u, channels), torch.einsum("nkl,nk->nl", a, u)) <= 1e-10, group.name


def test_chunks_of_channels_and_a_subset_of_sites_give_each_site_its_own_answer() -> None:
    """Lanczos runs per channel: one channel per chunk (a tiny memory_budget), or only some sites, changes nothing.

    Up to where a channel stops: rounding may move a residual across tol, which moves sigma by about tol^2
    and lambda* by about tol; a channel mixed up with another would differ by far more.
    """
    entry = ZOO_BY_NAME["resnet_stack"]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64, batch=6)
    sites = tg.find_sites(model, data[0][0], through=tg.THROUGH_OPTIONS)
    whole = tg.a_statistics(model, sites, data, squared_error, method="matrix_free", progress=False)
    chunked = tg.a_statistics(model, sites, data, squared_error, method="matrix_free", progress=False, memory_budget=1)
    some = sites[1::3]
    subset = tg.a_statistics(model, some, data, squared_error, method="matrix_free", progress=False)
    assert list(subset) == [site.name for site in some]
    for results in (chunked, subset):
        for name, entry_ in results.items():
            assert entry_.sigma == pytest.approx(whole[name].sigma, rel=1e-6), name
            assert relative(entry_.direction, whole[name].direction) <= 1e-3, name
            assert relative(entry_.gradient, whole[name].gradient) <= 1e-12, name


@pytest.mark.parametrize("name", ["resnet_stack", "conv_stride_pad_dilation", "conv1d", "inception_concat",
                                  "global_mean_pool", "residual_net_3", "resnet_downsample"])
def test_the_gram_path_matches_exact(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups solved from products with A^T A (GramFactors, symmetric Lanczos) against the exact path.

    The cost rule is lifted so that every group it accepts takes that path (in the models that end in a global
    pool and a linear head, the group that reaches the head among them); with no room for the factors in the
    memory budget, none does.
    """
    from tunnelgraph.statistics import engine

    solves: list[bool] = []  # per solve: whether it ran on GramFactors (lifted from B's rows)
    heads: list[str] = []  # groups with a reduced pair (a global pool) that took the path
    original, factors = engine.lanczos_gram_top, engine._gram_factors

    def counted(*args, **kwargs):
        solves.append(kwargs.get("lift") is not None)
        return original(*args, **kwargs)

    def recorded(chain, *args, **kwargs):
        made = factors(chain, *args, **kwargs)
        if made is not None and any(any(row) for row in chain.reduced):
            heads.append(chain.group.name)
        return made

    monkeypatch.setattr(engine, "lanczos_gram_top", counted)
    monkeypatch.setattr(engine, "_gram_factors", recorded)
    monkeypatch.setattr(engine, "GRAM_GAIN", float("inf"))
    entry = ZOO_BY_NAME[name]
    model = entry.build().double()
    data = regression_data(model, entry, torch.float64, batch=6)
    sites = tg.find_sites(model, data[0][0], through=tg.THROUGH_OPTIONS)
    exact = tg.a_statistics(model, sites, data, squared_error, method="exact", progress=False)
    model.train()
    before = {key: value.clone() for key, value in model.state_dict(keep_vars=True).items()}
    free = tg.a_statistics(model, sites, data, squared_error, method="matrix_free", progress=False)
    assert any(solves), f"{name}: no group took the path"
    assert bool(heads) == (name in ("resnet_stack", "global_mean_pool", "residual_net_3", "resnet_downsample")), heads
    # the path reads the weights and builds its own factors: the model is left as it was, bit for bit
    after = model.state_dict(keep_vars=True)
    assert all(torch.equal(before[key], after[key]) for key in before) and model.training
    assert all(param.grad is None for param in model.parameters())
    _assert_matches_exact(sites, free, exact)

    solves.clear()
    monkeypatch.setattr(engine, "GRAM_SHARE", 2**62)  # no bytes for the factors
    tg.a_statistics(model, sites, data, squared_error, method="matrix_free", progress=False)
    assert solves and not any(solves)
