"""PyTorch -> export_onnx -> load_onnx: the same sites; rewrites in ONNX match rewrites in PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import tunnelgraph as tg
from tunnelgraph.models import paper_cnn
from zoo import TRACEABLE, ZooEntry, example_input

pytestmark = pytest.mark.filterwarnings("ignore")


def _signature(sites: list[tg.Site]) -> set[tuple[str, int, int]]:
    return {(s.name, s.inbound_size, s.outbound_size) for s in sites}


@pytest.mark.parametrize("entry", TRACEABLE, ids=[e.name for e in TRACEABLE])
def test_zoo_round_trip(entry: ZooEntry, tmp_path: Path) -> None:
    model = entry.build()
    x = example_input(entry)
    path = tmp_path / f"{entry.name}.onnx"
    proto = tg.export_onnx(model, x, path)
    assert path.is_file()
    onnx.checker.check_model(proto, full_check=True)
    torch_sites = tg.find_sites(model, x, through=tg.THROUGH_OPTIONS)
    onnx_sites = tg.find_sites(path, through=tg.THROUGH_OPTIONS)
    assert _signature(onnx_sites) == _signature(torch_sites)

    by_name = {s.name: s for s in torch_sites}
    generator = np.random.default_rng(0)
    checked: set[str] = set()
    for site in onnx_sites:  # every legal site
        lam = generator.uniform(0.0, 1.0, site.outbound_size)
        rewritten = tg.rewrite(proto, site, lam, through=tg.THROUGH_OPTIONS)
        if site.group_name not in checked:  # the full checker once per group: it is the slow part
            onnx.checker.check_model(rewritten, full_check=True)
            checked.add(site.group_name)
        reference = tg.rewrite(model, by_name[site.name], lam)
        report = tg.verify(reference, rewritten, x, rtol=1e-5, atol=1e-6)
        assert report.passed, (site.name, str(report))


def test_merge_and_reorganize_in_onnx() -> None:
    entry = next(e for e in TRACEABLE if e.name == "inception_concat")
    model = entry.build()
    x = example_input(entry)
    proto = tg.export_onnx(model, x)
    site = tg.find_sites(proto)[0]
    opened = tg.rewrite(proto, site, 0.25)
    clone = next(s for s in tg.find_sites(opened) if s.name == f"{site.group_name}[{site.group.size}]")
    closed = tg.merge(opened, clone, into=site.channel)
    assert [tuple(t.dims) for t in closed.graph.initializer] == [tuple(t.dims) for t in proto.graph.initializer]
    assert tg.verify(proto, closed, x).passed
    sites = tg.find_sites(proto)
    same = tg.reorganize(proto, merge=(sites[1], 0), clone=2, lam=0.5)
    assert [tuple(t.dims) for t in same.graph.initializer] == [tuple(t.dims) for t in proto.graph.initializer]
    reference = tg.reorganize(model, merge=(tg.find_sites(model, x)[1], 0), clone=2, lam=0.5)
    assert tg.verify(reference, same, x, rtol=1e-5, atol=1e-6).passed


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    return result


@pytest.mark.parametrize("name", ["paper_cnn", "inverted_residual", "hardcoded_view"])
def test_an_inplace_rewrite_edits_the_given_model_as_a_copy_would_and_a_failing_one_leaves_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One site per group (depthwise ``group`` attributes and hard-coded reshape widths included)."""
    entry = next(e for e in TRACEABLE if e.name == name)
    x = example_input(entry)
    proto = tg.export_onnx(entry.build(), x)
    before = proto.SerializeToString()
    sites = {s.group_name: s for s in reversed(tg.find_sites(proto, through=tg.THROUGH_OPTIONS))}
    assert sites
    for site in sites.values():
        expected = tg.rewrite(proto, site, 0.3)
        assert proto.SerializeToString() == before
        target = _copy(proto)
        assert tg.rewrite(target, site, 0.3, inplace=True) is target
        assert target.SerializeToString() == expected.SerializeToString()
        assert tg.verify(proto, target, x, rtol=1e-5, atol=1e-6).passed
        target = _copy(proto)
        with pytest.raises(ValueError, match="lam must be"):
            tg.rewrite(target, site, np.ones(site.outbound_size + 1), inplace=True)
        assert target.SerializeToString() == before

    def reject(model: onnx.ModelProto, full_check: bool = False) -> None:
        raise onnx.checker.ValidationError("rejected by the test")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    for site in sites.values():  # the checker rejects the edited model: the edit is undone
        target = _copy(proto)
        with pytest.raises(tg.RewriteError, match="rejected by the test"):
            tg.rewrite(target, site, 0.3, inplace=True)
        assert target.SerializeToString() == before


def test_an_inplace_rewrite_of_a_model_read_as_converted_edits_the_given_model() -> None:
    """A weight computed by a ``Constant`` node is read as an initializer; the given model takes the result."""
    model = paper_cnn().eval()
    x = torch.randn(2, 1, 28, 28)
    proto = tg.export_onnx(model, x)
    weight = next(t for t in proto.graph.initializer if len(t.dims) == 2)
    constant = onnx.helper.make_node("Constant", [], [weight.name], value=weight)
    kept = [t for t in proto.graph.initializer if t.name != weight.name]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    proto.graph.node.insert(0, constant)
    original = _copy(proto)
    site = tg.find_sites(proto)[-1]
    expected = tg.rewrite(proto, site, 0.3)
    assert proto.SerializeToString() == original.SerializeToString()
    assert tg.rewrite(proto, site, 0.3, inplace=True) is proto
    assert proto.SerializeToString() == expected.SerializeToString()
    assert not any(node.op_type == "Constant" for node in proto.graph.node)
    assert tg.verify(original, proto, x).passed


@pytest.mark.parametrize("entry", TRACEABLE, ids=[e.name for e in TRACEABLE])
def test_to_torch_computes_the_same_function_with_the_same_sites(entry: ZooEntry) -> None:
    model = entry.build()
    x = example_input(entry)
    converted = tg.to_torch(tg.export_onnx(model, x))
    assert tg.verify(model, converted, x, rtol=1e-5, atol=1e-6).passed
    assert _signature(tg.find_sites(converted, x, through=tg.THROUGH_OPTIONS)) == _signature(
        tg.find_sites(model, x, through=tg.THROUGH_OPTIONS)
    )


def test_an_onnx_user_can_measure_statistics_and_train() -> None:
    import torch

    entry = next(e for e in TRACEABLE if e.name == "paper_cnn")
    x = example_input(entry, batch=8)
    converted = tg.to_torch(tg.export_onnx(entry.build(), x))
    sites = tg.find_sites(converted, x)
    data = [(x, torch.randint(0, 10, (8,)))]
    stats = tg.a_statistics(converted, sites[:2], data, torch.nn.functional.cross_entropy, progress=False)
    assert all(s.sigma > 0 for s in stats.values())
    optimizer = torch.optim.SGD(converted.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(converted(x), data[0][1])
    loss.backward()
    optimizer.step()
    assert torch.nn.functional.cross_entropy(converted(x), data[0][1]) < loss


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_model_over_the_protobuf_limit_is_exported_with_external_data(
    exporter: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past 2 GiB protobuf cannot serialise a model: it is checked and written with external data.

    The limit is lowered so that a small model takes the path a 2.6 GB regnet_y_128gf takes.
    """
    from onnx import numpy_helper

    from tunnelgraph.backends import onnx as onnx_backend
    from tunnelgraph.backends import onnx_export

    monkeypatch.setattr(onnx_backend, "SERIALISABLE", 1024)  # what is_large and save_onnx read
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 1024)  # the TorchScript exporter writes through a file
    if exporter == "torchscript":
        def refuse(*args: object, **kwargs: object) -> None:
            raise RuntimeError("the dynamo exporter is switched off for this test")

        monkeypatch.setattr(onnx_export, "_dynamo", refuse)
    model = paper_cnn().eval()
    x = torch.randn(2, 1, 28, 28)
    path = tmp_path / "big.onnx"
    proto = tg.export_onnx(model, x, path)
    data = tmp_path / "big.onnx.data"
    assert data.exists() and data.stat().st_size > path.stat().st_size
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}  # the returned model keeps its data
    assert sum(w.size for w in weights.values()) >= sum(p.numel() for p in model.parameters())
    loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert loaded.keys() == weights.keys() and all(np.array_equal(loaded[k], weights[k]) for k in weights)
    assert [s.name for s in tg.find_sites(str(path))] == [s.name for s in tg.find_sites(model, x)]
    tg.export_onnx(model, x, path)  # written again over itself: the data file is replaced, not appended to
    assert data.stat().st_size < 2 * sum(w.nbytes for w in weights.values())


def test_a_model_over_the_protobuf_limit_is_analysed_and_left_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shape inference serialises the model: past 2 GiB its tensors' data is set aside meanwhile."""
    from tunnelgraph.frontends import onnx as onnx_frontend

    model = paper_cnn().eval()
    x = torch.randn(2, 1, 28, 28)
    proto = tg.export_onnx(model, x)
    before = proto.SerializeToString()
    expected = [(s.name, s.inbound_size, s.outbound_size) for s in tg.find_sites(proto)]
    monkeypatch.setattr(onnx_frontend, "PROTOBUF_LIMIT", 1024)
    graph = tg.load_onnx(proto)
    assert [(s.name, s.inbound_size, s.outbound_size) for s in tg.find_sites(graph)] == expected
    assert proto.SerializeToString() == before
    rewritten = tg.rewrite(proto, expected[1][0], 0.3)
    assert tg.verify(proto, rewritten, x).passed


def test_a_model_over_the_protobuf_limit_runs_in_onnxruntime_from_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime is given a file with external data when the model cannot be serialised (tg.verify on it)."""
    import onnxruntime

    from tunnelgraph.backends import onnx as onnx_backend

    model = paper_cnn().eval()
    x = torch.randn(2, 1, 28, 28)
    proto = tg.export_onnx(model, x)
    before = proto.SerializeToString()
    monkeypatch.setattr(onnx_backend, "SERIALISABLE", 1024)
    sources: list[object] = []
    session = onnxruntime.InferenceSession

    def recording(source: object, *args: object, **kwargs: object) -> object:
        sources.append(source)
        return session(source, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    assert tg.verify(model, proto, x).passed
    assert sources and all(isinstance(source, str) and source.endswith(".onnx") for source in sources)
    assert proto.SerializeToString() == before


def test_a_rewrite_over_the_protobuf_limit_is_exact_and_leaves_the_input_untouched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The limit lowered: analysis, a rewrite into a copy and successive in-place rewrites of a large model."""
    from tunnelgraph.backends import onnx as onnx_backend
    from tunnelgraph.frontends import onnx as onnx_frontend

    model = paper_cnn().eval()
    x = torch.randn(2, 1, 28, 28)
    proto = tg.export_onnx(model, x)
    before = proto.SerializeToString()
    monkeypatch.setattr(onnx_backend, "SERIALISABLE", 1024)
    monkeypatch.setattr(onnx_frontend, "PROTOBUF_LIMIT", 1024)
    sites = tg.find_sites(proto)
    lam = np.random.default_rng(0).uniform(-0.5, 1.5, sites[1].outbound_size)
    rewritten = tg.rewrite(proto, sites[1], lam)
    assert proto.SerializeToString() == before
    assert tg.verify(proto, rewritten, x).passed
    assert tg.verify(model, rewritten, x).passed
    current, copied = _copy(proto), proto
    for index in (1, 4, 1):  # each site found on the model as it is now
        site = tg.find_sites(current)[index]
        copied = tg.rewrite(copied, site, 0.3)
        assert tg.rewrite(current, site, 0.3, inplace=True) is current
    assert proto.SerializeToString() == before
    assert current.SerializeToString() == copied.SerializeToString()
    assert len(tg.rewrite_records(current)) == 3
    assert tg.verify(proto, current, x).passed
