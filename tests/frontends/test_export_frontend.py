"""The torch.export frontend: the same IR as fx, and the fallback where fx cannot trace."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tunnelgraph as tg
from tunnelgraph.analysis.groups import THROUGH_OPTIONS, channel_groups
from tunnelgraph.errors import TraceError
from tunnelgraph.frontends.export import exported_module
from zoo import SPECIAL, TRACEABLE, ZooEntry, example_input


def _layout(graph: tg.Graph) -> set[tuple[object, ...]]:
    """Every group as (name, size, legal, its parameter entries): what rewrites act on."""
    return {
        (group.name, group.size, group.legal, tuple(sorted((s.param, s.role, s.axis, s.block) for s in group.slices)))
        for group in channel_groups(graph, THROUGH_OPTIONS)
    }


@pytest.mark.parametrize("entry", TRACEABLE + SPECIAL, ids=lambda e: e.name)
def test_export_gives_the_groups_fx_gives(entry: ZooEntry) -> None:
    torch.manual_seed(0)
    model = entry.build()
    x = example_input(entry)
    exported = tg.trace(model, x, frontend="export")
    assert exported.frontend == "export" and tg.trace(model, x).frontend == "fx"
    traced = _layout(tg.trace(model, x, frontend="fx"))
    if entry.name == "hardcoded_view":
        # x.view(-1, 4608): fx patches the literal on rewrite; the capture's numbers cannot follow a
        # rewrite into the forward, so that group is blocked there, with the reason, and only that one
        blocked = {group for group in channel_groups(exported, THROUGH_OPTIONS) if not group.legal}
        (frozen,) = [group for group in blocked if any("torch.export capture" in r for r in group.reasons)]
        traced = {g if g[0] != frozen.name else (g[0], g[1], False, g[3]) for g in traced}
    assert _layout(exported) == traced


class SamePadConv(nn.Conv2d):
    """timm's Conv2dSame: "same" padding computed from the input's size in forward (fx cannot trace it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = SamePadConv(3, 6, 3, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.block = SamePadConv(6, 5, 3)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.bn(self.stem(x)))
        h = torch.relu(self.block(h))
        return self.fc(h.mean((2, 3)))


def _same_net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = SameNet().double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model, torch.randn(2, 3, 9, 9, dtype=torch.float64)


def test_fx_cannot_trace_shape_control_flow_and_export_takes_over() -> None:
    model, x = _same_net()
    with pytest.raises(TraceError, match="torch.fx could not trace"):
        tg.trace(model, x, frontend="fx")
    graph = tg.trace(model, x)
    assert graph.frontend == "export"
    layers = [(node.module, node.op) for node in graph if node.kind == tg.ir.OpKind.PARAMETRIC]
    assert layers == [("stem", "conv"), ("block", "conv"), ("fc", "linear")]
    pads = [node for node in graph if node.op == "pad"]
    assert len(pads) == 2


def test_sites_of_an_exported_model_rewrite_its_own_module_exactly() -> None:
    model, x = _same_net()
    model = tg.perturbed(model, generator=torch.Generator().manual_seed(3))
    sites = tg.find_sites(model, x, through=("batchnorm", "pooling"))
    assert [site.group_name for site in sites] == ["stem"] * 6 + ["block"] * 5
    generator = torch.Generator().manual_seed(4)
    for site in sites:
        opened = tg.rewrite(model, site, lam=torch.rand(site.outbound_size, generator=generator, dtype=torch.float64))
        assert type(opened) is SameNet
        if site.group_name == "stem":
            assert opened.stem.out_channels == 7 and opened.bn.num_features == 7 and opened.block.in_channels == 7
        else:
            assert opened.block.out_channels == 6 and opened.fc.in_features == 6
        report = tg.verify(model, opened, x)
        assert report.passed and report.max_rel <= 1e-10, report


def test_the_groups_of_an_exported_model_are_left_out_of_the_statistics() -> None:
    from tunnelgraph.statistics.engine import measurable

    model, x = _same_net()
    sites = tg.find_sites(model, x, through=("batchnorm",))
    assert not any(measurable(site) for site in sites)
    assert "called as the function conv2d" in sites[0].group.unmeasured[0]


def test_a_model_neither_capture_takes_names_both_causes() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # a branch on values: neither capture can specialise it away
                return self.fc(x)
            return x

    with pytest.raises(TraceError, match="torch.fx could not trace.*torch.export could not capture"):
        tg.trace(DataDependent(), torch.ones(2, 3))


def test_export_leaves_the_model_as_it_was() -> None:
    model, x = _same_net()
    model.train()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    tg.trace(model, x, frontend="export")
    assert model.training and all(module.training for module in model.modules())
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


def test_operators_without_a_counterpart_stay_and_block_by_name() -> None:
    class Cumulative(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.cumsum(self.a(x), dim=1))

    module = exported_module(Cumulative().eval(), (torch.ones(2, 3),))
    targets = [str(node.target) for node in module.graph.nodes if node.op == "call_function"]
    assert "aten.cumsum.default" in targets and "<built-in function linear>" in targets
    (group,) = [g for g in channel_groups(tg.trace(Cumulative(), torch.ones(2, 3), frontend="export")) if g.name == "a"]
    assert "cumsum" in group.reasons[0]


def test_aten_transposes_become_the_torch_functions_the_translator_reads() -> None:
    """permute, transpose, movedim, swapaxes, t, mT and numpy_T (``x.T``): none stays an ATen operator."""

    class Moves(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            m = x[0, 0]
            return (x.permute(0, 2, 3, 1), x.transpose(1, -1), x.movedim((1, 2), (3, 0)), torch.moveaxis(x, 1, 3),
                    x.swapaxes(1, 2), torch.swapdims(x, 2, 3), x.mT, m.T, m.t())

    module = exported_module(Moves().eval(), (torch.randn(2, 3, 4, 5),))
    targets = [node.target for node in module.graph.nodes if node.op == "call_function"]
    assert [str(t) for t in targets if isinstance(t, torch._ops.OpOverload)] == ["aten.select.int"] * 2  # m = x[0, 0]
    assert {torch.permute, torch.transpose, torch.movedim, torch.t} <= set(targets)
    expected = Moves()(x := torch.randn(2, 3, 4, 5))
    assert all(torch.equal(a, b) for a, b in zip(module(x), expected))


def test_bad_frontend_arguments_are_named() -> None:
    model, x = _same_net()
    with pytest.raises(ValueError, match="frontend must be"):
        tg.trace(model, x, frontend="jit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="options of the fx frontend"):
        tg.trace(model, x, frontend="export", concrete_args={})


class ElidedSlice(nn.Module):
    """``x[:, :4]`` of a 4-unit layer: a no-op at the captured shapes, so torch.export leaves no node."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.c = nn.Linear(3, 5)
        self.d = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))[:, :4]) + self.d(torch.relu(self.c(x)))


def test_a_group_whose_trial_clone_changes_the_function_is_refused_with_the_reason() -> None:
    model = ElidedSlice().train()
    x = torch.randn(6, 3)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    graph = tg.trace(model, x, frontend="export")
    assert all(module.training for module in model.modules())  # the trial clones ran on a copy
    assert set(graph.refused) == {"a"}
    groups = {g.name: g for g in tg.analyze(graph).groups}
    assert not groups["a"].legal and "trial clone" in groups["a"].reasons[-1]
    assert groups["c"].legal
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    fx_groups = {g.name: g for g in tg.analyze(model, x).groups}  # fx sees the slice itself
    assert not fx_groups["a"].legal and fx_groups["c"].legal and tg.trace(model, x).refused == {}
