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
    changed = {(t.name, t.axis, t.block, t.old_size, t.new_size) for t in record.tensors}
    assert changed == {("conv.weight", 0, 1, 8, 9), ("conv.bias", 0, 1, 8, 9), ("fc.weight", 1, 576, 8, 9)}
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


def test_records_travel_with_the_model_through_torch_save_and_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    model = paper_cnn()
    x = torch.randn(2, 1, 28, 28)
    site = tg.find_sites(model, x)[3]
    lam = torch.linspace(0.0, 1.0, site.outbound_size, dtype=torch.float64)
    wider = tg.rewrite(model, site, lam)
    clone = {s.name: s for s in tg.find_sites(wider, x)}["conv[8]"]
    closed = tg.merge(wider, clone, into=3)
    assert tg.rewrite_records(model) == [] and len(tg.rewrite_records(wider)) == 1
    opened_record, merged_record = tg.rewrite_records(closed)
    assert (opened_record.old_size, opened_record.new_size, merged_record.new_size) == (8, 9, 8)
    conv_weight = next(t for t in opened_record.tensors if t.name == "conv.weight")
    assert conv_weight.copies == tuple(range(8)) + (3,)  # the clone copies channel 3's filter
    fc = next(t for t in opened_record.tensors if t.name == "fc.weight")
    assert (fc.axis, fc.block, fc.copies[3], fc.copies[8]) == (1, 576, None, None)  # split by lambda
    assert torch.allclose(torch.as_tensor(opened_record.edit.outbound[3][3]), lam)
    path = tmp_path / "closed.pt"
    torch.save(closed, path)
    loaded = torch.load(path, weights_only=False)
    text = json.dumps(loaded.tunnelgraph_records)
    again = [tg.RewriteRecord.from_dict(entry) for entry in json.loads(text)]
    assert [r.to_dict() for r in again] == [r.to_dict() for r in tg.rewrite_records(closed)]


def test_onnx_models_carry_their_records_in_metadata(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = paper_cnn()
    x = torch.randn(2, 1, 28, 28)
    path = tmp_path / "cnn.onnx"
    tg.export_onnx(model, x, path)
    opened = tg.rewrite(path, tg.find_sites(path)[2], 0.3)
    reduced, report = tg.reduce(opened, x)
    assert [r.group for r in tg.rewrite_records(opened)] == ["conv"]
    assert [(r.old_size, r.new_size) for r in tg.rewrite_records(reduced)] == [(8, 9), (9, 8)]
    assert len(report.records) == 1


def test_an_inplace_rewrite_keeps_the_parameter_objects() -> None:
    model = paper_cnn()
    x = torch.randn(2, 1, 28, 28)
    weight, fc_weight = model.conv.weight, model.fc.weight
    reference = paper_cnn()
    reference.load_state_dict(model.state_dict())
    tg.rewrite(model, tg.find_sites(model, x)[0], 0.5, inplace=True)
    assert model.conv.weight is weight and model.fc.weight is fc_weight
    assert weight.shape == (9, 1, 5, 5) and model.conv.out_channels == 9
    assert tg.verify(reference, model, x).passed
