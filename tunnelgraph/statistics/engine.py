"""The A-statistics engine: the matrix A of every site, its top singular triplet, over a data set.

For a site (channel ``c`` of a group) with K inbound entries and L outbound
entries, docs/MATH.md sections 4, 5 and 7 define ``A`` (K x L): column ``l`` is
the gradient of the channel's inbound weights carried by the error that
flows back through outbound entry ``l`` alone. After opening the tunnel with
a vector ``lam``, the channel's inbound gradient is ``A @ lam`` and the
clone's ``A @ (1 - lam)``; ``A @ 1`` is the current gradient.

Two paths compute it, for every channel of a group at once:

- **exact**: A itself, one forward-mode pass of the group's chain per
  inbound row, contracted with each consumer's output error (a weight
  gradient); the top singular triplet then comes from the smaller Gram
  matrix. Memory is bounded by chunking samples and rows
  (``memory_budget``), whatever the data set's size.
- **matrix-free**: only products ``A v`` (a consumer's input gradient with
  its outbound weights scaled by ``v``, pushed back through the chain to a
  producer weight gradient) and ``A^T u`` (a producer's forward with inbound
  weights ``u``, pushed through the chain to a consumer weight gradient),
  each one batched convolution pass over stored activations and errors,
  inside symmetric Lanczos on ``A^T A`` (one product with A, then one with
  A^T, per step; or a cheaper product with ``B B^T`` where the group's
  factors allow it). A is never formed.

``method="auto"`` picks the cheaper by counting multiply-adds.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Iterator, Literal, Sequence

import torch
import torch.distributed as dist
import torch.fx
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from tunnelgraph.analysis.sites import Site
from tunnelgraph.errors import StatisticsError
from tunnelgraph.frontends.fx import trace
from tunnelgraph.ir import Graph
from tunnelgraph.rewrite.plan import check_shapes
from tunnelgraph.runtime import (
    all_finite,
    batch_parts,
    model_device,
    preserved,
    progress_bar,
    resident_memory,
    return_freed_memory,
    to_device,
    unwrap_model,
)
from tunnelgraph.statistics.capture import Capture, Recorder, merge
from tunnelgraph.statistics.chain import (
    GramFactors,
    GroupChain,
    LinearisedChain,
    SelectionFactors,
    conv_patches,
    host_channels,
)
from tunnelgraph.statistics.solve import Operator, Workspace, lanczos_gram_top, top_singular

logger = logging.getLogger(__name__)

Method = Literal["auto", "exact", "matrix_free"]
LossFn = Callable[[Any, Any], torch.Tensor]

DEFAULT_MEMORY_BUDGET = 128 * 2**20
"""Bytes of working memory a group's solve aims for (see :func:`a_statistics`). On the ResNet-18 benchmark
(``benchmarks/bench_network.py``) 128 MiB was no slower than 256 MiB, and peaked about 70 MiB lower."""


@dataclass(frozen=True)
class SiteStatistics:
    """What the data says about opening one site.

    Attributes:
        site: the site measured (its :attr:`name` is the key of
            :func:`a_statistics`' result).
        a: A (K x L, float64, on the CPU): rows are the channel's inbound
            entries in the order of the group's inbound slices (producer by
            producer, weight entries row-major then the bias), columns its
            outbound entries in lambda's order (see :class:`~tunnelgraph.Site`).
            ``None`` when the matrix-free path measured the site.
        sigma: the top singular value of A; sites rank by it.
        direction: lambda*, the top right singular vector (length L, unit
            norm), its sign fixed so that its largest-magnitude entry is
            positive; on the CPU, in the statistics' precision (float64 for
            a float64 model, else float32: the precision the products with
            A ran in).
        gradient: ``A @ 1`` (length K), the current gradient of the channel's
            inbound weights; on the CPU, in the statistics' precision. The
            sites of a group share one tensor: each site's ``direction`` and
            ``gradient`` are rows (views) of it.
        samples: how many samples the sums ran over.
        method: ``"exact"`` or ``"matrix_free"``.
        steps: Lanczos steps (products with A and with A^T) on the
            matrix-free path; 0 on the exact path.
        residual: ``||A^T u - sigma v|| / sigma`` of the returned pair (0 on
            the exact path).
    """

    site: Site
    a: torch.Tensor | None
    sigma: float
    direction: torch.Tensor
    gradient: torch.Tensor
    samples: int
    method: str
    steps: int = 0
    residual: float = 0.0

    @property
    def name(self) -> str:
        """The site's name."""
        return self.site.name

    def __repr__(self) -> str:
        a = "None" if self.a is None else str(tuple(self.a.shape))
        return (
            f"SiteStatistics(site={self.name!r}, sigma={self.sigma:.6g}, method={self.method!r}, "
            f"samples={self.samples}, steps={self.steps}, residual={self.residual:.3g}, a={a}, "
            f"direction={tuple(self.direction.shape)}, gradient={tuple(self.gradient.shape)})"
        )


def a_statistics(
    model: nn.Module,
    sites: Sequence[Site],
    data: Iterable[Any],
    loss_fn: LossFn,
    *,
    batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    method: Method = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    max_steps: int = 20,
    tol: float = 1e-4,
    store: bool = True,
    graph: Graph | None = None,
) -> dict[str, SiteStatistics]:
    """Measure A, its top singular triplet and the current gradient for every site.

    Args:
        model: the network the sites were found on (a DistributedDataParallel
            or DataParallel wrapper is unwrapped). It runs in eval mode, so
            batch norm uses its running statistics, dropout is off and A is
            a plain sum over samples; training flags are restored afterwards,
            and nothing else about the model changes (no ``.grad`` is
            written).
        sites: sites of this model, from :func:`tunnelgraph.find_sites`.
        data: an iterable of ``(inputs, targets)`` batches, e.g. a
            DataLoader; ``inputs`` is a tensor or a tuple of tensors passed
            positionally to the model.
        loss_fn: ``loss_fn(model(*inputs), targets)`` returns the batch
            *mean* loss (as ``nn.CrossEntropyLoss()`` does). A is that of the
            mean loss over all samples seen.
        batches: use only the first ``batches`` batches (the paper's partial
            pass); default: all of ``data``.
        device: where to compute; default: where the model's parameters
            are (CUDA when the model is on a GPU). Batches are moved there.
        progress: show progress bars over the pass over the data and over
            the groups' top-triplet solves (True), never (False), or in
            interactive use only (None, the default: when stderr is a
            terminal).
        method: ``"exact"`` forms A; ``"matrix_free"`` finds the top triplet
            from products with A and A^T over stored activations (``a`` is
            then None); ``"auto"`` picks the cheaper per group.
        memory_budget: bytes of working memory a group's solve aims for:
            the chunks of samples and rows of A on the exact path; the
            Lanczos vectors of a chunk of channels on the matrix-free path
            (``max_steps`` vectors of L entries per channel, or of B's rows),
            whose chunks cost together what one solve of every channel
            would.
        max_steps, tol: Lanczos limits on the matrix-free path: stop when
            every channel's ``||A^T u - sigma v|| <= tol * sigma`` (1e-4
            gives sigma to about 1e-8 relative and lambda* to a cosine
            above 0.99999 on well-separated spectra), or after
            ``max_steps`` products with A and with A^T.
        store: the matrix-free path keeps the pass's activations and errors
            in memory (memory grows with the data); with ``store=False`` it
            re-runs the forward and backward pass over ``data`` for every
            product instead (memory independent of the data's size, about
            two passes per Lanczos step), which needs a re-iterable ``data``
            such as a list or a DataLoader.
        graph: the model's graph, from :func:`tunnelgraph.trace` on this
            very model (not a copy) in eval mode, e.g. the one the sites
            were found on; it is used as it is. Default: the model is traced
            here, once, in eval mode, on the first batch's inputs.

    When ``torch.distributed`` is initialised, each rank passes its own
    shard of the data; sums (A, or each product with A) are all-reduced, so
    every rank gets the same statistics.

    Returns:
        Site name -> :class:`SiteStatistics`.

    Raises:
        StatisticsError: ``graph`` was not traced from ``model``, a site was
            not found on it, or the data yield no usable batch.
    """
    model = unwrap_model(model)
    if not sites:
        return {}
    if graph is not None:
        check_graph(model, graph)
    device = torch.device(device) if device is not None else model_device(model)
    batches_iter = _batches(data, batches, device)
    first = next(batches_iter, None)
    if first is None:
        raise StatisticsError("data yielded no batches; pass an iterable of (inputs, targets) batches")
    batches_iter = itertools.chain([first], batches_iter)

    replay = None
    if not store:
        if iter(data) is data:
            raise StatisticsError(
                "store=False re-reads the data for every product with A: pass a re-iterable (a list or "
                "a DataLoader), not an iterator or generator"
            )
        replay = lambda: _batches(data, batches, device)  # noqa: E731
    with preserved(model, train=False):
        if graph is None:
            graph = trace(model, first[0])  # in eval mode: the chains re-execute this trace's code
        plans = _plans(model, graph, sites, method, max_steps)
        return _measure(
            model, plans, batches_iter, loss_fn, batches, progress, memory_budget, max_steps, tol, replay
        )


# -- planning -------------------------------------------------------------------------
@dataclass
class _GroupPlan:
    chain: GroupChain
    sites: list[Site]
    method: str
    positions: int = 1  # per channel and sample, summed over the values of the group's chain (its working set)

    @property
    def channels(self) -> list[int]:
        return [site.channel for site in self.sites]


def _plans(model: nn.Module, graph: Graph, sites: Sequence[Site], method: Method, max_steps: int) -> list[_GroupPlan]:
    if method not in ("auto", "exact", "matrix_free"):
        raise ValueError(f"method must be 'auto', 'exact' or 'matrix_free', got {method!r}")
    by_group: dict[str, list[Site]] = {}
    for site in sites:
        if not isinstance(site, Site):
            raise TypeError(f"sites must be tunnelgraph Sites (from tg.find_sites), got {type(site).__name__}")
        by_group.setdefault(site.group.name, []).append(site)
    plans = []
    for members in by_group.values():
        group = members[0].group
        check_sites_fit(model, members[0])
        chain = GroupChain(model, graph, group)
        chosen = method
        if method == "auto":
            exact, free = estimate_cost(chain, graph, max_steps=min(max_steps, 8))
            chosen = "exact" if exact <= free else "matrix_free"
            logger.debug("group %s: exact %.3g MAC/sample, matrix-free %.3g -> %s", group.name, exact, free, chosen)
        values = (*chain.nodes, *(spec.node for spec in chain.producers))
        positions = sum(_positions_per_sample(graph, node) for node in values)
        plans.append(_GroupPlan(chain, members, chosen, positions))
    return plans


def check_sites_fit(model: nn.Module, site: Site) -> None:
    """Raise :class:`StatisticsError` unless ``site`` was found on ``model`` and A is defined for it."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    check_shapes(site.group, {name: tuple(t.shape) for name, t in tensors.items()}, StatisticsError)
    if site.group.unmeasured:
        raise StatisticsError(
            f"site {site.name}: A-statistics are not measured for group '{site.group.name}': "
            f"{'; '.join(site.group.unmeasured)}. The rewrite is exact; leave these sites out of the "
            "statistics (tg.open_tunnels does so by itself)"
        )
    if not measurable(site):
        raise StatisticsError(
            f"site {site.name}: layer(s) {', '.join(site.group.self_consumers)} both produce and read the "
            f"channels of group '{site.group.name}' (an inverted residual block whose projection is added "
            "back to its input), so cloning a channel adds an inbound weight to the channel itself and the "
            "paper's A is not defined; the rewrite is exact, but leave these sites out of the statistics"
        )


def check_graph(model: nn.Module, graph: Graph) -> None:
    """Raise :class:`StatisticsError` unless ``graph`` was traced (:func:`tunnelgraph.trace`) from ``model`` itself.

    The statistics re-execute the graph's code on the model's layers, so
    every layer and stored tensor the trace calls must be the model's own
    object under the same name: a graph of a copy, or of the model before a
    rewrite, would silently measure other weights.
    """
    source = graph.source
    if not isinstance(source, torch.fx.GraphModule):
        raise StatisticsError(
            "graph= must be a graph traced from this PyTorch model (tg.trace(model, example_inputs)); "
            f"got one whose source is {type(source).__name__}"
        )
    for fx_node in source.graph.nodes:
        if fx_node.op not in ("call_module", "get_attr"):
            continue
        target = str(fx_node.target)
        own = _attribute(model, target)
        if own is None and fx_node.op == "get_attr":
            continue  # a constant the trace captured from outside the model (fx's _tensor_constant)
        if _attribute(source, target) is not own:
            raise StatisticsError(
                f"graph= was not traced from this model: its '{target}' is not the model's (a copy, or "
                "the model before a rewrite?); trace the model the statistics run on, or leave graph= out"
            )


def _attribute(root: nn.Module, target: str) -> object:
    value: object = root
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def measurable(site: Site) -> bool:
    """Whether A is measured for ``site``.

    Not where a layer of its group both produces and reads its channels (A
    is not defined there), nor where the group's layers are called as
    functions (``site.group.unmeasured`` says which and why).
    """
    return not site.group.self_consumers and not site.group.unmeasured


def estimate_cost(chain: GroupChain, graph: Graph, *, max_steps: int = 8) -> tuple[float, float]:
    """Multiply-adds per sample of the exact and of the matrix-free path for one group.

    Exact: every inbound row is one weight-gradient contraction per
    consumer. Matrix-free: each Lanczos step runs every producer forward and
    weight gradient and every consumer input and weight gradient once.
    """
    channels = chain.group.size
    producer_cost = sum(_positions_per_sample(graph, spec.node) * spec.size * channels for spec in chain.producers)
    consumer_cost = sum(_positions_per_sample(graph, spec.node) * spec.size * channels for spec in chain.consumers)
    exact = chain.inbound_size * consumer_cost
    free = max_steps * 2 * (producer_cost + consumer_cost)
    return float(exact), float(free)


def _positions_per_sample(graph: Graph, node: str) -> int:
    ir = graph[node]
    if ir.shape is None or ir.channel_axis is None:
        return 1
    shape = ir.shape
    return max(1, math.prod(shape) // max(1, shape[0]) // max(1, shape[ir.channel_axis]))


# -- the pass over data -----------------------------------------------------------------
def _measure(
    model: nn.Module,
    plans: list[_GroupPlan],
    batches_iter: Iterable[tuple[Any, Any]],
    loss_fn: LossFn,
    batches: int | None,
    progress: bool | None,
    memory_budget: int,
    max_steps: int,
    tol: float,
    replay: Callable[[], Iterable[tuple[Any, Any]]] | None = None,
) -> dict[str, SiteStatistics]:
    exact_plans = [plan for plan in plans if plan.method == "exact"]
    free_plans = [plan for plan in plans if plan.method == "matrix_free"]
    sums: dict[int, ExactSums | None] = {id(plan): None for plan in exact_plans}
    stored: list[Capture] = []
    gradients = InboundGradients([plan.chain for plan in free_plans], model_device(model))
    # A 1 from the pass for the groups solved matrix-free; the exact path sums it from A itself
    inbound = {spec.node for plan in free_plans for spec in plan.chain.producers}
    samples = largest = 0
    # under store=False the solves replay the data: this pass records the exact groups alone, and only sums the
    # inbound gradients of the others (every layer's values of a batch would otherwise be kept as it runs)
    recorded = plans if replay is None else exact_plans
    silent = [] if replay is None else free_plans
    with Recorder(model, plans[0].chain.source if plans else None, [plan.chain.tap() for plan in recorded],
                  graph_from_producers=True, silent=[plan.chain.tap() for plan in silent]) as recorder:
        for index, (inputs, targets) in enumerate(
            progress_bar(batches_iter, total=batches, desc="A-statistics: pass over the data", enabled=progress)
        ):
            capture = run_batch(model, recorder, inputs, targets, loss_fn, index=index, inbound=inbound,
                                into=gradients)
            samples += capture.batch
            largest = max(largest, capture.batch)
            for plan in exact_plans:
                if sums[id(plan)] is None:
                    sums[id(plan)] = ExactSums(plan.chain, plan.channels, torch.float64, device_of(capture),
                                               working=_working_dtype(capture))
                # summed into float64 (float32 captures through a float32 sum of a few), weighted by the batch
                # (the loss is a batch mean)
                add_exact_a(sums[id(plan)], capture, memory_budget, training=False, scale=capture.batch)
            if free_plans and replay is None:
                stored.append(capture)
            del capture  # under store=False the last batch's recording would outlive the pass: every layer's values
    stored = merge(stored)  # one batch of every sample: each product runs every layer once, not once per batch
    total = _all_reduce(torch.tensor(float(samples), dtype=torch.float64, device=model_device(model)))
    samples = int(total.item())
    if samples == 0:
        raise StatisticsError("data yielded no samples")

    results: dict[str, SiteStatistics] = {}
    for plan in exact_plans:
        summed = sums[id(plan)]
        if summed is None:  # this process saw no batch (under torch.distributed): it adds zeros
            summed = ExactSums(plan.chain, plan.channels, torch.float64, model_device(model))
        a = _all_reduce(summed.total()) / samples
        results.update(statistics_from_a(plan.sites, a, samples, statistics_dtype(plan.chain)))
    _release(stored, free_plans)
    return_freed_memory()  # the pass's autograd temporaries, and the captures merge replaced
    batch = max((capture.batch for capture in stored), default=largest)  # replayed passes run batch by batch
    solves = progress_bar(free_plans, desc="A-statistics: top triplets (Lanczos)",
                          enabled=progress if free_plans else False)
    workspace = Workspace(model_device(model))  # the bases' memory, reused solve after solve, dropped at the end
    trimmed = resident_memory()
    for index, plan in enumerate(solves):
        captures: Iterable[Capture] = stored if replay is None else _Replay(model, plan.chain, replay, loss_fn)
        results.update(_matrix_free(plan, captures, gradients, samples, max_steps, tol, model_device(model),
                                    memory_budget, batch, workspace))
        _release(stored, free_plans[index + 1:])
        resident = resident_memory()
        grown = resident is not None and trimmed is not None and resident - trimmed >= TRIM_AFTER
        if index + 1 < len(free_plans) and (grown or _product_bytes(plan, batch) >= TRIM_AFTER):
            # the products' temporaries, on the heap, in holes the next solves' tensors need not fit
            return_freed_memory()
            trimmed = resident_memory()
    check_statistics(results.values())
    return {site.name: results[site.name] for plan in plans for site in plan.sites}


def _release(stored: list[Capture], plans: Sequence[_GroupPlan]) -> None:
    """Drop the recorded values that none of ``plans`` (the solves still to come) reads.

    The results grow as the groups are solved; what their solves read is
    given back as they go.
    """
    taps = [plan.chain.tap() for plan in plans]
    producers = {node for tap in taps for node, _, _ in tap.producers}
    consumers = {node for tap in taps for node, _ in tap.consumers}
    externals = {name for tap in taps for name in tap.externals}
    for capture in stored:
        for values, needed in ((capture.inputs, producers), (capture.outputs, producers),
                               (capture.errors, consumers), (capture.externals, externals)):
            for name in [name for name in values if name not in needed]:
                del values[name]


def check_statistics(results: Iterable[SiteStatistics]) -> None:
    """Raise :class:`StatisticsError` if a site's sigma, lambda* or gradient is NaN or infinite."""
    results = list(results)
    # a group's sites are rows of one tensor: check each tensor once, and site by site only to name one
    whole = {id(base): base for entry in results for tensor in (entry.direction, entry.gradient)
             for base in [tensor if tensor._base is None else tensor._base]}
    if all(math.isfinite(entry.sigma) for entry in results) and all_finite(*whole.values()):
        return
    for entry in results:
        if not (
            math.isfinite(entry.sigma) and all_finite(entry.direction) and all_finite(entry.gradient)
        ):
            raise StatisticsError(
                f"site {entry.name}: the statistics are not finite (sigma {entry.sigma}); the sums over "
                f"{entry.samples} samples overflowed. Scale the loss or the inputs down, or measure in float64"
            )


def run_batch(
    model: nn.Module,
    recorder: Recorder,
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    *,
    index: int | None = None,
    inbound: Collection[str] | None = None,
    into: InboundGradients | None = None,
) -> Capture:
    """One forward and backward pass under the recorder's hooks; parameters' ``.grad`` untouched.

    ``inbound``: the producers (fx nodes) whose weight gradients the capture
    holds (``A 1``, see :class:`InboundGradients`); by default every
    producer the recorder taps. The backward pass differentiates for those
    parameters and for a parameter of each consumer of every other group
    (:meth:`Recorder.consumer_parameters`: the bias where it is trainable,
    else the weight): it computes the errors the
    recorder keeps and goes no further back than they and the wanted
    gradients need. Where one of those parameters is frozen it differentiates
    for the floating-point inputs instead (the whole backward pass, no
    weight gradient), and the capture holds no inbound gradient.

    ``into``: the inbound gradients go there instead of into the capture:
    each is added to its sum (times the batch) as the backward pass computes
    it (:func:`_gradient_hooks`), so the pass holds one layer's
    gradient at a time rather than every producer's at once, and the sums
    are checked to be finite after the batch.

    Raises:
        StatisticsError: the loss, or a gradient that A is made of, is not
            finite (NaN or infinite); the message names batch ``index``.
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    # the graph from the loss back to the first producer is all a gradient the statistics need goes through
    with torch.no_grad() if recorder.graph_from_producers else torch.enable_grad():
        leaves = [
            x.detach().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in inputs
        ]  # so that the consumers' outputs need gradients even where the weights are frozen
        output = model(*leaves)
        loss = loss_fn(output, targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise StatisticsError("loss_fn must return a scalar tensor (the batch's mean loss)")
        if not bool(torch.isfinite(loss.detach())):
            recorder.discard()
            raise StatisticsError(
                f"{_batch_name(index)}: the loss is {float(loss.detach())}; A-statistics need finite losses. "
                "Check the batch's inputs and targets for NaN or infinite values, and the model for an "
                "overflow (a learning rate too large, a log of zero)"
            )
        # differentiate for the wanted producers' parameters (their groups' consumers lie on the way, and what
        # comes out is A 1 of their channels) and for the other groups' consumers' parameters (their errors are
        # all those groups need): no gradient that nobody needs is computed, nor any beyond the last one needed
        parameters = recorder.producer_parameters(inbound)
        wrt = [p for params in parameters.values() for p in params]
        wrt += recorder.consumer_parameters(covered=parameters)
        if not all(p.requires_grad for p in wrt):
            parameters = {}
            wrt = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
        if not loss.requires_grad:
            raise StatisticsError(
                "the loss does not depend on the model's parameters or inputs through autograd; "
                "loss_fn must compute a differentiable loss from the model's output"
            )
        handles = _gradient_hooks(wrt, parameters, into, recorder.capture.batch)
        try:
            grads = list(torch.autograd.grad(loss, wrt, allow_unused=True))
        finally:
            for handle in handles:
                handle.remove()
    capture = recorder.take()
    if into is None:  # else ``grads`` are the zeros the hooks returned: the sums in ``into`` hold the gradients
        _keep_gradients(capture, parameters, grads)
    check_finite(capture, index)
    if into is not None:
        into.check(parameters, index)
    return capture


def _keep_gradients(capture: Capture, parameters: dict[str, list[torch.Tensor]],
                    grads: list[torch.Tensor | None]) -> None:
    """Put each producer's gradients (``grads``, in the order of ``parameters``' tensors) in the capture, one
    (channels, entries) tensor per producer, weight then bias."""
    position = 0
    for node, params in parameters.items():
        parts = []
        for param in params:
            grad = grads[position] if grads[position] is not None else torch.zeros_like(param)
            grads[position] = None  # given up as it is used: a copy of one layer's gradient at a time
            parts.append(grad.detach().reshape(param.shape[0], -1))
            position += 1
        capture.gradients[node] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def check_finite(capture: Capture, index: int | None) -> None:
    """Raise :class:`StatisticsError` if a value of ``capture`` that A is made of is NaN or infinite.

    All the values are checked by one read (:func:`all_finite`: on an
    accelerator, one wait per batch rather than one per recorded value);
    only when it finds something is each value read on its own, to name it.
    """
    checked = [
        (kind, node, value)
        for kind, values in (
            ("the input of layer", capture.inputs), ("the output of layer", capture.outputs),
            ("the loss gradient at the output of layer", capture.errors),
            ("the weight gradient of layer", capture.gradients),
        )
        for node, value in values.items()
    ]
    if all_finite(*(value for _, _, value in checked)):
        return
    for kind, node, value in checked:
        if not all_finite(value):
            raise StatisticsError(
                f"{_batch_name(index)}: {kind} '{node}' is not finite (NaN or infinite values); "
                "A-statistics need finite values. Check the batch for NaN or infinite inputs, and "
                "the model for an overflow"
            )


def _batch_name(index: int | None) -> str:
    return f"batch {index}" if index is not None else "the batch"


def statistics_dtype(chain: GroupChain) -> torch.dtype:
    """The precision of a group's returned lambda* and gradient: float64 for a float64 model, else float32."""
    return torch.float64 if chain.producers[0].module.weight.dtype == torch.float64 else torch.float32


def statistics_from_a(
    sites: Sequence[Site], a: torch.Tensor, samples: int, dtype: torch.dtype
) -> dict[str, SiteStatistics]:
    """SiteStatistics of ``sites`` (one group, in the order of ``a``'s first axis) from their A matrices.

    lambda* and the gradient are returned in ``dtype`` (see :func:`statistics_dtype`); A in float64.
    """
    triplet = top_singular(a)
    a = a.cpu()
    directions = triplet.direction.to(device="cpu", dtype=dtype)
    gradients = a.sum(dim=2).to(dtype)
    results = {}
    for index, site in enumerate(sites):
        results[site.name] = SiteStatistics(
            site=site,
            a=a[index],
            sigma=float(triplet.sigma[index]),
            direction=directions[index],
            gradient=gradients[index],
            samples=samples,
            method="exact",
        )
    return results


class ExactSums:
    """A of some channels of one group, summed over captures (float64 for a running sum over batches).

    Most of A is summed in its own layout. A block whose chain is diagonal
    and whose consumer is linear is summed as
    :meth:`GroupChain.contract_diagonal` leaves it, position-major and
    without the outbound weights (which do not change between captures),
    and turned into A's layout once, by :meth:`total`; per capture that
    would be a transpose and a product by the weights, a third as costly as
    the contraction itself. Until then such blocks are held twice (three
    times with ``working``).

    With ``working`` (float32 captures summed in float64), such a block is
    first summed in ``working``, straight from the matrix products that
    make it, and added to its float64 sum every :attr:`FLUSH_EVERY`
    captures (:meth:`captured`): converting and adding it after every
    capture would cost a quarter as much as the products. A sum of 16
    float32 terms rounds no worse than each term's own matrix product,
    itself a float32 sum over the batch's samples.
    """

    FLUSH_EVERY = 16

    def __init__(self, chain: GroupChain, channels: Sequence[int], dtype: torch.dtype, device: torch.device,
                 working: torch.dtype | None = None) -> None:
        self.chain = chain
        self.channels = torch.tensor(list(channels), dtype=torch.long, device=device)
        shape = (len(channels), chain.inbound_size, chain.outbound_size)
        self.a = torch.zeros(shape, dtype=dtype, device=device)
        self.pending: dict[tuple[int, int], torch.Tensor] = {}  # (producer, consumer) -> (positions, K_i, S, V)
        self.working = working if working != dtype else None
        self.recent: dict[tuple[int, int], torch.Tensor] = {}  # the same, in ``working``, since the last flush
        self.added = 0

    def diagonal(self, producer: int, consumer: int) -> torch.Tensor:
        """The running sum of a diagonal pair with a linear consumer: (positions, K_producer, S, V), zeros at first.

        In ``working`` precision when the sums have one, else in A's.
        """
        key = (producer, consumer)
        if key not in self.pending:
            spec = self.chain.consumers[consumer]
            shape = (spec.weight_slice.block, self.chain.producers[producer].size, self.channels.numel(),
                     spec.module.weight.shape[0])
            self.pending[key] = self.a.new_zeros(shape)
            if self.working is not None:
                self.recent[key] = self.a.new_zeros(shape, dtype=self.working)
        return self.recent[key] if self.working is not None else self.pending[key]

    def captured(self) -> None:
        """Count one capture added; every :attr:`FLUSH_EVERY`, the working sums go into the float64 ones."""
        self.added += 1
        if self.added % self.FLUSH_EVERY == 0:
            self._flush()

    def _flush(self) -> None:
        for key, recent in self.recent.items():
            self.pending[key].add_(recent)
            recent.zero_()

    def total(self) -> torch.Tensor:
        """A summed so far, (S, K, L): the pending blocks weighed into it (once; they are then dropped)."""
        self._flush()
        self.recent.clear()
        columns = self.chain.column_slices()
        for (i, j), sums in self.pending.items():
            rows = slice(self.chain.producers[i].offset, self.chain.producers[i].offset + self.chain.producers[i].size)
            self.chain.weigh_diagonal(j, sums, self.channels, self.a[:, rows, columns[j]])
        self.pending.clear()
        return self.a


def exact_a(
    chain: GroupChain, capture: Capture, channels: Sequence[int], memory_budget: int, *, training: bool
) -> torch.Tensor:
    """This capture's A for ``channels`` (S, K, L), in the model's dtype, for its batch-mean loss.

    Samples are processed in chunks (unless ``training``: batch norm in
    training mode couples them) and rows in chunks, to stay near
    ``memory_budget`` bytes.
    """
    first = capture.outputs[chain.producers[0].node]
    sums = ExactSums(chain, channels, first.dtype, first.device)
    add_exact_a(sums, capture, memory_budget, training=training)
    return sums.total()


@torch.no_grad()
def add_exact_a(sums: ExactSums, capture: Capture, memory_budget: int, *, training: bool, scale: float = 1.0) -> None:
    """Adds ``scale`` times this capture's A (of its batch-mean loss) to ``sums``; see :func:`exact_a`."""
    chain, index, result = sums.chain, sums.channels, sums.a
    per_row = _bytes_per_row_and_sample(chain, capture, training)
    rows_wanted = min(32, max(spec.size for spec in chain.producers))
    chunk = capture.batch if training else max(1, min(capture.batch, memory_budget // max(1, per_row * rows_wanted)))
    columns = chain.column_slices()
    for start in range(0, capture.batch, chunk):
        part = capture if chunk >= capture.batch else capture.samples(start, min(start + chunk, capture.batch))
        outputs = [part.outputs[spec.node] for spec in chain.producers]
        row_chunk = max(1, memory_budget // max(1, per_row * part.batch))
        diagonals = chain.diagonal_scales(outputs, part.externals) if not training else []
        for i, spec in enumerate(chain.producers):
            reachable = [j for j, reach in enumerate(chain.reach[i]) if reach]
            diagonal = [j for j in reachable if chain.diagonal[i][j] and not training]
            general = [j for j in reachable if j not in diagonal]
            layer_input = part.inputs[spec.node]
            if diagonal:
                scales = [diagonals[i][j] for j in diagonal]
                inputs = chain.row_inputs(i, layer_input)  # (positions, spec.size, N), bias row last
                for row in range(0, spec.size, row_chunk):
                    stop = min(row + row_chunk, spec.size)
                    for j, diagonal_scale in zip(diagonal, scales):
                        error = part.errors[chain.consumers[j].node]
                        if chain.consumers[j].conv_dims:
                            target = result[:, spec.offset + row:spec.offset + stop, columns[j]]
                        else:
                            target = sums.diagonal(i, j)[:, row:stop]
                        chain.contract_diagonal(j, inputs[:, row:stop], diagonal_scale, error, index, target, scale)
            patches = conv_patches(spec.module, layer_input) if spec.conv_dims and general else None
            for row in range(0, spec.size, row_chunk) if general else ():
                rows = range(row, min(row + row_chunk, spec.size))
                seeds = chain.row_tangents(i, layer_input, outputs[i], rows, patches)
                tangents = chain.jvp_rows(outputs, part.externals, i, seeds)
                for j in general:
                    error = part.errors[chain.consumers[j].node]
                    block = chain.contract(j, tangents[j], error, index)
                    result[:, spec.offset + rows.start:spec.offset + rows.stop, columns[j]].add_(block, alpha=scale)
    sums.captured()


def _working_dtype(capture: Capture) -> torch.dtype | None:
    """The precision a float64 sum over batches first sums a few captures in: float32 for float32 captures (their
    matrix products are float32 anyway); none for others (half precision would round a sum of a few too much)."""
    dtype = next(iter(capture.outputs.values())).dtype
    return dtype if dtype == torch.float32 else None


def device_of(capture: Capture) -> torch.device:
    return next(iter(capture.outputs.values())).device


def _bytes_per_row_and_sample(chain: GroupChain, capture: Capture, training: bool) -> int:
    """Rough working memory of one inbound row for one sample.

    A general (producer, consumer) pair holds one tangent of the chain per
    row (its tensors, a few times over); a diagonal pair only the row's
    inputs and the consumer's error spread over the channels' positions.
    """
    itemsize = capture.outputs[chain.producers[0].node].element_size()
    general = diagonal = 0
    for i, spec in enumerate(chain.producers):
        produced = capture.outputs[spec.node][0].numel()
        for j, consumer in enumerate(chain.consumers):
            if not chain.reach[i][j]:
                continue
            read = math.prod(capture.shapes[consumer.node][1:])
            if chain.diagonal[i][j] and not training:
                error = capture.errors[consumer.node][0].numel()
                diagonal = max(diagonal, 2 * produced // max(1, spec.size) + read * error // max(1, spec.size))
            else:
                general += 4 * (produced + read)
    return max(1, max(general, diagonal) * itemsize)


# -- matrix-free ------------------------------------------------------------------------
class _Replay:
    """Captures made afresh by a forward and backward pass over the data, each time it is iterated."""

    def __init__(
        self, model: nn.Module, chain: GroupChain, batches: Callable[[], Iterable[tuple[Any, Any]]], loss_fn: LossFn
    ) -> None:
        self.model, self.chain, self.batches, self.loss_fn = model, chain, batches, loss_fn

    def __iter__(self) -> Iterator[Capture]:
        with Recorder(self.model, self.chain.source, [self.chain.tap()], graph_from_producers=True) as recorder:
            for index, (inputs, targets) in enumerate(self.batches()):
                # the inbound gradients were summed by the first pass: none is computed again
                yield run_batch(self.model, recorder, inputs, targets, self.loss_fn, index=index, inbound=())


def _matrix_free(
    plan: _GroupPlan,
    stored: Iterable[Capture],
    gradients: InboundGradients,
    samples: int,
    max_steps: int,
    tol: float,
    device: torch.device,
    memory_budget: int,
    batch: int,
    workspace: Workspace | None = None,
) -> dict[str, SiteStatistics]:
    """Top triplets of the plan's channels by Lanczos, in chunks of channels that fit ``memory_budget``.

    ``batch``: the most samples one pass of a product runs over (the joined
    batch of stored captures, or the data's largest batch when replayed).

    Each chunk's products run on its channels alone, so the chunks together
    cost what one solve of every channel would, while the Lanczos basis
    (``max_steps`` vectors of L entries per channel, or of B's rows) and
    the float64 sums held at once are those of one chunk. The solve is
    symmetric Lanczos on ``A^T A`` (:func:`lanczos_gram_top`): a step is a
    product with A into a vector of K entries that is not kept, then one
    with A^T, so only right vectors are kept and re-orthogonalised (the
    Krylov space and Ritz pair of Golub-Kahan bidiagonalisation, with one
    basis of L entries rather than two of K and L).
    """
    chain = plan.chain
    product, transposed = linear_operators(chain, stored, samples, cache=isinstance(stored, list))
    factors = _gram_factors(chain, stored, samples, memory_budget)
    # the bases in the products' own precision (at least float32): float64 bases add nothing to float32 products
    dtype = statistics_dtype(chain)
    wanted = torch.tensor(sorted(set(plan.channels)), dtype=torch.long, device=device)
    row = {channel: index for index, channel in enumerate(wanted.tolist())}
    # the results are allocated before the solve's temporaries, which then come and go above them in memory
    direction = torch.empty(wanted.numel(), chain.outbound_size, dtype=dtype, device=device)
    # a solve of B B^T (GramFactors) runs on vectors of B's few rows, lifted into ``direction`` when it ends
    short = None if factors is None else factors.size
    start = _start_vectors(chain, device, short)
    work = plan.positions * batch if factors is None else chain.outbound_size
    size = lanczos_chunk(chain, max_steps, dtype, memory_budget, work=work, short=short)
    sigmas, residuals, steps = [], [], 0  # lambda* goes straight into ``direction``
    for offset, part in zip(itertools.count(0, size), wanted.split(size)):
        channels = _Running(part)
        if factors is not None:  # lambda* = B^T y for the top eigenvector y of B B^T
            solved = lanczos_gram_top(
                lambda y, running, out, channels=channels: factors.gram(y, channels(running), out),
                start[part], max_steps=max_steps, tol=tol, dtype=dtype,
                out=direction[offset:offset + part.numel()], workspace=workspace,
                lift=lambda y, running, out, channels=channels: factors.lift(y, channels(running), out),
            )
        else:  # A^T A v = A^T (A v): A v goes into ``left`` (K entries per channel), overwritten step after step
            left = torch.empty(part.numel(), chain.inbound_size, dtype=dtype, device=device)

            def normal(v: torch.Tensor, running: torch.Tensor, out: torch.Tensor | None,
                       channels: _Running = channels, left: torch.Tensor = left) -> torch.Tensor:
                picked = channels(running)
                return transposed(product(v, picked, left[:running.numel()]), picked, out)

            solved = lanczos_gram_top(normal, start[part], max_steps=max_steps, tol=tol, dtype=dtype,
                                      out=direction[offset:offset + part.numel()], workspace=workspace)
            del left
        sigmas.append(solved.sigma)
        residuals.append(solved.residual)
        steps = max(steps, solved.steps)
    del start
    chain.drop_picked_weights()
    sigma, residual = torch.cat(sigmas), torch.cat(residuals)
    gradient = gradients.mean(chain, samples)
    if gradient is None:
        ones = torch.ones(wanted.numel(), chain.outbound_size, dtype=torch.float64, device=device)
        gradient = product(ones, wanted).to(dtype)
    elif wanted.numel() < chain.group.size:
        gradient = gradient[wanted]
    direction, gradient = direction.cpu(), gradient.cpu()
    if bool((residual > tol * sigma).any()):
        logger.warning(
            "group %s: Lanczos stopped after %d steps with relative residual up to %.2g (tol %.2g)",
            chain.group.name, steps, float((residual / sigma.clamp_min(1e-300)).max()), tol,
        )
    results = {}
    # the rows as views made in one call, the numbers read in one transfer each: not four tensor indexings per site
    directions, gradients_of = direction.unbind(), gradient.unbind()
    sigma_of, residual_of = sigma.tolist(), residual.tolist()
    for site in plan.sites:
        c = row[site.channel]
        value = sigma_of[c]
        results[site.name] = SiteStatistics(
            site=site,
            a=None,
            sigma=value,
            direction=directions[c],
            gradient=gradients_of[c],
            samples=samples,
            method="matrix_free",
            steps=steps,
            residual=residual_of[c] / value if value > 0 else 0.0,
        )
    return results


GRAM_SHARE = 4
"""A group's :class:`GramFactors` may take up to ``memory_budget // GRAM_SHARE`` bytes."""

GRAM_GAIN = 0.75
"""The products go through :class:`GramFactors` where one costs at most this fraction of the multiply-adds of a
product with A and one with A^T through the layers (dense products run faster per multiply-add than the small
convolutions they replace, but pay for the factors once)."""


def _gram_factors(chain: GroupChain, stored: Iterable[Capture], samples: int, memory_budget: int) -> _Gram | None:
    """The group's :class:`GramFactors`, scaled to the statistics' samples, where the group allows it and it pays.

    Over one stored capture (the joined batch), outside ``torch.distributed``,
    for a group :meth:`GroupChain.gram_eligible` accepts, where the
    factors fit ``memory_budget // GRAM_SHARE``, a product costs at most
    :data:`GRAM_GAIN` of a product with A and one with A^T, and ``B`` has
    rows (the producers' inputs are not all zero); else None.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not isinstance(stored, list) or len(stored) != 1 or distributed or not chain.gram_eligible():
        return None
    capture = stored[0]
    outputs = [capture.outputs[spec.node] for spec in chain.producers]
    errors = [capture.errors[spec.node] for spec in chain.consumers]
    shapes = [capture.shapes[spec.node] for spec in chain.consumers]
    gram_cost, layers_cost, held = chain.gram_cost(outputs, errors, shapes)
    if gram_cost > GRAM_GAIN * layers_cost or held > memory_budget // GRAM_SHARE:
        return None
    factors = chain.gram_factors([capture.inputs[spec.node] for spec in chain.producers], errors, shapes,
                                 chain.diagonal_scales(outputs, capture.externals))
    if factors.size == 0:
        return None
    return _Gram(factors, (capture.batch / samples) ** 2)  # each product with A carries the capture's share


class _Gram:
    """A group's :class:`GramFactors` (``A^T A = B^T B``, at one capture) and the share of the statistics' samples
    that capture carries: products with ``B B^T`` scaled by it, ``B^T`` as it is (it only lifts the solve's
    directions, which are then normalised)."""

    def __init__(self, factors: GramFactors, share: float) -> None:
        self.factors, self.share = factors, share
        self.size, self.lift = factors.size, factors.lift

    def gram(self, vectors: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        out = self.factors.gram(vectors, channels, out)
        return out if self.share == 1 else out.mul_(self.share)


class _Running:
    """The group channels of a solve's running rows: ``part[running]``, one tensor per set of rows.

    The solver passes the same ``running`` tensor product after product
    until it drops finished rows, so the channels are indexed once per set,
    and their host copy (:func:`host_channels`, which the products consult
    for every layer) is read once per set rather than once per product.
    """

    def __init__(self, part: torch.Tensor) -> None:
        self.part = part
        self.rows: torch.Tensor | None = None
        self.channels = part

    def __call__(self, running: torch.Tensor) -> torch.Tensor:
        if running is not self.rows:
            self.rows, self.channels = running, self.part[running]
        return self.channels


PRODUCT_COPIES = 4
"""Copies of each value of a group's chain a product holds at once, per channel (values, tangents, saved for
backward)."""


def lanczos_chunk(chain: GroupChain, max_steps: int, dtype: torch.dtype, memory_budget: int, work: int = 0,
                  short: int | None = None) -> int:
    """How many channels one Lanczos solve takes at once so that it fits ``memory_budget`` bytes.

    Per channel: ``max_steps`` basis vectors, in ``dtype``, of L entries
    (a solve of ``A^T A``) or of ``short`` (B's rows, a solve of ``B B^T``);
    a few vectors of the lengths a step works on (``A v``, float64 sums,
    the Ritz vector: K and L entries, or ``short``), counted in float64;
    and the products' passes, which hold :data:`PRODUCT_COPIES` copies of
    ``work`` entries (the chain's values per channel, times the samples of
    a pass). At least one channel.
    """
    itemsize = torch.finfo(dtype).bits // 8
    if short is None:
        length, vectors = chain.outbound_size, chain.inbound_size + chain.outbound_size
    else:
        length = vectors = short
    per_channel = max_steps * length * itemsize + 4 * vectors * 8 + PRODUCT_COPIES * work * itemsize
    return max(1, memory_budget // per_channel)


TRIM_AFTER = 64 * 2**20
"""The heap's free pages are handed back after a solve whose products held about this many bytes or more on it
(the chain's values of every channel of the group over the samples of a pass), or once resident memory has grown
by as much since the last trim (the results, and temporaries the next solves' tensors did not fit in). The bases
live in the workspace; after a few small solves the next one reuses the heap's pages, and a trim would cost more
than it saves: each costs about 9 ms on the ResNet-18 benchmark, and the pages it hands back fault in again. At
16 MiB a call trimmed 9 times, at 64 MiB 3 times, for the same peak (195-202 MB over the pass, in fresh
processes)."""


def _product_bytes(plan: _GroupPlan, batch: int) -> int:
    return PRODUCT_COPIES * plan.positions * batch * len(set(plan.channels)) * torch.finfo(
        statistics_dtype(plan.chain)).bits // 8


class InboundGradients:
    """``A 1`` of every channel of the matrix-free groups, summed from the gradients the pass computes anyway.

    Each group has one (channels x K) running sum of its producers' weight
    gradients times the batch, in the statistics' precision
    (:func:`statistics_dtype`), allocated before the pass: the producers'
    sums are its column blocks (no concatenation afterwards), and once
    divided by the samples it *is* the group's returned gradient, not a
    copy of it. A producer whose gradient the pass did not compute (frozen
    weights) leaves its group's sum unusable: :meth:`mean` then says None.
    """

    def __init__(self, chains: Sequence[GroupChain], device: torch.device) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # group name -> (channels, K)
        self.blocks: dict[str, torch.Tensor] = {}  # producer node -> its columns of the group's sum
        self.added: set[str] = set()  # producer nodes with at least one gradient added
        for chain in chains:
            total = torch.zeros(chain.group.size, chain.inbound_size, dtype=statistics_dtype(chain), device=device)
            self.sums[chain.group.name] = total
            for spec, rows in zip(chain.producers, chain.row_slices()):
                self.blocks[spec.node] = total[:, rows]

    def sinks(self, parameters: dict[str, list[torch.Tensor]]) -> dict[int, list[torch.Tensor]]:
        """Where the gradients of the producers' ``parameters`` (fx node -> weight, then the bias if owned) are
        added: ``id(parameter)`` -> its column blocks of the sums (one per producer it belongs to), each (channels,
        the entries of one channel of the parameter). See :func:`_gradient_hooks`."""
        sinks: dict[int, list[torch.Tensor]] = {}
        for node, params in parameters.items():
            block = self.blocks.get(node)
            if block is None:
                continue
            start = 0
            for param in params:
                width = param[0].numel()  # a channel's entries: its weight row, or one bias
                sinks.setdefault(id(param), []).append(block[:, start:start + width])
                start += width
        return sinks

    def check(self, nodes: Collection[str], index: int | None) -> None:
        """Record that the sums of the producers ``nodes`` hold a batch's gradients (added by the hooks of
        :func:`_gradient_hooks`), and raise :class:`StatisticsError` naming the batch ``index`` and a layer if one
        of them is no longer finite."""
        nodes = [node for node in nodes if node in self.blocks]
        self.added.update(nodes)
        if all_finite(*(self.blocks[node] for node in nodes)):  # one read of each sum's columns
            return
        for node in nodes:
            if not all_finite(self.blocks[node]):
                raise StatisticsError(
                    f"{_batch_name(index)}: the weight gradient of layer '{node}' is not finite (NaN or infinite "
                    "values); A-statistics need finite values. Check the batch for NaN or infinite inputs, and the "
                    "model for an overflow"
                )

    def mean(self, chain: GroupChain, samples: int) -> torch.Tensor | None:
        """The group's ``A 1`` (channels x K) over ``samples`` (all-reduced), or None where it was not captured.

        Divides the sum in place (a reduced copy under ``torch.distributed``): call once per group.
        """
        if not all(spec.node in self.added for spec in chain.producers):
            return None
        return _all_reduce(self.sums.pop(chain.group.name)).div_(samples)


def _gradient_hooks(wrt: Sequence[torch.Tensor], parameters: dict[str, list[torch.Tensor]],
                    into: InboundGradients | None, batch: int) -> list[RemovableHandle]:
    """Hooks on the tensors ``wrt`` of one backward pass, whose gradients nobody keeps: remove them after the pass.

    The gradients of the producers' ``parameters`` are kept for the capture
    without ``into``; with it, each is added (times ``batch``) to its sums
    there as the backward pass computes it. Every other gradient (a
    consumer's bias or weight: differentiating for it only makes the pass
    compute the error the recorder keeps) is dropped as it is computed. A hooked
    tensor's gradient is handed back to autograd as a zero that holds no
    memory (an expanded scalar), so the pass holds one layer's gradient at
    a time rather than all of them at its end.
    """
    sinks = into.sinks(parameters) if into is not None else {}
    kept = set() if into is not None else {id(param) for params in parameters.values() for param in params}
    hooked: dict[int, torch.Tensor] = {}
    for tensor in wrt:
        if id(tensor) not in kept:
            hooked.setdefault(id(tensor), tensor)
    return [tensor.register_hook(functools.partial(_add_gradient, sinks.get(key, []), batch))
            for key, tensor in hooked.items()]


def _add_gradient(parts: list[torch.Tensor], batch: int, gradient: torch.Tensor) -> torch.Tensor:
    """A hook of :func:`_gradient_hooks`: add ``gradient`` (one row per channel) times ``batch`` to each of
    ``parts``, and give autograd a zero without memory in its place."""
    with torch.no_grad():
        for part in parts:
            part.add_(gradient.reshape(part.shape), alpha=batch)
    return gradient.new_zeros(()).expand_as(gradient)


def _start_vectors(chain: GroupChain, device: torch.device, length: int | None = None) -> torch.Tensor:
    """The Lanczos start of every channel: one seeded Gaussian vector of L entries (or ``length``: a solve of ``B
    B^T`` starts from vectors of B's rows), shared (an expanded view).

    Each channel's A is a matrix of its own; a generic vector (one drawn at
    random) has a component along every channel's top right singular
    vector, so one draw serves them all, whatever the chunking, and the
    same on every rank.
    """
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(chain.outbound_size if length is None else length, generator=generator)
    return start.to(device).expand(chain.group.size, -1)  # float32: Lanczos copies rows into its bases' precision


def linear_operators(
    chain: GroupChain, captures: Iterable[Capture], samples: int, *, cache: bool = True
) -> tuple[Operator, Operator]:
    """``(v, channels) -> A v`` and ``(u, channels) -> A^T u`` for the group's ``channels``, summed over ``captures``.

    Vectors have one row per channel in ``channels`` (indices into the
    group, ascending): (n x L) and (n x K). Each pass runs in the model's
    dtype, on those channels alone where the layers allow it (the
    producers' outputs and the consumers' input columns of the others are
    left out); passes over several captures accumulate in float64, and
    sums are all-reduced when ``torch.distributed`` is initialised. The
    products come back in float64, or in the model's dtype from a single
    capture. ``cache`` keeps element-wise
    chains' Jacobian diagonals per capture (for stored captures).
    """
    rows, columns = chain.row_slices(), chain.column_slices()
    producers, consumers = range(len(chain.producers)), range(len(chain.consumers))
    # an element-wise chain is a diagonal (up to a global pool): keep it per capture instead of re-running the
    # chain, and run every pass on the channels asked for alone (the restricted layout of GroupChain.restricted_shape)
    diagonal = chain.per_channel
    # a chain with one max pool between element-wise maps is per channel too: restricted as well
    selected = not diagonal and chain.selection is not None
    restricted = diagonal or selected
    scales: dict[int, list[list[torch.Tensor | None]]] = {}
    factors: dict[int, SelectionFactors] = {}  # a selection chain's factors, per capture
    cut: dict[Any, Any] = {}  # the scales at the last channels' positions: capture index -> restricted scales
    linearised: dict[int, LinearisedChain] = {}  # a general chain's Jacobian, per capture
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    single = isinstance(captures, list) and len(captures) == 1 and not distributed

    def per_capture(kept: dict[int, Any], index: int, make: Callable[[], Any]) -> Any:
        """``make()`` for capture ``index``, kept in ``kept`` for stored captures (read product after product); a
        replayed capture's is made for its one product, and kept by nothing."""
        if not cache:
            return make()
        if index not in kept:
            kept[index] = make()
        return kept[index]

    def per_channels(index: int, channels: torch.Tensor, make: Callable[[], Any]) -> Any:
        """:func:`per_capture` of ``make()`` at ``channels``, kept (in ``cut``) while the channels stay the same."""
        if cache:
            key = host_channels(channels)[0]
            if cut.get("channels") != key:
                cut.clear()  # one set at a time: the channels change only when a chunk starts or a channel finishes
                cut["channels"] = key
        return per_capture(cut, index, make)

    def chain_scales(index: int, capture: Capture, outputs: list[torch.Tensor]) -> list[list[torch.Tensor | None]]:
        return per_capture(scales, index, lambda: chain.diagonal_scales(outputs, capture.externals))  # type: ignore[no-any-return]

    def restricted_scales(index: int, capture: Capture, outputs: list[torch.Tensor],
                          channels: torch.Tensor) -> list[list[torch.Tensor | None]]:
        """The chain's diagonal at the consumers' positions of ``channels``."""
        def restrict() -> list[list[torch.Tensor | None]]:
            full = chain_scales(index, capture, outputs)
            return [[None if full[i][j] is None else chain.restrict_scale(i, j, full[i][j], channels)
                     for j in consumers] for i in producers]

        return per_channels(index, channels, restrict)  # type: ignore[no-any-return]

    def restricted_factors(index: int, capture: Capture, outputs: list[torch.Tensor],
                           channels: torch.Tensor) -> SelectionFactors:
        """A selection chain's factors at ``channels``."""
        return per_channels(index, channels, lambda: per_capture(  # type: ignore[no-any-return]
            factors, index, lambda: chain.selection_factors(outputs, capture.externals)).channels(chain, channels))

    def through_selection(index: int, capture: Capture, outputs: list[torch.Tensor], values: list[torch.Tensor],
                          channels: torch.Tensor, *, backward: bool) -> list[torch.Tensor]:
        """:func:`through` for a chain with a selection (:class:`SelectionFactors`), restricted to ``channels``."""
        f = restricted_factors(index, capture, outputs, channels)
        count = channels.numel()
        producer_shapes = [chain.restricted_shape(outputs[i].shape, "producer", i, count) for i in producers]
        consumer_shapes = [chain.restricted_shape(capture.shapes[chain.consumers[j].node], "consumer", j, count)
                           for j in consumers]
        if backward:
            pooled = _total([f.after[j] * values[j] for j in consumers if f.after[j] is not None],
                            lambda: values[0].new_zeros(f.indices.shape))
            return [_total([f.direct[i][j] * values[j] for j in consumers if f.direct[i][j] is not None]
                           + ([f.spread(f.before[i] * pooled, producer_shapes[i])] if f.before[i] is not None
                              else []),
                           lambda i=i: values[0].new_zeros(producer_shapes[i]))
                    for i in producers]
        picked = _total([f.before[i] * f.select(values[i]) for i in producers if f.before[i] is not None],
                        lambda: values[0].new_zeros(f.indices.shape))
        return [_total([f.direct[i][j] * values[i] for i in producers if f.direct[i][j] is not None]
                       + ([f.after[j] * picked] if f.after[j] is not None else []),
                       lambda j=j: values[0].new_zeros(consumer_shapes[j]))
                for j in consumers]

    def through(index: int, capture: Capture, outputs: list[torch.Tensor], values: list[torch.Tensor],
                channels: torch.Tensor, *, backward: bool) -> list[torch.Tensor]:
        """Through the chain: errors at the consumers' inputs to errors at the producers' outputs
        (``backward``), or tangents at the producers' outputs to tangents at the consumers' inputs;
        restricted to ``channels`` where the chain is diagonal or has a selection."""
        if selected:
            return through_selection(index, capture, outputs, values, channels, backward=backward)
        if not diagonal:
            if not cache:  # a replayed capture serves one product: running the chain once is all it needs
                return list((chain.vjp if backward else chain.jvp)(outputs, capture.externals, values))
            if index not in linearised:
                linearised[index] = chain.linearise(outputs, capture.externals)
            return list((linearised[index].vjp if backward else linearised[index].jvp)(values))
        scale = restricted_scales(index, capture, outputs, channels)
        count = channels.numel()
        if backward:
            return [_total([chain.through_scale(i, j, values[j], scale[i][j], shape, backward=True)
                            for j in consumers if scale[i][j] is not None],
                           lambda shape=shape: outputs[0].new_zeros(shape))  # type: ignore[misc]
                    for i in producers
                    for shape in [chain.restricted_shape(outputs[i].shape, "producer", i, count)]]
        return [_total([chain.through_scale(i, j, values[i], scale[i][j], shape, backward=False)
                        for i in producers if scale[i][j] is not None],
                       lambda shape=shape: outputs[0].new_zeros(shape))  # type: ignore[misc]
                for j in consumers
                for shape in [chain.restricted_shape(capture.shapes[chain.consumers[j].node], "consumer", j, count)]]

    @torch.no_grad()
    def summed(count: int, size: int, vectors: torch.Tensor,
               blocks: Callable[..., list[tuple[Any, torch.Tensor]]], out: torch.Tensor | None) -> torch.Tensor:
        """The mean over every sample of the blocks ``blocks`` gives per capture (count x size), all-reduced.

        Summed in float64 over several captures or processes; one capture's
        blocks (stored captures are merged into one) are written straight
        into a tensor of their own precision (``out`` when given), which is
        all they have.
        """
        if single:
            capture = captures[0]  # type: ignore[index]
            outputs = [capture.outputs[spec.node] for spec in chain.producers]
            result = out if out is not None else outputs[0].new_empty(count, size)
            blocks(0, capture, outputs, outputs[0].dtype, result)  # each layer's block written in its place
            if capture.batch != samples:
                result.mul_(capture.batch / samples)
            return result
        result = torch.zeros(count, size, dtype=torch.float64, device=vectors.device)

        def add(index: int, capture: Capture) -> None:
            outputs = [capture.outputs[spec.node] for spec in chain.producers]
            for where, block in blocks(index, capture, outputs, outputs[0].dtype, None):
                result[:, where].add_(block, alpha=capture.batch)

        # a replayed capture is let go before the next pass records another: the body is a function, so its
        # locals (the capture's values, the last block) go with it, and the loop counts by hand (enumerate or
        # zip would hold the capture in the tuple they reuse until the next one is made)
        index = 0
        for capture in captures:
            add(index, capture)
            del capture
            index += 1
        result = _all_reduce(result).div_(samples)
        return result if out is None else out.copy_(result)

    def product(vectors: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        def blocks(index: int, capture: Capture, outputs: list[torch.Tensor], dtype: torch.dtype,
                   into: torch.Tensor | None) -> list:
            errors = [
                chain.consumer_error(j, vectors[:, columns[j]].to(dtype), capture.shapes[spec.node],
                                     capture.errors[spec.node], channels, restricted=restricted)
                for j, spec in enumerate(chain.consumers)
            ]
            deltas = through(index, capture, outputs, errors, channels, backward=True)
            return [(rows[i], chain.producer_gradient(i, capture.inputs[spec.node], deltas[i], channels,
                                                      restricted=restricted,
                                                      out=None if into is None else into[:, rows[i]]))
                    for i, spec in enumerate(chain.producers)]

        return summed(channels.numel(), chain.inbound_size, vectors, blocks, out)

    def transposed(vectors: torch.Tensor, channels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        def blocks(index: int, capture: Capture, outputs: list[torch.Tensor], dtype: torch.dtype,
                   into: torch.Tensor | None) -> list:
            seeds = [chain.producer_tangent(i, capture.inputs[spec.node], vectors[:, rows[i]].to(dtype), channels,
                                            restricted=restricted)
                     for i, spec in enumerate(chain.producers)]
            tangents = through(index, capture, outputs, seeds, channels, backward=False)
            return [(columns[j], chain.consumer_columns(j, tangents[j], capture.errors[spec.node], channels,
                                                        restricted=restricted,
                                                        out=None if into is None else into[:, columns[j]]))
                    for j, spec in enumerate(chain.consumers)]

        return summed(channels.numel(), chain.outbound_size, vectors, blocks, out)

    return product, transposed


# -- helpers ---------------------------------------------------------------------------
def _total(terms: list[torch.Tensor], empty: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The sum of ``terms`` without a zero start tensor (one term, the usual case, is returned as is)."""
    if not terms:
        return empty()
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _batches(data: Iterable[Any], limit: int | None, device: torch.device) -> Iterable[tuple[Any, Any]]:
    if limit is not None and limit < 1:
        raise ValueError(f"batches must be a positive number of batches or None, got {limit}")
    try:
        iterator = iter(data)
    except TypeError as error:
        raise StatisticsError(
            f"data must be an iterable of (inputs, targets) batches (a DataLoader), got {type(data).__name__}"
        ) from error
    for index, batch in enumerate(iterator):
        if limit is not None and index >= limit:
            return
        if isinstance(batch, torch.Tensor):
            raise StatisticsError(
                f"batch {index} is a bare tensor; A-statistics need the loss, so each batch must be a pair "
                "(inputs, targets) or a dict with 'inputs' and 'targets'"
            )
        try:
            inputs, targets = batch_parts(batch, index=index)
        except TypeError as error:
            raise StatisticsError(str(error)) from error
        yield to_device(inputs, device), to_device(targets, device)
