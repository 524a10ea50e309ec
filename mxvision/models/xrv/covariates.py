"""torchxrayvision's covariate models -- view, sex and race from a film -- as Gluon HybridBlocks.

Three of torchxrayvision's baseline models (:mod:`.baseline_specs`) are plain torchvision
ResNets on three repeated grey channels; each rescales torchxrayvision's [-1024, 1024] input its
own way and reads its own release file:

* ``xinario-view-resnet50`` (``baseline_models.xinario.ViewModel``): ResNet-50 with torchvision's
  1000-way ``fc``, of which ``forward`` returns the first two logits (Frontal, Lateral); input
  ``(x + 1024) / 2048`` then ImageNet's mean/std; 224x224. The file is the ResNet's state dict.
* ``mira-sex-resnet34`` (``baseline_models.mira.SexModel``): ResNet-34, ``fc`` 512 -> 2 logits
  (Male, Female); input ``(x + 1024) / 2048 * 255``, no mean/std; 224x224. The file is a PyTorch
  Lightning checkpoint: the ResNet's tensors sit in its ``state_dict`` entry under ``model.``
  (the LightningModule's attribute), beside the trainer's state (epoch, optimizer moments,
  callbacks) which is read as plain data and left unused.
* ``emory_hiti-race-resnet34`` (``baseline_models.emory_hiti.RaceModel``): ResNet-34 whose ``fc``
  is ``Sequential(Linear(512, 3), LogSoftmax)`` -- log-probabilities of Asian, Black, White;
  input ``(x + 1024) / 2048`` then ImageNet's mean/std; 320x320. The file is the state dict of
  an ``nn.DataParallel`` (keys prefixed ``module.``).

The layers carry torchvision's names (``conv1``, ``layer1.0.bn2``, ``layer2.0.downsample.0``,
``fc`` or ``fc.0``), so Gluon's structural parameter names are the state-dict keys (BatchNorm's
``weight``/``bias`` called ``gamma``/``beta``) and :meth:`~.common.XRVModel.load_torch_state_dict`
reads every file tensor by tensor, stripping ``model.``/``module.``. The rescaling is inside
``hybrid_forward``, so a hybridized or exported graph takes torchxrayvision's input.

Outputs: ``"scores"`` (what torchxrayvision's ``forward`` returns) or ``"features"`` (the pooled
vector before ``fc``: 2048 for the ResNet-50, 512 for the ResNet-34s).
"""
from mxnet.gluon import HybridBlock, nn

from mxvision.models.xrv.baseline import BaselineModel, imagenet_channels, three_channels, unit_range
from mxvision.models.xrv.resnet import Bottleneck, add_torchvision_trunk, batch_norm, shortcut
from mxvision.models.xrv.weights import register_baselines_of


class _BasicBlock(HybridBlock):
    """torchvision's ``BasicBlock``: two 3x3 convolutions (the stride on the first) and the shortcut."""

    expansion = 1

    def __init__(self, in_channels, planes, stride=1, downsample=False, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv1 = nn.Conv2D(planes, 3, strides=stride, padding=1, use_bias=False, in_channels=in_channels)
            self.bn1 = batch_norm(planes)
            self.conv2 = nn.Conv2D(planes, 3, padding=1, use_bias=False, in_channels=planes)
            self.bn2 = batch_norm(planes)
            self.downsample = (shortcut("downsample", nn.Conv2D(planes, 1, strides=stride, use_bias=False,
                                                                 in_channels=in_channels), planes)
                               if downsample else None)

    def hybrid_forward(self, F, x):
        out = F.Activation(self.bn1(self.conv1(x)), act_type="relu")
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.Activation(out + identity, act_type="relu")


#: torchvision's ``resnet18``/``resnet34``/``resnet50``: block type and blocks per stage
LAYOUTS = {18: (_BasicBlock, (2, 2, 2, 2)), 34: (_BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


class CovariateResNet(BaselineModel):
    """torchvision's ResNet of depth ``DEPTH`` on three channels, with a subclass's input scaling
    (:meth:`rescale`) and classifier (:meth:`make_fc`, :meth:`scores`)."""

    DEPTH = None
    OUTPUTS = ("scores", "features")

    def __init__(self, spec=None, output="scores", **kwargs):
        super().__init__(spec, output=output, **kwargs)
        block, layers = LAYOUTS[self.DEPTH]
        with self.name_scope():
            channels = add_torchvision_trunk(self, block, layers, in_channels=3)
            # "features" has no fc: no unused parameters in its graph, and a full file loads into it
            self.fc = self.make_fc(channels) if output == "scores" else None
        self.num_features = channels
        self.head_name = "fc"

    def make_fc(self, channels):
        raise NotImplementedError

    def rescale(self, F, x):
        """torchxrayvision's (N, 1, H, W) input in [-1024, 1024] -> the network's 3-channel input."""
        raise NotImplementedError

    def scores(self, F, fc_out):
        """What torchxrayvision's ``forward`` returns, from the ``fc`` output."""
        return fc_out

    def hybrid_forward(self, F, x):
        x = self.maxpool(F.Activation(self.bn1(self.conv1(self.rescale(F, x))), act_type="relu"))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        pooled = F.flatten(F.Pooling(x, kernel=(1, 1), global_pool=True, pool_type="avg"))
        if self.output == "features":
            return pooled
        return self.scores(F, self.fc(pooled))


class XinarioViewResNet50(CovariateResNet):
    """``baseline_models.xinario.ViewModel``: Frontal/Lateral logits, the first two of 1000."""

    ARCH = "xinario_resnet50"
    DEPTH = 50

    def make_fc(self, channels):
        return nn.Dense(1000, in_units=channels)  # torchvision's ImageNet classifier, kept whole

    def rescale(self, F, x):
        return imagenet_channels(F, unit_range(F, x))

    def scores(self, F, fc_out):
        return F.slice_axis(fc_out, axis=1, begin=0, end=len(self.targets))


class MiraSexResNet34(CovariateResNet):
    """``baseline_models.mira.SexModel``: Male/Female logits from [0, 255] pseudo-RGB input."""

    ARCH = "mira_resnet34"
    DEPTH = 34

    def make_fc(self, channels):
        return nn.Dense(len(self.targets), in_units=channels)

    def rescale(self, F, x):
        return three_channels(F, unit_range(F, x) * 255.0)  # torchxrayvision's order of operations


class EmoryRaceResNet34(CovariateResNet):
    """``baseline_models.emory_hiti.RaceModel``: log-probabilities of Asian, Black, White."""

    ARCH = "emory_resnet34"
    DEPTH = 34

    def make_fc(self, channels):
        fc = nn.HybridSequential(prefix="fc_")  # Sequential(Linear, LogSoftmax): keys fc.0.weight/bias
        with fc.name_scope():
            fc.add(nn.Dense(len(self.targets), in_units=channels))
            fc.add(nn.HybridLambda(lambda F, x: F.log_softmax(x, axis=1)))
        return fc

    def rescale(self, F, x):
        return imagenet_channels(F, unit_range(F, x))


for _network in (XinarioViewResNet50, MiraSexResNet34, EmoryRaceResNet34):
    register_baselines_of(_network)
