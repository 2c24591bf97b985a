"""The README's commands: the quickstart's main job and the statistics benchmark's smoke run."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_opens_the_steepest_tunnel_and_checks_the_identity(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["quickstart.py"])
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "sites by sigma_max(A): conv[" in out
    assert out.count("PASS") == 2
    difference = float(re.search(r"relative difference ([0-9.e+-]+)\)", out).group(1))
    assert difference <= 1e-4  # float32 gradients against the float64 identity


def test_bench_statistics_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_statistics.py"), "--quick", "--json", str(out)],
        check=True, capture_output=True, text=True,
    )
    results = json.loads(out.read_text())
    assert results["paper_cnn_cpu"]["sites"] == 8 and results["paper_cnn_cpu"]["oracle_agreement"] < 1e-5
    assert results["matrix_free_cpu"]["subset_min_abs_cosine"] >= 0.999
    assert len(results["memory"]["peak_mib"]) == 2


def test_bench_reducibility_quick_run() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_reducibility.py"), "--quick"],
        check=True, capture_output=True, text=True,
    )
    results = json.loads(out.stdout)
    assert results["parametric_residual_100"]["findings"] == 0
    assert set(results["reorganisation"]["picked"]) == {"fc1[2]", "fc1[8]"}


def test_bench_onnx_small_run() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_onnx.py"), "--blocks", "4", "--repeats", "1"],
        check=True, capture_output=True, text=True,
    )
    results = json.loads(out.stdout[out.stdout.index("{"):])
    assert results["torch_imported"] is False and results["rewrite_site"] == "blocks.2.conv1[0]"
