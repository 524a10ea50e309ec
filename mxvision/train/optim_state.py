"""Saving and restoring Gluon trainer (optimizer) state without pickle.

``gluon.Trainer.save_states``/``load_states`` pickle the updater, so resuming from a run folder
someone else wrote would execute whatever that file contains. Here the state arrays (e.g. SGD
momentum) go into an ordinary NDArray file (``mx.nd.save``) and the bookkeeping (update counters,
the nesting of each parameter's state) into a JSON document stored in the same file as a uint8
array, so loading never runs code.

A state file is read back only after checks, each failure one line naming the file: the file's
headers (every array inside the file: :func:`mxvision.models.store.check_params_file`), the
bookkeeping's JSON types and ranges, every parameter index within the trainer's, and every state
of the structure and shape the optimizer itself creates for that parameter (so a missing array
cannot silently turn SGD with momentum into plain SGD), with finite values.
"""
import json
from pathlib import Path

import mxnet as mx
import numpy as np

from mxvision.errors import BadRun, one_line
from mxvision.models.store import check_params_file, mxnet_error_line

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
    """Restore optimizer state written by :func:`save_trainer_states` into ``trainer``, after
    checking it (see the module's docstring); BadRun naming ``path`` when it does not fit."""
    arrays, meta = _read_checked(path)
    optimizer = trainer._optimizer
    if meta["format"] != FORMAT or meta["optimizer"] != type(optimizer).__name__:
        raise BadRun(path, f"optimizer state of {one_line(meta['optimizer'], 40)!r} (format "
                           f"{meta['format']}), expected {type(optimizer).__name__!r} (format {FORMAT})")
    updaters = _local_updaters(trainer)
    params = trainer._params
    outside = [k for k in list(meta["states"]) + list(meta["index_update_count"]) if int(k) >= len(params)]
    if outside:
        raise BadRun(path, f"names parameter {outside[0]}; the trainer has {len(params)} (0 to "
                           f"{len(params) - 1})")
    states = {}
    for key, node in meta["states"].items():
        index = int(key)
        weight = params[index].list_data()[0]
        expected = optimizer.create_state_multi_precision(index, weight)
        problem = _node_problem(node, expected, arrays)
        if problem:
            raise BadRun(path, f"state of parameter {index} ({params[index].name}): {problem}")
        states[index] = node
    for updater, ctx in zip(updaters, trainer._contexts):  # one updater per device
        updater.states = {i: _decode(node, arrays, ctx) for i, node in states.items()}
        updater.states_synced = dict.fromkeys(updater.states, False)
    optimizer.num_update = meta["num_update"]
    # The optimizer keeps one count dict per device and switches between them on every update,
    # so the restored counts go into those dicts, not into a new one that would be dropped.
    counts = {int(k): v for k, v in meta["index_update_count"].items()}
    for per_device in optimizer._all_index_update_counts.values():
        per_device.clear()
        per_device.update(counts)


def _read_checked(path):
    """The arrays and the bookkeeping of a state file, both checked for form (not yet against a
    trainer): BadRun naming the file otherwise."""
    path = Path(path)
    if not path.exists():
        raise BadRun(path, "no such optimizer-state file")
    check_params_file(path)  # a regular file whose arrays lie inside it, before MXNet reads it
    try:
        arrays = mx.nd.load(str(path))
    except mx.base.MXNetError as err:
        raise BadRun(path, f"not an mxvision optimizer-state file ({mxnet_error_line(err)})") from None
    if not isinstance(arrays, dict) or _META not in arrays:
        raise BadRun(path, f"not an mxvision optimizer-state file (no {_META} record)")
    try:
        meta = json.loads(bytes(arrays.pop(_META).asnumpy().astype(np.uint8)).decode())
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise BadRun(path, f"its {_META} record is not JSON ({one_line(err, 80)})") from None
    ints = lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 0  # noqa: E731
    if not (isinstance(meta, dict) and ints(meta.get("format")) and isinstance(meta.get("optimizer"), str)
            and ints(meta.get("num_update")) and isinstance(meta.get("index_update_count"), dict)
            and isinstance(meta.get("states"), dict)):
        raise BadRun(path, f"its {_META} record lacks format, optimizer, num_update, index_update_count "
                           "or states, or holds another type")
    counts, states = meta["index_update_count"], meta["states"]
    if not all(k.isdigit() and ints(v) for k, v in counts.items()) or not all(k.isdigit() for k in states):
        raise BadRun(path, "parameter indexes or update counts are not whole numbers >= 0")
    return arrays, meta


def _node_problem(node, expected, arrays, depth=0):
    """Why a saved state ``node`` does not match ``expected`` (what the optimizer creates for the
    parameter: None, an NDArray, or a tuple/list of them), or None when it does."""
    if depth > 4:
        return "nested too deeply"
    if expected is None:
        return None if node is None else "holds a state where the optimizer keeps none"
    if isinstance(expected, mx.nd.NDArray):
        if not (isinstance(node, dict) and isinstance(node.get("nd"), str)):
            return "lacks its array"
        array = arrays.get(node["nd"])
        if array is None:
            return f"its array {one_line(node['nd'], 40)!r} is not in the file"
        if array.shape != expected.shape or array.dtype != expected.dtype:
            return (f"array {node['nd']!r} is {np.dtype(array.dtype).name} {array.shape}, expected "
                    f"{np.dtype(expected.dtype).name} {expected.shape}")
        if not np.isfinite(array.asnumpy()).all():
            return f"array {node['nd']!r} holds non-finite values (NaN or infinity)"
        return None
    if not (isinstance(node, dict) and isinstance(node.get("seq"), list) and
            isinstance(node.get("tuple"), bool) and len(node["seq"]) == len(expected)):
        return f"is not a sequence of {len(expected)} states"
    for sub, want in zip(node["seq"], expected):
        problem = _node_problem(sub, want, arrays, depth + 1)
        if problem:
            return problem
    return None
