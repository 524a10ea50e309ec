"""A float32 graph re-expressed so that MXNet 1.9.1's INT8 pass quantizes all of it.

The same function, written with the operators the oneDNN quantization flow
(:func:`mxnet.contrib.quantization.quantize_model_mkldnn`) knows how to fuse. Without this, the
torchxrayvision ports ran *slower* in INT8 than in float32 (docs/BENCHMARKS_XRV.md): every
BatchNorm + ReLU the pass cannot handle stays float32 between a dequantize and a quantize.

Four rewrites, each exact in float32 (checked in tests/features/test_int8_graph.py):

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

ResNet v2's pre-activation BatchNorm + ReLU after a residual sum
    MXNet runs it as a stand-alone INT8 BatchNorm (8% of the Xvision trunk's oneDNN time in INT8 on
    an AVX2 CPU, 17% with VNNI). :func:`fold_preact` folds it away where that is exact: its scale into the
    convolutions after it, its shift into the residual stream; a ReLU is left (10 of the trunk's
    14). Re-expressed as a depthwise convolution instead (``bn_after``, the ``preact`` lever of
    bench/bench_int8_peers.py), the trunk ran faster with VNNI but with a larger feature error
    (docs/BENCHMARKS.md, "Levers").

And one rewrite of the graph MXNet's oneDNN passes have already fused, :func:`unfuse_relu`, which
is not a float32 rewrite but a choice of oneDNN kernels (quantize.unfuse_relu_pays says where).
"""
import json

import mxnet as mx
import numpy as np

__all__ = ["int8_ready", "fold_preact", "unfuse_relu", "batchnorms_as_convs"]


#: The operators after which a BatchNorm becomes a depthwise convolution.
BN_AFTER = ("Concat",)


def int8_ready(sym, arg_params, aux_params, bn_after=BN_AFTER, fold=True):
    """``(symbol, arg_params, aux_params, counts)``: the same network for the INT8 pass.

    ``bn_after``: the operators after which a BatchNorm (+ ReLU) becomes a depthwise convolution.
    ``fold``: then fold ResNet v2's pre-activation BatchNorms away (:func:`fold_preact`).
    ``counts`` says how many nodes each rewrite changed (``relu``, ``bn_relu``, ``bn_as_conv``,
    ``bn_folded``); when none, ``sym`` itself is returned. The inputs are not modified."""
    graph = json.loads(sym.tojson())
    old = graph["nodes"]
    arg, aux = dict(arg_params), dict(aux_params)
    remap, add, entry, finish = _rebuild(graph)
    counts = {"relu": 0, "bn_relu": 0, "bn_as_conv": 0}

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
    if any(counts.values()):
        sym = finish()
    counts["bn_folded"] = 0
    if fold:
        sym, arg, aux, counts["bn_folded"] = fold_preact(sym, arg, aux)
    return sym, arg, aux, counts  # the very same ``sym`` when nothing changed


def _rebuild(graph):
    """What a rewrite builds a new graph with, node by node from the old ``graph`` (JSON):
    ``(remap, add, entry, finish)``. ``remap[old id]`` is the new id of an old node's output 0;
    ``add(node)`` appends a node and gives its id; ``entry(old entry)`` gives the new entry, copying
    an unmapped old node (a variable) where it is first used, so a folded BatchNorm's are dropped;
    ``finish()`` gives the symbol."""
    old, nodes, remap = graph["nodes"], [], {}

    def add(node):
        nodes.append(node)
        return len(nodes) - 1

    def entry(e):
        if e[0] not in remap:
            remap[e[0]] = add(dict(old[e[0]]))
        return [remap[e[0]], e[1], e[2]]

    def finish():
        heads = [entry(h) for h in graph["heads"]]
        out = {"nodes": nodes, "arg_nodes": [k for k, n in enumerate(nodes) if n["op"] == "null"],
               "heads": heads, "attrs": graph.get("attrs", {})}
        return mx.sym.load_json(json.dumps(out))
    return remap, add, entry, finish


def _parsed(sym):
    """``(graph, nodes, consumers, heads)`` of a symbol's JSON graph: ``consumers[id]`` lists the
    nodes that read node ``id``; ``heads`` holds the ids of the graph's outputs."""
    graph = json.loads(sym.tojson())
    consumers = {}
    for i, node in enumerate(graph["nodes"]):
        for e in node.get("inputs", []):
            consumers.setdefault(e[0], []).append(i)
    return graph, graph["nodes"], consumers, {h[0] for h in graph["heads"]}


def _from(old, node):
    """The operator whose output is the node's data input."""
    return old[node["inputs"][0][0]]["op"]


def _bn_as_conv(node, old, arg, aux, add, entry):
    """Add the depthwise 1x1 convolution equal to the inference BatchNorm ``node``; its id."""
    attrs = node.get("attrs", {})
    if int(attrs.get("axis", 1)) != 1:
        raise ValueError(f"{node['name']}: BatchNorm over axis {attrs['axis']} is not a convolution")
    scale, shift = _affine(node, old, arg, aux)
    _drop_params(node, old, arg, aux)
    channels = scale.shape[0]
    name = node["name"] + "_conv"
    arg[name + "_weight"] = mx.nd.array(scale.reshape(channels, 1, 1, 1), dtype=np.float32)
    arg[name + "_bias"] = mx.nd.array(shift, dtype=np.float32)
    weight = add({"op": "null", "name": name + "_weight", "inputs": []})
    bias = add({"op": "null", "name": name + "_bias", "inputs": []})
    return add({"op": "Convolution", "name": name,
                "attrs": {"kernel": "(1, 1)", "num_filter": str(channels), "num_group": str(channels),
                          "no_bias": "False"},
                "inputs": [entry(node["inputs"][0]), [weight, 0, 0], [bias, 0, 0]]})


def fold_preact(sym, arg_params, aux_params, stage_ends=False):
    """``(symbol, arg_params, aux_params, folded)``: ResNet v2's pre-activation BatchNorms after the
    residual sums folded away, the same function up to float32 rounding; ``folded`` counts them.

    After each residual sum ``s`` a unit computes ``relu(w * s + b)`` (its BatchNorm, per channel)
    and feeds it to convolutions. Where every ``w > 0`` that is ``w * relu(s + b / w)``: ``w`` goes
    into the input channels of those convolutions, and ``b / w`` into the residual stream itself,
    as a bias of the convolution summed into it (each later sum takes the shift back out, so every
    sum whose BatchNorm stays sees its true value). What is left is a ReLU, so MXNet's INT8 pass
    has no stand-alone BatchNorm to run there (10 of the Xvision trunk's 14).

    A BatchNorm stays where that would not be exact: a ``w <= 0`` channel, a consumer that is not a
    plain convolution, or a sum with no convolution of its own to carry the shift. It also stays
    after a sum that feeds nothing else (the last unit of a stage): there MXNet's INT8 pass would
    fuse the ReLU left into the summing convolution, which lost accuracy; ``stage_ends=True`` folds
    those too (a lever of bench/bench_int8_variants.py, not the conversion). The inputs are not
    modified."""
    graph, old, consumers, heads = _parsed(sym)
    arg, aux = dict(arg_params), dict(aux_params)

    def own_conv(add_id):
        """The convolution summed by ``add_id`` that feeds nothing else and has no bias yet (it can
        carry the shift), or None."""
        for e in old[add_id]["inputs"]:
            src = old[e[0]]
            if src["op"] == "Convolution" and consumers.get(e[0]) == [add_id] and e[0] not in heads \
                    and src.get("attrs", {}).get("no_bias", "False") == "True" \
                    and src["name"] + "_bias" not in arg:
                return e[0]
        return None

    def scalable(conv, relu):
        """Whether ``conv`` is a plain 2-D convolution of ``relu`` whose own weights can take the
        BatchNorm's scale on their input channels."""
        node = old[conv]
        weight = node["inputs"][1][0] if len(node["inputs"]) > 1 else None
        return node["op"] == "Convolution" and node["inputs"][0][0] == relu \
            and int(node["attrs"].get("num_group", 1)) == 1 and len(_shape(node["attrs"]["kernel"])) == 2 \
            and weight is not None and old[weight]["op"] == "null" and old[weight]["name"] in arg \
            and consumers.get(weight) == [conv]

    # which BatchNorms fold: their affine part and the shift each residual sum carries
    fold, shift = {}, {}  # fold[bn id] = (relu id, w, b/w); shift[sum id] = b/w
    for i, node in enumerate(old):
        attrs = node.get("attrs", {})
        if node["op"] != "BatchNorm" or old[node["inputs"][0][0]]["op"] != "elemwise_add" \
                or attrs.get("output_mean_var", "False") != "False" or int(attrs.get("axis", 1)) != 1:
            continue
        add_id = node["inputs"][0][0]
        users = consumers.get(i, [])
        if len(users) != 1 or i in heads or own_conv(add_id) is None:
            continue
        relu = users[0]
        if old[relu]["op"] != "Activation" or old[relu]["attrs"].get("act_type") != "relu" or relu in heads:
            continue
        convs = consumers.get(relu, [])
        if not convs or not all(scalable(c, relu) for c in convs):
            continue
        others = [u for u in consumers[add_id] if u != i]
        if add_id in heads or (not others and not stage_ends) \
                or any(old[u]["op"] != "elemwise_add" or own_conv(u) is None for u in others):
            # the shifted stream would reach something that cannot take the shift out; or the sum
            # feeds only this BatchNorm (the unit before a downsampling one), where MXNet 1.9.1's
            # INT8 pass would fuse the ReLU left into the summing convolution, u8 out: that lost
            # accuracy (the random-weight trunk of bench/bench_int8_peers.py with those 3 folded
            # too: feature error 0.091 against 0.076, naive calibration, 2026-12-07)
            continue
        w, b = _affine(node, old, arg, aux)
        if not np.all(w > 0):
            continue
        fold[i] = (relu, w, b / w)
        shift[add_id] = b / w
    if not fold:
        return sym, arg, aux, 0
    # the bias each sum's own convolution gets: its shift, minus the shift of the sum it adds to
    bias = {}
    for add_id, node in enumerate(old):
        if node["op"] != "elemwise_add":
            continue
        delta = shift.get(add_id, 0.0) - sum((shift[e[0]] for e in node["inputs"] if e[0] in shift), 0.0)
        if np.any(delta != 0):
            conv = own_conv(add_id)
            bias[conv] = np.broadcast_to(delta, (int(old[conv]["attrs"]["num_filter"]),))
    scale = {c: w for relu, w, _ in fold.values() for c in consumers[relu]}
    for bn in fold:
        _drop_params(old[bn], old, arg, aux)
    remap, add, entry, finish = _rebuild(graph)
    for i, node in enumerate(old):
        if node["op"] == "null":
            continue
        if i in fold:  # the ReLU reads the (shifted) sum itself
            remap[i] = entry(node["inputs"][0])[0]
            continue
        inputs = [entry(e) for e in node.get("inputs", [])]
        attrs = dict(node.get("attrs", {}))
        if i in scale:
            name = old[node["inputs"][1][0]]["name"]
            weight = arg[name].asnumpy()
            arg[name] = mx.nd.array(weight * scale[i].reshape(1, -1, 1, 1).astype(weight.dtype),
                                    dtype=weight.dtype)
        if i in bias:
            name = node["name"] + "_bias"
            arg[name] = mx.nd.array(bias[i], dtype=np.float32)
            inputs.append([add({"op": "null", "name": name, "inputs": []}), 0, 0])
            attrs["no_bias"] = "False"
        remap[i] = add(dict(node, attrs=attrs, inputs=inputs))
    return finish(), arg, aux, len(fold)


def batchnorms_as_convs(sym, arg_params, aux_params, after=("Pooling", "elemwise_add"), tail=False):
    """``(symbol, arg_params, aux_params, count)``: every inference BatchNorm whose data comes from
    one of the ``after`` operators re-expressed as a depthwise 1x1 convolution (as DenseNet's after a
    ``Concat`` in :func:`int8_ready`), the same function; ``count`` of them. The BatchNorm that feeds
    the graph's output, directly or through its ReLU, stays (MXNet's ``smart`` INT8 mode leaves it
    float32) unless ``tail``. For the levers of bench/bench_int8_variants.py: run after
    :func:`int8_ready`, on what its fold left. The inputs are not modified."""
    graph, old, consumers, heads = _parsed(sym)
    arg, aux = dict(arg_params), dict(aux_params)
    remap, add, entry, finish = _rebuild(graph)
    count = 0
    for i, node in enumerate(old):
        if node["op"] == "null":
            continue
        attrs = node.get("attrs", {})
        at_output = i in heads or any(u in heads for u in consumers.get(i, []))
        if node["op"] == "BatchNorm" and _from(old, node) in after \
                and attrs.get("output_mean_var", "False") == "False" and (tail or not at_output):
            remap[i] = _bn_as_conv(node, old, arg, aux, add, entry)
            count += 1
            continue
        remap[i] = add(dict(node, inputs=[entry(e) for e in node.get("inputs", [])]))
    return (finish() if count else sym), arg, aux, count


def _affine(node, old, arg, aux):
    """``(w, b)`` of the inference BatchNorm ``node`` (``w * x + b``), float64."""
    attrs = node.get("attrs", {})
    gamma_name, beta_name, mean_name, var_name = (old[e[0]]["name"] for e in node["inputs"][1:5])
    gamma = arg[gamma_name].asnumpy().astype(np.float64)
    if attrs.get("fix_gamma", "True") in ("True", "true", "1"):  # the default: gamma is 1, whatever is stored
        gamma = np.ones_like(gamma)
    mean = aux[mean_name].asnumpy().astype(np.float64)
    var = aux[var_name].asnumpy().astype(np.float64)
    w = gamma / np.sqrt(var + float(attrs.get("eps", 1e-3)))
    return w, arg[beta_name].asnumpy().astype(np.float64) - mean * w


def _drop_params(node, old, arg, aux):
    """Remove a BatchNorm's parameters and statistics (it is folded away)."""
    for e in node["inputs"][1:]:
        arg.pop(old[e[0]]["name"], None)
        aux.pop(old[e[0]]["name"], None)


def _shape(text):
    """``"(1, 1)"`` → ``(1, 1)``: a shape attribute of MXNet's JSON graph."""
    return tuple(int(v) for v in text.strip("()[] ").split(",") if v.strip())


def unfuse_relu(fused):
    """``(symbol, count)``: the graph ``fused`` -- what ``get_backend_symbol("MKLDNN_QUANTIZE")``
    made of a float32 graph, before ``quantize_graph`` -- with the ReLU taken back out of every
    fused convolution whose output goes only into fused convolutions *with a residual sum*, as
    their data; it becomes an ``Activation`` after it. ``count`` of them. The same function;
    ``fused`` itself when there is none.

    Why: MXNet 1.9.1 gives a convolution with a fused ReLU an unsigned (u8) output and one without
    a signed (s8) output, and its oneDNN 2.4.4 picks the *next* convolution's kernel by that type.
    On an AVX-512 VNNI CPU without AMX a u8 input gets the ``brgconv`` kernels, an s8 one the older
    ``jit_int8`` ones, and with a residual sum fused in, ``brgconv`` was slow: the Xvision trunk's
    14 such 1x1 convolutions took 30 ms per batch of 16, and one of them 4.2 ms where a projection
    of the same shape on s8, without the sum, took 1.3 ms (an AMD EPYC Zen 5; docs/BENCHMARKS.md,
    conversion version 9). Without a sum the two ran about as fast, and unfusing every
    ReLU before a convolution made the DenseNet-121 port 12% slower (many more INT8 ReLUs), so
    only the convolutions before a sum lose theirs (ResNet's bottleneck: the 3x3 one). The ReLU
    then runs as MXNet's INT8 ReLU, which keeps s8: those activations have 7 bits instead of 8."""
    graph, old, consumers, heads = _parsed(fused)

    def relu_split(node):
        """The fused node's subgraph without its final ReLU, and that ReLU's name; or None."""
        if node["op"] != "_sg_mkldnn_conv" or node.get("attrs", {}).get("with_act", "").lower() not in ("true", "1"):
            return None
        sub = json.loads(json.dumps(node["subgraphs"][0]))
        last = len(sub["nodes"]) - 1
        relu = sub["nodes"][last]
        if sub["heads"] != [[last, 0, 0]] or relu["op"] != "Activation" \
                or relu.get("attrs", {}).get("act_type") != "relu":
            return None
        sub["heads"] = [relu["inputs"][0]]
        sub["nodes"].pop()
        if "node_row_ptr" in sub:
            sub["node_row_ptr"] = sub["node_row_ptr"][:-1]
        return sub, relu["name"]

    split = {}
    for i, node in enumerate(old):
        users = consumers.get(i, [])
        if users and i not in heads and all(old[u]["op"] == "_sg_mkldnn_conv" and old[u]["inputs"][0][0] == i
                                            and old[u].get("attrs", {}).get("with_sum", "").lower() in ("true", "1")
                                            for u in users):
            parts = relu_split(node)
            if parts:
                split[i] = parts
    if not split:
        return fused, 0
    remap, add, entry, finish = _rebuild(graph)
    for i, node in enumerate(old):
        if node["op"] == "null":
            continue
        inputs = [entry(e) for e in node.get("inputs", [])]
        if i in split:
            sub, relu_name = split[i]
            attrs = {k: v for k, v in node["attrs"].items() if k != "with_act"}
            conv = add(dict(node, attrs=attrs, inputs=inputs, subgraphs=[sub]))
            remap[i] = add({"op": "Activation", "name": relu_name, "attrs": {"act_type": "relu"},
                            "inputs": [[conv, 0, 0]]})
            continue
        remap[i] = add(dict(node, inputs=inputs))
    return finish(), len(split)
