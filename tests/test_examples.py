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


# -- the paper's experiments: every example runs for a few steps, so none can rot -------------------
TINY_NEWTON = ["--train-samples", "1500", "--newton-samples", "64", "--newton-steps", "2", "--newton-iterations", "2",
               "--no-progress"]
EXAMPLES = {
    "fig1_left.py": (["--seeds", "2", "--steps", "12", "--open-at", "4", "--close-at", "8", *TINY_NEWTON],
                     ["fig1_left_curves.csv", "fig1_left_summary.csv", "fig1_left_summary.md", "fig1_left_events.json",
                      "fig1_left.png"]),
    "fig1_right.py": (["--seeds", "1", "--steps", "3", "--samples", "64", "--filters", "2", "--points", "4"],
                      ["fig1_right.csv", "fig1_right.json", "fig1_right.png", "fig1_right_loss.png"]),
    "fig2_left.py": (["--seeds", "1", "--steps", "8", "--open-at", "3", *TINY_NEWTON],
                     ["fig2_left_curves.csv", "fig2_left_summary.csv", "fig2_left.png"]),
    "fig2_right.py": (["--seeds", "1", "--steps", "6", "--open-at", "3", "--width", "8", "--train-samples", "512",
                       "--eval-every", "2", "--eval-samples", "128"],
                      ["fig2_right_curves.csv", "fig2_right_summary.csv", "fig2_right.png"]),
    "fig3.py": (["--seeds", "1", "--steps", "5", *TINY_NEWTON], ["fig3.csv", "fig3.png", "fig3_summary.md"]),
    "grid.py": (["--steps", "60", "--values", "1", "--methods", "tunnel,pgd,neon", *TINY_NEWTON],
                ["grid.csv", "grid.md"]),
}


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_every_example_runs_a_few_steps_and_writes_its_files(script: str, tmp_path: Path) -> None:
    arguments, files = EXAMPLES[script]
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--out", str(tmp_path), *arguments],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        files = [name for name in files if not name.endswith(".png")]
    missing = [name for name in files if not (tmp_path / name).is_file()]
    assert not missing, (missing, done.stderr[-2000:])


def test_tables_gather_the_experiments(tmp_path: Path) -> None:
    for script in ("fig1_left.py", "fig2_right.py"):
        arguments, _ = EXAMPLES[script]
        subprocess.run([sys.executable, str(ROOT / "examples" / script), "--out", str(tmp_path), *arguments],
                       check=True, capture_output=True, text=True)
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "tables.py"), "--out", str(tmp_path)],
                          check=True, capture_output=True, text=True)
    table = (tmp_path / "tables.md").read_text()
    assert "Table 3" in table and "Table 4" in table and "fig1_left" in table and "fig2_right" in table
    assert "tunnel" in done.stdout


def test_zoo_coverage_checks_a_model_of_the_projects_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The zoo benchmark needs torchvision or timm to list models; its per-model check runs on any builder."""
    import argparse
    import importlib.util

    from tunnelgraph.models import paper_deep_cnn

    spec = importlib.util.spec_from_file_location("zoo_coverage", ROOT / "benchmarks" / "zoo_coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(size=32, seed=0, cap=2, all=False, onnx=True)
    row = module.check("paper_deep_cnn", lambda: paper_deep_cnn(width=8, classes=10, image_size=32), args)
    assert row["groups"] == 5 and row["sites"] == 40 and row["default_sites"] == 16 and row["rewritten"] == 2
    assert row["pass32"] and row["pass64"] and row["onnx"] is True and row["reload"] is True
    assert row["err_over_variation64"] < 1e-8 and row["sensitivity"] > 0
