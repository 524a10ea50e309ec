"""torchxrayvision's view, sex and race models in Gluon: layouts, release-file layouts, outputs.

Numerical parity with torchxrayvision itself is ``tests/parity/test_covariate_parity.py``; here
each network is checked against torchvision's names and shapes, reads its release file in the
layout torchxrayvision's class reads (a state dict; a Lightning checkpoint; DataParallel keys),
and its outputs are what torchxrayvision's ``forward`` returns, computed from the pooled features
and the file's own ``fc``.
"""
from collections import OrderedDict

import mxnet as mx
import numpy as np
import pytest
from scipy.special import log_softmax
from support.lightning import lightning_checkpoint

from mxvision.errors import WeightsError
from mxvision.io.torchfile.writer import save_torch_file
from mxvision.models import zoo
from mxvision.models.xrv.baseline_specs import BASELINES
from support.xrv_files import random_state_dict

VIEW, SEX, RACE = "xinario-view-resnet50", "mira-sex-resnet34", "emory_hiti-race-resnet34"


def random_state(name, seed=0):
    """A state dict in torchvision's names and shapes for ``name``, random values."""
    return random_state_dict(name, seed, head_scale=1.0)


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    """Each model's release file as torchxrayvision reads it, with random weights."""
    folder = tmp_path_factory.mktemp("covariates")
    states = {name: random_state(name, seed) for seed, name in enumerate((VIEW, SEX, RACE))}
    files = {
        VIEW: save_torch_file(states[VIEW], folder / BASELINES[VIEW].file),
        SEX: save_torch_file(lightning_checkpoint(states[SEX]), folder / BASELINES[SEX].file),
        RACE: save_torch_file(OrderedDict(("module." + k, v) for k, v in states[RACE].items()),
                              folder / BASELINES[RACE].file),
    }
    return files, states


def _film(size, seed=3):
    return mx.nd.array(np.random.default_rng(seed).uniform(-1024, 1024, (2, 1, size, size)).astype(np.float32))


def test_layouts_are_torchvisions():
    view = zoo.get_model_config(VIEW).network(BASELINES[VIEW])
    keys, params = view.expected_torch_keys(), view._collect_params_with_prefix()
    assert len(keys) == 1 + 4 + 16 * 15 + 4 * 5 + 2  # ResNet-50: stem, 16 bottlenecks, 4 downsamples, fc
    assert params[keys["conv1.weight"]].shape == (64, 3, 7, 7)
    assert params[keys["layer3.0.downsample.0.weight"]].shape == (1024, 512, 1, 1)
    assert params[keys["fc.weight"]].shape == (1000, 2048)  # torchvision's whole ImageNet classifier
    for name, fc_key, classes in ((SEX, "fc.weight", 2), (RACE, "fc.0.weight", 3)):
        net = zoo.get_model_config(name).network(BASELINES[name])
        keys, params = net.expected_torch_keys(), net._collect_params_with_prefix()
        assert len(keys) == 1 + 4 + 16 * 10 + 3 * 5 + 2  # ResNet-34: 16 basic blocks, 3 downsamples
        assert params[keys["layer1.2.conv2.weight"]].shape == (64, 64, 3, 3)
        assert params[keys["layer2.0.conv1.weight"]].shape == (128, 64, 3, 3)
        assert params[keys["layer4.0.downsample.1.running_var"]].shape == (512,)
        assert params[keys[fc_key]].shape == (classes, 512)
    assert [BASELINES[n].resolution for n in (VIEW, SEX, RACE)] == [224, 224, 320]


def test_registered_with_their_targets_and_presets():
    models = zoo.list_models(family="xrv-other")
    for name, preset in ((VIEW, "xrv224"), (SEX, "xrv224"), (RACE, "xrv320")):
        assert name in models and zoo.get_model_config(name).preset == preset
    assert zoo.get_model(VIEW, weights="none").targets == ["Frontal", "Lateral"]
    assert zoo.get_model(SEX, weights="none").targets == ["Male", "Female"]
    assert zoo.get_model(RACE, weights="none").targets == ["Asian", "Black", "White"]


@pytest.mark.parametrize("name", [VIEW, SEX, RACE])
def test_release_file_loads_tensor_for_tensor(release_files, name):
    files, states = release_files
    net = zoo.get_model(name, weights=files[name])
    params = net._collect_params_with_prefix()
    for key, gname in net.expected_torch_keys().items():
        assert np.array_equal(params[gname].data().asnumpy(), states[name][key]), key
    assert net.weights_info["file"] == files[name]


@pytest.mark.parametrize("name", [VIEW, SEX, RACE])
def test_scores_are_torchxrayvisions_from_the_files_fc(release_files, name):
    """Scores = fc(features): the first two of 1000 logits (view), logits (sex), log-probabilities (race)."""
    files, states = release_files
    size = BASELINES[name].resolution
    x = _film(size)
    scores = zoo.get_model(name, weights=files[name])(x).asnumpy()
    features = zoo.get_model(name, weights=files[name], output="features")(x).asnumpy()
    prefix = "fc.0." if name == RACE else "fc."
    fc = features.astype(np.float64) @ states[name][prefix + "weight"].T + states[name][prefix + "bias"]
    expected = {VIEW: fc[:, :2], SEX: fc, RACE: log_softmax(fc, axis=1)}[name]
    assert features.shape == (2, 2048 if name == VIEW else 512)
    assert scores.shape == (2, len(BASELINES[name].targets))
    assert np.allclose(scores, expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max())
    if name == RACE:
        assert np.allclose(np.exp(scores).sum(1), 1.0, atol=1e-5)


def test_hybridized_graph_keeps_the_input_scaling(release_files):
    """The rescaling is inside hybrid_forward: a hybridized (exportable) model computes the same."""
    files, _ = release_files
    net = zoo.get_model(SEX, weights=files[SEX])
    x = _film(224, seed=5)
    before = net(x).asnumpy()
    net.hybridize()
    assert np.allclose(net(x).asnumpy(), before, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", [VIEW, SEX, RACE])
def test_input_scalings_are_torchxrayvisions(name):
    """[-1024, 1024] -> three channels: ``(x + 1024) / 2048`` then ImageNet's mean/std (view, race)
    or ``* 255`` (sex), as each torchxrayvision class's ``forward`` does."""
    x = _film(8)
    net = zoo.get_model(name, weights="none")
    got = net.rescale(mx.nd, x).asnumpy()
    unit = (x.asnumpy() + 1024) / 2048
    if name == SEX:
        expected = np.repeat(unit * 255, 3, axis=1)
    else:
        mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
        std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
        expected = (np.repeat(unit, 3, axis=1) - mean) / std
    assert got.shape == (2, 3, 8, 8) and np.allclose(got, expected, atol=1e-5)


def test_wrong_files_are_refused_in_one_line(release_files, tmp_path):
    files, _ = release_files
    with pytest.raises(WeightsError, match="does not fit mira_resnet34: .* missing") as err:
        zoo.get_model(SEX, weights=files[VIEW])
    assert "\n" not in str(err.value)
    with pytest.raises(WeightsError, match="does not fit xinario_resnet50"):
        zoo.get_model(VIEW, weights=files[RACE])
    with pytest.raises(WeightsError, match="does not fit mira_resnet34: .*fc.weight.*fc.0.weight"):
        zoo.get_model(SEX, weights=files[RACE])  # the race model's fc.0 is not the sex model's fc
    with pytest.raises(WeightsError, match="unknown output"):
        zoo.get_model(RACE, weights="none", output="layer4")
