"""The truncated ResNet backbone: literal output names, full-net weights, and the classic checkpoint.

Every comparison is between two independently computed MXNet graphs on the same input: the trunk
against the un-truncated model-zoo net (read through forward hooks), and against the real classic
``resnet-50-symbol.json`` executed as a SymbolBlock. Weights are random but non-trivial (BatchNorm
gamma/beta/running stats drawn away from their init values) so a wrong mapping shows.
"""
import json
import re

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon
from mxnet.gluon.model_zoo import vision

from mxvision.errors import MxvisionError, WeightsError
from mxvision.models.classic import (
    CLASSIC_BN_EPS, classic_bn_eps, classic_to_gluon, gluon_to_classic, load_classic, trunk_from_classic)
from mxvision.models.resnet_trunk import (
    DEFAULT_CHANNELS, DEFAULT_OUTPUT, ResNetTrunk, get_backbone, valid_cuts)

TOL = 1e-5  # max |a - b| / max |b|; observed 0.0 (same ops, same order)
HE = mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2)


def rel_diff(a, b):
    a, b = a.asnumpy(), b.asnumpy()
    return float(np.abs(a - b).max() / np.abs(b).max())


def randomize_bn(params, seed):
    """Draw BatchNorm parameters and running stats away from their defaults (0/1)."""
    mx.random.seed(seed)
    for key, param in params.items():
        leaf = key.rsplit(".", 1)[-1].rsplit("_", 1)[-1]
        if leaf in ("gamma", "var"):
            param.set_data(mx.nd.random.uniform(0.5, 1.5, param.shape))
        elif leaf in ("beta", "mean"):
            param.set_data(mx.nd.random.uniform(-0.2, 0.2, param.shape))


def image(size, seed=0):
    return mx.nd.array(np.random.RandomState(seed).normal(size=(1, 3, size, size)))


def export_head(block, tmp_path, x):
    """Hybridize, run, export; return the exported graph's head node and the JSON path."""
    block.hybridize()
    block(x)
    block.export(str(tmp_path / "net"))
    graph = json.loads((tmp_path / "net-symbol.json").read_text())
    return graph["nodes"][graph["heads"][0][0]], tmp_path / "net-symbol.json"


def full_net(arch, tmp_path, seed=1):
    """A randomly initialised un-truncated model-zoo net and its save_parameters file."""
    net = vision.get_model(arch)
    mx.random.seed(seed)
    net.initialize(HE)
    # finish deferred shapes; 64 px, not 32: a 1x1 stage-4 map makes MXNet 1.9.1's oneDNN cache a
    # BatchNorm primitive that a later 2-D BatchNorm (a head's, batch 1) reuses and segfaults on
    # (see resnet_trunk.get_backbone; it crashed test_xrv_models' pipeline export run after this)
    net(image(64))
    randomize_bn(net._collect_params_with_prefix(), seed)
    path = tmp_path / f"{arch}-full.params"
    net.save_parameters(str(path))
    return net, path


def reference(net, arch, cut, x):
    """The full net's activation at ``cut``, captured with a forward hook on the layer before it."""
    version = int(arch[-1])
    feats = list(net.features._children.values())
    stem = 5 if version == 2 else 4
    if cut in ("relu0", "relu1"):
        layer, relu = feats[{("relu0", 2): 3, ("relu0", 1): 2, ("relu1", 2): 10}[cut, version]], False
    else:
        stage, unit, k = re.fullmatch(r"stage(\d+)_unit(\d+)(?:_relu(\d+))?", cut).groups()
        block = list(feats[stem + int(stage) - 1]._children.values())[int(unit) - 1]
        if k is None:
            layer, relu = block, False
        elif version == 2:
            layer, relu = getattr(block, f"bn{k}"), True
        else:
            layer, relu = list(block.body._children.values())[3 * int(k) - 1], True
    seen = []
    handle = layer.register_forward_hook(lambda blk, inp, out: seen.append(out))
    net(x)
    handle.detach()
    return mx.nd.relu(seen[0]) if relu else seen[0]


@pytest.fixture(scope="module")
def r50_full(tmp_path_factory):
    return full_net("resnet50_v2", tmp_path_factory.mktemp("r50"))


def test_default_trunk_shape_and_literal_exported_name(tmp_path):
    trunk = get_backbone(hybridize=False)
    assert (trunk.out_channels, trunk.output_name) == (DEFAULT_CHANNELS, DEFAULT_OUTPUT)
    x = image(224)
    head, sym_file = export_head(trunk, tmp_path, x)
    assert (head["name"], head["op"]) == ("stage4_unit2_relu1", "Activation")
    assert mx.sym.load(str(sym_file)).list_outputs() == ["stage4_unit2_relu1_output"]
    other = [n["name"] for n in json.loads(sym_file.read_text())["nodes"] if n["op"] != "null"]
    assert all(n.startswith(trunk.prefix) for n in other if n != "stage4_unit2_relu1")
    # the exported files are a working model that computes what the trunk computes
    served = gluon.SymbolBlock.imports(str(sym_file), ["data"], str(tmp_path / "net-0000.params"))
    out = served(x)
    assert out.shape == (1, 2048, 7, 7)
    assert rel_diff(out, trunk(x)) <= TOL


@pytest.mark.parametrize("arch,cut,size", [
    ("resnet50_v2", "stage4_unit2_relu1", 224),
    ("resnet18_v2", "relu0", 64),
    ("resnet18_v2", "stage2_unit2_relu2", 64),
    ("resnet18_v2", "relu1", 64),
    ("resnet34_v2", "stage3_unit1", 64),
    ("resnet18_v1", "stage2_unit2_relu1", 64),
    ("resnet18_v1", "stage3_unit1", 64),
    ("resnet50_v1", "stage1_unit1_relu2", 64),
])
def test_trunk_equals_full_net_activation(arch, cut, size, tmp_path, r50_full):
    net, path = r50_full if arch == "resnet50_v2" else full_net(arch, tmp_path)
    trunk = get_backbone(arch, cut, weights_file=path)
    x = image(size)
    want = reference(net, arch, cut, x)
    got = trunk(x)
    assert got.shape == want.shape and got.shape[1] == trunk.out_channels
    assert rel_diff(got, want) <= TOL
    assert export_head(trunk, tmp_path, x)[0]["name"] == cut


def test_trunk_save_parameters_round_trip(tmp_path):
    trunk = get_backbone("resnet18_v2", "stage3_unit2_relu1")
    randomize_bn(trunk.param_keys(), 3)
    trunk.save_parameters(str(tmp_path / "t.params"))
    again = get_backbone("resnet18_v2", "stage3_unit2_relu1", weights_file=tmp_path / "t.params")
    x = image(64)
    assert rel_diff(again(x), trunk(x)) == 0.0


def test_load_imagenet_refuses_files_that_do_not_fit(tmp_path, r50_full):
    with pytest.raises(WeightsError, match="no such params file"):
        ResNetTrunk().load_imagenet(tmp_path / "absent.params")
    (tmp_path / "junk.params").write_text("not a params file")
    with pytest.raises(WeightsError, match="not an MXNet params file"):
        ResNetTrunk().load_imagenet(tmp_path / "junk.params")
    loaded = mx.nd.load(str(r50_full[1]))
    del loaded["features.8.1.bn1.running_var"]
    mx.nd.save(str(tmp_path / "holed.params"), loaded)
    with pytest.raises(WeightsError, match=r"1 of 227 .*features\.8\.1\.bn1\.running_var"):
        ResNetTrunk().load_imagenet(tmp_path / "holed.params")
    loaded = mx.nd.load(str(r50_full[1]))
    loaded["features.1.weight"] = mx.nd.zeros((64, 3, 3, 3))
    mx.nd.save(str(tmp_path / "misshapen.params"), loaded)
    with pytest.raises(WeightsError, match=r"features\.1\.weight has shape \(64, 3, 3, 3\)"):
        ResNetTrunk().load_imagenet(tmp_path / "misshapen.params")
    _, r18 = full_net("resnet18_v2", tmp_path)
    with pytest.raises(WeightsError, match="resnet50_v2") as err:
        ResNetTrunk("resnet50_v2", "stage2_unit1").load_imagenet(r18)
    assert str(err.value).startswith(str(r18)) and "\n" not in str(err.value)


@pytest.mark.parametrize("arch,cut,needle", [
    ("resnet50_v2", "stage5_unit1", "S=1..4"),
    ("resnet50_v2", "stage4_unit4", "(3, 4, 6, 3)"),
    ("resnet50_v2", "stage1_unit1_relu4", "K=1..3"),
    ("resnet18_v1", "relu1", "K=1..1"),
    ("resnet50_v2", "pool1", "stage4_unit2_relu1"),
    ("resnet51_v2", "relu1", "resnet50_v2"),
])
def test_invalid_backbone_or_cut_is_a_clear_error(arch, cut, needle):
    with pytest.raises(MxvisionError) as err:
        ResNetTrunk(arch, cut)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_valid_cuts_enumerate_the_classic_scheme():
    cuts = valid_cuts("resnet50_v2")
    assert len(cuts) == 2 + 16 * 4 and cuts[0] == "relu0" and cuts[-1] == "relu1"
    assert "stage4_unit2_relu1" in cuts and "stage2_unit4" in cuts
    assert "relu1" not in valid_cuts("resnet18_v1")


# ---------------------------------------------------------------- the classic symbolic checkpoint

def classic_symbol(shared):
    return shared / "data" / "models" / "resnet-50-symbol.json"


def random_classic_params(sym_file, seed):
    """Random weights for every parameter of the whole classic graph, keyed arg:/aux:."""
    sym = mx.sym.load(str(sym_file))
    args, _, auxs = sym.infer_shape(data=(1, 3, 224, 224), softmax_label=(1,))
    mx.random.seed(seed)
    out = {}
    for kind, names, shapes in (("arg", sym.list_arguments(), args),
                                ("aux", sym.list_auxiliary_states(), auxs)):
        for name, shape in zip(names, shapes):
            if name in ("data", "softmax_label"):
                continue
            if name.endswith(("gamma", "moving_var")):
                value = mx.nd.random.uniform(0.5, 1.5, shape)
            elif name.endswith(("beta", "moving_mean", "bias")):
                value = mx.nd.random.uniform(-0.2, 0.2, shape)
            else:
                value = mx.nd.random.normal(0, float(np.sqrt(2.0 / np.prod(shape[1:]))), shape)
            out[f"{kind}:{name}"] = value
    return out


def test_gluon_trunk_served_as_classic_checkpoint_computes_the_same(shared, tmp_path):
    sym_file = classic_symbol(shared)
    assert classic_bn_eps(sym_file) == {CLASSIC_BN_EPS}
    trunk = get_backbone(epsilon=CLASSIC_BN_EPS)
    randomize_bn(trunk.param_keys(), 5)
    params = gluon_to_classic(trunk)
    cut_sym = mx.sym.load(str(sym_file)).get_internals()[DEFAULT_OUTPUT]
    names = {f"arg:{n}" for n in cut_sym.list_arguments() if n != "data"}
    assert set(params) == names | {f"aux:{n}" for n in cut_sym.list_auxiliary_states()}
    assert params["arg:bn_data_beta"].abs().sum() > 0  # the fixed-gamma BN's beta is carried
    mx.nd.save(str(tmp_path / "resnet-50-0000.params"), params)
    classic = load_classic(sym_file, tmp_path / "resnet-50-0000.params")
    assert classic.output_name == DEFAULT_OUTPUT
    assert classic(mx.sym.var("data")).list_outputs() == [DEFAULT_OUTPUT]
    x = image(224)
    want, got = classic(x), trunk(x)
    assert got.shape == want.shape == (1, 2048, 7, 7)
    assert rel_diff(got, want) <= TOL
    # negative checks: one mapped weight or running statistic permuted -> different features
    for key in ("arg:stage3_unit2_conv2_weight", "aux:stage4_unit2_bn1_moving_var"):
        bad = dict(params, **{key: params[key][::-1].copy()})
        mx.nd.save(str(tmp_path / "bad-0000.params"), bad)
        assert rel_diff(load_classic(sym_file, tmp_path / "bad-0000.params")(x), want) > 1e-2


def test_classic_checkpoint_loaded_into_gluon_computes_the_same(shared, tmp_path):
    sym_file = classic_symbol(shared)
    params = random_classic_params(sym_file, 7)  # whole net incl. fc1: extras must be ignored
    mx.nd.save(str(tmp_path / "resnet-50-0000.params"), params)
    classic = load_classic(sym_file, tmp_path / "resnet-50-0000.params")
    x = image(224, seed=1)
    want = classic(x)
    trunk = trunk_from_classic(sym_file, tmp_path / "resnet-50-0000.params")
    assert trunk.epsilon == CLASSIC_BN_EPS
    assert rel_diff(trunk(x), want) <= TOL
    # the honest epsilon statement: Gluon's default 1e-5 is measurably off, by more than TOL
    gluon_eps = classic_to_gluon(tmp_path / "resnet-50-0000.params", ResNetTrunk())
    assert TOL < rel_diff(gluon_eps(x), want) < 1e-2
    # a permuted classic weight no longer matches
    bad = dict(params, **{"arg:conv0_weight": params["arg:conv0_weight"][::-1].copy()})
    assert rel_diff(classic_to_gluon(bad, ResNetTrunk(epsilon=CLASSIC_BN_EPS))(x), want) > 1e-2


@pytest.mark.parametrize("cut,node", [("relu0", "relu0"), ("stage1_unit1_relu3", None),
                                      ("stage2_unit3", "_plus5"), ("relu1", None)])
def test_classic_and_gluon_agree_at_other_cuts(cut, node, shared, tmp_path):
    sym_file = classic_symbol(shared)
    mx.nd.save(str(tmp_path / "c-0000.params"), random_classic_params(sym_file, 11))
    classic = load_classic(sym_file, tmp_path / "c-0000.params", cut=cut)
    assert classic.output_name == f"{node or cut}_output"
    trunk = trunk_from_classic(sym_file, tmp_path / "c-0000.params", cut=cut)
    x = image(64)
    want, got = classic(x), trunk(x)
    assert got.shape == want.shape and got.shape[1] == trunk.out_channels
    assert rel_diff(got, want) <= TOL


def test_classic_loading_failures_are_clear(shared, tmp_path):
    sym_file = classic_symbol(shared)
    params = random_classic_params(sym_file, 13)
    mx.nd.save(str(tmp_path / "ok.params"), params)
    with pytest.raises(WeightsError, match="cannot cut at stage9_unit1: .*relu0"):
        load_classic(sym_file, tmp_path / "ok.params", cut="stage9_unit1")
    with pytest.raises(WeightsError, match="no such params file"):
        load_classic(sym_file, tmp_path / "absent.params")
    with pytest.raises(WeightsError, match="no such symbol file"):
        load_classic(tmp_path / "absent-symbol.json", tmp_path / "ok.params")
    holed = {k: v for k, v in params.items() if k != "aux:stage2_unit1_bn2_moving_mean"}
    mx.nd.save(str(tmp_path / "holed.params"), holed)
    with pytest.raises(WeightsError, match="stage2_unit1_bn2_moving_mean"):
        load_classic(sym_file, tmp_path / "holed.params")
    with pytest.raises(WeightsError, match="stage2_unit1_bn2_moving_mean"):
        classic_to_gluon(holed, ResNetTrunk())
    wrong = dict(params, **{"arg:conv0_weight": mx.nd.zeros((64, 3, 3, 3))})
    mx.nd.save(str(tmp_path / "wrong.params"), wrong)
    with pytest.raises(WeightsError, match="conv0_weight has shape"):
        load_classic(sym_file, tmp_path / "wrong.params")
    with pytest.raises(WeightsError, match="conv0_weight has shape"):
        classic_to_gluon(wrong, ResNetTrunk())


def test_classic_mapping_refuses_nets_it_does_not_cover():
    for arch in ("resnet18_v2", "resnet50_v1"):
        with pytest.raises(MxvisionError, match="bottleneck ResNet v2"):
            gluon_to_classic(get_backbone(arch, "stage2_unit1"))
