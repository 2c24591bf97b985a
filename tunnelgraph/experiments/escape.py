"""Escape runs: train from a flat area with one escape method, the same minibatches for every method.

The paper's MNIST experiments (docs/RESULTS.md) all have this shape: a start
in a flat area, SGD with minibatches, and at step ``open_at`` one of:

- ``"control"``: nothing;
- ``"tunnel"``: open ``k`` tunnels with ``lambda_t`` (the paper's method),
  close them at ``close_at``;
- ``"random_tunnel"``: the same sites, a random lambda of the same radius;
- ``"reorganize"``: ``k`` shape-preserving reorganisations with ``lambda_t``;
- ``"random_reorganize"``: the same with a random lambda;
- ``"pgd"``: perturbed gradient descent (Jin et al. 2017), acting whenever
  its gate opens;
- ``"neon"``: NEON (Xu and Yang 2017) whenever its gate opens;
- ``"noisy_sgd"``: isotropic Gaussian noise after every step.

Every run of a seed draws the same minibatches (a generator of its own),
and the method's own randomness comes from another generator, so two
methods differ only by what the method does.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from tunnelgraph.datasets import mnist, teacher_network, teacher_task
from tunnelgraph.train import (
    NEON,
    IsotropicNoise,
    PerturbedGD,
    PlateauDetector,
    TunnelController,
    newton_flat_area,
)

logger = logging.getLogger(__name__)

Method = Literal[
    "control", "tunnel", "random_tunnel", "reorganize", "random_reorganize", "pgd", "neon", "noisy_sgd"
]
METHODS: tuple[str, ...] = (
    "control", "tunnel", "random_tunnel", "reorganize", "random_reorganize", "pgd", "neon", "noisy_sgd"
)


@dataclass(frozen=True)
class Task:
    """A classification task held in memory.

    Attributes:
        name: ``"mnist"`` or ``"teacher"``.
        train_images, train_labels: the training set.
        test_images, test_labels: held-out data of the same task.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def subset(self, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``samples`` training images and labels."""
        return self.train_images[:samples], self.train_labels[:samples]


def load_task(
    mnist_dir: str | Path | None = None, *, train_samples: int | None = None, test_samples: int | None = None,
    seed: int = 0, image_shape: tuple[int, int, int] = (1, 28, 28), teacher: Literal["conv2", "paper"] = "paper",
) -> Task:
    """MNIST from ``mnist_dir`` (IDX files, the paper's pixel-mean subtraction), else the embedded teacher task.

    The teacher task (no download): ``train_samples`` (default 20000)
    standard-normal images labelled by a fixed random teacher network of
    the ``teacher`` architecture (:func:`tunnelgraph.datasets.teacher_network`;
    ``"paper"``, the default here, has the paper CNN's shape, so the
    paper CNN can fit the task), and ``test_samples`` (default 2000) more
    from the same teacher.
    """
    if mnist_dir is not None:
        train = mnist(mnist_dir, "train", limit=train_samples)
        test = mnist(mnist_dir, "test", limit=test_samples)
        return Task("mnist", train.images, train.labels, test.images, test.labels)
    network = teacher_network(seed=seed, image_shape=image_shape, architecture=teacher)
    train = teacher_task(train_samples or 20000, seed=seed, teacher=network, image_shape=image_shape)
    test = teacher_task(test_samples or 2000, seed=seed + 1, teacher=network, image_shape=image_shape)
    return Task("teacher", train.images, train.labels, test.images, test.labels)


@dataclass(frozen=True)
class FlatStart:
    """A starting point in a flat area and how it was reached."""

    state: dict[str, torch.Tensor] = field(repr=False)
    losses: list[float]
    grad_norms: list[float]
    seconds: float
    samples: int


def newton_start(
    model: nn.Module, task: Task, *, samples: int = 2000, steps: int = 20, step_size: float = 0.1,
    iterations: int = 50, cache: str | Path | None = None, progress: bool = True,
) -> FlatStart:
    """Walk a copy of ``model`` into a flat area with Newton's method on ``samples`` training images.

    Hessian-vector products solved by MINRES (``iterations`` per step,
    :func:`tunnelgraph.train.newton_flat_area`) stand in for the paper's
    full Hessian inverse. With ``cache`` (a ``.pt`` path) the result is
    read from there when present and written there otherwise.
    """
    if cache is not None and Path(cache).exists():
        saved = torch.load(cache)
        return FlatStart(saved["state"], saved["losses"], saved["grad_norms"], saved["seconds"], saved["samples"])
    walker = copy.deepcopy(model)
    images, labels = task.subset(samples)
    result = newton_flat_area(walker, images, labels, F.cross_entropy, steps=steps, step_size=step_size,
                              iterations=iterations, progress=progress)
    start = FlatStart({k: v.detach().clone() for k, v in walker.state_dict().items()}, result.losses,
                      result.grad_norms, result.seconds, samples)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save(asdict(start), cache)
    return start


@dataclass(frozen=True)
class RunConfig:
    """How one escape run trains and when its method acts.

    Defaults follow the paper's MNIST setup (SGD lr 1.0, batch 256, two
    filters opened at step 50 and closed at step 300); ``t`` and the
    baselines' free parameter (``pgd_radius``, ``neon_step``,
    ``noise_std``) are the values ``examples/grid.py`` chose on MNIST with
    a tuning seed (docs/RESULTS.md). With
    ``open_at=None`` the tunnel methods act once, when a
    :class:`~tunnelgraph.train.PlateauDetector` (``plateau_window``,
    ``plateau_rel_change``) sees the minibatch loss stall, and close
    ``close_at - 50`` steps later. The baselines' thresholds are this
    project's choices, documented in docs/RESULTS.md.
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1.0
    optimizer: Literal["sgd", "adam"] = "sgd"
    eval_every: int = 10
    eval_samples: int = 2000
    open_at: int | None = 50
    close_at: int | None = 300
    plateau_window: int = 40
    plateau_rel_change: float = 1e-2
    k: int = 2
    t: float = 100.0
    statistics_batches: int = 4
    through: tuple[str, ...] = ()
    surgery: Literal["carry", "clear", "adam_recipe"] = "carry"
    pgd_radius: float = 1.0
    pgd_threshold: float = 0.5
    pgd_wait: int = 50
    neon_radius: float = 0.01
    neon_eta: float = 0.5
    neon_iterations: int = 10
    neon_step: float = 10.0
    noise_std: float = 0.03


@dataclass
class RunResult:
    """What one run measured.

    Attributes:
        method, seed: what ran.
        steps: the steps at which ``losses`` were measured (0, eval_every, ..., steps).
        losses: mean loss over the first ``eval_samples`` training images.
        batch_losses: every step's minibatch loss.
        events: what the method did, as dicts (step, action, ...).
        seconds: wall-clock time of the whole run; ``method_seconds``: of the method's actions.
        test_accuracy: on the task's test set at the end.
    """

    method: str
    seed: int
    steps: list[int]
    losses: list[float]
    batch_losses: list[float]
    events: list[dict[str, Any]]
    seconds: float
    method_seconds: float
    test_accuracy: float

    def first_below(self, level: float) -> int | None:
        """The first measured step whose loss is at most ``level`` (None if never)."""
        return next((step for step, loss in zip(self.steps, self.losses) if loss <= level), None)

    def loss_at(self, step: int) -> float:
        """The loss measured at ``step`` (the nearest measured step at or before it)."""
        index = max(i for i, s in enumerate(self.steps) if s <= step)
        return self.losses[index]


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 5000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``images`` (no gradient, mode unchanged)."""
    total, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(images), batch):
            logits = model(images[start:start + batch])
            total += float(F.cross_entropy(logits, labels[start:start + batch], reduction="sum"))
            correct += int((logits.argmax(1) == labels[start:start + batch]).sum())
    return total / len(images), correct / len(images)


def run(
    method: str, start: nn.Module, task: Task, config: RunConfig, *, seed: int, progress: bool = False,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> RunResult:
    """Train a copy of ``start`` for ``config.steps`` steps with ``method`` (see the module docstring).

    ``on_step(step, model)`` is called after every step (e.g. to follow a
    filter and its clone).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    model = copy.deepcopy(start)
    model.train()
    if config.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    batches = torch.Generator().manual_seed(seed)
    randomness = torch.Generator().manual_seed(10_000 + seed)
    images, labels = task.train_images, task.train_labels
    eval_images, eval_labels = task.subset(config.eval_samples)
    statistics = _statistics_batches(task, config, seed)

    controller = _controller(method, model, optimizer, statistics, config, randomness)
    pgd = neon = noise = None
    if method == "pgd":
        pgd = PerturbedGD(model.parameters(), radius=config.pgd_radius, grad_threshold=config.pgd_threshold,
                          wait=config.pgd_wait, generator=randomness)
    elif method == "neon":
        neon_x, neon_y = torch.cat([x for x, _ in statistics]), torch.cat([y for _, y in statistics])
        neon = NEON(model.parameters(), lambda: F.cross_entropy(model(neon_x), neon_y), radius=config.neon_radius,
                    eta=config.neon_eta, iterations=config.neon_iterations, step=config.neon_step,
                    grad_threshold=config.pgd_threshold, wait=config.pgd_wait, generator=randomness)
    elif method == "noisy_sgd":
        noise = IsotropicNoise(model.parameters(), std=config.noise_std, generator=randomness)

    steps, losses, batch_losses = [], [], []
    events: list[dict[str, Any]] = []
    method_seconds = 0.0
    started = time.perf_counter()
    for step in tqdm(range(config.steps + 1), desc=method, disable=not progress, leave=False):
        if step % config.eval_every == 0 or step == config.steps:
            steps.append(step)
            losses.append(evaluate(model, eval_images, eval_labels)[0])
        if step == config.steps:
            break
        index = torch.randint(0, len(images), (config.batch_size,), generator=batches)
        loss = F.cross_entropy(model(images[index]), labels[index])
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{method}, seed {seed}: the loss is {value} at step {step}")
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        batch_losses.append(value)
        acted = time.perf_counter()
        if pgd is not None and pgd():
            events.append({"step": step, "action": "perturb"})
        if neon is not None and neon():
            events.append({"step": step, "action": "neon", "curvature": neon.curvatures[-1]})
        method_seconds += time.perf_counter() - acted
        optimizer.step()
        acted = time.perf_counter()
        if noise is not None:
            noise()
        if controller is not None:
            events += [event.to_dict() for event in controller.step(loss)]
        method_seconds += time.perf_counter() - acted
        if on_step is not None:
            on_step(step + 1, model)
    seconds = time.perf_counter() - started
    accuracy = evaluate(model, task.test_images, task.test_labels)[1]
    logger.info("%s seed %d: loss %.4f -> %.4f in %.1f s", method, seed, losses[0], losses[-1], seconds)
    return RunResult(method, seed, steps, losses, batch_losses, events, seconds, method_seconds, accuracy)


def _statistics_batches(task: Task, config: RunConfig, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches the methods measure on (A for tunnels, the loss for NEON): fixed per seed."""
    generator = torch.Generator().manual_seed(20_000 + seed)
    order = torch.randperm(len(task.train_images), generator=generator)
    size = config.batch_size
    return [
        (task.train_images[order[i * size:(i + 1) * size]], task.train_labels[order[i * size:(i + 1) * size]])
        for i in range(config.statistics_batches)
    ]


def _controller(
    method: str, model: nn.Module, optimizer: torch.optim.Optimizer, statistics: list[Any], config: RunConfig,
    randomness: torch.Generator,
) -> TunnelController | None:
    if method not in ("tunnel", "random_tunnel", "reorganize", "random_reorganize"):
        return None
    opening = method.endswith("tunnel")
    close_after = None
    if opening and config.close_at is not None:
        close_after = config.close_at - (config.open_at if config.open_at is not None else 50)
    detector = None
    if config.open_at is None:
        detector = PlateauDetector(window=config.plateau_window, rel_change=config.plateau_rel_change)
    return TunnelController(
        model, optimizer, F.cross_entropy, statistics, k=config.k, t=config.t,
        lam="random" if method.startswith("random") else "steepest",
        action="open" if opening else "reorganize", open_at=[] if config.open_at is None else [config.open_at],
        detector=detector, max_events=1, close_after=close_after, batches=len(statistics), through=config.through,
        surgery=config.surgery, generator=randomness,
    )


def with_overrides(config: RunConfig, **changes: Any) -> RunConfig:
    """``config`` with the given fields changed (None values are ignored)."""
    return replace(config, **{key: value for key, value in changes.items() if value is not None})
