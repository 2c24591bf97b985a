"""The paper's experiments as library code: escape runs from a flat area, their tables and plots, the demo.

Used by ``tunnelgraph demo`` and by the scripts in ``examples/``; see
docs/RESULTS.md for what they measured.
"""

from __future__ import annotations

from tunnelgraph.experiments.escape import (
    METHODS,
    FlatStart,
    RunConfig,
    RunResult,
    Task,
    evaluate,
    load_task,
    newton_start,
    run,
)

__all__ = ["METHODS", "FlatStart", "RunConfig", "RunResult", "Task", "evaluate", "load_task", "newton_start", "run"]
