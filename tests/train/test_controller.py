"""The controller inside a plain training loop: open, close, reorganise, at given steps or at a plateau."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tunnelgraph as tg
from tunnelgraph.datasets import teacher_task
from tunnelgraph.models import paper_cnn, residual_net
from tunnelgraph.train import PlateauDetector, TunnelController, TunnelEvent


def _loader(samples: int = 256, batch: int = 64, shape: tuple[int, ...] = (1, 28, 28), shuffle: bool = False,
            seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(teacher_task(samples, seed=seed, image_shape=shape), batch_size=batch,
                                       shuffle=shuffle)


def _train(controller: TunnelController, optimizer: torch.optim.Optimizer, loader: Any, steps: int,
           seen: list[torch.Tensor] | None = None,
           after_step: Callable[[int], None] | None = None) -> list[TunnelEvent]:
    events: list[TunnelEvent] = []
    step = 0
    while step < steps:
        for x, y in loader:
            if seen is not None:
                seen.append(y)
            loss = F.cross_entropy(controller.model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            events += controller.step(loss)
            step += 1
            if after_step is not None:
                after_step(step)
            if step == steps:
                break
    return events


def test_scheduled_tunnels_open_and_close_in_a_plain_loop() -> None:
    torch.manual_seed(0)
    model = paper_cnn()
    loader = _loader()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    controller = TunnelController(model, optimizer, F.cross_entropy, loader, k=2, open_at=[2], close_after=3,
                                  batches=2)
    filters: dict[int, int] = {}
    events = _train(controller, optimizer, loader, 7,
                    after_step=lambda step: filters.__setitem__(step, model.conv.weight.shape[0]))
    assert [(e.step, e.action) for e in events] == [(2, "open"), (5, "close")]
    assert filters == {1: 8, 2: 10, 3: 10, 4: 10, 5: 8, 6: 8, 7: 8}
    opened, closed = events
    assert opened.channels == (8, 9) and len(opened.sigma) == 2 and opened.sigma[0] >= opened.sigma[1] > 0
    assert opened.max_rel_change is not None and opened.max_rel_change < 1e-4  # float32 rounding
    assert opened.loss_after == pytest.approx(opened.loss_before, rel=1e-5)
    assert set(closed.sites) == {"conv[8]", "conv[9]"}
    # the optimizer is the user's object and optimises the model's own parameters
    assert controller.model is model
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == [id(p) for p in model.parameters()]
    assert [(r.old_size, r.new_size) for r in tg.rewrite_records(model)] == [(8, 9), (9, 10), (10, 9), (9, 8)]
    assert controller.summary()["events"][0]["action"] == "open"


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam])
def test_three_open_close_cycles_on_a_residual_network_with_batch_norm(optimizer_class: Any) -> None:
    torch.manual_seed(1)
    model = residual_net(blocks=2, width=6, in_channels=1, classes=10)
    loader = _loader(shape=(1, 12, 12), batch=32)
    optimizer = optimizer_class(model.parameters(), lr=0.01)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    controller = TunnelController(model, optimizer, F.cross_entropy, loader, k=2, open_at=[2, 8, 14],
                                  close_after=3, batches=2, through=("batchnorm", "pooling"))
    events = _train(controller, optimizer, loader, 20)
    assert [e.action for e in events] == ["open", "close"] * 3
    assert {name: p.shape for name, p in model.named_parameters()} == shapes
    assert all(e.max_rel_change is not None and e.max_rel_change < 1e-4 for e in events if e.action == "open")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_loop_draws_the_same_batches_with_and_without_a_controller() -> None:
    def run(with_controller: bool) -> list[torch.Tensor]:
        torch.manual_seed(2)
        model = paper_cnn()
        loader = _loader(shuffle=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        open_at = [1, 3] if with_controller else [10**9]
        controller = TunnelController(model, optimizer, F.cross_entropy, loader, open_at=open_at, batches=2)
        seen: list[torch.Tensor] = []
        _train(controller, optimizer, loader, 8, seen=seen)
        return seen

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False), strict=True))


def test_a_plateau_opens_a_tunnel_once_with_max_events() -> None:
    torch.manual_seed(3)
    model = paper_cnn()
    loader = _loader()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)  # the loss hardly moves: a plateau
    controller = TunnelController(model, optimizer, F.cross_entropy, loader, detector=PlateauDetector(window=4),
                                  max_events=1, batches=1)
    events = _train(controller, optimizer, loader, 12)
    assert [(e.step, e.action, e.reason) for e in events] == [(4, "open", "plateau")]
    assert model.conv.weight.shape[0] == 9


def test_a_reorganisation_keeps_every_shape_and_reports_its_change() -> None:
    torch.manual_seed(4)
    model = paper_cnn()
    loader = _loader()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    shapes = [p.shape for p in model.parameters()]
    controller = TunnelController(model, optimizer, F.cross_entropy, loader, action="reorganize", k=2,
                                  open_at=[2], batches=2)
    events = _train(controller, optimizer, loader, 4)
    assert [(e.step, e.action) for e in events] == [(2, "reorganize")]
    assert [p.shape for p in model.parameters()] == shapes
    assert events[0].max_rel_change is not None and events[0].loss_after is not None
    # the paper's order: merge 2 pairs (8 -> 6 filters), then open 2 tunnels (6 -> 8)
    assert [(r.old_size, r.new_size) for r in tg.rewrite_records(model)] == [(8, 7), (7, 6), (6, 7), (7, 8)]
    event = events[0]
    assert len(event.merged) == 2 and len(event.sites) == 2 and len(event.sigma) == 2
    cloned = {int(name[5:-1]) for name in event.sites}
    touched = [int(part.split("[")[1].split("]")[0]) for pair in event.merged for part in pair.split(" -> ")]
    assert len(set(touched)) == 4 and not cloned & set(touched)  # disjoint pairs, never a cloned unit


def test_statistics_from_a_tracker_open_the_same_kind_of_tunnel() -> None:
    torch.manual_seed(5)
    model = paper_cnn()
    loader = _loader()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller = TunnelController(model, optimizer, F.cross_entropy, loader, open_at=[3], close_after=2, track=True)
    events = _train(controller, optimizer, loader, 6)
    controller.close()
    assert [e.action for e in events] == ["open", "close"]
    assert events[0].sigma[0] > 0
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_random_lambda_is_reproducible_with_a_generator() -> None:
    def weights() -> torch.Tensor:
        torch.manual_seed(6)
        model = paper_cnn()
        loader = _loader()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        controller = TunnelController(model, optimizer, F.cross_entropy, loader, lam="random", t=0.5,
                                      open_at=[1], generator=torch.Generator().manual_seed(9))
        _train(controller, optimizer, loader, 2)
        return model.fc.weight.detach().clone()

    assert torch.equal(weights(), weights())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "nothing would ever happen"),
        ({"open_at": [1], "k": 0}, "k must be a positive"),
        ({"open_at": [1], "lam": "best"}, "lam must be"),
        ({"open_at": [1], "action": "reorganize", "close_after": 3}, "nothing to close"),
        ({"open_at": [-1]}, "negative steps"),
        ({"open_at": [1], "batches": 0}, "batches must be"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], message: str) -> None:
    model = paper_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        TunnelController(model, optimizer, F.cross_entropy, _loader(), **kwargs)


def test_a_detector_needs_the_loss() -> None:
    model = paper_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller = TunnelController(model, optimizer, F.cross_entropy, _loader(), detector=PlateauDetector())
    with pytest.raises(ValueError, match="pass the step's loss"):
        controller.step()


def test_a_model_without_sites_gets_a_clear_error_when_the_controller_is_made() -> None:
    """Not at the first event, which may come hours into training."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no site to open"):
        TunnelController(model, optimizer, F.cross_entropy, _loader(), open_at=[1])


def test_site_names_that_are_no_site_are_refused_when_the_controller_is_made() -> None:
    model = paper_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"sites=\['conv\[99\]', 'head\[0\]'\] name no site of this model under "
                                         r"the default rules .*tg.find_sites"):
        TunnelController(model, optimizer, F.cross_entropy, _loader(), sites=["conv[3]", "conv[99]", "head[0]"],
                         open_at=[1])
    with pytest.raises(ValueError, match="no site to open in this model among sites="):
        TunnelController(model, optimizer, F.cross_entropy, _loader(), sites=["head[0]"], open_at=[1])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    controller = TunnelController(model, optimizer, F.cross_entropy, _loader(), sites=["conv[3]"], open_at=[1])
    [event] = _train(controller, optimizer, _loader(), 1)
    assert event.sites == ("conv[3]",)


def test_hooks_and_a_compiled_wrapper_keep_working_after_the_controller_rewrites() -> None:
    torch.manual_seed(7)
    model = paper_cnn()
    calls = {"forward": 0, "tensor": 0}
    model.conv.register_forward_hook(lambda module, args, output: calls.__setitem__("forward", calls["forward"] + 1))
    model.conv.weight.register_hook(lambda grad: calls.__setitem__("tensor", calls["tensor"] + 1))
    compiled = torch.compile(model, backend="eager")
    loader = _loader()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller = TunnelController(compiled, optimizer, F.cross_entropy, loader, open_at=[2], close_after=2, batches=1)
    seen: list[tuple[int, int]] = []
    events = _train(controller, optimizer, loader, 5,
                    after_step=lambda step: seen.append((calls["forward"], calls["tensor"])))
    assert [e.action for e in events] == ["open", "close"]
    assert controller.model is compiled  # a compiled wrapper recompiles for the new shapes by itself
    # both hooks fire at every training step, before, while and after the tunnels are open
    assert all(b[0] > a[0] and b[1] > a[1] for a, b in zip(seen, seen[1:]))
    assert model.conv.weight.grad is not None and model.conv.weight.grad.shape == (8, 1, 5, 5)


def test_overlapping_tunnels_close_the_right_channels() -> None:
    """Two openings before the first close: the later clones shift down when the earlier ones go."""
    torch.manual_seed(8)
    model = paper_cnn()
    loader = _loader()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller = TunnelController(model, optimizer, F.cross_entropy, loader, k=2, open_at=[1, 2], close_after=2,
                                  batches=1)
    events = _train(controller, optimizer, loader, 5)
    assert [(e.step, e.action) for e in events] == [(1, "open"), (2, "open"), (3, "close"), (4, "close")]
    # the clones opened at step 2 were channels 10 and 11; after step 3's close they are 8 and 9
    assert events[2].sites == ("conv[9]", "conv[8]") and events[3].sites == ("conv[9]", "conv[8]")
    assert model.conv.weight.shape[0] == 8
    assert all(e.max_rel_change is not None and e.max_rel_change < 1e-3 for e in events)
