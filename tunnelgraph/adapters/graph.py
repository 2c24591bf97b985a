"""The adapter of an already traced :class:`~tunnelgraph.Graph`: analysis only."""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, NoReturn, Sequence

import numpy as np

from tunnelgraph.adapters import Adapter, Dims
from tunnelgraph.analysis.groups import ChannelGroup, ParamSlice
from tunnelgraph.analysis.reducibility import UnitMeasures
from tunnelgraph.ir import Graph
from tunnelgraph.rewrite.passes import RewriteRecord
from tunnelgraph.rewrite.plan import RewritePlan


class GraphAdapter(Adapter[Graph]):
    """A traced graph: sites and reports come from it; anything that needs the weights asks for the model."""

    @property
    def name(self) -> str:
        return self.model.name

    def of(self, model: Graph) -> "GraphAdapter":
        return GraphAdapter(model)

    def graph(self, example_inputs: Any | None = None) -> Graph:
        return self.model

    def _refuse(self, what: str) -> NoReturn:
        raise TypeError(f"{what} needs the model itself, not a traced tunnelgraph Graph: pass the model")

    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        self._refuse("checking a site against the model")

    def weights(self) -> Mapping[str, np.ndarray] | None:
        return None

    def copy(self) -> Graph:
        return self.model

    def apply(self, plan: RewritePlan, *, inplace: bool = False) -> Graph:
        self._refuse("rewriting")

    def parameter_count(self) -> int:
        self._refuse("counting parameters")

    def example_inputs(self, given: Any | None) -> Any:
        return given

    def unit_measures(
        self, groups: Sequence[ChannelGroup], data: Iterable[Any], *, batches: int | None, progress: bool | None
    ) -> dict[str, UnitMeasures]:
        self._refuse("empirical measures")

    def consumer_values(self, layers: Sequence[str], example_inputs: Any) -> Mapping[str, Any]:
        self._refuse("reading activations")

    def bias_shift(self, weight_slice: ParamSlice, channel: int, values: Any, offset: float | None) -> np.ndarray:
        self._refuse("folding constants")

    def records(self) -> list[RewriteRecord]:
        return []

    def with_records(self, model: Graph, records: Sequence[RewriteRecord]) -> Graph:
        self._refuse("rewriting")

    def add_to_biases(self, model: Graph, shifts: Mapping[str, np.ndarray]) -> Graph:
        self._refuse("folding constants")

    def run(self, inputs: Sequence[Any]) -> Any:
        self._refuse("running")

    def declared_inputs(self) -> list[tuple[str, Dims | None]] | None:
        return None

    def save(self, path: str | os.PathLike[str], example_inputs: Any | None) -> None:
        self._refuse("saving")
