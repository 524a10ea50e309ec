"""PyTorch Lightning checkpoints as ``trainer.save_checkpoint`` lays them out, written without Lightning.

torchxrayvision ships the MIRA sex model as such a checkpoint. Its layout (Lightning 1.x's
``CheckpointConnector.dump_checkpoint``): the LightningModule's state dict -- the network is its
``model`` attribute, so keys are ``model.<torchvision key>`` -- beside the trainer's state. Before
Lightning 1.5 each callback's state is keyed by the callback's *class*, which the pickle names
with a ``GLOBAL`` (here a :class:`~mxvision.io.torchfile.writer.GlobalRef` used as a dict key).
"""
from collections import OrderedDict

import numpy as np

from mxvision.io.torchfile.writer import GlobalRef

MODEL_CHECKPOINT = GlobalRef("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
ATTRIBUTE_DICT = GlobalRef("pytorch_lightning.utilities.parsing", "AttributeDict")


def adam_state(state_dict, moments=True):
    """``torch.optim.Adam(...).state_dict()`` after training: per-parameter step and moments
    (zeros here; ``moments=False`` keeps only the step, for small test files)."""
    params = [k for k in state_dict if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    state = {}
    for i, key in enumerate(params):
        entry = {"step": np.array(7125.0, dtype=np.float32)}
        if moments:
            entry["exp_avg"] = np.zeros_like(state_dict[key])
            entry["exp_avg_sq"] = np.zeros_like(state_dict[key])
        state[i] = entry
    return {"state": state,
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0,
                              "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                              "differentiable": False, "fused": None, "params": list(range(len(params)))}]}


def lightning_checkpoint(state_dict, attribute="model", moments=False, callback_key=MODEL_CHECKPOINT,
                         extra=None):
    """The dict ``trainer.save_checkpoint`` pickles for a LightningModule holding the network as
    ``self.<attribute>`` (``callback_key``: the class Lightning < 1.5 keys callback states by, or
    the string Lightning >= 1.5 uses); ``extra`` adds entries (e.g. ``hyper_parameters``)."""
    best = np.array(0.4321, dtype=np.float32)
    checkpoint = {
        "epoch": 13,
        "global_step": 7125,
        "pytorch-lightning_version": "1.4.9",
        "state_dict": OrderedDict((attribute + "." + k, v) for k, v in state_dict.items()),
        "callbacks": {callback_key: {"monitor": "val_loss", "best_model_score": best,
                                     "best_model_path": "output/sex/resnet-all/version_0/checkpoints/"
                                                        "epoch=13-step=7125.ckpt",
                                     "current_score": best, "dirpath": "output/sex/resnet-all/version_0/checkpoints"}},
        "optimizer_states": [adam_state(state_dict, moments)],
        "lr_schedulers": [],
    }
    checkpoint.update(extra or {})
    return checkpoint
