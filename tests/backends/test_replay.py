"""tg.replay: a freshly built model of the user's class takes a rewritten model's shapes, so its state_dict loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tunnelgraph as tg
from tunnelgraph.rewrite import edits
from tunnelgraph.models import paper_cnn, residual_net
from zoo import TRACEABLE, ZooEntry, example_input

THROUGH = ("batchnorm", "pooling", "dropout", "depthwise")


def _rewritten(entry: ZooEntry, x: torch.Tensor) -> torch.nn.Module | None:
    """Two clones (of the first and last site), then a merge of the first clone back: three records."""
    torch.manual_seed(0)
    model = entry.build().eval()
    sites = tg.find_sites(model, x, through=THROUGH)
    if not sites:
        return None
    first, last = sites[0], sites[-1]
    opened = tg.rewrite(model, first, lam=0.3)
    opened = tg.rewrite(opened, last.name, lam=0.7, example_inputs=x, through=THROUGH)
    group = {s.name: s for s in tg.find_sites(opened, x, through=THROUGH)}
    clone = f"{first.group.name}[{first.group.size}]"
    return tg.merge(opened, group[clone], into=first.channel)


@pytest.mark.parametrize("entry", [e for e in TRACEABLE if e.name != "hardcoded_view"], ids=lambda e: e.name)
def test_a_fresh_model_of_every_zoo_class_loads_a_rewritten_state_dict(entry: ZooEntry, tmp_path: Path) -> None:
    x = example_input(entry)
    rewritten = _rewritten(entry, x)
    if rewritten is None:
        pytest.skip(f"{entry.name} has no sites")
    records = tg.save_records(rewritten, tmp_path / "records.json")
    torch.save(rewritten.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(RuntimeError, match="size mismatch"):
        entry.build().load_state_dict(torch.load(tmp_path / "weights.pt"))
    fresh = tg.replay(entry.build(), tmp_path / "records.json")
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt"))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), rewritten(x))
    assert [r.to_dict() for r in tg.rewrite_records(fresh)] == [r.to_dict() for r in records]
    for module_name, module in fresh.named_modules():  # size attributes follow the tensors
        if isinstance(module, torch.nn.Conv2d):
            assert module.out_channels == module.weight.shape[0], module_name
        if isinstance(module, torch.nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape), module_name


def test_replay_reads_records_from_a_model_a_list_or_dicts() -> None:
    torch.manual_seed(1)
    model = residual_net(blocks=2, width=6, in_channels=1)
    x = torch.randn(2, 1, 8, 8)
    site = tg.find_sites(model, x, through=("batchnorm", "pooling"))[0]
    opened = tg.rewrite(model, site, lam=0.4)
    for source in (opened, tg.rewrite_records(opened), [r.to_dict() for r in tg.rewrite_records(opened)]):
        fresh = tg.replay(residual_net(blocks=2, width=6, in_channels=1), source)
        fresh.load_state_dict(opened.state_dict())
        assert fresh.stem[1].num_features == 7 and fresh.stem[0].out_channels == 7


def test_a_record_of_another_class_is_refused_and_the_model_is_untouched() -> None:
    torch.manual_seed(2)
    opened = tg.rewrite(paper_cnn(), "conv[1]", lam=0.5, example_inputs=torch.randn(1, 1, 28, 28))
    for other, message in [
        (torch.nn.Sequential(torch.nn.Conv2d(1, 8, 5), torch.nn.Flatten()), "replay needs a model of the class"),
        (residual_net(blocks=1, width=4, in_channels=1), "another model class"),  # it has an fc.weight too
    ]:
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(tg.RewriteError, match=message):
            tg.replay(other, opened)
        assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
        assert tg.rewrite_records(other) == []


def test_replaying_onto_an_already_rewritten_model_is_refused_before_anything_changes() -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 1, 28, 28)
    opened = tg.merge(tg.rewrite(paper_cnn(), "conv[1]", lam=0.5, example_inputs=x), "conv[8]", into=1,
                      example_inputs=x)
    smaller = tg.reduce(paper_cnn(), x)[0]
    narrow = paper_cnn()
    for _ in range(3):
        narrow = tg.apply_edit(narrow, tg.find_sites(narrow, x)[0].group, edits.remove(narrow.conv.out_channels, 0))
    assert narrow.conv.out_channels == 5 and smaller.conv.out_channels == 8
    before = {k: v.clone() for k, v in narrow.state_dict().items()}
    records = [r.to_dict() for r in tg.rewrite_records(opened)]
    with pytest.raises(tg.RewriteError, match="too small along axis"):
        tg.replay(narrow, records)
    assert all(torch.equal(before[k], v) for k, v in narrow.state_dict().items())
    json.dumps(records)


def test_replay_takes_only_pytorch_modules() -> None:
    with pytest.raises(TypeError, match="PyTorch module"):
        tg.replay("model.onnx", [])  # type: ignore[arg-type]
