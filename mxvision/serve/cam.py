"""Grad-CAM on an archive's exported graph: the symbol split at its last feature map.

An archive holds one hybridized graph (``model-symbol.json``), not the Gluon blocks
:mod:`mxvision.audit.explain` splits. This module makes the same split from the graph itself:

* the **feature map** ``A`` is the input of the first ``FullyConnected`` node, followed back
  through ``Flatten`` and global ``Pooling`` (Xvision: the backbone's cut ``stage4_unit2_relu1``,
  which the head flattens; torchxrayvision DenseNet: the ReLU after ``features``; ResNet: the last
  ``layer4`` ReLU) -- the very maps :func:`mxvision.audit.explain.cam_split` gives;
* **features**: the graph up to ``A`` (run as in inference, INT8 trunks included);
* **head**: the graph from ``A`` to the logits (before the Xvision softmax, as ``explain`` uses
  logits), with ``A`` made an input, every BatchNorm on its running statistics and every Dropout
  off -- so that the gradient, taken in training mode, is the inference network's (see
  :func:`mxvision.audit.explain.frozen_train_mode` for why training mode).

:func:`mxvision.audit.explain.grad_cam` then runs on the pair unchanged.
"""
import json
import warnings

import mxnet as mx
from mxnet import gluon

from mxvision.errors import MxvisionError

#: Name of the head graph's input (the feature map).
FEATURES_INPUT = "cam_features"
_PASS_THROUGH = ("Flatten", "flatten", "Pooling")


def find_cam_layer(graph: dict) -> str:
    """Name of the feature-map node of an exported graph (parsed ``-symbol.json``)."""
    nodes = graph["nodes"]
    for node in nodes:
        if node["op"] == "FullyConnected":
            k = node["inputs"][0][0]
            while nodes[k]["op"] in _PASS_THROUGH:
                k = nodes[k]["inputs"][0][0]
            if nodes[k]["op"] == "null":
                break
            return nodes[k]["name"]
    raise MxvisionError("model-symbol.json", "no feature map before a fully connected layer: "
                                             "Grad-CAM cannot split this graph")


def _head_graph(graph: dict, layer: str) -> dict:
    """The graph from ``layer``'s output (made an input) to the logits, pruned and renumbered."""
    nodes = [dict(n) for n in graph["nodes"]]
    by_name = {n["name"]: k for k, n in enumerate(nodes)}
    cut = by_name[layer]
    nodes[cut] = {"op": "null", "name": FEATURES_INPUT, "inputs": []}
    head = graph["heads"][0][0]
    if nodes[head]["op"] in ("softmax", "SoftmaxActivation", "log_softmax"):
        head = nodes[head]["inputs"][0][0]  # logits, as explain differentiates
    keep, stack = set(), [head]
    while stack:
        k = stack.pop()
        if k not in keep:
            keep.add(k)
            stack.extend(i[0] for i in nodes[k]["inputs"])
    order = sorted(keep)  # the node list is topologically ordered; keep that order
    new_id = {old: new for new, old in enumerate(order)}
    out = []
    for old in order:
        node = dict(nodes[old])
        node["inputs"] = [[new_id[i[0]], *i[1:]] for i in node["inputs"]]
        attrs = dict(node.get("attrs", {}))
        if node["op"] == "BatchNorm":
            attrs["use_global_stats"] = "True"
        elif node["op"] == "Dropout":
            attrs["p"] = "0.0"
        if attrs:
            node["attrs"] = attrs
        out.append(node)
    return {"nodes": out, "arg_nodes": [k for k, n in enumerate(out) if n["op"] == "null"],
            "heads": [[new_id[head], 0, 0]], "attrs": graph.get("attrs", {})}


def _block(symbol, input_name, params_file, ctx):
    with warnings.catch_warnings():  # "Cannot decide type for ...": float32
        warnings.simplefilter("ignore", UserWarning)
        block = gluon.SymbolBlock(symbol, mx.sym.var(input_name))
        block.collect_params().load(str(params_file), ctx=ctx, ignore_extra=True)
    return block


def cam_blocks(symbol_file, params_file, layer=None, ctx=None):
    """``(features, head, layer)``: two SymbolBlocks on the archive's parameters, split at
    ``layer`` (default: :func:`find_cam_layer`)."""
    ctx = ctx or mx.cpu()
    with open(symbol_file, encoding="utf-8") as f:
        graph = json.load(f)
    layer = layer or find_cam_layer(graph)
    symbol = mx.sym.load(str(symbol_file))
    internals = symbol.get_internals()
    if layer + "_output" not in internals.list_outputs():
        raise MxvisionError(str(symbol_file), f"has no layer {layer!r} to take Grad-CAM at")
    features = _block(internals[layer + "_output"], "data", params_file, ctx)
    head = _block(mx.sym.load_json(json.dumps(_head_graph(graph, layer))), FEATURES_INPUT,
                  params_file, ctx)
    return features, head, layer
