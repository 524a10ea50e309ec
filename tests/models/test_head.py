import mxnet as mx
import numpy as np

from mxvision.models.head import XvisionHead


def test_head_layers_match_the_original_xvision_head():
    head = XvisionHead(classes=2)
    head.initialize()
    out = head(mx.nd.random.normal(shape=(3, 2048, 7, 7)))
    assert out.shape == (3, 2)
    shapes = {k.split("_", 1)[1]: v.shape for k, v in head.collect_params().items()}
    # two 512-unit layers without bias (BatchNorm's beta replaces it), then the classifier
    assert shapes["dense0_weight"] == (512, 2048 * 7 * 7)
    assert shapes["dense1_weight"] == (512, 512)
    assert "dense0_bias" not in shapes and "dense1_bias" not in shapes
    assert shapes["dense2_weight"] == (2, 512) and shapes["dense2_bias"] == (2,)
    assert shapes["batchnorm0_gamma"] == (512,) and shapes["batchnorm1_running_var"] == (512,)


def test_head_hybridized_equals_imperative():
    head = XvisionHead(classes=3)
    head.initialize(mx.init.Xavier())
    x = mx.nd.random.normal(shape=(4, 64, 2, 2))
    imperative = head(x).asnumpy()
    head.hybridize()
    np.testing.assert_allclose(head(x).asnumpy(), imperative, rtol=1e-5, atol=1e-6)
