"""A float32 graph re-expressed so that MXNet 1.9.1's INT8 pass quantizes all of it.

The same function, written with the operators the oneDNN quantization flow
(:func:`mxnet.contrib.quantization.quantize_model_mkldnn`) knows how to fuse. Without this, the
torchxrayvision ports ran *slower* in INT8 than in float32 (docs/BENCHMARKS_XRV.md): every
BatchNorm + ReLU the pass cannot handle stays float32 between a dequantize and a quantize.

Three rewrites, each exact in float32 (checked in tests/features/test_int8_graph.py):

``relu`` → ``Activation(act_type="relu")``
    The fusion passes (convolution + ReLU, convolution + sum + ReLU) match only ``Activation``;
    an ``F.relu`` is left as a float32 ReLU after its convolution. The ResNet ports now use
    ``Activation`` themselves (so oneDNN's float32 graph fusion gets them too); DenseNet's ReLU
    after its last BatchNorm and graphs from elsewhere still need the rewrite.
``_contrib_BatchNormWithReLU`` → ``BatchNorm`` + ``Activation(relu)``
    The fused float32 operator has no INT8 kernel; as two operators after a convolution they fold
    into it (convolution + BatchNorm + ReLU).
``BatchNorm`` after a ``Concat`` → a depthwise 1x1 ``Convolution``
    DenseNet's pre-activation BatchNorm on each growing concatenation follows no convolution to
    fold into, and MXNet quantizes no BatchNorm there. A BatchNorm in inference is a per-channel
    ``w * x + b`` (``w = gamma / sqrt(var + eps)``, ``b = beta - mean * w``), which is a
    depthwise 1x1 convolution; that, and the ReLU after it, run in INT8.

ResNet v2's pre-activation BatchNorm after a residual sum or a pooling is left alone: MXNet has an
INT8 BatchNorm for it, and as a convolution (``bn_after``, the ``preact`` lever of
bench/bench_int8_peers.py) the Xvision trunk ran faster but with a larger feature error
(docs/BENCHMARKS.md, "Levers").
"""
import json

import mxnet as mx
import numpy as np

__all__ = ["int8_ready"]


#: The operators after which a BatchNorm becomes a depthwise convolution.
BN_AFTER = ("Concat",)


def int8_ready(sym, arg_params, aux_params, bn_after=BN_AFTER):
    """``(symbol, arg_params, aux_params, counts)``: the same network for the INT8 pass.

    ``bn_after``: the operators after which a BatchNorm (+ ReLU) becomes a depthwise convolution.
    ``counts`` says how many nodes each rewrite changed (``relu``, ``bn_relu``, ``bn_as_conv``);
    when none, ``sym`` itself is returned. The inputs are not modified."""
    graph = json.loads(sym.tojson())
    old = graph["nodes"]
    arg, aux = dict(arg_params), dict(aux_params)
    nodes, remap = [], {}  # remap[old node id] = new node id of its output 0
    counts = {"relu": 0, "bn_relu": 0, "bn_as_conv": 0}

    def add(node):
        nodes.append(node)
        return len(nodes) - 1

    def entry(e):
        if e[0] not in remap:  # variables are copied where first used: a folded BatchNorm's are not
            remap[e[0]] = add(dict(old[e[0]]))
        return [remap[e[0]], e[1], e[2]]

    def relu_after(src, name):
        return add({"op": "Activation", "name": name, "attrs": {"act_type": "relu"},
                    "inputs": [src]})

    for i, node in enumerate(old):
        op, attrs = node["op"], node.get("attrs", {})
        if op == "null":
            continue
        if op == "relu":
            counts["relu"] += 1
            remap[i] = relu_after(entry(node["inputs"][0]), node["name"])
            continue
        if op in ("BatchNorm", "_contrib_BatchNormWithReLU") and _from(old, node) in bn_after \
                and attrs.get("output_mean_var", "False") == "False":
            counts["bn_as_conv"] += 1
            conv = _bn_as_conv(node, old, arg, aux, add, entry)
            remap[i] = relu_after([conv, 0, 0], node["name"] + "_relu") if op != "BatchNorm" else conv
            continue
        if op == "_contrib_BatchNormWithReLU":
            counts["bn_relu"] += 1
            bn = add(dict(node, op="BatchNorm", name=node["name"] + "_bn",
                          inputs=[entry(e) for e in node["inputs"]]))
            remap[i] = relu_after([bn, 0, 0], node["name"])
            continue
        remap[i] = add(dict(node, inputs=[entry(e) for e in node.get("inputs", [])]))
    if not any(counts.values()):
        return sym, arg, aux, counts  # the very same graph (the Xvision trunk's case)
    out = {"nodes": nodes, "arg_nodes": [k for k, n in enumerate(nodes) if n["op"] == "null"],
           "heads": [entry(h) for h in graph["heads"]], "attrs": graph.get("attrs", {})}
    return mx.sym.load_json(json.dumps(out)), arg, aux, counts


def _from(old, node):
    """The operator whose output is the node's data input."""
    return old[node["inputs"][0][0]]["op"]


def _bn_as_conv(node, old, arg, aux, add, entry):
    """Add the depthwise 1x1 convolution equal to the inference BatchNorm ``node``; its id."""
    attrs = node.get("attrs", {})
    if int(attrs.get("axis", 1)) != 1:
        raise ValueError(f"{node['name']}: BatchNorm over axis {attrs['axis']} is not a convolution")
    gamma_name, beta_name, mean_name, var_name = (old[e[0]]["name"] for e in node["inputs"][1:5])
    gamma = arg.pop(gamma_name).asnumpy().astype(np.float64)
    beta = arg.pop(beta_name).asnumpy().astype(np.float64)
    mean = aux.pop(mean_name).asnumpy().astype(np.float64)
    var = aux.pop(var_name).asnumpy().astype(np.float64)
    if attrs.get("fix_gamma", "True") == "True":  # MXNet's default: gamma is 1, whatever is stored
        gamma = np.ones_like(gamma)
    scale = gamma / np.sqrt(var + float(attrs.get("eps", 1e-3)))
    channels = scale.shape[0]
    name = node["name"] + "_conv"
    arg[name + "_weight"] = mx.nd.array(scale.reshape(channels, 1, 1, 1), dtype=np.float32)
    arg[name + "_bias"] = mx.nd.array(beta - mean * scale, dtype=np.float32)
    weight = add({"op": "null", "name": name + "_weight", "inputs": []})
    bias = add({"op": "null", "name": name + "_bias", "inputs": []})
    return add({"op": "Convolution", "name": name,
                "attrs": {"kernel": "(1, 1)", "num_filter": str(channels), "num_group": str(channels),
                          "no_bias": "False"},
                "inputs": [entry(node["inputs"][0]), [weight, 0, 0], [bias, 0, 0]]})
