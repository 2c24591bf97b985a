"""Optimizer surgery: the user's own optimizer follows a rewrite of its model.

After a rewrite the model has new shapes (and, unless ``inplace=True``, new
parameter objects); an optimizer built before still holds the old ones, so
``step()`` would update the old tensors or fail on a size mismatch.
:func:`update_optimizer` edits the optimizer in place, so the object the
user's loop holds keeps working:

- its param groups point at the model's parameters, by name;
- per-parameter state (SGD's momentum buffer, Adam's and AdamW's moments,
  any tensor of the parameter's shape) follows each
  :class:`~tunnelgraph.rewrite.passes.TensorChange` of the rewrite records:
  a slice that copies an old channel carries that channel's state, a slice
  that is a new combination (a clone's split outbound weights, a merged
  channel) starts from zero; scalar state (Adam's step count) is kept.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Sequence

import torch
import torch.nn as nn

from tunnelgraph.backends.pytorch import apply_change
from tunnelgraph.errors import RewriteError
from tunnelgraph.rewrite.passes import RewriteRecord, TensorChange

logger = logging.getLogger(__name__)

SurgeryMode = Literal["carry", "clear", "adam_recipe"]
"""``"carry"``: state of unchanged parameters and of kept slices carried, new slices from zero;
``"clear"``: every parameter's state reset (as a freshly built optimizer); ``"adam_recipe"``:
the paper's recipe for Adam after a rewrite: state cleared, then every group's learning rate
divided by 10 for the next 20 steps and restored after them (``recipe_steps``, ``recipe_factor``)."""


def update_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    records: Sequence[RewriteRecord],
    *,
    previous: nn.Module | None = None,
    mode: SurgeryMode = "carry",
    recipe_steps: int = 20,
    recipe_factor: float = 10.0,
) -> None:
    """Make ``optimizer`` (edited in place) optimise the rewritten ``model``.

    Args:
        optimizer: the optimizer the training loop holds, built for the
            model before the rewrites.
        model: the model after the rewrites.
        records: the rewrites done since the optimizer last matched the
            model, oldest first: e.g. ``tg.rewrite_records(model)[n:]``
            where ``n = len(tg.rewrite_records(previous_model))``.
        previous: the model before the rewrites, when they returned a new
            model (``inplace=False``): the optimizer's parameters are named
            through it. With ``inplace=True`` the parameter objects are the
            model's own, so leave it None.
        mode: ``"carry"``, ``"clear"`` or ``"adam_recipe"`` (see
            :data:`SurgeryMode`). The recipe's learning rates come back
            through a step hook after ``recipe_steps`` steps (to the values
            they had when this was called; a scheduler that changes them
            meanwhile is overridden then).

    Raises:
        ValueError: an optimizer parameter is not a parameter of
            ``previous`` (or of ``model``), or ``mode`` is unknown; nothing
            is changed then.
    """
    if mode not in ("carry", "clear", "adam_recipe"):
        raise ValueError(f"mode must be 'carry', 'clear' or 'adam_recipe', got {mode!r}")
    source = previous if previous is not None else model
    names = {id(parameter): name for name, parameter in source.named_parameters()}
    current = dict(model.named_parameters())
    missing = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in names]
    if missing:
        raise ValueError(
            f"{len(missing)} parameter(s) of the optimizer are not parameters of "
            f"{'previous' if previous is not None else 'model'}; pass previous= (the model the optimizer "
            "was built for) when the rewrite returned a new model"
        )
    unknown = [names[id(p)] for group in optimizer.param_groups for p in group["params"] if names[id(p)] not in current]
    if unknown:
        raise ValueError(f"the rewritten model has no parameter(s) {', '.join(unknown)}")
    changes: dict[str, list[TensorChange]] = {}
    for record in records:
        for change in record.tensors:
            changes.setdefault(change.name, []).append(change)
    # every new state first, so that a record that does not fit leaves the optimizer as it was
    states: dict[int, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for old in group["params"]:
            state = optimizer.state.get(old)
            if state is None or mode != "carry":
                continue
            name = names[id(old)]
            old_shape = tuple(old.shape) if old is not current[name] else None
            try:
                states[id(old)] = {key: _carried(value, old_shape, changes.get(name, [])) for key, value in state.items()}
            except RewriteError as error:
                raise ValueError(f"{error}; pass only the records made since the optimizer matched the model") from error
    for group in optimizer.param_groups:
        for index, old in enumerate(group["params"]):
            new = current[names[id(old)]]
            optimizer.state.pop(old, None)
            group["params"][index] = new
            if id(old) in states:
                optimizer.state[new] = states[id(old)]
    if mode == "adam_recipe":
        _lower_learning_rate(optimizer, recipe_factor, recipe_steps)
    logger.info("optimizer follows %d rewrite(s) (%s)", len(records), mode)


def _lower_learning_rate(optimizer: torch.optim.Optimizer, factor: float, steps: int) -> None:
    """Every group's learning rate divided by ``factor`` for ``steps`` steps, then restored."""
    saved = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, saved):
        group["lr"] = lr / factor
    taken = 0

    def restore_after(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        nonlocal taken
        taken += 1
        if taken >= steps:
            for group, lr in zip(opt.param_groups, saved):
                group["lr"] = lr
            handle.remove()

    handle = optimizer.register_step_post_hook(restore_after)


def _carried(value: Any, old_shape: tuple[int, ...] | None, changes: list[TensorChange]) -> Any:
    """One state entry after the changes: tensors of the parameter's shape edited slice by slice."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or not changes:
        return value
    if old_shape is not None and tuple(value.shape) != old_shape:
        return value  # not a per-entry state tensor
    for change in changes:
        value = apply_change(value, change, what="optimizer state of")
    return value
