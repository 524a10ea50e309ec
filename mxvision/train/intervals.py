"""AUC and proportion intervals: bootstrap over patients, DeLong, Wilson.

An AUC from a few dozen test films can move by 0.1 from one sample of patients to the next, so
every AUC mxvision reports comes with two 95% intervals that answer slightly different questions:

- **Bootstrap over patients** (:func:`bootstrap_auc`): resample *patients* with replacement and
  take all of each drawn patient's films, so two films of one patient never count as two
  independent observations (the usual mistake with image-level resampling). Percentile interval.
- **DeLong** (:func:`delong_auc`, :func:`delong_paired`): the asymptotic variance of the
  Mann-Whitney AUC from its structural components (DeLong, DeLong & Clarke-Pearson 1988,
  Biometrics 44:837), computed with midranks in O(n log n) (Sun & Xu 2014, IEEE Signal Process.
  Lett. 21:1389). It treats films as independent; the paired form compares two models scored on
  the same films (what ``mxvision compare`` reports).
- **Wilson** (:func:`wilson_interval`): the score interval of a proportion (sensitivity, PPV, ...),
  which unlike the normal approximation stays inside [0, 1] and behaves at 0/n and n/n.

Results are plain Python floats (JSON-serialisable); what cannot be computed (one class only) is
``None`` in the dictionaries and NaN in bare numbers.
"""
import numpy as np
from scipy import stats

from mxvision.errors import MxvisionError

DELONG_METHOD = "DeLong 1988 (fast algorithm of Sun & Xu 2014)"
DELONG_PAIRED_METHOD = ("DeLong 1988 paired test of two correlated AUCs (fast algorithm of Sun & "
                        "Xu 2014), two-sided normal p-value")
WILSON_METHOD = "Wilson score interval (scipy.stats.binomtest)"
#: Weights held at once by the bootstrap (resamples x films, float64): about 8 MB per matrix,
#: however many films, so 100,000 films take small blocks rather than gigabytes.
_BOOT_CELLS = 1_000_000


def _binary_labels(labels, *score_arrays):
    """``labels`` as a 0/1 int array and each score array as float64, checked to match."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise MxvisionError("labels", f"expected a 1-D array of 0/1, got shape {labels.shape}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise MxvisionError("labels", f"expected 0/1 only, got values {np.unique(labels)[:5].tolist()}")
    out = [labels.astype(np.int64)]
    for scores in score_arrays:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != labels.shape:
            raise MxvisionError("scores", f"shape {scores.shape} does not match the labels' {labels.shape}")
        if not np.isfinite(scores).all():
            raise MxvisionError("scores", f"{int((~np.isfinite(scores)).sum())} are NaN or infinite")
        out.append(scores)
    return out


def _both_classes(labels):
    return labels.size > 0 and 0 < labels.sum() < labels.size


def _z(level):
    if not 0 < level < 1:
        raise MxvisionError("level", f"{level!r}: must be a confidence level between 0 and 1")
    return float(stats.norm.ppf(0.5 + level / 2))


def _structural_components(labels, score_rows):
    """AUCs and DeLong's structural components for each row of ``score_rows`` (k, n).

    With midranks, a positive's component V10 = (its rank among all - its rank among positives) /
    n_negatives is the fraction of negatives it outscores (ties count one half); a negative's V01
    = 1 - (its rank among all - its rank among negatives) / n_positives. Ranks replace the
    O(m n) pairwise comparisons of the 1988 paper (Sun & Xu 2014).
    """
    pos, neg = score_rows[:, labels == 1], score_rows[:, labels == 0]
    m, n = pos.shape[1], neg.shape[1]
    rank_all = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # midranks
    rank_pos = stats.rankdata(pos, axis=1)
    rank_neg = stats.rankdata(neg, axis=1)
    v10 = (rank_all[:, :m] - rank_pos) / n
    v01 = 1.0 - (rank_all[:, m:] - rank_neg) / m
    auc = v10.mean(axis=1)
    return auc, v10, v01


def _delong_covariance(labels, score_rows):
    auc, v10, v01 = _structural_components(labels, score_rows)
    m, n = v10.shape[1], v01.shape[1]
    # np.cov's rows are variables; ddof=1 as in the 1988 paper (S10, S01 with m-1 and n-1)
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(auc), len(auc)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(auc), len(auc)))
    return auc, s10 / m + s01 / n


def delong_auc(labels, scores, level=0.95):
    """AUC with DeLong's standard error and a ``level`` interval.

    The interval is auc ± z·se clipped to [0, 1] (as pROC's ``ci.auc(method="delong")``); near
    an AUC of 1 it can be short on the upper side, which the bootstrap interval beside it shows.
    Films are treated as independent: with several films per patient prefer :func:`bootstrap_auc`
    with ``groups``. One class only: every figure is None.
    """
    labels, scores = _binary_labels(labels, scores)
    z = _z(level)
    out = dict(auc=None, se=None, low=None, high=None, method=DELONG_METHOD)
    if not _both_classes(labels):
        return out
    auc, cov = _delong_covariance(labels, scores[None, :])
    auc, se = float(auc[0]), float(np.sqrt(max(cov[0, 0], 0.0)))
    out.update(auc=auc, se=se, low=float(max(0.0, auc - z * se)), high=float(min(1.0, auc + z * se)))
    return out


def delong_paired(labels, scores_a, scores_b, level=0.95):
    """DeLong's test of two AUCs on the same films: difference (a - b), its standard error from
    the 2x2 covariance of the two AUCs, a ``level`` interval (difference ± z·se) and the two-sided
    p-value of z = difference / se under the normal distribution. Identical scores (se 0) give a
    difference of 0 with p-value 1."""
    labels, scores_a, scores_b = _binary_labels(labels, scores_a, scores_b)
    z_level = _z(level)
    out = dict(auc_a=None, auc_b=None, difference=None, se=None, low=None, high=None, z=None,
               p_value=None, method=DELONG_PAIRED_METHOD)
    if not _both_classes(labels):
        return out
    auc, cov = _delong_covariance(labels, np.stack([scores_a, scores_b]))
    difference = float(auc[0] - auc[1])
    variance = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = float(np.sqrt(max(variance, 0.0)))
    if se > 0:
        z = difference / se
        p_value = float(2 * stats.norm.sf(abs(z)))
    else:  # the two rank the films identically (or one class has one film): nothing to test
        z, p_value = 0.0, 1.0
    out.update(auc_a=float(auc[0]), auc_b=float(auc[1]), difference=difference, se=se,
               low=difference - z_level * se, high=difference + z_level * se, z=float(z),
               p_value=p_value)
    return out


def _weighted_aucs(labels, scores, weights):
    """The AUC of each row of ``weights`` (resamples x films: how often each film was drawn),
    with ties counted one half; NaN where a resample lacks a class.

    The films are sorted by score once; per distinct score value the drawn positive and negative
    weights are summed, and a positive at value u outscores the negative weight below u
    (a cumulative sum), which makes each resample O(n) instead of a sort.
    """
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w = weights[:, order]
    is_pos = labels[order] == 1
    pos = np.add.reduceat(np.where(is_pos, w, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(is_pos, 0.0, w), starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    total_pos, total_neg = pos.sum(axis=1), neg.sum(axis=1)
    wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = wins / (total_pos * total_neg)
    auc[(total_pos == 0) | (total_neg == 0)] = np.nan
    return auc


def bootstrap_auc(labels, scores, groups=None, n_boot=2000, seed=0, level=0.95):
    """AUC with a percentile bootstrap interval, resampling ``groups`` (patient ids, one per film)
    with replacement; each drawn patient brings all of its films (a patient drawn twice counts
    twice). ``groups=None`` resamples films. Resamples holding one class only have no AUC: they
    are skipped and ``n_valid`` says how many of ``n_boot`` remained. Seeded: the same inputs give
    the same interval."""
    labels, scores = _binary_labels(labels, scores)
    _z(level)
    if int(n_boot) < 1:
        raise MxvisionError("n_boot", f"{n_boot!r}: must be a positive number of resamples")
    method = (f"percentile bootstrap over {'patients' if groups is not None else 'images'} "
              f"({int(n_boot)} resamples, seed {seed})")
    out = dict(auc=None, low=None, high=None, n_boot=int(n_boot), n_valid=0, method=method)
    if not _both_classes(labels):
        return out
    if groups is None:
        group_of = np.arange(labels.size)
    else:
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise MxvisionError("groups", f"shape {groups.shape} does not match the labels' {labels.shape}")
        _, group_of = np.unique(groups, return_inverse=True)
        group_of = group_of.ravel()
    n_groups = int(group_of.max()) + 1
    rng = np.random.default_rng(seed)
    aucs = []
    step = int(np.clip(_BOOT_CELLS // max(labels.size, n_groups), 1, 500))
    for start in range(0, int(n_boot), step):
        block = min(step, int(n_boot) - start)
        drawn = rng.integers(0, n_groups, size=(block, n_groups))
        # times each group was drawn, per resample: one bincount over row-offset group numbers
        counts = np.bincount((drawn + n_groups * np.arange(block)[:, None]).ravel(),
                             minlength=block * n_groups).reshape(block, n_groups)
        aucs.append(_weighted_aucs(labels, scores, counts[:, group_of].astype(np.float64)))
    aucs = np.concatenate(aucs)
    valid = aucs[np.isfinite(aucs)]
    full = _weighted_aucs(labels, scores, np.ones((1, labels.size)))[0]
    out.update(auc=float(full), n_valid=int(valid.size))
    if valid.size:
        low, high = np.percentile(valid, [50 * (1 - level), 50 * (1 + level)])
        out.update(low=float(low), high=float(high))
    return out


def wilson_interval(successes, n, level=0.95):
    """The Wilson score interval of ``successes`` out of ``n`` (scipy's ``binomtest``);
    ``(nan, nan)`` when ``n`` is 0 (a proportion of nothing)."""
    successes, n = int(successes), int(n)
    _z(level)
    if n == 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise MxvisionError("successes", f"{successes} of {n}: must be between 0 and n")
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def auc_with_intervals(labels, scores, groups=None, level=0.95, n_boot=2000, seed=0):
    """The AUC with both intervals, as ``metrics.json`` carries it: ``auc``, ``ci_bootstrap`` and
    ``ci_delong`` ([low, high] or None), ``se_delong``, ``n_boot_valid``, ``level`` and the
    ``method`` of each figure. One class only: the AUC is NaN and the intervals None."""
    boot = bootstrap_auc(labels, scores, groups=groups, n_boot=n_boot, seed=seed, level=level)
    delong = delong_auc(labels, scores, level=level)
    both = lambda r: [r["low"], r["high"]] if r["low"] is not None else None  # noqa: E731
    return {
        "auc": delong["auc"] if delong["auc"] is not None else float("nan"),
        "ci_bootstrap": both(boot),
        "ci_delong": both(delong),
        "se_delong": delong["se"],
        "n_boot_valid": boot["n_valid"],
        "level": level,
        "method": {"auc": "Mann-Whitney (area under the empirical ROC curve)",
                   "ci_bootstrap": boot["method"], "ci_delong": delong["method"]},
    }
