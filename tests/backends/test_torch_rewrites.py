"""Function preservation and the paper's invariants for every rewrite, over the whole zoo."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

import tunnelgraph as tg
from zoo import ZOO_BY_NAME, ZooEntry, example_input

ALL_THROUGH = tg.THROUGH_OPTIONS
LIMITS = {torch.float32: 1e-5, torch.float64: 1e-10}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _set_mode(model: nn.Module, mode: str) -> None:
    """Eval, or train mode for batch norm (dropout stays off: its masks are random)."""
    model.eval()
    if mode == "train":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()


def _sites(model: nn.Module, x: torch.Tensor, through: tuple[str, ...]) -> list[tg.Site]:
    return tg.find_sites(model, x, through=through)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("through", [(), ALL_THROUGH], ids=["default", "through_all"])
def test_rewrite_preserves_function_at_every_site(
    zoo_entry: ZooEntry, dtype: torch.dtype, through: tuple[str, ...]
) -> None:
    model = zoo_entry.build().to(dtype)
    x = example_input(zoo_entry, dtype)
    sites = _sites(model, x, through)
    rng = np.random.default_rng(0)
    modes = ["eval", "train"] if zoo_entry.has_batchnorm else ["eval"]
    worst = 0.0
    for site in sites:
        lam = rng.uniform(-0.5, 1.5, site.outbound_size)
        rewritten = tg.rewrite(model, site, lam)
        for mode in modes:
            _set_mode(model, mode)
            _set_mode(rewritten, mode)
            report = tg.verify(model, rewritten, x)
            assert report.passed, f"{site.name} ({mode}): {report}"
            worst = max(worst, report.max_rel)
        model.eval()
    assert worst <= LIMITS[dtype]


def test_rewrite_adds_one_channel_and_keeps_module_classes(zoo_entry: ZooEntry) -> None:
    model = zoo_entry.build()
    x = example_input(zoo_entry)
    for site in _sites(model, x, ALL_THROUGH)[:: max(1, len(_sites(model, x, ALL_THROUGH)) // 5)]:
        rewritten = tg.rewrite(model, site, 0.3)
        again = {s.name: s for s in tg.find_sites(rewritten, x, through=ALL_THROUGH)}
        clone_name = f"{site.group_name}[{site.group.size}]"
        assert clone_name in again, f"{clone_name} missing after rewriting {site.name}"
        assert again[clone_name].group.size == site.group.size + 1
        modules = dict(rewritten.named_modules())
        for name, original in model.named_modules():
            if name in modules and not isinstance(rewritten, torch.fx.GraphModule):
                assert type(modules[name]) is type(original)
        for name in site.producers:
            module = modules[name]
            assert module.weight.shape[0] == dict(model.named_modules())[name].weight.shape[0] + 1
            if isinstance(module, nn.Linear):
                assert module.out_features == module.weight.shape[0]
            else:
                assert module.out_channels == module.weight.shape[0]


def test_rewrite_never_touches_the_input_model(zoo_entry: ZooEntry) -> None:
    model = zoo_entry.build()
    x = example_input(zoo_entry)
    before = _params(model)
    sites = _sites(model, x, ALL_THROUGH)
    tg.rewrite(model, sites[0], 0.7)
    tg.merge(model, sites[0], into=1 if sites[0].channel == 0 else 0)
    after = _params(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_right_after_rewrite_restores_the_original(zoo_entry: ZooEntry) -> None:
    model = zoo_entry.build()
    x = example_input(zoo_entry)
    original = _params(model)
    rng = np.random.default_rng(1)
    sites = _sites(model, x, ALL_THROUGH)
    for site in sites[:: max(1, len(sites) // 6)]:
        rewritten = tg.rewrite(model, site, rng.uniform(0, 1, site.outbound_size))
        clone = {s.name: s for s in tg.find_sites(rewritten, x, through=ALL_THROUGH)}[
            f"{site.group_name}[{site.group.size}]"
        ]
        closed = tg.merge(rewritten, clone, into=site.channel)
        restored = _params(closed)
        assert restored.keys() == original.keys()
        for key, tensor in original.items():
            assert restored[key].shape == tensor.shape, key
            assert (restored[key].double() - tensor.double()).abs().max().item() <= 1e-6, key


def _make_redundant(model: nn.Module, site: tg.Site, channel: int, into: int) -> None:
    """Copy ``into``'s inbound and per-channel entries onto ``channel`` (Sussmann 1c by construction)."""
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    with torch.no_grad():
        for param_slice in site.group.slices:
            if param_slice.role == "outbound":
                continue
            tensor = state[param_slice.param]
            block = param_slice.block
            source = tensor.narrow(param_slice.axis, param_slice.offset + into * block, block).clone()
            tensor.narrow(param_slice.axis, param_slice.offset + channel * block, block).copy_(source)


def test_reorganize_on_a_redundant_pair_preserves_function_and_shapes(zoo_entry: ZooEntry) -> None:
    model = zoo_entry.build()
    x = example_input(zoo_entry)
    groups = [g for g in tg.analyze(model, x, through=ALL_THROUGH).groups if g.legal and g.size >= 3]
    assert groups, "every zoo model has a legal group of 3 or more channels"
    rng = np.random.default_rng(2)
    for group in groups:
        site = tg.Site.of(group, 2)
        _make_redundant(model, site, channel=2, into=0)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        lam = rng.uniform(0, 1, site.outbound_size)
        reorganized = tg.reorganize(model, merge=(site, 0), clone=1, lam=lam)
        assert {k: v.shape for k, v in reorganized.state_dict().items()} == shapes
        report = tg.verify(model, reorganized, x)
        assert report.passed and report.max_rel <= 1e-5, f"{group.name}: {report}"


def _inbound_gradients(model: nn.Module, site: tg.Site, x: torch.Tensor, channels: list[int]) -> list[torch.Tensor]:
    """d(loss)/d(inbound weights) of each of ``channels``, concatenated over the site's producers."""
    model.zero_grad()
    output = model(x)
    loss = (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum() + (output ** 2).sum()
    loss.backward()
    named = dict(model.named_parameters())
    gradients = []
    for channel in channels:
        parts = []
        for param_slice in site.group.slices:
            if param_slice.role == "inbound":
                grad = named[param_slice.param].grad
                parts.append(grad.narrow(0, param_slice.offset + channel * param_slice.block, param_slice.block).flatten())
        gradients.append(torch.cat(parts))
    return gradients


@pytest.mark.parametrize("lam_kind", ["random", "half"])
def test_inbound_gradients_of_channel_and_clone_sum_to_the_original(zoo_entry: ZooEntry, lam_kind: str) -> None:
    model = zoo_entry.build().double()
    x = example_input(zoo_entry, torch.float64)
    # where a layer both produces and reads the group, cloning adds an inbound weight to the channel
    # itself, so its inbound weights before and after are not the same entries (the rewrite is still
    # exact: test_rewrite_preserves_function_at_every_site)
    sites = [site for site in _sites(model, x, ALL_THROUGH) if not site.group.self_consumers]
    rng = np.random.default_rng(3)
    for site in sites[:: max(1, len(sites) // 4)]:
        lam = rng.uniform(-1, 2, site.outbound_size) if lam_kind == "random" else 0.5
        rewritten = tg.rewrite(model, site, lam)
        (original,) = _inbound_gradients(model, site, x, [site.channel])
        kept, clone = _inbound_gradients(rewritten, site, x, [site.channel, site.group.size])
        scale = original.abs().max().item() + 1e-30
        assert (kept + clone - original).abs().max().item() <= 1e-10 * scale + 1e-14
        if lam_kind == "half":
            assert torch.allclose(kept, clone, rtol=1e-10, atol=1e-14)
            assert torch.allclose(kept, original / 2, rtol=1e-10, atol=1e-14)


def test_inplace_rewrite_edits_the_given_model() -> None:
    entry = ZOO_BY_NAME["mlp_tanh"]
    model = entry.build()
    x = example_input(entry)
    reference = copy.deepcopy(model)
    site = _sites(model, x, ())[0]
    result = tg.rewrite(model, site, 0.25, inplace=True)
    assert result is model
    assert model.fc1.out_features == 17 and model.fc2.in_features == 17
    assert tg.verify(reference, model, x).passed


def test_failed_rewrite_leaves_the_original_untouched() -> None:
    entry = ZOO_BY_NAME["paper_cnn"]
    model = entry.build()
    x = example_input(entry)
    before = _params(model)
    site = _sites(model, x, ())[0]
    with pytest.raises(ValueError, match="5760"):
        tg.rewrite(model, site, np.ones(7), inplace=True)
    wider = tg.rewrite(model, site, 0.5)
    stale = tg.find_sites(wider, x)[0]
    with pytest.raises(tg.SiteError, match="find_sites"):
        tg.rewrite(model, stale, 0.5, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in _params(model).items())


def test_hard_coded_view_width_is_carried_by_a_graph_module() -> None:
    entry = ZOO_BY_NAME["hardcoded_view"]
    model = entry.build()
    x = example_input(entry)
    site = [s for s in _sites(model, x, ()) if s.group_name == "conv2"][0]
    rewritten = tg.rewrite(model, site, 0.5)
    assert isinstance(rewritten, torch.fx.GraphModule)
    assert "112" in rewritten.code  # 96 + 16 pixels of the new filter
    assert tg.verify(model, rewritten, x).passed
    before = _params(model)
    with pytest.raises(tg.RewriteError, match="inplace=False"):
        tg.rewrite(model, site, 0.5, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in _params(model).items())
    other = [s for s in _sites(model, x, ()) if s.group_name == "conv1"][0]
    assert not isinstance(tg.rewrite(model, other, 0.5), torch.fx.GraphModule)


def test_rewritten_model_saves_and_loads(tmp_path) -> None:
    entry = ZOO_BY_NAME["resnet_stack"]
    model = entry.build()
    x = example_input(entry)
    site = tg.find_sites(model, x, through=ALL_THROUGH)[0]
    rewritten = tg.rewrite(model, site, 0.5)
    torch.save(rewritten, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert tg.verify(rewritten, loaded, x).max_abs == 0.0
    fresh = copy.deepcopy(rewritten)
    for tensor in fresh.parameters():
        tensor.data.zero_()
    fresh.load_state_dict(rewritten.state_dict())
    assert tg.verify(rewritten, fresh, x).max_abs == 0.0


def test_site_by_name_needs_example_inputs() -> None:
    entry = ZOO_BY_NAME["mlp_tanh"]
    model = entry.build()
    x = example_input(entry)
    with pytest.raises(tg.SiteError, match="example_inputs"):
        tg.rewrite(model, "fc1[3]", 0.5)
    rewritten = tg.rewrite(model, "fc1[3]", 0.5, example_inputs=x)
    assert rewritten.fc1.out_features == 17
    with pytest.raises(tg.SiteError, match="legal groups: fc1, fc2, fc3"):
        tg.rewrite(model, "fc9[3]", 0.5, example_inputs=x)
    with pytest.raises(tg.SiteError, match="out of range"):
        tg.rewrite(model, "fc1[16]", 0.5, example_inputs=x)


def test_lambda_entries_follow_the_documented_order() -> None:
    """Entry e of lam scales consumer weight (out_unit, pixel) with e = out_unit * pixels + pixel."""
    entry = ZOO_BY_NAME["paper_cnn"]
    model = entry.build().double()
    x = example_input(entry, torch.float64)
    site = _sites(model, x, ())[5]
    pixels = 24 * 24
    lam = np.arange(site.outbound_size, dtype=np.float64) / site.outbound_size
    rewritten = tg.rewrite(model, site, lam)
    before = model.fc.weight[:, 5 * pixels:6 * pixels].detach()
    after = rewritten.fc.weight[:, 5 * pixels:6 * pixels].detach()
    clone = rewritten.fc.weight[:, 8 * pixels:9 * pixels].detach()
    expected = torch.from_numpy(lam.reshape(10, pixels))
    torch.testing.assert_close(after, expected * before)
    torch.testing.assert_close(clone, (1 - expected) * before)


def test_lambda_order_spans_consumers_in_site_order() -> None:
    entry = ZOO_BY_NAME["resnet_stack"]
    model = entry.build().double()
    x = example_input(entry, torch.float64)
    site = tg.find_sites(model, x, through=ALL_THROUGH)[2]  # the residual stream, channel 2
    assert site.consumers == ("layer1.0.conv1", "layer1.1.conv1", "fc")
    lam = np.concatenate([np.full(8 * 9, 0.1), np.full(8 * 9, 0.2), np.full(10, 0.3)])
    rewritten = tg.rewrite(model, site, lam)
    for name, factor in (("layer1.0.conv1", 0.1), ("layer1.1.conv1", 0.2), ("fc", 0.3)):
        old = dict(model.named_modules())[name].weight[:, 2]
        new = dict(rewritten.named_modules())[name].weight[:, 2]
        torch.testing.assert_close(new, factor * old)


class _FunctionalBatchNorm(nn.BatchNorm1d):
    """timm's BatchNormAct style: fx traces through it and reads four of its five tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class _HardCodedWidthWithUnreadTensors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 1)
        self.bn = _FunctionalBatchNorm(3)
        self.fc = nn.Linear(12, 2)
        self.unused = nn.Linear(3, 3)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).view(-1, 12))


def test_a_graph_module_result_keeps_the_tensors_its_forward_does_not_read() -> None:
    """Random architectures: the GraphModule lost bn.num_batches_tracked and the unused layer, and
    held a plain stand-in for the batch norm, which a second rewrite could not resize."""
    model = _HardCodedWidthWithUnreadTensors().eval()
    x = torch.randn(2, 2, 4)
    site = tg.find_sites(model, x, through=("batchnorm",))[0]
    rewritten = tg.rewrite(model, site, 0.5)
    assert isinstance(rewritten, torch.fx.GraphModule)
    assert set(rewritten.state_dict()) == set(model.state_dict())
    assert {name for name, _ in rewritten.named_buffers()} == {name for name, _ in model.named_buffers()}
    assert isinstance(rewritten.unused, nn.Linear) and isinstance(rewritten.bn, _FunctionalBatchNorm)
    assert tuple(rewritten.bn.running_mean.shape) == (4,) and rewritten.bn.num_batches_tracked.shape == ()
    assert tg.verify(model, rewritten, x).passed
    # it rewrites again (the batch norm was a plain stand-in module that tunnelgraph could not resize)
    again = tg.find_sites(rewritten, x, through=("batchnorm",))[0]
    twice = tg.rewrite(rewritten, again, 0.3)
    assert twice.bn.num_features == 5 and twice.fc.in_features == 20
    assert tg.verify(model, twice, x).passed


class _HardCodedReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(18, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).reshape(-1, 18))


def test_a_hard_coded_width_the_fx_retrace_cannot_find_is_a_rewrite_error() -> None:
    """Random architectures: a literal recorded at another argument path (the torch.export capture
    wrote reshape(x, [-1, 18]) where fx sees x.reshape(-1, 18)) raised a TypeError while patching."""
    model = _HardCodedReshape().eval()
    x = torch.randn(2, 1, 5, 5)
    site = [s for s in tg.find_sites(model, x) if s.group_name == "conv"][0]
    (literal,) = site.group.literals
    assert tg.verify(model, tg.rewrite(model, site, 0.5), x).passed
    elsewhere = dataclasses.replace(site.group, literals=(dataclasses.replace(literal, path=(1, 1)),))
    with pytest.raises(tg.RewriteError, match="literal width 18 of node 'reshape'"):
        tg.rewrite(model, tg.Site.of(elsewhere, 0), 0.5)
