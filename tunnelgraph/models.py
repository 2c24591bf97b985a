"""Reference architectures from the paper, in plain ``torch.nn``.

These are the networks of the paper's experiments (docs/MATH.md section 9) and a
deep residual network for measuring the library at scale. Each builder
returns a freshly initialised module in training mode with PyTorch's default
initialisation; nothing here depends on the rest of tunnelgraph.

- :func:`paper_cnn`: the single-hidden-conv-layer MNIST network.
- :func:`paper_deep_cnn`: the 5-layer ImageNet 64x64 network.
- :func:`residual_net`: a stack of basic residual blocks whose residual
  stream is one coupled channel group.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = [
    "BasicBlock",
    "PaperCNN",
    "PaperDeepCNN",
    "ResidualNet",
    "paper_cnn",
    "paper_deep_cnn",
    "residual_net",
]


class PaperCNN(nn.Module):
    """One hidden convolution layer: ``fc(flatten(act(conv(x))))``.

    Attributes:
        conv: ``Conv2d(1, filters, 5)`` (no padding, stride 1), so an
            ``image_size`` x ``image_size`` image gives
            ``image_size - 4`` x ``image_size - 4`` feature maps.
        act: ``Sigmoid``.
        flatten: ``Flatten`` (channel-major: each filter is a block of
            ``(image_size - 4) ** 2`` features).
        fc: ``Linear(filters * (image_size - 4) ** 2, classes)``, the logits
            (the softmax belongs to the loss).

    Input ``(N, 1, image_size, image_size)``, output ``(N, classes)``.
    """

    def __init__(self, filters: int = 8, image_size: int = 28, classes: int = 10) -> None:
        super().__init__()
        side = image_size - 4
        if side < 1:
            raise ValueError(f"image_size must be at least 5 for a 5x5 convolution, got {image_size}")
        self.conv = nn.Conv2d(1, filters, 5)
        self.act = nn.Sigmoid()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(filters * side * side, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.act(self.conv(x))))


def paper_cnn(filters: int = 8, image_size: int = 28, classes: int = 10) -> nn.Module:
    """The paper's MNIST network (appendix B, figures 1-3).

    ``Conv2d(1, filters, 5) -> Sigmoid -> Flatten -> Linear(filters * 24 * 24,
    classes)`` for the default 28x28 images: 8 filters of 5x5, no batch norm,
    pooling or residuals. Its one hidden group, ``conv``, has ``filters``
    sites with K = 26 inbound weights (25 + bias) and L = ``classes * 576``
    outbound weights each. See :class:`PaperCNN` for the attributes.
    """
    return PaperCNN(filters, image_size, classes)


class PaperDeepCNN(nn.Module):
    """Five 3x3 convolutions of ``width`` filters, then a linear classifier.

    Attributes:
        features: ``nn.Sequential`` of, three times, ``Conv2d(_, width, 3,
            padding=1) -> BatchNorm2d(width) -> ReLU -> MaxPool2d(2, 2)``
            (indices 0-11), then twice ``Conv2d(width, width, 3, padding=1)
            -> ReLU`` (indices 12-15). The first convolution reads
            ``in_channels``.
        flatten: ``Flatten``.
        classifier: ``Linear(width * (image_size // 8) ** 2, classes)``, the
            logits (the softmax belongs to the loss).

    Forward: ``classifier(flatten(features(x)))``. Input
    ``(N, in_channels, image_size, image_size)``, output ``(N, classes)``.
    """

    def __init__(
        self, width: int = 64, in_channels: int = 3, image_size: int = 64, classes: int = 1000
    ) -> None:
        super().__init__()
        side = image_size // 8
        if side < 1:
            raise ValueError(f"image_size must be at least 8 for three 2x2 poolings, got {image_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(3):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(2, stride=2),
            ]
            channels = width
        for _ in range(2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(width * side * side, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


def paper_deep_cnn(
    width: int = 64, in_channels: int = 3, image_size: int = 64, classes: int = 1000
) -> nn.Module:
    """The paper's deep network (appendix B, ImageNet at 64x64).

    Five convolution layers of ``width`` filters (3x3, padding 1); batch
    norm, ReLU and 2x2 max pooling with stride 2 on the first three, ReLU on
    the last two; then a linear layer to ``classes`` logits. The paper opens
    tunnels in the last two hidden layers (``features.12`` and
    ``features.14``), which are sites by default; the first three feed batch
    norm and pooling and become sites with ``through=("batchnorm",
    "pooling")``. See :class:`PaperDeepCNN` for the attributes.
    """
    return PaperDeepCNN(width, in_channels, image_size, classes)


class BasicBlock(nn.Module):
    """A basic residual block with an identity shortcut.

    ``out = relu2(bn2(conv2(relu1(bn1(conv1(x))))) + x)``; both convolutions
    are ``Conv2d(width, width, 3, padding=1, bias=False)``.

    Attributes:
        conv1, bn1, relu1: the first convolution, its batch norm and ReLU.
        conv2, bn2: the second convolution and its batch norm.
        relu2: the ReLU after the residual add.

    The block's input and output channels are one index space (the residual
    stream); ``conv1``'s output channels are a group of their own.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class ResidualNet(nn.Module):
    """A stem, ``blocks`` basic residual blocks, global average pooling and a linear head.

    Attributes:
        stem: ``nn.Sequential(Conv2d(in_channels, width, 3, padding=1),
            BatchNorm2d(width), ReLU)``.
        blocks: ``nn.Sequential`` of ``blocks`` :class:`BasicBlock` of
            ``width`` channels (named ``blocks.0``, ``blocks.1``, ...).
        pool: ``AdaptiveAvgPool2d(1)``.
        flatten: ``Flatten``.
        fc: ``Linear(width, classes)``.

    Input ``(N, in_channels, H, W)`` for any ``H, W >= 1``, output
    ``(N, classes)``. The residual stream (the stem and every block's
    ``conv2``) is one channel group named ``stem.0``, legal with
    ``through=("batchnorm", "pooling")``; each block's ``conv1`` is a group
    of its own, named ``blocks.<i>.conv1``.
    """

    def __init__(
        self, blocks: int = 100, width: int = 16, in_channels: int = 3, classes: int = 10
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(*(BasicBlock(width) for _ in range(blocks)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))


def residual_net(
    blocks: int = 100, width: int = 16, in_channels: int = 3, classes: int = 10
) -> nn.Module:
    """A deep residual network of ``blocks`` basic blocks of ``width`` channels.

    ``Conv2d(in_channels, width, 3, padding=1) -> BatchNorm2d -> ReLU``, then
    ``blocks`` x (conv3x3 -> BN -> ReLU -> conv3x3 -> BN, add the identity,
    ReLU), then ``AdaptiveAvgPool2d(1) -> Flatten -> Linear(width, classes)``.
    With the defaults it has 201 convolutions; its residual-stream group
    couples the stem and all 100 second convolutions, so one rewrite of it
    touches about 200 convolutions and their batch norms. See
    :class:`ResidualNet` for the attributes.
    """
    return ResidualNet(blocks, width, in_channels, classes)
