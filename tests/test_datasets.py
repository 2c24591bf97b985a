"""tunnelgraph.datasets: IDX files written here, the real MNIST folder when present, the teacher task."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from tunnelgraph import datasets
from tunnelgraph.datasets import DatasetError, MissingDataError
from tunnelgraph.errors import TunnelgraphError

# The shared data folder beside the repository (not part of it: CI machines may lack it).
MNIST_ROOT = Path(__file__).resolve().parents[2].joinpath("shared", "data", "mnist")
needs_mnist = pytest.mark.skipif(
    not MNIST_ROOT.is_dir(), reason=f"no MNIST IDX files at {MNIST_ROOT} (the shared data folder beside the checkout)"
)


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """``array`` as an IDX file: two zero bytes, the type byte, the dimension count, the sizes, the data."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write(path: Path, data: bytes, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def fake_mnist(folder: Path, images: np.ndarray, labels: np.ndarray, *, split: str = "train",
               compress: bool = True, dotted: bool = False) -> None:
    prefix = {"train": "train", "test": "t10k"}[split]
    dot = "." if dotted else "-"
    suffix = ".gz" if compress else ""
    write(folder / f"{prefix}-images{dot}idx3-ubyte{suffix}", idx_bytes(images), compress)
    write(folder / f"{prefix}-labels{dot}idx1-ubyte{suffix}", idx_bytes(labels), compress)


# -- read_idx --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, compress", [("x.idx", False), ("x.idx.gz", True), ("x.idx", True),
                                            ("x.idx.gz", False)])
def test_idx_images_and_labels_round_trip_raw_and_gzip(tmp_path: Path, name: str, compress: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    read = datasets.read_idx(write(tmp_path / name, idx_bytes(images), compress), magic=datasets.IDX_IMAGES)
    assert read.dtype == np.uint8 and read.shape == (7, 5, 3) and np.array_equal(read, images)
    read[0, 0, 0] = 1  # writable
    labels_path = write(tmp_path / ("labels" + name), idx_bytes(labels), compress)
    assert np.array_equal(datasets.read_idx(labels_path, magic=datasets.IDX_LABELS), labels)


@pytest.mark.parametrize("type_code, dtype", [(0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32),
                                               (0x0D, np.float32), (0x0E, np.float64)])
def test_every_idx_element_type_is_read_big_endian_into_native_order(
    tmp_path: Path, type_code: int, dtype: type
) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 12).astype(dtype)
    read = datasets.read_idx(write(tmp_path / "a.idx", idx_bytes(array, type_code)))
    assert read.dtype == np.dtype(dtype) and read.dtype.isnative and np.array_equal(read, array)


def test_a_wrong_magic_number_names_the_file_and_both_numbers(tmp_path: Path) -> None:
    labels = write(tmp_path / "labels.idx", idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DatasetError, match=r"labels\.idx has IDX magic number 0x00000801, expected 0x00000803 "
                                           r"\(a 3-dimensional unsigned-byte array, images N x rows x cols\)"):
        datasets.read_idx(labels, magic=datasets.IDX_IMAGES)
    text = write(tmp_path / "notes.txt", b"hello, world")
    with pytest.raises(DatasetError, match=r"notes\.txt is not an IDX file: magic number 0x68656c6c"):
        datasets.read_idx(text)
    with pytest.raises(DatasetError, match=r"tiny is not an IDX file: 2 bytes"):
        datasets.read_idx(write(tmp_path / "tiny", b"\0\0"))
    assert issubclass(DatasetError, TunnelgraphError) and issubclass(DatasetError, ValueError)


@pytest.mark.parametrize("compress", [False, True])
def test_a_truncated_file_names_the_file_and_what_the_header_promised(tmp_path: Path, compress: bool) -> None:
    data = idx_bytes(np.zeros((3, 4, 4), np.uint8))
    path = write(tmp_path / "cut.idx", data[:-5], compress)
    with pytest.raises(DatasetError, match=r"cut\.idx is truncated: its header promises an array of shape "
                                           r"\(3, 4, 4\) \(64 bytes with the header\), the file has 59"):
        datasets.read_idx(path)
    with pytest.raises(DatasetError, match=r"head\.idx is truncated: 10 bytes, shorter than the 16-byte header"):
        datasets.read_idx(write(tmp_path / "head.idx", data[:10], compress))
    with pytest.raises(DatasetError, match=r"long\.idx has 3 bytes after the array of shape \(3, 4, 4\)"):
        datasets.read_idx(write(tmp_path / "long.idx", data + b"abc", compress))


def test_a_cut_gzip_stream_names_the_file(tmp_path: Path) -> None:
    packed = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8).reshape(2, 10, 10)))
    path = write(tmp_path / "cut.idx.gz", packed[: len(packed) // 2])
    with pytest.raises(DatasetError, match=r"cut\.idx\.gz: the gzip stream is truncated or corrupt"):
        datasets.read_idx(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match=r"IDX file .*nothing\.idx does not exist"):
        datasets.read_idx(tmp_path / "nothing.idx")
    with pytest.raises(FileNotFoundError, match=r"\(it is a folder\)"):
        datasets.read_idx(tmp_path)


# -- mnist on files written here -------------------------------------------------------------------
def small_mnist(tmp_path: Path, *, compress: bool = True, dotted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    fake_mnist(tmp_path, train, np.arange(12, dtype=np.uint8) % 10, compress=compress, dotted=dotted)
    fake_mnist(tmp_path, test, np.arange(5, dtype=np.uint8), split="test", compress=compress, dotted=dotted)
    return train, test


@pytest.mark.parametrize("compress, dotted", [(True, False), (False, False), (True, True), (False, True)])
def test_mnist_scales_and_subtracts_the_training_pixel_means(tmp_path: Path, compress: bool, dotted: bool) -> None:
    train_raw, test_raw = small_mnist(tmp_path, compress=compress, dotted=dotted)
    means = train_raw.astype(np.float64).mean(0) / 255
    train = datasets.mnist(tmp_path)
    test = datasets.mnist(tmp_path, "test")
    assert train.images.dtype == torch.float32 and train.images.shape == (12, 1, 28, 28)
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == [i % 10 for i in range(12)]
    assert train.classes == 10 and train.mean is not None and train.mean.shape == (1, 28, 28)
    np.testing.assert_allclose(train.mean[0].numpy(), means, rtol=1e-6)
    np.testing.assert_allclose(train.images[:, 0].numpy(), train_raw / 255 - means, atol=1e-6)
    np.testing.assert_allclose(test.images[:, 0].numpy(), test_raw / 255 - means, atol=1e-6)  # the train means
    assert torch.equal(test.mean, train.mean) and "per-pixel training means" in test.source


def test_mnist_global_given_and_no_mean_and_limit(tmp_path: Path) -> None:
    train_raw, test_raw = small_mnist(tmp_path)
    value = train_raw.astype(np.float64).mean() / 255
    scalar = datasets.mnist(tmp_path, "test", mean="global", limit=3)
    assert scalar.mean is not None and scalar.mean.shape == () and len(scalar) == 3
    np.testing.assert_allclose(scalar.images[:, 0].numpy(), test_raw[:3] / 255 - value, atol=1e-6)
    plain = datasets.mnist(tmp_path, mean=0.0)
    assert plain.images.min() >= 0 and plain.images.max() <= 1
    train = datasets.mnist(tmp_path, limit=4)
    np.testing.assert_allclose(train.mean[0].numpy(), train_raw.mean(0) / 255, rtol=1e-6)  # all 12 images
    given = datasets.mnist(tmp_path, "test", mean=train.mean)
    assert torch.equal(given.images, datasets.mnist(tmp_path, "test").images)
    with pytest.raises(DatasetError, match=r"mean of shape \(3,\) does not fit images of shape \(1, 28, 28\)"):
        datasets.mnist(tmp_path, mean=torch.zeros(3))
    with pytest.raises(ValueError, match="mean must be 'pixel', 'global'"):
        datasets.mnist(tmp_path, mean="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        datasets.mnist(tmp_path, "val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        datasets.mnist(tmp_path, limit=0)


def test_mnist_names_the_folder_and_the_expected_files(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match=r"MNIST folder .*absent does not exist: pass the folder that holds "
                                               r"train-images-idx3-ubyte\[\.gz\] and train-labels-idx1-ubyte"):
        datasets.mnist(tmp_path / "absent")
    with pytest.raises(MissingDataError, match=r"no MNIST test images in .*: expected one of t10k-images-idx3-ubyte, "
                                               r"t10k-images-idx3-ubyte\.gz, t10k-images\.idx3-ubyte, "
                                               r"t10k-images\.idx3-ubyte\.gz"):
        datasets.mnist(tmp_path, "test")
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((2, 28, 28), np.uint8)))
    with pytest.raises(MissingDataError, match=r"no MNIST train labels in .*train-labels-idx1-ubyte"):
        datasets.mnist(tmp_path)
    assert issubclass(MissingDataError, FileNotFoundError) and issubclass(MissingDataError, TunnelgraphError)


def test_mnist_refuses_swapped_or_mismatched_files(tmp_path: Path) -> None:
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros(3, np.uint8)))  # labels under the images' name
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte has IDX magic number 0x00000801, expected "
                                           r"0x00000803"):
        datasets.mnist(tmp_path)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((2, 28, 28), np.uint8)))
    with pytest.raises(DatasetError, match=r"holds 2 images but .*train-labels-idx1-ubyte 3 labels"):
        datasets.mnist(tmp_path)


# -- the real MNIST ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_mnist() -> tuple[datasets.ImageDataset, datasets.ImageDataset]:
    return datasets.mnist(MNIST_ROOT), datasets.mnist(MNIST_ROOT, "test")


@needs_mnist
def test_real_mnist_sizes_labels_and_centred_training_pixels(
    real_mnist: tuple[datasets.ImageDataset, datasets.ImageDataset],
) -> None:
    train, test = real_mnist
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    for split in (train, test):
        assert split.images.dtype == torch.float32 and split.labels.dtype == torch.int64
        assert split.labels.min() == 0 and split.labels.max() == 9 and split.classes == 10
    pixels = train.images.double()
    assert abs(pixels.mean().item()) < 1e-6 and pixels.mean(0).abs().max().item() < 1e-6
    assert train.mean is not None and abs(train.mean.double().mean().item() - 0.1307) < 1e-3  # MNIST's mean pixel
    assert torch.equal(test.mean, train.mean)  # the test split is shifted by the training means
    restored = test.images + test.mean
    assert restored.min() > -1e-6 and restored.max() < 1 + 1e-6
    assert abs(test.images.double().mean().item()) < 0.01  # close to, but not exactly, 0
    image, label = train[0]
    assert image.shape == (1, 28, 28) and label.item() == 5  # MNIST's first training digit is a 5


@needs_mnist
def test_real_mnist_limit_keeps_the_full_training_means(
    real_mnist: tuple[datasets.ImageDataset, datasets.ImageDataset],
) -> None:
    train, _ = real_mnist
    first = datasets.mnist(MNIST_ROOT, limit=100)
    assert len(first) == 100 and torch.equal(first.mean, train.mean)
    assert torch.equal(first.images, train.images[:100])


# -- the teacher task --------------------------------------------------------------------------------
def test_teacher_task_is_deterministic_given_its_seed_and_leaves_the_global_generator_alone() -> None:
    state = torch.random.get_rng_state()
    a, b = datasets.teacher_task(300, seed=4), datasets.teacher_task(300, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = datasets.teacher_task(300, seed=5)
    assert not torch.equal(a.images, other.images) and not torch.equal(a.labels, other.labels)
    assert a.images.dtype == torch.float32 and a.images.shape == (300, 1, 28, 28)
    assert a.labels.dtype == torch.int64 and a.mean is None and a.classes == 10
    assert abs(a.images.mean().item()) < 0.01 and abs(a.images.std().item() - 1) < 0.01  # standard normal


def test_teacher_task_labels_are_the_teachers_argmax_and_every_class_appears() -> None:
    task = datasets.teacher_task(2000)
    counts = torch.bincount(task.labels, minlength=10)
    assert len(counts) == 10 and counts.min() >= 100, counts  # calibrated: roughly 200 each
    assert task.teacher is not None and not any(p.requires_grad for p in task.teacher.parameters())
    with torch.no_grad():
        assert torch.equal(task.teacher(task.images.double()).argmax(1), task.labels)
    held_out = datasets.teacher_task(500, seed=1, teacher=task.teacher)  # same task, other images
    assert held_out.teacher is task.teacher and not torch.equal(held_out.images, task.images[:500])


def test_teacher_task_with_a_given_teacher_and_other_shapes() -> None:
    class Sign(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            total = x.flatten(1).sum(1, keepdim=True)
            return torch.cat([-total, total], 1)

    task = datasets.teacher_task(50, teacher=Sign(), image_shape=(2, 3, 3))
    assert task.classes == 2 and torch.equal(task.labels, (task.images.flatten(1).sum(1) > 0).long())
    colour = datasets.teacher_task(40, classes=3, image_shape=(3, 9, 7))
    assert colour.images.shape == (40, 3, 9, 7) and colour.labels.max() <= 2
    with pytest.raises(ValueError, match=r"image_shape must be \(channels, height, width\)"):
        datasets.teacher_task(4, image_shape=(784,))
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        datasets.teacher_task(0)


def test_loaders_give_the_same_batches_for_the_same_seed() -> None:
    task = datasets.teacher_task(40, seed=2)

    def epochs(seed: int) -> list[list[int]]:
        loader = datasets.loaders(task, 16, shuffle=True, seed=seed)
        return [torch.cat([labels for _, labels in loader]).tolist() for _ in range(2)]

    first = epochs(0)
    assert first == epochs(0) and first != epochs(1) and first[0] != first[1]  # reshuffled every epoch
    images, labels = next(iter(datasets.loaders(task, 16, shuffle=False, seed=0)))
    assert torch.equal(images, task.images[:16]) and torch.equal(labels, task.labels[:16])
