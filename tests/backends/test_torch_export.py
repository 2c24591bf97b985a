"""Rewritten models are ordinary modules: torch.onnx.export works, and onnxruntime agrees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tunnelgraph as tg
from zoo import ZOO_BY_NAME, example_input

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.filterwarnings("ignore")  # the exporters warn about their own deprecations
@pytest.mark.parametrize(
    ("name", "dynamo"),
    [("resnet_stack", False), ("hardcoded_view", False), ("inception_concat", False), ("resnet_stack", True)],
)
def test_rewritten_model_exports_to_onnx(tmp_path: Path, name: str, dynamo: bool) -> None:
    entry = ZOO_BY_NAME[name]
    model = entry.build()
    x = example_input(entry)
    site = tg.find_sites(model, x, through=tg.THROUGH_OPTIONS)[-1]
    rewritten = tg.rewrite(model, site, 0.3)
    path = tmp_path / "rewritten.onnx"
    torch.onnx.export(rewritten, (x,), str(path), dynamo=dynamo)
    with torch.no_grad():
        expected = model(x).numpy()
    difference = np.abs(_run_onnx(path, x) - expected).max()
    assert difference <= 1e-5 * np.abs(expected).max()
