"""torchvision's ResNet-50, for the parity suite where torchvision is not installed (as in CI).

torchxrayvision imports torchvision when it is imported, but of it the ports need only
``torchvision.models.resnet50`` (torchxrayvision's ``ResNet`` wraps it; its DenseNet is its own).
torchvision is left out of the install on purpose: as a dependency it pulls a CUDA torch of
several GB, and PyPI's wheel beside the CPU torch fails to import ("operator torchvision::nms
does not exist"). This module restates torchvision 0.28's ResNet -- v1.5 bottlenecks (the stride
on the 3x3 convolution), the same module names, construction order and initialisation, so one
seed gives the same weights -- and nothing else: any other torchvision name raises
AttributeError, so a torchxrayvision code path that needs more fails loudly instead of using a
guess. Checked against torchvision 0.28.0 (docs/BENCHMARKS_XRV.md): identical state-dict keys
and shapes, bitwise-identical weights from ``torch.manual_seed(0)``, bitwise-identical outputs.
"""
import sys
import types

import torch
from torch import nn

VERSION = "stand-in for torchvision 0.28 (ResNet-50 only)"


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride,
                          bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(*, weights=None, num_classes=1000):
    if weights is not None:
        raise ValueError("the torchvision stand-in has no pretrained weights")
    return ResNet([3, 4, 6, 3], num_classes=num_classes)


class _OnlyWhatIsDefined(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{self.__name__}.{name} is not in the parity suite's torchvision stand-in "
                             "(tests/parity/torchvision_stand_in.py); install torchvision to use it")


def install():
    """Register the stand-in as ``torchvision`` (and the submodules torchxrayvision imports)."""
    package = _OnlyWhatIsDefined("torchvision", __doc__)
    package.__version__ = VERSION
    package.__path__ = []
    models = _OnlyWhatIsDefined("torchvision.models")
    resnet = _OnlyWhatIsDefined("torchvision.models.resnet")
    resnet.ResNet, resnet.Bottleneck, resnet.resnet50 = ResNet, Bottleneck, resnet50
    models.resnet, models.ResNet, models.resnet50 = resnet, ResNet, resnet50
    transforms = _OnlyWhatIsDefined("torchvision.transforms")
    package.models, package.transforms = models, transforms
    sys.modules.update({"torchvision": package, "torchvision.models": models,
                        "torchvision.models.resnet": resnet, "torchvision.transforms": transforms})
    return package
