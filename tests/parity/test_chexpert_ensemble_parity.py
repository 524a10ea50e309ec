"""Parity with torchxrayvision's ``baseline_models.chexpert.DenseNet`` (the Stanford ensemble) on the real films.

The real ensemble is 90 DenseNet-121 checkpoints (30 per task group); to keep CI's time small this
suite uses ``num_models=2``: a zip holding the first two checkpoints of each group under the
names torchxrayvision's ``predict_configs.json`` gives them -- six networks, as torchxrayvision's
``DenseNet(weights_zip=..., num_models=2)`` and mxvision's ``get_model(name, weights=ZIP,
num_models=2)`` both read them. Each checkpoint is torchxrayvision's own
``chexpert.model.DenseNet121`` (torchvision's DenseNet-121 with a Linear of one output per task,
three per task for the 3-class "uncertainty" models of the Cardiomegaly / Pleural Effusion group),
random but realistic: BatchNorm statistics and affine parameters from a training-mode pass over
the real films, its logits scaled to std 2 and centred. Saved as the Stanford checkpoints are:
``torch.save({"task_sequence", "model_state": DataParallel state dict, "ckpt_info", "model_name"})``,
in PyTorch's legacy layout (the 2019 files predate the zip layout) except one in the zip layout.
The members' ``task_sequence``s come in two different orders, so an output read from the wrong
index would show.

Asserted: the 5 probabilities within 1e-5 in float32 (all five films), and
torchxrayvision's ``features`` (every member's pooled vector, group by group) within rounding; in
float64 (two films) both within 1e-9: the same function (measured: 7.8e-7 on the probabilities,
2.3e-6 on features of up to 1.3; float64 1.7e-15). Also: the configuration mxvision ships is
torchxrayvision's, unchanged. Cost: six training-mode passes and torchxrayvision's film-by-film,
member-by-member forwards, 3 to 5 minutes on two shared cores.
"""
import io
import json
import os
import warnings
import zipfile

import numpy as np
import pytest

from reference import (DICOM, RASTER, TORCHVISION, realistic_batchnorm, sample_paths, torch,  # noqa: F401
                       torchxrayvision_input, xrv_torch)

import mxnet as mx  # noqa: E402

from mxvision.models import zoo  # noqa: E402
from mxvision.models.xrv import chexpert_ensemble as ce  # noqa: E402
from mxvision.models.xrv.baseline_specs import BASELINES  # noqa: E402

NAME = ce.NAME
SPEC = BASELINES[NAME]
NUM_MODELS = 2  # per task group: 6 DenseNet-121s instead of the real 90, for CI's time
SCORE_ATOL = 1e-5  # the probabilities, float32
FEATURE_RTOL = 1e-5  # pooled features, float32, relative to their largest value
EXACT_ATOL = 1e-9  # float64: the same function
#: two task orders; the first is the Stanford code's
ORDERS = [list(ce.CHEXPERT_TASKS), list(reversed(ce.CHEXPERT_TASKS))]


def _chexpert():
    from torchxrayvision.baseline_models import chexpert
    return chexpert


def _torchxrayvision_config():
    with open(os.path.join(os.path.dirname(_chexpert().__file__), "predict_configs.json")) as f:
        return json.load(f)


def _realistic_member(model, batch, seed):
    """BatchNorm statistics and affine parameters from real films; logits of std 2, centred."""
    logits = realistic_batchnorm(model, batch, seed)
    with torch.no_grad():
        head = model.model.classifier
        scale = 2.0 / float(logits.std())
        head.weight.mul_(scale)
        head.bias.copy_(-scale * logits.mean(0) + torch.empty_like(head.bias).uniform_(-1.0, 1.0))
    return model


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The ensemble's zip with the first NUM_MODELS checkpoints of each group, and the films."""
    torch.set_num_threads(2)
    samples = sample_paths()
    x = np.stack([torchxrayvision_input(samples[n], SPEC.resolution) for n in RASTER + DICOM])
    batch = torch.from_numpy(x).repeat(1, 3, 1, 1) / 512
    chexpert = _chexpert()
    path = str(tmp_path_factory.mktemp("chexpert") / "chexpert_weights.zip")
    entries = [e for models in _torchxrayvision_config()["task2models"].values() for e in models[:NUM_MODELS]]
    written = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for entry in entries:
            if entry["ckpt_path"] in written:  # tasks of one group list the same checkpoints
                continue
            seed = len(written)
            torch.manual_seed(100 + seed)  # the random initialisation
            order = ORDERS[seed % 2]
            task_sequence = {task: i for i, task in enumerate(order)}
            model = chexpert.model.DenseNet121(task_sequence, entry["is_3class"], False)
            _realistic_member(model, batch, seed)
            checkpoint = {"ckpt_info": {"epoch": 3, "iteration": 4800 * (seed + 1), "auc": 0.85},
                          "model_name": "DenseNet121", "task_sequence": task_sequence,
                          "model_state": torch.nn.DataParallel(model).state_dict()}
            buf = io.BytesIO()
            torch.save(checkpoint, buf, _use_new_zipfile_serialization=seed == 1)
            zf.writestr(entry["ckpt_path"], buf.getvalue())
            written.append(entry["ckpt_path"])
    assert len(written) == 3 * NUM_MODELS
    return {"path": path, "x": x}


@pytest.fixture(scope="module")
def torch_model(release):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _chexpert().DenseNet(weights_zip=release["path"], num_models=NUM_MODELS)


def _torch_outputs(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy(), model.features(torch.from_numpy(x)).numpy()


def _mxvision_outputs(path, x):
    net = zoo.get_model(NAME, weights=path, num_models=NUM_MODELS)
    if x.dtype == np.float64:
        net.cast("float64")
    data = mx.nd.array(x, dtype=x.dtype)
    return net, net(data).asnumpy(), net.features(data).asnumpy()


def test_the_shipped_configuration_is_torchxrayvisions():
    config = json.loads(open(os.path.join(os.path.dirname(ce.__file__), ce.CONFIG_FILE)).read())
    assert config.pop("_about").startswith("Copied from torchxrayvision 1.5.7 (Apache-2.0)")
    assert config == _torchxrayvision_config()


def test_outputs_and_features_match_torchxrayvision(release, torch_model):
    """float32, as both libraries run, on the five films: the probabilities and the features."""
    x = release["x"]
    expected, expected_features = _torch_outputs(torch_model, x)
    net, got, features = _mxvision_outputs(release["path"], x)
    gap = np.abs(got - expected).max()
    feature_gap = np.abs(features - expected_features).max()
    print("%s (num_models=%d): float32 max |diff| probabilities %.2e, features %.2e (max %.2f) (reference: %s)"
          % (NAME, NUM_MODELS, gap, feature_gap, np.abs(expected_features).max(), TORCHVISION))
    assert expected.shape == got.shape == (len(x), 5)
    assert expected_features.shape == features.shape == (len(x), 3 * NUM_MODELS * 1024)
    assert gap < SCORE_ATOL
    assert feature_gap < FEATURE_RTOL * np.abs(expected_features).max()
    assert 0.5 < np.mean((expected > 0.01) & (expected < 0.99))  # not saturated
    assert list(torch_model.targets) == net.targets == list(SPEC.targets)
    net.hybridize()  # the graph an export would hold computes the same
    assert np.abs(net(mx.nd.array(x[:2])).asnumpy() - expected[:2]).max() < SCORE_ATOL


def test_the_same_function_in_float64(release):
    """float64, one raster film and one DICOM: architecture, the 3-class softmax, the task indices
    and the aggregation would all show far above rounding."""
    x = release["x"][[0, len(RASTER)]].astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _chexpert().DenseNet(weights_zip=release["path"], num_models=NUM_MODELS)
    for tasks in reference.model:
        for member in reference.model.tasks2models[tasks]():
            member.double()
    expected, expected_features = _torch_outputs(reference, x)
    _, got, features = _mxvision_outputs(release["path"], x)
    gap, feature_gap = np.abs(got - expected).max(), np.abs(features - expected_features).max()
    print("%s: float64 max |diff| probabilities %.1e, features %.1e" % (NAME, gap, feature_gap))
    assert gap < EXACT_ATOL and feature_gap < EXACT_ATOL
