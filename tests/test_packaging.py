"""Optional extras: tunnelgraph's PyTorch path works without onnx; the ONNX entry points say what to install."""

from __future__ import annotations

import subprocess
import sys

# Runs in a fresh interpreter where importing onnx, onnxruntime, onnxscript or onnx_ir fails, as on an
# install without the [onnx] and [ort] extras.
WITHOUT_ONNX = r'''
import importlib.abc
import sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("onnx", "onnxruntime", "onnxscript", "onnx_ir"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())

import tunnelgraph as tg

assert not [m for m in sys.modules if m.split(".")[0] in ("onnx", "onnxruntime", "onnxscript")]

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
x = torch.randn(2, 2, 6, 6)
graph = tg.trace(model, x)
sites = tg.find_sites(model, x)
assert [s.name for s in sites] == [f"0[{c}]" for c in range(4)], sites
report = tg.analyze(model, x)
wider = tg.rewrite(model, sites[1], 0.3)
assert tg.verify(model, wider, x).passed
closed = tg.merge(wider, "0[4]", into=1, example_inputs=x)
assert tg.verify(model, closed, x).passed and closed[0].out_channels == 4
stats = tg.a_statistics(model, sites, [(x, torch.tensor([0, 2]))], F.cross_entropy, progress=False)
assert len(stats) == 4

from tunnelgraph import *  # every public name resolves, the ONNX ones included

messages = []
for call in (lambda: tg.load_onnx("model.onnx"), lambda: tg.to_torch(b"onnx"),
             lambda: tg.export_onnx(model, x), lambda: tg.find_sites("model.onnx"),
             lambda: tg.analyze("model.onnx"), lambda: tg.verify("a.onnx", "b.onnx", x)):
    try:
        call()
    except ImportError as error:
        assert isinstance(error, tg.TunnelgraphError), type(error)
        messages.append(str(error))
    else:
        raise AssertionError("an ONNX entry point ran without onnx")
assert all('pip install "tunnelgraph[onnx]"' in m for m in messages), messages
assert not [m for m in sys.modules if m.split(".")[0] in ("onnx", "onnxruntime", "onnxscript")]
print("ok", len(messages))
'''


def test_the_pytorch_path_works_without_the_onnx_extra() -> None:
    result = subprocess.run([sys.executable, "-c", WITHOUT_ONNX], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "6"]


def test_importing_tunnelgraph_imports_neither_onnx_nor_torch() -> None:
    code = (
        "import sys, tunnelgraph; "
        "loaded = [m for m in ('torch', 'onnx', 'onnxruntime', 'onnxscript') if m in sys.modules]; "
        "print(loaded)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
