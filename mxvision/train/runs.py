"""The run folder: what a training run writes, how it resumes, and how it is read back.

Head training (:func:`mxvision.train.loop.train_head`), distributed training
(:mod:`mxvision.distributed.train`) and fine-tuning (:mod:`mxvision.train.finetune`) write the same
layout, so ``evaluate``, ``predict`` and ``export`` read any of them::

    config.json            what was trained on what: ``features`` (the store's provenance,
                           :func:`features_provenance`), ``hyper`` (settings), ``splits``; plus
                           ``streaming``, ``distributed`` or ``finetune`` for those runs
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
"""
import csv
import math
import shutil
from pathlib import Path

from mxvision.errors import BadRun
from mxvision.train.optim_state import load_trainer_states, save_trainer_states
from mxvision.utils import atomic_path, clean_stale_temps, read_json, write_json

CONFIG, STATE, BEST, BACKBONE = "config.json", "state.json", "best.params", "backbone.params"
LOG_CSV, LOG_JSON, CURVE, CHECKPOINTS = "log.csv", "log.json", "training_curve.png", "checkpoints"
# Checkpoint units and the digits of their numbers in file names.
DIGITS = {"epoch": 4, "step": 6}
# Head settings that must not change when a run is resumed (epochs may grow).
FIXED_SETTINGS = ("lr", "batch_size", "momentum", "wd", "seed", "hidden")


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
    return changed


def load_or_start(run_dir, config, resume, changed=settings_changed, kind="run", fresh=None):
    """The state to continue from: ``run_dir``'s ``state.json`` when ``resume`` and the run there
    has the same settings, else ``fresh`` (default :func:`new_state`).

    ``changed(old_config, config)`` names the settings that differ; any is refused, since
    resuming would mix two runs' epochs.
    """
    run_dir = Path(run_dir)
    if not (resume and (run_dir / STATE).exists()):
        return new_state() if fresh is None else fresh
    try:
        old = read_json(run_dir / CONFIG)
    except (OSError, ValueError):
        raise BadRun(run_dir / CONFIG, "unreadable; use a new --out or --no-resume") from None
    different = changed(old, config)
    if different:
        raise BadRun(run_dir, f"holds a {kind} with other settings ({', '.join(different)}); "
                              "use a new --out or --no-resume")
    return read_json(run_dir / STATE)


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
        block.load_parameters(str(checkpoint_path(run_dir, number, ext, unit)), ctx=ctx)
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
    """``(config, state)`` of a finished (or partial) run. Refuses a folder without
    ``config.json`` or ``best.params`` (no epoch finished there) with a clear error."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file() or not (run_dir / BEST).is_file():
        raise BadRun(run_dir, "not a training run (no config.json/best.params); run `mxvision train` first")
    return read_json(run_dir / CONFIG), read_json(run_dir / STATE)
