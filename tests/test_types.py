"""The public API type-checks strictly (mypy --strict on the API, the adapters and the passes)."""

from __future__ import annotations

from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parents[1]
STRICT = ["tunnelgraph/api.py", "tunnelgraph/adapters", "tunnelgraph/rewrite/passes.py", "tunnelgraph/runtime.py"]


def test_the_public_api_passes_mypy_strict() -> None:
    stdout, stderr, status = api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), "--strict", "--no-incremental",
         *[str(ROOT / path) for path in STRICT]]
    )
    assert status == 0, stdout + stderr


def test_overloads_give_a_modelproto_for_onnx_and_a_module_for_pytorch(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import onnx\nimport torch.nn as nn\nimport tunnelgraph as tg\n"
        "def f(m: nn.Module, p: onnx.ModelProto, s: tg.Site) -> None:\n"
        "    reveal_type(tg.rewrite(m, s))\n"
        "    reveal_type(tg.rewrite(p, s))\n"
        "    reveal_type(tg.merge('model.onnx', s, 0))\n"
        "    reveal_type(tg.reduce(m)[0])\n"
    )
    stdout, _, _ = api.run(["--config-file", str(ROOT / "pyproject.toml"), "--no-incremental", str(sample)])
    revealed = [line.split("Revealed type is ")[1] for line in stdout.splitlines() if "Revealed type" in line]
    assert revealed == [
        '"torch.nn.modules.module.Module"', '"onnx.onnx_ml_pb2.ModelProto"', '"onnx.onnx_ml_pb2.ModelProto"',
        '"torch.nn.modules.module.Module"',
    ], stdout
