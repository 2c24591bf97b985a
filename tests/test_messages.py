"""What the library says when something is wrong, and what it does not say when nothing is."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from zoo import ZOO_BY_NAME, example_input

import tunnelgraph as tg
from tunnelgraph.analysis.groups import hint_style
from tunnelgraph.models import paper_cnn
from tunnelgraph.rewrite import edits


def onnx_mlp(inputs: int = 4, hidden: int = 3) -> onnx.ModelProto:
    """``x [2, inputs] -> Gemm -> Relu -> Gemm -> y [2, 2]``: one hidden group 'h' of ``hidden`` units."""
    rng = np.random.default_rng(0)
    shapes = {"w1": (hidden, inputs), "b1": (hidden,), "w2": (2, hidden), "b2": (2,)}
    initializers = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# -- verify: inputs that do not fit -----------------------------------------------------------
def test_verify_names_the_onnx_input_and_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"input 0 \('x'\) has shape \(2, 4\) in model_a but \(2, 5\) in model_b"):
        tg.verify(onnx_mlp(4), onnx_mlp(5), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"input 0 \('x'\) of model_a has shape \(2, 4\), but the given input has "
                                         r"shape \(2, 5\)"):
        tg.verify(onnx_mlp(4), nn.Linear(5, 2), torch.randn(2, 5))


def test_verify_names_the_torch_model_that_cannot_take_the_inputs() -> None:
    with pytest.raises(ValueError, match=r"model_b fails on the given inputs \(input 0 of shape \(2, 1, 28, 28\)\)"):
        tg.verify(paper_cnn(), nn.Linear(10, 3), torch.randn(2, 1, 28, 28))


# -- stale sites --------------------------------------------------------------------------------
STALE = "does not fit this model.*find the sites on this model with tg.find_sites"


def test_every_entry_point_names_a_site_found_on_another_model() -> None:
    model, x = paper_cnn(), torch.randn(2, 1, 28, 28)
    narrow = tg.find_sites(model, x)
    wider = tg.rewrite(model, narrow[3])
    clone = tg.find_sites(wider, x)[8]
    with pytest.raises(tg.SiteError, match=STALE):
        tg.merge(wider, narrow[3], into=8)
    with pytest.raises(tg.SiteError, match=STALE):
        tg.reorganize(wider, merge=(narrow[3], 8), clone=2)
    with pytest.raises(tg.SiteError, match=STALE):
        tg.reorganize(model, merge=(narrow[3], 1), clone=clone)
    with pytest.raises(tg.SiteError, match=STALE):
        tg.apply_edit(wider, narrow[0].group, edits.remove(8, 7))
    proto = onnx_mlp()
    onnx_sites = tg.find_sites(proto)
    with pytest.raises(tg.SiteError, match=STALE):
        tg.merge(tg.rewrite(proto, onnx_sites[1]), onnx_sites[1], into=3)


def test_a_channel_out_of_range_says_how_many_channels_the_group_has() -> None:
    model, x = paper_cnn(), torch.randn(2, 1, 28, 28)
    with pytest.raises(tg.SiteError, match=r"channel 8 is outside the group's 8 channels 0\.\.7"):
        tg.merge(model, tg.find_sites(model, x)[3], into=8)


# -- through= hints ------------------------------------------------------------------------------
def test_a_model_without_default_sites_is_told_which_through_opens_them() -> None:
    entry = ZOO_BY_NAME["resnet_stack"]
    model, x = entry.build(), example_input(entry)
    data = [(x, torch.randint(0, model(x).shape[-1], (x.shape[0],)))]
    batchnorm = len(tg.find_sites(model, x, through=("batchnorm",)))
    every = len(tg.find_sites(model, x, through=tg.THROUGH_OPTIONS))
    assert tg.find_sites(model, x) == [] and 0 < batchnorm < every
    with pytest.raises(tg.SiteError) as error:
        tg.open_tunnels(model, data, F.cross_entropy, progress=False)
    message = str(error.value)
    assert f'through=("batchnorm",) would open {batchnorm}' in message
    assert f'through=("batchnorm", "pooling", "dropout", "depthwise"), {every}' in message


def test_blocked_reasons_quote_the_through_argument_of_the_caller() -> None:
    entry = ZOO_BY_NAME["resnet_stack"]
    model, x = entry.build(), example_input(entry)
    python = [r for g in tg.analyze(model, x).groups for r in g.reasons if "batch norm" in r]
    assert python and all('(pass through=("batchnorm",) to clone through it)' in r for r in python)
    with hint_style("cli"):
        cli = [r for g in tg.analyze(model, x).groups for r in g.reasons if "batch norm" in r]
    assert cli and all("(pass --through batchnorm to clone through it)" in r for r in cli)


# -- warnings of torch's machinery ------------------------------------------------------------
FIRST_CALLS = textwrap.dedent(
    """
    import warnings
    import torch
    import torch.jit

    script = torch.jit.script

    def deprecated_script(*args, **kwargs):  # what torch 2.14 does
        warnings.warn("`torch.jit.script` is deprecated", FutureWarning, stacklevel=2)
        return script(*args, **kwargs)

    torch.jit.script = deprecated_script

    import torch.nn.functional as F
    import tunnelgraph as tg
    from tunnelgraph.models import paper_cnn

    torch.manual_seed(0)
    model, x = paper_cnn(), torch.randn(4, 1, 28, 28)
    sites = tg.find_sites(model, x)
    stats = tg.a_statistics(model, sites, [(x, torch.randint(0, 10, (4,)))], F.cross_entropy, progress=False)
    proto = tg.export_onnx(model, x)
    print(len(stats), len(tg.find_sites(proto)))
    """
)


def test_first_calls_show_no_warnings_of_torch_machinery() -> None:
    # -W error: any warning fails the run; torch's own log lines (the exporter's) would show on stderr
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", FIRST_CALLS], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["8", "8"] and result.stderr == ""


# -- reprs ---------------------------------------------------------------------------------------
def test_reprs_show_shapes_and_key_numbers_not_matrices() -> None:
    a = torch.randn(300, 2000, dtype=torch.float64)
    site = tg.find_sites(paper_cnn(), torch.randn(2, 1, 28, 28))[3]
    stats = tg.SiteStatistics(site, a, 12.5, torch.randn(2000, dtype=torch.float64), a.sum(1), 64, "exact")
    text = repr(stats)
    assert len(text) < 300 and "a=(300, 2000)" in text and "direction=(2000,)" in text
    assert "sigma=12.5" in text and "samples=64" in text and "method='exact'" in text
    tunnel = tg.OpenedTunnel(site, 8, torch.linspace(-0.25, 1.5, 2000, dtype=torch.float64), stats)
    text = repr(tunnel)
    assert len(text) < 300 and text.startswith("OpenedTunnel(site='conv[3]', clone=8")
    assert "lam=(2000,) in [-0.25, 1.5]" in text and "sigma=12.5" in text
