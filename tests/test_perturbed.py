"""Checks that can fail: generic parameters, and how much a model's output depends on its input."""

from __future__ import annotations

import torch
import torch.nn as nn

import tunnelgraph as tg
from tunnelgraph.models import paper_cnn


class ZeroHead(nn.Module):
    """A conv trunk with a zero-initialised classifier and a layer scale of 1e-6 (as ViT / ConvNeXt start)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gamma = nn.Parameter(torch.full((4,), 1e-6))
        self.head = nn.Linear(4 * 6 * 6, 3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)) * self.gamma[None, :, None, None]
        return self.head(h.flatten(1))


def test_a_zero_head_hides_a_broken_rewrite_and_the_perturbed_copy_shows_it() -> None:
    torch.manual_seed(0)
    model = ZeroHead().eval()
    x = torch.randn(8, 1, 8, 8)
    assert tg.output_sensitivity(model, x) == 0.0
    broken = ZeroHead().eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.conv.weight[0] += 1.0  # a "rewrite" that changes the function
    assert tg.verify(model, broken, x).passed  # the fresh model cannot tell

    generic = tg.perturbed(model, generator=torch.Generator().manual_seed(1))
    assert tg.output_sensitivity(generic, x) > 0.1
    assert (generic.head.weight != 0).all() and generic.gamma.abs().min() > 1e-4
    wrong = tg.perturbed(model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        wrong.conv.weight[0] += 1.0
    assert not tg.verify(generic, wrong, x).passed  # the perturbed one can
    assert (model.head.weight == 0).all()  # the given model is untouched


def test_perturbed_copies_are_reproducible_and_keep_buffers() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    a = tg.perturbed(model, generator=torch.Generator().manual_seed(5))
    b = tg.perturbed(model, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a[1].running_var, model[1].running_var)
    assert not torch.equal(a[0].weight, model[0].weight)


def test_a_tunnel_on_a_perturbed_model_passes_in_float64() -> None:
    torch.manual_seed(3)
    model = tg.perturbed(paper_cnn(), generator=torch.Generator().manual_seed(3)).double().eval()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    opened = tg.rewrite(model, tg.find_sites(model, x)[2], lam=0.3)
    assert tg.output_sensitivity(model, x) > 0.01
    assert tg.verify(model, opened, x).passed and tg.verify(model, opened, x).rtol == 1e-10


def test_perturbed_and_output_sensitivity_leave_the_model_as_it_was_bit_for_bit() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Dropout(0.5)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    objects = [id(p) for p in model.parameters()]
    x = torch.randn(4, 1, 6, 6)
    tg.perturbed(model, generator=torch.Generator().manual_seed(0))
    tg.output_sensitivity(model, x)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # running stats included
    assert [id(p) for p in model.parameters()] == objects and all(m.training for m in model.modules())
