"""Multi-label training: L sigmoid outputs, one per pathology, and a binary cross-entropy that
missing labels do not enter.

Chest X-ray datasets label only some findings per film (NIH's 14 of torchxrayvision's 18; OpenI's
uncertain "borderline" terms; CheXpert's ``-1``): a missing label is *unknown*, neither positive
nor negative. torchxrayvision trains on such data with a masked loss; so does mxvision:

* the targets are a float32 (N, L) matrix with NaN where the label is missing
  (:func:`target_matrix`, from a feature store's ``targets`` or an index's pathology columns);
* :func:`masked_bce_loss` gives each NaN entry weight 0 and averages over the observed entries;
* the validation score is the mean over labels of the per-label AUC, each on the films whose
  label is known (:func:`mean_auc`); the best epoch is chosen by it as for a softmax head.

The head is the Xvision head with L outputs (:class:`mxvision.models.head.XvisionHead`); the
training loop is :func:`mxvision.train.loop.train_head` with ``labels=``, fine-tuning
:func:`mxvision.train.finetune.finetune_run` of such a run. A run records ``task: "multilabel"``
and its ``labels`` in ``config.json``.
"""
import logging
import math

import mxnet as mx
import numpy as np
from mxnet import gluon
from sklearn import metrics as skm

from mxvision.data.labels import parse_value
from mxvision.errors import BadRun, MxvisionError

log = logging.getLogger(__name__)

TASK = "multilabel"
#: The Gluon loss behind :func:`masked_bce_loss`: logits in, numerically stable
#: (``max(x, 0) - x * t + log(1 + exp(-|x|))``).
_BCE = gluon.loss.SigmoidBinaryCrossEntropyLoss(from_sigmoid=False)


def is_multilabel(config):
    """Whether a run's ``config.json`` describes a multi-label head."""
    return config.get("task") == TASK


def output_names(config):
    """The names of a run's outputs: its labels (multi-label) or its classes (softmax)."""
    return list(config["labels"]) if is_multilabel(config) else list(config["features"]["classes"])


def masked_bce_loss(logits, targets):
    """Binary cross-entropy of ``logits`` (N, L) against ``targets`` (N, L; 1, 0 or NaN = missing),
    as one value per sample like every Gluon loss: ``loss.mean()`` is the mean over the
    *observed* entries of the batch, so ``loss.backward(); trainer.step(N)`` takes its gradient.

    Why not Gluon's loss alone: SigmoidBinaryCrossEntropyLoss with a 0/1 ``sample_weight``
    removes an entry's value, but a NaN target still makes it NaN (NaN * 0 is NaN, in the value
    and in the gradient), and it averages over all L entries, so a row with many missing labels
    would count less. The NaN targets are therefore replaced by 0 before the loss (their weight is
    0), and each row is rescaled by L * N / (observed entries in the batch). A batch without any
    observed entry gives zeros (no gradient), not a division by zero.
    """
    observed = targets == targets  # False exactly at NaN
    mask = observed.astype(logits.dtype)
    filled = mx.nd.where(observed, targets, mx.nd.zeros_like(targets))
    per_row = _BCE(logits, filled, mask)  # mean over the L entries of mask * bce
    n, n_labels = logits.shape
    count = mx.nd.maximum(mask.sum(), 1.0)
    return per_row * (n * n_labels) / count


def sigmoid(logits):
    """The probabilities of logits (NumPy), without overflow for large negative logits."""
    logits = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -logits))


def masked_bce(targets, probs):
    """:func:`masked_bce_loss`'s value (the mean over observed entries) from probabilities, in
    NumPy: what the training log reports as a multi-label loss. NaN when nothing is observed."""
    targets, probs = np.asarray(targets, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    observed = ~np.isnan(targets)
    if not observed.any():
        return float("nan")
    p = np.clip(probs[observed], 1e-12, 1 - 1e-12)
    t = targets[observed]
    return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))


def target_matrix(items, pathologies, order=None):
    """float32 (N, L) targets of ``items`` for ``pathologies`` (L names): 1, 0, NaN for missing.

    ``items`` are feature-store items, whose ``targets`` list holds one 1/0/None per name of
    ``order`` (the store's :attr:`~mxvision.features.store.FeatureStore.pathologies`), or index
    records (dicts of strings, :meth:`mxvision.data.index.Index.records`) whose pathology columns
    are read with :func:`mxvision.data.labels.parse_value` (``''`` and ``-1`` are missing).
    """
    pathologies = list(pathologies)
    out = np.full((len(items), len(pathologies)), np.nan, dtype=np.float32)
    columns = None if order is None else [list(order).index(p) for p in pathologies]
    for k, item in enumerate(items):
        if columns is not None and "targets" in item:
            row = item["targets"]
            out[k] = [np.nan if row[c] is None else row[c] for c in columns]
        else:
            out[k] = [parse_value(item.get(p, "")) for p in pathologies]
    return out


def store_targets(store, ids, labels):
    """The target matrix of the store's rows with ``ids`` (as :meth:`FeatureStore.load` returns
    them) for ``labels``."""
    position = {item["id"]: k for k, item in enumerate(store.items)}
    return target_matrix([store.items[position[i]] for i in ids], labels, store.pathologies)


def choose_labels(store, labels, train_split="train"):
    """The pathologies a multi-label head is trained on: ``"all"``, a comma-separated string or a
    list of names.

    A label needs a positive and a negative among the known labels of ``train_split`` (else its
    loss only pushes the output to one end and its AUC does not exist). A named label without
    them is refused in one line, as are a store without pathology targets, a name the store lacks
    and a name given twice. ``"all"`` takes every pathology of the store that has both and leaves
    the others out with a warning: an index builder writes all 18 torchxrayvision columns, and
    NIH, for one, labels only 14 of them (the other four are empty on every film).
    """
    available = list(store.pathologies)
    if not available:
        raise BadRun(store.path, "holds no pathology targets for multi-label training; extract from "
                                 "an index with pathology columns (e.g. Atelectasis,...,Nodule)")
    every = isinstance(labels, str) and labels.strip() == "all"
    if isinstance(labels, str):
        names = available if every else [n.strip() for n in labels.split(",")]
    else:
        names = [str(n).strip() for n in labels]
    if not names or not all(names):
        raise MxvisionError(f"labels {labels!r}", "expected all or NAME,NAME,... without empty names")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MxvisionError(f"labels {','.join(names)}", f"{', '.join(twice)} given twice")
    missing = [n for n in names if n not in available]
    if missing:
        raise BadRun(store.path, f"has no pathology {', '.join(missing)}; it has "
                                 f"{', '.join(available)}")
    train = [it for it in store.items if it["split"] == train_split]
    targets = target_matrix(train, names, available)
    chosen = []
    for j, name in enumerate(names):
        known = targets[:, j][~np.isnan(targets[:, j])]
        positives = int(known.sum())
        if 0 < positives < len(known):
            chosen.append(name)
            continue
        problem = (f"pathology {name} has {positives} positive(s) among the {len(known)} known "
                   f"labels of split {train_split!r}; training needs both positives and negatives")
        if not every:
            raise BadRun(store.path, problem)
        log.warning("%s: %s; left out of --labels all", store.path, problem)
    if not chosen:
        raise BadRun(store.path, f"none of its pathologies has both positives and negatives among "
                                 f"the known labels of split {train_split!r}")
    return chosen


def label_aucs(targets, probs):
    """Per label (column) the ROC AUC on the rows whose label is known (sklearn); NaN for a label
    with only one class known."""
    targets, probs = np.asarray(targets), np.asarray(probs)
    out = []
    for j in range(targets.shape[1]):
        known = ~np.isnan(targets[:, j])
        y = targets[known, j]
        out.append(float(skm.roc_auc_score(y, probs[known, j])) if len(np.unique(y)) == 2
                   else float("nan"))
    return out


def mean_auc(targets, probs):
    """The mean of :func:`label_aucs` over the labels that have one; NaN when none has."""
    aucs = [a for a in label_aucs(targets, probs) if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def observed_accuracy(targets, probs, threshold=0.5):
    """The share of observed entries whose probability is on the right side of ``threshold``."""
    targets = np.asarray(targets)
    observed = ~np.isnan(targets)
    if not observed.any():
        return float("nan")
    return float(((np.asarray(probs)[observed] >= threshold) == (targets[observed] == 1)).mean())


def epoch_row(epoch, train_targets, train_probs, val_targets, val_probs, seconds):
    """A history row of a multi-label epoch, with the keys of a softmax one (``state.json``,
    ``log.csv`` and the best-epoch choice read them): losses are the masked BCE, accuracies the
    share of observed entries right at 0.5, ``val_auc`` the mean per-label AUC."""
    return {"epoch": epoch,
            "train_loss": masked_bce(train_targets, train_probs),
            "train_accuracy": observed_accuracy(train_targets, train_probs),
            "val_loss": masked_bce(val_targets, val_probs),
            "val_accuracy": observed_accuracy(val_targets, val_probs),
            "val_auc": mean_auc(val_targets, val_probs),
            "seconds": seconds}
