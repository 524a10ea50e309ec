"""The Xvision classification head: two 512-unit fully connected layers with batch norm + ReLU.

The original (TensorFlow, 2017) trained this on frozen CNN codes of shape 2048x7x7; Dense flattens
its input, so the head accepts the feature maps as they are stored.
"""
from mxnet.gluon import nn

from mxvision.models.registry import register_model


class XvisionHead(nn.HybridBlock):
    """Dense(512, no bias) → BN → ReLU → Dense(512, no bias) → BN → ReLU → Dense(classes).

    The hidden layers carry no bias because the following BatchNorm's beta replaces it.
    """

    def __init__(self, classes=2, hidden=512, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes
        with self.name_scope():
            self.fc1 = nn.Dense(hidden, use_bias=False, flatten=True)
            self.bn1 = nn.BatchNorm()
            self.fc2 = nn.Dense(hidden, use_bias=False)
            self.bn2 = nn.BatchNorm()
            self.output = nn.Dense(classes)

    def hybrid_forward(self, F, x):
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.output(x)


@register_model("xvision_head", family="head", description="Xvision's 2 x 512 dense head")
def xvision_head(classes=2, **kwargs):
    """The model-registry factory: an uninitialised :class:`XvisionHead`."""
    return XvisionHead(classes=classes, **kwargs)
