"""Every network the examples train, in one place.

- :class:`SmallCNN` — the digits CNN of the demo and the benchmarks (151,306 parameters at the
  default width 32; 38,282 at width 16, the network of ``reproduce_paper.py``);
- :class:`DigitsMLP` — a two-hidden-layer perceptron on the digits (26,122 parameters);
- :class:`VGG16` — VGG-16 with or without BatchNorm for 32×32 CIFAR images (15.3M parameters
  with 100 classes);
- :class:`WideResNet` — WRN-depth-width for CIFAR (36.5M parameters for WRN-28-10 with 100
  classes; 83,700 for the smoke-test WRN-10-1).

The parameter counts stated in the docstrings are checked by ``tests/test_examples.py``. Nothing
here imports Lightning or torchvision. Import it as ``models`` with ``examples/`` on
``sys.path`` (``python examples/<name>.py`` puts it there).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DIGITS_MODELS", "SmallCNN", "DigitsMLP", "VGG16", "WideResNet", "digits_model"]

DIGITS_SHAPE = (1, 8, 8)


class SmallCNN(nn.Module):
    """Two 3×3 convolutions, a 2×2 max-pool and two linear layers, for 8×8 digit images.

    conv 1→w, ReLU, conv w→2w, ReLU (3×3, padding 1), max-pool 2, Linear(2w·4·4 → 4w), ReLU,
    Linear(4w → classes). ``SmallCNN()`` (w = 32: conv 1→32→64, Linear(1024→128)) has
    **151,306** parameters; ``SmallCNN(width=16)`` has **38,282** and ``SmallCNN(width=8)``
    **9,802** (10 classes, one channel).

    Args:
        num_classes: outputs.
        channels: input channels.
        width: channels of the first convolution (the rest scale with it).
    """

    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 4 * 4, 4 * width), nn.ReLU(),
            nn.Linear(4 * width, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class DigitsMLP(nn.Sequential):
    """A two-hidden-layer ReLU perceptron on the flattened 8×8 image: 64→128→128→10, **26,122**
    parameters (``hidden=128``, 10 classes)."""

    def __init__(self, num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__(
            nn.Flatten(), nn.Linear(math.prod(DIGITS_SHAPE), hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
        )


DIGITS_MODELS = ("cnn", "mlp")


def digits_model(name: str) -> nn.Module:
    """``"cnn"``: :class:`SmallCNN` (151k parameters); ``"mlp"``: :class:`DigitsMLP` (26k)."""
    if name == "cnn":
        return SmallCNN()
    if name == "mlp":
        return DigitsMLP()
    raise ValueError(f"model must be one of {DIGITS_MODELS}, got {name!r}.")


# -- CIFAR --------------------------------------------------------------------------------------

#: VGG-16 ("configuration D" of Simonyan & Zisserman): output channels, "M" a 2×2 max-pool.
_VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                 512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG-16 for 32×32 images: torchvision's 13 convolutions, with the CIFAR head.

    After five max-pools a 32×32 image is 512×1×1, so the 7×7 pooling and the 25088→4096→4096
    classifier meant for ImageNet are replaced by the usual CIFAR head 512→512→512→classes
    (dropout before each hidden layer). Initialised as torchvision does (He normal fan-out for
    convolutions, N(0, 0.01) for linear layers). **15,291,300** parameters without BatchNorm,
    **15,299,748** with it (100 classes).

    Args:
        batch_norm: BatchNorm after every convolution (torchvision's ``vgg16_bn``).
        num_classes: outputs.
        dropout: dropout probability of the head (0 turns it off).
    """

    def __init__(self, batch_norm: bool = False, num_classes: int = 100,
                 dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG16_LAYERS:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            assert isinstance(item, int)
            layers.append(nn.Conv2d(channels, item, 3, padding=1))
            layers += [nn.BatchNorm2d(item), nn.ReLU(inplace=True)] if batch_norm else [
                nn.ReLU(inplace=True)]
            channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class _WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3 with an identity (or a
    1×1 projection) shortcut; a projection sees the pre-activated input, as in the reference
    code."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = (None if stride == 1 and in_planes == planes
                         else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(out)))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-width of Zagoruyko & Komodakis, *Wide Residual Networks* (2016), for 32×32 images.

    A 3×3 stem, three groups of (depth − 4)/6 pre-activation blocks of widths 16·width,
    32·width and 64·width (strides 1, 2, 2), then BN-ReLU, global average pooling and a linear
    layer. With 100 classes WRN-28-10 has **36,536,884** parameters and WRN-10-1 **83,700**.

    Args:
        depth: 6n + 4 (10, 16, 22, 28, ...).
        width: the widening factor k.
        num_classes: outputs.
        dropout: dropout between the two convolutions of each block (0: none).
    """

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 100,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), "
                             f"got {depth}.")
        blocks = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1, bias=False)]
        for group, stride in enumerate((1, 2, 2)):
            for i in range(blocks):
                in_planes = widths[group] if i == 0 else widths[group + 1]
                layers.append(_WideBasicBlock(in_planes, widths[group + 1],
                                              stride if i == 0 else 1, dropout))
        layers += [nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True),
                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[3], num_classes)]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
