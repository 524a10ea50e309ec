"""Backbone + head (+ softmax) as one HybridBlock: the network that is deployed and exported."""
from mxnet.gluon import nn


class XvisionClassifier(nn.HybridBlock):
    """Images (N, C, S, S) → class probabilities (or logits with ``softmax=False``)."""

    def __init__(self, backbone, head, softmax=True, **kwargs):
        super().__init__(**kwargs)
        self.softmax = softmax
        self.backbone = backbone
        self.head = head

    def hybrid_forward(self, F, x):
        logits = self.head(self.backbone(x))
        return F.softmax(logits) if self.softmax else logits
