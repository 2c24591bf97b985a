"""Running a user's PyTorch model without changing it.

Whatever tunnelgraph runs (a shape pass while tracing, a statistics pass,
a verification, an export) it runs inside :func:`preserved`, which restores
every module's training flag and every buffer afterwards, bit for bit, even
when the run fails. Buffers matter because a forward may update them: batch
norm's running statistics in training mode, and modules that call
``F.batch_norm`` on their own buffers with a training flag that
``torch.fx`` baked into the traced graph. Parameters are not copied (that
would double the model's memory); a forward that modifies one in place is
reported as an error naming it.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import itertools
import os
import platform
import sys
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
import torch.nn as nn

from tqdm.auto import tqdm

from tunnelgraph.errors import TunnelgraphError

T = TypeVar("T")


def progress_bar(
    iterable: Iterable[T], *, desc: str, total: int | None = None, enabled: bool | None = None, leave: bool = True
) -> Iterable[T]:
    """``iterable`` with a tqdm bar on stderr, the one way tunnelgraph shows progress on long work.

    ``enabled``: True shows the bar, False never does, None (the library's
    default) shows it in interactive use only, when stderr is a terminal,
    so scripts, logs and test runs stay quiet unless asked.
    """
    shown = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(iterable, desc=desc, total=total, disable=not shown, leave=leave)  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the operating system, where the C library allows it (glibc).

    PyTorch keeps CPU tensors on the C heap, and glibc keeps the pages of
    freed blocks for reuse: after a phase of large temporaries the
    process's resident memory stays near that phase's peak, and a later
    phase whose temporaries do not fit the holes adds its own peak on top.
    Called between such phases (after the statistics' capture pass, and
    after a solve with large temporaries on the heap), it makes the peak
    that of the largest phase rather than of their sum. It frees nothing
    that is in use, and does nothing on other C libraries.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def resident_memory() -> int | None:
    """This process's resident memory in bytes, read from ``/proc/self/statm`` (Linux); None where there is none."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * _PAGE_SIZE


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every entry of every tensor (all on one device) is finite, each read in one pass with no tensor of
    flags made, and the answer read from the device once.

    A sum is finite only where every entry is (an infinity makes it
    infinite or NaN, and NaN propagates), so one sum per tensor, read at
    memory speed, settles the usual case. Only where a sum is not finite (a
    bad entry, or finite entries whose sum overflows) is the tensor read
    again, for its minimum and maximum: NaN propagates through both and an
    infinity is one of them, so both are finite exactly when every entry is.
    """
    tensors = tuple(tensor.detach() for tensor in tensors if tensor.numel() and tensor.is_floating_point())
    if not tensors:
        return True
    sums = torch.stack([tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32).double()
                        for tensor in tensors])
    finite = torch.isfinite(sums)
    if bool(finite.all()):
        return True
    suspects = [tensor for tensor, ok in zip(tensors, finite.tolist()) if not ok]
    bounds = [torch.stack(torch.aminmax(tensor)).double() for tensor in suspects]
    return bool(torch.isfinite(torch.stack(bounds)).all())


@contextlib.contextmanager
def preserved(model: nn.Module, *, train: bool | None = None) -> Iterator[nn.Module]:
    """Run ``model`` inside the block and get its state back afterwards.

    On entry the training flags of every module, every buffer (its object
    and a copy of its value) and every parameter (its object and version
    counter) are recorded; with ``train`` given, the model is switched to
    that mode. On exit, also after an exception, the flags and the buffers'
    objects and values are restored (a buffer is written only where its
    value changed).

    Raises:
        TunnelgraphError: the block modified a parameter in place or
            replaced one (tunnelgraph cannot undo that without keeping a
            copy of every parameter).
    """
    modules = list(model.modules())
    flags = [module.training for module in modules]
    buffers = [
        (module, name, tensor, tensor.detach().clone() if tensor is not None else None)
        for module in modules
        for name, tensor in list(module._buffers.items())
    ]
    parameters = [
        (module, name, tensor, _version(tensor))
        for module in modules
        for name, tensor in list(module._parameters.items())
    ]
    if train is not None:
        model.train(train)
    try:
        yield model
    finally:
        for module, flag in zip(modules, flags):
            if module.training != flag:  # nn.Module.__setattr__ is slow: write only what changed
                module.training = flag
        with torch.no_grad():
            for module, name, tensor, saved in buffers:
                if module._buffers.get(name) is not tensor:
                    module._buffers[name] = tensor
                # compared by value: native kernels (batch norm's running statistics) update
                # buffers without bumping their version counter
                if tensor is not None and saved is not None and not torch.equal(tensor, saved):
                    tensor.copy_(saved)
    changed = [
        f"{type(module).__name__}.{name}"
        for module, name, tensor, version in parameters
        if module._parameters.get(name) is not tensor or _version(tensor) != version
    ]
    if changed:
        raise TunnelgraphError(
            f"running {type(model).__name__} modified parameter(s) {', '.join(changed)} in place; "
            "tunnelgraph runs the forward for shapes and statistics and cannot undo that: make the "
            "forward leave its parameters alone (use buffers for running state)"
        )


def _version(tensor: torch.Tensor | None) -> int:
    """The tensor's in-place version counter (-1 for None and for inference tensors, which have none)."""
    if tensor is None or tensor.is_inference():
        return -1
    return int(tensor._version)


def unwrap_model(model: Any) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            break
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter or buffer lives (the CPU for a model without tensors)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor, or a tuple of them and other things) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(item, device) for item in value)
    return value


def batch_parts(batch: Any, *, index: int | None = None) -> tuple[tuple[Any, ...], Any]:
    """A batch as ``(inputs, targets)``, ``inputs`` a tuple of positional arguments of the forward.

    The one rule every pass over data uses:

    - a tensor is the inputs of a one-input model (no targets);
    - a pair ``(inputs, targets)`` (tuple or list, as a DataLoader yields
      it), where ``inputs`` is a tensor or a tuple/list of tensors;
    - a dict with the keys ``"inputs"`` (and optionally ``"targets"``).

    Targets may be None where a pass does not use them.

    Raises:
        TypeError: any other structure, naming the batch ``index``.
    """
    inputs: Any
    targets: Any
    if isinstance(batch, torch.Tensor):
        inputs, targets = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
    elif isinstance(batch, dict) and "inputs" in batch:
        inputs, targets = batch["inputs"], batch.get("targets")
    else:
        where = f"batch {index}" if index is not None else "a batch"
        raise TypeError(
            f"{where} is a {type(batch).__name__}"
            + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
            + "; a batch must be a tensor of inputs, a pair (inputs, targets), or a dict with 'inputs' "
            "and 'targets'"
        )
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), targets


def flatten_outputs(output: Any) -> list[torch.Tensor]:
    """Every tensor of a forward's output (tensors, tuples, lists, dicts by sorted key), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for key in sorted(output) for t in flatten_outputs(output[key])]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in flatten_outputs(item)]
    return []


def perturbed(model: torch.nn.Module, *, generator: torch.Generator | None = None) -> torch.nn.Module:
    """A copy of ``model`` whose parameters are generic, so that an equivalence check can fail.

    Freshly built networks hide broken rewrites: a zero-initialised
    classifier makes the output independent of the input, a layer scale of
    1e-6 hides a block's change below float32 resolution, and equal or zero
    weights make different channels interchangeable. Every floating-point
    parameter of the copy is moved by Gaussian noise of its own scale (its
    root mean square, or ``1 / sqrt(fan_in)`` for a tensor whose entries are
    all below 1e-3 in that sense, such as zero biases or a layer scale), so
    no entry stays zero, tiny or equal to another. Buffers (batch-norm
    statistics) are kept. Rewrite the copy, then compare with :func:`verify`.

    Args:
        model: the network; not modified.
        generator: the random source (a seeded ``torch.Generator`` for
            reproducible copies).
    """
    result = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in result.parameters():
            if not parameter.is_floating_point() or parameter.numel() == 0:
                continue
            rms = float(parameter.detach().double().pow(2).mean().sqrt())
            fan_in = parameter[0].numel() if parameter.dim() > 1 else 1
            scale = rms if rms > 1e-3 else fan_in ** -0.5
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.add_((noise * scale).to(parameter.dtype))
    return result
