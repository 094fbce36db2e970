"""Tests for nvmpriv.nets: shapes, hand-counted parameter numbers, Roy et al.'s ResNet layout."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from nvmpriv.nets import (
    NETS,
    VGG16BN,
    AlexNet,
    CifarResNet,
    ColumnFC,
    LeNet5,
    MobileNetV2,
    NasrFC,
    ResNet18,
    check_accepts_inputs,
    resnet10w1,
    resnet10w4,
    resnet20w1,
    resnet20w4,
)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def lin(i: int, o: int) -> int:
    return i * o + o


def conv(ci: int, co: int, k: int) -> int:
    return ci * co * k * k + co


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("factory", "shape", "classes"),
    [
        pytest.param(lambda: NasrFC(600, 100), (2, 600), 100, id="nasr_fc"),
        pytest.param(lambda: ColumnFC(64, 10), (2, 64), 10, id="column_fc"),
        pytest.param(lambda: LeNet5(1, 10, 28), (2, 1, 28, 28), 10, id="lenet5_28"),
        pytest.param(lambda: LeNet5(3, 10, 32), (2, 3, 32, 32), 10, id="lenet5_32"),
        pytest.param(lambda: AlexNet(10), (2, 3, 32, 32), 10, id="alexnet"),
        pytest.param(lambda: ResNet18(100), (2, 3, 32, 32), 100, id="resnet18"),
        pytest.param(lambda: resnet10w1(10), (2, 3, 32, 32), 10, id="resnet10w1"),
        pytest.param(lambda: resnet20w4(10), (2, 3, 32, 32), 10, id="resnet20w4"),
        pytest.param(lambda: VGG16BN(10), (2, 3, 32, 32), 10, id="vgg16bn"),
        pytest.param(lambda: MobileNetV2(10), (2, 3, 32, 32), 10, id="mobilenetv2"),
        pytest.param(lambda: MobileNetV2(10, 1, 0.5), (2, 1, 32, 32), 10, id="mobilenetv2_w05"),
    ],
)
def test_forward_shape(factory, shape, classes) -> None:
    model = factory().eval()
    with torch.no_grad():
        out = model(torch.randn(*shape))
    assert out.shape == (shape[0], classes)
    assert torch.isfinite(out).all()


def test_nasr_fc_param_count() -> None:
    expected = lin(600, 1024) + lin(1024, 512) + lin(512, 256) + lin(256, 128) + lin(128, 100)
    assert n_params(NasrFC(600, 100)) == expected
    assert sum(isinstance(m, nn.Tanh) for m in NasrFC(3, 2).modules()) == 4


def test_column_fc_param_count_and_dropout() -> None:
    assert n_params(ColumnFC(64, 10)) == lin(64, 256) + lin(256, 128) + lin(128, 10)
    drops = [m for m in ColumnFC(64, 10, dropout=0.3).modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(d.p == 0.3 for d in drops)
    with pytest.raises(ValueError, match="dropout"):
        ColumnFC(64, 10, dropout=1.0)


@pytest.mark.parametrize(("cin", "size"), [(1, 28), (3, 32)])
def test_lenet5_param_count(cin: int, size: int) -> None:
    # Both 28 (padded) and 32 (unpadded) give a 16x5x5 map before the classifier.
    expected = conv(cin, 6, 5) + conv(6, 16, 5) + lin(16 * 5 * 5, 120) + lin(120, 84) + lin(84, 10)
    assert n_params(LeNet5(cin, 10, size)) == expected


def test_lenet5_too_small() -> None:
    with pytest.raises(ValueError, match="input_size"):
        LeNet5(1, 10, 8)


def _block_widths(model: CifarResNet) -> list[list[int]]:
    return [[blk.conv2.out_channels for blk in group] for group in model.layers]


@pytest.mark.parametrize(
    ("fn", "depth", "width", "expected"),
    [
        pytest.param(resnet10w1, 10, 1, [[16], [32], [64, 64]], id="r10w1"),
        pytest.param(resnet10w4, 10, 4, [[64], [128], [256, 256]], id="r10w4"),
        pytest.param(resnet20w1, 20, 1, [[16] * 3, [32] * 3, [64] * 3], id="r20w1"),
        pytest.param(resnet20w4, 20, 4, [[64] * 3, [128] * 3, [256] * 3], id="r20w4"),
    ],
)
def test_cifar_resnet_layout(fn, depth: int, width: int, expected: list[list[int]]) -> None:
    model = fn(num_classes=7)
    assert isinstance(model, CifarResNet)
    assert (model.depth, model.width) == (depth, width)
    assert _block_widths(model) == expected
    assert model.conv1.out_channels == 16 * width
    assert model.conv1.kernel_size == (3, 3)
    assert model.fc.in_features == expected[-1][-1] and model.fc.out_features == 7
    # Depth counts the main-path weight layers: stem + 2 per block + final linear.
    n_blocks = sum(len(g) for g in expected)
    assert 1 + 2 * n_blocks + 1 == depth
    # Downsampling: stride 2 at the first block of groups 2 and 3 only.
    strides = [[blk.conv1.stride[0] for blk in g] for g in model.layers]
    assert [s[0] for s in strides] == [1, 2, 2]
    assert all(s == 1 for g in strides for s in g[1:])


def test_cifar_resnet_param_count_r10w1() -> None:
    # Hand count for ResNet10w1 (conv without bias, BN has 2 params per channel).
    def bn(c: int) -> int:
        return 2 * c

    def c3(ci: int, co: int) -> int:
        return ci * co * 9

    stem = c3(3, 16) + bn(16)
    g1 = c3(16, 16) + bn(16) + c3(16, 16) + bn(16)
    g2 = c3(16, 32) + bn(32) + c3(32, 32) + bn(32) + 16 * 32 + bn(32)
    g3 = (c3(32, 64) + bn(64) + c3(64, 64) + bn(64) + 32 * 64 + bn(64)) + (
        c3(64, 64) + bn(64) + c3(64, 64) + bn(64)
    )
    fc = lin(64, 10)
    assert n_params(resnet10w1(10)) == stem + g1 + g2 + g3 + fc


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"depth": 18}, "depth"), ({"depth": 20, "width": 2}, "width"), ({"width": 0}, "width")],
)
def test_cifar_resnet_bad_config(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CifarResNet(**kwargs)


def test_resnet18_layout() -> None:
    model = ResNet18(100)
    assert [len(g) for g in model.layers] == [2, 2, 2, 2]
    assert [g[0].conv2.out_channels for g in model.layers] == [64, 128, 256, 512]
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_vgg16bn_layout() -> None:
    model = VGG16BN(10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 13 and len(linears) == 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert linears[0].in_features == 512


def test_alexnet_layout() -> None:
    model = AlexNet(10)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 3


def test_mobilenetv2_depthwise() -> None:
    model = MobileNetV2(10)
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw) == 17
    assert all(m.groups == m.in_channels == m.out_channels for m in dw)
    with pytest.raises(ValueError, match="width_mult"):
        MobileNetV2(10, 3, 0.0)


def test_registry_and_bad_sizes() -> None:
    assert set(NETS.values()) >= {NasrFC, ColumnFC, LeNet5, AlexNet, ResNet18, VGG16BN}
    assert NETS["cifar_resnet"] is CifarResNet and NETS["mobilenet_v2"] is MobileNetV2
    assert all(isinstance(k, str) for k in NETS)
    with pytest.raises(ValueError, match="num_classes"):
        NasrFC(10, 0)
    with pytest.raises(ValueError, match="in_features"):
        ColumnFC(-1, 3)


def test_modules_are_pure_torch() -> None:
    # nets/adversarial/quantization/pruning are the maths layer: no Lightning, no ONNX.
    code = (
        "import sys\n"
        "import nvmpriv.nets, nvmpriv.adversarial, nvmpriv.quantization, nvmpriv.pruning\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'onnx', 'onnxruntime'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_input_check_names_the_argument_and_changes_nothing() -> None:
    with pytest.raises(ValueError, match=r"ColumnFC .* shape \(64,\) .*in_features to 64"):
        check_accepts_inputs(ColumnFC(32, 10), (64,))
    with pytest.raises(ValueError, match="in_channels to 3 and input_size to 32"):
        check_accepts_inputs(LeNet5(1, 10, 28), (3, 32, 32))
    net = ResNet18(10, in_channels=1).train()
    net.layers[0].eval()  # a frozen block stays frozen
    before = {k: v.clone() for k, v in net.state_dict().items()}
    check_accepts_inputs(net, (1, 28, 28))
    assert net.training and not net.layers[0].training and net.layers[1].training
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm statistics untouched
