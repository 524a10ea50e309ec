"""GluonCV's classification networks as backbones: names, cut points, shapes, weights from GluonCV's store.

No real weights can be downloaded here: the ImageNet path is exercised against a real HTTP server
(tests/support/httpserver.py) serving, in GluonCV's repository layout, weights this test writes.
"""
import hashlib
import zipfile
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from mxvision.errors import MxvisionError, WeightsError
from mxvision.models import gluoncv_zoo, registry, store, zoo

SMALL = "resnet18_v1b"  # fast; stands for the family where a test needs real weights
BIG = ("resnet50_v1b", "resnet50_v1d", "densenet121", "mobilenetv3_large")


def _image(size=224, seed=0):
    return mx.nd.array(np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32))


def test_registered_under_gluoncv_names_with_named_cuts():
    assert set(BIG) | {SMALL, "mobilenetv3_small"} <= set(zoo.list_backbones(family="gluoncv"))
    for name in gluoncv_zoo.LAYOUTS:
        config = zoo.get_model_config(name)
        assert (config.family, config.preset, config.default_cut) == ("gluoncv", "imagenet224", "stage4")
        assert config.cuts == ("stage1", "stage2", "stage3", "stage4", "pool") and config.weights == name
        assert zoo.default_preset(name) == "imagenet224"
    # the default backbone is still MXNet's model-zoo ResNet-50 v2 at the classic cut
    assert (zoo.DEFAULT_BACKBONE, zoo.DEFAULT_CUT) == ("resnet50_v2", "stage4_unit2_relu1")
    assert zoo.get_model_config("resnet50_v2").family == "resnet_trunk"


@pytest.mark.parametrize("name", ["mobilenetv3_small", SMALL])
def test_each_cut_of_a_small_network_has_its_documented_shape(name):
    x = _image()
    for cut in gluoncv_zoo.CUTS:
        net = zoo.get_model(name, cut=cut)
        assert net(x).shape[1:] == gluoncv_zoo.SHAPES_224[name][cut], cut


@pytest.mark.parametrize("name", BIG)
def test_big_networks_are_cut_where_documented(name):
    """One build per network: its pieces, run in turn, have the documented shape at each cut."""
    net = zoo.get_model(name, cut="pool")
    x = _image()
    pieces = net.blocks()
    ends = gluoncv_zoo.LAYOUTS[name].ends
    for i, block in enumerate(pieces, start=1):
        x = block(x)
        for cut in ("stage1", "stage2", "stage3", "stage4"):
            if ends[cut] == i:
                assert x.shape[1:] == gluoncv_zoo.SHAPES_224[name][cut], (name, cut)
    assert net.finish(mx.nd, x).shape[1:] == gluoncv_zoo.SHAPES_224[name]["pool"]


def test_cut_names_pipeline_default_and_errors():
    assert zoo.get_model(SMALL, cut="stage4_unit2_relu1").cut == "stage4"  # the pipeline's default
    with pytest.raises(MxvisionError, match="not a cut point of resnet18_v1b; valid: stage1, .*pool") as err:
        zoo.get_model(SMALL, cut="layer4")
    assert "\n" not in str(err.value)
    with pytest.raises(WeightsError, match="unknown backbone"):
        zoo.build_backbone("resnet18_v1c", weights="none")


def test_random_trunk_reloads_and_fine_tunes_in_stages(tmp_path):
    net, info = zoo.build_backbone(SMALL, cut="stage3", weights="none", ctx="cpu")
    assert info["random_seed"] == zoo.RANDOM_SEED and "RANDOM" in info["description"]
    x = _image(seed=1)
    net.save_parameters(str(tmp_path / "trunk.params"))  # what extraction keeps for random weights
    again = zoo.load_backbone_file(SMALL, "stage3", str(tmp_path / "trunk.params"))
    assert np.array_equal(again(x).asnumpy(), net(x).asnumpy())
    frozen, trainable, finish = net.split_stages(1)
    z = x
    for block in frozen + trainable:
        z = block(z)
    assert len(trainable) == 1 and np.allclose(finish(z).asnumpy(), net(x).asnumpy(), atol=1e-5)
    with pytest.raises(MxvisionError, match="has 3 stages"):
        net.split_stages(4)


# --------------------------------------------------------------------------- ImageNet weights
@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private weights cache and sha1 table, and GluonCV's repository on the test server."""
    monkeypatch.setattr(store, "PINNED_SHA1", dict(store.PINNED_SHA1))
    monkeypatch.setattr(store, "PINNED_URLS", {})
    monkeypatch.delenv("MXNET_HOME", raising=False)
    monkeypatch.setenv("MXVISION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def _whole_network(name, seed):
    """GluonCV's whole network with seeded random weights, BatchNorm statistics away from 0/1."""
    net = gluoncv_zoo.build_network(name)
    mx.random.seed(seed)
    net.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2))
    net(mx.nd.zeros((1, 3, 64, 64)))
    for key, param in net._collect_params_with_prefix().items():
        if key.endswith(("running_var", "gamma")):
            param.set_data(mx.nd.random.uniform(0.5, 1.5, param.shape))
        elif key.endswith(("running_mean", "beta")):
            param.set_data(mx.nd.random.uniform(-0.2, 0.2, param.shape))
    return net


def _publish(server, name, data, short=None):
    """Zip ``data`` as GluonCV's repository does: ``gluon/models/{name}-{short}.zip``."""
    short = short or hashlib.sha1(data).hexdigest()[:8]
    folder = Path(server.directory) / "gluon" / "models"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / ("%s-%s.zip" % (name, short)), "w") as zf:
        zf.writestr("%s-%s.params" % (name, short), data)
    return "/gluon/models/%s-%s.zip" % (name, short)


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """Two whole-network params files of resnet18_v1b: (path, bytes, sha1, network) each."""
    out = []
    for seed in (1, 2):
        net = _whole_network(SMALL, seed)
        path = tmp_path_factory.mktemp("gluoncv") / ("%s-%d.params" % (SMALL, seed))
        net.save_parameters(str(path))
        data = path.read_bytes()
        out.append((path, data, hashlib.sha1(data).hexdigest(), net))
    return out


def test_imagenet_weights_from_gluoncv_layout_load_and_change_outputs(cache, http_server, monkeypatch,
                                                                      weights_files):
    path, data, sha1, whole = weights_files[0]
    store.register_weights(SMALL, sha1)  # stands for GluonCV's pin of the real ImageNet file
    url_path = _publish(http_server, SMALL, data)
    monkeypatch.setenv("MXNET_GLUON_REPO", http_server.url)

    net, info = zoo.build_backbone(SMALL, cut="pool", weights="imagenet", ctx="cpu")
    assert http_server.count(url_path) == 1
    assert info["file"] == str(cache / ("%s-%s.params" % (SMALL, sha1[:8]))) and info["sha1"] == sha1
    x = _image(seed=3)
    pooled = net(x).asnumpy()
    # every kept layer holds the served weights: the trunk's vector through GluonCV's own
    # classifier gives GluonCV's whole-network logits
    w, b = whole.fc.weight.data().asnumpy(), whole.fc.bias.data().asnumpy()
    assert np.allclose(pooled @ w.T + b, whole(x).asnumpy(), rtol=1e-4, atol=1e-4)
    random_net, _ = zoo.build_backbone(SMALL, cut="pool", weights="none", ctx="cpu")
    assert np.abs(random_net(x).asnumpy() - pooled).max() > 1e-2  # the weights changed the output

    # cached and verified: no second request; GluonCV's own store finds the same file
    again, _ = zoo.build_backbone(SMALL, cut="stage2", weights="imagenet", ctx="cpu")
    assert http_server.count(url_path) == 1 and again(x).shape == (1, 128, 28, 28)
    from mxvision.runtime import compat

    compat.import_gluoncv()  # beside the parity suite's torch 2, gluoncv's own import refuses
    from gluoncv.model_zoo.model_store import get_model_file
    assert get_model_file(SMALL, tag=sha1[:8], root=str(cache)) == info["file"]
    assert http_server.count() == 1


def test_wrong_weights_are_refused_in_one_line(cache, http_server, monkeypatch, weights_files):
    _, _, sha1, _ = weights_files[0]
    _, other, _, _ = weights_files[1]
    store.register_weights(SMALL, sha1)
    _publish(http_server, SMALL, other, short=sha1[:8])  # the right name, the wrong file
    monkeypatch.setenv("MXNET_GLUON_REPO", http_server.url)
    with pytest.raises(WeightsError, match="expected %s; nothing was installed" % sha1) as err:
        zoo.build_backbone(SMALL, weights="imagenet", ctx="cpu")
    assert "\n" not in str(err.value) and "--weights none" in str(err.value)
    assert not list(cache.glob("*.params"))


def test_imagenet_pins_and_addresses_are_gluoncv_own(cache, http_server, monkeypatch):
    """Unpinned, a GluonCV name is pinned from GluonCV's sha1 table and fetched from GluonCV's path."""
    from mxvision.runtime import compat

    compat.import_gluoncv()
    from gluoncv.model_zoo import model_store

    monkeypatch.setenv("MXNET_GLUON_REPO", http_server.url)
    name = "resnet50_v1d"
    assert store.pinned_sha1(name) is None
    with pytest.raises(WeightsError, match="could not download .*404") as err:
        zoo.build_backbone(name, weights="imagenet", ctx="cpu")
    assert "\n" not in str(err.value)
    assert store.short_hash(name) == model_store.short_hash(name)
    assert http_server.count("/gluon/models/%s-%s.zip" % (name, model_store.short_hash(name))) == 1
    for other in gluoncv_zoo.LAYOUTS:  # every registered name has weights in GluonCV's store
        assert len(registry.get_model_config(other).weights_sha1()) == 40


def test_gluoncv_backbone_runs_the_xvision_pipeline(synth_index, tmp_path):
    """--backbone mobilenetv3_small with the pipeline's default cut: extract, train the head,
    predict and export from the saved (random) backbone, as with a model-zoo ResNet."""
    from mxvision.features.extract import extract_features
    from support.pipeline import train_predict_export

    store_ = extract_features(synth_index, tmp_path / "f", backbone="mobilenetv3_small", weights="none",
                              ctx="cpu", batch_size=8, progress=False)
    assert store_.feature_shape == gluoncv_zoo.SHAPES_224["mobilenetv3_small"]["stage4"]
    assert store_.manifest["preprocessing"]["name"] == "imagenet224"
    train_predict_export(store_, tmp_path, epochs=1)
