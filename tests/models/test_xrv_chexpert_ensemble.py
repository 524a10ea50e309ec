"""The Stanford CheXpert ensemble in Gluon: its configuration, reading the user's zip, hostile zips.

Numerical parity with torchxrayvision's own class is tests/parity/test_chexpert_ensemble_parity.py;
here the zip is written without PyTorch (mxvision's ``.pt`` writer, both of PyTorch's layouts) with
``num_models=1`` -- three DenseNet-121 checkpoints, one per task group -- and every refusal is
checked to be one line naming the zip: a pickle reaching a global outside the reader's whitelist,
a compression bomb, member names climbing out (``..``) or absolute, a duplicated member, missing
checkpoints, a checkpoint that is not the dict the ensemble needs.
"""
import io
import os
import warnings
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

import mxnet as mx

from mxvision.errors import MxvisionError, WeightsError
from mxvision.io.torchfile.writer import GlobalRef, Reduce, save_torch_file
from mxvision.models import zoo
from mxvision.models.xrv import chexpert_ensemble as ce
from mxvision.models.xrv.torchvision_densenet import DenseNetBlock
from support.graphs import fused_bn_relu_check

NAME = ce.NAME
AGGREGATION, GROUPS = ce.predict_config()
FIRST = [checkpoints[0] for _, checkpoints in GROUPS]  # (ckpt_path, is_3class) of num_models=1
#: a task order other than the default one, so that reading the checkpoint's own matters
SHUFFLED = {task: i for i, task in enumerate(reversed(ce.CHEXPERT_TASKS))}


def _state(num_outputs, seed):
    """A DataParallel state dict of chexpert.model.DenseNet121: random, BatchNorm variances positive."""
    block = DenseNetBlock(output="scores", num_classes=num_outputs)
    params = block._collect_params_with_prefix()
    rng = np.random.default_rng(seed)
    state = OrderedDict()
    for key, gname in block.expected_torch_keys().items():
        shape = params[gname].shape
        positive = key.endswith("running_var") or (key.endswith("weight") and len(shape) == 1)
        state["module.model." + key] = (rng.uniform(0.5, 1.0, shape) if positive
                                        else rng.uniform(-0.05, 0.05, shape)).astype(np.float32)
    return state


def _checkpoint_bytes(checkpoint, tmp_path, fmt="zip"):
    path = save_torch_file(checkpoint, tmp_path / ("member.%s" % fmt), fmt=fmt)
    with open(path, "rb") as f:
        return f.read()


def _zip(path, members, compression=zipfile.ZIP_STORED):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of a duplicated name, which a test wants
        with zipfile.ZipFile(path, "w", compression=compression) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return str(path)


@pytest.fixture(scope="module")
def ensemble_zip(tmp_path_factory):
    """The first checkpoint of each task group, as the Stanford zip holds them (one in the
    legacy layout of PyTorch < 1.6, as a 2019 checkpoint is; ``ckpt_info`` of plain values)."""
    tmp = tmp_path_factory.mktemp("ensemble")
    members, states = [], {}
    for seed, (ckpt_path, three_class) in enumerate(FIRST):
        states[ckpt_path] = _state(len(SHUFFLED) * (3 if three_class else 1), seed)
        checkpoint = {"ckpt_info": {"epoch": 2, "iteration": 336000, "auc": 0.875},
                      "model_name": "DenseNet121", "task_sequence": dict(SHUFFLED),
                      "model_state": states[ckpt_path]}
        members.append((ckpt_path, _checkpoint_bytes(checkpoint, tmp, "legacy" if seed == 0 else "zip")))
    return _zip(tmp / "chexpert_weights.zip", members), states


def _hostile(tmp_path, first_member, name="hostile.zip", extra=()):
    """The ensemble's zip whose first checkpoint is ``first_member`` (bytes); the others empty."""
    members = [(FIRST[0][0], first_member)] + [(p, b"") for p, _ in FIRST[1:]] + list(extra)
    return _zip(tmp_path / name, members)


def _refused(path, match):
    with pytest.raises(WeightsError, match=match) as err:
        zoo.get_model(NAME, weights=path, num_models=1)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path))
    return str(err.value)


# --------------------------------------------------------------------------- configuration and options
def test_the_shipped_configuration_groups_tasks_as_torchxrayvision():
    assert AGGREGATION == "mean"
    assert [tasks for tasks, _ in GROUPS] == [("Atelectasis", "Edema"), ("Cardiomegaly", "Pleural Effusion"),
                                              ("Consolidation",)]
    assert [len(c) for _, c in GROUPS] == [30, 30, 30]
    assert [{three for _, three in c} for _, c in GROUPS] == [{False}, {True}, {False}]
    assert sorted(t for tasks, _ in GROUPS for t in tasks) == sorted(ce.OUTPUT_TASKS)
    config = zoo.get_model_config(NAME)
    assert config.family == "xrv-other" and config.preset == "xrv320" and not config.cuts
    assert config.outputs == ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion")


@pytest.mark.parametrize("num_models", [0, 31, 2.0, "2", True])
def test_num_models_is_checked(num_models):
    with pytest.raises(MxvisionError, match="num_models must be a whole number from 1 to 30"):
        zoo.get_model(NAME, weights="none", num_models=num_models)


def test_pretrained_weights_say_where_to_get_them_and_odd_options_are_refused():
    with pytest.raises(WeightsError, match="academictorrents.*weights=PATH"):
        zoo.get_model(NAME)
    with pytest.raises(MxvisionError, match="no logits"):
        zoo.get_model(NAME, weights="none", num_models=1, apply_sigmoid=False)
    with pytest.raises(WeightsError, match="not a backbone"):
        zoo.get_model(NAME, cut="features")
    with pytest.raises(WeightsError, match="no operating points"):
        zoo.get_model(NAME, weights="none", thresholds="t.json")


# --------------------------------------------------------------------------- a real-structured zip
def test_the_zip_loads_checkpoint_by_checkpoint(ensemble_zip):
    path, states = ensemble_zip
    net = zoo.get_model(NAME, weights=path, num_models=1)
    assert [m.ckpt_path for m in net.members] == [p for p, _ in FIRST]
    for member, (ckpt_path, three_class) in zip(net.members, FIRST):
        assert member.task_indices == tuple(SHUFFLED[t] for t in member.tasks)  # the checkpoint's own order
        assert member.model.classifier.weight.shape == (14 * (3 if three_class else 1), 1024)
        conv0 = member.model.features.conv0.weight.data().asnumpy()
        assert np.array_equal(conv0, states[ckpt_path]["module.model.features.conv0.weight"])
    assert net.weights_info["file"] == path and len(net.weights_info["sha1"]) == 40
    x = mx.nd.array(np.linspace(-1024, 1024, 320 * 320, dtype=np.float32).reshape(1, 1, 320, 320))
    probs = net(x).asnumpy()
    assert probs.shape == (1, 5) and ((0 < probs) & (probs < 1)).all()
    assert net.features(x).shape == (1, 3 * 1024)


def test_an_unused_member_name_is_harmless_but_climbing_out_is_refused(tmp_path):
    path = _hostile(tmp_path, b"", extra=[("saved/../../../etc/cron.d/evil", b"x")])
    _refused(path, r"member '[^']*evil' has '\.\.' in its path")
    path = _hostile(tmp_path, b"", name="absolute.zip", extra=[("/etc/passwd", b"x")])
    _refused(path, "member '/etc/passwd' has an absolute path")


def test_a_pickle_reaching_outside_the_whitelist_is_refused_before_it_runs(tmp_path):
    witness = tmp_path / "ran"
    checkpoint = {"task_sequence": dict(SHUFFLED), "model_state": {},
                  "ckpt_info": Reduce(GlobalRef("os", "system"), ("touch %s" % witness,))}
    for fmt in ("zip", "legacy"):
        path = _hostile(tmp_path, _checkpoint_bytes(checkpoint, tmp_path, fmt), name=fmt + ".zip")
        message = _refused(path, "refusing to load os.system")
        assert FIRST[0][0] in message  # names the member
    assert not witness.exists()


def test_numpy_scalars_in_ckpt_info_are_refused_by_name(tmp_path):
    """A metric stored as a NumPy scalar (sklearn's AUC is one) would need NumPy's reconstructor,
    which the reader does not whitelist: refused, by name."""
    checkpoint = {"task_sequence": dict(SHUFFLED), "model_state": {},
                  "ckpt_info": {"auc": Reduce(GlobalRef("numpy.core.multiarray", "scalar"), ())}}
    _refused(_hostile(tmp_path, _checkpoint_bytes(checkpoint, tmp_path)),
             "refusing to load numpy.core.multiarray.scalar")


def test_a_compression_bomb_is_refused_before_it_is_inflated(tmp_path):
    path = str(tmp_path / "bomb.zip")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open(FIRST[0][0], "w", force_zip64=True) as member:
            for _ in range(300):
                member.write(bytes(1 << 20))  # 300 MB of zeros: 0.3 MB deflated
        for ckpt_path, _ in FIRST[1:]:
            zf.writestr(ckpt_path, b"")
    assert os.path.getsize(path) < 2 << 20
    _refused(path, "would be 314.6 MB, more than the .* MB these weights can take .*compression bomb")


def test_zips_that_are_not_the_ensemble_are_refused(tmp_path, ensemble_zip):
    duplicate = _hostile(tmp_path, b"", name="duplicate.zip", extra=[(FIRST[1][0], b"")])
    _refused(duplicate, "appears twice")
    missing = _zip(tmp_path / "missing.zip", [(FIRST[0][0], b"")])
    _refused(missing, "has no member saved/.* \\(2 of the 3 checkpoints the ensemble needs are missing\\)")
    not_zip = tmp_path / "weights.pt"
    not_zip.write_bytes(b"\x80\x02}q\x00.")
    _refused(str(not_zip), "not a zip file")
    _refused(str(tmp_path), "is a directory")
    with pytest.raises(MxvisionError, match="num_models must"):  # checked before the zip is read
        zoo.get_model(NAME, weights=ensemble_zip[0], num_models=40)


@pytest.mark.parametrize("checkpoint, problem", [
    ({"model_state": {}}, "a dict without task_sequence"),
    ([1, 2], "holds a list of 2 items, not a CheXpert checkpoint"),
    ({"task_sequence": {"Edema": 0}, "model_state": {"w": np.zeros(3, np.float32)}},
     "task_sequence has no 'Atelectasis'"),
    ({"task_sequence": {"Atelectasis": 0, "Edema": 0}, "model_state": {}}, r"indices \(0, 0\) are not 0..1"),
    ({"task_sequence": {"Atelectasis": "0", "Edema": 1}, "model_state": {}}, "maps 'Atelectasis' to '0'"),
    ({"task_sequence": dict(SHUFFLED), "model_state": {"w": np.zeros(3, np.float32)}}, "does not fit"),
])
def test_a_checkpoint_that_is_not_what_the_ensemble_needs_is_refused(tmp_path, checkpoint, problem):
    _refused(_hostile(tmp_path, _checkpoint_bytes(checkpoint, tmp_path)), problem)


def test_a_corrupt_member_is_refused(tmp_path, ensemble_zip):
    with zipfile.ZipFile(ensemble_zip[0]) as zf:
        good = zf.read(FIRST[0][0])
    _refused(_hostile(tmp_path, good[: len(good) // 2]), "truncated|ends|corrupt")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # a zip member that is itself a zip of junk
        zf.writestr("archive/data.pkl", b"junk")
    _refused(_hostile(tmp_path, buf.getvalue(), name="junk.zip"), "corrupt or")


def test_members_take_the_fused_batchnorm_relu_on_a_cpu_only(ensemble_zip):
    """The members' DenseNets are built (and rebuilt for a checkpoint's tasks) while the zip loads:
    loading chooses their operators for its context, and ``for_context`` reaches them."""
    net = zoo.get_model(NAME, weights=ensemble_zip[0], num_models=1)
    x = mx.nd.array(np.random.default_rng(3).uniform(-1024, 1024, (1, 1, 320, 320)))  # native size
    assert fused_bn_relu_check(net, x) == len(FIRST) * (58 * 2 + 3)
