"""Saving and restoring Gluon trainer (optimizer) state without pickle.

``gluon.Trainer.save_states``/``load_states`` pickle the updater, so resuming from a run folder
someone else wrote would execute whatever that file contains. Here the state arrays (e.g. SGD
momentum) go into an ordinary NDArray file (``mx.nd.save``) and the bookkeeping (update counters,
the nesting of each parameter's state) into a JSON document stored in the same file as a uint8
array, so loading never runs code.
"""
import json

import mxnet as mx
import numpy as np

from mxvision.errors import BadRun

FORMAT = 1
_META = "__meta__"


def _encode(state, arrays, key):
    if state is None:
        return None
    if isinstance(state, mx.nd.NDArray):
        arrays[key] = state
        return {"nd": key}
    if isinstance(state, (tuple, list)):
        return {"seq": [_encode(s, arrays, f"{key}.{j}") for j, s in enumerate(state)],
                "tuple": isinstance(state, tuple)}
    raise TypeError(f"unsupported optimizer state type {type(state).__name__}")


def _decode(node, arrays, ctx):
    if node is None:
        return None
    if "nd" in node:
        return arrays[node["nd"]].copyto(ctx)  # a copy per device: shared arrays would be updated twice
    items = [_decode(n, arrays, ctx) for n in node["seq"]]
    return tuple(items) if node["tuple"] else items


def _local_updaters(trainer):
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    if trainer._update_on_kvstore:
        raise BadRun("trainer", "optimizer state kept on a kvstore server cannot be saved here")
    return trainer._updaters


def save_trainer_states(trainer, path):
    """Write the trainer's optimizer state to ``path`` (an NDArray file; no pickle)."""
    updater = _local_updaters(trainer)[0]
    optimizer = trainer._optimizer
    arrays = {}
    structure = {str(i): _encode(s, arrays, f"s{i}") for i, s in updater.states.items()}
    meta = {"format": FORMAT, "optimizer": type(optimizer).__name__,
            "num_update": int(optimizer.num_update),
            "index_update_count": {str(k): int(v) for k, v in optimizer._index_update_count.items()},
            "states": structure}
    arrays[_META] = mx.nd.array(np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), dtype="uint8")
    mx.nd.save(str(path), arrays)


def load_trainer_states(trainer, path):
    """Restore optimizer state written by :func:`save_trainer_states` into ``trainer``."""
    try:
        arrays = mx.nd.load(str(path))
        meta = json.loads(bytes(arrays.pop(_META).asnumpy().astype(np.uint8)).decode())
    except (mx.base.MXNetError, KeyError, ValueError, AttributeError) as err:
        raise BadRun(path, f"not an mxvision optimizer-state file ({type(err).__name__})") from None
    optimizer = trainer._optimizer
    if meta.get("format") != FORMAT or meta.get("optimizer") != type(optimizer).__name__:
        raise BadRun(path, f"optimizer state of {meta.get('optimizer')!r}, "
                           f"expected {type(optimizer).__name__!r}")
    for updater, ctx in zip(_local_updaters(trainer), trainer._contexts):  # one updater per device
        updater.states = {int(i): _decode(node, arrays, ctx) for i, node in meta["states"].items()}
        updater.states_synced = dict.fromkeys(updater.states, False)
    optimizer.num_update = meta["num_update"]
    # The optimizer keeps one count dict per device and switches between them on every update,
    # so the restored counts go into those dicts, not into a new one that would be dropped.
    counts = {int(k): v for k, v in meta["index_update_count"].items()}
    for per_device in optimizer._all_index_update_counts.values():
        per_device.clear()
        per_device.update(counts)
