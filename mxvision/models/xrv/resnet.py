"""torchxrayvision's ResNet-50 (512x512, 1 channel, 18 pathologies) as a Gluon HybridBlock.

torchxrayvision's ``models.ResNet`` wraps torchvision's ResNet-50 (v1.5: the stride sits on the
3x3 convolution of each bottleneck) with a 1-channel ``conv1``; its release file
(``resnet50-res512-all``) is the state dict of that inner torchvision network. The layers here
carry torchvision's names (``conv1``, ``bn1``, ``layer1.0.downsample.1``, ``fc``...), so the
Gluon structural parameter names are the state-dict keys with BatchNorm's ``weight``/``bias``
called ``gamma``/``beta``.

``features(x)`` is torchxrayvision's: resize/check like ``forward``, then the pooled (N, 2048)
vector; calling the model gives the 18 scores (see :class:`~mxvision.models.xrv.common.XRVModel`).
Backbone cuts for the Xvision pipeline: ``"features"`` (pooled (N, 2048), the default) and
``"layer4"`` (the (N, 2048, 16, 16) map -- large: a dense head on it has ~268M weights).
"""
import mxnet as mx
from mxnet.gluon import HybridBlock, nn

from mxvision.models.xrv import weights as xrv_weights
from mxvision.models.xrv.common import NUM_CLASSES, XRVModel

BN_EPS = 1e-5  # PyTorch's BatchNorm2d default


def batch_norm(channels):
    """torch's ``BatchNorm2d(channels)``: its epsilon, its parameter names once mapped."""
    return nn.BatchNorm(epsilon=BN_EPS, in_channels=channels)


def shortcut(prefix, layer, channels):
    """torch's ``nn.Sequential(layer, BatchNorm2d(channels))`` as ``<prefix>.0`` and ``<prefix>.1``."""
    seq = nn.HybridSequential(prefix=prefix + "_")
    with seq.name_scope():
        seq.add(layer)
        seq.add(batch_norm(channels))
    return seq


class Bottleneck(HybridBlock):
    """torchvision's ``Bottleneck`` (v1.5: the stride on the 3x3 convolution), its names kept."""

    expansion = 4

    def __init__(self, in_channels, planes, stride=1, downsample=False, **kwargs):
        super().__init__(**kwargs)
        out = planes * self.expansion
        with self.name_scope():
            self.conv1 = nn.Conv2D(planes, 1, use_bias=False, in_channels=in_channels)
            self.bn1 = batch_norm(planes)
            self.conv2 = nn.Conv2D(planes, 3, strides=stride, padding=1, use_bias=False, in_channels=planes)
            self.bn2 = batch_norm(planes)
            self.conv3 = nn.Conv2D(out, 1, use_bias=False, in_channels=planes)
            self.bn3 = batch_norm(out)
            self.downsample = (shortcut("downsample", nn.Conv2D(out, 1, strides=stride, use_bias=False,
                                                                 in_channels=in_channels), out)
                               if downsample else None)

    def hybrid_forward(self, F, x):
        out = F.Activation(self.bn1(self.conv1(x)), act_type="relu")
        out = F.Activation(self.bn2(self.conv2(out)), act_type="relu")
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.Activation(out + identity, act_type="relu")


def add_torchvision_trunk(net, block, layers, in_channels):
    """Give ``net`` (inside its name scope) torchvision's ResNet trunk: ``conv1``, ``bn1``,
    ``maxpool``, ``layer1``..``layer4`` of ``block``s (``layers`` per stage), with torchvision's
    names; returns the channels of the last stage."""
    net.conv1 = nn.Conv2D(64, 7, strides=2, padding=3, use_bias=False, in_channels=in_channels)
    net.bn1 = batch_norm(64)
    net.maxpool = nn.MaxPool2D(3, 2, 1)
    channels = 64
    for i, (blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
        stride = 1 if i == 0 else 2
        layer = nn.HybridSequential(prefix="layer%d_" % (i + 1))
        with layer.name_scope():
            for b in range(blocks):
                out = planes * block.expansion
                layer.add(block(channels, planes, stride if b == 0 else 1,
                                downsample=b == 0 and (stride != 1 or channels != out)))
                channels = out
        setattr(net, "layer%d" % (i + 1), layer)
    return channels


class XRVResNet(XRVModel):
    """torchxrayvision's ResNet-50. ``output``: ``"scores"`` (18 outputs), ``"features"``
    (pooled (N, 2048), = torchxrayvision's ``features``) or ``"layer4"`` (the last map)."""

    ARCH = "resnet50"
    OUTPUTS = ("scores", "features", "layer4")

    def __init__(self, spec=None, output="scores", calibrated=True, apply_sigmoid=False, layers=(3, 4, 6, 3),
                 in_channels=1, num_classes=NUM_CLASSES, **kwargs):
        super().__init__(spec, output=output, calibrated=calibrated, apply_sigmoid=apply_sigmoid, **kwargs)
        with self.name_scope():
            channels = add_torchvision_trunk(self, Bottleneck, layers, in_channels)
            # backbones ("features"/"layer4") have no fc: no unused parameters in their graph
            self.fc = nn.Dense(num_classes, in_units=channels) if output == "scores" else None
        self.num_features = channels
        self.head_name = "fc"

    def _trunk(self, F, x):
        x = self.maxpool(F.Activation(self.bn1(self.conv1(x)), act_type="relu"))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def hybrid_forward(self, F, x):
        x = self._trunk(F, x)
        if self.output == "layer4":
            return x
        pooled = F.flatten(F.Pooling(x, kernel=(1, 1), global_pool=True, pool_type="avg"))
        if self.output == "features":
            return pooled
        return self.fc(pooled)

    def features(self, x):
        """torchxrayvision's ``ResNet.features``: resize/check, then the pooled (N, 2048) vector."""
        x = self.prepare(x)
        return mx.nd.flatten(mx.nd.Pooling(self._trunk(mx.nd, x), kernel=(1, 1), global_pool=True,
                                           pool_type="avg"))

    def __repr__(self):
        return "XRV-ResNet-%s" % self.weights if self.weights else "XRV-ResNet"


BACKBONE_CUTS = {"features": "features", "pooled": "features", "layer4": "layer4",
                 "stage4_unit2_relu1": "features"}


xrv_weights.register_weights_of(XRVResNet, BACKBONE_CUTS)
