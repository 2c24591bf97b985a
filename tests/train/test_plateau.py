"""The plateau detector fires on a flat loss, not on a falling one, and waits after firing."""

from __future__ import annotations

import math
import random

import pytest

from tunnelgraph.train import PlateauDetector


def _feed(detector: PlateauDetector, losses: list[float], grads: list[float] | None = None) -> list[int]:
    return [step for step, loss in enumerate(losses) if detector.update(loss, None if grads is None else grads[step])]


def test_a_flat_noisy_loss_is_a_plateau_after_one_window_and_a_falling_one_is_not() -> None:
    rng = random.Random(0)
    flat = [2.302 + 0.01 * rng.gauss(0.0, 1.0) for _ in range(200)]
    falling = [2.3 * math.exp(-step / 100) + 0.01 * rng.gauss(0.0, 1.0) for step in range(200)]
    assert _feed(PlateauDetector(window=50, rel_change=1e-2), flat)[0] == 49
    assert _feed(PlateauDetector(window=50, rel_change=1e-2), falling) == []


def test_after_firing_it_waits_for_the_cooldown() -> None:
    fired = _feed(PlateauDetector(window=20, rel_change=1e-3, cooldown=30), [1.0] * 200)
    assert fired[:3] == [19, 49, 79] and all(b - a == 30 for a, b in zip(fired, fired[1:]))


def test_a_large_gradient_is_not_a_plateau_and_a_small_one_is() -> None:
    flat = [1.0] * 60
    assert _feed(PlateauDetector(window=20, grad_tol=0.1), flat, [1.0] * 60) == []
    assert _feed(PlateauDetector(window=20, grad_tol=0.1), flat, [0.01] * 60)[0] == 19
    with pytest.raises(ValueError, match="grad_norm="):
        PlateauDetector(window=20, grad_tol=0.1).update(1.0)


def test_bad_numbers_are_refused() -> None:
    detector = PlateauDetector(window=8)
    with pytest.raises(ValueError, match="step 0: the loss is nan"):
        detector.update(float("nan"))
    with pytest.raises(ValueError, match="at least 4"):
        PlateauDetector(window=2)
