"""A release file of torchxrayvision's autoencoder with random but realistic weights (no real ones exist here).

He-normal convolutions alone let 200 layers on a [-1024, 1024] input grow latents to ~1e10; as the
parity suite does in torch, BatchNorm statistics come from a training-mode pass over real films
(and affine parameters are drawn around 1 and 0), so latents and reconstruction are O(1).
"""
import mxnet as mx
import numpy as np
from mxnet.gluon import nn

from mxvision.data.xrv_transforms import load_xray, preprocess
from mxvision.io.torchfile.writer import save_torch_file
from mxvision.models import zoo

NAME = "resnet_ae-101-elastic"
RELEASE_FILE = "nihpcrsnamimic_ch-resnet101-2-ae-test2-elastic-e250.pt"


def _batch_statistics(bn, inputs):
    """Forward pre-hook: the batch's per-channel mean and variance become the running statistics.
    (MXNet updates them only in a backward pass, which its transposed convolutions cannot take here.)"""
    x = inputs[0]
    mean = x.mean(axis=(0, 2, 3))
    bn.running_mean.set_data(mean)
    bn.running_var.set_data(mx.nd.broadcast_sub(x, mean.reshape((1, -1, 1, 1))).square().mean(axis=(0, 2, 3)))


def write_autoencoder_release(path, films, seed=0):
    """Write a zip-format state dict in torch's names (as the release) to ``path``; return the model."""
    net = zoo.get_model(NAME, weights="none")
    net.init_random(seed=seed)
    rng = np.random.default_rng(seed)
    norms = []
    net.apply(lambda block: norms.append(block) if isinstance(block, nn.BatchNorm) else None)
    hooks = []
    for bn in norms:
        bn.gamma.set_data(mx.nd.array(rng.uniform(0.5, 1.5, bn.gamma.shape)))
        bn.beta.set_data(mx.nd.array(rng.uniform(-0.2, 0.2, bn.beta.shape)))
        hooks.append(bn.register_forward_pre_hook(_batch_statistics))
    x = mx.nd.array(np.stack([preprocess(load_xray(f), 224) for f in films]))
    net(x)  # each BatchNorm normalizes with (and keeps) its input's statistics, as torch's train mode
    for hook in hooks:
        hook.detach()
    reconstruction = net(x)[1].asnumpy()
    net.conv1_1.weight.set_data(net.conv1_1.weight.data() / float(reconstruction.std()))
    params = net._collect_params_with_prefix()
    save_torch_file({k: params[g].data().asnumpy() for k, g in net.expected_torch_keys().items()}, path, fmt="zip")
    return net
