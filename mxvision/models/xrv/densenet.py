"""torchxrayvision's DenseNet-121 (224x224, 1 channel, 18 pathologies) as a Gluon HybridBlock.

The layers are torchxrayvision's ``models.DenseNet`` (itself torchvision's DenseNet-BC with a
1-channel stem) in the same order and under the same names, so the Gluon structural parameter
names are the PyTorch state-dict keys with BatchNorm's ``weight``/``bias`` called
``gamma``/``beta`` -- conversion is a key lookup, checked tensor by tensor
(:meth:`~mxvision.models.xrv.common.XRVModel.load_torch_state_dict`).

``features`` (a child block, as in torchxrayvision) maps (N, 1, 224, 224) to the (N, 1024, 7, 7)
output of ``norm5``; ``features2(x)`` gives torchxrayvision's pooled vector (ReLU, global average
pool: (N, 1024)); calling the model gives the 18 scores (see
:class:`~mxvision.models.xrv.common.XRVModel`). Registered in the model registry under the seven
``densenet121-res224-*`` weights names (classifier: ``get_model(name)``; backbone for the Xvision
pipeline: ``cut="features"`` (the ReLU'd map) or ``"pooled"``).
"""
import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock, nn

from mxvision.models.xrv import weights as xrv_weights
from mxvision.models.xrv.common import NUM_CLASSES, FusedOnCPU, XRVModel

BN_EPS = 1e-5  # PyTorch's BatchNorm2d default, which torchxrayvision uses


class _Named(HybridBlock):
    """A sequential container whose children keep PyTorch's names (``conv0``, ``denseblock1``...)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._order = []

    def add(self, name, block):
        setattr(self, name, block)
        self._order.append(name)
        return block

    def hybrid_forward(self, F, x):
        for name in self._order:
            x = getattr(self, name)(x)
        return x


def _bn(channels):
    return nn.BatchNorm(epsilon=BN_EPS, in_channels=channels)


class BatchNormReLU(nn.BatchNorm, FusedOnCPU):
    """BatchNorm then ReLU, as oneDNN's one fused operator (MXNet's ``contrib.BatchNormWithReLU``).

    Why: DenseNet applies a BatchNorm + ReLU to every growing concatenation; as two operators
    each is a pass over the whole tensor, and this port took 1.2-1.4x torchxrayvision's time. Fused,
    it takes 0.55-0.65x (docs/BENCHMARKS_XRV.md), with bitwise the same outputs and the same
    parameters (``gamma``, ``beta``, ``running_mean``, ``running_var``) and gradients.
    The fused operator exists for float32 on the CPU only: ``on_cpu`` (set by
    :meth:`~.common.XRVModel.for_context`) says whether the context is a CPU, :meth:`cast` whether
    the type is float32; otherwise the two operators run. They run too with ``use_global_stats`` (how mxvision.audit.explain takes
    gradients in inference mode), whose backward oneDNN's fused operator cannot create."""

    float32 = True

    def cast(self, dtype):
        self.float32 = np.dtype(dtype) == np.float32
        super().cast(dtype)

    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var):
        if self.on_cpu and self.float32 and not self._kwargs.get("use_global_stats"):
            return F.contrib.BatchNormWithReLU(x, gamma, beta, running_mean, running_var, name="fwd",
                                               **self._kwargs)
        return F.relu(F.BatchNorm(x, gamma, beta, running_mean, running_var, name="fwd", **self._kwargs))


def _bn_relu(channels):
    return BatchNormReLU(epsilon=BN_EPS, in_channels=channels)


class _DenseLayer(HybridBlock):
    def __init__(self, in_channels, growth_rate, bn_size, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.norm1 = _bn_relu(in_channels)
            self.conv1 = nn.Conv2D(bn_size * growth_rate, 1, use_bias=False, in_channels=in_channels)
            self.norm2 = _bn_relu(bn_size * growth_rate)
            self.conv2 = nn.Conv2D(growth_rate, 3, padding=1, use_bias=False, in_channels=bn_size * growth_rate)

    def hybrid_forward(self, F, x):
        new = self.conv1(self.norm1(x))  # norm1, norm2: BatchNorm + ReLU
        new = self.conv2(self.norm2(new))
        return F.concat(x, new, dim=1)


class _Transition(HybridBlock):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.norm = _bn_relu(in_channels)  # BatchNorm + ReLU
            self.conv = nn.Conv2D(out_channels, 1, use_bias=False, in_channels=in_channels)
            self.pool = nn.AvgPool2D(2, 2)

    def hybrid_forward(self, F, x):
        return self.pool(self.conv(self.norm(x)))


class XRVDenseNet(XRVModel):
    """torchxrayvision's DenseNet (default: DenseNet-121). ``output``: ``"scores"`` (18 outputs),
    ``"features"`` (ReLU'd (N, 1024, 7, 7) map) or ``"pooled"`` ((N, 1024), = ``features2``)."""

    ARCH = "densenet121"
    OUTPUTS = ("scores", "features", "pooled")

    def __init__(self, spec=None, output="scores", calibrated=True, apply_sigmoid=False, growth_rate=32,
                 block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4, in_channels=1,
                 num_classes=NUM_CLASSES, **kwargs):
        super().__init__(spec, output=output, calibrated=calibrated, apply_sigmoid=apply_sigmoid, **kwargs)
        with self.name_scope():
            self.features = _Named(prefix="features_")
            with self.features.name_scope():
                self.features.add("conv0", nn.Conv2D(num_init_features, 7, strides=2, padding=3,
                                                     use_bias=False, in_channels=in_channels))
                self.features.add("norm0", _bn(num_init_features))
                self.features.add("relu0", nn.Activation("relu"))
                self.features.add("pool0", nn.MaxPool2D(3, 2, 1))
                channels = num_init_features
                for i, num_layers in enumerate(block_config):
                    block = self.features.add("denseblock%d" % (i + 1), _Named(prefix="denseblock%d_" % (i + 1)))
                    with block.name_scope():
                        for j in range(num_layers):
                            block.add("denselayer%d" % (j + 1),
                                      _DenseLayer(channels + j * growth_rate, growth_rate, bn_size))
                    channels += num_layers * growth_rate
                    if i != len(block_config) - 1:
                        self.features.add("transition%d" % (i + 1), _Transition(channels, channels // 2))
                        channels //= 2
                self.features.add("norm5", _bn(channels))
            # backbones ("features"/"pooled") have no classifier: no unused parameters in their graph
            self.classifier = nn.Dense(num_classes, in_units=channels) if output == "scores" else None
        self.num_features = channels
        self.head_name = "classifier"

    def hybrid_forward(self, F, x):
        out = F.relu(self.features(x))
        if self.output == "features":
            return out
        pooled = F.flatten(F.Pooling(out, kernel=(1, 1), global_pool=True, pool_type="avg"))
        if self.output == "pooled":
            return pooled
        return self.classifier(pooled)

    def features2(self, x):
        """torchxrayvision's ``features2``: resize/check like ``forward``, then the pooled (N, 1024)."""
        x = self.prepare(x)
        out = mx.nd.relu(self.features(x))
        return mx.nd.flatten(mx.nd.Pooling(out, kernel=(1, 1), global_pool=True, pool_type="avg"))

    def __repr__(self):
        return "XRV-DenseNet121-%s" % self.weights if self.weights else "XRV-DenseNet"


# Backbone cuts: the pipeline passes its default ResNet cut name unless told otherwise.
BACKBONE_CUTS = {"features": "features", "pooled": "pooled", "stage4_unit2_relu1": "features"}


xrv_weights.register_weights_of(XRVDenseNet, BACKBONE_CUTS)
