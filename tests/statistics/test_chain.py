"""The chain as a linear map: its linearisation and its diagonal against the forward-mode derivative."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import tunnelgraph as tg
from conftest import regression_data, relative, squared_error
import tunnelgraph.statistics.chain as chain_module
from tunnelgraph.statistics.capture import Recorder
from tunnelgraph.statistics.chain import GroupChain, _root, host_channels
from tunnelgraph.statistics.engine import linear_operators, run_batch
from zoo import ZOO_BY_NAME


def _captured(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[tuple[GroupChain, list[torch.Tensor], dict]]:
    """Each group's chain, with its producers' outputs and the externals captured on one batch."""
    graph = tg.trace(model, x)
    groups = {site.group.name: site.group for site in tg.find_sites(graph, through=tg.THROUGH_OPTIONS)}
    found = []
    for group in groups.values():
        chain = GroupChain(model, graph, group)
        with Recorder(model, chain.source, [chain.tap()]) as recorder:
            capture = run_batch(model, recorder, x, y, squared_error)
        found.append((chain, [capture.outputs[spec.node] for spec in chain.producers], capture.externals))
    return found


def _chains_and_captures(name: str) -> list[tuple[GroupChain, list[torch.Tensor], dict]]:
    entry = ZOO_BY_NAME[name]
    model = entry.build().double().eval()
    return _captured(model, *regression_data(model, entry, torch.float64, batches=1, batch=5)[0])


# pooling (average and max), batch norm, residual adds, concats, a broadcast gate, flattens
@pytest.mark.parametrize("name", ["conv_bn_pool_avg", "resnet_stack", "inception_concat", "squeeze_excite",
                                  "global_mean_pool", "paper_cnn"])
def test_the_linearised_chain_gives_the_forward_and_reverse_mode_products(name: str) -> None:
    """J t and J^T e of the kept graphs equal a fresh forward-mode and reverse-mode pass, call after call,
    and are transposes of each other: <J t, e> = <t, J^T e>."""
    generator = torch.Generator().manual_seed(0)
    for chain, outputs, externals in _chains_and_captures(name):
        linear = chain.linearise(outputs, externals)
        consumers = [value.shape for value in chain.run(outputs, externals)]
        for _ in range(2):  # the graphs are kept: a second product is as exact as the first
            tangents = [torch.randn(value.shape, generator=generator, dtype=value.dtype) for value in outputs]
            errors = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in consumers]
            forward, reverse = linear.jvp(tangents), linear.vjp(errors)
            with torch.no_grad():  # as the engine runs them (the layers' parameters require gradients)
                expected_forward = chain.jvp(outputs, externals, tangents)
                expected_reverse = chain.vjp(outputs, externals, errors)
            for got, want in zip(forward, expected_forward):
                assert got.shape == want.shape and relative(got, want) <= 1e-12, chain.group.name
            for got, want in zip(reverse, expected_reverse):
                assert got.shape == want.shape and relative(got, want) <= 1e-12, chain.group.name
            left = sum(float((f * e).sum()) for f, e in zip(forward, errors))
            right = sum(float((t * r).sum()) for t, r in zip(tangents, reverse))
            assert left == pytest.approx(right, rel=1e-10, abs=1e-12), chain.group.name


@pytest.mark.parametrize("name", ["resnet_stack", "paper_cnn", "dense_block", "mlp_tanh", "residual_net_3",
                                  "global_mean_pool", "conv_bn_pool_avg"])
def test_the_diagonal_read_in_reverse_mode_is_the_forward_mode_diagonal(name: str) -> None:
    """J^T 1 of an entry-by-entry chain (batch norm, activations, residual adds, a flatten) is J 1, pair by pair;
    through a global pool (a reduced pair) it gives J, which maps tangents and errors as the chain's forward and
    reverse modes do; other pairs get none."""
    generator = torch.Generator().manual_seed(0)
    checked = {"diagonal": 0, "reduced": 0}
    for chain, outputs, externals in _chains_and_captures(name):
        scales = chain.diagonal_scales(outputs, externals)
        consumers = [value.shape for value in chain.run(outputs, externals)]
        for i in range(len(chain.producers)):
            with torch.no_grad():
                forward = chain._forward_mode(outputs, externals, {i: torch.ones_like(outputs[i])})
            for j in range(len(chain.consumers)):
                got = scales[i][j]
                assert not (chain.diagonal[i][j] and chain.reduced[i][j])
                if chain.diagonal[i][j]:
                    assert got is not None and got.shape == forward[j].shape
                    assert relative(got, forward[j]) <= 1e-12, chain.group.name
                    checked["diagonal"] += 1
                elif chain.reduced[i][j]:
                    assert got is not None and got.shape == outputs[i].shape
                    tangent = torch.randn(outputs[i].shape, generator=generator, dtype=torch.float64)
                    error = torch.randn(consumers[j], generator=generator, dtype=torch.float64)
                    with torch.no_grad():
                        jvp = chain._forward_mode(outputs, externals, {i: tangent})[j]
                    vjp = chain.vjp(outputs, externals, [error if k == j else torch.zeros(shape, dtype=torch.float64)
                                                         for k, shape in enumerate(consumers)])[i]
                    mapped = chain.through_scale(i, j, tangent, got, consumers[j], backward=False)
                    assert mapped.shape == consumers[j] and relative(mapped, jvp) <= 1e-12, chain.group.name
                    back = chain.through_scale(i, j, error, got, outputs[i].shape, backward=True)
                    assert back.shape == outputs[i].shape and relative(back, vjp) <= 1e-12, chain.group.name
                    checked["reduced"] += 1
                else:
                    assert got is None
    # resnet_stack, global_mean_pool and residual_net_3 end in a global pool and a head; conv_bn_pool_avg pools windows
    assert (checked["diagonal"] > 0) == (name != "conv_bn_pool_avg")
    assert (checked["reduced"] > 0) == (name in ("resnet_stack", "global_mean_pool", "residual_net_3"))


class _HardGate(nn.Module):
    """conv -> hardsigmoid -> max pool -> conv: hardsigmoid's backward has no derivative of its own in PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(nn.functional.max_pool2d(nn.functional.hardsigmoid(self.conv1(x)), 2)).mean((2, 3))


def test_a_chain_whose_backward_cannot_be_differentiated_gets_j_t_by_forward_mode() -> None:
    model = _HardGate().double().eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 8, 8, generator=generator, dtype=torch.float64)
    y = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    ((chain, outputs, externals),) = _captured(model, x, y)
    linear = chain.linearise(outputs, externals)
    tangents = [torch.randn(value.shape, generator=generator, dtype=value.dtype) for value in outputs]
    with torch.no_grad():
        forward = linear.jvp(tangents)
        expected = chain.jvp(outputs, externals, tangents)
    assert linear.transposed is None  # the recorded backward pass was given up
    assert all(relative(got, want) <= 1e-12 for got, want in zip(forward, expected))
    errors = [torch.randn(value.shape, generator=generator, dtype=value.dtype) for value in forward]
    left = sum(float((f * e).sum()) for f, e in zip(forward, errors))
    right = sum(float((t * r).sum()) for t, r in zip(tangents, linear.vjp(errors)))
    assert left == pytest.approx(right, rel=1e-10, abs=1e-12)


def test_statistics_through_a_hardsigmoid_and_a_pool_match_the_exact_path() -> None:
    model = _HardGate().double().eval()
    generator = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64),
             torch.randn(4, 4, generator=generator, dtype=torch.float64)) for _ in range(2)]
    sites = tg.find_sites(model, data[0][0], through=tg.THROUGH_OPTIONS)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    exact = tg.a_statistics(model, sites, data, squared_error, method="exact", progress=False)
    free = tg.a_statistics(model, sites, data, squared_error, method="matrix_free", progress=False, tol=1e-8)
    # the recorded passes leave the model as it was, bit for bit, and write no gradient
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert all(parameter.grad is None for parameter in model.parameters()) and not model.training
    for site in sites:
        assert free[site.name].sigma == pytest.approx(exact[site.name].sigma, rel=1e-6), site.name
        assert abs(float(free[site.name].direction @ exact[site.name].direction)) >= 0.99999, site.name


def test_a_channel_index_tensor_is_read_to_the_host_once_until_it_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The products ask about their channels for every layer; the index tensor is read once, not per question."""
    reads: list[int] = []
    tolist = torch.Tensor.tolist

    def counted(self: torch.Tensor) -> object:
        reads.append(id(self))
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    runs = torch.tensor([3, 4, 5])
    gaps = torch.tensor([0, 2, 5])
    for _ in range(5):
        assert host_channels(runs) == ((3, 4, 5), 3) and host_channels(gaps) == ((0, 2, 5), None)
    assert sorted(reads) == sorted([id(runs), id(gaps)])
    gaps[1] = 1  # an in-place change is seen: the tensor is read again
    assert host_channels(gaps) == ((0, 1, 5), None) and len(reads) == 3
    gaps[2] = 2
    assert host_channels(gaps) == ((0, 1, 2), 0)
    assert host_channels(torch.tensor([], dtype=torch.long)) == ((), None)


def test_the_host_copy_of_a_channel_index_goes_with_the_tensor() -> None:
    from tunnelgraph.statistics import chain

    channels = torch.tensor([7, 8])
    host_channels(channels)
    key = id(channels)
    assert key in chain._HOST_CHANNELS
    del channels
    assert key not in chain._HOST_CHANNELS
    with torch.inference_mode():
        frozen = torch.tensor([1, 2, 3])
    assert host_channels(frozen) == ((1, 2, 3), 1)


class _PooledStem(nn.Module):
    """A ResNet-like stem: conv, batch norm, ReLU, an overlapping max pool; a second producer joins after the pool."""

    def __init__(self, dims: int, ceil_mode: bool = False, second_pool: bool = False) -> None:
        super().__init__()
        conv, norm, pool = {1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d),
                            2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)}[dims]
        self.dims = dims
        self.conv1, self.bn1 = conv(2, 4, 3, stride=2, padding=1), norm(4)
        self.pool = pool(3, 2, 1, ceil_mode=ceil_mode)
        self.conv2, self.bn2 = conv(2, 4, 3, stride=4, padding=1), norm(4)
        self.conv3, self.conv4 = conv(4, 3, 3, padding=1), conv(4, 3, 1)
        self.extra = pool(1, 1) if second_pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(torch.relu(self.bn1(self.conv1(x))))
        joined = self.extra(pooled + self.bn2(self.conv2(x)))
        axes = tuple(range(2, 2 + self.dims))
        return self.conv3(torch.relu(joined)).mean(axes) + self.conv4(pooled).mean(axes)


def _stem_chain(dims: int, **options: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, GroupChain, GroupChain]:
    torch.manual_seed(0)
    model = _PooledStem(dims, **options).double()
    for norm in (model.bn1, model.bn2):  # running statistics of their own
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    side = 18 if options.get("ceil_mode") else 16  # the pool's output and the second producer's agree
    x = torch.randn(5, 2, *(side,) * dims, generator=generator, dtype=torch.float64)
    y = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    graph = tg.trace(model, x)
    group = next(site.group for site in tg.find_sites(graph, through=tg.THROUGH_OPTIONS) if site.group.name == "conv1")
    linearised = GroupChain(model, graph, group)
    linearised.selection = None  # the general path, for reference
    return model, x, y, GroupChain(model, graph, group), linearised


@pytest.mark.parametrize("dims, ceil_mode", [(2, False), (1, True)])
def test_a_chain_through_one_max_pool_is_diagonal_selection_diagonal(dims: int, ceil_mode: bool) -> None:
    """Its products, for every channel and for a few, are those of the linearised chain, and transposes."""
    model, x, y, chain, linearised = _stem_chain(dims, ceil_mode=ceil_mode)
    assert chain.selection == "pool"
    with Recorder(model, chain.source, [chain.tap()]) as recorder:
        capture = run_batch(model, recorder, x, y, squared_error)
    capture.gradients.clear()
    generator = torch.Generator().manual_seed(2)
    size = chain.group.size
    v = torch.randn(size, chain.outbound_size, generator=generator, dtype=torch.float64)
    u = torch.randn(size, chain.inbound_size, generator=generator, dtype=torch.float64)
    ours, reference = linear_operators(chain, [capture], 5), linear_operators(linearised, [capture], 5)
    for channels in (torch.arange(size), torch.tensor([0, 2, 3])):
        assert relative(ours[0](v[channels], channels), reference[0](v[channels], channels)) <= 1e-12
        assert relative(ours[1](u[channels], channels), reference[1](u[channels], channels)) <= 1e-12
        left = float((ours[0](v[channels], channels) * u[channels]).sum())
        right = float((v[channels] * ours[1](u[channels], channels)).sum())
        assert left == pytest.approx(right, rel=1e-12)


def test_a_chain_with_another_pool_is_left_to_the_linearised_path() -> None:
    model, x, y, chain, _ = _stem_chain(2, second_pool=True)
    assert chain.selection is None
    assert not all(chain.diagonal[i][j] for i in range(2) for j in range(2) if chain.reach[i][j])


@pytest.mark.parametrize("dims, stride, padding, dilation", [
    (2, 1, 1, 1), (2, 2, 1, 1), (2, (2, 1), (0, 2), (1, 2)), (1, 3, 2, 2), (3, 2, 1, 1),
])
def test_a_convolutions_error_read_back_per_kernel_offset_gives_its_input_gradient(dims, stride, padding,
                                                                                  dilation) -> None:
    """conv_errors: sum over (v, o) of E[(n, s), (v, o)] W[v, c, o] is the conv's input gradient at (n, c, s)."""
    from tunnelgraph.statistics.chain import conv_errors

    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](3, 4, 3, stride, padding, dilation).double()
    x = torch.randn(2, 3, *([7] * dims), dtype=torch.float64, requires_grad=True)
    out = conv(x)
    error = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, error)
    read = conv_errors(conv, error, x.shape)  # (N * positions, V * prod(kernel))
    weight = conv.weight.detach().transpose(0, 1).reshape(3, -1)  # (C, V * prod(kernel)), lambda's order
    expected = grad.detach().movedim(1, -1).reshape(-1, 3)  # (N * positions, C)
    assert relative(read @ weight.T, expected) <= 1e-13


@pytest.mark.parametrize("dims, stride, padding, dilation, size", [
    (2, 1, 1, 1, 7), (2, 2, 1, 1, 7), (2, 2, 1, 1, 8), (2, (2, 1), (0, 2), (1, 2), 7), (1, 3, 2, 2, 11),
    (3, 2, 1, 1, 5), (2, 4, 0, 1, 9),
])
def test_a_strided_convolutions_read_back_error_splits_into_phase_blocks(dims, stride, padding, dilation,
                                                                          size) -> None:
    """_phases: one block per phase (input position modulo the stride) holds every non-zero of conv_errors'
    result, the blocks' rows partition the rows they cover, conv_errors reads each block directly, and
    _phase_entries counts the blocks' entries."""
    from tunnelgraph.statistics.chain import _phase_entries, _phases, conv_errors

    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](3, 4, 3, stride, padding, dilation).double()
    x = torch.randn(2, 3, *([size] * dims), dtype=torch.float64)
    error = torch.randn_like(conv(x))
    read = conv_errors(conv, error, x.shape)
    phases = _phases(conv, x.shape, read.device)
    if all(s == 1 for s in conv.stride):
        assert phases == [] and _phase_entries(conv, x.shape) == read.numel()
        return
    left = read.clone()
    per_sample, kernel = x[0, 0].numel(), read.shape[1] // 4
    covered = torch.cat([where for where, _ in phases])
    assert covered.unique().numel() == covered.numel()  # each position in one phase
    kept = 0
    for where, through in phases:
        rows = (torch.arange(2).unsqueeze(1) * per_sample + where).reshape(-1)
        columns = (torch.arange(4).unsqueeze(1) * kernel + through).reshape(-1)
        block = conv_errors(conv, error, x.shape, where, through)
        assert torch.equal(block, read[rows][:, columns])
        left[rows.unsqueeze(1), columns] = 0
        kept += block.numel()
    assert torch.count_nonzero(left) == 0 and torch.count_nonzero(read) > 0
    assert _phase_entries(conv, x.shape) == kept < read.numel()


@pytest.mark.parametrize("name", ["resnet_stack", "conv_stride_pad_dilation", "conv1d", "inception_concat",
                                  "paper_deep_cnn", "global_mean_pool", "residual_net_3", "resnet_downsample"])
def test_gram_factors_give_a_transposed_times_a(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """GramFactors' B (dense products with factors every channel shares) has A's Gram matrix: B^T (B v) is
    A^T (A v) through the layers and ||B v|| is ||A v||, for every group it accepts (those that reach a linear head
    through a global pool included), on all channels and on every other one; its gram is B (B^T y), made in
    slices of rows, and B has no more rows than the samples times the producers."""
    entry = ZOO_BY_NAME[name]
    model = entry.build().double().eval()
    x, y = regression_data(model, entry, torch.float64, batches=1, batch=5)[0]
    graph = tg.trace(model, x)
    groups = {site.group.name: site.group for site in tg.find_sites(graph, through=tg.THROUGH_OPTIONS)
              if not site.group.unmeasured and not site.group.self_consumers}
    generator = torch.Generator().manual_seed(0)
    accepted = heads = strided = 0
    for group in groups.values():
        chain = GroupChain(model, graph, group)
        if not chain.gram_eligible():
            continue
        accepted += 1
        heads += any(any(row) for row in chain.reduced)
        strided += any(spec.conv_dims and max(spec.module.stride) > 1 for spec in chain.consumers)
        with Recorder(model, chain.source, [chain.tap()]) as recorder:
            capture = run_batch(model, recorder, x, y, squared_error)
        outputs = [capture.outputs[spec.node] for spec in chain.producers]
        factors = chain.gram_factors([capture.inputs[spec.node] for spec in chain.producers],
                                     [capture.errors[spec.node] for spec in chain.consumers],
                                     [capture.shapes[spec.node] for spec in chain.consumers],
                                     chain.diagonal_scales(outputs, capture.externals))
        product, transposed = linear_operators(chain, [capture], capture.batch)
        for channels in (torch.arange(group.size), torch.arange(0, group.size, 2)):
            v = torch.randn(channels.numel(), chain.outbound_size, generator=generator, dtype=torch.float64)
            reduced = factors.reduce(v, channels)
            applied = product(v, channels)
            assert relative(factors.lift(reduced, channels), transposed(applied, channels)) <= 1e-12, group.name
            assert relative(reduced.norm(dim=1), applied.norm(dim=1)) <= 1e-12, group.name
            short = torch.randn(channels.numel(), factors.size, generator=generator, dtype=torch.float64)
            with monkeypatch.context() as patch:
                patch.setattr(chain_module, "GRAM_SLICE", 3 * chain.outbound_size * 8)  # slices of 3 rows
                sliced = factors.gram(short, channels)
            whole = factors.reduce(factors.lift(short, channels), channels)
            assert relative(sliced, whole) <= 1e-12, group.name
        assert factors.size <= len(chain.producers) * outputs[0].shape[0] * math.prod(outputs[0].shape[2:])
    assert accepted, f"{name}: no group takes GramFactors"
    assert heads or name not in ("resnet_stack", "global_mean_pool", "residual_net_3", "resnet_downsample"), name
    assert strided or name not in ("conv1d", "resnet_downsample"), name  # read-back errors in phase blocks


def test_the_root_of_a_producers_gram_matrix() -> None:
    """_root(P) is R with R R^T = P P^T and no more columns than P has rows: P itself where it has no more columns
    than rows; a triangular Cholesky factor where P P^T is definite; where it is singular (rows of zeros), its
    rank of columns."""
    generator = torch.Generator().manual_seed(5)
    tall = torch.randn(40, 9, generator=generator)
    assert _root(tall) is tall
    wide = torch.randn(12, 50, generator=generator, dtype=torch.float64)
    factor = _root(wide)
    assert factor.shape == (12, 12) and torch.equal(factor, factor.tril())
    assert relative(factor @ factor.T, wide @ wide.T) <= 1e-12
    silent = wide.clone()
    silent[[1, 4, 7]] = 0  # samples and positions where the producer's input is zero: P P^T exactly singular
    factor = _root(silent)
    assert factor.shape == (12, 9)
    assert relative(factor @ factor.T, silent @ silent.T) <= 1e-12
    repeated = torch.cat((wide[:5], wide[:5], wide[:2]))  # rank 5 (a Cholesky factor may still be found)
    factor = _root(repeated)
    assert factor.shape[0] == 12 and 5 <= factor.shape[1] <= 12
    assert relative(factor @ factor.T, repeated @ repeated.T) <= 1e-12
    assert _root(torch.zeros(6, 20)).shape == (6, 0)
