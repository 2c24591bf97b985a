"""No entry point changes the user's model: parameters, buffers, training flags, bit for bit.

Every public function runs over every zoo model, in training mode (as
models are created) and in eval mode, including calls that fail. Only
``inplace=True`` may change a model.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tunnelgraph as tg
from tunnelgraph.rewrite import edits
from tunnelgraph.runtime import preserved
from tunnelgraph.statistics.engine import measurable as statistics_defined
from tunnelgraph.train import TunnelController
from zoo import SPECIAL, ZOO, ZOO_BY_NAME, ZooEntry, example_input

MODELS = ZOO + SPECIAL

THROUGH = tg.THROUGH_OPTIONS


class State:
    """Everything of a model that a call must leave as it was."""

    def __init__(self, model: nn.Module) -> None:
        self.parameters = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
        self.values = {n: p.detach().clone() for n, p in self.parameters.items()}
        self.requires_grad = {n: p.requires_grad for n, p in self.parameters.items()}
        self.grads = {n: p.grad for n, p in self.parameters.items()}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)}
        self.flags = [(n, m.training) for n, m in model.named_modules(remove_duplicate=False)]
        self.hooks = _hooks(model)

    def differences(self, model: nn.Module) -> list[str]:
        found = []
        parameters = dict(model.named_parameters(remove_duplicate=False))
        if parameters.keys() != self.parameters.keys():
            return [f"parameter names {sorted(parameters.keys() ^ self.parameters.keys())}"]
        for name, tensor in parameters.items():
            if tensor is not self.parameters[name]:
                found.append(f"parameter {name} replaced")
            elif not _same(tensor, self.values[name]):
                found.append(f"parameter {name} changed")
            if tensor.requires_grad != self.requires_grad[name]:
                found.append(f"parameter {name} requires_grad changed")
            if tensor.grad is not self.grads[name]:
                found.append(f"parameter {name} .grad changed")
        buffers = dict(model.named_buffers(remove_duplicate=False))
        if buffers.keys() != self.buffers.keys():
            return found + [f"buffer names {sorted(buffers.keys() ^ self.buffers.keys())}"]
        found += [f"buffer {name} changed" for name, tensor in buffers.items() if not _same(tensor, self.buffers[name])]
        flags = [(n, m.training) for n, m in model.named_modules(remove_duplicate=False)]
        found += [f"training flag of '{a[0]}' changed" for a, b in zip(flags, self.flags) if a != b]
        if _hooks(model) != self.hooks:
            found.append("hooks left on the model")
        return found


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def _hooks(model: nn.Module) -> int:
    """Hooks on the model's modules and on its parameters (tensor hooks, as a backward pass's may be)."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    ) + sum(len(p._backward_hooks or {}) for p in model.parameters())


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


def _data(model: nn.Module, entry: ZooEntry) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = example_input(entry, batch=4)
    with preserved(model, train=False), torch.no_grad():
        y = torch.randn_like(model(x))
    return [(x, y), (example_input(entry, batch=4), y)]


def _calls(model: nn.Module, entry: ZooEntry, tmp_path: Any) -> list[tuple[str, Callable[[], Any], bool]]:
    """(name, call, whether it is expected to raise) for every entry point."""
    x = example_input(entry)
    data = _data(model, entry)
    nan_data = [(data[0][0] * float("nan"), data[0][1])]
    calls: list[tuple[str, Callable[[], Any], bool]] = [
        ("trace", lambda: tg.trace(model, x), not entry.traceable),
        ("find_sites", lambda: tg.find_sites(model, x, through=THROUGH), not entry.traceable),
        ("analyze", lambda: tg.analyze(model, x, through=THROUGH), not entry.traceable),
        ("verify", lambda: tg.verify(model, model, x), False),
        ("verify against a copy", lambda: tg.verify(model, copy.deepcopy(model), x), False),
        ("verify with inputs of the wrong shape", lambda: tg.verify(model, model, _widened(x)), True),
        ("rewrite an unknown site name", lambda: tg.rewrite(model, "nowhere[0]", 0.5, example_inputs=x), True),
        ("export_onnx", lambda: tg.export_onnx(model, x, tmp_path / f"{entry.name}.onnx"), False),
    ]
    if not entry.traceable:
        return calls
    calls += [
        ("analyze with data", lambda: tg.analyze(model, x, through=THROUGH, data=data, progress=False), False),
        ("reduce", lambda: tg.reduce(model, x, through=THROUGH), False),
        ("reduce with data", lambda: tg.reduce(model, x, data=data, through=THROUGH), False),
    ]
    sites = tg.find_sites(model, x, through=THROUGH)
    measurable = [site for site in sites if statistics_defined(site)]
    unmeasured = [site for site in sites if site.group.unmeasured]
    if not sites:
        calls.append(("open_tunnels without sites", lambda: tg.open_tunnels(model, data, _loss, progress=False), True))
        return calls
    site = sites[len(sites) // 2]
    rng = np.random.default_rng(0)
    lam = rng.uniform(-0.5, 1.5, site.outbound_size)
    calls += [
        ("rewrite", lambda: tg.rewrite(model, site, lam), False),
        ("rewrite by name", lambda: tg.rewrite(model, site.name, 0.3, example_inputs=x, through=THROUGH), False),
        ("rewrite with a wrong lambda", lambda: tg.rewrite(model, site, np.ones(site.outbound_size + 1)), True),
        ("merge", lambda: tg.merge(model, site, (site.channel + 1) % site.group.size), site.group.size < 2),
        ("merge outside the group", lambda: tg.merge(model, site, site.group.size + 5), True),
        ("reorganize", lambda: tg.reorganize(model, merge=(site, (site.channel + 1) % site.group.size),
                                             clone=(site.channel + 1) % site.group.size, lam=0.4),
         site.group.size < 2),
        ("reorganize from data", lambda: tg.reorganize_from_data(model, clone=site, lam=0.4, data=data, loss_fn=_loss),
         site.group.size < 3 or bool(site.group.unmeasured)),  # units of functional layers are not measured
        ("apply_edit", lambda: tg.apply_edit(model, site.group, edits.clone(site.group.size, site.channel, 0.2)),
         False),
    ]
    if unmeasured:  # a layer called as a function: refused with the reason, and nothing changes
        calls.append(
            ("a_statistics where not measured", lambda: tg.a_statistics(model, unmeasured[:1], data, _loss,
                                                                        progress=False), True)
        )
    if measurable:
        chosen = measurable[:: max(1, len(measurable) // 3)][:3]
        calls += [
            ("a_statistics", lambda: tg.a_statistics(model, chosen, data, _loss, progress=False), False),
            ("a_statistics matrix-free", lambda: tg.a_statistics(model, chosen[:1], data, _loss, progress=False,
                                                                 method="matrix_free"), False),
            ("a_statistics with NaN data", lambda: tg.a_statistics(model, chosen, nan_data, _loss, progress=False),
             True),
            ("a_statistics store=False", lambda: tg.a_statistics(model, chosen, data, _loss, progress=False,
                                                                 method="matrix_free", store=False), False),
            ("a_statistics store=False with NaN data", lambda: tg.a_statistics(
                model, chosen, nan_data, _loss, progress=False, method="matrix_free", store=False), True),
            ("open_tunnels", lambda: tg.open_tunnels(model, data, _loss, k=2, through=THROUGH, progress=False), False),
            ("open_tunnels with NaN data", lambda: tg.open_tunnels(model, nan_data, _loss, through=THROUGH,
                                                                   progress=False), True),
            ("a tunnel controller with a site name that is none", lambda: TunnelController(
                model, torch.optim.SGD(model.parameters(), lr=0.1), _loss, data, sites=[chosen[0].name, "nowhere[0]"],
                through=THROUGH, open_at=[1]), True),
        ]
        default = {site.group_name: site.group for site in tg.find_sites(model, x)}
        if any(default.get(site.group_name) != site.group for site in chosen):  # refused before anything is measured
            calls.append(("open_tunnels with sites of other through= options", lambda: tg.open_tunnels(
                model, data, _loss, k=2, sites=chosen, progress=False), True))
    return calls


def _widened(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its second and last axes doubled: no zoo model accepts it."""
    return x.repeat(1, 2, *([1] * (x.dim() - 3)), *([2] if x.dim() > 2 else []))


def _loop(model: nn.Module, data: list) -> None:
    """What a user's training loop does to the model: forwards (batch norm updates its statistics)."""
    torch.manual_seed(0)
    for x, y in data:
        loss = _loss(model(x), y)
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("entry", MODELS, ids=[e.name for e in MODELS])
def test_no_entry_point_changes_the_model(entry: ZooEntry, mode: str, tmp_path: Any) -> None:
    model = entry.build().train(mode == "train")
    for name, call, fails in _calls(model, entry, tmp_path):
        before = State(model)
        try:
            call()
            raised = None
        except Exception as error:  # noqa: BLE001 - any failure must leave the model as it was too
            raised = error
        assert before.differences(model) == [], f"{name} changed {entry.name} ({mode})"
        if fails:
            assert raised is not None, f"{name} did not fail"
        else:
            assert raised is None, f"{name} raised {raised!r}"


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("entry", [e for e in MODELS if e.traceable], ids=[e.name for e in MODELS if e.traceable])
def test_a_training_loop_with_a_tracker_ends_as_the_same_loop_without_one(entry: ZooEntry, mode: str) -> None:
    model = entry.build().train(mode == "train")
    data = _data(model, entry)
    # dropout in training mode is refused by the tracker (its mask cannot be replayed)
    through = tuple(option for option in THROUGH if option != "dropout")
    sites = [s for s in tg.find_sites(model, data[0][0], through=through) if statistics_defined(s)]
    if not sites:
        pytest.skip(f"{entry.name} has no sites to track")
    twin = copy.deepcopy(model)
    _loop(twin, data)
    before = State(model)
    tracker = tg.StatisticsTracker(model, sites[:3], example_inputs=data[0][0])
    _loop(model, data)
    tracker.statistics()
    tracker.close()
    after = State(twin)
    after.parameters = dict(model.named_parameters(remove_duplicate=False))  # the objects must stay the model's own
    after.grads, after.hooks = before.grads, before.hooks
    assert after.differences(model) == []


def test_functional_batch_norm_traced_in_training_mode_keeps_its_running_statistics() -> None:
    """timm's BatchNormAct2d calls F.batch_norm with the training flag that fx bakes into the trace."""
    entry = ZOO_BY_NAME["functional_batchnorm"]
    model = entry.build().train()
    before = State(model)
    graph = tg.trace(model, example_input(entry))
    assert [node.module for node in graph if node.op == "batchnorm"] == ["bn1", "bn2"]
    assert before.differences(model) == []


def test_a_forward_that_modifies_a_parameter_is_reported_by_name() -> None:
    class Drifting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                self.fc.bias.add_(1.0)
            return self.fc(x)

    with pytest.raises(tg.TunnelgraphError, match="Linear.bias"):
        tg.find_sites(Drifting(), torch.randn(2, 3))


def test_inplace_rewrite_is_the_one_call_that_changes_the_model() -> None:
    entry = ZOO_BY_NAME["paper_cnn"]
    model = entry.build()
    x = example_input(entry)
    before = State(model)
    site = tg.find_sites(model, x)[2]
    result = tg.rewrite(model, site, 0.5, inplace=True)
    assert result is model and before.differences(model)
