"""AUC intervals (DeLong, patient bootstrap) and Wilson intervals against independent computations:
DeLong's structural components written out pairwise (O(m n), as in the 1988 paper), the Wilson
closed form, and simulations whose true AUC is known in closed form."""
import json
import time

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from mxvision.errors import MxvisionError
from mxvision.train.intervals import (auc_with_intervals, bootstrap_auc, delong_auc, delong_paired,
                                      wilson_interval)


def naive_components(labels, scores):
    """DeLong 1988's psi(X_i, Y_j) for every positive/negative pair (1 above, 1/2 tie, 0 below),
    and the structural components V10 (per positive) and V01 (per negative)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)


def naive_covariance(labels, a, b):
    """The 2x2 covariance of two AUCs from the pairwise components: S10/m + S01/n."""
    auc_a, v10_a, v01_a = naive_components(labels, a)
    auc_b, v10_b, v01_b = naive_components(labels, b)
    s10 = np.cov(np.stack([v10_a, v10_b]))
    s01 = np.cov(np.stack([v01_a, v01_b]))
    return (auc_a, auc_b), s10 / len(v10_a) + s01 / len(v01_a)


def tied_scores(rng, n, shift=0.8):
    """Binormal scores rounded to one decimal, so there are many ties (within and across classes)."""
    labels = rng.integers(0, 2, n)
    return labels, np.round(rng.normal(size=n) + shift * labels, 1)


def test_delong_auc_and_se_equal_the_pairwise_structural_components():
    rng = np.random.default_rng(0)
    labels, scores = tied_scores(rng, 157)
    (auc, _), cov = naive_covariance(labels, scores, scores)
    r = delong_auc(labels, scores)
    assert r["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert r["auc"] == pytest.approx(auc, abs=1e-12)
    assert r["se"] == pytest.approx(np.sqrt(cov[0, 0]), rel=1e-10)
    z = norm.ppf(0.975)
    assert r["low"] == pytest.approx(auc - z * r["se"]) and r["high"] == pytest.approx(auc + z * r["se"])
    r90 = delong_auc(labels, scores, level=0.9)
    assert r90["high"] - r90["low"] == pytest.approx(2 * norm.ppf(0.95) * r["se"])
    assert "DeLong" in r["method"]


def test_delong_interval_is_clipped_to_the_unit_interval():
    labels = np.array([0, 0, 0, 1, 1, 1])
    r = delong_auc(labels, [0.1, 0.2, 0.35, 0.3, 0.8, 0.9])  # AUC 8/9 with a wide interval
    assert r["auc"] == pytest.approx(8 / 9) and r["auc"] + 1.96 * r["se"] > 1
    assert r["high"] == 1.0 and r["low"] == pytest.approx(8 / 9 - norm.ppf(0.975) * r["se"])


def test_delong_paired_equals_the_pairwise_covariance():
    rng = np.random.default_rng(1)
    labels, a = tied_scores(rng, 211)
    b = np.round(a + rng.normal(scale=0.8, size=a.size), 1)  # correlated with a, weaker
    (auc_a, auc_b), cov = naive_covariance(labels, a, b)
    r = delong_paired(labels, a, b)
    se = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert (r["auc_a"], r["auc_b"]) == (pytest.approx(auc_a), pytest.approx(auc_b))
    assert r["difference"] == pytest.approx(auc_a - auc_b)
    assert r["se"] == pytest.approx(se, rel=1e-10)
    assert r["z"] == pytest.approx((auc_a - auc_b) / se)
    assert r["p_value"] == pytest.approx(2 * norm.sf(abs(r["z"])))
    assert r["low"] == pytest.approx(r["difference"] - norm.ppf(0.975) * se)
    # the correlation is what the paired test exploits: unpaired variances would add up
    assert r["se"] < np.hypot(delong_auc(labels, a)["se"], delong_auc(labels, b)["se"])


def test_delong_paired_on_rank_preserving_and_rank_reversing_copies():
    rng = np.random.default_rng(2)
    labels, a = tied_scores(rng, 120)
    same = delong_paired(labels, a, 3 * a + 5)  # same ranking: nothing to tell apart
    assert same["difference"] == 0 and same["se"] == pytest.approx(0, abs=1e-12)
    assert same["p_value"] == 1.0
    # reversed ranking: AUC_b = 1 - AUC_a and cov = -var, so se(a - b) = 2 se(a)
    flipped = delong_paired(labels, a, -a)
    single = delong_auc(labels, a)
    assert flipped["auc_b"] == pytest.approx(1 - single["auc"])
    assert flipped["se"] == pytest.approx(2 * single["se"], rel=1e-10)


def test_delong_paired_se_agrees_with_a_paired_bootstrap():
    """DeLong's asymptotic se of the difference against the spread of the difference over
    sklearn AUCs of resampled films (an independent, computational estimate)."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 400)
    a = rng.normal(size=400) + labels
    b = 0.7 * a + rng.normal(scale=0.7, size=400)
    r = delong_paired(labels, a, b)
    diffs = []
    for _ in range(600):
        k = rng.integers(0, 400, 400)
        diffs.append(roc_auc_score(labels[k], a[k]) - roc_auc_score(labels[k], b[k]))
    assert r["se"] == pytest.approx(np.std(diffs, ddof=1), rel=0.12)


def test_bootstrap_auc_is_seeded_and_reports_the_full_sample_auc():
    rng = np.random.default_rng(4)
    labels, scores = tied_scores(rng, 90)
    groups = np.repeat(np.arange(30), 3)
    one = bootstrap_auc(labels, scores, groups=groups, n_boot=500, seed=7)
    assert one == bootstrap_auc(labels, scores, groups=groups, n_boot=500, seed=7)
    assert one != bootstrap_auc(labels, scores, groups=groups, n_boot=500, seed=8)
    assert one["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert one["low"] < one["auc"] < one["high"] and one["n_boot"] == one["n_valid"] == 500
    assert "patients" in one["method"]
    # string patient ids work as well as numbers
    named = bootstrap_auc(labels, scores, groups=[f"p{g:03d}" for g in groups], n_boot=500, seed=7)
    assert (named["low"], named["high"]) == (one["low"], one["high"])


def test_resamples_with_one_class_are_skipped_and_counted():
    # one positive patient among 5: a resample lacks a positive with probability (4/5)^5
    labels = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    scores = np.linspace(0, 1, 10)
    groups = np.repeat(np.arange(5), 2)
    r = bootstrap_auc(labels, scores, groups=groups, n_boot=4000, seed=0)
    expected = 1 - (4 / 5) ** 5 - (1 / 5) ** 5  # no positive patient, or only the positive one
    assert r["n_valid"] / r["n_boot"] == pytest.approx(expected, abs=0.025)


def clustered_sample(rng, n_patients, films=4, shift=1.0, patient_sd=1.0, film_sd=0.4):
    """Films of patients whose scores share a patient effect (so films of one patient are not
    independent); the label is the patient's. The population AUC of a random positive film
    against a random negative film of other patients is Phi(shift / sqrt(2 (sd_p^2 + sd_f^2)))."""
    patient_label = rng.integers(0, 2, n_patients)
    effect = rng.normal(scale=patient_sd, size=n_patients)
    groups = np.repeat(np.arange(n_patients), films)
    scores = shift * patient_label[groups] + effect[groups] + rng.normal(scale=film_sd, size=groups.size)
    true_auc = norm.cdf(shift / np.sqrt(2 * (patient_sd ** 2 + film_sd ** 2)))
    return patient_label[groups], scores, groups, true_auc


def test_patient_bootstrap_covers_the_true_auc_and_image_resampling_does_not():
    """With four correlated films per patient the patient bootstrap's 95% interval covers the
    true AUC about 95% of the time; resampling films as if independent is too narrow."""
    rng = np.random.default_rng(5)
    covered = {"patients": 0, "images": 0}
    trials = 150
    for trial in range(trials):
        labels, scores, groups, true_auc = clustered_sample(rng, 60)
        by_patient = bootstrap_auc(labels, scores, groups=groups, n_boot=400, seed=trial)
        by_image = bootstrap_auc(labels, scores, n_boot=400, seed=trial)
        covered["patients"] += by_patient["low"] <= true_auc <= by_patient["high"]
        covered["images"] += by_image["low"] <= true_auc <= by_image["high"]
    assert 0.88 <= covered["patients"] / trials <= 0.99, covered
    assert covered["images"] / trials < covered["patients"] / trials - 0.1, covered


def test_bootstrap_of_5000_films_2000_resamples_is_fast():
    rng = np.random.default_rng(6)
    labels, scores = tied_scores(rng, 5000)
    start = time.perf_counter()
    r = bootstrap_auc(labels, scores, groups=np.arange(5000) // 2, n_boot=2000)
    assert time.perf_counter() - start < 2.0
    assert r["n_valid"] == 2000 and r["low"] < r["auc"] < r["high"]


@pytest.mark.parametrize("successes, n", [(0, 10), (3, 10), (10, 10), (47, 120), (1, 1)])
def test_wilson_interval_equals_the_closed_form(successes, n):
    z = norm.ppf(0.975)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(max(0.0, centre - half), abs=1e-12)
    assert high == pytest.approx(min(1.0, centre + half), abs=1e-12)


def test_wilson_interval_of_nothing_is_nan():
    assert all(np.isnan(v) for v in wilson_interval(0, 0))


def test_auc_with_intervals_combines_both_and_is_json():
    rng = np.random.default_rng(8)
    labels, scores = tied_scores(rng, 80)
    r = auc_with_intervals(labels, scores, groups=np.arange(80) // 2, n_boot=300)
    json.dumps(r, allow_nan=False)
    delong = delong_auc(labels, scores)
    boot = bootstrap_auc(labels, scores, groups=np.arange(80) // 2, n_boot=300)
    assert r["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert r["ci_delong"] == [delong["low"], delong["high"]] and r["se_delong"] == delong["se"]
    assert r["ci_bootstrap"] == [boot["low"], boot["high"]] and r["n_boot_valid"] == 300
    assert "DeLong" in r["method"]["ci_delong"] and "patients" in r["method"]["ci_bootstrap"]


def test_one_class_gives_nan_auc_and_no_intervals():
    r = auc_with_intervals([0, 0, 0], [0.1, 0.5, 0.9], n_boot=50)
    assert np.isnan(r["auc"]) and r["ci_bootstrap"] is None and r["ci_delong"] is None
    assert r["se_delong"] is None and r["n_boot_valid"] == 0
    assert delong_paired([1, 1], [0.1, 0.2], [0.3, 0.4])["p_value"] is None


@pytest.mark.parametrize("labels, scores, word", [
    ([0, 1, 2], [0.1, 0.2, 0.3], "0/1"),
    ([0, 1, 1], [0.1, 0.2], "does not match"),
    ([0, 1, 1], [0.1, float("nan"), 0.3], "NaN"),
])
def test_bad_inputs_are_one_line_errors(labels, scores, word):
    with pytest.raises(MxvisionError, match=word) as err:
        delong_auc(labels, scores)
    assert "\n" not in str(err.value)
    with pytest.raises(MxvisionError, match=word):
        bootstrap_auc(labels, scores, n_boot=10)
