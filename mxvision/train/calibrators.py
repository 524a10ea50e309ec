"""Probability calibration of a trained binary head, fitted on its validation split.

A head trained with cross-entropy on a few hundred films ranks them well (its AUC) but its
probabilities need not mean what they say. ``train --calibrate platt|isotonic`` fits a map from
the best head's positive-class probability to a calibrated one on the **validation** split (the
test split stays untouched for evaluation) and keeps it as ``calibration.json`` in the run folder;
``predict``, ``evaluate``, ``export`` and the served archive apply it after the softmax.

* ``platt``: Platt's sigmoid (Platt 1999, as sklearn's ``CalibratedClassifierCV(method="sigmoid")``)
  on the logit of the positive-class probability, ``p' = 1 / (1 + exp(a * logit(p) + b))``. The
  targets are Platt's smoothed ones, ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``, not 0 and 1: a
  small validation split is often perfectly separated, where an unregularised logistic regression
  has no finite optimum and would turn every probability into 0 or 1.
* ``isotonic``: sklearn's ``IsotonicRegression(out_of_bounds="clip")``, kept as its thresholds
  (``x_thresholds``, ``y_thresholds``); applying it is ``np.interp`` over them, which is what
  sklearn's ``predict`` computes (linear interpolation, clipped at both ends).

Fitting needs sklearn/scipy; applying needs NumPy only (:func:`apply_calibrator`), so the model
server's handler computes exactly what ``predict`` computes from the dict the archive carries.
A calibrator read from a file is checked first (:func:`check_calibrator`): a run folder or an
archive may come from someone else's disk.
"""
import math
from pathlib import Path

import numpy as np

from mxvision.errors import BadRun, MxvisionError, one_line
from mxvision.features.store import json_is

KINDS = ("platt", "isotonic")
#: The calibrator's file in a run folder.
CALIBRATION = "calibration.json"
FORMAT = 1
#: Probabilities are clipped to [EPS, 1 - EPS] before their logit (a float32 softmax gives exact
#: 0 and 1, whose logits are infinite).
EPS = 1e-12
#: Most isotonic thresholds accepted from a file (one per distinct validation score at most).
MAX_THRESHOLDS = 1 << 20
METHODS = {
    "platt": "Platt scaling (Platt 1999; sklearn CalibratedClassifierCV method='sigmoid') of the logit "
             "of the positive-class probability, fitted on the validation split",
    "isotonic": "isotonic regression (sklearn IsotonicRegression, out_of_bounds='clip') of the "
                "positive-class probability, fitted on the validation split",
}


def logit(probs):
    """``log(p / (1 - p))`` of probabilities clipped to [EPS, 1 - EPS], in float64."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def check_kind(kind, classes=None):
    """Refuse an unknown calibration ``kind`` or, given ``classes``, a task that is not binary
    (the calibrated output is the probability of the second, positive class)."""
    if kind not in KINDS:
        raise MxvisionError(f"calibrate {kind!r}", f"must be one of {', '.join(KINDS)}")
    if classes is not None and len(classes) != 2:
        raise MxvisionError(f"calibrate {kind}", f"calibrates a binary head; this one has {len(classes)} "
                                                 f"classes ({', '.join(map(str, classes))})")


def check_split_for_calibration(kind, store, split="val"):
    """Before training: refuse ``kind`` when ``store`` is not binary or its ``split`` lacks a class
    (a calibrator cannot be fitted on one class), so the refusal comes before the epochs do."""
    check_kind(kind, store.classes)
    rows = [shard["rows"][k] for shard, keep in zip(store.manifest["shards"], store.split_rows(split))
            for k in keep]
    labels = [store.items[r]["label_id"] for r in rows]
    _check_both_classes(labels, store.path, split, kind, store.classes)


def _check_both_classes(labels, subject, split, kind, classes=("negative", "positive")):
    labels = np.asarray(labels)
    missing = [str(classes[c]) for c in (0, 1) if not (labels == c).any()]
    if missing:
        raise BadRun(subject, f"split {split!r} has no {' and no '.join(missing)} rows ({len(labels)} "
                              f"in all); --calibrate {kind} needs both classes in the validation split")


def fit_calibrator(kind, labels, scores, split="val"):
    """Fit a ``kind`` calibrator (``platt`` or ``isotonic``) of positive-class ``scores``
    (probabilities) against binary ``labels`` (1 = positive); return it as a JSON-serialisable dict.
    Refuses (BadRun, one line) labels without both classes."""
    check_kind(kind)
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if len(labels) != len(scores):
        raise MxvisionError("calibration", f"{len(labels)} labels but {len(scores)} scores")
    if not np.isfinite(scores).all() or ((scores < 0) | (scores > 1)).any():
        raise MxvisionError("calibration", "scores must be probabilities in [0, 1]")
    if not np.isin(labels, (0, 1)).all():
        raise MxvisionError("calibration", "labels must be 0 (negative) or 1 (positive)")
    labels = labels.astype(np.int64)
    _check_both_classes(labels, "calibration", split, kind)
    calibrator = {"format": FORMAT, "kind": kind, "method": METHODS[kind]}
    if kind == "platt":
        calibrator.update(zip(("a", "b"), _fit_platt(logit(scores), labels)))
    else:
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(scores, labels)
        calibrator["x_thresholds"] = [float(v) for v in iso.X_thresholds_]
        calibrator["y_thresholds"] = [float(v) for v in iso.y_thresholds_]
    calibrator["fitted_on"] = {"split": split, "n": int(len(labels)), "positives": int(labels.sum())}
    return calibrator


def _fit_platt(f, labels):
    """Platt's ``(a, b)`` minimising the log loss of ``1 / (1 + exp(a f + b))`` against his
    smoothed targets (scipy's L-BFGS with the analytic gradient, as sklearn does)."""
    from scipy.optimize import minimize
    from scipy.special import expit, xlogy

    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    target = np.where(labels == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def loss_and_grad(ab):
        p = expit(-(ab[0] * f + ab[1]))
        loss = -(xlogy(target, p) + xlogy(1.0 - target, 1.0 - p)).sum()
        diff = target - p  # d loss / d (a f + b)
        return loss, np.array([(diff * f).sum(), diff.sum()])

    start = np.array([0.0, math.log((n_neg + 1.0) / (n_pos + 1.0))])
    found = minimize(loss_and_grad, start, jac=True, method="L-BFGS-B",
                     options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 1000})
    return float(found.x[0]), float(found.x[1])


def apply_calibrator(calibrator, scores):
    """Calibrated positive-class probabilities of positive-class ``scores`` (NumPy only)."""
    scores = np.asarray(scores, dtype=np.float64)
    if calibrator["kind"] == "platt":
        z = calibrator["a"] * logit(scores) + calibrator["b"]
        return np.exp(-np.logaddexp(0.0, z))  # 1 / (1 + exp(z)) without overflow
    return np.interp(scores, calibrator["x_thresholds"], calibrator["y_thresholds"])


def calibrate_probs(calibrator, probs):
    """The (N, 2) probability matrix ``probs`` with its positive column calibrated and the negative
    one ``1 - positive`` (``calibrator`` None: ``probs`` unchanged)."""
    probs = np.asarray(probs)
    if calibrator is None:
        return probs
    if probs.ndim != 2 or probs.shape[1] != 2:
        raise MxvisionError("calibration", f"applies to (N, 2) probabilities, not shape {probs.shape}")
    positive = apply_calibrator(calibrator, probs[:, 1])
    return np.stack([1.0 - positive, positive], axis=1).astype(probs.dtype, copy=False)


def describe(calibrator):
    """``"calibrated (platt)"`` / ``"uncalibrated"``: how outputs and metadata name it."""
    return f"calibrated ({calibrator['kind']})" if calibrator else "uncalibrated"


def _finite_number(value):
    return json_is(value, (int, float)) and math.isfinite(value)


def calibrator_problem(calibrator):
    """What is wrong with a calibrator read from a file, as a short phrase, or None."""
    if not isinstance(calibrator, dict):
        return "is not a JSON object"
    kind = calibrator.get("kind")
    if kind not in KINDS:
        return f"kind {one_line(repr(kind), 40)} is not one of {', '.join(KINDS)}"
    if calibrator.get("format") != FORMAT:
        return f"format {one_line(repr(calibrator.get('format')), 40)} is not {FORMAT}"
    if kind == "platt":
        if not all(_finite_number(calibrator.get(k)) for k in ("a", "b")):
            return "platt's a and b are not finite numbers"
    else:
        xs, ys = calibrator.get("x_thresholds"), calibrator.get("y_thresholds")
        if not (isinstance(xs, list) and isinstance(ys, list) and 1 <= len(xs) == len(ys) <= MAX_THRESHOLDS):
            return f"x_thresholds and y_thresholds are not two lists of 1 to {MAX_THRESHOLDS} numbers of equal length"
        if not all(_finite_number(v) for v in xs + ys):
            return "x_thresholds and y_thresholds hold something other than finite numbers"
        x, y = np.array(xs, dtype=np.float64), np.array(ys, dtype=np.float64)
        if (np.diff(x) < 0).any() or (np.diff(y) < 0).any() or (y < 0).any() or (y > 1).any():
            return "isotonic thresholds are not non-decreasing with y in [0, 1]"
    fitted = calibrator.get("fitted_on")
    if not (isinstance(fitted, dict) and all(json_is(fitted.get(k), int) and fitted[k] >= 0
                                             for k in ("n", "positives"))
            and isinstance(fitted.get("split"), str)):
        return "fitted_on is not an object with split, n and positives"
    return None


def check_calibrator(calibrator, where):
    """``calibrator`` when it is a usable calibrator dict, else BadRun naming ``where``."""
    problem = calibrator_problem(calibrator)
    if problem:
        raise BadRun(where, f"{problem}; not a valid calibrator (retrain with --calibrate)")
    return calibrator


def load_run_calibrator(run_dir):
    """The calibrator of a run (``run_dir/calibration.json``), checked, or None when the run was
    trained without ``--calibrate``. A malformed file, or one fitted on another epoch's head than
    the run's best (a run resumed since), is refused in one line naming the file."""
    from mxvision.train import runs

    path = Path(run_dir) / CALIBRATION
    if not path.exists() and not path.is_symlink():
        return None
    calibrator = check_calibrator(runs.read_run_json(path), path)
    _, state = runs.load_run(run_dir)
    epoch = calibrator.get("epoch")
    if not (json_is(epoch, int) and epoch == state["best_epoch"]):  # true is not epoch 1
        raise BadRun(path, f"was fitted on epoch {one_line(repr(calibrator.get('epoch')), 20)}'s head, but the "
                           f"run's best epoch is {state['best_epoch']}; retrain with --calibrate")
    return calibrator


def fit_run_calibrator(run_dir, kind, labels, probs, epoch, classes, split="val"):
    """Fit ``kind`` on the (N, 2) validation ``probs`` of the run's best head (``epoch``) and write
    it atomically as ``run_dir/calibration.json``; return it. ``kind`` None removes a calibrator
    an earlier run left there (it was fitted on a head that may no longer be the best)."""
    from mxvision.utils import write_json

    path = Path(run_dir) / CALIBRATION
    if kind is None:
        path.unlink(missing_ok=True)
        return None
    check_kind(kind, classes)
    calibrator = fit_calibrator(kind, labels, np.asarray(probs)[:, 1], split=split)
    calibrator.update(epoch=int(epoch), classes=list(classes), positive_class=str(classes[1]))
    write_json(path, calibrator)
    return calibrator


__all__ = ["KINDS", "CALIBRATION", "fit_calibrator", "apply_calibrator", "calibrate_probs",
           "load_run_calibrator", "fit_run_calibrator", "check_calibrator", "calibrator_problem",
           "check_kind", "check_split_for_calibration", "describe", "logit"]
