"""The one per-tensor edit (rewrite.plan.edit_array) on numpy and torch arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunnelgraph.analysis.groups import ChannelGroup, ParamSlice
from tunnelgraph.backends.onnx import edit_initializer
from tunnelgraph.backends.pytorch import edit_tensor
from tunnelgraph.rewrite import edits
from tunnelgraph.rewrite.plan import NUMPY_OPS, TensorEdit, edit_array, plan_edit

# 4 channels of 2 entries each at offset 3 along axis 1, with entries before and after the span
SLICE = ParamSlice("layer.weight", "layer", "outbound", (2, 12, 5), axis=1, offset=3, block=2)
VECTOR = np.random.default_rng(0).standard_normal(SLICE.slice_shape())
EDIT = TensorEdit(
    SLICE,
    size=4,
    sources=((), ((0, 0.25), (3, VECTOR)), (), (), ()),  # block 3 gets no source: zeros
    copies=(2, None, 1, None, 0),
)
# a group of 4 channels: rows 2..5 of a producer's weight, SLICE's blocks in its consumer
INBOUND = ParamSlice("producer.weight", "producer", "inbound", (6, 3), axis=0, offset=2)
GROUP = ChannelGroup("g", 4, ("producer",), ("layer",), (), (INBOUND, SLICE))
LAM = np.random.default_rng(5).standard_normal(GROUP.outbound_size)


def expected(array: np.ndarray) -> np.ndarray:
    def block(k: int) -> np.ndarray:
        return array[:, 3 + 2 * k:3 + 2 * (k + 1)]

    new_blocks = [block(2), 0.25 * block(0) + VECTOR * block(3), block(1), np.zeros_like(block(0)), block(0)]
    return np.concatenate([array[:, :3], *new_blocks, array[:, 11:]], axis=1)


def test_copies_combinations_and_the_untouched_entries() -> None:
    array = np.random.default_rng(1).standard_normal(SLICE.shape)
    result = edit_array(array, EDIT, NUMPY_OPS)
    assert result.shape == EDIT.new_shape == (2, 14, 5)
    np.testing.assert_array_equal(result, expected(array))
    assert not np.shares_memory(result, array)


def block_by_block(array: np.ndarray, tensor_edit: TensorEdit) -> np.ndarray:
    """The edit computed one new block at a time, with the axis moved first (the reference)."""
    s = tensor_edit.slice
    moved = np.moveaxis(array, s.axis, 0)
    old = [moved[s.offset + k * s.block:s.offset + (k + 1) * s.block] for k in range(tensor_edit.size)]
    new = []
    for sources, copied in zip(tensor_edit.sources, tensor_edit.copies):
        value = old[copied] if copied is not None else np.zeros_like(old[0])
        for k, factor in sources:
            coefficient = np.asarray(factor, dtype=np.float64)
            value = value + (np.moveaxis(coefficient, s.axis, 0) if coefficient.ndim else coefficient) * old[k]
        new.append(value)
    span = s.offset + tensor_edit.size * s.block
    return np.moveaxis(np.concatenate([moved[:s.offset], *new, moved[span:]]), 0, s.axis)


@pytest.mark.parametrize(
    "edit",
    [
        edits.clone(4, 1, 0.3),
        edits.clone(4, 3, LAM, position=0),
        edits.merge(4, 0, into=2),
        edits.remove(4, 3),
        edits.reorganize(4, 1, 2, 0, 0.7),
        edits.identity(4),
    ],
    ids=["clone", "clone_vector_first", "merge", "remove", "reorganize", "identity"],
)
@pytest.mark.parametrize("inbound", [True, False])
def test_runs_of_copies_and_combinations_match_block_by_block(edit: edits.ChannelEdit, inbound: bool) -> None:
    tensor_edit = plan_edit(GROUP, edit).tensors[0 if not inbound else 1]
    assert (tensor_edit.slice.role == "inbound") == inbound
    array = np.random.default_rng(4).standard_normal(tensor_edit.slice.shape)
    np.testing.assert_array_equal(edit_array(array, tensor_edit, NUMPY_OPS), block_by_block(array, tensor_edit))


def test_torch_and_numpy_agree_to_the_bit_in_float64() -> None:
    array = np.random.default_rng(2).standard_normal(SLICE.shape)
    tensor = edit_tensor(torch.from_numpy(array), EDIT)
    assert tensor.dtype == torch.float64 and tensor.is_contiguous()
    np.testing.assert_array_equal(tensor.numpy(), edit_initializer(array, EDIT))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_computes_in_the_tensors_own_dtype(dtype: torch.dtype) -> None:
    tensor = torch.randn(SLICE.shape, dtype=dtype)
    result = edit_tensor(tensor, EDIT)
    assert result.dtype == dtype and result.device == tensor.device
    old = [tensor[:, 3 + 2 * k:5 + 2 * k] for k in range(4)]
    combined = torch.zeros_like(old[0]) + torch.tensor(0.25, dtype=dtype) * old[0]
    combined = combined + torch.as_tensor(VECTOR, dtype=dtype) * old[3]
    assert torch.equal(result[:, 5:7], combined)
    assert torch.equal(result[:, 3:5], old[2]) and torch.equal(result[:, 11:13], old[0])


def test_onnx_edits_compute_in_float64() -> None:
    array = np.random.default_rng(3).standard_normal(SLICE.shape).astype(np.float32)
    result = edit_initializer(array, EDIT)
    assert result.dtype == np.float64
    np.testing.assert_array_equal(result, expected(array.astype(np.float64)))
