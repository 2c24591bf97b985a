"""The command line, run as a separate process for each subcommand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tunnelgraph as tg
from tunnelgraph.models import paper_cnn

pytestmark = pytest.mark.filterwarnings("ignore")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    script = shutil.which("tunnelgraph", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "tunnelgraph"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "cnn.onnx"
    tg.export_onnx(paper_cnn(), torch.randn(2, 1, 28, 28), path)
    return path


def test_analyze_onnx_and_a_pytorch_factory(onnx_file: Path) -> None:
    result = run("analyze", str(onnx_file))
    assert result.returncode == 0, result.stderr
    assert "| conv | 8 | 26 | 5760 |" in result.stdout and "Reducibility" in result.stdout
    result = run("analyze", "tunnelgraph.models:paper_cnn", "--input-shape", "2,1,28,28", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sites"] == 8 and report["groups"][0]["name"] == "conv"


def test_open_merge_and_verify(onnx_file: Path, tmp_path: Path) -> None:
    opened = tmp_path / "opened.onnx"
    result = run("open", str(onnx_file), "--site", "conv[3]", "--lam", "0.3", "--out", str(opened), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["opened"] == "conv[3]"
    result = run("verify", str(onnx_file), str(opened), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["passed"] is True
    closed = tmp_path / "closed.onnx"
    result = run("merge", str(opened), "--site", "conv[8]", "--into", "3", "--out", str(closed))
    assert result.returncode == 0, result.stderr
    assert run("verify", str(onnx_file), str(closed)).returncode == 0
    import numpy as np

    lam = tmp_path / "lam.npy"
    np.save(lam, np.linspace(0, 1, 5760))
    pt = tmp_path / "opened.pt"
    result = run("open", "tunnelgraph.models:paper_cnn", "--input-shape", "2,1,28,28", "--site", "conv[0]",
                 "--lam-file", str(lam), "--out", str(pt))
    assert result.returncode == 0, result.stderr
    assert torch.load(pt, weights_only=False).conv.out_channels == 9


def test_failing_verify_exits_non_zero() -> None:
    # two calls of the factory draw different random weights
    result = run("verify", "tunnelgraph.models:paper_cnn", "tunnelgraph.models:paper_cnn", "--input-shape", "2,1,28,28")
    assert result.returncode == 1 and "FAIL" in result.stdout


def test_bad_input_exits_two_with_a_message(tmp_path: Path) -> None:
    result = run("analyze", str(tmp_path / "missing.onnx"))
    assert result.returncode == 2 and "no ONNX file" in result.stderr
    result = run("analyze", "tunnelgraph.models:paper_cnn")
    assert result.returncode == 2 and "--input-shape" in result.stderr
    result = run("open", "tunnelgraph.models:paper_cnn", "--input-shape", "2,1,28,28", "--site", "nope[1]",
                 "--out", str(tmp_path / "x.pt"))
    assert result.returncode == 2 and "no channel group named 'nope'" in result.stderr


def test_analyze_with_data_shows_empirical_measures(tmp_path: Path) -> None:
    import numpy as np

    data = tmp_path / "data.npz"
    np.savez(data, inputs=np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32))
    result = run("analyze", "tunnelgraph.models:paper_cnn", "--input-shape", "2,1,28,28", "--data", str(data))
    assert result.returncode == 0, result.stderr
    assert "Empirical measures (64 samples)" in result.stdout and "| conv[7] |" in result.stdout


def test_verify_of_models_that_take_different_inputs_exits_two_with_one_line(tmp_path: Path) -> None:
    from test_messages import onnx_mlp

    import onnx

    narrow, wide = tmp_path / "narrow.onnx", tmp_path / "wide.onnx"
    onnx.save(onnx_mlp(4), narrow)
    onnx.save(onnx_mlp(5), wide)
    result = run("verify", str(narrow), str(wide))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "tunnelgraph verify: input 0 ('x') has shape (2, 4) in model_a but (2, 5) in model_b: the models take "
        "inputs of different shapes"
    ]
    linear = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(10, 3), linear)
    result = run("verify", "tunnelgraph.models:paper_cnn", str(linear), "--input-shape", "2,1,28,28")
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tunnelgraph verify: model_b fails on the given inputs (input 0 of shape (2, 1, 28, 28))")


def test_through_takes_a_comma_list_and_reasons_quote_the_flag() -> None:
    factory, shape = "tunnelgraph.models:paper_deep_cnn", "1,3,64,64"
    listed = run("analyze", factory, "--input-shape", shape, "--through", "batchnorm,pooling", "--json")
    assert listed.returncode == 0, listed.stderr
    repeated = run("analyze", factory, "--input-shape", shape, "--through", "batchnorm", "--through", "pooling",
                   "--json")
    assert json.loads(listed.stdout) == json.loads(repeated.stdout)
    assert json.loads(listed.stdout)["sites"] == 5 * 64
    default = run("analyze", factory, "--input-shape", shape)
    assert "feeds batch norm 'features.1' (pass --through batchnorm to clone through it)" in default.stdout
    assert "through=" not in default.stdout
    unknown = run("analyze", factory, "--input-shape", shape, "--through", "batchnorm,pool")
    assert unknown.returncode == 2 and "unknown option(s) pool" in unknown.stderr


def test_demo_escapes_on_the_embedded_task_and_writes_its_record(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "tunnelgraph", "demo", "--steps", "80", "--out", str(tmp_path),
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "flat area from Newton's method" in done.stdout and "escape (training loss <=" in done.stdout
    record = json.loads((tmp_path / "demo.json").read_text())
    assert record["task"] == "teacher" and record["steps"] == 80
    assert set(record["curves"]) == {"control", "tunnel"}
    if record["opened_at"] is not None:  # the detector fired: the opening kept the function
        assert record["max_rel_change"] < 1e-4  # float32: 4608-term sums with the weights split
        assert record["loss_after"] == pytest.approx(record["loss_before"], rel=1e-5)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "demo.png").is_file()


def test_demo_names_a_missing_mnist_folder(tmp_path: Path) -> None:
    done = run("demo", "--mnist", str(tmp_path / "nowhere"), "--steps", "5")
    assert done.returncode == 2 and "no such folder" in done.stderr
