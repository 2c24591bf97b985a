"""Matrix-free A-statistics against the exact path on the general chains of zoo models.

A group whose chain is not element-wise (pooling, a squeeze-excite gate, a
concat, a channels-last block) is solved by Lanczos on products through
the chain's linearisation (docs/MATH.md section 8); this script checks those
products on real architectures. For each model (torchvision names with
``--models``, timm names with ``--timm``; needs those packages), in float64
and eval mode, on two batches of two random images: the first groups with
such a chain and at most ``--entries`` entries of A per channel (so that the
exact path stays cheap), ``--sites`` sites each, up to ``--groups`` groups;
``tg.a_statistics`` with ``method="matrix_free"`` (``tol=1e-8``) and with
``method="exact"``. Prints per model the largest relative difference of
sigma and the smallest ``|cos|`` between the two lambda*.

Usage::

    python benchmarks/zoo_statistics.py --models mobilenet_v3_small,densenet121 --timm ghostnet_100
    python benchmarks/zoo_statistics.py --selection --models resnet18,vgg11_bn --timm resnet18
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import tunnelgraph as tg
from tunnelgraph.statistics.chain import GroupChain


def general_sites(
    model: nn.Module, graph: tg.Graph, entries: int, groups: int, per_group: int, selection: bool = False
) -> list[tg.Site]:
    """Sites of the first ``groups`` groups whose chain is not diagonal and whose A has at most ``entries``.

    With ``selection``, only groups whose chain passes one max pool between element-wise maps
    (``GroupChain.selection``, products through the pool's indices rather than a linearisation).
    """
    found: dict[str, list[tg.Site]] = {}
    for site in tg.find_sites(graph, through=tg.THROUGH_OPTIONS):
        if not site.group.self_consumers and not site.group.unmeasured:
            found.setdefault(site.group.name, []).append(site)
    chosen: list[tg.Site] = []
    for members in found.values():
        group = members[0].group
        if group.inbound_size * group.outbound_size > entries:
            continue
        chain = GroupChain(model, graph, group)
        pairs = [(i, j) for i in range(len(chain.producers)) for j in range(len(chain.consumers))]
        if selection and chain.selection is None:
            continue
        if any(chain.reach[i][j] and not chain.diagonal[i][j] for i, j in pairs):
            chosen += members[:per_group]
            groups -= 1
        if groups == 0:
            break
    return chosen


def check(name: str, build: Callable[[], nn.Module], size: int, args: argparse.Namespace) -> str:
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build().double().eval()
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    data = [(x[:2], y[:2]), (x[2:], y[2:])]
    graph = tg.trace(model, x[:2])
    sites = general_sites(model, graph, args.entries, args.groups, args.sites, args.selection)
    if not sites:
        return f"{name}: no group with a general chain and at most {args.entries} entries of A per channel"
    kwargs: dict[str, Any] = {"progress": False, "graph": graph}
    free = tg.a_statistics(model, sites, data, F.cross_entropy, method="matrix_free", tol=1e-8, max_steps=60,
                           **kwargs)
    exact = tg.a_statistics(model, sites, data, F.cross_entropy, method="exact", **kwargs)
    sigma = max(abs(free[s.name].sigma - exact[s.name].sigma) / max(exact[s.name].sigma, 1e-300) for s in sites)
    cosine = min(abs(float(free[s.name].direction @ exact[s.name].direction)) if exact[s.name].sigma > 0 else 1.0
                 for s in sites)
    groups = len({site.group_name for site in sites})
    return (f"{name}: {len(sites)} sites in {groups} groups with general chains: sigma relative difference "
            f"<= {sigma:.1e}, |cos| >= {cosine:.8f} ({time.perf_counter() - start:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="torchvision model names, comma-separated")
    parser.add_argument("--timm", default="", help="timm model names, comma-separated")
    parser.add_argument("--size", type=int, default=64, help="image side (inception_v3: at least 75)")
    parser.add_argument("--entries", type=int, default=3_000_000, help="most entries of A per channel")
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--sites", type=int, default=2, help="sites per group")
    parser.add_argument("--selection", action="store_true",
                        help="only groups whose chain passes one max pool between element-wise maps")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, float64, {torch.get_num_threads()} threads")
    for name in filter(None, args.models.split(",")):
        import torchvision

        constructor = getattr(torchvision.models, name)
        size = max(args.size, 96) if "inception" in name else args.size
        print(check(name, lambda: constructor(weights=None, num_classes=10), size, args), flush=True)
    for name in filter(None, args.timm.split(",")):
        import timm

        print(check(f"timm {name}", lambda: timm.create_model(name, pretrained=False, num_classes=10), args.size,
                    args), flush=True)


if __name__ == "__main__":
    main()
