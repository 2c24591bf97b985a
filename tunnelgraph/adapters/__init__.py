"""One model interface for every framework, chosen once per call.

:func:`adapter_for` looks at a model once and returns its :class:`Adapter`:
:class:`~tunnelgraph.adapters.pytorch.TorchAdapter` for an ``nn.Module``
(a DistributedDataParallel or DataParallel wrapper is unwrapped),
:class:`~tunnelgraph.adapters.onnx.OnnxAdapter` for an ``onnx.ModelProto``
or an ``.onnx`` file (path or bytes, read once), and
:class:`~tunnelgraph.adapters.graph.GraphAdapter` for an already traced
:class:`~tunnelgraph.Graph`. The public functions and the command line ask
for the adapter and never test the framework themselves; a new frontend or
backend is one new :class:`Adapter`.

This package does not import torch or onnx: each adapter module imports
its own framework, and only when a model of that framework is given.
"""

from __future__ import annotations

import abc
import os
import sys
from typing import Any, Sequence, TypeVar

from tunnelgraph.rewrite.passes import ModelAdapter

M = TypeVar("M")

Dims = tuple[int | str | None, ...]


class Adapter(ModelAdapter[M]):
    """What the public API needs of a model beyond the passes: running, saving, declared inputs."""

    @abc.abstractmethod
    def of(self, model: M) -> "Adapter[M]":
        """The adapter of another model of the same framework (a rewrite's result)."""

    @abc.abstractmethod
    def run(self, inputs: Sequence[Any]) -> Any:
        """The model's outputs on ``inputs`` (torch tensors), as the framework returns them.

        A PyTorch model runs as it is (train or eval mode) under
        ``torch.no_grad()`` and gets its state back; an ONNX model runs in
        onnxruntime and its outputs come back as torch tensors.
        """

    @abc.abstractmethod
    def declared_inputs(self) -> list[tuple[str, Dims | None]] | None:
        """The model's inputs as ``(name, dims)`` when the format declares them (ONNX), else None."""

    @abc.abstractmethod
    def save(self, path: str | os.PathLike[str], example_inputs: Any | None) -> None:
        """Write the model to ``path`` (``.onnx``; ``.pt`` for a PyTorch module)."""



def adapter_for(model: Any) -> Adapter[Any]:
    """The adapter of ``model``: the one place that decides which framework a model belongs to.

    Args:
        model: an ``nn.Module`` (or a DDP/DataParallel wrapper), an
            ``onnx.ModelProto``, a path to an ``.onnx`` file, the bytes of
            one, or a :class:`~tunnelgraph.Graph`.

    Raises:
        TypeError: anything else, naming what is accepted.
    """
    if isinstance(model, Adapter):
        return model
    from tunnelgraph.ir import Graph

    if isinstance(model, Graph):
        from tunnelgraph.adapters.graph import GraphAdapter

        return GraphAdapter(model)
    if isinstance(model, (str, os.PathLike, bytes)):
        if isinstance(model, bytes) or str(model).endswith(".onnx"):
            from tunnelgraph.adapters.onnx import OnnxAdapter

            return OnnxAdapter.read(model)
        raise TypeError(
            f"'{model}' is not an .onnx file; pass an ONNX model by its .onnx path, or load a PyTorch model "
            "(torch.load) and pass the module"
        )
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        from tunnelgraph.adapters.pytorch import TorchAdapter

        return TorchAdapter(model)
    onnx = sys.modules.get("onnx")
    if onnx is not None and isinstance(model, onnx.ModelProto):
        from tunnelgraph.adapters.onnx import OnnxAdapter

        return OnnxAdapter.read(model)
    raise TypeError(
        f"expected an nn.Module, an ONNX model (ModelProto, .onnx path or bytes) or a tunnelgraph Graph, "
        f"got {type(model).__name__}"
    )


__all__ = ["Adapter", "adapter_for"]
