"""``tunnelgraph demo``: the library's main job, end to end, in under two minutes on two CPU cores.

1. A task: the embedded teacher task (no download), or MNIST from a folder.
2. The paper's CNN walked into a flat area by Newton's method on a subset.
3. Two runs from there with the same minibatches: a control (plain SGD)
   and the same loop with a :class:`~tunnelgraph.train.TunnelController`
   that opens the steepest tunnels when its plateau detector fires.
4. A report: the loss before and after opening (equal: the function is
   kept), the output change at opening, and the step at which each run
   left the flat area (its training loss first fell ``escape_drop``, 1% by
   default, below where both runs started; the eval loss of a run stuck
   there moves by about 0.1%); a JSON record and a PNG plot.

Training follows the paper's MNIST setup (SGD, lr 1.0, batch 256) and
:class:`~tunnelgraph.experiments.escape.RunConfig`'s defaults (two tunnels,
``t = 100``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tunnelgraph.experiments.escape import RunConfig, RunResult, load_task, newton_start, run
from tunnelgraph.experiments.report import band_plot
from tunnelgraph.models import paper_cnn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured (also written as JSON).

    Attributes:
        task: ``"teacher"`` or ``"mnist"``.
        flat_loss, flat_grad_norm: the loss and gradient norm on the Newton
            subset where Newton's method stopped.
        start_loss: the training loss (evaluation subset) at the start of both runs.
        opened_at: the step at which the plateau detector opened tunnels (None: never).
        opened: the sites opened.
        loss_before, loss_after: the loss on the statistics batches right
            before and after opening.
        max_rel_change: the output change at opening, relative to the largest output.
        escape_level: the loss that counts as escaped.
        control_escape, tunnel_escape: the first measured step at or below it (None: not within the run).
        control_final, tunnel_final: the training loss at the end.
        seconds: the demo's wall-clock time.
    """

    task: str
    seed: int
    steps: int
    flat_loss: float
    flat_grad_norm: float
    start_loss: float
    opened_at: int | None
    opened: list[str]
    loss_before: float | None
    loss_after: float | None
    max_rel_change: float | None
    escape_level: float
    control_escape: int | None
    tunnel_escape: int | None
    control_final: float
    tunnel_final: float
    seconds: float


def demo(
    *, mnist: str | Path | None = None, steps: int = 600, seed: int = 0, out: str | Path = "tunnelgraph-demo",
    escape_drop: float = 0.01, progress: bool = True,
) -> DemoResult:
    """Run the demo (see the module docstring); writes ``demo.json`` and ``demo.png`` into ``out``."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    task = load_task(mnist, train_samples=10000 if mnist is None else None, test_samples=2000, seed=seed)
    model = paper_cnn()
    flat = newton_start(model, task, samples=500, steps=10, step_size=0.1, iterations=10, progress=progress)
    model.load_state_dict(flat.state)
    config = RunConfig(steps=steps, open_at=None, close_at=None, k=2, eval_every=10, eval_samples=2000)
    control = run("control", model, task, config, seed=seed, progress=progress)
    tunnel = run("tunnel", model, task, config, seed=seed, progress=progress)
    level = control.losses[0] * (1 - escape_drop)
    opening = next((e for e in tunnel.events if e["action"] == "open"), None)
    result = DemoResult(
        task=task.name, seed=seed, steps=steps, flat_loss=flat.losses[-1], flat_grad_norm=flat.grad_norms[-1],
        start_loss=control.losses[0], opened_at=opening["step"] if opening else None,
        opened=list(opening["sites"]) if opening else [], loss_before=opening["loss_before"] if opening else None,
        loss_after=opening["loss_after"] if opening else None,
        max_rel_change=opening["max_rel_change"] if opening else None, escape_level=level,
        control_escape=control.first_below(level), tunnel_escape=tunnel.first_below(level),
        control_final=control.losses[-1], tunnel_final=tunnel.losses[-1], seconds=time.perf_counter() - started,
    )
    _write(Path(out), result, control, tunnel)
    return result


def _write(out: Path, result: DemoResult, control: RunResult, tunnel: RunResult) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = asdict(result)
    record["curves"] = {r.method: {"steps": r.steps, "losses": r.losses} for r in (control, tunnel)}
    record["events"] = tunnel.events
    (out / "demo.json").write_text(json.dumps(record, indent=1))
    marks = [(float(result.opened_at), "tunnels opened")] if result.opened_at is not None else []
    band_plot(
        out / "demo.png",
        {"control (SGD)": (control.steps, [control.losses]), "tunnels at the plateau": (tunnel.steps, [tunnel.losses])},
        title=f"tunnelgraph demo: paper CNN, {result.task} task, Newton flat area",
        marks=marks,
    )


def describe(result: DemoResult, out: str | Path) -> str:
    """The demo's report as text."""

    def steps(value: int | None) -> str:
        return f"step {value}" if value is not None else f"not within {result.steps} steps"

    lines = [
        f"task: {result.task}; flat area from Newton's method: loss {result.flat_loss:.4f}, "
        f"gradient norm {result.flat_grad_norm:.3g}",
        f"training loss at the start of both runs: {result.start_loss:.4f}",
    ]
    if result.opened_at is None:
        lines.append("the plateau detector never fired: no tunnel opened")
    else:
        lines += [
            f"plateau detected at step {result.opened_at}: opened {', '.join(result.opened)}",
            f"loss before opening {result.loss_before:.6f}, after {result.loss_after:.6f}; "
            f"largest output change {result.max_rel_change:.2e} of the largest output (function kept)",
        ]
    lines += [
        f"escape (training loss <= {result.escape_level:.4f}): control {steps(result.control_escape)}, "
        f"with tunnels {steps(result.tunnel_escape)}",
    ]
    if result.control_escape is not None and result.tunnel_escape is not None:
        lines.append(f"tunnels escaped {result.control_escape - result.tunnel_escape} steps earlier than the control")
    lines += [
        f"final training loss: control {result.control_final:.4f}, with tunnels {result.tunnel_final:.4f}",
        f"wrote {Path(out) / 'demo.json'} and {Path(out) / 'demo.png'} in {result.seconds:.1f} s",
    ]
    return "\n".join(lines)
