"""Captures of several batches merged into one: the same products with A, fewer and larger convolutions."""

from __future__ import annotations

from typing import Any, Callable

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


def _deep_mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    generator = torch.Generator().manual_seed(2)
    return model, (torch.randn(7, 4, generator=generator, dtype=torch.float64),
                   torch.randn(7, 3, generator=generator, dtype=torch.float64))


def _chain_of(model: nn.Module, x: torch.Tensor, producer: str) -> GroupChain:
    return next(chain for chain in _chains(model, x) if chain.producers[0].node == producer)


@pytest.mark.parametrize("frozen", [(), ("weight",), ("weight", "bias")])
def test_a_pass_without_inbound_gradients_goes_back_no_further_than_the_consumers(frozen: tuple[str, ...]) -> None:
    """The errors are those of the full pass; no gradient before the consumer is computed, nor the consumer's
    weight gradient where its bias is trainable (the bias' gradient, a sum, carries the error there); where
    both are frozen, the pass differentiates for the inputs instead and still records them."""
    model, (x, y) = _deep_mlp()
    chain = _chain_of(model, x, "_2")  # Linear(6, 5) -> tanh -> Linear(5, 3)
    with Recorder(model, chain.source, [chain.tap()]) as recorder:
        full = run_batch(model, recorder, x, y, squared_error)
    assert set(full.gradients) == {"_2"}
    reached: list[str] = []  # gradients computed before the consumer: weights, and activations on the way back
    hooks = [model[i].weight.register_hook(lambda grad, i=i: reached.append(f"weight {i}")) for i in (0, 2)]
    hooks += [model[4].weight.register_hook(lambda grad: reached.append("consumer weight"))] if not frozen else []

    def watch(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.register_hook(lambda grad: reached.append(f"output {index}"))
        return hook

    hooks += [model[i].register_forward_hook(watch(i)) for i in (1, 3)]
    for name in frozen:
        getattr(model[4], name).requires_grad_(False)
    try:
        with Recorder(model, chain.source, [chain.tap()]) as recorder:
            narrow = run_batch(model, recorder, x, y, squared_error, inbound=())
    finally:
        model[4].requires_grad_(True)
        for hook in hooks:
            hook.remove()
    assert reached == (["output 3", "output 1"] if len(frozen) == 2 else []) and narrow.gradients == {}
    assert set(narrow.errors) == set(full.errors) == {"_4"}
    assert torch.equal(narrow.errors["_4"], full.errors["_4"])


def test_inbound_gradients_are_taken_for_the_groups_that_want_them_only() -> None:
    """Two groups recorded at once, the later one's inbound gradients wanted: the pass computes them and the
    earlier group's errors, and no gradient of the earlier group's producer."""
    model, (x, y) = _deep_mlp()
    early, late = _chain_of(model, x, "_0"), _chain_of(model, x, "_2")
    reached: list[str] = []
    hook = model[0].weight.register_hook(lambda grad: reached.append("0"))
    try:
        with Recorder(model, early.source, [early.tap(), late.tap()]) as recorder:
            capture = run_batch(model, recorder, x, y, squared_error, inbound={"_2"})
    finally:
        hook.remove()
    assert reached == [] and set(capture.gradients) == {"_2"}
    assert set(capture.errors) == {"_2", "_4"}
    with Recorder(model, early.source, [early.tap(), late.tap()]) as recorder:
        full = run_batch(model, recorder, x, y, squared_error)
    assert torch.equal(capture.gradients["_2"], full.gradients["_2"])
    assert all(torch.equal(capture.errors[node], full.errors[node]) for node in ("_2", "_4"))


@pytest.mark.parametrize("frozen", [(), ("weight",), ("weight", "bias")])
def test_the_graph_starts_at_the_first_producer(frozen: tuple[str, ...]) -> None:
    """Layers before the group keep no autograd graph; the errors and gradients are those of a full graph. With
    a frozen consumer (weight and bias) the graph starts at the input as usual."""
    model, (x, y) = _deep_mlp()
    chain = _chain_of(model, x, "_2")
    with Recorder(model, chain.source, [chain.tap()]) as recorder:
        full = run_batch(model, recorder, x, y, squared_error)
    graphed: dict[int, bool] = {}
    hooks = [model[i].register_forward_hook(
        lambda module, args, output, i=i: graphed.__setitem__(i, output.requires_grad)) for i in (0, 1, 2)]
    for name in frozen:
        getattr(model[4], name).requires_grad_(False)
    whole = len(frozen) == 2
    try:
        with Recorder(model, chain.source, [chain.tap()], graph_from_producers=True) as recorder:
            assert recorder.graph_from_producers is not whole
            capture = run_batch(model, recorder, x, y, squared_error)
    finally:
        model[4].requires_grad_(True)
        for hook in hooks:
            hook.remove()
    assert graphed == {0: whole, 1: whole, 2: True}
    assert torch.is_grad_enabled()  # the caller's mode is back
    assert torch.equal(capture.errors["_4"], full.errors["_4"])
    assert torch.equal(capture.gradients["_2"], full.gradients["_2"])


def test_inbound_gradients_are_summed_as_the_backward_pass_computes_them() -> None:
    """With ``into``, each producer's gradient goes into its sum (times the batch) during the backward pass:
    autograd hands back only memory-free zeros for the hooked weights, the capture keeps no gradient, the sums
    are those of the gradients kept the usual way, and no hook stays on the model."""
    from tunnelgraph.statistics.engine import InboundGradients

    model, (x, y) = _deep_mlp()
    chains = [_chain_of(model, x, "_0"), _chain_of(model, x, "_2")]
    taps = [chain.tap() for chain in chains]
    parts = [(x[:3], y[:3]), (x[3:], y[3:])]
    with Recorder(model, chains[0].source, taps) as recorder:
        kept = [run_batch(model, recorder, xb, yb, squared_error) for xb, yb in parts]
    expected = {node: sum(capture.gradients[node] * capture.batch for capture in kept) / 7 for node in ("_0", "_2")}

    sums = InboundGradients(chains, torch.device("cpu"))
    returned: list[torch.Tensor] = []
    grad = torch.autograd.grad

    def spy(*args: Any, **kwargs: Any) -> Any:
        result = grad(*args, **kwargs)
        returned.extend(result)
        return result

    torch.autograd.grad = spy  # type: ignore[assignment]
    try:
        with Recorder(model, chains[0].source, taps) as recorder:
            captures = [run_batch(model, recorder, xb, yb, squared_error, into=sums) for xb, yb in parts]
    finally:
        torch.autograd.grad = grad
    assert all(capture.gradients == {} for capture in captures)
    assert len(returned) == 2 * 4 and all(g.stride() == (0,) * g.dim() and not g.any() for g in returned)
    for chain, node in zip(chains, ("_0", "_2")):
        assert relative(sums.mean(chain, 7), expected[node]) <= 1e-12
    assert all(not module._backward_hooks and all(not p._backward_hooks for p in module.parameters())
               for module in model)


def test_a_gradient_sum_that_is_not_finite_is_refused_naming_the_batch_and_layer() -> None:
    from tunnelgraph.statistics.engine import InboundGradients

    model, (x, _) = _deep_mlp()
    chains = [_chain_of(model, x, "_0"), _chain_of(model, x, "_2")]
    sums = InboundGradients(chains, torch.device("cpu"))
    sums.check(["_0", "_2"], 4)  # zeros are finite
    sums.blocks["_2"][1, 2] = float("inf")
    with pytest.raises(tg.StatisticsError, match="batch 5: the weight gradient of layer '_2' is not finite"):
        sums.check(["_0", "_2"], 5)


def test_a_silent_tap_is_summed_but_not_recorded() -> None:
    """The pass of store=False: a silent group's inbound gradients go into the sums as with a recorded one, none
    of its layers' values is kept, a recorded group beside it is captured as usual, and a silent producer that
    does not run is still an error."""
    from tunnelgraph.statistics.engine import InboundGradients

    model, (x, y) = _deep_mlp()
    early, late = _chain_of(model, x, "_0"), _chain_of(model, x, "_2")
    with Recorder(model, early.source, [early.tap(), late.tap()]) as recorder:
        full = run_batch(model, recorder, x, y, squared_error)
    sums = InboundGradients([late], torch.device("cpu"))
    with Recorder(model, early.source, [early.tap()], silent=[late.tap()], graph_from_producers=True) as recorder:
        assert set(recorder.producer_parameters()) == {"_0", "_2"}
        capture = run_batch(model, recorder, x, y, squared_error, inbound={"_2"}, into=sums)
    assert set(capture.inputs) == set(capture.outputs) == {"_0"} and set(capture.errors) == {"_2"}
    assert torch.equal(capture.outputs["_0"], full.outputs["_0"]) and torch.equal(capture.errors["_2"],
                                                                                  full.errors["_2"])
    assert relative(sums.mean(late, 1) / x.shape[0], full.gradients["_2"]) <= 1e-12

    with Recorder(model, early.source, [], silent=[late.tap()]) as recorder:
        with pytest.raises(tg.StatisticsError, match="did not run layer"):
            recorder.take()  # no forward ran
