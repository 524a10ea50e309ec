"""NoduleNet: a small fully convolutional nodule detector trained from scratch.

Why a separate, small network: the lesion-insertion check (:mod:`mxvision.audit.lesion`) showed that
frozen random ResNet-50 features, with or without fine-tuning one stage on 160 images, do not see
nodules (AUC about 0.5), and no pretrained weights can be had here. A few 3x3 conv layers trained
on nodules inserted on the fly into real normal films, with the evidence map supervised by the
nodule's disc, do (see ``docs/EVALUATION.md`` section (c)). Being fully convolutional it takes any
input size; it is trained and applied on the whole film.

Output: a 1-channel map of nodule evidence (logits) at 1/8 of the input resolution
(:data:`STRIDE`); the image score is the map's maximum ("the strongest nodule-like spot") and the
map's arg-max says where. Layers: conv 3x3 + BatchNorm + LeakyReLU, strides 2, 2, 1, 2, 1, with
``width``, 2x and 4x channels (keep ``width`` a multiple of 16: measured on this CPU, oneDNN ran
width 24 seven times slower than width 16), then ``extra`` stride-1 layers with ``dilation``
(cheap at 1/8 resolution, they widen the receptive field: 39 px of input without, +32 px per extra
layer at dilation 2), then a 1x1 conv. The detector's defaults: width 16, 2 extra layers (103 px). Registered in the model registry as ``nodule_net``.
"""
import mxnet as mx
from mxnet.gluon import HybridBlock, nn

from mxvision.models.registry import register_model

STRIDE = 8
DEFAULTS = {"width": 16, "extra": 2, "dilation": 2}


class NoduleNet(HybridBlock):
    """Image (N, 1, H, W), normalised grey levels -> nodule-evidence logits (N, 1, H/8, W/8)."""

    def __init__(self, width=16, extra=2, dilation=2, **kwargs):
        super().__init__(**kwargs)
        self.config = {"width": int(width), "extra": int(extra), "dilation": int(dilation)}
        layers = [(width, 2, 1), (2 * width, 2, 1), (2 * width, 1, 1), (4 * width, 2, 1), (4 * width, 1, 1)]
        layers += [(4 * width, 1, dilation)] * extra
        with self.name_scope():
            self.features = nn.HybridSequential(prefix="features_")
            previous = 1  # channel counts given, so the parameters exist before a forward pass
            for channels, stride, dil in layers:
                self.features.add(nn.Conv2D(channels, 3, strides=stride, padding=dil, dilation=dil,
                                            use_bias=False, in_channels=previous),
                                  nn.BatchNorm(in_channels=channels), nn.LeakyReLU(0.1))
                previous = channels
            self.evidence = nn.Conv2D(1, 1, in_channels=previous, prefix="evidence_")

    def hybrid_forward(self, F, x):
        return self.evidence(self.features(x))


def image_scores(evidence):
    """Per-image score of an evidence map (N, 1, h, w): its maximum logit, shape (N,)."""
    return evidence.max(axis=(1, 2, 3))


@register_model("nodule_net", family="nodule_net", description="the nodule detector's evidence network")
def nodule_net(width=16, extra=2, dilation=2, weights_file=None, ctx=None, seed=0, **kwargs):
    """Model-zoo factory: a hybridized NoduleNet on ``ctx``, with the parameters of
    ``weights_file`` (a ``.params`` written by the detector) or seeded Xavier initialisation."""
    ctx = ctx or mx.cpu()
    net = NoduleNet(width=width, extra=extra, dilation=dilation, **kwargs)
    if weights_file is not None:
        net.load_parameters(str(weights_file), ctx=ctx)
    else:
        mx.random.seed(seed)
        net.initialize(mx.init.Xavier(magnitude=2), ctx=ctx)
    net.hybridize()
    return net
