"""Data for the paper's experiments: MNIST from IDX files, and a synthetic task that needs no download.

- :func:`mnist` reads the four standard IDX files (gzipped or raw) from a
  folder the caller names; nothing is downloaded. Images are float32
  ``(N, 1, 28, 28)`` in ``[0, 1]`` minus the pixel means of the training
  images, as the paper preprocesses them (appendix B: "subtracting the pixel
  means calculated over the entire dataset"); labels are int64.
- :func:`teacher_task` draws standard-normal images and labels them with a
  fixed random convolutional network (:func:`teacher_network`): a task with
  learnable structure, deterministic given its seed, that needs no files. It
  is the embedded default of the demo (``examples/quickstart.py`` without
  ``--mnist``).
- :func:`read_idx` parses any IDX file; :func:`loaders` wraps a data set in a
  ``DataLoader`` whose shuffling is seeded.

Both data sets are :class:`ImageDataset` objects: ``TensorDataset`` of
``(images, labels)`` that also record how they were made (``mean``,
``teacher``, ``source``).
"""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import skip_init
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tunnelgraph.errors import TunnelgraphError

__all__ = [
    "DatasetError",
    "IDX_IMAGES",
    "IDX_LABELS",
    "ImageDataset",
    "MissingDataError",
    "image_folder",
    "loaders",
    "mnist",
    "read_idx",
    "teacher_network",
    "teacher_task",
]

logger = logging.getLogger(__name__)

IDX_IMAGES = 0x00000803
"""IDX magic number of unsigned-byte arrays with three dimensions: ``N x rows x cols`` images."""
IDX_LABELS = 0x00000801
"""IDX magic number of unsigned-byte arrays with one dimension: ``N`` labels."""

# IDX type byte -> element type (big-endian on disk)
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

MeanSpec = Union[Literal["pixel", "global"], float, np.ndarray, torch.Tensor]


class DatasetError(TunnelgraphError, ValueError):
    """A data file is malformed (not IDX, wrong kind of array, truncated, inconsistent); the message names it."""


class MissingDataError(TunnelgraphError, FileNotFoundError):
    """A data file or folder does not exist; the message names what was looked for, and where."""


class ImageDataset(TensorDataset):
    """A ``TensorDataset`` of ``(images, labels)`` that records how it was made.

    Indexing gives ``(image, label)`` pairs, so a ``DataLoader`` over it
    yields the ``(inputs, targets)`` batches ``tg.a_statistics`` reads.

    Attributes:
        images: float32 ``(N, C, H, W)``.
        labels: int64 ``(N,)``, in ``0 .. classes - 1``.
        classes: the number of classes of the task (not necessarily all
            present in a small sample).
        mean: what was subtracted from the ``[0, 1]``-scaled pixels (float32,
            ``(C, H, W)`` for per-pixel means, ``()`` for one value), or
            ``None`` for data that was never shifted (:func:`teacher_task`).
        teacher: the network whose argmax gave the labels
            (:func:`teacher_task`), else ``None``.
        source: one line saying where the data came from.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        classes: int,
        source: str,
        mean: torch.Tensor | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        super().__init__(images, labels)
        self.classes = classes
        self.source = source
        self.mean = mean
        self.teacher = teacher

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]

    def __repr__(self) -> str:
        return f"ImageDataset({len(self)} images {tuple(self.images.shape[1:])}, {self.classes} classes: {self.source})"


# -- IDX ------------------------------------------------------------------------------------------
def read_idx(path: str | Path, *, magic: int | None = None) -> np.ndarray:
    """The array stored in the IDX file ``path`` (gzip-compressed or raw).

    IDX, the format of the MNIST files: a big-endian header of two zero
    bytes, a type byte (0x08 unsigned byte, 0x09 signed byte, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64) and a dimension count, one
    uint32 per dimension, then the elements in row-major order. The
    header's first four bytes together are the *magic number*: 0x00000803
    for unsigned-byte images ``N x rows x cols`` (:data:`IDX_IMAGES`),
    0x00000801 for unsigned-byte labels (:data:`IDX_LABELS`). A file is
    read as gzip when it starts with gzip's magic bytes (whatever its name),
    else as raw IDX.

    Args:
        path: the file.
        magic: the magic number the file must have, or ``None`` for any
            valid IDX header.

    Returns:
        A writable array in native byte order, of the header's shape.

    Raises:
        MissingDataError: ``path`` does not exist.
        DatasetError: the file is not IDX, has another magic number than
            ``magic``, is truncated, has bytes after the data, or its gzip
            stream is corrupt. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"IDX file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DatasetError(f"{path}: the gzip stream is truncated or corrupt ({error})") from error
    elif path.suffix == ".gz":
        logger.debug("%s is named .gz but is not gzip-compressed: reading it as raw IDX", path)
    if len(raw) < 4:
        raise DatasetError(f"{path} is not an IDX file: {len(raw)} bytes, shorter than the 4-byte magic number")
    found = int.from_bytes(raw[:4], "big")
    type_code, ndim = raw[2], raw[3]
    if raw[:2] != b"\0\0" or type_code not in _IDX_TYPES or ndim == 0:
        raise DatasetError(
            f"{path} is not an IDX file: magic number {found:#010x} (IDX starts with two zero bytes, a type "
            f"byte among {', '.join(f'{t:#04x}' for t in _IDX_TYPES)} and a nonzero dimension count)"
        )
    if magic is not None and found != magic:
        raise DatasetError(f"{path} has IDX magic number {found:#010x}, expected {magic:#010x} ({_describe(magic)}); "
                           f"it holds {_describe(found)}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated: {len(raw)} bytes, shorter than the {header}-byte header of a "
                           f"{ndim}-dimensional IDX array")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_TYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) < expected:
        raise DatasetError(f"{path} is truncated: its header promises an array of shape {shape} ({expected} bytes "
                           f"with the header), the file has {len(raw)}")
    if len(raw) > expected:
        raise DatasetError(f"{path} has {len(raw) - expected} bytes after the array of shape {shape} its header "
                           "announces: not a single IDX array")
    array = np.frombuffer(raw, dtype=dtype, offset=header)
    return array.reshape(shape).astype(dtype.newbyteorder("="))  # a copy: writable, native byte order


def _describe(magic: int) -> str:
    type_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    element = {0x08: "unsigned-byte", 0x09: "signed-byte", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32",
               0x0E: "float64"}.get(type_code, f"type {type_code:#04x}")
    kind = {IDX_IMAGES: " images N x rows x cols", IDX_LABELS: " labels"}.get(magic, "")
    return f"a {ndim}-dimensional {element} array" + ("," + kind if kind else "")


# -- MNIST ----------------------------------------------------------------------------------------
_PREFIX = {"train": "train", "test": "t10k"}


def _mnist_names(split: str, kind: str) -> list[str]:
    """The accepted names of one MNIST file, in order of preference (raw before gzip)."""
    ndim = 3 if kind == "images" else 1
    stems = [f"{_PREFIX[split]}-{kind}-idx{ndim}-ubyte", f"{_PREFIX[split]}-{kind}.idx{ndim}-ubyte"]
    return [name for stem in stems for name in (stem, f"{stem}.gz")]


def _find_mnist_file(root: Path, split: str, kind: str) -> Path:
    names = _mnist_names(split, kind)
    for name in names:
        if (root / name).is_file():
            return root / name
    raise MissingDataError(
        f"no MNIST {split} {kind} in {root}: expected one of {', '.join(names)} (the standard IDX files, "
        "gzipped or raw; tunnelgraph downloads nothing)"
    )


def _read_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find_mnist_file(root, split, "images")
    labels_path = _find_mnist_file(root, split, "labels")
    images = read_idx(images_path, magic=IDX_IMAGES)
    labels = read_idx(labels_path, magic=IDX_LABELS)
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    logger.debug("read %d %s images %s from %s", len(images), split, images.shape[1:], images_path)
    return images, labels


def mnist(
    root: str | Path,
    split: Literal["train", "test"] = "train",
    *,
    limit: int | None = None,
    mean: MeanSpec = "pixel",
    device: torch.device | str | None = None,
) -> ImageDataset:
    """MNIST (or any data set in its IDX layout) from the folder ``root``, preprocessed as in the paper.

    Reads ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (split
    ``"train"``) or ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``
    (split ``"test"``), each gzipped (``.gz``) or raw, also under the names
    with a dot before ``idx`` (``train-images.idx3-ubyte``). Nothing is
    downloaded.

    Images are scaled to ``[0, 1]`` (divided by 255) and shifted by ``mean``:

    - ``"pixel"`` (the default, the paper's preprocessing): subtract the
      per-pixel means of the *training* images, a ``(1, 28, 28)`` image
      averaged over all 60000 of them (whatever ``limit`` and ``split``
      are), so the test split is shifted by the training means and every
      pixel of the full training split has mean 0;
    - ``"global"``: subtract one value, the mean of every pixel of every
      training image (about 0.1307 for MNIST);
    - a number, array or tensor broadcastable to ``(1, 28, 28)``, in the
      ``[0, 1]`` scale: subtract it as given (``0.0`` leaves the images in
      ``[0, 1]``; ``mean=train.mean`` spares the test split a second read of
      the training images).

    The means are computed in float64 and subtracted in float32. The
    dataset's ``mean`` records what was subtracted.

    Args:
        root: the folder holding the IDX files.
        split: ``"train"`` (60000 images) or ``"test"`` (10000).
        limit: keep only the first ``limit`` images (the means are still
            those of the whole training split).
        mean: see above.
        device: where the tensors go (default: CPU).

    Returns:
        An :class:`ImageDataset` of float32 images ``(N, 1, 28, 28)`` and
        int64 labels ``(N,)``, ``classes`` one more than the largest label.

    Raises:
        MissingDataError: ``root`` or one of the split's files is missing;
            the message names the folder and the file names looked for.
        DatasetError: a file is malformed (see :func:`read_idx`), images and
            labels disagree in count, or ``mean`` does not fit the images.
        ValueError: ``split``, ``limit`` or ``mean`` is not one of the above.
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    root = Path(root)
    if not root.is_dir():
        raise MissingDataError(
            f"MNIST folder {root} does not exist: pass the folder that holds {_mnist_names(split, 'images')[0]}"
            f"[.gz] and {_mnist_names(split, 'labels')[0]}[.gz]"
        )
    images, labels = _read_mnist(root, split)
    if isinstance(mean, str):
        if mean not in ("pixel", "global"):
            raise ValueError(f"mean must be 'pixel', 'global', a number or a tensor, got {mean!r}")
        train_images = images if split == "train" else _read_mnist(root, "train")[0]
        axis = 0 if mean == "pixel" else None
        shift = np.mean(train_images, axis=axis, dtype=np.float64) / 255.0
        description = "per-pixel training means" if mean == "pixel" else "the training images' mean pixel value"
    else:
        shift = mean.detach().cpu().double().numpy() if isinstance(mean, torch.Tensor) else np.asarray(mean, np.float64)
        description = "the given mean"
    shift = np.asarray(shift, dtype=np.float32)
    if shift.ndim == 2:
        shift = shift[None]  # a (rows, cols) image of means: one channel
    try:
        np.broadcast_shapes(shift.shape, (1, *images.shape[1:]))
    except ValueError:
        raise DatasetError(f"mean of shape {shift.shape} does not fit images of shape {(1, *images.shape[1:])} "
                           f"from {root}") from None
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    pixels = images[:, None].astype(np.float32) / np.float32(255.0)
    pixels -= shift
    return ImageDataset(
        torch.from_numpy(pixels).to(device),
        torch.from_numpy(labels.astype(np.int64)).to(device),
        classes=int(labels.max()) + 1 if labels.size else 0,
        mean=torch.from_numpy(shift.copy()).to(device),
        source=f"MNIST {split} split, {len(pixels)} images from {root}, {description} subtracted",
    )


# -- the synthetic teacher task -------------------------------------------------------------------
def teacher_network(
    *, seed: int = 0, classes: int = 10, image_shape: Sequence[int] = (1, 28, 28), calibration: int = 4096,
    architecture: Literal["conv2", "paper"] = "conv2",
) -> nn.Sequential:
    """A fixed random convolutional network, deterministic given ``seed``, whose argmax labels a task.

    ``architecture="conv2"`` (the default): ``Conv2d(C, 16, 5, stride 2,
    padding 2) -> Tanh -> Conv2d(16, 32, 3, stride 2, padding 1) -> Tanh ->
    Flatten -> Linear(_, classes)``; ``"paper"``: the paper's MNIST network
    ``Conv2d(C, 8, 5) -> Sigmoid -> Flatten -> Linear(_, classes)``, so that
    a student of that shape can fit the task exactly. Either in
    float64, weights normal with variance ``1 / fan_in`` and zero biases,
    drawn from a generator seeded with ``seed``. The last layer is then
    calibrated on ``calibration`` standard-normal images from the same
    generator: each logit is shifted and scaled to mean 0 and standard
    deviation 1 over them, so that no class dominates the argmax (every
    class is roughly equally likely). The network is in eval mode and its
    parameters do not require gradients.
    """
    channels, height, width = _image_shape(image_shape)
    if classes < 2:
        raise ValueError(f"classes must be at least 2, got {classes}")
    generator = torch.Generator().manual_seed(seed)
    # skip_init: PyTorch's default initialisation would draw from (and so change) the global generator
    double = {"dtype": torch.float64}
    if architecture == "paper":
        if height < 5 or width < 5:
            raise ValueError(f"the paper teacher's 5x5 convolution needs images of at least 5x5, got {image_shape}")
        network = nn.Sequential(skip_init(nn.Conv2d, channels, 8, 5, **double), nn.Sigmoid(), nn.Flatten())
        features = 8 * (height - 4) * (width - 4)
    elif architecture == "conv2":
        network = nn.Sequential(
            skip_init(nn.Conv2d, channels, 16, 5, stride=2, padding=2, **double),
            nn.Tanh(),
            skip_init(nn.Conv2d, 16, 32, 3, stride=2, padding=1, **double),
            nn.Tanh(),
            nn.Flatten(),
        )
        features = 32 * _halved(_halved(height)) * _halved(_halved(width))
    else:
        raise ValueError(f"architecture must be 'conv2' or 'paper', got {architecture!r}")
    readout: nn.Linear = skip_init(nn.Linear, features, classes, **double)
    network.append(readout)
    with torch.no_grad():
        for module in network:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator, dtype=torch.float64))
                module.weight.mul_(fan_in ** -0.5)
                if module.bias is not None:
                    module.bias.zero_()
        probe = torch.randn(calibration, channels, height, width, generator=generator, dtype=torch.float64)
        logits = network(probe)
        location, scale = logits.mean(0), logits.std(0).clamp_min(1e-12)
        readout.weight.div_(scale[:, None])
        readout.bias.copy_(-location / scale)
    network.requires_grad_(False)
    return network.eval()


def teacher_task(
    samples: int,
    *,
    seed: int = 0,
    classes: int = 10,
    image_shape: Sequence[int] = (1, 28, 28),
    teacher: nn.Module | None = None,
    device: torch.device | str | None = None,
) -> ImageDataset:
    """A classification task that needs no download: random images labelled by a random teacher network.

    Images are standard normal, float32 ``(samples, *image_shape)``; labels
    are the argmax of ``teacher`` over each image (int64). Without
    ``teacher``, the teacher is :func:`teacher_network` with this ``seed``,
    ``classes`` and ``image_shape``, evaluated in float64 (so the labels do
    not depend on a machine's float32 kernels). This is the embedded default
    of the demo, ``examples/quickstart.py``, when no MNIST folder is given.

    The images are drawn from a generator seeded with ``seed`` on a stream
    apart from the teacher's weights, and everything is deterministic given
    ``seed``. For held-out data of the same task, draw with another seed and
    the same teacher: ``teacher_task(n, seed=1, teacher=train.teacher)``.

    Args:
        samples: the number of images.
        seed: fixes the images and, when ``teacher`` is ``None``, the teacher.
        classes: the number of classes (ignored when ``teacher`` is given:
            then it is the width of the teacher's output).
        image_shape: ``(channels, height, width)``.
        teacher: any module mapping ``(N, *image_shape)`` images to
            ``(N, classes)`` scores; run without gradients, in the dtype and
            on the device of its parameters (float32 CPU if it has none).
        device: where the returned tensors go (default: CPU).

    Returns:
        An :class:`ImageDataset` whose ``teacher`` is the labelling network
        and whose ``mean`` is ``None``.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    shape = _image_shape(image_shape)
    if teacher is None:
        teacher = teacher_network(seed=seed, classes=classes, image_shape=shape)
    # the images get a stream of their own, so they are independent of the teacher's weights
    input_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1, dtype=np.uint64)[0])
    images = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(input_seed))
    parameter = next(iter(teacher.parameters()), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    where = parameter.device if parameter is not None else torch.device("cpu")
    with torch.no_grad():
        scores = torch.cat([teacher(chunk.to(where, dtype)).cpu() for chunk in images.split(4096)])
    if scores.ndim != 2 or scores.shape[0] != samples:
        raise ValueError(f"the teacher must map {samples} images to ({samples}, classes) scores, "
                         f"it gave shape {tuple(scores.shape)}")
    return ImageDataset(
        images.to(device),
        scores.argmax(1).to(device),
        classes=scores.shape[1],
        teacher=teacher,
        source=f"teacher task, seed {seed}: {samples} standard-normal images {shape} labelled by a random "
               f"{scores.shape[1]}-class teacher network",
    )


def _halved(size: int) -> int:
    """The output size of the teacher's convolutions (stride 2, padding keeping ``ceil(size / 2)``)."""
    return (size + 1) // 2


def _image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(size) for size in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (channels, height, width) of positive sizes, got {image_shape!r}")
    return shape[0], shape[1], shape[2]


def loaders(
    dataset: Dataset[Any], batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False
) -> DataLoader[Any]:
    """A ``DataLoader`` over ``dataset`` whose order is deterministic given ``seed``.

    With ``shuffle``, every epoch (every new iteration over the loader)
    draws a new order from a generator seeded with ``seed``, so two loaders
    made with the same seed give the same batches epoch by epoch (the paper
    reshuffles every epoch, minibatch 256). Batches are ``(images,
    labels)`` pairs, loaded in this process.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)


# -- image folders ---------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".webp", ".tif", ".tiff")


def image_folder(root: str | Path, *, size: int = 64, limit: int | None = None, grayscale: bool = False) -> ImageDataset:
    """Images from a folder of class sub-folders (``root/<class>/<image>``), as ImageNet 64x64 is laid out.

    Classes are the sub-folders in sorted order (labels ``0 .. classes - 1``);
    every image is converted to RGB (or to one channel with ``grayscale``),
    resized to ``size`` x ``size``, scaled to ``[0, 1]``, and shifted by the
    per-channel mean over the images read. Needs pillow (``pip install
    pillow``; matplotlib, the ``plots`` extra, brings it).

    Args:
        root: the folder.
        size: the side of the square images.
        limit: read at most this many images per class.
        grayscale: one channel instead of three.

    Raises:
        MissingDataError: ``root`` does not exist or holds no class folder with images.
        DatasetError: an image cannot be read (named).
    """
    try:
        from PIL import Image
    except ImportError as error:
        raise DatasetError("image_folder needs pillow: pip install pillow") from error
    root = Path(root)
    if not root.is_dir():
        raise MissingDataError(f"no folder '{root}'; pass a folder of class sub-folders of images")
    classes = sorted(entry for entry in root.iterdir() if entry.is_dir())
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, folder in enumerate(classes):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        for file in files:
            try:
                with Image.open(file) as image:
                    converted = image.convert("L" if grayscale else "RGB").resize((size, size), Image.BILINEAR)
                    array = np.asarray(converted, dtype=np.float32) / 255.0
            except OSError as error:
                raise DatasetError(f"cannot read image '{file}': {error}") from error
            images.append(array[None] if grayscale else array.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise MissingDataError(
            f"'{root}' holds no class sub-folder with images ({', '.join(IMAGE_SUFFIXES)}); lay it out as "
            "root/<class>/<image>"
        )
    stacked = torch.from_numpy(np.stack(images))
    mean = stacked.mean(dim=(0, 2, 3))
    stacked = stacked - mean[None, :, None, None]
    return ImageDataset(stacked.contiguous(), torch.tensor(labels, dtype=torch.int64), classes=len(classes),
                        source=f"image folder {root} ({len(classes)} classes, {size}x{size})", mean=mean)
