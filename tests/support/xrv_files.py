"""Release files shaped like torchxrayvision's, with random weights (no real weights exist here)."""
import math
from collections import OrderedDict

import numpy as np

from mxvision.io.torchfile.writer import TorchModule, save_torch_file
from mxvision.models import zoo
from mxvision.models.xrv.common import WEIGHTS
from mxvision.models.xrv.weights import get_any_spec

DENSE = "densenet121-res224-mimic_nb"
RESNET = "resnet50-res512-all"

_CLASSES = {"conv": "torch.nn.modules.conv.Conv2d", "norm": "torch.nn.modules.batchnorm.BatchNorm2d",
            "classifier": "torch.nn.modules.linear.Linear", "features": "torch.nn.modules.container.Sequential",
            "denseblock": "torchxrayvision.models._DenseBlock", "denselayer": "torchxrayvision.models._DenseLayer",
            "transition": "torchxrayvision.models._Transition"}


def random_state_dict(name, seed=0, head_scale=0.05):
    """A state dict in PyTorch's names and shapes for ``name``'s architecture, random values
    (any torchxrayvision port; its classifier ``classifier``/``fc`` scaled by ``head_scale``)."""
    net = zoo.get_model_config(name).network(get_any_spec(name))  # uninitialised: names and shapes only
    params = net._collect_params_with_prefix()
    rng = np.random.default_rng(seed)
    state = OrderedDict()
    for key, gname in net.expected_torch_keys().items():
        shape = params[gname].shape
        if key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(("running_mean", ".bias")):
            value = rng.uniform(-0.1, 0.1, shape)
        elif len(shape) == 1:  # BatchNorm weight
            value = rng.uniform(0.8, 1.2, shape)
        else:  # He-normal, as PyTorch's kaiming init; small classifier so logits stay moderate
            value = rng.standard_normal(shape) * math.sqrt(2.0 / np.prod(shape[1:]))
            if key.startswith(("classifier", "fc")):
                value *= head_scale
        state[key] = value.astype(np.float32)
        if key.endswith("running_var"):
            state[key[:-len("running_var")] + "num_batches_tracked"] = np.array(1000, dtype=np.int64)
    return state


def module_tree(state):
    """torch.save(model) of torchxrayvision's DenseNet: nested modules holding the tensors."""
    root = TorchModule("torchxrayvision.models.DenseNet", attrs={"op_threshs": None})
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if part not in node.modules:
                kind = next((v for k, v in _CLASSES.items() if part.startswith(k)), _CLASSES["conv"])
                node.modules[part] = TorchModule(kind)
            node = node.modules[part]
        (node.buffers if leaf.startswith(("running", "num_batches")) else node.parameters)[leaf] = value
    return root


def write_release_file(name, path, seed=0):
    """A release file shaped like torchxrayvision's: DenseNets as whole pickled models in the
    legacy format (saved by PyTorch < 1.6), the ResNet as a zip-format state dict."""
    state = random_state_dict(name, seed)
    if WEIGHTS[name].arch == "densenet121":
        return save_torch_file(module_tree(state), path, fmt="legacy"), state
    return save_torch_file(state, path, fmt="zip"), state
