"""JF Healthcare's CheXpert DenseNet-121 (torchxrayvision's ``baseline_models.jfhealthcare.DenseNet``) in Gluon.

torchxrayvision 1.5.7 builds JF Healthcare's ``Classifier`` (https://github.com/jfhealthcare/Chexpert,
Ye et al. 2020, arXiv:2005.14480) from its ``config/example.json`` and loads the release file
``baseline_models_jfhealthcare-DenseNet121_pre_train.pth`` -- the ``Classifier``'s own state dict
(``model.module.state_dict()``: keys ``backbone.features.*``, ``attention_map.*``, ``fc_0..4``,
``bn_0..4``, no ``module.`` prefix). Only what that configuration selects is ported:

* ``backbone: densenet121``, ``norm_type: BatchNorm`` -- torchvision's DenseNet-121 on 3 channels
  (:class:`~.torchvision_densenet.DenseNetBlock`), then a ReLU;
* ``attention_map: FPA`` -- the feature pyramid attention module (Li et al. 2018). The
  ``Classifier`` applies it *inside* its loop over the five outputs, to the map the previous
  output left: output ``i`` sees the attention module applied ``i + 1`` times, with the same
  weights. That is what the weights were trained with, so it is kept;
* ``global_pool: AVG_MAX`` -- global average and global maximum, concatenated (2048 channels);
* ``fc_bn: true`` -- a BatchNorm on the pooled vector before each output's 1x1 convolution
  (``fc_drop: 0``: no dropout).

The VGG and Inception backbones, GroupNorm/InstanceNorm, the CAM/SAM attention maps and the other
pools (PCAM, LSE, EXP, LINEAR) that the configuration does not select are not ported. The
release file still holds the unused modules' tensors -- the DenseNet's ImageNet ``classifier`` and
the channel (CAM) and spatial (SAM) attention modules, which ``AttentionMap`` always builds -- so
:meth:`JFHealthcareDenseNet.load_torch_state_dict` drops exactly those and checks the rest.

Input as torchxrayvision's ``forward``: (N, 1, 512, 512) in [-1024, 1024] (resized to 512 with a
warning otherwise), repeated to 3 channels and divided by 512 (inside ``hybrid_forward``, so an
exported graph includes it). Output: the 5 logits in torchxrayvision's order (Cardiomegaly,
Edema, Consolidation, Atelectasis, Effusion), through a sigmoid when ``apply_sigmoid=True`` --
torchxrayvision's default, and this model's (``get_model`` applies it unless told
``apply_sigmoid=False``).
"""
from mxnet.gluon import HybridBlock, nn

from mxvision.models.xrv.baseline import BaselineModel, three_channels
from mxvision.models.xrv.torchvision_densenet import DenseNetBlock
from mxvision.models.xrv.weights import register_baselines_of

BN_EPS = 1e-5  # get_norm("BatchNorm", ...) in JF Healthcare's model/utils.py
NUM_OUTPUTS = 5  # example.json: num_classes [1, 1, 1, 1, 1]
NUM_FEATURES = 1024  # DenseNet-121's last map
INPUT_SCALE = 512.0  # torchxrayvision: "x = x / 512", [-1024, 1024] -> [-2, 2]

#: tensors of the release file that example.json's model never uses (see the module docstring)
UNUSED_TENSORS = ("backbone.classifier.", "attention_map.channel_attention.",
                  "attention_map.spatial_attention.")


def _batch_norm(channels):
    return nn.BatchNorm(epsilon=BN_EPS, in_channels=channels)


class ConvNormRelu(HybridBlock):
    """JF Healthcare's ``Conv2dNormRelu``: ``conv = Sequential(Conv2d (with bias), BatchNorm, ReLU)``."""

    def __init__(self, in_channels, channels, kernel_size, stride=1, padding=0, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv = nn.HybridSequential()
            with self.conv.name_scope():
                self.conv.add(nn.Conv2D(channels, kernel_size, strides=stride, padding=padding,
                                        in_channels=in_channels),
                              _batch_norm(channels), nn.Activation("relu"))

    def hybrid_forward(self, F, x):
        return self.conv(x)


def _resize_like(F, x, like):
    """``nn.Upsample(size=like's (h, w), mode="bilinear", align_corners=False)``."""
    return F.contrib.BilinearResize2D(x, like, mode="like", align_corners=False)


class PyramidAttention(HybridBlock):
    """JF Healthcare's ``FPAModule`` (feature pyramid attention) on ``channels`` channels.

    A global-pooling branch (broadcast back over the map: bilinear upsampling of a 1x1 map is a
    constant), a 1x1 middle branch, and a 1-channel pyramid of three stride-2 levels whose
    upsampled sum weights the middle branch. torchxrayvision upsamples the pyramid to
    ``(h // 4, w // 4)`` and ``(h // 2, w // 2)``; here to the size of the level above, the same
    sizes whenever ``h`` and ``w`` are multiples of 4 (DenseNet-121's map at 512: 16x16).
    """

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.gap_branch = nn.HybridSequential()
            with self.gap_branch.name_scope():
                self.gap_branch.add(nn.GlobalAvgPool2D(), ConvNormRelu(channels, channels, 1))
            self.mid_branch = ConvNormRelu(channels, channels, 1)
            self.downsample1 = ConvNormRelu(channels, 1, 7, stride=2, padding=3)
            self.downsample2 = ConvNormRelu(1, 1, 5, stride=2, padding=2)
            self.downsample3 = ConvNormRelu(1, 1, 3, stride=2, padding=1)
            self.scale1 = ConvNormRelu(1, 1, 7, padding=3)
            self.scale2 = ConvNormRelu(1, 1, 5, padding=2)
            self.scale3 = ConvNormRelu(1, 1, 3, padding=1)

    def hybrid_forward(self, F, feat_map):
        gap_branch = self.gap_branch(feat_map)  # (N, C, 1, 1)
        mid_branch = self.mid_branch(feat_map)
        scale1 = self.downsample1(feat_map)
        scale2 = self.downsample2(scale1)
        scale3 = self.downsample3(scale2)
        scale3 = _resize_like(F, self.scale3(scale3), scale2)
        scale2 = _resize_like(F, self.scale2(scale2) + scale3, scale1)
        scale1 = _resize_like(F, self.scale1(scale1) + scale2, feat_map)  # (N, 1, h, w)
        return F.broadcast_add(F.broadcast_mul(scale1, mid_branch), gap_branch)


class AttentionMap(HybridBlock):
    """JF Healthcare's ``AttentionMap`` as example.json configures it (``FPA``): only its
    ``pyramid_attention`` is built (see the module docstring for the others)."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.pyramid_attention = PyramidAttention(channels)

    def hybrid_forward(self, F, feat_map):
        return self.pyramid_attention(feat_map)


class JFHealthcareDenseNet(BaselineModel):
    """torchxrayvision's ``baseline_models.jfhealthcare.DenseNet``: 5 CheXpert outputs at 512x512.

    Structural parameter names are the release file's keys (BatchNorm ``gamma``/``beta`` for
    ``weight``/``bias``). ``apply_sigmoid`` (default True, as torchxrayvision): sigmoid
    probabilities, else the logits.
    """

    ARCH = "jfhealthcare_densenet121"
    APPLY_SIGMOID = True  # torchxrayvision's DenseNet(apply_sigmoid=True)

    def __init__(self, spec=None, output="scores", calibrated=False, apply_sigmoid=APPLY_SIGMOID, **kwargs):
        super().__init__(spec, output=output, calibrated=calibrated, apply_sigmoid=apply_sigmoid, **kwargs)
        with self.name_scope():
            self.backbone = DenseNetBlock(output="features")
            self.attention_map = AttentionMap(NUM_FEATURES)
            for index in range(NUM_OUTPUTS):
                # AVG_MAX pooling doubles the channels (Classifier.expand = 2)
                setattr(self, "fc_%d" % index, nn.Conv2D(1, 1, in_channels=2 * NUM_FEATURES))
                setattr(self, "bn_%d" % index, _batch_norm(2 * NUM_FEATURES))

    def hybrid_forward(self, F, x):
        feat_map = self.backbone(three_channels(F, x) / INPUT_SCALE)
        logits = []
        for index in range(NUM_OUTPUTS):
            feat_map = self.attention_map(feat_map)  # cumulative, as in Classifier.forward
            pooled = F.concat(F.Pooling(feat_map, kernel=(1, 1), global_pool=True, pool_type="avg"),
                              F.Pooling(feat_map, kernel=(1, 1), global_pool=True, pool_type="max"), dim=1)
            feat = getattr(self, "bn_%d" % index)(pooled)
            logits.append(F.flatten(getattr(self, "fc_%d" % index)(feat)))  # (N, 1)
        return F.concat(*logits, dim=1)

    def load_torch_state_dict(self, state, source="weights", ctx=None):
        """The release file's state dict, without the tensors of modules example.json does not use
        (:data:`UNUSED_TENSORS`); everything else is checked as for every port."""
        if state and all(k.startswith("module.") for k in state):  # a DataParallel state dict
            state = {k[len("module."):]: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(UNUSED_TENSORS)}
        return super().load_torch_state_dict(state, source=source, ctx=ctx)

    def __repr__(self):
        return "jfhealthcare-DenseNet121(%s)" % self.weights


register_baselines_of(JFHealthcareDenseNet)
