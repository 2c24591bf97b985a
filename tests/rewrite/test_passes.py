"""Rewrites as passes: what they require, what they record, the same on PyTorch and ONNX."""

from __future__ import annotations

import pytest
import torch

import tunnelgraph as tg
from tunnelgraph.adapters import adapter_for
from tunnelgraph.models import paper_cnn
from tunnelgraph.rewrite import edits
from tunnelgraph.rewrite.passes import EditPass, PassResult


def test_an_edit_pass_records_every_resized_parameter_and_checks_when_asked() -> None:
    model = paper_cnn()
    x = torch.randn(2, 1, 28, 28)
    site = tg.find_sites(model, x)[3]
    result = EditPass(site.group, edits.clone(8, 3, 0.25), check=lambda a, b: tg.verify(a, b, x))(adapter_for(model))
    assert isinstance(result, PassResult) and result.modified
    (record,) = result.records
    assert (record.group, record.old_size, record.new_size) == ("conv", 8, 9)
    changed = {(t.name, t.axis, t.old_size, t.new_size) for t in record.tensors}
    assert changed == {("conv.weight", 0, 8, 9), ("conv.bias", 0, 8, 9), ("fc.weight", 1, 4608, 5184)}
    assert record.to_dict()["tensors"][0]["name"] == "fc.weight"  # outbound edits come first
    assert result.equivalence is not None and result.equivalence.passed
    with pytest.raises(ValueError, match="in-place"):
        EditPass(site.group, edits.clone(8, 3, 0.25), inplace=True, check=lambda a, b: tg.verify(a, b, x))


def test_the_same_pass_runs_on_pytorch_and_onnx(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = paper_cnn()
    x = torch.randn(2, 1, 28, 28)
    path = tmp_path / "cnn.onnx"
    tg.export_onnx(model, x, path)
    torch_sites, onnx_sites = tg.find_sites(model, x), tg.find_sites(path)
    edit = edits.clone(8, 5, 0.7)
    from_torch = EditPass(torch_sites[5].group, edit)(adapter_for(model))
    from_onnx = EditPass(onnx_sites[5].group, edit)(adapter_for(path))
    assert [r.to_dict() for r in from_torch.records] == [r.to_dict() for r in from_onnx.records]
    assert tg.verify(from_torch.model, from_onnx.model, x, rtol=1e-5, atol=1e-6).passed


def test_a_stale_group_is_refused_before_the_edit_is_built() -> None:
    model = paper_cnn()
    x = torch.randn(2, 1, 28, 28)
    site = tg.find_sites(model, x)[0]
    wider = tg.rewrite(model, site, 0.5)
    with pytest.raises(tg.SiteError, match="find the sites on this model"):
        EditPass(site.group, edits.merge(8, 0, 1))(adapter_for(wider))


def test_adapter_for_names_what_it_accepts() -> None:
    with pytest.raises(TypeError, match="nn.Module, an ONNX model"):
        adapter_for(42)
    with pytest.raises(TypeError, match="not an .onnx file"):
        adapter_for("model.pt")
