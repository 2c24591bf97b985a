"""Training with tunnels: plateau detection and the optimizer surgery a rewrite needs (more to come)."""

from __future__ import annotations

from tunnelgraph.train.optimizer import SurgeryMode, update_optimizer
from tunnelgraph.train.plateau import PlateauDetector

__all__ = ["PlateauDetector", "SurgeryMode", "update_optimizer"]
