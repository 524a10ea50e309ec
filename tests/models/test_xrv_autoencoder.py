"""torchxrayvision's ResNet autoencoder in Gluon: registry entry, torch names and shapes, outputs, refusals.

Numerical parity with torchxrayvision itself is tests/parity/test_resnet_ae_parity.py; here the
port is checked against torchxrayvision's source as read (layer names and shapes of the release
state dict) and against itself (each output and method gives the same tensors).
"""
import warnings

import mxnet as mx
import numpy as np
import pytest

from mxvision.errors import MxvisionError, WeightsError
from mxvision.io.torchfile.writer import save_torch_file
from mxvision.models import zoo
from mxvision.models.xrv.autoencoder import DECODER_MODULES, XRVResNetAE
from mxvision.models.xrv.common import XRVInputWarning

NAME = "resnet_ae-101-elastic"


def torch_state(net):
    """The network's parameters as a state dict in torch's names (what the release file holds)."""
    params = net._collect_params_with_prefix()
    return {key: params[gname].data().asnumpy() for key, gname in net.expected_torch_keys().items()}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A random-weights release file (a zip-format state dict, as torchxrayvision's) and its model."""
    net = zoo.get_model(NAME, weights="none")
    path = tmp_path_factory.mktemp("ae") / "nihpcrsnamimic_ch-resnet101-2-ae-test2-elastic-e250.pt"
    save_torch_file(torch_state(net), path, fmt="zip")
    return {"path": str(path), "net": net}


def _ramp(size, n=1):
    """A well-normalized input: every value of [-1024, 1024]."""
    return mx.nd.array(np.linspace(-1024, 1024, n * size * size, dtype=np.float32).reshape(n, 1, size, size))


def test_registered_as_a_backbone_at_224():
    config = zoo.get_model_config(NAME)
    assert (config.family, config.preset, config.network) == ("xrv-other", "xrv224", XRVResNetAE)
    assert config.default_cut == "features" and {"features", "z"} <= set(config.cuts)
    assert NAME in zoo.list_backbones()


def test_layers_carry_torchxrayvisions_names_and_shapes():
    """As autoencoders.py builds ResNetAE101 (read from its source): 1026 tensors besides
    num_batches_tracked; transposed convolutions' weights are (in, out, k, k) in both libraries."""
    net = XRVResNetAE()
    keys = net.expected_torch_keys()
    params = net._collect_params_with_prefix()
    shapes = {k: params[g].shape for k, g in keys.items()}
    assert len(shapes) == 1026
    assert shapes["conv1.weight"] == (64, 1, 7, 7)
    assert shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert shapes["layer3.22.conv3.weight"] == (1024, 256, 1, 1)
    assert shapes["layer4.0.conv2.weight"] == (128, 128, 3, 3) and "layer4.2.conv1.weight" not in shapes
    assert shapes["layer4.1.bn3.running_var"] == (512,)
    assert shapes["uplayer1.0.conv3.weight"] == (512, 128, 1, 1)  # expansion-4 blocks first
    assert shapes["uplayer1.1.conv2.weight"] == (128, 128, 3, 3)  # the strided one: transposed
    assert shapes["uplayer1.1.upsample.0.weight"] == (512, 256, 1, 1)
    assert shapes["uplayer2.22.upsample.1.weight"] == (128,)
    assert shapes["uplayer4.2.conv3.weight"] == (32, 16, 1, 1)
    assert shapes["uplayer_top.upsample.0.weight"] == (32, 64, 1, 1)
    assert shapes["conv1_1.weight"] == (64, 1, 1, 1)
    assert isinstance(net.uplayer1[1].conv2, mx.gluon.nn.Conv2DTranspose)
    assert isinstance(net.uplayer1[0].conv2, mx.gluon.nn.Conv2D)


def test_outputs_and_methods_agree(release):
    net = release["net"]
    x = _ramp(224, 2)
    z, out = net(x)
    assert z.shape == (2, 512, 3, 3) and out.shape == (2, 1, 224, 224)
    np.testing.assert_array_equal(net.encode(x).asnumpy(), z.asnumpy())
    np.testing.assert_array_equal(net.features(x).asnumpy(), z.asnumpy())
    np.testing.assert_allclose(net.decode(z).asnumpy(), out.asnumpy(), rtol=1e-5, atol=1e-5)
    recon = zoo.get_model(NAME, weights=release["path"], output="reconstruction")
    np.testing.assert_allclose(recon(x).asnumpy(), out.asnumpy(), rtol=1e-5, atol=1e-5)
    for output in ("z", "features"):
        encoder = zoo.get_model(NAME, weights=release["path"], output=output)
        assert not any(k.split(".")[0] in DECODER_MODULES for k in encoder.expected_torch_keys())
        np.testing.assert_allclose(encoder(x).asnumpy(), z.asnumpy(), rtol=1e-5, atol=1e-5)
    backbone = zoo.get_model(NAME, cut="features", weights_file=release["path"])  # as `mxvision extract`
    np.testing.assert_allclose(backbone(x).asnumpy(), z.asnumpy(), rtol=1e-5, atol=1e-5)


def test_off_size_input_is_resized_with_a_warning(release):
    with pytest.warns(XRVInputWarning, match="native resolution"):
        z = release["net"].encode(_ramp(256))
    assert z.shape == (1, 512, 3, 3)


def test_bad_uses_are_refused_in_one_line(release):
    encoder = zoo.get_model(NAME, weights=release["path"], output="z")
    with pytest.raises(MxvisionError, match="the encoder only") as err:
        encoder.decode(mx.nd.zeros((1, 512, 3, 3)))
    assert "\n" not in str(err.value)
    with pytest.raises(MxvisionError, match=r"expected \(N, 512, 3, 3\)"):
        release["net"].decode(mx.nd.zeros((1, 512, 4, 4)))
    with pytest.raises(MxvisionError, match="not scores"):
        zoo.get_model(NAME, weights="none", apply_sigmoid=True)
    with pytest.raises(WeightsError, match="unknown output 'logits'"):
        zoo.get_model(NAME, weights="none", output="logits")
    with pytest.raises(WeightsError, match="unknown cut 'layer9'"):
        zoo.get_model(NAME, cut="layer9")


def test_a_file_without_the_decoder_serves_the_encoder_only(release, tmp_path):
    state = {k: v for k, v in torch_state(release["net"]).items() if not k.startswith("uplayer")}
    path = save_torch_file(state, tmp_path / "encoder.pt", fmt="zip")
    with pytest.raises(WeightsError, match="tensors missing .*uplayer"):
        zoo.get_model(NAME, weights=str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", XRVInputWarning)  # the full-size ramp is a well-normalized input
        z = zoo.get_model(NAME, cut="features", weights_file=str(path))(_ramp(224))
    np.testing.assert_allclose(z.asnumpy(), release["net"](_ramp(224))[0].asnumpy(), rtol=1e-5, atol=1e-5)
