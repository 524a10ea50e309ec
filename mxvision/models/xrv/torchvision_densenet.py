"""torchvision's DenseNet-121 as a building block of a bigger network: 3 channels, no input checks.

Two of torchxrayvision's baseline models put torchvision's ``densenet121`` inside their own
network: JF Healthcare's classifier (:mod:`.jfhealthcare`, as its backbone) and each member of the
Stanford CheXpert ensemble (:mod:`.chexpert_ensemble`). :class:`DenseNetBlock` is
:class:`~.densenet.XRVDenseNet` -- torchvision's layer names, so the Gluon structural parameter
names are the state-dict keys -- with three input channels, and calling it runs the network
only: the enclosing model checks, resizes and rescales the input once, and calls this block with
a tensor that is deliberately not in [-1024, 1024] (``XRVDenseNet`` alone would warn about it).
"""
from mxnet.gluon import HybridBlock

from mxvision.models.xrv.densenet import XRVDenseNet


class DenseNetBlock(XRVDenseNet):
    """torchvision's DenseNet-121 on 3 channels. ``output``: ``"features"`` (``relu(features(x))``,
    the (N, 1024, h, w) map), ``"pooled"`` (its global average, (N, 1024)) or ``"scores"`` (the
    ``classifier`` Linear of ``num_classes`` outputs on the pooled vector)."""

    def __init__(self, output="features", num_classes=1000, **kwargs):
        super().__init__(spec=None, output=output, calibrated=False, in_channels=3,
                         num_classes=num_classes, **kwargs)

    def forward(self, x, *args):
        return HybridBlock.forward(self, x, *args)

    def __repr__(self):
        return "DenseNetBlock(%s)" % self.output
