"""torchxrayvision's DenseNet-121 / ResNet-50 in Gluon: table, calibration, conversion, download.

Numerical parity with torchxrayvision itself is the optional suite in ``tests/parity``; here the
models are checked against their own definitions (shapes, key mapping, op_norm formula) and the
weights path end to end against a real HTTP server serving a release file in PyTorch's format.
"""
import json
import math
import os
import warnings
from collections import OrderedDict

import mxnet as mx
import numpy as np
import pytest
from scipy.special import expit

from mxvision.models.xrv.common import XRVInputWarning, op_norm
from mxvision.errors import MxvisionError, WeightsError
from mxvision.io.torchfile.writer import save_torch_file
from mxvision.models import store, zoo
from mxvision.models.xrv import common as xrv_common
from mxvision.models.xrv import weights as xrv_weights
from mxvision.models.xrv.common import DEFAULT_PATHOLOGIES, WEIGHTS
from mxvision.models.xrv.covariates import MiraSexResNet34
from mxvision.models.xrv.resnet import XRVResNet
from support.graphs import cached_ops, traced_ops
from support.xrv_files import DENSE, RESNET, random_state_dict, write_release_file

zoo.family_modules()  # build_model finds the network in the registry the families fill

def _ramp(size):
    """A well-normalized input: every value of [-1024, 1024] once."""
    return mx.nd.array(np.linspace(-1024, 1024, size * size, dtype=np.float32).reshape(1, 1, size, size))


@pytest.fixture
def xrv_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MXVISION_CACHE", str(cache))
    return cache / "models"


# --------------------------------------------------------------------------- the table
def test_weights_table_matches_torchxrayvision():
    assert len(DEFAULT_PATHOLOGIES) == 18 and DEFAULT_PATHOLOGIES[0] == "Atelectasis"
    assert DEFAULT_PATHOLOGIES[-1] == "Enlarged Cardiomediastinum"
    assert sorted(WEIGHTS) == sorted(["densenet121-res224-%s" % s for s in
                                      ("all", "nih", "pc", "chex", "rsna", "mimic_nb", "mimic_ch")] + [RESNET])
    for name, spec in WEIGHTS.items():
        assert len(spec.labels) == 18 and len(spec.op_threshs) == 18
        assert spec.url.startswith("https://github.com/mlmed/torchxrayvision/releases/download/v1/")
        assert spec.url.endswith(".pt") and spec.resolution == (512 if spec.arch == "resnet50" else 224)
        for label, pathology in zip(spec.labels, DEFAULT_PATHOLOGIES):
            assert label in ("", pathology)
        # an untrained output never has a threshold
        assert all(math.isnan(spec.op_threshs[i]) for i in spec.untrained)
    assert WEIGHTS["densenet121-res224-rsna"].file.startswith("kaggle-densenet121")
    assert [DEFAULT_PATHOLOGIES[i] for i in WEIGHTS[RESNET].no_threshold] == ["Lung Lesion",
                                                                             "Enlarged Cardiomediastinum"]
    assert WEIGHTS["densenet121-res224-all"].op_threshs[0] == pytest.approx(0.07422872)
    assert WEIGHTS[DENSE].untrained == [2, 5, 6, 9, 11, 12, 13]


def test_base_url_override(monkeypatch):
    monkeypatch.setenv(xrv_common.BASE_URL_ENV, "http://127.0.0.1:9/mirror")
    assert WEIGHTS[DENSE].url == "http://127.0.0.1:9/mirror/" + WEIGHTS[DENSE].file


# --------------------------------------------------------------------------- calibration
def test_op_norm_formula():
    t = np.array([0.2, 0.2, 0.2, 0.6, np.nan], dtype=np.float32)
    p = np.array([[0.1, 0.2, 0.9, 0.3, 0.7]], dtype=np.float32)
    expected = [0.1 / 0.4, 1 - 0.8 / 1.6, 1 - 0.1 / 1.6, 0.3 / 1.2, 0.5]
    assert np.allclose(op_norm(p, t), [expected], atol=1e-7)
    nd = xrv_common.op_norm_nd(mx.nd.array(p), t).asnumpy()
    assert np.allclose(nd, [expected], atol=1e-7)


# --------------------------------------------------------------------------- architectures
def test_densenet_matches_torchxrayvision_layout():
    net = xrv_weights.build_model(DENSE)
    keys = net.expected_torch_keys()
    # conv0 + norm0 + 58 dense layers (2 BN + 2 conv) + 3 transitions + norm5 + classifier
    assert len(keys) == 1 + 4 + 58 * 10 + 3 * 5 + 4 + 2
    params = net._collect_params_with_prefix()
    assert params[keys["features.conv0.weight"]].shape == (64, 1, 7, 7)
    assert params[keys["features.denseblock4.denselayer16.conv2.weight"]].shape == (32, 128, 3, 3)
    assert params[keys["features.transition3.conv.weight"]].shape == (512, 1024, 1, 1)
    assert keys["features.norm5.weight"] == "features.norm5.gamma"
    assert params[keys["classifier.weight"]].shape == (18, 1024)


def test_densenet_fuses_batchnorm_relu_on_cpu_float32_only(dense_pt):
    """The speed lever (docs/BENCHMARKS_XRV.md): every BatchNorm + ReLU of the dense layers and
    transitions is oneDNN's one fused operator on a CPU in float32, with the same outputs as the two
    operators; float64 (no fused kernel) and a GPU context run the two operators."""
    x = mx.nd.array(np.random.default_rng(2).uniform(-1024, 1024, (2, 1, 224, 224)))
    fused = zoo.get_model(DENSE, weights=dense_pt[0], calibrated=False)
    ops = traced_ops(fused, x)
    assert ops.count("_contrib_BatchNormWithReLU") == 58 * 2 + 3
    assert ops.count("BatchNorm") == 2  # norm0 (then relu0) and norm5 (features' output, then ReLU)
    plain = zoo.get_model(DENSE, weights=dense_pt[0], calibrated=False).for_context(mx.gpu(0))
    plain_ops = traced_ops(plain, x)  # built on the CPU; only the graph's choice is checked
    assert "_contrib_BatchNormWithReLU" not in plain_ops and plain_ops.count("BatchNorm") == 121
    assert np.array_equal(fused(x).asnumpy(), plain(x).asnumpy())
    wide = zoo.get_model(DENSE, weights=dense_pt[0], calibrated=False)
    wide.cast("float64")
    assert "_contrib_BatchNormWithReLU" not in traced_ops(wide, x.astype("float64"))


@pytest.mark.parametrize("make", [lambda: XRVResNet(layers=(1, 1, 1, 1)), MiraSexResNet34],
                         ids=["resnet50-style", "covariate-resnet34"])
def test_resnet_ports_fuse_wholly_for_inference_on_a_cpu(make):
    """The ports' ReLUs are ``Activation(relu)``, the operator oneDNN's graph fusion matches, so
    ``hybridize_for_inference`` leaves no BatchNorm, ReLU or residual sum outside a fused
    convolution (with ``F.relu`` every one stayed: ResNet-50 at 512 px ran 0.8x torchxrayvision)."""
    from mxvision.runtime import hybridize_for_inference

    net = make()
    net.init_random(mx.cpu())
    x = mx.nd.array(np.random.default_rng(3).uniform(-1024, 1024, (2, 1, 224, 224)))
    expected = net(x).asnumpy()  # not hybridized: operator by operator
    hybridize_for_inference(net, mx.cpu())
    out = net(x).asnumpy()
    ops = cached_ops(net)
    assert not {"BatchNorm", "Activation", "relu", "elemwise_add", "_Plus"} & set(ops), sorted(set(ops))
    assert ops.count("_sg_mkldnn_conv") >= 5
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_resnet_matches_torchvision_layout():
    net = xrv_weights.build_model(RESNET)
    keys = net.expected_torch_keys()
    assert len(keys) == 1 + 4 + 16 * 15 + 4 * 5 + 2  # stem, 16 bottlenecks, 4 downsamples, fc
    params = net._collect_params_with_prefix()
    assert params[keys["conv1.weight"]].shape == (64, 1, 7, 7)
    assert params[keys["layer2.0.conv2.weight"]].shape == (128, 128, 3, 3)
    assert params[keys["layer3.0.downsample.0.weight"]].shape == (1024, 512, 1, 1)
    assert keys["layer4.2.bn3.running_var"] == "layer4.2.bn3.running_var"
    assert params[keys["fc.weight"]].shape == (18, 2048)


@pytest.fixture(scope="module")
def dense_pt(tmp_path_factory):
    path, state = write_release_file(DENSE, tmp_path_factory.mktemp("pt") / "mimic_nb.pt")
    return path, state


def test_pt_file_loads_tensor_for_tensor(dense_pt):
    path, state = dense_pt
    net = zoo.get_model(DENSE, weights=path)
    params = net._collect_params_with_prefix()
    for key, gname in net.expected_torch_keys().items():
        assert np.array_equal(params[gname].data().asnumpy(), state[key]), key
    assert net.weights_info["file"] == str(path) and "torchxrayvision .pt" in net.weights_info["description"]


def test_scores_logits_and_calibration(dense_pt):
    x = mx.nd.array(np.random.default_rng(1).uniform(-1024, 1024, (2, 1, 224, 224)))
    net = zoo.get_model(DENSE, weights=dense_pt[0])
    net.hybridize()
    scores = net(x).asnumpy()
    net.calibrated = False
    logits = net(x).asnumpy()
    net.apply_sigmoid = True
    probs = net(x).asnumpy()
    assert scores.shape == (2, 18) and np.ptp(logits) > 0.1  # not saturated, not constant
    assert np.allclose(probs, expit(logits), atol=1e-6)
    assert np.allclose(scores, op_norm(probs, WEIGHTS[DENSE].op_threshs), atol=1e-6)
    assert np.all(scores[:, WEIGHTS[DENSE].untrained] == 0.5)
    # features2 is the pooled input of the classifier
    pooled = net.features2(x).asnumpy()
    w = net.classifier.weight.data().asnumpy()
    b = net.classifier.bias.data().asnumpy()
    assert pooled.shape == (2, 1024) and np.allclose(pooled @ w.T + b, logits, atol=1e-4)
    assert net.features(x).shape == (2, 1024, 7, 7)


def test_wrong_size_input_is_resized_like_torchxrayvision(dense_pt):
    net = zoo.get_model(DENSE, weights=dense_pt[0])
    x = np.random.default_rng(2).uniform(-1024, 1024, (1, 1, 256, 256)).astype(np.float32)
    with pytest.warns(XRVInputWarning, match="not the native resolution"):
        out = net(mx.nd.array(x)).asnumpy()
    direct = net(mx.nd.array(xrv_common.resize_batch(x, 224))).asnumpy()
    assert np.allclose(out, direct, atol=1e-6)
    with pytest.raises(MxvisionError, match="center-crop"):
        net(mx.nd.zeros((1, 1, 224, 200)))
    with pytest.raises(MxvisionError, match="one grey channel"):
        net(mx.nd.zeros((1, 3, 224, 224)))


def test_antialiased_resize_matrix():
    m = xrv_common.aa_bilinear_matrix(8, 4)
    assert np.allclose(m.sum(axis=1), 1)
    assert np.allclose(m[1], [0, 0.125, 0.375, 0.375, 0.125, 0, 0, 0])
    assert np.allclose(xrv_common.aa_bilinear_matrix(5, 5), np.eye(5))
    up = xrv_common.aa_bilinear_matrix(2, 4)  # enlarging: plain bilinear, edges clamped
    assert np.allclose(up @ np.array([0.0, 1.0]), [0, 0.25, 0.75, 1])


@pytest.mark.parametrize("low,high,hint", [(0, 1, r"\[0, 1\]"), (0, 255, "8-bit"), (-1, 1, r"\[-1, 1\]"),
                                           (-4000, 4000, "too small a maxval"), (0, 4095, "12/16-bit")])
def test_badly_normalized_input_warns_once(dense_pt, low, high, hint):
    net = zoo.get_model(DENSE, weights=dense_pt[0])
    x = mx.nd.array(np.linspace(low, high, 224 * 224, dtype=np.float32).reshape(1, 1, 224, 224))
    with pytest.warns(XRVInputWarning, match=hint):
        net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", XRVInputWarning)
        net(x)  # once per model


def test_well_normalized_input_does_not_warn(dense_pt):
    net = zoo.get_model(DENSE, weights=dense_pt[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", XRVInputWarning)
        net(mx.nd.array(np.linspace(-1024, 1024, 224 * 224, dtype=np.float32).reshape(1, 1, 224, 224)))


def test_file_that_does_not_fit_is_refused(tmp_path):
    state = random_state_dict(DENSE)
    cases = {"missing": lambda s: s.pop("features.norm5.running_var"),
             "shape": lambda s: s.__setitem__("classifier.weight", np.zeros((14, 1024), np.float32)),
             "extra": lambda s: s.__setitem__("features.conv9.weight", np.zeros(3, np.float32)),
             "nan": lambda s: s["features.conv0.weight"].__setitem__((0, 0, 0, 0), np.nan)}
    for case, edit in cases.items():
        s = OrderedDict((k, v.copy()) for k, v in state.items())
        edit(s)
        path = save_torch_file(s, tmp_path / (case + ".pt"))
        with pytest.raises(WeightsError, match={"missing": "norm5.running_var", "shape": r"\(14, 1024\)",
                                                "extra": "conv9", "nan": "not finite"}[case]):
            zoo.get_model(DENSE, weights=path)
    resnet_file = save_torch_file(random_state_dict(RESNET), tmp_path / "r.pt")
    with pytest.raises(WeightsError, match="does not fit densenet121"):
        zoo.get_model(DENSE, weights=resnet_file)


def test_resnet_scores_and_features(tmp_path):
    path = save_torch_file(OrderedDict(("model." + k, v) for k, v in random_state_dict(RESNET).items()),
                           tmp_path / "r.pt")  # keys as in torchxrayvision's wrapper: accepted
    net = zoo.get_model(RESNET, weights=path)
    x = mx.nd.array(np.random.default_rng(3).uniform(-1024, 1024, (1, 1, 512, 512)))
    scores = net(x).asnumpy()
    feats = net.features(x).asnumpy()
    net.calibrated = False
    logits = net(x).asnumpy()
    w, b = net.fc.weight.data().asnumpy(), net.fc.bias.data().asnumpy()
    assert feats.shape == (1, 2048) and np.allclose(feats @ w.T + b, logits, atol=1e-4)
    probs = expit(logits)
    assert np.allclose(scores, op_norm(probs, WEIGHTS[RESNET].op_threshs), atol=1e-6)
    assert np.all(scores[0, WEIGHTS[RESNET].no_threshold] == 0.5)


# --------------------------------------------------------------------------- registry and backbones
def test_registered_in_the_zoo(dense_pt, tmp_path):
    for name in WEIGHTS:
        assert name in zoo.list_models() and name in zoo.list_backbones()
    net = zoo.get_model(DENSE, weights=str(dense_pt[0]))
    assert net.targets[2] == "" and net.targets[0] == "Atelectasis" and repr(net).startswith("XRV-DenseNet121")
    random = zoo.get_model(DENSE, pretrained=False)
    assert "RANDOM" in random.weights_info["description"]
    backbone, info = zoo.build_backbone(DENSE, weights="none", ctx="cpu")
    assert backbone(_ramp(224)).shape == (1, 1024, 7, 7)
    assert info["random_seed"] == zoo.RANDOM_SEED
    # a saved backbone reloads (predict/export rebuild it from its file)
    backbone.save_parameters(str(tmp_path / "b.params"))
    again = zoo.load_backbone_file(DENSE, zoo.DEFAULT_CUT, str(tmp_path / "b.params"))
    x = mx.nd.array(np.random.default_rng(4).uniform(-1024, 1024, (1, 1, 224, 224)))
    assert np.allclose(again(x).asnumpy(), backbone(x).asnumpy(), atol=1e-5)
    pooled = zoo.get_model(DENSE, cut="pooled", weights_file=str(dense_pt[0]))
    assert pooled(x).shape == (1, 1024)
    with pytest.raises(WeightsError, match="unknown cut"):
        zoo.get_model(DENSE, cut="stage3_unit1")


# --------------------------------------------------------------------------- download, convert, cache
def test_download_convert_cache_and_verify(http_server, xrv_cache, monkeypatch, dense_pt):
    spec = WEIGHTS[DENSE]
    folder = os.path.join(http_server.directory, "v1")
    os.makedirs(folder)
    with open(dense_pt[0], "rb") as src, open(os.path.join(folder, spec.file), "wb") as dst:
        dst.write(src.read())
    monkeypatch.setenv(xrv_common.BASE_URL_ENV, http_server.url + "v1/")
    url_path = "/v1/" + spec.file

    net = zoo.get_model(DENSE, progress=False)
    assert http_server.count(url_path) == 1
    sidecar = json.loads((xrv_cache / (DENSE + ".xrv.json")).read_text())
    params = xrv_cache / sidecar["params"]["file"]
    assert params.is_file() and sidecar["params"]["file"].startswith(DENSE + "-")
    assert sidecar["source"]["url"] == http_server.url + "v1/" + spec.file
    assert sidecar["source"]["verified"] is False and len(sidecar["source"]["sha256"]) == 64
    assert not (xrv_cache / "xrv-src" / spec.file).exists()  # the .pt is not kept
    assert net.weights_info["sha256"] == sidecar["params"]["sha256"]
    state = dense_pt[1]
    assert np.array_equal(net.features.conv0.weight.data().asnumpy(), state["features.conv0.weight"])

    # cached: no second request; the store knows the converted file (pipeline --weights imagenet)
    zoo.get_model(DENSE, progress=False)
    assert http_server.count(url_path) == 1
    assert store.cached_weights_file(DENSE) == str(params)
    backbone, info = zoo.build_backbone(DENSE, weights="imagenet")
    assert info["file"] == str(params) and backbone(_ramp(224)).shape == (1, 1024, 7, 7)

    # a corrupted cache entry is converted again from a fresh download
    data = bytearray(params.read_bytes())
    data[-5] ^= 0xFF
    params.write_bytes(bytes(data))
    again = zoo.get_model(DENSE, progress=False)
    assert http_server.count(url_path) == 2
    assert np.array_equal(again.features.conv0.weight.data().asnumpy(), state["features.conv0.weight"])


def test_download_failures_name_url_and_fix(http_server, xrv_cache, monkeypatch, tmp_path):
    monkeypatch.setenv(xrv_common.BASE_URL_ENV, http_server.url)
    with pytest.raises(WeightsError, match="could not download .*404.*MXVISION_XRV_BASE_URL"):
        zoo.get_model(DENSE, progress=False)
    spec = WEIGHTS[DENSE]
    bad = OrderedDict((k, v) for k, v in random_state_dict(RESNET).items())
    save_torch_file(bad, os.path.join(http_server.directory, spec.file))
    with pytest.raises(WeightsError, match="not usable: .*does not fit densenet121"):
        zoo.get_model(DENSE, progress=False)
    assert not (xrv_cache / (DENSE + ".xrv.json")).exists()
    assert not list(xrv_cache.glob(DENSE + "-*.params"))


def test_xrv_backbone_runs_the_xvision_pipeline(synth_index, tmp_path):
    """--backbone densenet121-res224-all in the pipeline: extract (1-channel xrv224 preset), train
    the Xvision head, predict and export from the saved backbone."""
    from mxvision.features.extract import extract_features
    from support.pipeline import train_predict_export

    name = "densenet121-res224-all"
    store_ = extract_features(synth_index, tmp_path / "f", backbone=name, weights="none",
                              preset=WEIGHTS[name].preset, ctx="cpu", batch_size=8, progress=False)
    assert store_.feature_shape == (1024, 7, 7) and store_.manifest["preprocessing"]["channels"] == 1
    feats, _, _ = store_.load()
    assert feats.min() >= 0 and feats.std() > 0  # ReLU'd DenseNet features, not constant
    train_predict_export(store_, tmp_path, epochs=2)


def test_a_constant_warm_up_batch_does_not_spend_the_range_check(dense_pt):
    net = zoo.get_model(DENSE, weights=dense_pt[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", XRVInputWarning)
        net(mx.nd.zeros((1, 1, 224, 224)))  # what extraction runs to build the graph
    with pytest.warns(XRVInputWarning, match=r"\[0, 1\]"):
        net(mx.nd.array(np.linspace(0, 1, 224 * 224, dtype=np.float32).reshape(1, 1, 224, 224)))
