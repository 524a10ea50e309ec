"""Random weights for the view model that call some real films frontal and others lateral.

No trained weights exist here, and a random network tends to give every film the same answer,
which would let a view filter pass without looking. The classifier's bias is shifted so that
the film with the smallest (Lateral - Frontal) logit gap is Frontal and the others Lateral.
"""
import mxnet as mx
import numpy as np

from mxvision.data.xrv_transforms import load_xray, preprocess
from mxvision.models import zoo
from mxvision.view_prediction import VIEW_MODEL


def split_view_weights(paths, out):
    """Write ``out`` (.params): view-model weights calling ``paths[argmin]`` frontal, the rest
    lateral. Returns ``(out, frontal_path)``."""
    net = zoo.get_model(VIEW_MODEL, weights="none")
    x = np.stack([preprocess(load_xray(p), 224) for p in paths])
    logits = net(mx.nd.array(x)).asnumpy()
    gap = logits[:, 1] - logits[:, 0]
    order = np.sort(gap)
    threshold = (order[0] + order[1]) / 2
    bias = net.fc.bias.data().asnumpy()
    bias[1] -= threshold
    net.fc.bias.set_data(mx.nd.array(bias))
    net.save_parameters(str(out))
    return str(out), paths[int(np.argmin(gap))]
