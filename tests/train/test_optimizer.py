"""Optimizer surgery: after a rewrite the user's optimizer takes the step the original would have taken."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tunnelgraph as tg
from tunnelgraph.train import update_optimizer
from zoo import ZOO_BY_NAME, example_input

OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
}


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(model, x, y).backward()
        optimizer.step()


def _untouched_entries(record: tg.RewriteRecord, name: str, shape: tuple[int, ...], skip: set[int]) -> torch.Tensor:
    """A mask of the entries of parameter ``name`` (new shape) whose gradient the rewrite leaves alone."""
    mask = torch.ones(shape, dtype=torch.bool)
    for change in record.tensors:
        if change.name != name:
            continue
        for new, old in enumerate(change.copies):
            if old is None or old in skip:
                mask.narrow(change.axis, change.offset + new * change.block, change.block).fill_(False)
    return mask


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("inplace", [False, True], ids=["new_model", "inplace"])
def test_a_step_after_opening_and_closing_equals_the_original_step_on_untouched_entries(kind: str, inplace: bool) -> None:
    torch.manual_seed(0)
    entry = ZOO_BY_NAME["resnet_stack"]
    model = entry.build().double().train()
    x = example_input(entry, torch.float64, batch=8)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    optimizer = OPTIMIZERS[kind](model.parameters())
    _train(model, optimizer, x, y, 3)
    reference = copy.deepcopy(model)
    reference_optimizer = OPTIMIZERS[kind](reference.parameters())
    # load_state_dict keeps the very tensors of a state dict on the same device: copy them first
    reference_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))

    site = tg.find_sites(model, x, through=tg.THROUGH_OPTIONS)[5]
    before = len(tg.rewrite_records(model))
    opened = tg.rewrite(model, site, 0.3, inplace=inplace)
    records = tg.rewrite_records(opened)[before:]
    update_optimizer(optimizer, opened, records, previous=None if inplace else model)
    assert all(p is q for p, q in zip(optimizer.param_groups[0]["params"], opened.parameters()))

    _train(opened, optimizer, x, y, 1)
    _train(reference, reference_optimizer, x, y, 1)
    after, expected = dict(opened.named_parameters()), dict(reference.named_parameters())
    (record,) = records
    checked = 0
    for name, tensor in after.items():
        mask = _untouched_entries(record, name, tuple(tensor.shape), skip={site.channel})
        if tensor.shape == expected[name].shape:
            assert torch.allclose(tensor[mask], expected[name][mask], rtol=1e-9, atol=1e-12), name
        else:  # resized: compare the copied slices with the channels they copy
            change = next(c for c in record.tensors if c.name == name)
            for new, old in enumerate(change.copies):
                if old is None or old == site.channel:
                    continue
                part = tensor.narrow(change.axis, change.offset + new * change.block, change.block)
                source = expected[name].narrow(change.axis, change.offset + old * change.block, change.block)
                assert torch.allclose(part, source, rtol=1e-9, atol=1e-12), (name, new)
        checked += int(mask.sum())
    assert checked > 0


def test_three_open_close_cycles_on_a_batch_norm_resnet_train_without_a_shape_error() -> None:
    torch.manual_seed(0)
    entry = ZOO_BY_NAME["resnet_stack"]
    model = entry.build().train()
    x = example_input(entry, batch=8)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = optimizer
    for cycle in range(3):
        _train(model, optimizer, x, y, 2)
        site = tg.find_sites(model, x, through=tg.THROUGH_OPTIONS)[cycle]
        count = len(tg.rewrite_records(model))
        opened = tg.rewrite(model, site, 0.5)
        update_optimizer(optimizer, opened, tg.rewrite_records(opened)[count:], previous=model)
        _train(opened, optimizer, x, y, 2)
        clone = {s.name: s for s in tg.find_sites(opened, x, through=tg.THROUGH_OPTIONS)}[
            f"{site.group_name}[{site.group.size}]"
        ]
        count = len(tg.rewrite_records(opened))
        closed = tg.merge(opened, clone, into=site.channel, inplace=True)
        update_optimizer(optimizer, closed, tg.rewrite_records(closed)[count:])
        model = closed
    _train(model, optimizer, x, y, 2)
    assert optimizer is first and len(tg.rewrite_records(model)) == 6


def test_clear_mode_resets_the_state_and_a_wrong_model_changes_nothing() -> None:
    entry = ZOO_BY_NAME["mlp_tanh"]
    model = entry.build()
    x = example_input(entry)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, optimizer, x, torch.zeros_like(model(x)), 1)
    site = tg.find_sites(model, x)[0]
    opened = tg.rewrite(model, site, 0.5)
    state_before = {id(p): dict(s) for p, s in optimizer.state.items()}
    with pytest.raises(ValueError, match="previous="):
        update_optimizer(optimizer, opened, tg.rewrite_records(opened))  # forgot previous=
    assert {id(p): dict(s) for p, s in optimizer.state.items()}.keys() == state_before.keys()
    update_optimizer(optimizer, opened, tg.rewrite_records(opened), previous=model, mode="clear")
    assert len(optimizer.state) == 0 and optimizer.param_groups[0]["params"][0] is opened.fc1.weight


def test_the_adam_recipe_clears_the_state_and_lowers_the_learning_rate_for_twenty_steps() -> None:
    entry = ZOO_BY_NAME["mlp_tanh"]
    model = entry.build()
    x = example_input(entry)
    with torch.no_grad():
        y = torch.zeros_like(model(x))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, optimizer, x, y, 2)
    opened = tg.rewrite(model, tg.find_sites(model, x)[0], 0.5)
    update_optimizer(optimizer, opened, tg.rewrite_records(opened), previous=model, mode="adam_recipe")
    assert len(optimizer.state) == 0 and optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    _train(opened, optimizer, x, y, 19)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    _train(opened, optimizer, x, y, 1)
    assert optimizer.param_groups[0]["lr"] == 1e-3
    _train(opened, optimizer, x, y, 1)
    assert optimizer.param_groups[0]["lr"] == 1e-3
