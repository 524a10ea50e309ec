"""Training the Xvision head on a feature store, with per-epoch checkpoints and resume.

The run folder it writes (config, state, log, checkpoints, best head, curve) is described and
handled by :mod:`mxvision.train.runs`.

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
import logging
import math
import numbers
import time
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from mxvision.train import calibrators, metrics, multilabel, runs
from mxvision.runtime import parse_ctx
from mxvision.errors import BadRun, MxvisionError
from mxvision.features.quantize import load_extractor
from mxvision.features.store import FeatureStore
from mxvision.models.classifier import XvisionClassifier
from mxvision.models.head import XvisionHead
from mxvision.features.stream import DEFAULT_MAX_MEMORY, ShardStream, epoch_rng
from mxvision.utils import atomic_path, file_digest, write_json

log = logging.getLogger(__name__)

DEFAULTS = {"epochs": 20, "lr": 0.01, "batch_size": 32, "momentum": 0.0, "wd": 0.0, "seed": 0,
            "hidden": 512}
# A checkpoint of the 2048x7x7 head is ~200 MB; keeping every epoch of a 20-epoch run costs 4 GB.
KEEP_CHECKPOINTS = 3
#: Smallest batch trained on: the head's BatchNorm, in train mode, normalises a batch by its own
#: mean and variance, so on one sample it outputs its bias whatever the input and no gradient
#: reaches the layer before it (a run with batches of one never changes those weights).
MIN_BATCH = 2


def predict_probs(head, features, ctx, batch_size=64, sigmoid=False):
    """Softmax probabilities of ``head`` for a float32 feature array, in inference mode
    (``sigmoid``: one independent probability per output, for a multi-label head)."""
    out = []
    for start in range(0, len(features), batch_size):
        x = mx.nd.array(features[start:start + batch_size], ctx=ctx)
        out.append(mx.nd.sigmoid(head(x)).asnumpy() if sigmoid else mx.nd.softmax(head(x)).asnumpy())
    return np.concatenate(out)


def epoch_batches(n, batch_size, seed, epoch):
    """The row numbers of each batch of epoch ``epoch`` (1-based) over ``n`` rows: a shuffle that
    depends only on (seed, epoch), so a resumed run draws what an uninterrupted one would (the
    formula :func:`mxvision.features.stream.epoch_rng` shares with streamed training). A trailing
    batch of one row is dropped (BatchNorm needs 2)."""
    order = epoch_rng(seed, epoch).permutation(n)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in batches if len(b) > 1]


def check_settings(store, epochs, lr, batch_size, train_split="train", classes=True):
    """Refuse, before anything is written, settings a run could not learn from: fewer than one
    epoch, a learning rate that is not a finite positive number, batches of fewer than
    :data:`MIN_BATCH` samples, or a training split with fewer than two rows or only one class
    (a model of one class reports accuracy 1 and AUC NaN having learnt nothing; not checked when
    ``classes`` is False: a multi-label head's labels are checked by
    :func:`mxvision.train.multilabel.choose_labels`)."""
    if not (isinstance(epochs, numbers.Integral) and epochs >= 1):
        raise MxvisionError(f"epochs {epochs!r}", "must be an integer of at least 1")
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise MxvisionError(f"lr {lr!r}", "must be a finite number above 0")
    if not (isinstance(batch_size, numbers.Integral) and batch_size >= MIN_BATCH):
        raise MxvisionError(f"batch size {batch_size!r}", f"must be at least {MIN_BATCH}: BatchNorm on "
                            "a batch of one sample outputs its bias, so nothing before it would learn")
    store.check_complete()
    rows = [shard["rows"][k] for shard, keep in zip(store.manifest["shards"], store.split_rows(train_split))
            for k in keep]
    if len(rows) < MIN_BATCH:
        raise BadRun(store.path, f"split {train_split!r} has {len(rows)} feature row(s); training "
                                 f"needs at least {MIN_BATCH}")
    found = sorted({store.items[r]["label_id"] for r in rows})
    if classes and len(found) < 2:
        raise BadRun(store.path, f"split {train_split!r} has only class {store.classes[found[0]]!r} "
                                 f"({len(rows)} rows); training needs at least two classes")


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
               window_shards=None, calibrate=None, labels=None):
    """Train the Xvision head on ``features``; return the final ``state`` dict (log, best epoch).

    A checkpoint is written every epoch; only the newest ``keep_checkpoints`` are kept (0: all),
    plus ``best.params``. ``stream``: ``"auto"`` streams shards when the train + val rows exceed
    ``max_memory`` bytes (float32), ``True`` always, ``False`` never (loads everything).

    Batch sizes: ``batch_size`` must be at least :data:`MIN_BATCH` (2). A batch of one sample in
    train mode makes the head's BatchNorm output its bias whatever the input, so nothing before
    it would learn; for the same reason the last batch of an epoch is dropped when it would hold
    a single sample (:func:`epoch_batches`; streamed: ``ShardStream``'s ``drop_singleton``), so
    every batch trained on has at least two samples. Settings that cannot train (this, fewer than
    one epoch, a non-finite or non-positive ``lr``, a training split of one class) are refused
    by :func:`check_settings` before ``out_dir`` is created.

    ``calibrate`` (``"platt"`` or ``"isotonic"``): after the last epoch, fit a probability
    calibrator on the best head's ``val_split`` probabilities and keep it as ``calibration.json``
    (:mod:`mxvision.train.calibrators`; ``config.json`` records it); None removes one an earlier
    run left in ``out_dir``.
    """
    store = features if isinstance(features, FeatureStore) else FeatureStore(features)
    # labels: a multi-label head on these pathologies (mxvision.train.multilabel), else softmax
    label_names = None if labels is None else multilabel.choose_labels(store, labels, train_split)
    check_settings(store, epochs, lr, batch_size, train_split, classes=label_names is None)
    if label_names and (calibrate is not None or stream is True):
        raise MxvisionError("labels", "multi-label training has no --calibrate and loads the features "
                                      "in memory (no streaming)")
    if calibrate is not None:  # refused before any epoch, not after them
        calibrators.check_split_for_calibration(calibrate, store, val_split)
    run_dir = runs.prepare_run_dir(out_dir)
    ctx = parse_ctx(ctx)
    hyper = dict(DEFAULTS, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum, wd=wd,
                 seed=seed)
    if stream not in ("auto", True, False):
        raise BadRun(run_dir, f"stream must be 'auto', True or False, not {stream!r}")
    if stream == "auto" and label_names:
        stream = False
    if stream == "auto":
        needed = (store.count(train_split) + store.count(val_split)) * store.row_bytes()
        stream = needed > max_memory
    config = {"features": runs.features_provenance(store), "hyper": hyper,
              "splits": {"train": train_split, "val": val_split}}
    if label_names:
        config.update(task=multilabel.TASK, labels=label_names)
    state = runs.load_or_start(run_dir, config, resume)
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
        x_train, y_train, ids_train = store.load(train_split)
        x_val, y_val, ids_val = store.load(val_split)
        if label_names:  # (N, L) targets, NaN where a label is missing
            y_train = multilabel.store_targets(store, ids_train, label_names)
            y_val = multilabel.store_targets(store, ids_val, label_names)
        sample = x_train[:2]
    write_json(run_dir / runs.CONFIG, config)
    mx.random.seed(seed)
    head = XvisionHead(classes=len(label_names or store.classes), hidden=hyper["hidden"])
    head.initialize(mx.init.Xavier(), ctx=ctx)
    head.hybridize()
    head(mx.nd.array(sample, ctx=ctx))  # materialise deferred shapes before loading/saving
    trainer = gluon.Trainer(head.collect_params(), "sgd",
                            {"learning_rate": lr, "momentum": momentum, "wd": wd})
    start = state["last_epoch"]
    if start:
        runs.load_checkpoint(run_dir, start, {"params": head}, trainer, ctx)
        log.info("resuming %s after epoch %d", run_dir, start)
    loss_fn = multilabel.masked_bce_loss if label_names else gluon.loss.SoftmaxCrossEntropyLoss()

    for epoch in tqdm(range(start + 1, epochs + 1), desc="train", unit="epoch",
                      initial=start, total=epochs, disable=not progress):
        tic = time.time()
        if stream:
            train_loss, train_accuracy, n_seen = _stream_epoch(head, trainer, loss_fn, train_stream,
                                                                epoch, ctx)
            val_probs, y_val = _predict_stream(head, store, val_split, ctx)
        else:
            for batch in epoch_batches(len(x_train), batch_size, seed, epoch):
                x = mx.nd.array(x_train[batch], ctx=ctx)
                y = mx.nd.array(y_train[batch], ctx=ctx)
                with autograd.record():
                    loss = loss_fn(head(x), y)
                loss.backward()
                trainer.step(len(batch))
            train_probs = predict_probs(head, x_train, ctx, sigmoid=bool(label_names))
            val_probs = predict_probs(head, x_val, ctx, sigmoid=bool(label_names))
            if label_names:
                runs.check_finite(run_dir, epoch, lr, train_probs, val_probs)
                runs.record_epoch(run_dir, state, multilabel.epoch_row(
                    epoch, y_train, train_probs, y_val, val_probs, round(time.time() - tic, 3)),
                    head, trainer, keep_checkpoints)
                continue
            train_loss = metrics.cross_entropy(y_train, train_probs)
            train_accuracy = float((train_probs.argmax(1) == y_train).mean())
        runs.check_finite(run_dir, epoch, lr, train_loss, val_probs)
        row = {"epoch": epoch,
               "train_loss": train_loss,
               "train_accuracy": train_accuracy,
               "val_loss": metrics.cross_entropy(y_val, val_probs),
               "val_accuracy": float((val_probs.argmax(1) == y_val).mean()),
               "val_auc": metrics.auc_score(y_val, val_probs),
               "seconds": round(time.time() - tic, 3)}
        runs.record_epoch(run_dir, state, row, head, trainer, keep_checkpoints)
    if state["history"]:  # also repairs a run killed between state.json and the log of its last epoch
        runs.prune_checkpoints(run_dir, state["last_epoch"], keep_checkpoints)
        runs.write_log(run_dir, state["history"])
    plot_training_curve(state["history"], run_dir / runs.CURVE, state["best_epoch"])
    _calibrate_best_head(run_dir, config, calibrate, store, val_split, state, ctx)
    return state


def _calibrate_best_head(run_dir, config, kind, store, val_split, state, ctx):
    """Fit ``kind`` on the best epoch's validation probabilities (the head in memory is the last
    epoch's), write ``calibration.json`` and record it in ``config.json``."""
    calibration = None
    if kind is not None and state["best_epoch"]:
        best, _ = load_head(run_dir, ctx=ctx)
        probs, labels = _predict_stream(best, store, val_split, ctx)
        fitted = calibrators.fit_run_calibrator(run_dir, kind, labels, probs, state["best_epoch"],
                                                store.classes, split=val_split)
        calibration = {"kind": kind, "file": calibrators.CALIBRATION, "epoch": fitted["epoch"],
                       "fitted_on": fitted["fitted_on"]}
    else:
        calibrators.fit_run_calibrator(run_dir, None, None, None, None, store.classes)
    if config.get("calibration") != calibration:
        config["calibration"] = calibration
        write_json(run_dir / runs.CONFIG, config)


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


def load_head(run_dir, ctx=None, epoch=None):
    """The trained head of a run (best epoch unless ``epoch`` is given), ready for inference.

    The run's files are checked as they are read: ``config.json`` and ``state.json``
    (:func:`mxvision.train.runs.load_run`), then the parameters, whose names, shapes and dtypes
    must be those of the head the config describes (its shapes inferred from the config's
    feature shape, without allocating weights) and whose values must be finite
    (:func:`mxvision.train.runs.load_parameters`); any problem is one line naming the file.
    """
    run_dir = Path(run_dir)
    config, _ = runs.load_run(run_dir)
    ctx = parse_ctx(ctx)
    features = config["features"]
    head = XvisionHead(classes=len(multilabel.output_names(config)), hidden=config["hyper"]["hidden"])
    head.infer_shape(mx.nd.zeros((1,) + tuple(features["feature_shape"])))
    params = run_dir / runs.BEST if epoch is None else runs.checkpoint_path(run_dir, epoch, "params")
    runs.load_parameters(head, params, ctx)
    return head, config


def backbone_file(features_info):
    """The exact backbone weights the run's features came from, checked against their sha1."""
    weights = features_info["weights"]
    path = Path(weights["file"])
    if not path.is_absolute():  # random weights are kept inside the feature store
        path = Path(features_info["features_dir"]) / path
    if not path.is_file():
        raise BadRun(path, "backbone weights of this run are missing (needed to rebuild the model)")
    if file_digest(path, "sha1") != weights["sha1"]:
        raise BadRun(path, "backbone weights changed since the features were extracted")
    return path


def load_classifier(run_dir, ctx=None, softmax=True, dtype=None):
    """Rebuild the full network of a run: the backbone its features came from + its best head.

    The backbone runs in the precision the features were extracted with (bfloat16/INT8 features:
    the converted network kept in the feature store; pooled features: plus the pooling), so
    predictions match the features the head was trained on. ``dtype="float32"`` forces the
    float32 backbone (portable, e.g. for a GPU or for export without oneDNN). A multi-label run
    (:mod:`mxvision.train.multilabel`) loads with ``softmax=False`` only (logits; its
    probabilities are their sigmoid).
    """
    ctx = parse_ctx(ctx)
    head, config = load_head(run_dir, ctx=ctx)
    if softmax and multilabel.is_multilabel(config):
        # a softmax across independent labels would be a wrong model, silently (export, serve)
        raise BadRun(run_dir, "is a multi-label run: its outputs are one sigmoid probability per "
                              "label, not softmax class probabilities (export and serve take softmax "
                              "runs only for now)")
    features_info = dict(config["features"])
    if dtype == "float32":
        features_info["dtype"] = "float32"
    elif dtype not in (None, features_info.get("dtype", "float32")):
        raise BadRun(run_dir, f"its features were extracted in {features_info.get('dtype', 'float32')}; "
                              f"a {dtype} backbone would not match them (float32 is the only alternative)")
    backbone, used = load_extractor(features_info, ctx=ctx,
                                    fp32_weights_file=backbone_file(features_info))
    net = XvisionClassifier(backbone, head, softmax=softmax)
    net.precision = used  # the backbone precision actually used (export records it)
    return net, config
