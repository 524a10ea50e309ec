"""The classic MXNet symbolic ResNet v2 checkpoint (``resnet-50-symbol.json`` + ``-0000.params``).

Xvision's original pipeline loaded MXNet's example/image-classification ResNet-50 v2 and read
``stage4_unit2_relu1_output``. This module loads that checkpoint cut at any layer as a Gluon
``SymbolBlock``, and maps parameters both ways between it and :class:`ResNetTrunk`, so the classic
weights can be fine-tuned as Gluon blocks and Gluon weights can be served the classic way.

The two graphs are the same network: classic ``bn_data`` (``fix_gamma=True`` with a beta) is
Gluon's first ``BatchNorm(scale=False, center=False)``, which also runs with ``fix_gamma=True`` and
still owns (an untrained) beta, so the mapping is exact. The one difference is BatchNorm epsilon
(classic 2e-5, model zoo 1e-5): outputs agree to float rounding only when the trunk is built with
the symbol's epsilon (:func:`trunk_from_classic` does this; :func:`classic_bn_eps` reads it).
The mapping covers bottleneck ResNet v2 (50/101/152): the classic 18/34-layer graphs have a
shortcut conv in stage1_unit1 that the Gluon nets lack, and the classic scheme has no v1.
"""
import json
from pathlib import Path

import mxnet as mx
from mxnet import gluon

from mxvision.errors import MxvisionError, WeightsError
from mxvision.models.resnet_trunk import (
    DEFAULT_ARCH, DEFAULT_CUT, ResNetTrunk, assign_checked, ctx_list, load_nd_dict, mxnet_reason)

CLASSIC_BN_EPS = 2e-5
_MXNET_DEFAULT_BN_EPS = 1e-3  # BatchNorm's eps when a symbol omits the attribute
_ADD_OPS = {"_Plus", "_plus", "elemwise_add", "broadcast_add", "_add", "ElementWiseSum",
            "add_n"}
# Gluon leaf parameter name -> (classic kind, classic suffix)
_SUFFIX = {"gamma": ("arg", "gamma"), "beta": ("arg", "beta"), "weight": ("arg", "weight"),
           "running_mean": ("aux", "moving_mean"), "running_var": ("aux", "moving_var")}
_STEM = {0: "bn_data", 1: "conv0", 2: "bn0"}
_V2_STAGE1 = 5  # features index of stage 1 in a Gluon ResNet v2


def _load_symbol(symbol_file):
    symbol_file = Path(symbol_file)
    if not symbol_file.is_file():
        raise WeightsError(symbol_file, "no such symbol file")
    try:
        return mx.sym.load(str(symbol_file))
    except mx.base.MXNetError as err:
        raise WeightsError(symbol_file, f"not an MXNet symbol file ({mxnet_reason(err)})") from None


def _nodes(sym):
    return json.loads(sym.tojson())["nodes"]


def _attrs(node):
    return node.get("attrs") or node.get("attr") or node.get("param") or {}


def classic_bn_eps(symbol):
    """The set of BatchNorm epsilons in a symbol (a Symbol or a ``-symbol.json`` path)."""
    sym = symbol if isinstance(symbol, mx.sym.Symbol) else _load_symbol(symbol)
    return {float(_attrs(n).get("eps", _MXNET_DEFAULT_BN_EPS))
            for n in _nodes(sym) if n["op"] == "BatchNorm"}


def classic_cuts(sym):
    """Cut names a classic graph offers: its ReLU nodes and its unit ends (``stageS_unitU``)."""
    nodes = _nodes(sym)
    cuts = [n["name"] for n in nodes if n["op"] == "Activation"]
    return cuts + sorted(_unit_ends(nodes))


def _unit_ends(nodes):
    """``stageS_unitU`` -> name of the add node that closes the unit (classic ``_plusN``)."""
    ends = {}
    for node in nodes:
        if node["op"] not in _ADD_OPS:
            continue
        for src, *_ in node["inputs"]:
            base, sep, layer = nodes[src]["name"].rpartition("_")
            if sep and base.startswith("stage") and layer.startswith("conv"):
                ends[base] = node["name"]
    return ends


def resolve_classic_cut(sym, cut):
    """The internal output name of ``cut`` in ``sym``: ``<cut>_output``, or for a unit end
    (``stage2_unit3``) the output of the add that closes it. Raises MxvisionError otherwise."""
    outputs = set(sym.get_internals().list_outputs())
    if f"{cut}_output" in outputs:
        return f"{cut}_output"
    end = _unit_ends(_nodes(sym)).get(cut)
    if end is not None:
        return f"{end}_output"
    cuts = classic_cuts(sym)
    shown = ", ".join(cuts[:6] + ["...", cuts[-1]]) if len(cuts) > 8 else ", ".join(cuts)
    raise MxvisionError(cut, f"no such layer in the classic symbol; valid cuts: {shown}")


def load_classic(symbol_file, params_file, cut=DEFAULT_CUT, ctx=None):
    """Load a classic symbol + params checkpoint cut at ``cut`` as a ``gluon.SymbolBlock``.

    The block's single input is ``data``; its output is the literal ``<cut>_output`` of the
    classic graph (stored as ``block.output_name``). Params are read from ``arg:``/``aux:`` keys;
    those past the cut are ignored, missing or misshapen ones raise :class:`WeightsError`.
    """
    sym = _load_symbol(symbol_file)
    try:
        out_name = resolve_classic_cut(sym, cut)
    except MxvisionError as err:
        raise WeightsError(symbol_file, f"cannot cut at {cut}: {err.problem}") from None
    net = sym.get_internals()[out_name]
    if "data" not in net.list_arguments():
        raise WeightsError(symbol_file, "the graph has no 'data' input")
    loaded = _classic_dict(load_nd_dict(params_file))
    names = [n for n in net.list_arguments() if n != "data"] + net.list_auxiliary_states()
    missing = [n for n in names if n not in loaded]
    if missing:
        raise WeightsError(params_file, f"{len(missing)} of {len(names)} parameters up to {cut} "
                           f"missing (e.g. {missing[0]})")
    arg_shapes, _, aux_shapes = net.infer_shape(data=(1, 3, 224, 224))
    expected = dict(zip(net.list_arguments() + net.list_auxiliary_states(),
                        arg_shapes + aux_shapes))
    for name in names:
        if tuple(loaded[name].shape) != tuple(expected[name]):
            raise WeightsError(params_file, f"{name} has shape {loaded[name].shape}, the symbol "
                               f"needs {tuple(expected[name])}")
    block = gluon.SymbolBlock(net, mx.sym.var("data", dtype="float32"))
    for name, param in block.collect_params().items():
        param._load_init(loaded[name], ctx_list(ctx))
    block.output_name = out_name
    return block


def _classic_dict(loaded):
    """Strip the ``arg:``/``aux:`` prefixes of a classic params dict."""
    return {k.split(":", 1)[1] if k[:4] in ("arg:", "aux:") else k: v for k, v in loaded.items()}


def _check_mappable(trunk):
    if trunk.version != 2 or trunk.depth < 50:
        raise MxvisionError(trunk.arch, "the classic naming maps only bottleneck ResNet v2 "
                            "(resnet50/101/152_v2)")


def classic_name(key, num_stages=4):
    """The classic ``arg:``/``aux:`` name of a Gluon ResNet v2 structural key.

    ``features.0.gamma`` -> ``arg:bn_data_gamma``; ``features.8.1.bn1.running_var`` ->
    ``aux:stage4_unit2_bn1_moving_var``; ``features.5.0.downsample.weight`` ->
    ``arg:stage1_unit1_sc_weight``; the BN after the last stage is ``bn1``.
    """
    parts = key.split(".")
    if parts[0] != "features" or parts[-1] not in _SUFFIX:
        raise ValueError(f"not a Gluon ResNet v2 parameter key: {key}")
    kind, suffix = _SUFFIX[parts[-1]]
    idx = int(parts[1])
    if idx in _STEM and len(parts) == 3:
        layer = _STEM[idx]
    elif idx == _V2_STAGE1 + num_stages and len(parts) == 3:
        layer = "bn1"
    elif _V2_STAGE1 <= idx < _V2_STAGE1 + num_stages and len(parts) == 5:
        sub = "sc" if parts[3] == "downsample" else parts[3]
        layer = f"stage{idx - _V2_STAGE1 + 1}_unit{int(parts[2]) + 1}_{sub}"
    else:
        raise ValueError(f"not a Gluon ResNet v2 parameter key: {key}")
    return f"{kind}:{layer}_{suffix}"


def gluon_to_classic(trunk):
    """The trunk's weights under classic names, ``{'arg:conv0_weight': NDArray, ...}`` on CPU,
    ready for ``mx.nd.save(prefix + '-0000.params', ...)``. The trunk must be initialised with
    known shapes (e.g. made by ``get_backbone``, or after one forward pass)."""
    _check_mappable(trunk)
    return {classic_name(key): param.data().copyto(mx.cpu())
            for key, param in trunk.param_keys().items()}


def classic_to_gluon(params, trunk, ctx=None):
    """Load classic weights (a params file path or an ``mx.nd.load`` dict) into ``trunk``.

    Only the layers up to the trunk's cut are read. Equality with the classic graph needs the
    trunk's epsilon to match the symbol's (see :func:`classic_bn_eps`). Returns the trunk.
    """
    _check_mappable(trunk)
    is_file = isinstance(params, (str, Path))
    subject = params if is_file else "classic params"
    loaded = _classic_dict(load_nd_dict(params) if is_file else params)
    wanted = {classic_name(k).split(":", 1)[1]: p for k, p in trunk.param_keys().items()}
    assign_checked(wanted, loaded, subject, ctx, missing=f"parameters up to {trunk.cut}", arch=trunk.arch)
    return trunk


def trunk_from_classic(symbol_file, params_file, name=DEFAULT_ARCH, cut=DEFAULT_CUT, ctx=None,
                       hybridize=True):
    """A :class:`ResNetTrunk` holding a classic checkpoint's weights, built with the symbol's
    BatchNorm epsilon so that it computes what the classic graph computes."""
    eps = classic_bn_eps(symbol_file)
    if len(eps) != 1:
        raise WeightsError(symbol_file, f"BatchNorm epsilons differ between layers ({sorted(eps)});"
                           " a ResNetTrunk has one")
    trunk = ResNetTrunk(name, cut, epsilon=eps.pop())
    classic_to_gluon(params_file, trunk, ctx)
    if hybridize:
        trunk.hybridize()
    return trunk
