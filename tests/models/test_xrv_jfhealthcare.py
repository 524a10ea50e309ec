"""JF Healthcare's CheXpert DenseNet-121 in Gluon: registry entry, release-file layout, sigmoid default.

Numerical parity with torchxrayvision's own class is tests/parity/test_jfhealthcare_parity.py;
here the port is checked against its own definition: the tensors a release file holds (the
``Classifier``'s state dict, including the modules example.json does not use), which of them are
ignored and which refused, and torchxrayvision's default of sigmoid outputs.
"""
from collections import OrderedDict

import mxnet as mx
import numpy as np
import pytest

from mxvision.errors import WeightsError
from mxvision.io.torchfile.writer import save_torch_file
from mxvision.models import zoo
from mxvision.models.xrv.baseline_specs import BASELINES
from mxvision.models.xrv.jfhealthcare import JFHealthcareDenseNet
from support.graphs import fused_bn_relu_check

NAME = "jfhealthcare-densenet121"
#: what the release holds besides the ported network (shapes of JF Healthcare's modules)
UNUSED = {"backbone.classifier.weight": (1000, 1024), "backbone.classifier.bias": (1000,),
          "attention_map.channel_attention.fc1.weight": (512, 1024),
          "attention_map.channel_attention.fc1.bias": (512,),
          "attention_map.channel_attention.fc2.weight": (1024, 512),
          "attention_map.channel_attention.fc2.bias": (1024,),
          "attention_map.spatial_attention.gamma": (1,),
          "attention_map.spatial_attention.conv1.weight": (128, 1024, 1, 1),
          "attention_map.spatial_attention.conv1.bias": (128,)}


@pytest.fixture(scope="module")
def release_state():
    """A state dict laid out like the release file, random values (BatchNorm variances positive)."""
    net = JFHealthcareDenseNet(BASELINES[NAME])
    params = net._collect_params_with_prefix()
    rng = np.random.default_rng(0)
    state = OrderedDict()
    for key, gname in net.expected_torch_keys().items():
        shape = params[gname].shape
        scale_like = key.endswith(("running_var", "weight")) and len(shape) == 1  # BatchNorm's
        value = rng.uniform(0.5, 1.0, shape) if scale_like else rng.uniform(-0.05, 0.05, shape)
        state[key] = value.astype(np.float32)
        if key.endswith("running_var"):
            state[key[:-len("running_var")] + "num_batches_tracked"] = np.array(7, dtype=np.int64)
    for key, shape in UNUSED.items():
        state[key] = rng.standard_normal(shape).astype(np.float32)
    return state


def test_registered_with_torchxrayvision_targets():
    config = zoo.get_model_config(NAME)
    assert config.family == "xrv-other" and config.network is JFHealthcareDenseNet
    assert config.outputs == ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Effusion")
    assert config.preset == "xrv512"


def test_structural_names_are_the_release_keys(release_state):
    net = JFHealthcareDenseNet(BASELINES[NAME])
    keys = set(net.expected_torch_keys())
    ported = {k for k in release_state if not k.endswith("num_batches_tracked")} - set(UNUSED)
    assert keys == ported
    assert {"backbone.features.conv0.weight", "fc_4.weight", "fc_4.bias", "bn_0.running_var",
            "attention_map.pyramid_attention.gap_branch.1.conv.0.weight",
            "attention_map.pyramid_attention.scale3.conv.1.weight"} <= keys
    assert net.expected_torch_keys()["fc_0.weight"] == "fc_0.weight"
    assert net._collect_params_with_prefix()["fc_0.weight"].shape == (1, 2048, 1, 1)


def test_release_file_loads_and_sigmoid_is_the_default(release_state, tmp_path):
    path = save_torch_file(release_state, tmp_path / BASELINES[NAME].file)
    net = zoo.get_model(NAME, weights=path)
    logits_net = zoo.get_model(NAME, weights=path, apply_sigmoid=False)
    assert net.apply_sigmoid and not logits_net.apply_sigmoid
    got = net.bn_3.running_var.data().asnumpy()
    assert np.array_equal(got, release_state["bn_3.running_var"])
    x = mx.nd.array(np.linspace(-1024, 1024, 512 * 512, dtype=np.float32).reshape(1, 1, 512, 512))
    probs, logits = net(x).asnumpy(), logits_net(x).asnumpy()
    assert probs.shape == (1, 5)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-6)


def test_module_prefix_is_accepted_and_foreign_tensors_are_refused(release_state):
    net = JFHealthcareDenseNet(BASELINES[NAME])
    net.load_torch_state_dict(OrderedDict(("module." + k, v) for k, v in release_state.items()))
    foreign = OrderedDict(release_state)
    foreign["attention_map.extra.weight"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(WeightsError, match=r"1 unexpected \(attention_map.extra.weight\)"):
        net.load_torch_state_dict(foreign, source="r.pt")
    missing = OrderedDict((k, v) for k, v in release_state.items() if k != "fc_2.bias")
    with pytest.raises(WeightsError, match=r"1 tensors missing \(fc_2.bias\)"):
        net.load_torch_state_dict(missing, source="r.pt")


def test_the_backbone_takes_the_fused_batchnorm_relu_on_a_cpu_only():
    net = zoo.get_model(NAME, weights="none")
    x = mx.nd.array(np.random.default_rng(4).uniform(-1024, 1024, (1, 1, 512, 512)))
    assert fused_bn_relu_check(net, x) == 58 * 2 + 3
