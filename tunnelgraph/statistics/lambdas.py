"""Choosing lambda and ranking sites from measured statistics (docs/MATH.md section 4)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from tunnelgraph.analysis.sites import Site
from tunnelgraph.statistics.engine import SiteStatistics


def lambda_t(stats: SiteStatistics, t: float) -> torch.Tensor:
    """The steepest tunnel of radius ``t``: ``lam = 1/2 * 1 + t * lambda*`` (float64, length L).

    With it, the squared gradient norm of the two inbound weight vectors
    right after opening is ``||A 1||^2 / 2 + 2 t^2 sigma_max(A)^2``, the
    largest on the sphere of radius ``t`` around ``1/2 * 1``.
    """
    if not isinstance(stats, SiteStatistics):
        raise TypeError(f"stats must be a SiteStatistics from tg.a_statistics, got {type(stats).__name__}")
    return 0.5 + float(t) * stats.direction.to(torch.float64)


def random_lambda(site: Site | int, t: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's control: ``lam = 1/2 * 1 + t * r`` with ``r`` a uniformly random unit vector.

    Args:
        site: the site (or its outbound size L).
        t: the radius, as for :func:`lambda_t`.
        generator: a seeded ``torch.Generator`` for reproducible draws.
    """
    size = site.outbound_size if isinstance(site, Site) else int(site)
    if size < 1:
        raise ValueError(f"a lambda vector needs at least one entry, got size {size}")
    direction = torch.randn(size, generator=generator, dtype=torch.float64)
    return 0.5 + float(t) * direction / direction.norm()


def rank_sites(stats: Mapping[str, SiteStatistics] | Sequence[SiteStatistics]) -> list[SiteStatistics]:
    """Statistics sorted by top singular value, steepest tunnel first (ties: by site name)."""
    values = list(stats.values()) if isinstance(stats, Mapping) else list(stats)
    return sorted(values, key=lambda s: (-s.sigma, s.name))
