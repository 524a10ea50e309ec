"""The restricted PyTorch weights reader: both file layouts, whole pickled models, refusals.

Fixtures are written in PyTorch's real formats by ``save_torch_file`` (no torch needed); the
optional parity suite checks that ``torch.load`` reads the same files and that files written by
``torch.save`` read back here.
"""
import io
import struct
import tarfile
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from mxvision.errors import WeightsError
from mxvision.io.torchfile import reader as tr
from mxvision.io.torchfile import writer as tw
from mxvision.io.torchfile.reader import load_torch_file
from mxvision.io.torchfile.writer import TorchModule, save_torch_file


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return OrderedDict([
        ("conv.weight", rng.standard_normal((4, 1, 3, 3)).astype(np.float32)),
        ("bn.running_var", rng.uniform(0.5, 2, 4).astype(np.float32)),
        ("bn.num_batches_tracked", np.array(7, dtype=np.int64)),
        ("half", rng.standard_normal(5).astype(np.float16)),
        ("double", rng.standard_normal((2, 3)).astype(np.float64)),
        ("mask", np.array([True, False, True])),
        ("empty", np.zeros((0, 3), dtype=np.float32)),
    ])


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_state_dict_roundtrip(tmp_path, fmt):
    state = _state()
    path = save_torch_file(state, tmp_path / "w.pt", fmt=fmt)
    back = load_torch_file(path)
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert np.array_equal(back[key], value), key


def test_zip_layout_is_pytorchs(tmp_path):
    path = save_torch_file(_state(), tmp_path / "w.pt")
    names = zipfile.ZipFile(path).namelist()
    assert "archive/data.pkl" in names and "archive/version" in names and "archive/data/0" in names
    assert zipfile.ZipFile(path).read("archive/data.pkl")[:2] == b"\x80\x02"  # pickle protocol 2


def test_legacy_layout_starts_with_the_magic_number(tmp_path):
    path = save_torch_file(_state(), tmp_path / "w.pt", fmt="legacy")
    f = io.BytesIO(path and open(path, "rb").read())
    assert tr.RestrictedUnpickler(f, "x", None).load() == tr.LEGACY_MAGIC


def _model_tree(state):
    conv = TorchModule("torch.nn.modules.conv.Conv2d", parameters={"weight": state["conv.weight"], "bias": None},
                       attrs={"in_channels": 1, "kernel_size": (3, 3), "padding_mode": "zeros"})
    bn = TorchModule("torch.nn.modules.batchnorm.BatchNorm2d",
                     parameters={"weight": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)},
                     buffers={"running_mean": np.zeros(4, np.float32), "running_var": state["bn.running_var"],
                              "num_batches_tracked": state["bn.num_batches_tracked"]},
                     attrs={"eps": 1e-5, "momentum": 0.1, "_non_persistent_buffers_set": set()})
    relu = TorchModule("torch.nn.modules.activation.ReLU", attrs={"inplace": True})
    seq = TorchModule("torch.nn.modules.container.Sequential", modules={"conv0": conv, "norm0": bn, "relu0": relu})
    return TorchModule("torchxrayvision.models.DenseNet", modules={"features": seq, "upsample": None},
                       attrs={"op_threshs": None, "weights": "densenet121-res224-all"})


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_whole_pickled_model_gives_its_state_dict(tmp_path, fmt):
    """torchxrayvision published its DenseNets as torch.save(model): read them without the classes."""
    state = _state()
    path = save_torch_file(_model_tree(state), tmp_path / "m.pt", fmt=fmt)
    back = load_torch_file(path)
    assert list(back) == ["features.conv0.weight", "features.norm0.weight", "features.norm0.bias",
                          "features.norm0.running_mean", "features.norm0.running_var",
                          "features.norm0.num_batches_tracked"]
    assert np.array_equal(back["features.conv0.weight"], state["conv.weight"])
    assert np.array_equal(back["features.norm0.running_var"], state["bn.running_var"])
    record = tr.read_torch_pickle(path)
    assert isinstance(record, tr.ModuleRecord) and record.torch_class == "torchxrayvision.models.DenseNet"
    with pytest.raises(WeightsError, match="refusing to load torchxrayvision.models.DenseNet"):
        load_torch_file(path, allow_modules=False)


def test_non_persistent_buffers_are_left_out(tmp_path):
    mod = TorchModule("torch.nn.modules.batchnorm.BatchNorm2d", parameters={"weight": np.ones(2, np.float32)},
                      buffers={"kept": np.zeros(2, np.float32), "scratch": np.zeros(2, np.float32)},
                      attrs={"_non_persistent_buffers_set": {"scratch"}})
    assert list(load_torch_file(save_torch_file(mod, tmp_path / "m.pt"))) == ["weight", "kept"]


def _zip_with_pickle(path, payload, extra=None):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def _no_hooks():
    return tw.Reduce(tw.GlobalRef("collections", "OrderedDict"), ())


def _tensor(key, numel, offset, size, stride):
    pid = ("storage", tw.GlobalRef("torch", "FloatStorage"), key, "cpu", numel)
    return tw.Reduce(tw.GlobalRef("torch._utils", "_rebuild_tensor_v2"),
                      (tw.PersistentId(pid), offset, size, stride, False, _no_hooks()))


def test_strided_views_and_shared_storage(tmp_path):
    data = np.arange(12, dtype=np.float32)
    obj = OrderedDict([("t", _tensor("0", 12, 1, (2, 3), (1, 4))),  # a transposed view at offset 1
                       ("same", _tensor("0", 12, 0, (12,), (1,)))])
    path = _zip_with_pickle(tmp_path / "v.pt", tw.PickleWriter().dump(obj), {"archive/data/0": data.tobytes()})
    back = load_torch_file(path)
    assert np.array_equal(back["t"], np.lib.stride_tricks.as_strided(data[1:], (2, 3), (4, 16)))
    assert np.array_equal(back["same"], data)


def test_big_endian_storage(tmp_path):
    data = np.arange(6, dtype=">f4")
    obj = OrderedDict([("t", _tensor("0", 6, 0, (2, 3), (3, 1)))])
    path = _zip_with_pickle(tmp_path / "b.pt", tw.PickleWriter().dump(obj),
                            {"archive/data/0": data.tobytes(), "archive/byteorder": "big"})
    assert np.array_equal(load_torch_file(path)["t"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_bfloat16_is_widened_to_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    pid = ("storage", tw.GlobalRef("torch", "BFloat16Storage"), "0", "cuda:0", 3)
    obj = {"t": tw.Reduce(tw.GlobalRef("torch._utils", "_rebuild_tensor_v2"),
                           (tw.PersistentId(pid), 0, (3,), (1,), False, _no_hooks()))}
    path = _zip_with_pickle(tmp_path / "bf.pt", tw.PickleWriter().dump(obj), {"archive/data/0": raw})
    back = load_torch_file(path)["t"]
    assert back.dtype == np.float32 and np.array_equal(back, values)


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("posix", "system"),
                                         ("numpy.core.multiarray", "_reconstruct"), ("subprocess", "Popen"),
                                         ("torch", "load"), ("torch.nn.modules.conv", "__import__")])
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_code_is_refused_before_it_runs(tmp_path, module, name, fmt):
    marker = tmp_path / "pwned"
    evil = tw.Reduce(tw.GlobalRef(module, name), ("touch %s" % marker,))
    path = tmp_path / "evil.pt"
    if fmt == "zip":
        _zip_with_pickle(path, tw.PickleWriter().dump({"weight": evil}))
    else:
        w = tw.PickleWriter
        path.write_bytes(w().dump(tr.LEGACY_MAGIC) + w().dump(tr.LEGACY_PROTOCOL) + w().dump({})
                         + w().dump({"weight": evil}) + w().dump([]))
    with pytest.raises(WeightsError, match="refusing to load %s.%s" % (module, name)) as err:
        load_torch_file(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    assert not marker.exists()


def test_ordinary_pickle_of_an_object_is_refused(tmp_path):
    import pickle
    payload = pickle.dumps({"w": OrderedDict(a=1), "obj": ValueError("x")}, protocol=2)
    with pytest.raises(WeightsError, match="refusing to load .*ValueError"):
        load_torch_file(_zip_with_pickle(tmp_path / "p.pt", payload))


@pytest.mark.parametrize("case", ["empty", "html", "garbage", "tar", "torchscript", "no_pkl", "bad_zip",
                                  "missing_storage", "short_storage", "view_past_end", "legacy_truncated",
                                  "bad_magic", "not_tensors"])
def test_broken_files_give_one_line_errors(tmp_path, case):
    path = tmp_path / "w.pt"
    good = OrderedDict([("t", _tensor("0", 4, 0, (4,), (1,)))])
    if case == "empty":
        path.write_bytes(b"")
    elif case == "html":
        path.write_bytes(b"<!DOCTYPE html><html><body>Sign in</body></html>")
    elif case == "garbage":
        path.write_bytes(b"\x00\x01 not a weights file" * 10)
    elif case == "tar":
        with tarfile.open(path, "w") as tf:
            info = tarfile.TarInfo("storages")
            info.size = 4
            tf.addfile(info, io.BytesIO(b"abcd"))
    elif case == "torchscript":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("model/constants.pkl", b"\x80\x02].")
            zf.writestr("model/code/__torch__.py", "")
    elif case == "no_pkl":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/version", "3")
    elif case == "bad_zip":
        save_torch_file(_state(), path)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "missing_storage":
        _zip_with_pickle(path, tw.PickleWriter().dump(good))
    elif case == "short_storage":
        _zip_with_pickle(path, tw.PickleWriter().dump(good), {"archive/data/0": b"\x00" * 8})
    elif case == "view_past_end":
        bad = OrderedDict([("t", _tensor("0", 4, 2, (4,), (1,)))])
        _zip_with_pickle(path, tw.PickleWriter().dump(bad), {"archive/data/0": b"\x00" * 16})
    elif case == "legacy_truncated":
        save_torch_file(_state(), path, fmt="legacy")
        path.write_bytes(path.read_bytes()[:-10])
    elif case == "bad_magic":
        w = tw.PickleWriter
        path.write_bytes(w().dump(12345) + w().dump(tr.LEGACY_PROTOCOL))
    elif case == "not_tensors":
        _zip_with_pickle(path, tw.PickleWriter().dump({"lr": 0.1, "epoch": 3}))
    with pytest.raises(WeightsError) as err:
        load_torch_file(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message and len(message) < 400


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        load_torch_file(tmp_path / "absent.pt")


def test_reader_source_never_calls_pickle_load():
    """Only the restricted Unpickler may read pickle data (the project forbids pickle.load/loads)."""
    import inspect
    source = inspect.getsource(tr)
    assert "pickle.load(" not in source and "pickle.loads(" not in source
    assert struct.calcsize("<q") == 8
