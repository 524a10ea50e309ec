"""The float32 graph re-expressed for MXNet's INT8 pass (mxvision.features.int8_graph).

Small torchxrayvision-style networks (the ports' own classes, fewer layers) with random BatchNorm
statistics: the rewrite keeps their float32 outputs, and after quantization no BatchNorm or ReLU
is left in float32 between a dequantize and a quantize (what made INT8 slower than float32)."""
import json

import mxnet as mx
import numpy as np
import pytest

from mxvision.features.int8_graph import batchnorms_as_convs, fold_preact, int8_ready, unfuse_relu
from mxvision.models.xrv.densenet import XRVDenseNet
from mxvision.models.xrv.resnet import XRVResNet
from support.graphs import random_batchnorm, symbol_ops


def _exported(net, tmp_path, size=64):
    """The network with random weights and BatchNorm statistics, exported: (sym, arg, aux, input)."""
    net.init_random(mx.cpu())
    rs = np.random.RandomState(0)
    random_batchnorm(net, rs)
    x = mx.nd.array(rs.uniform(-1024, 1024, (4, 1, size, size)))
    net.hybridize()
    net(x).wait_to_read()
    net.export(str(tmp_path / "net"), 0)
    sym, arg, aux = mx.model.load_checkpoint(str(tmp_path / "net"), 0)
    return sym, arg, aux, x


def _run(sym, arg, aux, x):
    exe = sym.bind(mx.cpu(), {**arg, "data": x}, aux_states=aux, grad_req="null")
    return exe.forward(is_train=False)[0].asnumpy()


def _small_densenet():
    return XRVDenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2)


@pytest.mark.parametrize("make, expected", [
    # DenseNet: norm1 of the 4 layers (the first of each block follows a pooling, the others a
    # Concat) and norm2 (after a convolution); the transition and norm5 follow a Concat
    (_small_densenet, {"relu": 1, "bn_relu": 4 + 2, "bn_as_conv": 2 + 1 + 1,
                     "bn_folded": 0}),
    # the ResNet port: its ReLUs are Activation already, so nothing to rewrite
    (lambda: XRVResNet(layers=(1, 1, 1, 1)), {"relu": 0, "bn_relu": 0, "bn_as_conv": 0,
                                              "bn_folded": 0}),
])
def test_rewrite_keeps_the_float32_outputs(make, expected, tmp_path):
    sym, arg, aux, x = _exported(make(), tmp_path)
    assert "_contrib_BatchNormWithReLU" in symbol_ops(sym) or expected["bn_relu"] == 0  # fused on a CPU
    before = _run(sym, arg, aux, x)
    sym2, arg2, aux2, counts = int8_ready(sym, arg, aux)
    assert counts == expected
    ops = symbol_ops(sym2)
    assert "relu" not in ops and "_contrib_BatchNormWithReLU" not in ops
    graph = json.loads(sym2.tojson())["nodes"]
    after_concat = [n for n in graph if n["op"] == "BatchNorm" and graph[n["inputs"][0][0]]["op"] == "Concat"]
    assert after_concat == []
    assert set(sym2.list_arguments()) - {"data"} == set(arg2)  # folded BatchNorms' parameters gone
    assert set(sym2.list_auxiliary_states()) == set(aux2)
    after = _run(sym2, arg2, aux2, x)
    scale = np.abs(before).max()
    assert scale > 0 and np.abs(after - before).max() <= 1e-5 * scale
    assert set(arg) >= set(arg2) - {k for k in arg2 if k.endswith(("_conv_weight", "_conv_bias"))}


def test_a_graph_with_nothing_to_rewrite_is_returned_as_it_is(tmp_path):
    data = mx.sym.var("data")
    sym = mx.sym.Activation(mx.sym.Convolution(data, kernel=(3, 3), num_filter=4, name="c"),
                            act_type="relu", name="r")
    out, arg, aux, counts = int8_ready(sym, {}, {})
    assert out is sym and not any(counts.values())


def test_quantized_densenet_runs_wholly_in_int8(tmp_path):
    """The point of the rewrite: MXNet's INT8 pass leaves no float32 BatchNorm or ReLU behind, so
    the network is quantized once at its input and stays INT8 to its classifier."""
    from mxnet.contrib.quantization import quantize_model_mkldnn

    sym, arg, aux, x = _exported(_small_densenet(), tmp_path)

    def quantized(s, a, b):
        calib = mx.io.NDArrayIter(data=x.asnumpy(), batch_size=4)
        return quantize_model_mkldnn(s, a, b, ctx=mx.cpu(), calib_mode="naive", calib_data=calib,
                                     num_calib_examples=4, quantized_dtype="auto",
                                     quantize_mode="smart", label_names=None, logger=None)

    plain = symbol_ops(quantized(sym, arg, aux)[0])
    assert plain.count("_contrib_dequantize") > 2  # as it was: float32 islands between INT8 convolutions
    qsym, qarg, qaux = quantized(*int8_ready(sym, arg, aux)[:3])
    ops = symbol_ops(qsym)
    # quantized once at the input; the classifier's INT8 FullyConnected gives float32 itself
    assert ops.count("_contrib_quantize_v2") == 1 and ops.count("_contrib_dequantize") == 0, ops
    assert not {"BatchNorm", "relu", "Activation", "_contrib_BatchNormWithReLU"} & set(ops), ops
    assert "_contrib_quantized_concat" in ops
    ref = _run(sym, arg, aux, x)
    out = _run(qsym, qarg, qaux, x)
    corr = np.corrcoef(out.ravel(), ref.ravel())[0, 1]
    assert corr > 0.9, corr  # INT8, calibrated on these inputs: close, not equal


def test_convert_passes_the_quantizer_options_a_bench_tries():
    """``quantize.convert(..., **options)``: the convolution named in ``excluded_sym_names`` stays
    float32 (oneDNN still fuses it with its BatchNorm and ReLU); without it every one is INT8."""
    from mxvision.features import quantize

    net = _small_densenet()
    net.init_random(mx.cpu())
    x = np.random.RandomState(1).uniform(-1024, 1024, (4, 1, 64, 64)).astype(np.float32)
    net.hybridize()
    net(mx.nd.array(x))

    def quantized_flags(**options):
        sym = quantize.convert(net, "int8", mx.cpu(), "xrv224", x, calib_mode="naive", **options)[0]
        return [n.get("attrs", {}).get("quantized") == "true"
                for n in json.loads(sym.tojson())["nodes"] if n["op"] == "_sg_mkldnn_conv"]

    every = quantized_flags()
    assert len(every) > 5 and all(every)
    assert quantized_flags(excluded_sym_names=["%sfeatures_conv0_fwd" % net.prefix]) == [False] + every[1:]


def _resnet_v2(tmp_path, negative_gamma=None):
    """A small Gluon ResNet v2 (the Xvision trunk's family: 3, 2, 1 and 1 units, so a residual
    stream runs through three sums in the first stage) with random BatchNorms, exported; with
    ``negative_gamma`` (a parameter name without the net's prefix), that BatchNorm's first channel
    gets a negative gamma."""
    from mxnet.gluon.model_zoo import vision
    net = vision.ResNetV2(vision.BasicBlockV2, [3, 2, 1, 1], [8, 8, 16, 32, 64], thumbnail=True)
    net.initialize(mx.init.Xavier())
    rs = np.random.RandomState(0)
    x = mx.nd.array(rs.uniform(-1, 1, (4, 3, 32, 32)))
    net(x)
    random_batchnorm(net, rs)
    if negative_gamma:
        gamma = net.collect_params()[net.prefix + negative_gamma]
        gamma.set_data(gamma.data() * mx.nd.array([-1] + [1] * (gamma.shape[0] - 1)))
    net.hybridize()
    net(x)
    net.export(str(tmp_path / "resnet"), 0)
    return (*mx.model.load_checkpoint(str(tmp_path / "resnet"), 0), x)


def _bn_after_sum(sym):
    nodes = json.loads(sym.tojson())["nodes"]
    return [n["name"] for n in nodes
            if n["op"] == "BatchNorm" and nodes[n["inputs"][0][0]]["op"] == "elemwise_add"]


def test_fold_preact_keeps_the_float32_outputs(tmp_path):
    """The net has 7 BatchNorms after a residual sum (6 units' first and the final one): the 3
    whose sum goes on to the next unit fold (two of them in a row: the second unit's convolution
    takes the first shift out and puts its own in); after the last unit of a stage (its sum feeds
    only the BatchNorm) and at the end (no convolution after it) they stay."""
    sym, arg, aux, x = _resnet_v2(tmp_path)
    before = _run(sym, arg, aux, x)
    sym2, arg2, aux2, folded = fold_preact(sym, arg, aux)
    assert folded == 3 and len(_bn_after_sum(sym)) == 7 and len(_bn_after_sum(sym2)) == 4
    # what the INT8 conversion does by default; fold=False leaves the graph as it is
    assert int8_ready(sym, arg, aux)[3] == {"relu": 0, "bn_relu": 0, "bn_as_conv": 0, "bn_folded": 3}
    assert int8_ready(sym, arg, aux, fold=False)[0] is sym
    assert set(sym2.list_arguments()) - {"data"} == set(arg2)
    assert set(sym2.list_auxiliary_states()) == set(aux2)
    after = _run(sym2, arg2, aux2, x)
    scale = np.abs(before).max()
    assert scale > 0 and np.abs(after - before).max() <= 1e-5 * scale
    # MXNet's INT8 pass then has 3 fewer INT8 BatchNorms to run
    from mxnet.contrib.quantization import quantize_model_mkldnn

    def int8_batchnorms(s, a, b):
        calib = mx.io.NDArrayIter(data=x.asnumpy(), batch_size=4)
        qsym = quantize_model_mkldnn(s, a, b, ctx=mx.cpu(), calib_mode="naive", calib_data=calib,
                                     num_calib_examples=4, quantized_dtype="auto",
                                     quantize_mode="smart", label_names=None, logger=None)[0]
        return symbol_ops(qsym).count("_contrib_quantized_batch_norm")
    assert int8_batchnorms(sym2, arg2, aux2) == int8_batchnorms(sym, arg, aux) - 3


def test_fold_preact_leaves_a_batchnorm_with_a_negative_scale(tmp_path):
    """relu(w * s + b) is w * relu(s + b / w) only where w > 0: that BatchNorm stays, and the
    output is still the same."""
    sym, arg, aux, x = _resnet_v2(tmp_path)
    kept = _bn_after_sum(fold_preact(sym, arg, aux)[0])
    foldable = [n.split("_", 1)[1] for n in _bn_after_sum(sym) if n not in kept]  # without the net's prefix
    sym, arg, aux, x = _resnet_v2(tmp_path, negative_gamma=foldable[1].replace("_fwd", "_gamma"))
    sym2, arg2, aux2, folded = fold_preact(sym, arg, aux)
    assert folded == 2 and any(n.endswith(foldable[1]) for n in _bn_after_sum(sym2))
    before, after = _run(sym, arg, aux, x), _run(sym2, arg2, aux2, x)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()


def test_fold_preact_at_stage_ends_too(tmp_path):
    """``stage_ends=True`` (a bench lever) also folds the 3 BatchNorms after the last unit of a
    stage, whose sum feeds only them; the final one stays (no convolution after it). Same outputs."""
    sym, arg, aux, x = _resnet_v2(tmp_path)
    sym2, arg2, aux2, folded = fold_preact(sym, arg, aux, stage_ends=True)
    assert folded == 6 and len(_bn_after_sum(sym2)) == 1
    before, after = _run(sym, arg, aux, x), _run(sym2, arg2, aux2, x)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()


def test_batchnorms_as_convs_leaves_the_output_batchnorm_unless_asked(tmp_path):
    """The net cut after its final BatchNorm + ReLU, as the Xvision trunk is: after the fold, the 3
    stage-end BatchNorms and the final one follow a sum. The 3 become depthwise convolutions, the
    final one too with ``tail=True``; the outputs stay the same, and with nothing to convert (this
    net has no pooling before a BatchNorm) the graph is returned."""
    sym, arg, aux, x = _resnet_v2(tmp_path)
    sym = sym.get_internals()[[n for n in sym.get_internals().list_outputs() if n.endswith("_relu0_fwd_output")][0]]
    arg = {k: v for k, v in arg.items() if k in sym.list_arguments()}
    sym, arg, aux, _ = fold_preact(sym, arg, aux)
    before = _run(sym, arg, aux, x)
    for tail, count in ((False, 3), (True, 4)):
        sym2, arg2, aux2, n = batchnorms_as_convs(sym, arg, aux, after=("elemwise_add",), tail=tail)
        assert n == count and len(_bn_after_sum(sym2)) == 4 - count
        assert symbol_ops(sym2).count("BatchNorm") == symbol_ops(sym).count("BatchNorm") - count
        assert set(sym2.list_arguments()) - {"data"} == set(arg2)
        after = _run(sym2, arg2, aux2, x)
        assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
    assert batchnorms_as_convs(sym, arg, aux, after=("Pooling",))[::3] == (sym, 0)


def test_fold_preact_without_residual_sums_returns_the_graph(tmp_path):
    sym, arg, aux, _ = _exported(_small_densenet(), tmp_path)
    out, arg2, aux2, folded = fold_preact(sym, arg, aux)
    assert out is sym and folded == 0 and arg2 == arg and aux2 == aux


def _chain():
    """A residual unit and a plain convolution after it, with parameters and an input; oneDNN fuses
    each convolution with its BatchNorm, ``a`` and ``c`` with their ReLU, ``b`` with the sum::

        data -> a (+BN, ReLU) -> b (+BN) + shortcut(data) -> ReLU -> c (+BN, ReLU) -> d -> pooling

    ``a`` feeds a convolution with a sum; ``c`` one without."""
    rs = np.random.RandomState(0)
    data = mx.sym.var("data")

    def conv_bn(x, name, kernel=1, relu=True):
        y = mx.sym.Convolution(x, kernel=(kernel, kernel), pad=(kernel // 2,) * 2, num_filter=16, no_bias=True,
                               name=name)
        y = mx.sym.BatchNorm(y, fix_gamma=False, name=name + "_bn")
        return mx.sym.Activation(y, act_type="relu", name=name + "_relu") if relu else y

    shortcut = mx.sym.Convolution(data, kernel=(1, 1), num_filter=16, no_bias=True, name="s")
    unit = mx.sym.Activation(conv_bn(conv_bn(data, "a"), "b", 3, relu=False) + shortcut, act_type="relu",
                             name="unit_relu")
    d = mx.sym.Convolution(conv_bn(unit, "c", 3), kernel=(1, 1), num_filter=16, no_bias=True, name="d")
    sym = mx.sym.Pooling(d, kernel=(2, 2), stride=(2, 2), pool_type="max", name="pool")
    arg, aux = {}, {}
    for name in sym.list_arguments():
        if name.endswith("_weight"):
            arg[name] = rs.normal(0, 0.3 if name[0] in "asd" else 0.1, (16, 8 if name[0] in "as" else 16, 3 if name[0] in "bc" else 1, 3 if name[0] in "bc" else 1))
        elif name.endswith("_gamma"):
            arg[name] = rs.uniform(0.5, 1.5, 16)
        elif name.endswith("_beta"):
            arg[name] = rs.normal(0, 0.5, 16)
    for name in sym.list_auxiliary_states():
        aux[name] = rs.normal(0, 0.5, 16) if name.endswith("mean") else rs.uniform(0.5, 2, 16)
    to_nd = lambda d: {k: mx.nd.array(v) for k, v in d.items()}  # noqa: E731
    return sym, to_nd(arg), to_nd(aux), mx.nd.array(rs.uniform(-1, 1, (8, 8, 16, 16)))


def test_unfuse_relu_takes_the_relu_out_of_a_convolution_before_a_residual_sum():
    sym, arg, aux, x = _chain()
    fused = sym.get_backend_symbol("MKLDNN_QUANTIZE")
    unfused, count = unfuse_relu(fused)
    assert count == 1
    nodes = json.loads(unfused.tojson())["nodes"]
    convs = {n["subgraphs"][0]["nodes"][2]["name"]: n for n in nodes if n["op"] == "_sg_mkldnn_conv"}
    assert sorted(convs) == ["a", "b", "c", "d", "s"]
    # a, before b's sum, loses its ReLU; c, before d (no sum), keeps it
    assert {k: n.get("attrs", {}).get("with_act") for k, n in convs.items()} == \
        {"a": None, "b": None, "c": "true", "d": None, "s": None}
    assert convs["b"]["attrs"]["with_sum"] == "true"
    relu = [n for n in nodes if n["op"] == "Activation"]
    assert len(relu) == 1 and relu[0]["name"] == "a_relu" and nodes[relu[0]["inputs"][0][0]] is convs["a"]
    assert [n["op"] for n in convs["a"]["subgraphs"][0]["nodes"] if n["op"] != "null"] == ["Convolution", "BatchNorm"]
    want = _run(sym, arg, aux, x)
    assert np.abs(_run(unfused, arg, aux, x) - want).max() <= 1e-5 * np.abs(want).max()
    assert unfuse_relu(unfused) == (unfused, 0)  # nothing left to take out: the graph itself


def test_without_the_relu_fused_the_next_convolution_reads_int8(tmp_path):
    """Why unfuse_relu exists: MXNet types a fused ReLU's output u8 and an INT8 ReLU's s8, and
    oneDNN chooses the next convolution's kernel by its input's type (DNNL_VERBOSE shows it): b,
    the convolution with the sum, reads s8 once ``a`` has no ReLU fused."""
    import os
    import subprocess
    import sys
    from collections import Counter

    from mxvision.features import quantize
    sym, arg, aux, x = _chain()
    for unfuse in (False, True):
        qsym, qarg, qaux, record = quantize.calibrate(sym, arg, aux, x.asnumpy(), unfuse=unfuse)
        assert record["relu_unfused"] == int(unfuse)
        assert symbol_ops(qsym).count("_contrib_quantized_act") == int(unfuse)
        out = _run(qsym, qarg, qaux, x)
        want = _run(sym, arg, aux, x)
        assert np.corrcoef(out.ravel(), want.ravel())[0, 1] > 0.95
        qsym.save(str(tmp_path / f"q{int(unfuse)}-symbol.json"))
        mx.nd.save(str(tmp_path / f"q{int(unfuse)}.params"), {**{"arg:" + k: v for k, v in qarg.items()},
                                                              **{"aux:" + k: v for k, v in qaux.items()}})
    mx.nd.save(str(tmp_path / "x.nd"), [x])
    run = ("import sys, mxvision, mxnet as mx\n"
           "sym, p = mx.sym.load(sys.argv[1] + '-symbol.json'), mx.nd.load(sys.argv[1] + '.params')\n"
           "arg = {k[4:]: v for k, v in p.items() if k.startswith('arg:')}\n"
           "aux = {k[4:]: v for k, v in p.items() if k.startswith('aux:')}\n"
           "arg['data'] = mx.nd.load(sys.argv[2])[0]\n"
           "sym.bind(mx.cpu(), arg, aux_states=aux, grad_req='null').forward()[0].wait_to_read()\n")
    sources = {}
    for unfuse in (0, 1):
        out = subprocess.run([sys.executable, "-c", run, str(tmp_path / f"q{unfuse}"), str(tmp_path / "x.nd")],
                             capture_output=True, text=True, env={**os.environ, "DNNL_VERBOSE": "1"},
                             check=True).stdout
        convs = [line.split(",") for line in out.splitlines()
                 if line.startswith("dnnl_verbose,exec") and ",convolution," in line]
        # each convolution's problem (its shapes) and input type
        sources[unfuse] = Counter((f[-2], f[6].split()[0].split(":")[0]) for f in convs)
    assert sum(sources[0].values()) == sum(sources[1].values()) == 5
    # one convolution changed: a 3x3 one (b or c) read u8, now s8
    assert [(p, t) for p, t in sources[0] - sources[1]] == [(p, "src_u8") for p, t in sources[1] - sources[0]]
    assert [(("kh3" in p), t) for p, t in sources[1] - sources[0]] == [(True, "src_s8")], sources
