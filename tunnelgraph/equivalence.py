"""Numeric equivalence of two models on given inputs, under a stated tolerance policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

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
    """
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    outputs_a = _flatten(_run(model_a, args))
    outputs_b = _flatten(_run(model_b, args))
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


def _run(model: Any, args: tuple[torch.Tensor, ...]) -> Any:
    if not isinstance(model, nn.Module):
        from tunnelgraph.backends.onnx import run_onnx
        from tunnelgraph.frontends.onnx import read_onnx

        proto, _ = read_onnx(model)
        outputs = run_onnx(proto, [a.detach().cpu().numpy() for a in args])
        return [torch.from_numpy(o) for o in outputs]
    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    try:
        with torch.no_grad():
            return model(*args)
    finally:
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, value in saved.items():
                buffers[name].copy_(value)


def _flatten(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for key in sorted(output) for t in _flatten(output[key])]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _flatten(item)]
    return []
