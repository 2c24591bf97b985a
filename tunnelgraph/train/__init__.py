"""Training with tunnels: the optimizer surgery a rewrite needs (more of the training loop to come)."""

from __future__ import annotations

from tunnelgraph.train.optimizer import SurgeryMode, update_optimizer

__all__ = ["SurgeryMode", "update_optimizer"]
