"""torchxrayvision's ChestX-Det segmentation model (PSPNet, 14 structures at 512x512) as a Gluon HybridBlock.

torchxrayvision's ``baseline_models.chestx_det.PSPNet`` wraps ptsemseg's ``pspnet`` (Zhao et al.
2017, https://arxiv.org/abs/1612.01105) with ``block_config=[3, 4, 23, 3]`` (a dilated
ResNet-101-style encoder with a three-convolution stem) and 14 classes. Its ``forward`` takes
(N, 1, H, W) in [-1024, 1024], repeats the grey channel three times, resizes to 512x512
(``fix_resolution``), rescales with ``(x + 1024) / 2048`` and ImageNet's mean/std, and returns
the network's (N, 14, 512, 512) **logits** (the demo notebook takes ``sigmoid`` and thresholds it
at 0.5; see :mod:`mxvision.segmentation`). The rescaling sits in :meth:`PSPNet.hybrid_forward`,
so an exported graph takes the same [-1024, 1024] input.

What ptsemseg does, op by op, and how it is kept here (each checked against torchxrayvision in
``tests/parity/test_pspnet_parity.py``):

* every convolution but the two classifiers has no bias and a BatchNorm (PyTorch's eps 1e-5);
  the stride of a bottleneck sits on its 3x3 convolution and on the 1x1 shortcut (``cb4``);
  ``res_block4``/``res_block5`` are dilated (2 and 4, padding = dilation) with stride 1, so the
  map stays at 1/8 of the input (64x64 for 512);
* the pyramid pooling is **not** adaptive pooling: ptsemseg averages with kernel = stride =
  ``int(h / bins)`` and no padding (bins 6, 3, 2, 1 -> kernels 10, 21, 32, 64 on a 64x64 map,
  so the last 4 and 1 rows/columns of the 6- and 3-bin pools are never read), i.e. MXNet's
  ``Pooling(pool_type="avg", pooling_convention="valid")`` with those kernels;
* ``F.upsample(mode="bilinear")`` without ``align_corners`` is ``align_corners=False`` (half-pixel
  centres): MXNet's ``contrib.BilinearResize2D(align_corners=False)`` computes the same weights
  (for these sizes identical in float64);
* the dropout is the identity at inference; the auxiliary branch (``convbnrelu4_aux``,
  ``aux_cls``) is used only in training: its weights are in the release file, so they are loaded
  (and kept, for a faithful round trip), but inference never computes them.

The 1-bin path is computed on its pooled value tiled to 2x2 (then resized like the others): the
convolution, BatchNorm and ReLU act pixel by pixel, so the result is the same, and MXNet 1.9.1's
oneDNN BatchNorm never sees an (N, 512, 1, 1) input, whose cached primitive a later 2-D
BatchNorm of 512 channels (a head's) would reuse and crash on (CONTRIBUTING.md, MXNet traps).
"""
from mxnet.gluon import HybridBlock, nn

from mxvision.models.xrv import weights as xrv_weights
from mxvision.models.xrv.baseline import BaselineModel, imagenet_channels, unit_range

BN_EPS = 1e-5  # PyTorch's BatchNorm2d default; ptsemseg sets no other
PYRAMID_BINS = (6, 3, 2, 1)
BLOCK_CONFIG = (3, 4, 23, 3)
#: the encoder's output is 1/8 of the input: stem stride 2, max pool 2, res_block3 stride 2
OUTPUT_STRIDE = 8


class ConvBN(HybridBlock):
    """ptsemseg's ``conv2DBatchNorm`` (``relu=False``) or ``conv2DBatchNormRelu``: a convolution
    without bias, BatchNorm (and ReLU) in a container named as ptsemseg names it (``cb_unit`` or
    ``cbr_unit``), so the structural names are its state-dict keys."""

    def __init__(self, in_channels, channels, kernel, stride=1, padding=0, dilation=1, relu=True, **kwargs):
        super().__init__(**kwargs)
        self.unit_name = "cbr_unit" if relu else "cb_unit"
        with self.name_scope():
            unit = nn.HybridSequential()
            with unit.name_scope():
                unit.add(nn.Conv2D(channels, kernel, strides=stride, padding=padding, dilation=dilation,
                                   use_bias=False, in_channels=in_channels))
                unit.add(nn.BatchNorm(epsilon=BN_EPS, in_channels=channels))
                if relu:
                    unit.add(nn.Activation("relu"))
            setattr(self, self.unit_name, unit)

    def hybrid_forward(self, F, x):
        return getattr(self, self.unit_name)(x)


class Bottleneck(HybridBlock):
    """ptsemseg's ``bottleNeckPSP`` (``shortcut=True``: the first block of a stage, with the 1x1
    projection ``cb4``) or ``bottleNeckIdentifyPSP`` (identity shortcut, stride 1)."""

    def __init__(self, in_channels, mid_channels, out_channels, stride, dilation, shortcut, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.cbr1 = ConvBN(in_channels, mid_channels, 1)
            self.cbr2 = ConvBN(mid_channels, mid_channels, 3, stride=stride, padding=dilation, dilation=dilation)
            self.cb3 = ConvBN(mid_channels, out_channels, 1, relu=False)
            self.cb4 = ConvBN(in_channels, out_channels, 1, stride=stride, relu=False) if shortcut else None

    def hybrid_forward(self, F, x):
        residual = self.cb4(x) if self.cb4 is not None else x
        return F.Activation(self.cb3(self.cbr2(self.cbr1(x))) + residual, act_type="relu")


def residual_stage(blocks, in_channels, mid_channels, out_channels, stride, dilation):
    """ptsemseg's ``residualBlockPSP``: children under ``layers``; a dilated stage has stride 1."""
    stride = 1 if dilation > 1 else stride
    stage = _Stage()
    with stage.name_scope():
        stage.layers = nn.HybridSequential()
        with stage.layers.name_scope():
            stage.layers.add(Bottleneck(in_channels, mid_channels, out_channels, stride, dilation, True))
            for _ in range(blocks - 1):
                stage.layers.add(Bottleneck(out_channels, mid_channels, out_channels, 1, dilation, False))
    return stage


class _Stage(HybridBlock):
    def hybrid_forward(self, F, x):
        return self.layers(x)


class PyramidPooling(HybridBlock):
    """ptsemseg's ``pyramidPooling`` (``fusion_mode="cat"``): for each bin count, average pooling
    with kernel = stride = ``int(h / bins)`` (no padding), a 1x1 ConvBNReLU to ``in / 4`` channels,
    bilinear resize back to h x w; concatenated after the input."""

    def __init__(self, in_channels, bins=PYRAMID_BINS, map_size=None, **kwargs):
        super().__init__(**kwargs)
        self.bins = tuple(bins)
        self.map_size = map_size  # the map's side in a symbolic graph, where shapes are unknown
        with self.name_scope():
            self.path_module_list = nn.HybridSequential()
            with self.path_module_list.name_scope():
                for _ in self.bins:
                    self.path_module_list.add(ConvBN(in_channels, in_channels // len(self.bins), 1))

    def hybrid_forward(self, F, x):
        h, w = x.shape[2:] if hasattr(x, "shape") else (self.map_size, self.map_size)
        slices = [x]
        for path, bins in zip(self.path_module_list, self.bins):
            kernel = (int(h / bins), int(w / bins))
            out = F.Pooling(x, kernel=kernel, stride=kernel, pool_type="avg", pooling_convention="valid")
            if bins == 1:  # 2x2 copies of the one value: see the module docstring (oneDNN BatchNorm)
                out = F.tile(out, reps=(1, 1, 2, 2))
            out = path(out)
            slices.append(F.contrib.BilinearResize2D(out, x, mode="like", align_corners=False))
        return F.concat(*slices, dim=1)


class PSPNet(BaselineModel):
    """torchxrayvision's ``chestx_det.PSPNet``: (N, 1, 512, 512) in [-1024, 1024] -> (N, 14, 512, 512)
    logits, one channel per structure of ``targets`` (sigmoid > 0.5 gives the masks)."""

    ARCH = "pspnet"
    OUTPUTS = ("scores",)

    def __init__(self, spec=None, output="scores", block_config=BLOCK_CONFIG, **kwargs):
        super().__init__(spec, output=output, **kwargs)
        n_classes = len(self.targets)
        with self.name_scope():
            self.convbnrelu1_1 = ConvBN(3, 64, 3, stride=2, padding=1)
            self.convbnrelu1_2 = ConvBN(64, 64, 3, padding=1)
            self.convbnrelu1_3 = ConvBN(64, 128, 3, padding=1)
            self.maxpool = nn.MaxPool2D(3, 2, 1)
            self.res_block2 = residual_stage(block_config[0], 128, 64, 256, 1, 1)
            self.res_block3 = residual_stage(block_config[1], 256, 128, 512, 2, 1)
            self.res_block4 = residual_stage(block_config[2], 512, 256, 1024, 1, 2)
            self.res_block5 = residual_stage(block_config[3], 1024, 512, 2048, 1, 4)
            self.pyramid_pooling = PyramidPooling(2048, map_size=self.resolution // OUTPUT_STRIDE)
            self.cbr_final = ConvBN(4096, 512, 3, padding=1)
            self.classification = nn.Conv2D(n_classes, 1, in_channels=512)
            # training only (ptsemseg returns (aux, out) in training mode): loaded, never computed
            # (prefixed so that hybridize's "not used by any computation" warning names them)
            self.convbnrelu4_aux = ConvBN(1024, 256, 3, padding=1, prefix="convbnrelu4_aux_")
            self.aux_cls = nn.Conv2D(n_classes, 1, in_channels=256, prefix="aux_cls_")

    def hybrid_forward(self, F, x):
        x = imagenet_channels(F, unit_range(F, x))
        out = self.maxpool(self.convbnrelu1_3(self.convbnrelu1_2(self.convbnrelu1_1(x))))
        out = self.res_block5(self.res_block4(self.res_block3(self.res_block2(out))))
        out = self.classification(self.cbr_final(self.pyramid_pooling(out)))
        return F.contrib.BilinearResize2D(out, x, mode="like", align_corners=False)

    def __repr__(self):
        return "chestx-det-pspnet"


xrv_weights.register_baselines_of(PSPNet)
