"""Comparing two models on the same films: the AUC difference with DeLong's paired test.

Two AUCs measured on the same films are correlated (an easy film is easy for both models), so
their difference has a much smaller standard error than two independent intervals suggest, and
overlapping intervals say nothing about whether one model is better. DeLong's paired test
(:func:`mxvision.train.intervals.delong_paired`) uses that covariance.

The inputs are two evaluation folders written by ``mxvision evaluate --out`` (or
:func:`mxvision.evaluate.evaluate_run`): their ``predictions.csv`` (``id,label,predicted,p_<class>...``;
binary tasks only, the positive class being the second ``p_`` column). Films are matched by id;
two folders that scored different films, or the same film under different labels, are refused
rather than compared on their common part, because a comparison on a silently different set of
films is not the comparison the user asked for.
"""
import csv
import math
from pathlib import Path

import numpy as np

from mxvision.errors import MxvisionError
from mxvision.train.intervals import delong_paired
from mxvision.utils import read_json, write_json

PREDICTIONS = "predictions.csv"
METRICS = "metrics.json"


def read_predictions(folder):
    """``(ids, labels, probs, classes)`` of an evaluation folder's ``predictions.csv``: ids and
    label names as lists, probabilities as an (N, classes) float array, the classes in column
    order. Refuses a folder without the file, missing columns, a duplicated id, a label that is
    not one of the classes and probabilities that are not finite numbers."""
    folder = Path(folder)
    path = folder / PREDICTIONS
    if not path.is_file():
        raise MxvisionError(folder, f"not an evaluation folder: no {PREDICTIONS} (write one with "
                                    "`mxvision evaluate --run RUN --out FOLDER`)")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise MxvisionError(path, f"cannot be read: {err}") from None
    if not rows:
        raise MxvisionError(path, "is empty")
    header = rows[0]
    prob_columns = [k for k, name in enumerate(header) if name.startswith("p_")]
    if header[:3] != ["id", "label", "predicted"] or not prob_columns:
        raise MxvisionError(path, "expected the columns id,label,predicted,p_<class>... of "
                                  f"`mxvision evaluate`, got {','.join(header)[:80]}")
    classes = [header[k][2:] for k in prob_columns]
    ids, labels, probs, seen = [], [], [], set()
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise MxvisionError(path, f"line {line}: {len(row)} fields, expected {len(header)}")
        film, label = row[0], row[1]
        if film in seen:
            raise MxvisionError(path, f"line {line}: film {film!r} appears twice")
        if label not in classes:
            raise MxvisionError(path, f"line {line}: label {label!r} is not one of {classes}")
        try:
            values = [float(row[k]) for k in prob_columns]
        except ValueError:
            raise MxvisionError(path, f"line {line}: a probability is not a number") from None
        if not all(math.isfinite(v) for v in values):
            raise MxvisionError(path, f"line {line}: a probability is NaN or infinite")
        seen.add(film)
        ids.append(film)
        labels.append(label)
        probs.append(values)
    probs = np.array(probs, dtype=np.float64).reshape(len(ids), len(classes))
    return ids, labels, probs, classes


def _run_of(folder):
    """The run an evaluation folder scored, from its metrics.json (None if it has none)."""
    try:
        return read_json(Path(folder) / METRICS).get("run_dir")
    except (OSError, ValueError, AttributeError):
        return None


def compare_evaluations(eval_a, eval_b, level=0.95, out=None):
    """The AUCs of two evaluations of the same films and DeLong's paired test of their
    difference (A - B): ``auc_a``, ``auc_b``, ``difference``, ``se``, ``ci`` ([low, high] at
    ``level``), ``z``, ``p_value``, ``n``, ``n_positive``, ``positive_class``, the folders, the runs
    they evaluated and the ``method``; also written as JSON to ``out`` when given. Refused (one line naming both folders) when the folders
    scored different films, label a film differently, have other classes, or the task is not
    binary."""
    both = f"{eval_a} vs {eval_b}"
    ids_a, labels_a, probs_a, classes_a = read_predictions(eval_a)
    ids_b, labels_b, probs_b, classes_b = read_predictions(eval_b)
    for folder, classes in ((eval_a, classes_a), (eval_b, classes_b)):
        if len(classes) != 2:
            raise MxvisionError(folder, f"{len(classes)} classes ({', '.join(classes)}): compare "
                                        "needs a binary task (the AUC of one positive class)")
    if classes_a != classes_b:
        raise MxvisionError(both, f"different classes ({', '.join(classes_a)} against "
                                  f"{', '.join(classes_b)})")
    only_a, only_b = sorted(set(ids_a) - set(ids_b)), sorted(set(ids_b) - set(ids_a))
    if only_a or only_b:
        example = f"e.g. {only_a[0]!r} only in the first" if only_a else f"e.g. {only_b[0]!r} only in the second"
        raise MxvisionError(both, f"scored different films ({len(only_a)} only in the first, "
                                  f"{len(only_b)} only in the second, {example}); a paired "
                                  "comparison needs the same films")
    row_b = {film: k for k, film in enumerate(ids_b)}
    order = [row_b[film] for film in ids_a]
    differing = [film for film, la, k in zip(ids_a, labels_a, order) if labels_b[k] != la]
    if differing:
        k = row_b[differing[0]]
        raise MxvisionError(both, f"{len(differing)} films labelled differently, e.g. "
                                  f"{differing[0]!r}: {labels_a[ids_a.index(differing[0])]} in the "
                                  f"first, {labels_b[k]} in the second")
    positive = classes_a[1]
    y = np.array([label == positive for label in labels_a], dtype=np.int64)
    if not 0 < y.sum() < y.size:
        raise MxvisionError(both, f"the {y.size} films are all of one class; an AUC needs both")
    test = delong_paired(y, probs_a[:, 1], probs_b[order, 1], level=level)
    result = {
        "eval_a": str(Path(eval_a).resolve()), "eval_b": str(Path(eval_b).resolve()),
        "run_a": _run_of(eval_a), "run_b": _run_of(eval_b),
        "positive_class": positive, "n": int(y.size), "n_positive": int(y.sum()),
        "auc_a": test["auc_a"], "auc_b": test["auc_b"], "difference": test["difference"],
        "se": test["se"], "ci": [test["low"], test["high"]], "level": level,
        "z": test["z"], "p_value": test["p_value"], "method": test["method"],
    }
    if out is not None:
        write_json(out, result)
    return result
