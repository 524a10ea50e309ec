"""torchxrayvision's ChestX-Det PSPNet in Gluon, against its own definition (parity with
torchxrayvision itself: tests/parity/test_pspnet_parity.py).

A small PSPNet (one bottleneck per stage, 64x64 input: an 8x8 map whose pyramid pools with
kernels 1, 2, 4, 8) keeps these tests fast; the layers, names and graph are the full model's.
"""
import dataclasses
import warnings
from collections import OrderedDict

import mxnet as mx
import numpy as np
import pytest

from mxvision.errors import WeightsError
from mxvision.io.torchfile.writer import save_torch_file
from mxvision.models import zoo
from mxvision.models.xrv.baseline_specs import BASELINES
from mxvision.models.xrv.pspnet import PSPNet

NAME = "chestx_det-pspnet"
SMALL = dataclasses.replace(BASELINES[NAME], resolution=64)


def _small(seed=0):
    return PSPNet(SMALL, block_config=(1, 1, 1, 1)).init_random(seed=seed)


def _films(n=2, size=64, seed=0):
    return mx.nd.array(np.random.default_rng(seed).uniform(-1024, 1024, (n, 1, size, size)).astype(np.float32))


def _state_dict(net, tmp_path):
    """The network's weights as torch keys (what a release file holds), via its own params file."""
    path = str(tmp_path / "small.params")
    net.save_parameters(path)
    arrays = mx.nd.load(path)
    return OrderedDict((key, arrays[name].asnumpy()) for key, name in net.expected_torch_keys().items())


def test_registered_with_its_targets_and_resolution():
    config = zoo.get_model_config(NAME)
    assert config.family == "xrv-other" and config.preset == "xrv512"
    assert list(config.outputs)[4:6] == ["Left Lung", "Right Lung"] and len(config.outputs) == 14
    assert not config.is_backbone


def test_output_is_one_map_per_structure_at_the_input_size():
    out = _small()(_films())
    assert out.shape == (2, 14, 64, 64)
    assert np.isfinite(out.asnumpy()).all()


def test_hybridized_graph_computes_the_same(tmp_path):
    """The symbolic graph (pooling kernels from the resolution, resizes 'like' the input) is the
    imperative network; the unused auxiliary branch is the only warning and is not exported."""
    net = _small()
    x = _films()
    expected = net(x).asnumpy()
    net.hybridize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = net(x).asnumpy()
    unused = [str(w.message) for w in caught if "not used by any computation" in str(w.message)]
    assert unused and all("aux_cls" in m or "4_aux" in m for m in unused)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    net.export(str(tmp_path / "pspnet"))
    exported = mx.nd.load(str(tmp_path / "pspnet-0000.params"))
    assert exported and not any("aux_cls" in k or "4_aux" in k for k in exported)


def test_loads_a_dataparallel_state_dict(tmp_path):
    """The release file is a DataParallel state dict: every key prefixed ``module.``."""
    source = _small(seed=1)
    state = _state_dict(source, tmp_path)
    for key in [k for k in state if k.endswith("running_var")]:
        state[key[:-len("running_var")] + "num_batches_tracked"] = np.array(7, dtype=np.int64)
    path = save_torch_file(OrderedDict(("module." + k, v) for k, v in state.items()), tmp_path / "release.pth")
    loaded = PSPNet(SMALL, block_config=(1, 1, 1, 1)).load_weights_file(path)
    x = _films()
    np.testing.assert_array_equal(loaded(x).asnumpy(), source(x).asnumpy())


def test_a_file_for_another_network_is_refused_in_one_line(tmp_path):
    state = _state_dict(_small(), tmp_path)
    del state["aux_cls.bias"]
    path = save_torch_file(OrderedDict(("module." + k, v) for k, v in state.items()), tmp_path / "release.pth")
    with pytest.raises(WeightsError, match="1 tensors missing \\(aux_cls.bias\\)") as err:
        PSPNet(SMALL, block_config=(1, 1, 1, 1)).load_weights_file(path)
    assert "\n" not in str(err.value)
