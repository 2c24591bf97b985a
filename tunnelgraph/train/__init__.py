"""Training with tunnels: plateau detection, a controller for the user's own loop, and the optimizer surgery a rewrite needs."""

from __future__ import annotations

from tunnelgraph.train.controller import TunnelController, TunnelEvent
from tunnelgraph.train.escape import NEON, IsotropicNoise, NegativeCurvature, PerturbedGD, neon_direction
from tunnelgraph.train.flat import (
    FlatArea,
    MinresInfo,
    conjugate_gradient,
    hessian_vector_product,
    minres,
    newton_flat_area,
)
from tunnelgraph.train.optimizer import SurgeryMode, update_optimizer
from tunnelgraph.train.plateau import PlateauDetector

__all__ = ["PlateauDetector", "TunnelController", "TunnelEvent", "SurgeryMode", "update_optimizer",
           "PerturbedGD", "IsotropicNoise", "NEON", "NegativeCurvature", "neon_direction",
           "FlatArea", "MinresInfo", "conjugate_gradient", "hessian_vector_product", "minres", "newton_flat_area"]
