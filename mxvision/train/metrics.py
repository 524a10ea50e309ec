"""Classification metrics shared by the trainer (validation) and the evaluator (test), via sklearn.

The positive class of a binary task is the second class (``nodule`` in ``["normal", "nodule"]``).
"""
import numpy as np
from sklearn import metrics as skm


def softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def auc_score(labels, probs):
    """ROC AUC; NaN when only one class is present (a small validation split can lack one).

    ``probs`` is the (N, classes) probability matrix (binary: the second column is the positive
    class; more classes: one-vs-rest macro average) or, for binary ``labels``, one score per
    sample (e.g. a detector's nodule score).
    """
    labels, probs = np.asarray(labels), np.asarray(probs)
    if len(np.unique(labels)) < 2:
        return float("nan")
    if probs.ndim == 1:
        return float(skm.roc_auc_score(labels, probs))
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(labels, probs[:, 1]))
    return float(skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro",
                                   labels=list(range(probs.shape[1]))))


def cross_entropy(labels, probs):
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))


def classification_report(labels, probs, classes):
    """The metrics.json body: accuracy, AUC, per-class precision/recall/F1, confusion matrix."""
    labels = np.asarray(labels)
    predicted = probs.argmax(axis=1)
    ids = list(range(len(classes)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, labels=ids, zero_division=0)
    per_class = lambda values: {c: float(v) for c, v in zip(classes, values)}  # noqa: E731
    return {
        "n": int(len(labels)),
        "classes": list(classes),
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "auc": auc_score(labels, probs),
        "precision": per_class(precision),
        "recall": per_class(recall),
        "f1": per_class(f1),
        "support": {c: int(v) for c, v in zip(classes, support)},
        "confusion_matrix": skm.confusion_matrix(labels, predicted, labels=ids).tolist(),
        "loss": cross_entropy(labels, probs),
    }
