"""Plateau detection from the numbers a training loop already has: its losses (and gradient norms).

A plateau is a stretch where training stopped making progress: over the
last ``window`` steps the mean loss of the second half improved on the
mean of the first half by less than ``rel_change`` of it (halves average
the step-to-step noise of mini-batches). With ``grad_tol``, the mean
gradient norm over the window must also be below it, as near a saddle
point. After a detection the detector waits ``cooldown`` steps (by default
one window) before it can fire again, so that the loop has time to act
(open tunnels) and to see the effect.
"""

from __future__ import annotations

import math
from collections import deque


class PlateauDetector:
    """Feed it one loss per step; :meth:`update` says when the loss has stopped improving.

    Args:
        window: steps compared (two halves of ``window // 2``); at least 4.
        rel_change: the smallest relative improvement of the second half's
            mean loss over the first half's that still counts as progress.
        grad_tol: optional; a plateau also needs the window's mean gradient
            norm below this (pass ``grad_norm`` to :meth:`update` then).
        cooldown: steps after a detection during which it cannot fire
            again; default ``window``.

    Defaults (``window=50``, ``rel_change=1e-3``): a loss that fell by less
    than 0.1% between the two halves of the last 50 steps is on a plateau.
    """

    def __init__(
        self, window: int = 50, rel_change: float = 1e-3, *, grad_tol: float | None = None, cooldown: int | None = None
    ) -> None:
        if window < 4:
            raise ValueError(f"window must be at least 4 steps, got {window}")
        if not rel_change >= 0:
            raise ValueError(f"rel_change must be a non-negative number, got {rel_change}")
        self.window = window
        self.rel_change = rel_change
        self.grad_tol = grad_tol
        self.cooldown = window if cooldown is None else cooldown
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.step = 0
        self.last_detection: int | None = None

    def update(self, loss: float, grad_norm: float | None = None) -> bool:
        """Record this step's loss (and gradient norm); True when the loss is on a plateau now.

        Raises:
            ValueError: a NaN or infinite loss or gradient norm, or a
                missing ``grad_norm`` when ``grad_tol`` is set.
        """
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"step {self.step}: the loss is {loss}; the plateau test needs finite losses")
        if self.grad_tol is not None:
            if grad_norm is None:
                raise ValueError("this detector has grad_tol: pass grad_norm= to update() every step")
            if not math.isfinite(float(grad_norm)):
                raise ValueError(f"step {self.step}: the gradient norm is {grad_norm}")
            self.grad_norms.append(float(grad_norm))
        self.losses.append(loss)
        self.step += 1
        if len(self.losses) < self.window:
            return False
        if self.last_detection is not None and self.step - self.last_detection < self.cooldown:
            return False
        if not self._flat():
            return False
        self.last_detection = self.step
        return True

    def _flat(self) -> bool:
        half = self.window // 2
        values = list(self.losses)
        first = sum(values[:half]) / half
        second = sum(values[-half:]) / half
        if first - second > self.rel_change * abs(first):
            return False
        if self.grad_tol is not None and sum(self.grad_norms) / len(self.grad_norms) >= self.grad_tol:
            return False
        return True

    def reset(self) -> None:
        """Forget the window (e.g. after the model changed); the step count and cooldown stay."""
        self.losses.clear()
        self.grad_norms.clear()
