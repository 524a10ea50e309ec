"""PyTorch Lightning checkpoints through the restricted reader: what they hold is read, nothing more.

torchxrayvision ships the MIRA sex model as a Lightning checkpoint (and loads it with
``weights_only=False``). Lightning < 1.5 keys each callback's state by the callback's class, so
such a file names ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``: the reader
admits Lightning callback classes as inert markers (a dict key) and nothing else of Lightning's.
"""
from collections import OrderedDict

import numpy as np
import pytest
from support.lightning import ATTRIBUTE_DICT, MODEL_CHECKPOINT, lightning_checkpoint

from mxvision.errors import WeightsError
from mxvision.io.torchfile import writer as tw
from mxvision.io.torchfile.reader import load_torch_file, read_torch_pickle
from mxvision.io.torchfile.unpickler import ClassReference


def _small_state():
    rng = np.random.default_rng(0)
    return OrderedDict([("conv1.weight", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
                        ("bn1.weight", np.ones(4, np.float32)), ("bn1.bias", np.zeros(4, np.float32)),
                        ("bn1.running_mean", np.zeros(4, np.float32)),
                        ("bn1.running_var", np.ones(4, np.float32)),
                        ("bn1.num_batches_tracked", np.array(7, np.int64)),
                        ("fc.weight", rng.standard_normal((2, 4)).astype(np.float32))])


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_checkpoint_gives_its_state_dict(tmp_path, fmt):
    state = _small_state()
    path = tw.save_torch_file(lightning_checkpoint(state, moments=True), tmp_path / "epoch=13-step=7125.ckpt", fmt)
    loaded = load_torch_file(path)
    assert list(loaded) == ["model." + k for k in state]
    for key, value in state.items():
        assert np.array_equal(loaded["model." + key], value) and loaded["model." + key].dtype == value.dtype
    # the trainer's state is read as plain data; the callback's class is an inert key
    whole = read_torch_pickle(path)
    (key, callback), = whole["callbacks"].items()
    assert isinstance(key, ClassReference) and repr(key) == "<class %s.%s>" % (MODEL_CHECKPOINT.module,
                                                                              MODEL_CHECKPOINT.name)
    assert callback["monitor"] == "val_loss" and callback["best_model_score"] == np.float32(0.4321)
    moments = whole["optimizer_states"][0]["state"][0]
    assert moments["exp_avg"].shape == (4, 3, 3, 3) and whole["epoch"] == 13


def test_lightning_1_5_string_callback_keys(tmp_path):
    key = "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}"
    path = tw.save_torch_file(lightning_checkpoint(_small_state(), callback_key=key), tmp_path / "c.ckpt")
    assert list(read_torch_pickle(path)["callbacks"]) == [key]
    assert len(load_torch_file(path)) == 7


def test_saved_hyper_parameters_are_refused_with_the_way_out(tmp_path):
    """``save_hyperparameters()`` pickles an AttributeDict: refused (the shipped checkpoint has none),
    with the message saying how to read such a file anyway."""
    hparams = tw.NewObj(ATTRIBUTE_DICT, {})
    path = tw.save_torch_file(lightning_checkpoint(_small_state(), extra={"hyper_parameters": hparams}),
                              tmp_path / "h.ckpt")
    with pytest.raises(WeightsError) as err:
        load_torch_file(path)
    message = str(err.value)
    assert "refusing to load pytorch_lightning.utilities.parsing.AttributeDict" in message
    assert "save checkpoint['state_dict'] alone" in message and "\n" not in message


@pytest.mark.parametrize("misuse", [
    tw.Reduce(MODEL_CHECKPOINT, ()),                              # calling the class
    tw.Reduce(MODEL_CHECKPOINT, ("/tmp/x", "val_loss")),
    tw.NewObj(MODEL_CHECKPOINT, {"dirpath": "/tmp"}),             # instantiating it
    tw.Reduce(tw.GlobalRef("pytorch_lightning.callbacks", "seed_everything"), (0,)),  # a function
    tw.GlobalRef("pytorch_lightning.core.lightning", "LightningModule"),  # not a callback class
    tw.GlobalRef("pytorch_lightning.callbacks.os", "system"),
])
def test_a_callback_class_is_only_a_name(tmp_path, misuse):
    path = tw.save_torch_file(lightning_checkpoint(_small_state(), extra={"loops": misuse}), tmp_path / "m.ckpt")
    with pytest.raises(WeightsError, match="m.ckpt"):
        load_torch_file(path)
