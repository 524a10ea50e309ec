"""Fine-tuning a torchxrayvision port's classifier on the user's labelled films, missing labels masked.

torchxrayvision's users ask to adapt its models to their own data, where most films carry labels
for a few of the 18 pathologies only (mlmed/torchxrayvision #63, #119). This trains the port's
last layer -- the (18, 1024) dense classifier of the DenseNets, (18, 2048) of the ResNet -- on the
pooled features of the frozen network, with the masked binary cross-entropy of
:func:`mxvision.train.multilabel.masked_bce_loss`:

* only the chosen ``labels`` enter the loss; every other output's target is NaN, so its row of the
  classifier gets no gradient and, with plain SGD (no weight decay), keeps its published value
  exactly;
* a film whose label is empty (unknown) does not count for that label;
* the features are computed once (the network below the classifier is frozen, in inference mode,
  so its BatchNorm statistics stay torchxrayvision's), then epochs are cheap.

The epoch of best mean validation AUC (:func:`mxvision.train.multilabel.mean_auc`, over the chosen
labels) is kept; epoch 0 is the model as it came, so a fine-tuning that does not help on the
validation films leaves the weights unchanged. The run folder holds ``xrv.params`` (the whole
network, loadable with ``get_model(NAME, weights=RUN/xrv.params)``) and ``config.json`` (model,
base weights, labels, splits, per-epoch log, per-label AUC before and after).

The published ``op_threshs`` were fitted to the published outputs: a retrained output needs its
threshold recomputed (``mxvision xrv calibrate --weights RUN/xrv.params``) before calibrated
scores mean anything; ``config.json`` lists those outputs.
"""
import os
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn
from tqdm import tqdm

from mxvision.data.dataset import XrayDataset
from mxvision.data.index import read_index
from mxvision.data.xrv_transforms import load_xray, preprocess
from mxvision.errors import BadImage, BadIndex, one_line
from mxvision.models import zoo
from mxvision.models.xrv.common import DEFAULT_PATHOLOGIES, get_weights_spec
from mxvision.runtime import parse_ctx
from mxvision.train import multilabel
from mxvision.utils import atomic_path, write_json

__all__ = ["finetune_xrv", "pooled_features", "choose_xrv_labels", "PARAMS_FILE", "CONFIG_FILE"]

PARAMS_FILE = "xrv.params"
CONFIG_FILE = "config.json"
TASK = "xrv-finetune"


def pooled_features(net, paths, batch_size=16, progress=False):
    """``(features (M, C) float32, kept row numbers, errors [(path, message)])`` of the network's
    pooled features (what its classifier sees) for the readable images among ``paths``."""
    kept, errors, feats, batch = [], [], [], []
    ctx = net.classifier.weight.list_ctx()[0]

    def flush():
        if batch:
            x = mx.nd.array(np.stack([img for _, img in batch]), ctx=ctx)
            feats.append(net.features2(x).asnumpy())
            kept.extend(i for i, _ in batch)
            batch.clear()

    for i, path in enumerate(tqdm(paths, desc="features", unit="img", disable=not progress)):
        try:
            batch.append((i, preprocess(load_xray(path), net.resolution)))
        except BadImage as err:
            errors.append((str(path), str(err)))
        if len(batch) >= batch_size:
            flush()
    flush()
    width = net.classifier.weight.shape[1]
    return (np.concatenate(feats) if feats else np.zeros((0, width), np.float32)), kept, errors


def choose_xrv_labels(index_csv, data, labels):
    """The pathology names to train: ``"all"`` (every pathology column of the index with a label)
    or a list / comma-separated text of names; one-line BadIndex for a name that is not one of
    torchxrayvision's or has no column in the index."""
    present = [p for p in data.pathologies if p in DEFAULT_PATHOLOGIES]
    if labels in (None, "all"):
        chosen = [p for p in present if (~np.isnan(data.labels[:, data.pathologies.index(p)])).any()]
    else:
        chosen = [s.strip() for s in (labels.split(",") if isinstance(labels, str) else labels) if s.strip()]
        for name in chosen:
            if name not in DEFAULT_PATHOLOGIES:
                raise BadIndex(index_csv, "--labels: %s is not one of torchxrayvision's pathologies (%s, ...)"
                               % (one_line(repr(name), 40), ", ".join(DEFAULT_PATHOLOGIES[:3])))
            if name not in present:
                raise BadIndex(index_csv, "--labels: no column %s in the index" % name)
    if not chosen:
        raise BadIndex(index_csv, "no pathology labels to train on: add columns named as torchxrayvision's "
                                  "pathologies (%s, ...) holding 1, 0 or empty" % ", ".join(DEFAULT_PATHOLOGIES[:3]))
    return list(dict.fromkeys(chosen))


def _probs(classifier, feats, ctx):
    return multilabel.sigmoid(classifier(mx.nd.array(feats, ctx=ctx)).asnumpy())


def finetune_xrv(index_csv, out_dir, model="densenet121-res224-all", weights=None, labels="all", epochs=20,
                 lr=0.01, batch_size=32, momentum=0.9, seed=0, ctx=None, root=None, progress=False,
                 train_split="train", val_split="val"):
    """Fine-tune ``model``'s classifier on the ``train_split`` films of ``index_csv`` for ``labels``
    (masked BCE), keep the epoch of best mean ``val_split`` AUC; write ``out_dir``; return the config."""
    get_weights_spec(model)  # an unknown name: one line before the index is read
    index = read_index(index_csv)
    try:
        data = XrayDataset.from_index(index)
    except ValueError as err:  # a pathology cell that is not 1, 0 or empty
        raise BadIndex(index_csv, one_line(err, 200)) from None
    chosen = choose_xrv_labels(index_csv, data, labels)
    splits = np.array(index.splits)
    if not (splits == train_split).any():
        raise BadIndex(index_csv, "no film in split %r to train on (write the split column, e.g. with "
                                  "mxvision data split)" % train_split)
    ctx = parse_ctx(ctx)
    net = zoo.get_model(model, weights=weights, calibrated=False, ctx=ctx, root=root, progress=progress)
    base = {"description": net.weights_info.get("description"), "sha1": net.weights_info.get("sha1")}
    feats, kept, errors = pooled_features(net, index.paths, progress=progress)
    targets = np.full((len(index), len(DEFAULT_PATHOLOGIES)), np.nan, dtype=np.float32)
    for name in chosen:
        targets[:, DEFAULT_PATHOLOGIES.index(name)] = data.labels[:, data.pathologies.index(name)]
    targets, splits = targets[kept], splits[kept]
    cols = [DEFAULT_PATHOLOGIES.index(n) for n in chosen]
    # a film without any chosen label adds nothing to the loss; leaving it out of the training rows
    # keeps it out of the feature standardization too, so it changes nothing at all
    labelled = ~np.isnan(targets[:, cols]).all(axis=1)
    train, val = (splits == train_split) & labelled, (splits == val_split) & labelled
    if not train.any():
        raise BadIndex(index_csv, "no readable %s film has a label for %s" % (train_split, ", ".join(chosen)))

    # Trained on standardized features (the same function: W x + b = (W s) z + (b + W m) with
    # z = (x - m) / s), so one learning rate suits any network -- pooled features of random
    # weights are ~1e3, of trained ones ~1 -- then folded back into the network's own space.
    w0 = net.classifier.weight.data().asnumpy().astype(np.float64)
    b0 = net.classifier.bias.data().asnumpy().astype(np.float64)
    mean = feats[train].astype(np.float64).mean(0)
    scale = feats[train].astype(np.float64).std(0)
    scale[scale <= 1e-6 * max(scale.max(), 1e-30)] = 1.0  # constant features: left as they are
    feats = ((feats - mean) / scale).astype(np.float32)
    classifier = nn.Dense(len(DEFAULT_PATHOLOGIES), in_units=feats.shape[1])
    classifier.initialize(ctx=ctx)
    classifier.weight.set_data(mx.nd.array(w0 * scale, ctx=ctx))
    classifier.bias.set_data(mx.nd.array(b0 + w0 @ mean, ctx=ctx))
    trainer = gluon.Trainer(classifier.collect_params(), "sgd",
                            {"learning_rate": lr, "momentum": momentum, "wd": 0.0})
    x_train = mx.nd.array(feats[train], ctx=ctx)
    y_train = mx.nd.array(targets[train], ctx=ctx)
    rng = np.random.RandomState(seed)

    def row(epoch, seconds):
        out = multilabel.epoch_row(epoch, targets[train][:, cols], _probs(classifier, feats[train], ctx)[:, cols],
                                   targets[val][:, cols], _probs(classifier, feats[val], ctx)[:, cols], seconds)
        out["val_label_auc"] = dict(zip(chosen, multilabel.label_aucs(targets[val][:, cols],
                                                                      _probs(classifier, feats[val], ctx)[:, cols])))
        return out

    history = [row(0, 0.0)]
    best = (history[0]["val_auc"], 0, [p.data().copy() for p in (classifier.weight, classifier.bias)])
    for epoch in tqdm(range(1, epochs + 1), desc="finetune", unit="epoch", disable=not progress):
        start = time.time()
        order = rng.permutation(int(train.sum()))
        for i in range(0, len(order), batch_size):
            take = mx.nd.array(order[i:i + batch_size], ctx=ctx)
            xb, yb = x_train.take(take), y_train.take(take)
            with autograd.record():
                loss = multilabel.masked_bce_loss(classifier(xb), yb)
            loss.backward()
            trainer.step(xb.shape[0])
        history.append(row(epoch, time.time() - start))
        score = history[-1]["val_auc"]
        if not np.isnan(score) and (np.isnan(best[0]) or score > best[0]):
            best = (score, epoch, [p.data().copy() for p in (classifier.weight, classifier.bias)])
    weight = best[2][0].asnumpy().astype(np.float64) / scale
    bias = best[2][1].asnumpy().astype(np.float64) - weight @ mean
    untouched = [k for k in range(len(DEFAULT_PATHOLOGIES)) if k not in cols]
    weight[untouched], bias[untouched] = w0[untouched], b0[untouched]  # bit for bit, not via the fold
    if best[1] == 0:  # no epoch beat the model as it came: keep it as it came
        weight, bias = w0, b0
    net.classifier.weight.set_data(mx.nd.array(weight.astype(np.float32), ctx=ctx))
    net.classifier.bias.set_data(mx.nd.array(bias.astype(np.float32), ctx=ctx))
    os.makedirs(out_dir, exist_ok=True)
    params = os.path.join(os.fspath(out_dir), PARAMS_FILE)
    with atomic_path(params) as tmp:
        net.save_parameters(tmp)
    config = {
        "task": TASK, "model": model, "base_weights": base, "index": os.path.abspath(os.fspath(index_csv)),
        "labels": chosen, "trained_outputs": chosen,
        "untouched_outputs": [p for p in DEFAULT_PATHOLOGIES if p not in chosen],
        "films": {"train": int(train.sum()), "val": int(val.sum()), "unreadable": len(errors)},
        "positives": {n: {s: int(np.nansum(targets[m][:, DEFAULT_PATHOLOGIES.index(n)] == 1))
                          for s, m in (("train", train), ("val", val))} for n in chosen},
        "settings": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "momentum": momentum, "wd": 0.0,
                     "seed": seed, "loss": "masked binary cross-entropy (NaN targets do not count)",
                     "trained": "classifier only, on the frozen network's pooled features"},
        "best_epoch": best[1], "history": history,
        "val_label_auc_before": history[0]["val_label_auc"], "val_label_auc_after": history[best[1]]["val_label_auc"],
        "params": PARAMS_FILE,
        "note": "the published op_threshs do not fit retrained outputs: recompute them with mxvision xrv "
                "calibrate --weights %s before using calibrated scores" % params,
        "unreadable": [{"path": p, "error": e} for p, e in errors],
    }
    write_json(os.path.join(os.fspath(out_dir), CONFIG_FILE), config)
    return config
