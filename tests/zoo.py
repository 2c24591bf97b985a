"""A zoo of small test architectures written in plain PyTorch.

The zoo is the material the library is tested against, so nothing here
imports ``tunnelgraph`` except :mod:`tunnelgraph.models` (the paper's
reference architectures, themselves plain PyTorch): entries 2
``paper_cnn``, 3 ``paper_deep_cnn`` and 18 ``residual_net_3`` are built from
it. Every model is tiny (a CPU forward costs a few milliseconds at most), is
returned in eval mode, and is deterministic given the global torch seed that
the caller sets before calling ``entry.build()``.

Models with BatchNorm get non-trivial running statistics and affine
parameters, so that BN folding / tracing tests actually exercise them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tunnelgraph import models


@dataclass(frozen=True)
class ZooEntry:
    name: str  # short id, used as pytest id
    build: Callable[[], nn.Module]  # builds a fresh model (eval mode)
    input_shape: tuple[int, ...]  # example input shape INCLUDING batch dim
    has_batchnorm: bool
    traceable: bool = True  # False only for the untraceable model


def example_input(
    entry: ZooEntry, dtype: torch.dtype = torch.float32, batch: int | None = None
) -> torch.Tensor:
    """Random standard-normal input of ``entry.input_shape``.

    ``batch`` replaces the leading (batch) dimension when given.
    """
    shape = tuple(entry.input_shape)
    if batch is not None:
        shape = (int(batch),) + shape[1:]
    return torch.randn(shape, dtype=dtype)


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine params."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.copy_(torch.randn(n) * 0.1)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n) * 0.2)
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(10)
    return model


def _finish(model: nn.Module) -> nn.Module:
    return _randomize_batchnorm(model).eval()


# ---------------------------------------------------------------------------
# 1. mlp_tanh
# ---------------------------------------------------------------------------
class MLPTanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.act1 = nn.Tanh()
        self.fc2 = nn.Linear(16, 12)
        self.act2 = nn.Tanh()
        self.fc3 = nn.Linear(12, 8)
        self.act3 = nn.Tanh()
        self.fc4 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(x))
        x = self.act2(self.fc2(x))
        x = self.act3(self.fc3(x))
        return self.fc4(x)


# 2. paper_cnn and 3. paper_deep_cnn come from tunnelgraph.models.


# ---------------------------------------------------------------------------
# 4. conv_stride_pad_dilation
# ---------------------------------------------------------------------------
class ConvStridePadDilation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 16 -> 8
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 12, 3, padding=2, dilation=2)  # 8 -> 8
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(12, 6, 3, stride=1, padding=1)  # 8 -> 8
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.conv3(x)
        return self.fc(self.flatten(x))


# ---------------------------------------------------------------------------
# 5. conv1d
# ---------------------------------------------------------------------------
class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)  # 32 -> 32
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv1d(8, 8, 5, stride=2)  # 32 -> 14
        self.elu = nn.ELU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 14, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.elu(self.conv2(x))
        return self.fc(self.flatten(x))


# ---------------------------------------------------------------------------
# 6. grouped_conv
# ---------------------------------------------------------------------------
class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.relu3 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.fc(self.flatten(x))


# ---------------------------------------------------------------------------
# 7. depthwise_separable
# ---------------------------------------------------------------------------
class DepthwiseSeparable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.relu = nn.ReLU()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.hardswish = nn.Hardswish()
        self.pointwise = nn.Conv2d(8, 12, 1)
        self.silu = nn.SiLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(12 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.expand(x))
        x = self.hardswish(self.depthwise(x))
        x = self.silu(self.pointwise(x))
        return self.fc(self.flatten(x))


# ---------------------------------------------------------------------------
# 8. resnet_stack
# ---------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()  # used twice, as in torchvision's BasicBlock
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu(out)


class ResNetStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(x))
        return self.fc(self.flatten(self.pool(x)))


class ResNetDownsample(nn.Module):
    """A ResNet stage that halves the feature map: a stride-2 3x3 conv beside a stride-2 1x1 shortcut, then a
    block at the new size, a global average pool and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.conv1 = nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(10)
        self.conv2 = nn.Conv2d(10, 10, 3, padding=1)
        self.downsample = nn.Conv2d(6, 10, 1, stride=2)
        self.block = BasicBlock(10)
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))) + self.downsample(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.block(x), 1), 1))


# ---------------------------------------------------------------------------
# 9. inception_concat
# ---------------------------------------------------------------------------
class InceptionConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 1)
        self.relu_in = nn.ReLU()
        self.b1_conv = nn.Conv2d(8, 4, 1)
        self.b1_act = nn.ReLU()
        self.b2_conv = nn.Conv2d(8, 6, 3, padding=1)
        self.b2_act = nn.ReLU()
        self.b3_conv = nn.Conv2d(8, 5, 1)
        self.b3_act = nn.Tanh()
        self.conv_out = nn.Conv2d(15, 8, 1)
        self.relu_out = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu_in(self.conv_in(x))
        b1 = self.b1_act(self.b1_conv(x))
        b2 = self.b2_act(self.b2_conv(x))
        b3 = self.b3_act(self.b3_conv(x))
        x = torch.cat([b1, b2, b3], dim=1)
        x = self.relu_out(self.conv_out(x))
        return self.fc(self.flatten(x))


# ---------------------------------------------------------------------------
# 10. transformer_mlp
# ---------------------------------------------------------------------------
class TransformerMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(self.act(self.fc1(self.ln(x))))
        return self.head(x)


class PatchTransformer(nn.Module):
    """ViT-shaped: patch embedding, class token, position embedding, pre-norm MLP blocks, head on the token.

    The residual stream is made by the concat of the class token and the
    patches, which no group reaches (the transpose blocks the patch
    embedding): it is reported as a blocked group named by its first
    producer, ``blocks.0.fc2``. The MLPs' hidden units are the sites.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, 4, stride=4)
        self.token = nn.Parameter(torch.randn(1, 1, width))
        self.position = nn.Parameter(torch.randn(1, 5, width))
        self.blocks = nn.Sequential(*(_PreNormMLP(width) for _ in range(2)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        x = self.blocks(x)
        return self.head(self.norm(x)[:, 0])


class _PreNormMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


# ---------------------------------------------------------------------------
# 11. functional_mix
# ---------------------------------------------------------------------------
class FunctionalMix(nn.Module):
    """Mixes nn modules with functional / torch-level activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)  # 8 -> 8
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)  # 8 -> 4
        self.fc1 = nn.Linear(6 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 12)
        self.fc4 = nn.Linear(12, 12)
        self.fc5 = nn.Linear(12, 8)
        self.fc6 = nn.Linear(8, 8)
        self.fc7 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        x = x * 2.0
        x = x.view(x.size(0), -1)
        x = F.leaky_relu(self.fc1(x), 0.1)
        x = F.gelu(self.fc2(x))
        x = F.silu(self.fc3(x))
        x = F.softplus(self.fc4(x))
        x = F.elu(self.fc5(x))
        x = torch.relu(self.fc6(x))
        x = torch.sigmoid(self.fc7(x))
        return x


# ---------------------------------------------------------------------------
# 12. hardcoded_view
# ---------------------------------------------------------------------------
class HardcodedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)  # 8 -> 6
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3)  # 6 -> 4
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(96, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = x.view(-1, 96)  # literal width: 6 * 4 * 4
        return self.fc(x)


# ---------------------------------------------------------------------------
# 13. untraceable
# ---------------------------------------------------------------------------
class Untraceable(nn.Module):
    """Data-dependent Python control flow: torch.fx.symbolic_trace fails."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 8)
        self.fc2 = nn.Linear(8, 4)
        self.fc3 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:
            return self.fc2(h)
        return self.fc3(h)


# ---------------------------------------------------------------------------
# 14. mlp_bn_dropout
# ---------------------------------------------------------------------------
class MLPBNDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.bn = nn.BatchNorm1d(16)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.1)
        self.fc2 = nn.Linear(16, 8)
        self.sigmoid = nn.Sigmoid()
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.relu(self.bn(self.fc1(x))))
        x = self.sigmoid(self.fc2(x))
        return self.fc3(x)


# ---------------------------------------------------------------------------
# 15. conv_bn_pool_avg
# ---------------------------------------------------------------------------
class ConvBNPoolAvg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.avgpool = nn.AvgPool2d(2)  # 8 -> 4
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.lrelu = nn.LeakyReLU(0.2)
        self.maxpool = nn.MaxPool2d(2)  # 4 -> 2
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.relu(self.bn1(self.conv1(x))))
        x = self.maxpool(self.lrelu(self.conv2(x)))
        return self.fc(self.flatten(x))


# ---------------------------------------------------------------------------
# 16. softplus_sigmoid_mlp
# ---------------------------------------------------------------------------
class SoftplusSigmoidMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.softplus = nn.Softplus()
        self.fc2 = nn.Linear(10, 10)
        self.sigmoid = nn.Sigmoid()
        self.fc3 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.softplus(self.fc1(x))
        x = self.sigmoid(self.fc2(x))
        return self.fc3(x)


# ---------------------------------------------------------------------------
# 17. functional_flatten (torch.flatten + torch.sigmoid on the conv path)
# ---------------------------------------------------------------------------
class FunctionalFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)  # 6 -> 4
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.conv(x))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class GlobalMeanPool(nn.Module):
    """conv -> relu -> conv -> relu -> x.mean((2, 3)) -> linear: pooling spelled as a reduction."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    """A squeeze-and-excitation gate: channels coupled through a broadcast multiply."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.excite = nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(self.pool(x)))))
        x = torch.tanh(self.head(x * gate))
        return self.fc(torch.flatten(x, 1))


class DenseBlock(nn.Module):
    """DenseNet-style: a tensor feeds a conv and a concat; batch norm after the concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.grow = nn.Conv2d(4, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(7)
        self.mix = nn.Conv2d(7, 5, 1)
        self.fc = nn.Linear(5 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        y = torch.relu(self.grow(h))
        z = torch.relu(self.bn(torch.cat([h, y], dim=1)))
        return self.fc(torch.relu(self.mix(z)).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV3's first blocks: the first has expand ratio 1, so its 1x1 projection reads the
    stream (through the depthwise chain) and, through the residual add, writes it too."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.dw1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw1_bn = nn.BatchNorm2d(8)
        self.project1 = nn.Conv2d(8, 8, 1, bias=False)
        self.project1_bn = nn.BatchNorm2d(8)
        self.expand2 = nn.Conv2d(8, 16, 1, bias=False)
        self.expand2_bn = nn.BatchNorm2d(16)
        self.dw2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.dw2_bn = nn.BatchNorm2d(16)
        self.project2 = nn.Conv2d(16, 8, 1, bias=False)
        self.project2_bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 12, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.stem_bn(self.stem(x)))
        x = x + self.project1_bn(self.project1(F.relu(self.dw1_bn(self.dw1(x)))))
        h = F.relu(self.expand2_bn(self.expand2(x)))
        x = x + self.project2_bn(self.project2(F.relu(self.dw2_bn(self.dw2(h)))))
        x = F.hardswish(self.head(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a batch norm subclass whose forward calls ``F.batch_norm`` on its own
    buffers, with the training flag read in the forward (torch.fx bakes it into the trace)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
        )
        return F.relu(x)


class FunctionalBatchNorm(nn.Module):
    """conv -> BatchNormAct2d -> conv -> BatchNormAct2d -> pool -> linear (timm's functional batch norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = BatchNormAct2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = BatchNormAct2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d (BiT): every output filter standardised in forward by ``F.batch_norm``."""

    def __init__(self, *args: int, eps: float = 1e-6, **kwargs: int) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d (NF-ResNet): standardised filters times a learned per-filter gain."""

    def __init__(self, *args: int, gamma: float = 1.0, eps: float = 1e-6, **kwargs: int) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSamePad(nn.Conv2d):
    """A conv that pads in forward with literal sizes, then calls ``F.conv2d`` on its own weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MixedFilterConv(nn.Conv2d):
    """A computed weight that mixes output filters (each filter minus the mean filter): not per filter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight - self.weight.mean(0, keepdim=True)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class WeightStandardized(nn.Module):
    """NF-ResNet / BiT-style: StdConv2d -> ScaledStdConv2d -> padded functional conv -> mixed conv -> linear.

    Sites: the ScaledStdConv2d's filters feed a functional conv (exact);
    the StdConv2d's feed the ScaledStdConv2d (blocked: its computed weight
    reads every input column); the padded conv's feed the mixed conv
    (blocked: a weight computed across filters); the mixed conv's feed the
    head through pooling.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = StdConv2d(3, 6, 3, padding=1)
        self.conv1 = ScaledStdConv2d(6, 8, 3, padding=1, gamma=1.7)
        self.conv2 = Conv2dSamePad(8, 5, 3, stride=2)
        self.conv3 = MixedFilterConv(5, 7, 1)
        self.fc = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv1(F.relu(self.stem(x))))
        x = torch.tanh(self.conv3(F.gelu(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


class ChannelsLastBlocks(nn.Module):
    """ConvNeXt-shaped, without its layer norm and layer scale: a stem conv, two blocks of depthwise conv
    -> channels last -> linear -> GELU -> linear -> channels first -> residual add, then a 1x1 conv head.

    The blocks spell the moves differently (``x.permute(0, 2, 3, 1)`` and ``permute(0, 3, 1, 2)``;
    ``torch.movedim(x, 1, -1)`` and two ``transpose`` calls). The residual stream is one group: the stem
    and both blocks' second linear layers (their units on the last axis, moved back to axis 1) make it,
    the blocks' first linear layers (reading the last axis) and the head conv read it, and it passes the
    depthwise convs (``through=("depthwise",)``). Each block's hidden units are sites.
    """

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 2, stride=2)
        self.dw0 = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.fc0a = nn.Linear(width, 2 * width)
        self.fc0b = nn.Linear(2 * width, width)
        self.dw1 = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.fc1a = nn.Linear(width, 2 * width)
        self.fc1b = nn.Linear(2 * width, width)
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.dw0(x).permute(0, 2, 3, 1)
        x = x + self.fc0b(F.gelu(self.fc0a(h))).permute(0, 3, 1, 2)
        h = torch.movedim(self.dw1(x), 1, -1)
        x = x + self.fc1b(F.gelu(self.fc1a(h))).transpose(1, 3).transpose(2, 3)
        return self.head(x).mean((2, 3))


def _builder(cls: Callable[..., nn.Module], **kwargs: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return _finish(cls(**kwargs))

    build.__name__ = f"build_{cls.__name__}"
    build.__qualname__ = build.__name__
    return build


ZOO: list[ZooEntry] = [
    ZooEntry("mlp_tanh", _builder(MLPTanh), (4, 10), has_batchnorm=False),
    ZooEntry("paper_cnn", _builder(models.paper_cnn), (4, 1, 28, 28), has_batchnorm=False),
    ZooEntry(
        "paper_deep_cnn",
        _builder(models.paper_deep_cnn, classes=10, image_size=32),
        (2, 3, 32, 32),
        has_batchnorm=True,
    ),
    ZooEntry(
        "conv_stride_pad_dilation",
        _builder(ConvStridePadDilation),
        (4, 3, 16, 16),
        has_batchnorm=False,
    ),
    ZooEntry("conv1d", _builder(Conv1dNet), (4, 4, 32), has_batchnorm=False),
    ZooEntry("grouped_conv", _builder(GroupedConv), (4, 4, 8, 8), has_batchnorm=False),
    ZooEntry(
        "depthwise_separable", _builder(DepthwiseSeparable), (4, 3, 8, 8), has_batchnorm=False
    ),
    ZooEntry("resnet_stack", _builder(ResNetStack), (4, 3, 8, 8), has_batchnorm=True),
    ZooEntry("inception_concat", _builder(InceptionConcat), (4, 3, 6, 6), has_batchnorm=False),
    ZooEntry("transformer_mlp", _builder(TransformerMLP), (4, 5, 16), has_batchnorm=False),
    ZooEntry("patch_transformer", _builder(PatchTransformer), (4, 3, 8, 8), has_batchnorm=False),
    ZooEntry("functional_mix", _builder(FunctionalMix), (4, 3, 8, 8), has_batchnorm=False),
    ZooEntry("hardcoded_view", _builder(HardcodedView), (4, 1, 8, 8), has_batchnorm=False),
    ZooEntry(
        "untraceable", _builder(Untraceable), (4, 10), has_batchnorm=False, traceable=False
    ),
    ZooEntry("mlp_bn_dropout", _builder(MLPBNDropout), (4, 10), has_batchnorm=True),
    ZooEntry("conv_bn_pool_avg", _builder(ConvBNPoolAvg), (4, 3, 8, 8), has_batchnorm=True),
    ZooEntry(
        "softplus_sigmoid_mlp", _builder(SoftplusSigmoidMLP), (4, 6), has_batchnorm=False
    ),
    ZooEntry(
        "functional_flatten", _builder(FunctionalFlatten), (4, 2, 6, 6), has_batchnorm=False
    ),
    ZooEntry("global_mean_pool", _builder(GlobalMeanPool), (4, 3, 6, 6), has_batchnorm=False),
    ZooEntry("squeeze_excite", _builder(SqueezeExcite), (4, 3, 6, 6), has_batchnorm=False),
    ZooEntry("dense_block", _builder(DenseBlock), (4, 3, 6, 6), has_batchnorm=True),
    ZooEntry("inverted_residual", _builder(InvertedResidual), (4, 3, 8, 8), has_batchnorm=True),
    ZooEntry(
        "residual_net_3",
        _builder(models.residual_net, blocks=3, width=8),
        (4, 3, 8, 8),
        has_batchnorm=True,
    ),
    ZooEntry("channels_last_blocks", _builder(ChannelsLastBlocks), (4, 3, 8, 12), has_batchnorm=False),
]

TRACEABLE: list[ZooEntry] = [e for e in ZOO if e.traceable]

SPECIAL: list[ZooEntry] = [
    # timm's functional batch norm: fx blocks F.batch_norm for now, so the model has no sites; the
    # no-harm tests run it (its trace in training mode used to update the running statistics)
    ZooEntry("functional_batchnorm", _builder(FunctionalBatchNorm), (4, 3, 6, 6), has_batchnorm=True),
    # layers called as functions on their own tensors, weight standardisation among them
    ZooEntry("weight_standardized", _builder(WeightStandardized), (4, 3, 8, 8), has_batchnorm=False),
    # strided consumers (a downsampling block) for the statistics' read-back errors per phase
    ZooEntry("resnet_downsample", _builder(ResNetDownsample), (4, 3, 10, 10), has_batchnorm=True),
]
"""Models for particular tests, outside the zoo that every rewrite test runs over."""

ZOO_BY_NAME: dict[str, ZooEntry] = {e.name: e for e in ZOO + SPECIAL}

__all__ = ["ZooEntry", "ZOO", "TRACEABLE", "SPECIAL", "ZOO_BY_NAME", "example_input"]
