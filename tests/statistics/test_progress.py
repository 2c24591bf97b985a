"""Progress on long work: shown when asked, silent when not, and silent by default outside a terminal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tunnelgraph as tg
from zoo import ZOO_BY_NAME, example_input


def _setup() -> tuple[torch.nn.Module, list, list]:
    entry = ZOO_BY_NAME["paper_cnn"]
    torch.manual_seed(0)
    model = entry.build()
    x = example_input(entry)
    data = [(x, torch.randint(0, 10, (x.shape[0],))) for _ in range(2)]
    return model, tg.find_sites(model, x)[:3], data


def test_a_statistics_shows_the_pass_and_the_solves(capsys: pytest.CaptureFixture[str]) -> None:
    model, sites, data = _setup()
    tg.a_statistics(model, sites, data, F.cross_entropy, method="matrix_free", progress=True)
    err = capsys.readouterr().err
    assert "A-statistics: pass over the data" in err and "A-statistics: top triplets (Lanczos)" in err
    tg.a_statistics(model, sites, data, F.cross_entropy, method="exact", progress=True)
    err = capsys.readouterr().err
    assert "pass over the data" in err and "Lanczos" not in err  # no solve phase on the exact path


@pytest.mark.parametrize("progress", [False, None])
def test_progress_false_and_the_default_outside_a_terminal_print_nothing(
    capsys: pytest.CaptureFixture[str], progress: bool | None
) -> None:
    model, sites, data = _setup()
    x = data[0][0]
    tg.a_statistics(model, sites, data, F.cross_entropy, method="matrix_free", progress=progress)
    tg.analyze(model, x, data=data, progress=progress)
    tg.open_tunnels(model, data, F.cross_entropy, k=1, progress=progress)
    assert capsys.readouterr().err == ""


def test_analyze_with_data_shows_its_pass(capsys: pytest.CaptureFixture[str]) -> None:
    model, _, data = _setup()
    tg.analyze(model, data[0][0], data=data, progress=True)
    assert "unit measures" in capsys.readouterr().err
