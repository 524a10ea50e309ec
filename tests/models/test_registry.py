"""The model registry: one leaf module every family registers in, one entry point (zoo.get_model)."""
import ast
from pathlib import Path

import pytest

import mxvision
from mxvision.errors import WeightsError
from mxvision.features.extract import default_preset
from mxvision.models import registry, zoo
from mxvision.models.xrv.common import DEFAULT_PATHOLOGIES
from mxvision.models.xrv.densenet import XRVDenseNet
from mxvision.models.xrv.resnet import XRVResNet

MODELS = Path(mxvision.__file__).parent / "models"


def _imports(path):
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update("%s.%s" % (node.module, a.name) for a in node.names)
    return found


def test_registry_is_a_leaf_and_no_family_imports_the_zoo():
    assert {m for m in _imports(MODELS / "registry.py") if m.startswith("mxvision")} == {
        "mxvision.errors", "mxvision.errors.WeightsError"}
    for path in MODELS.rglob("*.py"):  # families register themselves; zoo imports them, not back
        if path.name != "zoo.py":
            assert "mxvision.models.zoo" not in _imports(path), path


def test_every_family_is_registered_with_what_the_pipeline_asks():
    assert zoo.list_families() == ["gluoncv", "head", "nodule_net", "resnet_trunk", "xrv", "xrv-other"]
    resnet = zoo.get_model_config("resnet50_v2")
    assert (resnet.family, resnet.preset, resnet.default_cut) == ("resnet_trunk", "imagenet224",
                                                                  "stage4_unit2_relu1")
    assert {"relu0", "stage3_unit6", "stage4_unit2_relu1", "relu1"} <= set(resnet.cuts)
    dense = zoo.get_model_config("densenet121-res224-mimic_nb")
    assert (dense.family, dense.preset, dense.cuts, dense.default_cut, dense.network) == (
        "xrv", "xrv224", ("features", "pooled"), "features", XRVDenseNet)
    assert dense.outputs == DEFAULT_PATHOLOGIES
    big = zoo.get_model_config("resnet50-res512-all")
    assert (big.preset, big.cuts, big.network) == ("xrv512", ("features", "pooled", "layer4"), XRVResNet)
    for name in ("xvision_head", "nodule_net"):
        assert name in zoo.list_models() and name not in zoo.list_backbones()
        assert not zoo.get_model_config(name).is_backbone
    assert zoo.list_models(family="head") == ["xvision_head"]
    not_backbones = {n for n in zoo.list_models(family="xrv-other") if not zoo.get_model_config(n).cuts}
    assert "riken-age" in not_backbones
    assert set(zoo.list_backbones()) == set(zoo.list_models()) - {"xvision_head", "nodule_net"} - not_backbones


def test_every_pretrained_xrv_model_states_its_licence_and_get_model_tells_it_once(capsys):
    for name in zoo.list_models(family="xrv") + zoo.list_models(family="xrv-other"):
        config = zoo.get_model_config(name)
        assert config.licence and config.source.startswith("https://"), name
    assert "non-commercial" in zoo.get_model_config("densenet121-res224-chex").licence
    assert "Apache-2.0" in zoo.get_model_config("jfhealthcare-densenet121").licence \
        if registry.is_registered("jfhealthcare-densenet121") else True
    for _ in range(2):
        with pytest.raises(WeightsError, match="TorchScript"):
            zoo.get_model("riken-age")
    told = capsys.readouterr().err
    assert told.count("riken-age weights -- licence: not stated by torchxrayvision") == 1


def test_features_learn_the_preset_from_the_registry():
    assert default_preset("resnet50-res512-all") == "xrv512"
    assert default_preset("densenet121-res224-all") == "xrv224"
    assert default_preset("mobilenetv3_large") == default_preset("resnet50_v2") == "imagenet224"


def test_unknown_and_conflicting_names_are_refused():
    with pytest.raises(WeightsError, match="unknown model; known: .*resnet50_v2") as err:
        zoo.get_model("resnet51_v2")
    assert "\n" not in str(err.value)
    with pytest.raises(WeightsError, match="unknown backbone"):
        zoo.build_backbone("xvision_head", weights="none")
    with pytest.raises(ValueError, match="already registered by the resnet_trunk family"):
        registry.register_model("resnet50_v2", family="gluoncv")(lambda **kw: None)
    with pytest.raises(ValueError, match="default cut 'b'"):
        registry.register_model("not-registered", family="test", cuts=("a",), default_cut="b")
    assert not registry.is_registered("not-registered")
    assert zoo.get_model_config("resnet50_v2").family == "resnet_trunk"  # unchanged


def test_one_entry_point_builds_every_family():
    head = zoo.get_model("xvision_head", classes=3)
    assert head.classes == 3
    assert zoo.get_model("nodule_net", width=16, extra=0).config == {"width": 16, "extra": 0, "dilation": 2}
    net = zoo.get_model("densenet121-res224-all", weights="none", calibrated=False, ctx="cpu")
    assert net.calibrated is False and "RANDOM" in net.weights_info["description"]
