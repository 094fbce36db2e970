"""Plain ``nn.Module`` architectures used by the membership-inference and crossbar papers.

Every class here is a plain :class:`torch.nn.Module` (no Lightning) whose constructor takes only
integers/floats, so that a LightningCLI YAML can build it with ``class_path`` / ``init_args``.

Nets and the papers that use them:

* :class:`NasrFC` -- fully connected in -> 1024 -> 512 -> 256 -> 128 -> C, Tanh (Nasr et al.,
  Purchase100 / Texas100 / Location30).
* :class:`ColumnFC` -- in -> 256 -> 128 -> C, ReLU, dropout (Yuan & Zhang's pruning study).
* :class:`LeNet5` -- MNIST-style LeNet-5 for 28x28 or 32x32 inputs.
* :class:`AlexNet` -- the CIFAR (32x32) AlexNet variant: 5 conv layers, 3 FC layers.
* :class:`ResNet18` -- CIFAR ResNet-18 (3x3 stem, no max-pool).
* :class:`CifarResNet` -- Roy et al.'s ResNet10/20 at width 1 or 4 (see :func:`resnet10w1` etc.).
* :class:`VGG16BN` -- VGG16 with BatchNorm for 32x32 inputs.
* :class:`MobileNetV2` -- CIFAR (32x32) MobileNetV2 with depthwise convolutions.

:data:`NETS` maps a short name to each class.

Activations are never in-place, so forward hooks on a layer (e.g. a crossbar audit recording
layer outputs) see that layer's output unchanged by the following nonlinearity.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn

__all__ = [
    "NETS",
    "VGG16BN",
    "AlexNet",
    "BasicBlock",
    "CifarResNet",
    "ColumnFC",
    "LeNet5",
    "MobileNetV2",
    "NasrFC",
    "ResNet18",
    "check_accepts_inputs",
    "resnet10w1",
    "resnet10w4",
    "resnet20w1",
    "resnet20w4",
]


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1")


def check_accepts_inputs(net: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Run ``net`` once on two zero inputs of ``input_shape`` and name the fix if it fails.

    Without it a net built for another data set fails inside the first training step with
    torch's shape message (``mat1 and mat2 shapes cannot be multiplied``), which names neither
    the config field nor the value it needs. The probe runs in eval mode without gradients, so
    no BatchNorm statistic, dropout draw or parameter changes.

    Args:
        net: The classifier.
        input_shape: One sample's shape, without the batch dimension.

    Raises:
        ValueError: If the forward pass fails; the message names the constructor argument to
            change (``in_features``, ``in_channels``, ``input_size``) and its value.
    """
    modes = [(m, m.training) for m in net.modules()]
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(2, *input_shape, device=device))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        params = inspect.signature(type(net)).parameters
        if "in_features" in params:
            fix = f"set the net's in_features to {math.prod(input_shape)}"
        elif "in_channels" in params and len(input_shape) == 3:
            fix = f"set the net's in_channels to {input_shape[0]}"
            if "input_size" in params:
                fix += f" and input_size to {input_shape[-1]}"
        else:
            fix = "choose a net built for these inputs"
        raise ValueError(
            f"{type(net).__name__} does not accept the data's inputs of shape "
            f"{tuple(input_shape)} ({first}); {fix} (model.init_args.net.init_args)"
        ) from None
    finally:
        for module, training in modes:
            module.training = training


# --------------------------------------------------------------------------- fully connected


class NasrFC(nn.Module):
    """Fully connected net of Nasr et al.: in -> 1024 -> 512 -> 256 -> 128 -> C with Tanh.

    Used for the binary tabular data sets (Purchase100, Texas100, Location30). Outputs logits.

    Args:
        in_features: Number of input features (e.g. 600 for Purchase100).
        num_classes: Number of classes C.

    Raises:
        ValueError: If ``in_features`` or ``num_classes`` is not a positive integer.
    """

    hidden: tuple[int, ...] = (1024, 512, 256, 128)

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("num_classes", num_classes)
        layers: list[nn.Module] = []
        width = in_features
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, C]`` for input ``[B, in_features]`` (extra dims flattened)."""
        return self.net(x.flatten(1))


class ColumnFC(nn.Module):
    """Yuan & Zhang's ColumnFC: in -> 256 -> 128 -> C with ReLU and dropout after each hidden layer.

    Args:
        in_features: Number of input features (e.g. 64 for sklearn's 8x8 digits).
        num_classes: Number of classes C.
        dropout: Dropout probability after each hidden activation, in [0, 1).

    Raises:
        ValueError: If a size is not a positive integer or ``dropout`` is outside [0, 1).
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("num_classes", num_classes)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} is invalid: expected 0 <= dropout < 1")
        self.net = nn.Sequential(
            nn.Linear(in_features, 256),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, C]`` for input ``[B, in_features]`` (extra dims flattened)."""
        return self.net(x.flatten(1))


# --------------------------------------------------------------------------- LeNet-5


class LeNet5(nn.Module):
    """LeNet-5: conv 6@5x5 -> max-pool -> conv 16@5x5 -> max-pool -> 120 -> 84 -> C, ReLU.

    For 28x28 inputs (MNIST) the first convolution is zero-padded by 2 so that the feature map
    after the second pooling is 16x5x5, exactly as for the classic 32x32 input. Other square sizes
    work too (no padding); the flattened size is computed from ``input_size``.

    Args:
        in_channels: Number of input channels (1 for MNIST, 3 for CIFAR).
        num_classes: Number of classes C.
        input_size: Side of the square input image in pixels (28 or 32 typically; >= 12).

    Raises:
        ValueError: If a size is invalid or ``input_size`` is too small for two 5x5 conv + pools.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("input_size", input_size)
        padding = 2 if input_size == 28 else 0
        side = ((input_size + 2 * padding - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(
                f"input_size={input_size} is too small for LeNet5: expected >= 12 pixels"
            )
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, C]`` for images ``[B, in_channels, input_size, input_size]``."""
        return self.classifier(self.features(x).flatten(1))


# --------------------------------------------------------------------------- AlexNet


class AlexNet(nn.Module):
    """AlexNet adapted to 32x32 inputs (CIFAR): 5 convolutions and 3 fully connected layers.

    Features: conv 64@3x3 stride 2 -> pool -> conv 192@3x3 -> pool -> conv 384@3x3 ->
    conv 256@3x3 -> conv 256@3x3 -> pool, giving 256x2x2 for a 32x32 input; classifier
    1024 -> 4096 -> 4096 -> C with dropout 0.5 before the first two linear layers.

    Args:
        num_classes: Number of classes C.
        in_channels: Number of input channels.

    Raises:
        ValueError: If a size is not a positive integer.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        # Adaptive pooling keeps the classifier at 256*2*2 even for slightly different inputs.
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(256 * 2 * 2, 4096),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, C]`` for images ``[B, in_channels, 32, 32]``."""
        return self.classifier(self.pool(self.features(x)).flatten(1))


# --------------------------------------------------------------------------- ResNets


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN layers and a (projection when needed) shortcut.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution (2 halves the spatial size).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Return ``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class _CifarResNetBase(nn.Module):
    """3x3 stem (no max-pool), groups of :class:`BasicBlock`, global average pool, linear."""

    def __init__(
        self,
        stem_width: int,
        widths: tuple[int, ...],
        repeats: tuple[int, ...],
        num_classes: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        self.widths = tuple(widths)
        self.repeats = tuple(repeats)
        self.conv1 = nn.Conv2d(in_channels, stem_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        groups: list[nn.Module] = []
        in_planes = stem_width
        for i, (w, r) in enumerate(zip(widths, repeats, strict=True)):
            blocks: list[nn.Module] = []
            for j in range(r):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, w, stride))
                in_planes = w
            groups.append(nn.Sequential(*blocks))
        self.layers = nn.ModuleList(groups)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, C]`` for images ``[B, in_channels, H, W]`` (32x32 for CIFAR)."""
        out = self.relu(self.bn1(self.conv1(x)))
        for group in self.layers:
            out = group(out)
        return self.fc(self.pool(out).flatten(1))


class ResNet18(_CifarResNetBase):
    """CIFAR ResNet-18: 3x3 stem of 64 channels, no max-pool, BasicBlocks [2, 2, 2, 2].

    Group widths 64, 128, 256, 512 (strides 1, 2, 2, 2), global average pool, linear.

    Args:
        num_classes: Number of classes C (100 for CIFAR-100).
        in_channels: Number of input channels.

    Raises:
        ValueError: If a size is not a positive integer.
    """

    def __init__(self, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__(64, (64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels)


#: Group repeats (BasicBlocks per group) of Roy et al.'s CIFAR ResNets, keyed by depth.
CIFAR_RESNET_REPEATS: dict[int, tuple[int, int, int]] = {10: (1, 1, 2), 20: (3, 3, 3)}
_CIFAR_RESNET_BASE_WIDTHS: tuple[int, int, int] = (16, 32, 64)


class CifarResNet(_CifarResNetBase):
    """Roy et al.'s CIFAR ResNets: ResNet10/20 at width multiplier 1 or 4.

    Structure: conv0 3x3 (``16 * width`` channels), three groups of BasicBlocks with widths
    ``(16, 32, 64) * width`` (strides 1, 2, 2), global average pool, linear.

    * depth 10: repeats (1, 1, 2) -> 1 + 2*(1+1+2) + 1 = 10 weight layers.
    * depth 20: repeats (3, 3, 3) -> 1 + 2*9 + 1 = 20 weight layers.

    The stem is scaled with the width (16 for w1, 64 for w4) so that the first group keeps an
    identity shortcut, as in the usual wide-ResNet construction; Roy et al.'s table lists
    ``conv0 3x3, 16`` for the width-1 nets.

    Args:
        depth: 10 or 20.
        width: Width multiplier, 1 or 4.
        num_classes: Number of classes C.
        in_channels: Number of input channels.

    Raises:
        ValueError: If ``depth`` is not 10 or 20, or ``width`` is not 1 or 4.
    """

    def __init__(
        self, depth: int = 20, width: int = 1, num_classes: int = 10, in_channels: int = 3
    ) -> None:
        if depth not in CIFAR_RESNET_REPEATS:
            raise ValueError(
                f"depth={depth!r} is not supported by CifarResNet: expected one of "
                f"{sorted(CIFAR_RESNET_REPEATS)}; use ResNet18 for deeper nets"
            )
        if width not in (1, 4):
            raise ValueError(f"width={width!r} is not supported by CifarResNet: expected 1 or 4")
        widths = tuple(w * width for w in _CIFAR_RESNET_BASE_WIDTHS)
        super().__init__(16 * width, widths, CIFAR_RESNET_REPEATS[depth], num_classes, in_channels)
        self.depth = depth
        self.width = width


def resnet10w1(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """Return Roy et al.'s ResNet10w1: groups (16 x1, 32 x1, 64 x2).

    Args:
        num_classes: Number of classes C.
        in_channels: Number of input channels.

    Returns:
        A freshly initialised :class:`CifarResNet`.
    """
    return CifarResNet(10, 1, num_classes, in_channels)


def resnet10w4(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """Return Roy et al.'s ResNet10w4: groups (64 x1, 128 x1, 256 x2).

    Args:
        num_classes: Number of classes C.
        in_channels: Number of input channels.

    Returns:
        A freshly initialised :class:`CifarResNet`.
    """
    return CifarResNet(10, 4, num_classes, in_channels)


def resnet20w1(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """Return Roy et al.'s ResNet20w1: groups (16, 32, 64), each x3.

    Args:
        num_classes: Number of classes C.
        in_channels: Number of input channels.

    Returns:
        A freshly initialised :class:`CifarResNet`.
    """
    return CifarResNet(20, 1, num_classes, in_channels)


def resnet20w4(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """Return Roy et al.'s ResNet20w4: groups (64, 128, 256), each x3.

    Args:
        num_classes: Number of classes C.
        in_channels: Number of input channels.

    Returns:
        A freshly initialised :class:`CifarResNet`.
    """
    return CifarResNet(20, 4, num_classes, in_channels)


# --------------------------------------------------------------------------- VGG


_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG16BN(nn.Module):
    """VGG16 with BatchNorm for 32x32 inputs: 13 conv-BN-ReLU layers, 5 max-pools, 3 linear.

    After five poolings a 32x32 input becomes 512x1x1; the classifier is
    512 -> 512 -> 512 -> C with ReLU and dropout 0.5.

    Args:
        num_classes: Number of classes C.
        in_channels: Number of input channels.

    Raises:
        ValueError: If a size is not a positive integer.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        layers: list[nn.Module] = []
        c = in_channels
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        # Makes the classifier input 512 even if the input is not exactly 32x32.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, C]`` for images ``[B, in_channels, 32, 32]``."""
        return self.classifier(self.pool(self.features(x)).flatten(1))


# --------------------------------------------------------------------------- MobileNetV2


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to the nearest multiple of ``divisor``, never dropping below 90%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear projection (+ residual)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = in_planes * expansion
        self.use_residual = stride == 1 and in_planes == out_planes
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [
                nn.Conv2d(in_planes, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs with depthwise (grouped) convolutions.

    ImageNet MobileNetV2 downsamples by 32; for 32x32 inputs the stem stride and the stride of the
    second stage are set to 1, so the total downsampling is 8 and the last feature map is 4x4.
    Stages ``(expansion t, channels c, repeats n, stride s)``: (1,16,1,1), (6,24,2,1), (6,32,3,2),
    (6,64,4,2), (6,96,3,1), (6,160,3,2), (6,320,1,1); stem 32 channels; head 1x1 conv to 1280;
    global average pool; dropout 0.2; linear.

    Args:
        num_classes: Number of classes C.
        in_channels: Number of input channels.
        width_mult: Channel multiplier (> 0); channel counts are rounded to multiples of 8.

    Raises:
        ValueError: If a size is not a positive integer or ``width_mult`` is not positive.
    """

    stages: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0
    ) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        if not width_mult > 0:
            raise ValueError(f"width_mult={width_mult!r} is invalid: expected a float > 0")
        stem = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU6(),
        ]
        c_in = stem
        for t, c, n, s in self.stages:
            c_out = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(_InvertedResidual(c_in, c_out, t, s if i == 0 else 1))
                c_in = c_out
        layers += [
            nn.Conv2d(c_in, last, 1, bias=False),
            nn.BatchNorm2d(last),
            nn.ReLU6(),
        ]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, C]`` for images ``[B, in_channels, 32, 32]``."""
        return self.classifier(self.pool(self.features(x)).flatten(1))


#: Registry of the architectures by short name (plain dict, Opacus-style).
NETS: dict[str, type[nn.Module]] = {
    "nasr_fc": NasrFC,
    "column_fc": ColumnFC,
    "lenet5": LeNet5,
    "alexnet": AlexNet,
    "resnet18": ResNet18,
    "cifar_resnet": CifarResNet,
    "vgg16_bn": VGG16BN,
    "mobilenet_v2": MobileNetV2,
}
