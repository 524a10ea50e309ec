"""The parts of torchvision that torchxrayvision 1.5.7 uses, for the parity suite without torchvision (as in CI).

torchxrayvision imports torchvision when it is imported. torchvision is left out of the install on
purpose: as a dependency it pulls a CUDA torch of several GB, and PyPI's wheel beside the CPU torch
fails to import ("operator torchvision::nms does not exist"). This module restates, from
torchvision 0.29's own source, exactly what torchxrayvision's models call:

- ``models.resnet50`` / ``models.resnet.resnet50`` (xrv ``ResNet``, baseline_models/xinario),
  ``models.resnet34`` (baseline_models/mira, emory_hiti) and ``models.resnet.BasicBlock``
  (baseline_models/chestx_anatomy checks block types): torchvision's ResNet with v1.5
  bottlenecks (the stride on the 3x3 convolution); ``num_classes`` is the one option;
- ``models.densenet121`` (baseline_models/chexpert): torchvision's DenseNet-BC, ``features``
  (conv0/norm0/relu0/pool0, denseblockN of denselayerN, transitionN, norm5) and ``classifier``;
  ``memory_efficient`` (gradient checkpointing) is left out, it changes no weight or output;
- ``transforms.Normalize`` and ``transforms.Compose`` (baseline_models/chestx_det, xinario,
  emory_hiti, riken), on tensors only, as torchvision's functional ``normalize`` does it.

The modules are built with the same names, in the same order and with the same initialisation, so
one torch seed gives bitwise the same weights. Any other torchvision name raises AttributeError, so
a torchxrayvision code path that needs more fails loudly instead of using a guess.
``tests/parity/test_torchvision_stand_in.py`` checks all of it against a real torchvision when one
is installed (``make parity-torchvision``; result in docs/BENCHMARKS_XRV.md).
"""
import sys
import types
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

VERSION = "stand-in for torchvision 0.29 (ResNet-34/50, DenseNet-121, Normalize, Compose)"


def _no_weights(weights):
    if weights is not None:
        raise ValueError("the torchvision stand-in has no pretrained weights")


# ------------------------------------------------------------------------------------------- ResNet
def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet34(*, weights=None, num_classes=1000):
    _no_weights(weights)
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes)


def resnet50(*, weights=None, num_classes=1000):
    _no_weights(weights)
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)


# ----------------------------------------------------------------------------------------- DenseNet
class _DenseLayer(nn.Module):
    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1,
                               bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, input):  # a tensor, or the list of every earlier layer's features
        prev_features = [input] if isinstance(input, torch.Tensor) else input
        bottleneck = self.conv1(self.relu1(self.norm1(torch.cat(prev_features, 1))))
        new_features = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    _version = 2

    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, drop_rate):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate,
                                bn_size=bn_size, drop_rate=drop_rate)
            self.add_module("denselayer%d" % (i + 1), layer)

    def forward(self, init_features):
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4,
                 drop_rate=0, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers=num_layers, num_input_features=num_features, bn_size=bn_size,
                                growth_rate=growth_rate, drop_rate=drop_rate)
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_input_features=num_features, num_output_features=num_features // 2)
                self.features.add_module("transition%d" % (i + 1), trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def densenet121(*, weights=None, num_classes=1000):
    _no_weights(weights)
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes)


# --------------------------------------------------------------------------------------- transforms
def normalize(tensor, mean, std, inplace=False):
    """torchvision.transforms.functional.normalize on a tensor image (..., C, H, W)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"img should be Tensor Image. Got {type(tensor)}")
    if tensor.ndim < 2:
        raise TypeError("Tensor is not a torch image.")
    if not tensor.is_floating_point():
        raise TypeError(f"Input tensor should be a float tensor. Got {tensor.dtype}.")
    if tensor.ndim < 3:
        raise ValueError("Expected tensor to be a tensor image of size (..., C, H, W). Got "
                         f"tensor.size() = {tensor.size()}")
    if not inplace:
        tensor = tensor.clone()
    dtype = tensor.dtype
    mean = torch.as_tensor(mean, dtype=dtype, device=tensor.device)
    std = torch.as_tensor(std, dtype=dtype, device=tensor.device)
    if (std == 0).any():
        raise ValueError(f"std evaluated to zero after conversion to {dtype}, leading to division by zero.")
    if mean.ndim == 1:
        mean = mean.view(-1, 1, 1)
    if std.ndim == 1:
        std = std.view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


class Normalize(nn.Module):
    def __init__(self, mean, std, inplace=False):
        super().__init__()
        self.mean = mean
        self.std = std
        self.inplace = inplace

    def forward(self, tensor):
        return normalize(tensor, self.mean, self.std, self.inplace)

    def __repr__(self):
        return f"{self.__class__.__name__}(mean={self.mean}, std={self.std})"


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


# ------------------------------------------------------------------------------------- registration
class _OnlyWhatIsDefined(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{self.__name__}.{name} is not in the parity suite's torchvision stand-in "
                             "(tests/parity/torchvision_stand_in.py); install torchvision to use it")


def module_of(name, **attributes):
    module = _OnlyWhatIsDefined(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def modules():
    """The stand-in's modules by their torchvision names (not registered anywhere)."""
    resnet = module_of("torchvision.models.resnet", ResNet=ResNet, BasicBlock=BasicBlock, Bottleneck=Bottleneck,
                     resnet34=resnet34, resnet50=resnet50)
    densenet = module_of("torchvision.models.densenet", DenseNet=DenseNet, densenet121=densenet121)
    models = module_of("torchvision.models", resnet=resnet, densenet=densenet, ResNet=ResNet, DenseNet=DenseNet,
                     resnet34=resnet34, resnet50=resnet50, densenet121=densenet121)
    functional = module_of("torchvision.transforms.functional", normalize=normalize)
    transforms = module_of("torchvision.transforms", functional=functional, Normalize=Normalize,
                         Compose=Compose)
    package = module_of("torchvision", __version__=VERSION, __path__=[], __doc__=__doc__, models=models,
                      transforms=transforms)
    return {m.__name__: m for m in (package, models, resnet, densenet, transforms, functional)}


def install():
    """Register the stand-in as ``torchvision`` (and the submodules torchxrayvision imports)."""
    stand_ins = modules()
    sys.modules.update(stand_ins)
    return stand_ins["torchvision"]
