"""The run folder: what a training run writes, how it resumes, and how it is read back.

Head training (:func:`mxvision.train.loop.train_head`), distributed training
(:mod:`mxvision.distributed.train`) and fine-tuning (:mod:`mxvision.train.finetune`) write the same
layout, so ``evaluate``, ``predict`` and ``export`` read any of them::

    config.json            what was trained on what: ``features`` (the store's provenance,
                           :func:`features_provenance`), ``hyper`` (settings), ``splits``; plus
                           ``streaming``, ``distributed`` or ``finetune`` for those runs, and
                           ``task: "multilabel"`` with its ``labels`` for a multi-label head
                           (:mod:`mxvision.train.multilabel`; softmax when absent)
    state.json             ``last_epoch`` (the last finished epoch), ``history`` (one row per
                           epoch: train/val loss and accuracy, val AUC, seconds), ``best_epoch``
    log.csv, log.json      the history as a table and as JSON
    checkpoints/epoch-NNNN.params    the head of each epoch (the newest few are kept)
    checkpoints/epoch-NNNN.states    the trainer (optimizer) state, without pickle
                                     (:mod:`mxvision.train.optim_state`)
    checkpoints/epoch-NNNN.backbone  fine-tuning runs: the backbone of each epoch
    best.params            the head of the best validation epoch (AUC, then loss: :func:`is_better`)
    backbone.params        fine-tuning runs: the backbone of the best epoch
    training_curve.png     loss and accuracy/AUC per epoch

The nodule detector (:mod:`mxvision.audit.detector`) keeps the same files with ``step`` for
``epoch``: ``checkpoints/step-NNNNNN.params|.states``, ``state.json`` with ``last_step`` and
``best_step``, and a ``log.csv`` of fixed columns (no ``log.json``, no curve).

An epoch (step) counts as finished only once its checkpoint and then ``state.json`` are written,
each file atomically, so a run killed at any moment resumes from its last finished epoch.

A run folder may come from someone else's disk, so everything read back is checked before use,
and a bad file is refused in one line naming it (:class:`~mxvision.errors.BadRun`): ``config.json``
and ``state.json`` (:func:`check_config`, :func:`check_state`: keys, types, ranges, the last
epoch within the epochs the config plans), parameter files (:func:`load_parameters`: names,
shapes and dtypes from the file's headers before MXNet reads it, then finite values) and the
optimizer state (:mod:`mxvision.train.optim_state`).
"""
import csv
import math
import shutil
import stat
from pathlib import Path

import mxnet as mx
import numpy as np

from mxvision.errors import BadRun, one_line
from mxvision.features.store import (COMPUTE_DTYPES, check_json_keys, json_is, json_type_name,
                                     valid_classes, valid_feature_shape)
from mxvision.models.store import check_params_file, check_weight_values, mxnet_error_line
from mxvision.train.optim_state import load_trainer_states, save_trainer_states
from mxvision.utils import atomic_path, clean_stale_temps, read_json, write_json

CONFIG, STATE, BEST, BACKBONE = "config.json", "state.json", "best.params", "backbone.params"
LOG_CSV, LOG_JSON, CURVE, CHECKPOINTS = "log.csv", "log.json", "training_curve.png", "checkpoints"
# Checkpoint units and the digits of their numbers in file names.
DIGITS = {"epoch": 4, "step": 6}
# Head settings that must not change when a run is resumed (epochs may grow).
FIXED_SETTINGS = ("lr", "batch_size", "momentum", "wd", "seed", "hidden")
#: Largest config.json / state.json read (a run's are a few kB).
MAX_JSON_BYTES = 64 << 20
#: Widest hidden layer a head may have (the Xvision head has 512).
MAX_HIDDEN = 1 << 16


# --- paths and folders ---------------------------------------------------------------------------

def checkpoint_path(run_dir, number, ext, unit="epoch"):
    """``run_dir/checkpoints/epoch-0007.params`` (``unit="step"``: ``step-000250.params``)."""
    return Path(run_dir) / CHECKPOINTS / f"{unit}-{number:0{DIGITS[unit]}d}.{ext}"


def prepare_run_dir(run_dir):
    """Create ``run_dir`` and delete the temporary files a killed run left there (resuming never
    needs them). Only the process that writes the run may call it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for folder in (run_dir, run_dir / CHECKPOINTS):
        clean_stale_temps(folder)
    return run_dir


def features_provenance(store):
    """``config.json``'s ``features``: which feature store, backbone, weights and preprocessing."""
    m = store.manifest
    return {"features_dir": str(store.path.resolve()), "backbone": m["backbone"], "cut": m["cut"],
            "weights": m["weights"], "preprocessing": m["preprocessing"],
            "feature_shape": m["feature_shape"], "classes": m["classes"],
            "dtype": m.get("dtype", "float32"), "storage_dtype": m.get("storage_dtype", "float32"),
            "pooled": bool(m.get("pooled", False)), "precision": m.get("precision")}


# --- starting and resuming -----------------------------------------------------------------------

def new_state():
    """The ``state.json`` of a run before its first epoch."""
    return {"last_epoch": 0, "history": [], "best_epoch": None}


def settings_changed(old_config, config):
    """The names of a head run's settings that differ from ``old_config`` (a resumed run's):
    those of :data:`FIXED_SETTINGS`, and ``features`` for another feature store."""
    old_hyper = old_config.get("hyper", {})
    changed = [k for k in FIXED_SETTINGS if old_hyper.get(k) != config["hyper"][k]]
    if old_config.get("features", {}).get("features_dir") != config["features"]["features_dir"]:
        changed.append("features")
    if (old_config.get("task"), old_config.get("labels")) != (config.get("task"), config.get("labels")):
        changed.append("labels")  # a softmax head and multi-label heads of other labels differ in shape
    return changed


def load_or_start(run_dir, config, resume, changed=settings_changed, kind="run", fresh=None):
    """The state to continue from: ``run_dir``'s ``state.json`` when ``resume`` and the run there
    has the same settings, else ``fresh`` (default :func:`new_state`).

    ``changed(old_config, config)`` names the settings that differ; any is refused, since
    resuming would mix two runs' epochs. The old ``config.json`` and ``state.json`` are checked
    first (:func:`check_config`, :func:`check_state`; for a ``fresh`` state counting steps, only
    their shape), so a damaged or edited file is refused in one line, never half-used.
    """
    run_dir = Path(run_dir)
    fresh = new_state() if fresh is None else fresh
    if not (resume and (run_dir / STATE).exists()):
        return fresh
    unit = "step" if "last_step" in fresh else "epoch"
    hint = "; use a new --out or --no-resume"
    old = read_run_json(run_dir / CONFIG, hint)
    if unit == "epoch":
        check_config(old, run_dir / CONFIG, hint)
    elif check_json_keys(old, {"hyper": dict}, "the config") or \
            not (json_is(old["hyper"].get("steps"), int) and old["hyper"]["steps"] >= 1):
        raise BadRun(run_dir / CONFIG, f"lacks hyper's steps (a positive integer){hint}")
    different = changed(old, config)
    if different:
        raise BadRun(run_dir, f"holds a {kind} with other settings ({', '.join(different)}); "
                              "use a new --out or --no-resume")
    state = check_state(read_run_json(run_dir / STATE, hint), run_dir / STATE, planned_count(old, unit),
                        unit, hint)
    wanted = planned_count(config, unit)
    if state[f"last_{unit}"] > wanted:  # the loop would do nothing, and config.json say `wanted`
        raise BadRun(run_dir, f"holds a {kind} of {state[f'last_{unit}']} {unit}s already, more than "
                              f"the {wanted} asked for; ask for at least as many, or use a new --out "
                              "or --no-resume")
    return state


# --- checking what is read back ------------------------------------------------------------------

def read_run_json(path, hint=""):
    """The JSON object in a run's ``config.json`` or ``state.json``; BadRun naming the file when it
    is missing, not a regular file, oversized, not JSON or not an object (``hint`` ends the message)."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError:
        raise BadRun(path, f"missing{hint}") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_JSON_BYTES:
        raise BadRun(path, f"not a regular file of at most {MAX_JSON_BYTES} bytes{hint}")
    try:
        obj = read_json(path)
    except (OSError, ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise BadRun(path, f"unreadable ({one_line(err, 100)}){hint}") from None
    if not isinstance(obj, dict):
        raise BadRun(path, f"holds {json_type_name(type(obj))}, expected an object{hint}")
    return obj


_FEATURES_KEYS = {"features_dir": str, "backbone": str, "cut": str, "weights": dict,
                  "preprocessing": dict, "feature_shape": list, "classes": list}


def check_config(config, path, hint=""):
    """Refuse (BadRun naming ``path``) a head or fine-tuning run's ``config.json`` that lacks a key
    the readers use or holds a wrong type or an impossible value; return ``config``."""
    problem = check_json_keys(config, {"features": dict, "hyper": dict, "splits": dict}, "the config") or \
        check_json_keys(config["features"], _FEATURES_KEYS, "features") or \
        check_json_keys(config["features"]["weights"], {"sha1": str, "description": str},
                        "features' weights") or \
        check_json_keys(config["features"]["preprocessing"], {"name": str}, "features' preprocessing") or \
        check_json_keys(config["hyper"], {"epochs": int, "hidden": int}, "hyper") or \
        check_json_keys(config["splits"], {"train": str, "val": str}, "splits")
    if not problem:
        features, hyper = config["features"], config["hyper"]
        tune = config.get("finetune", {"epochs": 1})
        if not valid_feature_shape(features["feature_shape"]):
            problem = "features' feature_shape is not 1 to 3 positive sizes"
        elif config.get("task", "softmax") not in ("softmax", "multilabel"):
            problem = f"task {one_line(config.get('task'), 40)} is not softmax or multilabel"
        elif config.get("task") == "multilabel" and not valid_classes(config.get("labels")):
            problem = "a multilabel run's labels are not one or more distinct names"
        elif not valid_classes(features["classes"]) or \
                (len(features["classes"]) < 2 and config.get("task") != "multilabel"):
            problem = "features' classes are not two or more distinct names"
        elif not (1 <= hyper["hidden"] <= MAX_HIDDEN and hyper["epochs"] >= 1):
            problem = f"hyper's hidden (1 to {MAX_HIDDEN}) or epochs (at least 1) is out of range"
        elif features["weights"].get("file") is not None and not json_is(features["weights"]["file"], str):
            problem = "features' weights file is not a string"
        elif features.get("dtype", "float32") not in COMPUTE_DTYPES or \
                not json_is(features.get("pooled", False), bool) or \
                not json_is(features.get("precision"), (dict, type(None))):
            problem = f"features' dtype (one of {', '.join(COMPUTE_DTYPES)}), pooled or precision is malformed"
        elif not (isinstance(tune, dict) and json_is(tune.get("epochs"), int) and tune["epochs"] >= 1):
            problem = "finetune's epochs is not a positive integer"
    if problem:
        raise BadRun(path, f"{problem}; not a valid run config{hint}")
    return config


def planned_count(config, unit="epoch"):
    """How many epochs (steps) a run's ``config.json`` plans: its last epoch can be no later."""
    if unit == "step":
        return config["hyper"]["steps"]
    return config["finetune"]["epochs"] if "finetune" in config else config["hyper"]["epochs"]


def check_state(state, path, planned, unit="epoch", hint=""):
    """Refuse (BadRun naming ``path``) a ``state.json`` whose last epoch (step) is not a whole number
    from 0 to ``planned`` (what its config plans), whose history rows are not objects numbered 1 to
    the last (for epochs, with numbers ``val_auc`` and ``val_loss``, which pick the best), or whose
    best epoch (step) is not in its history; return ``state``."""
    last, best = f"last_{unit}", f"best_{unit}"
    problem = check_json_keys(state, {last: int, "history": list}, "the state")
    if not problem and not 0 <= state[last] <= planned:
        problem = f"{last} {state[last]} is not from 0 to {planned}, the {unit}s its config.json plans"
    if not problem:
        rows = state["history"]
        scores = ("val_auc", "val_loss") if unit == "epoch" else ()
        numbers = [r.get(unit) if isinstance(r, dict) else None for r in rows]
        if not all(isinstance(r, dict) and json_is(n, int) and 1 <= n <= state[last] and
                   all(json_is(r.get(s), (int, float)) for s in scores) for r, n in zip(rows, numbers)):
            problem = f"history rows are not objects with {unit} 1 to {state[last]}" + \
                (" and numbers val_auc, val_loss" if scores else "")
        elif state.get(best) is not None and state.get(best) not in numbers:
            problem = f"{best} {one_line(state.get(best), 40)} is not one of the {unit}s in its history"
    if problem:
        raise BadRun(path, f"{problem}; not a valid run state{hint}")
    return state


def load_parameters(block, path, ctx):
    """Load ``block``'s parameters from ``path`` (what ``save_parameters`` wrote), refusing with
    one line naming the file what would otherwise fail deep inside MXNet or give NaN output.

    The file's headers are checked before MXNet reads it (a regular file whose every array lies
    inside it: :func:`mxvision.models.store.check_params_file`), so nothing larger than the file
    is allocated; the arrays must then be exactly the block's parameters, with their shapes (0 in
    a deferred shape matches any size) and dtypes, and hold finite values (and no negative
    BatchNorm variance: :func:`mxvision.models.store.check_weight_values`).
    """
    path = Path(path)
    if not path.exists():
        raise BadRun(path, "no such parameters file")
    check_params_file(path)
    try:
        loaded = mx.nd.load(str(path))
    except mx.base.MXNetError as err:
        raise BadRun(path, f"not a parameters file ({mxnet_error_line(err)})") from None
    if not isinstance(loaded, dict):
        raise BadRun(path, "holds unnamed arrays; not a parameters file")
    params = block._collect_params_with_prefix()  # the structural names save_parameters writes
    missing, extra = sorted(set(params) - set(loaded)), sorted(set(loaded) - set(params))
    if missing or extra:
        raise BadRun(path, "does not fit the network: " + "; ".join(
            f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for what, names in (("missing", missing), ("unexpected", extra)) if names))
    for name, param in params.items():
        found, want = loaded[name], tuple(param.shape or ())
        dtype, found_dtype = np.dtype(param.dtype).name, np.dtype(found.dtype).name
        if found_dtype != dtype or len(found.shape) != len(want) or \
                any(w not in (0, d) for w, d in zip(want, found.shape)):
            raise BadRun(path, f"parameter {name} is {found_dtype} {found.shape}; the network needs "
                               f"{dtype} {want}")
    check_weight_values(loaded, str(path))
    for name, param in params.items():
        param._load_init(loaded[name], ctx)


# --- checkpoints ---------------------------------------------------------------------------------

def save_checkpoint(run_dir, number, blocks, trainer, unit="epoch"):
    """Write each block's parameters (``blocks``: {extension: Gluon block}, e.g. ``{"params":
    head}``) and then the trainer state (``.states``) of epoch (step) ``number``, each atomically."""
    for ext, block in blocks.items():
        with atomic_path(checkpoint_path(run_dir, number, ext, unit)) as tmp:
            block.save_parameters(tmp)
    with atomic_path(checkpoint_path(run_dir, number, "states", unit)) as tmp:
        save_trainer_states(trainer, tmp)


def load_checkpoint(run_dir, number, blocks, trainer, ctx, unit="epoch"):
    """Restore what :func:`save_checkpoint` wrote for epoch (step) ``number`` into ``blocks`` and
    ``trainer``; ``ctx`` a context or a list of them."""
    for ext, block in blocks.items():
        load_parameters(block, checkpoint_path(run_dir, number, ext, unit), ctx)
    load_trainer_states(trainer, checkpoint_path(run_dir, number, "states", unit))


def checkpoint_numbers(run_dir, unit="epoch"):
    """The epochs (steps) that have a checkpoint file in ``run_dir``, ascending."""
    numbers = set()
    for path in (Path(run_dir) / CHECKPOINTS).glob(f"{unit}-*.*"):
        number = path.name[len(unit) + 1:].split(".", 1)[0]
        if number.isdigit():
            numbers.add(int(number))
    return sorted(numbers)


def _remove(run_dir, numbers, unit):
    folder = Path(run_dir) / CHECKPOINTS
    for number in numbers:
        for path in folder.glob(checkpoint_path(run_dir, number, "*", unit).name):  # every extension
            path.unlink(missing_ok=True)


def prune_checkpoints(run_dir, last, keep, unit="epoch"):
    """Delete the checkpoints up to epoch (step) ``last`` but the newest ``keep`` of them (0 keeps
    all; a checkpoint of every 200 MB head epoch would fill the disk). Later numbers (left by an
    earlier run, not this one's) and ``best.params`` stay."""
    if keep <= 0:
        return
    _remove(run_dir, [n for n in checkpoint_numbers(run_dir, unit) if n <= last][:-keep], unit)


def remove_checkpoints(run_dir, unit="epoch"):
    """Delete every checkpoint of ``unit``: a fresh run's start, where another run's checkpoints
    would be pruned as if they were this one's."""
    _remove(run_dir, checkpoint_numbers(run_dir, unit), unit)


# --- the best epoch and the log ------------------------------------------------------------------

def is_better(row, best):
    """Whether epoch ``row`` beats ``best`` (None: no best yet): higher val AUC, or lower val loss
    when the AUCs are equal or one is NaN (a validation split of one class)."""
    if best is None:
        return True
    auc, best_auc = row["val_auc"], best["val_auc"]
    if not (math.isnan(auc) or math.isnan(best_auc)) and auc != best_auc:
        return auc > best_auc
    return row["val_loss"] < best["val_loss"]


def best_row(state, unit="epoch"):
    """The history row of the state's best epoch (step), or None before the first."""
    return next((r for r in state["history"] if r[unit] == state[f"best_{unit}"]), None)


def update_best(run_dir, state, row, copies=None):
    """If epoch ``row`` is the best so far (:func:`is_better`), make it ``state``'s best epoch and
    copy its checkpoint files to the run's best files (``copies``: {extension: file name},
    default ``{"params": "best.params"}``). Returns whether it was."""
    if not is_better(row, best_row(state)):
        return False
    state["best_epoch"] = row["epoch"]
    for ext, name in (copies or {"params": BEST}).items():
        with atomic_path(Path(run_dir) / name) as tmp:
            shutil.copyfile(checkpoint_path(run_dir, row["epoch"], ext), tmp)
    return True


def finish_epoch(run_dir, state, row, keep):
    """Add epoch ``row`` to ``state``, write ``state.json`` (the epoch is finished from then on),
    prune the checkpoints to the newest ``keep`` and rewrite the log. Call after its checkpoint."""
    state["history"].append(row)
    state["last_epoch"] = row["epoch"]
    write_json(Path(run_dir) / STATE, state)
    prune_checkpoints(run_dir, row["epoch"], keep)
    write_log(run_dir, state["history"])


def check_finite(run_dir, epoch, lr, *values):
    """Refuse an epoch whose training loss or probabilities are NaN or infinite (training diverged,
    usually a too-large ``lr``) before its metrics or checkpoint are written: the run keeps its
    earlier epochs, and the user gets one line instead of NaN metrics or a traceback from sklearn."""
    if all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in values):
        return
    last = f"epochs up to {epoch - 1} are kept" if epoch > 1 else "no epoch was kept"
    raise BadRun(run_dir, f"training diverged in epoch {epoch}: the loss or the probabilities are "
                          f"NaN or infinite (learning rate {lr:g}); {last}; lower --lr and rerun "
                          "with --no-resume")


def record_epoch(run_dir, state, row, head, trainer, keep):
    """Everything a head run writes for a finished epoch: checkpoint, best, state, log."""
    save_checkpoint(run_dir, row["epoch"], {"params": head}, trainer)
    update_best(run_dir, state, row)
    finish_epoch(run_dir, state, row, keep)


def write_log(run_dir, history, columns=None, float_format=None, with_json=True):
    """``log.csv`` of ``history`` (``columns``: default the first row's keys; ``float_format``, e.g.
    ``".4f"``: how floats are written, default as Python prints them) and, ``with_json``, the
    history as ``log.json``."""
    columns = list(columns or history[0])

    def cell(value):
        return f"{value:{float_format}}" if float_format and isinstance(value, float) else value

    with atomic_path(Path(run_dir) / LOG_CSV) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: cell(r[k]) for k in columns} for r in history)
    if with_json:
        write_json(Path(run_dir) / LOG_JSON, history)


# --- reading a run -------------------------------------------------------------------------------

def load_run(run_dir):
    """``(config, state)`` of a finished (or partial) run, both checked (:func:`check_config`,
    :func:`check_state`). Refuses a folder without ``config.json`` or ``best.params`` (no epoch
    finished there) with a clear error."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).exists() or not (run_dir / BEST).exists():
        raise BadRun(run_dir, "not a training run (no config.json/best.params); run `mxvision train` first")
    if not (run_dir / BEST).is_file():
        raise BadRun(run_dir / BEST, "not a regular file; expected the best epoch's parameters")
    config = check_config(read_run_json(run_dir / CONFIG), run_dir / CONFIG)
    return config, check_state(read_run_json(run_dir / STATE), run_dir / STATE, planned_count(config))
