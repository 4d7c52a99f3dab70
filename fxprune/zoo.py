"""A small model zoo for tests, benchmarks and the demo: plain eager nn.Modules, each capturable by torch.export.

Usage:
    from fxprune import zoo
    model = zoo.build("resnet20")                     # or zoo.ZOO["resnet20"].build(num_classes=100)
    out = model.eval()(zoo.example_input("resnet20"))  # (2, 10)

No forward hard-codes a channel count or flatten width. Init: kaiming-normal convs (fan_out), BatchNorm weight 1 /
bias 0, torch's default Linear init; randomness comes from torch's global seed only.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn


def _init_weights(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU):
    """conv(k x k, 'same' padding, no bias) + BatchNorm (+ activation)."""
    acts = [act(inplace=True)] if act is not None else []
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), *acts)


class MLP(nn.Module):
    """Flatten, then Linear+ReLU per hidden layer, then a final Linear."""
    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (1024,), num_classes: int = 10):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self)

    def forward(self, x):
        return self.fc(self.features(x.flatten(1)))


class LeNet5(nn.Module):
    """conv(6,5x5,pad 2)-relu-pool-conv(16,5x5)-relu-pool-flatten-fc120-relu-fc84-relu-fc. 28x28 and 32x32 work."""
    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool, self.relu = nn.MaxPool2d(2), nn.ReLU()
        side = (image_size // 2 - 4) // 2  # spatial size after conv1(pad 2)-pool-conv2-pool
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.pool(self.relu(self.conv2(self.pool(self.relu(self.conv1(x))))))
        x = self.relu(self.fc2(self.relu(self.fc1(torch.flatten(x, 1)))))
        return self.fc3(x)


VGG_CFGS: dict[str, list] = {
    "vgg-small": [32, "M", 64, "M", 128, 128, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR VGG: conv3x3(+BN)+ReLU and 2x2 max-pools, the last feature map flattened into one Linear (no global
    pool). Pools use ceil_mode=True so odd sizes never reach 0: 28x28 through five pools ends at 1x1."""
    def __init__(self, cfg: str | Sequence = "vgg16", in_channels: int = 3, image_size: int = 32,
                 num_classes: int = 10, batch_norm: bool = True):
        super().__init__()
        cfg = VGG_CFGS[cfg] if isinstance(cfg, str) else cfg
        layers, width, side = [], in_channels, image_size  # side: spatial size after the pools so far
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                side = -(-side // 2)
            else:
                layers += ([_conv_bn(width, int(v), 3)] if batch_norm else
                           [nn.Conv2d(width, int(v), 3, padding=1), nn.ReLU(inplace=True)])
                width = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * side * side, num_classes)
        _init_weights(self)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv+BN projection when the shape changes), ReLU after the add."""
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # option B: 1x1 conv + BN projection
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """The classic CIFAR ResNet (depth 6n+2; stages of width, 2*width, 4*width), option-B shortcuts."""
    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10, width: int = 16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNetCIFAR depth must be 6n+2 (20, 32, 44, 56, 110 ...), got {depth}")
        self.stem = _conv_bn(in_channels, width, 3)
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range((depth - 2) // 6):
                blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def resnet20(**kw) -> ResNetCIFAR:
    return ResNetCIFAR(depth=20, **kw)


def resnet56(**kw) -> ResNetCIFAR:
    return ResNetCIFAR(depth=56, **kw)


def _divisible(v: float, d: int = 8) -> int:
    return max(d, int(v + d / 2) // d * d)


class InvertedResidual(nn.Module):
    """[1x1 expand+BN+ReLU6] -> 3x3 depthwise+BN+ReLU6 -> 1x1 project+BN, + identity when stride 1 and cin == cout."""
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        expand_conv = [_conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        self.conv = nn.Sequential(*expand_conv,
                                  _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),  # depthwise
                                  _conv_bn(hidden, cout, 1, act=None))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2Small(nn.Module):
    """A CIFAR-size MobileNetV2: stem, inverted residuals (t, c, n, s) below, 1x1 head conv, global pool, Linear."""
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 2, 2))

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width_mult: float = 1.0):
        super().__init__()
        cin = _divisible(32 * width_mult)
        layers: list[nn.Module] = [_conv_bn(in_channels, cin, 3, act=nn.ReLU6)]
        for t, c, n, s in self.SETTINGS:
            cout = _divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = _divisible(256 * max(1.0, width_mult))
        layers.append(_conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1(4*growth)-BN-ReLU-conv3x3(growth), output concatenated onto the input."""
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                  nn.BatchNorm2d(4 * growth), nn.ReLU(),
                                  nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNetSmall(nn.Module):
    """DenseNet-BC: stem conv, dense blocks joined by transitions (BN-ReLU-conv1x1-avgpool), BN-ReLU-pool-Linear."""
    def __init__(self, in_channels: int = 3, num_classes: int = 10, growth: int = 12,
                 block_layers: Sequence[int] = (4, 4), init_channels: int = 24):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, init_channels, 3, padding=1, bias=False)]
        width = init_channels
        for b, n in enumerate(block_layers):
            for _ in range(n):
                layers.append(DenseLayer(width, growth))
                width += growth
            if b < len(block_layers) - 1:
                layers.append(nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(),  # transition, compression 0.5
                                            nn.Conv2d(width, width // 2, 1, bias=False), nn.AvgPool2d(2)))
                width //= 2
        layers += [nn.BatchNorm2d(width), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class InceptionModule(nn.Module):
    """Four branches concatenated on channels: 1x1 | 1x1->3x3 | 1x1->5x5 (or 1x1->3x3->3x3) | maxpool3x3 s1->1x1."""
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int, double3x3: bool = False):
        super().__init__()
        self.b1 = _conv_bn(cin, c1, 1)
        self.b2 = nn.Sequential(_conv_bn(cin, c3r, 1), _conv_bn(c3r, c3, 3))
        tail = [_conv_bn(c5r, c5, 3), _conv_bn(c5, c5, 3)] if double3x3 else [_conv_bn(c5r, c5, 5)]
        self.b3 = nn.Sequential(_conv_bn(cin, c5r, 1), *tail)
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn(cin, cp, 1))
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class InceptionSmall(nn.Module):
    """stem conv -> Inception(5x5 branch) -> maxpool -> Inception(double 3x3 branch) -> global pool -> Linear."""
    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn(in_channels, 32, 3)
        self.inc1 = InceptionModule(32, 16, 16, 24, 8, 8, 8)
        self.pool = nn.MaxPool2d(2)
        self.inc2 = InceptionModule(self.inc1.out_channels, 32, 24, 32, 8, 16, 16, double3x3=True)
        self.fc = nn.Linear(self.inc2.out_channels, num_classes)
        _init_weights(self)

    def forward(self, x):
        return self.fc(self.inc2(self.pool(self.inc1(self.stem(x)))).mean((2, 3)))


class CatTwice(nn.Module):
    """y = conv(x); z = cat([y, y]); conv(z); pool; Linear — one tensor concatenated with itself."""
    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = _conv_bn(in_channels, width, 3)
        self.conv2 = _conv_bn(2 * width, 2 * width, 3)
        self.fc = nn.Linear(2 * width, num_classes)
        _init_weights(self)

    def forward(self, x):
        y = self.conv1(x)
        z = torch.cat([y, y], 1)
        return self.fc(self.conv2(z).mean((2, 3)))


class SEBlock(nn.Module):
    """Residual block conv-BN-ReLU-conv-BN, squeeze-excite gate x * sigmoid(fc(relu(fc(mean)))), add, ReLU."""
    def __init__(self, cin: int, cout: int, stride: int = 1, reduction: int = 4):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, 3, stride), _conv_bn(cout, cout, 3, act=None))
        self.fc1 = nn.Linear(cout, max(1, cout // reduction))
        self.fc2 = nn.Linear(max(1, cout // reduction), cout)
        self.relu = nn.ReLU(inplace=True)
        project = stride != 1 or cin != cout
        self.shortcut = _conv_bn(cin, cout, 1, stride, act=None) if project else nn.Sequential()

    def forward(self, x):
        out = self.body(x)
        s = torch.sigmoid(self.fc2(self.relu(self.fc1(out.mean((2, 3))))))
        return self.relu(out * s.view(s.size(0), -1, 1, 1) + self.shortcut(x))


class SENet(nn.Module):
    """A small squeeze-excite ResNet: stem, three SE residual blocks (32, 64/2, 64), global pool, Linear."""
    def __init__(self, in_channels: int = 3, num_classes: int = 10, reduction: int = 4):
        super().__init__()
        self.stem = _conv_bn(in_channels, 32, 3)
        self.blocks = nn.Sequential(SEBlock(32, 32, 1, reduction), SEBlock(32, 64, 2, reduction),
                                    SEBlock(64, 64, 1, reduction))
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


@dataclass(frozen=True)
class ZooEntry:
    """How to build a zoo model and the shape of one input sample (no batch dim)."""
    build: Callable[..., nn.Module]
    input_shape: tuple


_CIFAR, _MNIST = (3, 32, 32), (1, 28, 28)
ZOO: dict[str, ZooEntry] = {
    "mlp": ZooEntry(MLP, _MNIST),
    "mlp2": ZooEntry(functools.partial(MLP, hidden=(1024, 1024)), _MNIST),
    "lenet5": ZooEntry(LeNet5, _MNIST),
    "vgg-small": ZooEntry(functools.partial(VGG, cfg="vgg-small"), _CIFAR),
    "vgg11": ZooEntry(functools.partial(VGG, cfg="vgg11"), _CIFAR),
    "vgg16": ZooEntry(functools.partial(VGG, cfg="vgg16"), _CIFAR),
    "resnet20": ZooEntry(resnet20, _CIFAR),
    "resnet56": ZooEntry(resnet56, _CIFAR),
    "mobilenetv2": ZooEntry(MobileNetV2Small, _CIFAR),
    "densenet": ZooEntry(DenseNetSmall, _CIFAR),
    "inception": ZooEntry(InceptionSmall, _CIFAR),
    "se": ZooEntry(SENet, _CIFAR),
    "cattwice": ZooEntry(CatTwice, _CIFAR),
}


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    return ZOO[name]


def build(name: str, **kwargs) -> nn.Module:
    """Build the zoo model `name`; kwargs go to its constructor (e.g. num_classes=100, in_channels=1)."""
    return _entry(name).build(**kwargs)


def example_input(name: str, batch: int = 2, **kwargs) -> torch.Tensor:
    """A random-normal input batch for `name`, honouring in_channels / image_size / in_features in kwargs."""
    shape = [int(kwargs["in_features"])] if "in_features" in kwargs else list(_entry(name).input_shape)
    if "in_channels" in kwargs:
        shape[0] = int(kwargs["in_channels"])
    if "image_size" in kwargs:
        shape[1:] = [int(kwargs["image_size"])] * 2
    return torch.randn(batch, *shape)
