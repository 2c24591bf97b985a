"""Helpers of tunnelgraph.runtime that the statistics rely on."""

from __future__ import annotations

import gc
import mmap
import sys

import pytest
import torch

from tunnelgraph.runtime import all_finite, resident_memory


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_finds_one_nan_or_infinity_anywhere(dtype: torch.dtype) -> None:
    values = torch.linspace(-3, 3, 1001, dtype=dtype).reshape(7, 11, 13)
    assert all_finite(values)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0, 0), (3, 5, 7), (6, 10, 12)):
            spoiled = values.clone()
            spoiled[where] = bad
            assert not all_finite(spoiled)
            assert not all_finite(spoiled[:, 1:].transpose(0, 2)) or where[1] == 0  # views, any strides


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_not_misled_by_a_sum_that_overflows(dtype: torch.dtype) -> None:
    """Finite entries whose sum is not finite (the sum settles the usual case) are still all finite."""
    largest = torch.finfo(dtype).max
    values = torch.full((3, 5), largest, dtype=dtype)
    values[1, 2] = -largest / 2
    assert all_finite(values) and all_finite(torch.ones(4), values)
    values[2, 4] = float("nan")
    assert not all_finite(torch.ones(4), values)


def test_all_finite_takes_empty_and_integer_tensors() -> None:
    assert all_finite(torch.empty(0))
    assert all_finite(torch.arange(5))


def test_all_finite_reads_several_tensors_at_once() -> None:
    """One answer for many tensors (one read of the device): any bad entry in any of them makes it False."""
    good = torch.linspace(-1, 1, 50, dtype=torch.float64)
    spoiled = torch.ones(4, 3, dtype=torch.float32)
    spoiled[2, 1] = float("nan")
    assert all_finite() and all_finite(good, torch.arange(3), torch.empty(0), good.float())
    assert not all_finite(good, torch.arange(3), spoiled)
    assert not all_finite(torch.tensor([float("inf")], dtype=torch.bfloat16), good)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory is read from /proc (Linux)")
def test_resident_memory_is_what_the_kernel_reports_and_grows_with_touched_memory() -> None:
    def reported() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

    assert abs((resident_memory() or 0) - reported()) <= 8 * 2**20
    held = torch.frombuffer(mmap.mmap(-1, 64 * 2**20), dtype=torch.float32)  # 64 MiB, fresh and untouched
    gc.collect()
    gc.disable()  # nothing else is freed between the two readings
    try:
        before = resident_memory()
        held.fill_(1.0)  # every page touched
        after = resident_memory()
    finally:
        gc.enable()
    assert before is not None and after is not None and after - before >= 48 * 2**20
    del held
