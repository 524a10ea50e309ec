"""Calibration of probabilities and operating points.

A model whose AUC is good can still say "90% nodule" for films of which half have one. The
calibration figures say whether a probability can be taken at its word: the Brier score (mean
squared error of the probability, sklearn), the expected calibration error (ECE) and the
reliability diagram, both over equal-width probability bins. The bins are sklearn's
``calibration_curve(strategy="uniform")`` bins -- ``[0, 0.1], (0.1, 0.2], ...`` for 10 bins, a
probability on an edge going to the lower bin -- so the ECE, the curve and the diagram agree.

An operating point is the threshold a reader would act on: positive means score >= threshold
(sklearn's ``roc_curve`` convention, so a threshold is one of the scores). :func:`youden_threshold`
and :func:`sensitivity_threshold` choose it -- on the validation split, to be applied unchanged to
the test or external films -- and :func:`operating_point` gives the counts with sensitivity,
specificity, PPV and NPV, each with its Wilson interval.

The plotting lives here rather than in ``evaluate`` because the training loop (same layer) plots
too; like ``evaluate``'s figures it draws on a Figure of its own, never pyplot.
"""
import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_curve

from mxvision.errors import MxvisionError
from mxvision.train.intervals import WILSON_METHOD, wilson_interval
from mxvision.utils import new_figure, save_png


def _labels_probs(labels, probs, what="probs"):
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1 or probs.shape != labels.shape:
        raise MxvisionError(what, f"shape {probs.shape} does not match the labels' {labels.shape}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise MxvisionError("labels", f"expected 0/1 only, got values {np.unique(labels)[:5].tolist()}")
    if not np.isfinite(probs).all():
        raise MxvisionError(what, f"{int((~np.isfinite(probs)).sum())} are NaN or infinite")
    return labels.astype(np.int64), probs


def _checked_probs(labels, probs):
    labels, probs = _labels_probs(labels, probs)
    if probs.size and (probs.min() < 0 or probs.max() > 1):
        raise MxvisionError("probs", f"values from {probs.min():g} to {probs.max():g}: probabilities "
                                     "must lie in [0, 1]")
    return labels, probs


def _checked_bins(n_bins):
    if int(n_bins) != n_bins or n_bins < 1:
        raise MxvisionError("n_bins", f"{n_bins!r}: must be a positive integer")
    return int(n_bins)


def _bin_ids(probs, n_bins):
    """Each probability's bin, exactly as ``sklearn.calibration.calibration_curve`` bins it."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return edges, np.searchsorted(edges[1:-1], probs)


def brier_score(labels, probs):
    """Mean squared difference between the probability of the positive class and the 0/1 label
    (sklearn's ``brier_score_loss``): 0 is perfect, 0.25 is a constant 0.5. NaN without films."""
    labels, probs = _checked_probs(labels, probs)
    if not labels.size:
        return float("nan")
    return float(brier_score_loss(labels, probs, pos_label=1))


def expected_calibration_error(labels, probs, n_bins=10):
    """Sum over equal-width bins of (films in the bin / all films) x |mean probability - fraction
    positive|: how far, on average over films, the stated probability is from the observed rate.
    NaN without films."""
    labels, probs = _checked_probs(labels, probs)
    n_bins = _checked_bins(n_bins)
    if not labels.size:
        return float("nan")
    _, ids = _bin_ids(probs, n_bins)
    prob_sum = np.bincount(ids, weights=probs, minlength=n_bins)
    pos_sum = np.bincount(ids, weights=labels, minlength=n_bins)
    return float(np.abs(prob_sum - pos_sum).sum() / labels.size)  # = sum (n_b/N)|mean p - frac|


def reliability_curve(labels, probs, n_bins=10):
    """The reliability diagram's data: ``bin_edges`` (n_bins + 1) and, per bin,
    ``mean_predicted``, ``fraction_positive`` (None for an empty bin) and ``count``. The
    non-empty bins' values are sklearn's ``calibration_curve``."""
    labels, probs = _checked_probs(labels, probs)
    n_bins = _checked_bins(n_bins)
    edges, ids = _bin_ids(probs, n_bins)
    count = np.bincount(ids, minlength=n_bins)
    mean_predicted, fraction_positive = [None] * n_bins, [None] * n_bins
    if labels.size:
        # pos_label=1 explicitly: with one class present sklearn could not infer it
        frac, mean = calibration_curve(labels, probs, n_bins=n_bins, strategy="uniform", pos_label=1)
        for k, f, m in zip(np.flatnonzero(count), frac, mean):
            mean_predicted[k], fraction_positive[k] = float(m), float(f)
    return dict(bin_edges=[float(e) for e in edges], mean_predicted=mean_predicted,
                fraction_positive=fraction_positive, count=[int(c) for c in count])


def _roc(labels, scores):
    labels, scores = _labels_probs(labels, scores, what="scores")
    if not (labels.size and 0 < labels.sum() < labels.size):
        raise MxvisionError("labels", "a threshold needs films of both classes; "
                                      f"got {int(labels.sum())} positive of {labels.size}")
    # every distinct score is a candidate: drop_intermediate would skip collinear ROC points
    fpr, tpr, thresholds = roc_curve(labels, scores, pos_label=1, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # sklearn's first threshold is +inf (nothing positive)
    return fpr[finite], tpr[finite], thresholds[finite]


def youden_threshold(labels, scores):
    """The threshold maximising Youden's J = sensitivity + specificity - 1 over the ROC
    thresholds (the distinct scores). Ties go to the highest such threshold (the fewest positive
    calls for the same J): ``roc_curve`` lists thresholds from high to low and ``argmax`` takes the
    first maximum."""
    fpr, tpr, thresholds = _roc(labels, scores)
    n_pos = int(np.sum(np.asarray(labels) == 1))
    n_neg = len(labels) - n_pos
    # J x n_pos x n_neg in integers: equal J's must tie exactly (2/3 - 0 and 1 - 1/3 differ in floats)
    scaled_j = np.rint(tpr * n_pos).astype(np.int64) * n_neg - np.rint(fpr * n_neg).astype(np.int64) * n_pos
    return float(thresholds[int(np.argmax(scaled_j))])


def sensitivity_threshold(labels, scores, target):
    """The highest threshold whose sensitivity on these films is at least ``target`` (0 < target
    <= 1): the most specific operating point that still finds that share of the positives."""
    if not 0 < target <= 1:
        raise MxvisionError("target sensitivity", f"{target!r}: must be above 0 and at most 1")
    _, tpr, thresholds = _roc(labels, scores)
    # tpr rises as the threshold falls; the lowest threshold has tpr 1, so one always qualifies
    return float(thresholds[int(np.argmax(tpr >= target - 1e-12))])


def _proportion(successes, n, level):
    low, high = wilson_interval(successes, n, level)
    if n == 0:
        return {"value": None, "low": None, "high": None}
    return {"value": successes / n, "low": low, "high": high}


def operating_point(labels, scores, threshold, level=0.95):
    """Counts and rates at ``threshold`` (positive means score >= threshold): tp, fp, tn, fn and
    sensitivity, specificity, PPV and NPV, each ``{"value", "low", "high"}`` with the Wilson
    ``level`` interval (None when its denominator is 0, e.g. PPV with no positive calls)."""
    labels, scores = _labels_probs(labels, scores, what="scores")
    if not np.isfinite(threshold):
        raise MxvisionError("threshold", f"{threshold!r}: must be a finite number")
    called = scores >= threshold
    truth = labels == 1
    tp, fp = int((called & truth).sum()), int((called & ~truth).sum())
    fn, tn = int((~called & truth).sum()), int((~called & ~truth).sum())
    return {
        "threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "sensitivity": _proportion(tp, tp + fn, level),
        "specificity": _proportion(tn, tn + fp, level),
        "ppv": _proportion(tp, tp + fp, level),
        "npv": _proportion(tn, tn + fn, level),
        "level": level, "method": WILSON_METHOD,
    }


def plot_reliability_diagram(labels, probs, path, n_bins=10, title=""):
    """The reliability diagram as a PNG at ``path``: the fraction of positive films against the
    mean probability per bin (each point labelled with its film count) beside the diagonal of
    perfect calibration, and underneath a histogram of the probabilities (a bin of three films
    says little). Returns the matplotlib Figure."""
    curve = reliability_curve(labels, probs, n_bins)
    labels, probs = _checked_probs(labels, probs)
    fig = new_figure((4.5, 5.2))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    shown = [k for k, c in enumerate(curve["count"]) if c]
    x = [curve["mean_predicted"][k] for k in shown]
    y = [curve["fraction_positive"][k] for k in shown]
    top.plot(x, y, marker="o", color="tab:blue", label="model")
    for k, xk, yk in zip(shown, x, y):
        top.annotate(str(curve["count"][k]), (xk, yk), textcoords="offset points", xytext=(4, -10),
                     fontsize=7, color="tab:blue")
    top.set_ylabel("fraction positive")
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title or f"reliability ({len(labels)} films, ECE "
                           f"{expected_calibration_error(labels, probs, n_bins):.3f})", fontsize=9)
    bottom.hist(probs, bins=curve["bin_edges"], color="tab:grey")
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("films")
    return save_png(fig, path)
