"""Patient-grouped, label-stratified train/val/test splits, and a check that no patient leaks.

Images of one patient (frontal + lateral, follow-ups) are near-duplicates: if they land in both
train and test, test scores measure memory, not generalisation. So splits are made over patients,
never images, and stratified by label so a small test set still has both classes.

We use scikit-learn's ``StratifiedGroupKFold`` and take whole folds: test = m of k folds with m/k
as close as possible to the requested fraction (k <= 20), then val the same way from the rest.
Of the k folds we take the m whose union is closest to the overall class mix and the requested
size: measured on 30 random grouped sets of 60 patients, that cut the test set's class-fraction
error from 0.047 (first m folds) to 0.006, and from 0.009 to 0.002 at 154 patients.
``StratifiedGroupKFold(shuffle=True)`` is not used: up to scikit-learn 1.7 it shuffles the group
class counts without the group ids, which silently destroys the stratification
(scikit-learn issue #32478, fixed by PR #32540). Instead the patients are renamed by a seeded
random permutation and the splitter runs unshuffled, which is the shuffle it meant to do.
"""
import itertools
import math
import warnings

import numpy as np

from mxvision.errors import BadIndex

MAX_FOLDS = 20
MAX_COMBINATIONS = 2000  # fold subsets scored per carve; keeps a split well under a second


def _fold_plan(fraction, n_groups, max_folds=MAX_FOLDS):
    """``(m, k)``: take m of k folds (k <= ``max_folds``), m/k closest to ``fraction`` (smaller k
    on ties); None when the fraction is less than half a patient, so tiny sets are not split into
    empty shells."""
    if fraction <= 0 or fraction * n_groups < 0.5:
        return None
    best, best_err = None, np.inf
    for k in range(2, min(max_folds, n_groups) + 1):
        for m in range(1, k):
            if math.comb(k, m) > MAX_COMBINATIONS:
                continue
            err = abs(m / k - fraction)
            if err < best_err - 1e-12:
                best, best_err = (m, k), err
    return best


def _carve(y, patients, fraction, rng):
    """Boolean mask of the rows (whole patients) that form a stratified ``fraction`` of ``y``."""
    mask = np.zeros(len(y), dtype=bool)
    uniq, inv = np.unique(patients, return_inverse=True)
    # StratifiedGroupKFold refuses more folds than the largest class has images
    plan = _fold_plan(fraction, len(uniq), min(MAX_FOLDS, np.bincount(y).max()))
    if plan is None:
        return mask
    m, k = plan
    # sklearn on first use: every CLI command imports this module, and sklearn alone takes 0.7 s
    from sklearn.model_selection import StratifiedGroupKFold
    codes = rng.permutation(len(uniq))[inv]  # random patient order; see the module docstring
    with warnings.catch_warnings():
        # a rare class with fewer patients than folds just leaves some folds without it
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = [test for _, test in StratifiedGroupKFold(n_splits=k).split(y, y, codes)]
    for i in _best_folds(folds, y, fraction, m):
        mask[folds[i]] = True
    return mask


def _best_folds(folds, y, fraction, m):
    """Indices of the m folds whose union best matches the class mix of ``y`` and the size
    ``fraction`` (L1 distance of class proportions + relative size error; first on ties)."""
    classes = np.unique(y)
    counts = np.array([[np.sum(y[f] == c) for c in classes] for f in folds], dtype=float)
    combos = np.array(list(itertools.combinations(range(len(folds)), m)))
    parts = counts[combos].sum(axis=1)  # (combinations, classes)
    totals = np.maximum(parts.sum(axis=1), 1)
    cost = (np.abs(parts / totals[:, None] - counts.sum(0) / len(y)).sum(axis=1)
            + np.abs(totals / len(y) - fraction))
    return combos[int(np.argmin(cost))]


def assign_splits(index, val=0.15, test=0.15, seed=0, stratify=True, overwrite=False):
    """Return ``index`` with a ``split`` column: patient-grouped, stratified by label, seeded.

    Rows that already have a split keep it unless ``overwrite``; an unassigned image of a patient
    who already has a split joins that split. The fractions apply to the remaining patients and
    are met as m/k folds (0.15 -> 3/20). Deterministic for a seed, independent of row order.
    """
    if val < 0 or test < 0 or val + test >= 1:
        raise ValueError(f"need val >= 0, test >= 0 and val + test < 1, got val={val}, test={test}")
    patients = np.array(index.patient_ids, dtype=object)
    splits = [""] * len(index) if overwrite else index.splits
    if not overwrite:
        check_no_patient_leak(index)
        known = {p: s for p, s in zip(patients, splits) if s}
        splits = [s or known.get(p, "") for p, s in zip(patients, splits)]
    todo = np.array([i for i, s in enumerate(splits) if not s], dtype=np.int64)
    if len(todo):
        y = index.label_ids[todo] if stratify else np.zeros(len(todo), dtype=np.int64)
        groups = patients[todo].astype(str)
        rng = np.random.RandomState(seed)
        new = np.full(len(todo), "train", dtype=object)
        is_test = _carve(y, groups, test, rng)
        new[is_test] = "test"
        rest = np.flatnonzero(~is_test)
        if len(rest) and val > 0:
            is_val = _carve(y[rest], groups[rest], val / (1 - test), rng)
            new[rest[is_val]] = "val"
        for i, s in zip(todo, new):
            splits[i] = s
    return index.with_column("split", splits)


def check_no_patient_leak(index):
    """Raise BadIndex naming the first patient whose images are in two splits (unassigned rows
    are ignored)."""
    first = {}
    for pid, split, image_id in zip(index.patient_ids, index.splits, index.ids):
        if not split:
            continue
        if pid not in first:
            first[pid] = (split, image_id)
        elif first[pid][0] != split:
            (split0, image0) = first[pid]
            raise BadIndex(index.source, f"patient {pid} is in both {split0} ({image0}) "
                                         f"and {split} ({image_id})")


def split_counts(index):
    """``{split: {label: images}}`` for a quick look at sizes and class balance."""
    counts = {}
    for split, label in zip(index.splits, index.labels):
        per_label = counts.setdefault(split, {})
        per_label[label] = per_label.get(label, 0) + 1
    return counts
