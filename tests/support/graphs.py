"""What a hybridized Gluon block's traced graph holds."""
import json

import mxnet as mx
import numpy as np


def symbol_ops(sym):
    """The operator of every node of a symbol (``"null"`` for its variables)."""
    return [node["op"] for node in json.loads(sym.tojson())["nodes"]]


def cached_ops(net):
    """The operator of every node of the graph a hybridized ``net`` last built (after oneDNN's
    graph fusion, when it was hybridized with a backend)."""
    return symbol_ops(net._cached_graph[1])


def traced_ops(net, x):
    """The operator of every node in the graph ``net`` builds for input ``x`` (hybridized)."""
    net.hybridize()
    net(x)
    return cached_ops(net)


def random_batchnorm(net, rs):
    """Give every BatchNorm of the initialised ``net`` statistics and an affine part that are not
    the identity (drawn from ``rs``, a numpy RandomState), so that folding or fusing them shows."""
    for name, p in net.collect_params().items():
        if name.endswith(("running_var", "gamma")):
            p.set_data(mx.nd.array(rs.uniform(0.5, 2.0, p.shape)))
        elif name.endswith(("running_mean", "beta")):
            p.set_data(mx.nd.array(rs.normal(0.0, 0.5, p.shape)))


def fused_bn_relu_check(net, x):
    """Fused BatchNorm + ReLU count on the CPU, then with ``for_context(gpu)``: none, same outputs.
    Returns the count on the CPU (the graph is only traced, so no GPU is needed)."""
    fused = traced_ops(net, x).count("_contrib_BatchNormWithReLU")
    expected = net(x).asnumpy()
    plain = traced_ops(net.for_context(mx.gpu(0)), x)
    assert "_contrib_BatchNormWithReLU" not in plain
    np.testing.assert_array_equal(net(x).asnumpy(), expected)
    return fused
