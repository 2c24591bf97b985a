"""Numeric equivalence of two models on given inputs, under a stated tolerance policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from tunnelgraph.adapters import Adapter, Dims, adapter_for
from tunnelgraph.runtime import flatten_outputs

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-7),
    torch.float16: (1e-2, 1e-4),
    torch.bfloat16: (2e-2, 1e-3),
}
"""The default policy, dtype -> (rtol, atol). Two outputs agree when
``max|a - b| <= atol + rtol * max|b|``: the error is measured against the
largest reference magnitude of that output, so entries near zero do not
inflate it."""


@dataclass(frozen=True)
class EquivalenceReport:
    """How far two models' outputs are apart on the same inputs.

    Attributes:
        max_abs: largest absolute difference over all outputs.
        max_rel: largest ``max|a - b| / max|b|`` over all outputs (``b`` is
            the reference, ``model_a``).
        rtol, atol: the tolerance applied.
        dtype: the outputs' dtype, which chose the default tolerance.
        outputs: number of output tensors compared.
        passed: every output within ``atol + rtol * max|b|``.
    """

    max_abs: float
    max_rel: float
    rtol: float
    atol: float
    dtype: str
    outputs: int
    passed: bool

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict}: max abs diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g} "
            f"({self.outputs} output(s), {self.dtype}, rtol={self.rtol:g}, atol={self.atol:g})"
        )


def verify(
    model_a: Any,
    model_b: Any,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    rtol: float | None = None,
    atol: float | None = None,
) -> EquivalenceReport:
    """Run both models on ``inputs`` and compare every output tensor.

    Either model may be an ``nn.Module`` or an ONNX model (``onnx.ModelProto``
    or a path to an ``.onnx`` file), which runs in onnxruntime (CPU, graph
    optimisations off; CUDA when onnxruntime-gpu and a GPU are present).
    PyTorch models run as they are (train or eval mode) under ``torch.no_grad()``;
    their buffers (batch-norm running statistics) are restored afterwards,
    so verifying never changes a model. ``model_a`` is the reference.
    Tolerances default to :data:`TOLERANCES` for the outputs' dtype.

    Raises:
        ValueError: the inputs do not fit a model (an ONNX model declares
            other input shapes, or a model fails on them), or the models'
            outputs differ in number or shape.
    """
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    first, second = adapter_for(model_a), adapter_for(model_b)
    _check_inputs(first, second, args)
    outputs_a = _outputs(first, "model_a", args)
    outputs_b = _outputs(second, "model_b", args)
    if not outputs_a:
        raise ValueError("model_a returned no tensors: nothing to compare")
    if len(outputs_a) != len(outputs_b):
        raise ValueError(f"model_a returns {len(outputs_a)} tensors, model_b {len(outputs_b)}")
    dtype = outputs_a[0].dtype
    default_rtol, default_atol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    max_abs = max_rel = 0.0
    passed = True
    for a, b in zip(outputs_a, outputs_b):
        if a.shape != b.shape:
            raise ValueError(
                f"output shapes differ: {tuple(a.shape)} and {tuple(b.shape)}; the models do not "
                "compute the same kind of result"
            )
        a64, b64 = a.detach().double(), b.detach().double()
        diff = (a64 - b64).abs().max().item() if a.numel() else 0.0
        scale = a64.abs().max().item() if a.numel() else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
        passed = passed and diff <= atol + rtol * scale
    return EquivalenceReport(max_abs, max_rel, rtol, atol, str(dtype).replace("torch.", ""),
                             len(outputs_a), passed)


def _shape_text(dims: Dims | None) -> str:
    if dims is None:
        return "(unknown)"
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def _fits(dims: Dims | None, shape: Dims | None) -> bool:
    """Whether two shapes can be the same: equal ranks, and equal sizes where both are numbers."""
    if dims is None or shape is None:
        return True
    return len(dims) == len(shape) and all(
        not isinstance(d, int) or not isinstance(n, int) or d == n for d, n in zip(dims, shape)
    )


def _check_inputs(model_a: Adapter[Any], model_b: Adapter[Any], args: tuple[torch.Tensor, ...]) -> None:
    """Refuse inputs that a model does not declare (ONNX), and pairs that declare different inputs."""
    declared = {"model_a": model_a.declared_inputs(), "model_b": model_b.declared_inputs()}
    first, second = declared["model_a"], declared["model_b"]
    if first is not None and second is not None:
        if len(first) != len(second):
            raise ValueError(
                f"model_a takes {len(first)} input(s), model_b {len(second)}: the models cannot compute "
                "the same function"
            )
        for index, ((name, dims_a), (_, dims_b)) in enumerate(zip(first, second)):
            if not _fits(dims_a, dims_b):
                raise ValueError(
                    f"input {index} ('{name}') has shape {_shape_text(dims_a)} in model_a but "
                    f"{_shape_text(dims_b)} in model_b: the models take inputs of different shapes"
                )
    for label, inputs in declared.items():
        if inputs is None:
            continue
        if len(inputs) != len(args):
            raise ValueError(f"{label} takes {len(inputs)} input(s), {len(args)} given")
        for index, ((name, dims), arg) in enumerate(zip(inputs, args)):
            if not _fits(dims, tuple(arg.shape)):
                raise ValueError(
                    f"input {index} ('{name}') of {label} has shape {_shape_text(dims)}, but the given "
                    f"input has shape {_shape_text(tuple(arg.shape))}; pass inputs of the model's shape"
                )


def _outputs(model: Adapter[Any], label: str, args: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """``model``'s output tensors on ``args``; a model that fails on them is a ValueError naming the shapes."""
    try:
        # on copies: a forward that writes into its input (x.mul_(2)) must change neither the
        # caller's tensors nor what the other model sees
        return flatten_outputs(model.run(tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)))
    except Exception as error:
        from_runtime = type(error).__module__.startswith("onnxruntime")
        out_of_memory = isinstance(error, torch.cuda.OutOfMemoryError)
        if out_of_memory or not (from_runtime or isinstance(error, RuntimeError)):
            raise
        shapes = ", ".join(f"input {index} of shape {_shape_text(tuple(a.shape))}" for index, a in enumerate(args))
        cause = next(iter(str(error).strip().splitlines()), type(error).__name__)
        raise ValueError(
            f"{label} fails on the given inputs ({shapes}): {cause}; pass inputs of the shape both models take"
        ) from error


def output_sensitivity(model: torch.nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """How much the output depends on the input: ``||y - mean_batch(y)|| / ||y||`` over every output.

    0 means every sample gets the same output (a zero-initialised classifier,
    a dead network): an equivalence check on such a model passes whatever a
    rewrite did. Checks are meaningful when this is well above the
    tolerance; where it is small, compare in float64. Runs the model as it
    is (train or eval), without gradients; the model is not modified.
    """
    from tunnelgraph.runtime import preserved

    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    with preserved(model), torch.no_grad():
        outputs = flatten_outputs(model(*args))
    spread = sum(float((y.double() - y.double().mean(0, keepdim=True)).pow(2).sum()) for y in outputs)
    total = sum(float(y.double().pow(2).sum()) for y in outputs)
    return (spread / total) ** 0.5 if total > 0 else 0.0
