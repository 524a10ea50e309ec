"""Training the Xvision head on a feature store, with per-epoch checkpoints and resume.

A run directory holds::

    config.json            what was trained on what (feature store, backbone, weights, hyper-parameters)
    checkpoints/epoch-NNNN.params / .states    head parameters and trainer (SGD) state of each epoch
    state.json             the last finished epoch, the per-epoch log and the best epoch so far
    log.csv                epoch, train/val loss, accuracy, val AUC, seconds
    training_curve.png     loss and accuracy/AUC per epoch
    best.params            the head of the best validation epoch (AUC, then loss)

Features larger than memory: when the train and validation rows of the store would take more than
``max_memory`` bytes in float32 (default 1 GiB), the head is trained on shuffled batches streamed
from the shards (:class:`mxvision.features.stream.ShardStream`), so memory stays bounded whatever the
store's size; smaller stores are loaded whole, exactly as before. When streaming, the epoch's
training loss and accuracy are the running figures of its batches (train mode, before each
update), not a second pass over the training set; validation is a full pass either way.

An epoch counts as finished only once its parameters, trainer state and ``state.json`` are all
written (each atomically), so a run killed at any moment resumes from the last finished epoch and
ends with the same weights as an uninterrupted run: the shuffling of epoch *k* depends only on the
seed and *k*.
"""
import csv
import logging
import math
import shutil
import time
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from mxvision.train import metrics
from mxvision.runtime import parse_ctx
from mxvision.errors import BadRun
from mxvision.features.store import FeatureStore
from mxvision.models.head import XvisionHead
from mxvision.train.optim_state import load_trainer_states, save_trainer_states
from mxvision.features.stream import DEFAULT_MAX_MEMORY, ShardStream
from mxvision.utils import atomic_path, clean_stale_temps, read_json, write_json

log = logging.getLogger(__name__)

CONFIG, STATE = "config.json", "state.json"
DEFAULTS = {"epochs": 20, "lr": 0.01, "batch_size": 32, "momentum": 0.0, "wd": 0.0, "seed": 0,
            "hidden": 512}
# A checkpoint of the 2048x7x7 head is ~200 MB; keeping every epoch of a 20-epoch run costs 4 GB.
KEEP_CHECKPOINTS = 3
# Settings that must not change when a run is resumed (epochs may grow).
_FIXED = ("lr", "batch_size", "momentum", "wd", "seed", "hidden")


def predict_probs(head, features, ctx, batch_size=64):
    """Softmax probabilities of ``head`` for a float32 feature array, in inference mode."""
    out = []
    for start in range(0, len(features), batch_size):
        x = mx.nd.array(features[start:start + batch_size], ctx=ctx)
        out.append(mx.nd.softmax(head(x)).asnumpy())
    return np.concatenate(out)


def _features_provenance(store):
    m = store.manifest
    return {"features_dir": str(store.path.resolve()), "backbone": m["backbone"], "cut": m["cut"],
            "weights": m["weights"], "preprocessing": m["preprocessing"],
            "feature_shape": m["feature_shape"], "classes": m["classes"],
            "dtype": m.get("dtype", "float32"), "storage_dtype": m.get("storage_dtype", "float32"),
            "pooled": bool(m.get("pooled", False)), "precision": m.get("precision")}


def _checkpoint(run_dir, epoch, ext):
    return Path(run_dir) / "checkpoints" / f"epoch-{epoch:04d}.{ext}"


def _save_epoch(run_dir, epoch, head, trainer):
    for ext, save in (("params", head.save_parameters),
                      ("states", lambda path: save_trainer_states(trainer, path))):
        with atomic_path(_checkpoint(run_dir, epoch, ext)) as tmp:
            save(tmp)


def _prune_checkpoints(run_dir, last_epoch, keep):
    """Delete epoch checkpoints older than the newest ``keep`` (0 keeps all); best.params stays."""
    if keep <= 0:
        return
    for epoch in range(1, last_epoch - keep + 1):
        for ext in ("params", "states"):
            _checkpoint(run_dir, epoch, ext).unlink(missing_ok=True)


def _is_better(row, best):
    if best is None:
        return True
    auc, best_auc = row["val_auc"], best["val_auc"]
    if not (math.isnan(auc) or math.isnan(best_auc)) and auc != best_auc:
        return auc > best_auc
    return row["val_loss"] < best["val_loss"]


def _batches(n, batch_size, seed, epoch):
    """Shuffled batches of epoch ``epoch``; a trailing batch of one is dropped (BatchNorm needs 2)."""
    order = np.random.RandomState(seed * 100003 + epoch).permutation(n)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in batches if len(b) > 1]


def _load_or_start(run_dir, config, resume):
    state_file = run_dir / STATE
    if not (resume and state_file.exists()):
        return {"last_epoch": 0, "history": [], "best_epoch": None}
    old = read_json(run_dir / CONFIG)
    changed = [k for k in _FIXED if old["hyper"].get(k) != config["hyper"][k]]
    if old["features"]["features_dir"] != config["features"]["features_dir"]:
        changed.append("features")
    if changed:
        raise BadRun(run_dir, f"holds a run with other settings ({', '.join(changed)}); "
                              "use a new --out or --no-resume")
    return read_json(state_file)


def _predict_stream(head, store, split, ctx, batch_size=64):
    """Probabilities and labels of every row of ``split``, one shard in memory at a time."""
    probs, labels = [], []
    for x, y, _ in store.iter_shards(split, verify=False):
        probs.append(predict_probs(head, x, ctx, batch_size))
        labels.append(y)
    if not probs:
        raise BadRun(store.path, f"no features for split {split!r}")
    return np.concatenate(probs), np.concatenate(labels)


def train_head(features, out_dir, epochs=20, lr=0.01, batch_size=32, momentum=0.0, wd=0.0,
               seed=0, ctx=None, resume=True, progress=True, train_split="train", val_split="val",
               keep_checkpoints=KEEP_CHECKPOINTS, stream="auto", max_memory=DEFAULT_MAX_MEMORY,
               window_shards=None):
    """Train the Xvision head on ``features``; return the final ``state`` dict (log, best epoch).

    A checkpoint is written every epoch; only the newest ``keep_checkpoints`` are kept (0: all),
    plus ``best.params``. ``stream``: ``"auto"`` streams shards when the train + val rows exceed
    ``max_memory`` bytes (float32), ``True`` always, ``False`` never (loads everything).
    """
    store = features if isinstance(features, FeatureStore) else FeatureStore(features)
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for folder in (run_dir, run_dir / "checkpoints"):
        clean_stale_temps(folder)  # left by a killed run; resuming never needs them
    ctx = parse_ctx(ctx)
    hyper = dict(DEFAULTS, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum, wd=wd,
                 seed=seed)
    if stream not in ("auto", True, False):
        raise BadRun(run_dir, f"stream must be 'auto', True or False, not {stream!r}")
    if stream == "auto":
        needed = (store.count(train_split) + store.count(val_split)) * store.row_bytes()
        stream = needed > max_memory
    config = {"features": _features_provenance(store), "hyper": hyper,
              "splits": {"train": train_split, "val": val_split}}
    state = _load_or_start(run_dir, config, resume)
    if stream:
        train_stream = ShardStream(store, train_split, batch_size, seed=seed,
                                   window_shards=window_shards, max_memory=max_memory)
        config["streaming"] = {"window_shards": train_stream.window_shards, "max_memory": max_memory,
                               "train_metrics": "running, in train mode, during the epoch"}
        store.check_complete()
        first = next(store.iter_shards(train_split), None)
        if first is None:
            raise BadRun(store.path, f"no features for split {train_split!r}")
        sample = first[0][:2]
        del first
    else:
        x_train, y_train, _ = store.load(train_split)
        x_val, y_val, _ = store.load(val_split)
        sample = x_train[:2]
    write_json(run_dir / CONFIG, config)
    mx.random.seed(seed)
    head = XvisionHead(classes=len(store.classes), hidden=hyper["hidden"])
    head.initialize(mx.init.Xavier(), ctx=ctx)
    head.hybridize()
    head(mx.nd.array(sample, ctx=ctx))  # materialise deferred shapes before loading/saving
    trainer = gluon.Trainer(head.collect_params(), "sgd",
                            {"learning_rate": lr, "momentum": momentum, "wd": wd})
    start = state["last_epoch"]
    if start:
        head.load_parameters(str(_checkpoint(run_dir, start, "params")), ctx=ctx)
        load_trainer_states(trainer, _checkpoint(run_dir, start, "states"))
        log.info("resuming %s after epoch %d", run_dir, start)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    for epoch in tqdm(range(start + 1, epochs + 1), desc="train", unit="epoch",
                      initial=start, total=epochs, disable=not progress):
        tic = time.time()
        if stream:
            train_loss, train_accuracy, n_seen = _stream_epoch(head, trainer, loss_fn, train_stream,
                                                                epoch, ctx)
            val_probs, y_val = _predict_stream(head, store, val_split, ctx)
        else:
            for batch in _batches(len(x_train), batch_size, seed, epoch):
                x = mx.nd.array(x_train[batch], ctx=ctx)
                y = mx.nd.array(y_train[batch], ctx=ctx)
                with autograd.record():
                    loss = loss_fn(head(x), y)
                loss.backward()
                trainer.step(len(batch))
            train_probs = predict_probs(head, x_train, ctx)
            val_probs = predict_probs(head, x_val, ctx)
            train_loss = metrics.cross_entropy(y_train, train_probs)
            train_accuracy = float((train_probs.argmax(1) == y_train).mean())
        row = {"epoch": epoch,
               "train_loss": train_loss,
               "train_accuracy": train_accuracy,
               "val_loss": metrics.cross_entropy(y_val, val_probs),
               "val_accuracy": float((val_probs.argmax(1) == y_val).mean()),
               "val_auc": metrics.auc_score(y_val, val_probs),
               "seconds": round(time.time() - tic, 3)}
        _save_epoch(run_dir, epoch, head, trainer)
        best = next((r for r in state["history"] if r["epoch"] == state["best_epoch"]), None)
        if _is_better(row, best):
            state["best_epoch"] = epoch
            with atomic_path(run_dir / "best.params") as tmp:
                shutil.copyfile(_checkpoint(run_dir, epoch, "params"), tmp)
        state["history"].append(row)
        state["last_epoch"] = epoch
        write_json(run_dir / STATE, state)  # the epoch is finished only from here on
        _prune_checkpoints(run_dir, epoch, keep_checkpoints)
        _write_log(run_dir, state["history"])
    if state["history"]:  # also repairs a run killed between state.json and the log of its last epoch
        _prune_checkpoints(run_dir, state["last_epoch"], keep_checkpoints)
        _write_log(run_dir, state["history"])
    plot_training_curve(state["history"], run_dir / "training_curve.png", state["best_epoch"])
    return state


def _stream_epoch(head, trainer, loss_fn, stream, epoch, ctx):
    """One epoch over streamed batches; returns the running train loss, accuracy and row count."""
    loss_sum, correct, seen = 0.0, 0, 0
    for xb, yb in stream.epoch(epoch):
        x = mx.nd.array(xb, ctx=ctx)
        y = mx.nd.array(yb, ctx=ctx)
        with autograd.record():
            out = head(x)
            loss = loss_fn(out, y)
        loss.backward()
        trainer.step(len(yb))
        loss_sum += float(loss.sum().asscalar())
        correct += int((out.argmax(axis=1).asnumpy().astype(np.int64) == yb).sum())
        seen += len(yb)
    return loss_sum / max(seen, 1), correct / max(seen, 1), seen


def _write_log(run_dir, history):
    with atomic_path(run_dir / "log.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    write_json(run_dir / "log.json", history)


def plot_training_curve(history, path, best_epoch=None):
    """Loss (left) and accuracy/AUC (right) per epoch, the best epoch marked. Writes the PNG and
    returns the matplotlib Figure (None for an empty history). A Figure of its own, never pyplot
    or ``matplotlib.use()``: those would switch a running Jupyter kernel's backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        return None
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], label="train accuracy")
    ax_acc.plot(epochs, [r["val_accuracy"] for r in history], label="validation accuracy")
    ax_acc.plot(epochs, [r["val_auc"] for r in history], label="validation AUC")
    ax_acc.set(xlabel="epoch", ylim=(0, 1.02), title="Accuracy and AUC")
    for ax in (ax_loss, ax_acc):
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return fig


def load_run(run_dir):
    """The config and state of a finished (or partial) run, with a clear error if it is not one."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file() or not (run_dir / "best.params").is_file():
        raise BadRun(run_dir, "not a training run (no config.json/best.params); run `mxvision train` first")
    return read_json(run_dir / CONFIG), read_json(run_dir / STATE)


def load_head(run_dir, ctx=None, epoch=None):
    """The trained head of a run (best epoch unless ``epoch`` is given), ready for inference."""
    run_dir = Path(run_dir)
    config, _ = load_run(run_dir)
    ctx = parse_ctx(ctx)
    head = XvisionHead(classes=len(config["features"]["classes"]), hidden=config["hyper"]["hidden"])
    params = run_dir / "best.params" if epoch is None else _checkpoint(run_dir, epoch, "params")
    if not params.is_file():
        raise BadRun(params, "no such checkpoint")
    head.load_parameters(str(params), ctx=ctx)
    return head, config
