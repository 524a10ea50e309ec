"""Calibration figures and operating points on hand-made examples whose answers are worked out
here, plus the reliability-diagram PNG."""
import cv2
import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy.stats import norm

from mxvision.errors import MxvisionError
from mxvision.train.reliability import (brier_score, expected_calibration_error, operating_point,
                                        plot_reliability_diagram, reliability_curve,
                                        sensitivity_threshold, youden_threshold)

# Six films, probabilities in bins 0 (0.05, 0.05), 1 (0.15), 8 (0.85) and 9 (0.95, 0.95).
LABELS = np.array([0, 1, 0, 1, 1, 0])
PROBS = np.array([0.05, 0.05, 0.15, 0.95, 0.95, 0.85])

# Youden example: at 0.5 sensitivity 2/3, specificity 1; at 0.3 sensitivity 1, specificity 2/3:
# both J = 2/3, every other threshold less.
ROC_LABELS = np.array([0, 0, 1, 0, 1, 1])
ROC_SCORES = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])


def test_brier_score_is_the_mean_squared_error():
    assert brier_score(LABELS, PROBS) == pytest.approx(np.mean((PROBS - LABELS) ** 2))
    assert brier_score([0, 1], [0.5, 0.5]) == pytest.approx(0.25)


def test_expected_calibration_error_on_a_hand_made_example():
    # bin 0: |0.05 - 1/2| x 2 films; bin 1: |0.15 - 0|; bin 8: |0.85 - 0|; bin 9: |0.95 - 1| x 2
    expected = (2 * 0.45 + 0.15 + 0.85 + 2 * 0.05) / 6
    assert expected_calibration_error(LABELS, PROBS) == pytest.approx(expected)
    # one bin holding everything: |mean p - fraction positive|
    assert expected_calibration_error(LABELS, PROBS, n_bins=1) == pytest.approx(abs(PROBS.mean() - 0.5))
    # perfectly calibrated bins give 0
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0)


def test_reliability_curve_bins_counts_and_empty_bins():
    curve = reliability_curve(LABELS, PROBS)
    assert curve["bin_edges"] == pytest.approx(np.linspace(0, 1, 11))
    assert curve["count"] == [2, 1, 0, 0, 0, 0, 0, 0, 1, 2]
    assert curve["mean_predicted"][0] == pytest.approx(0.05) and curve["fraction_positive"][0] == 0.5
    assert curve["mean_predicted"][9] == pytest.approx(0.95) and curve["fraction_positive"][9] == 1.0
    assert curve["fraction_positive"][8] == 0.0
    assert curve["mean_predicted"][2] is None and curve["fraction_positive"][5] is None
    # a probability on an edge goes to the lower bin (sklearn's calibration_curve binning)
    assert reliability_curve([0, 1], [0.1, 0.2])["count"][:2] == [1, 1]
    assert reliability_curve([0, 1], [0.0, 1.0], n_bins=4)["count"] == [1, 0, 0, 1]


def test_youden_threshold_takes_the_higher_of_tied_thresholds():
    assert youden_threshold(ROC_LABELS, ROC_SCORES) == 0.5
    # without the tie, the single best threshold
    assert youden_threshold([0, 0, 1, 1, 0, 1], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) == 0.3


def test_sensitivity_threshold_is_the_highest_reaching_the_target():
    assert sensitivity_threshold(ROC_LABELS, ROC_SCORES, 0.9) == 0.3   # needs all three positives
    assert sensitivity_threshold(ROC_LABELS, ROC_SCORES, 2 / 3) == 0.5
    assert sensitivity_threshold(ROC_LABELS, ROC_SCORES, 0.3) == 0.6
    assert sensitivity_threshold(ROC_LABELS, ROC_SCORES, 1.0) == 0.3
    with pytest.raises(MxvisionError, match="target sensitivity"):
        sensitivity_threshold(ROC_LABELS, ROC_SCORES, 0)
    with pytest.raises(MxvisionError, match="both classes"):
        youden_threshold([1, 1], [0.2, 0.3])


def wilson(k, n, z=norm.ppf(0.975)):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def test_operating_point_counts_and_wilson_intervals():
    r = operating_point(ROC_LABELS, ROC_SCORES, 0.4)  # 0.4 itself is called positive
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 1, 2, 1)
    for name, (k, n) in {"sensitivity": (2, 3), "specificity": (2, 3), "ppv": (2, 3),
                         "npv": (2, 3)}.items():
        assert r[name]["value"] == pytest.approx(k / n), name
        assert (r[name]["low"], r[name]["high"]) == pytest.approx(wilson(k, n)), name
    r = operating_point(ROC_LABELS, ROC_SCORES, 0.55)
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (1, 0, 3, 2)
    assert r["specificity"]["value"] == 1.0 and r["ppv"]["value"] == 1.0
    assert (r["npv"]["low"], r["npv"]["high"]) == pytest.approx(wilson(3, 5))
    nothing_called = operating_point(ROC_LABELS, ROC_SCORES, 0.9)
    assert nothing_called["ppv"] == {"value": None, "low": None, "high": None}
    assert nothing_called["sensitivity"]["value"] == 0.0 and nothing_called["threshold"] == 0.9


def test_reliability_diagram_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=200)
    labels = (rng.uniform(size=200) < probs).astype(int)
    fig = plot_reliability_diagram(labels, probs, tmp_path / "out" / "reliability.png", title="t")
    assert isinstance(fig, Figure)
    path = tmp_path / "out" / "reliability.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imread(str(path))
    assert img is not None and img.shape[0] > 300 and img.std() > 0
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]  # no temporary left


@pytest.mark.parametrize("probs, word", [([0.2, 1.5], r"\[0, 1\]"), ([0.2], "does not match"),
                                         ([0.2, float("nan")], "NaN")])
def test_bad_probabilities_are_one_line_errors(probs, word):
    with pytest.raises(MxvisionError, match=word):
        expected_calibration_error([0, 1], probs)
