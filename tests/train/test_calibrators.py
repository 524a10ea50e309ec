"""train --calibrate: Platt and isotonic calibrators fitted on the validation split, checked against
sklearn's own, carried by the run folder into predict, and refused when a file is malformed."""
import json
import shutil

import mxnet as mx
import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from mxvision.errors import BadRun, MxvisionError
from mxvision.inference import predict
from mxvision.train.calibrators import (CALIBRATION, apply_calibrator, calibrate_probs, fit_calibrator,
                                        load_run_calibrator)
from mxvision.train.loop import load_classifier, load_head, predict_probs, train_head
from support.cli import one_line_error, run_cli


def _miscalibrated(n, seed, power=3.0):
    """Labels drawn with true probability q, and an over-confident score: logit(q) times ``power``."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.02, 0.98, n)
    labels = (rng.uniform(size=n) < q).astype(int)
    scores = 1.0 / (1.0 + np.exp(-power * np.log(q / (1 - q))))
    return labels, scores


def _ece(labels, scores, bins=10):
    """Expected calibration error: bin-weighted |mean label - mean score| over equal-width bins."""
    which = np.minimum((scores * bins).astype(int), bins - 1)
    return sum(abs(labels[which == k].mean() - scores[which == k].mean()) * (which == k).mean()
               for k in range(bins) if (which == k).any())


def _logit(p):
    p = np.clip(p, 1e-12, 1 - 1e-12)  # as documented: a float32 softmax gives exact 0 and 1
    return np.log(p / (1 - p))


GRID = np.linspace(0.001, 0.999, 201)


def test_platt_gives_sklearns_sigmoid_calibration():
    labels, scores = _miscalibrated(400, seed=1)
    calibrator = fit_calibrator("platt", labels, scores)
    # sklearn's Platt scaling of a frozen model whose decision function is affine in logit(score)
    # (Platt's fit does not depend on which affine map it is given)
    x = _logit(scores)[:, None]
    frozen = FrozenEstimator(LogisticRegression().fit(x, labels))
    sk = CalibratedClassifierCV(frozen, method="sigmoid").fit(x, labels)
    np.testing.assert_allclose(apply_calibrator(calibrator, GRID), sk.predict_proba(_logit(GRID)[:, None])[:, 1],
                               atol=1e-6)
    assert calibrator["a"] < 0 and abs(calibrator["a"] + 1 / 3) < 0.1  # undoes the power of 3
    assert calibrator["fitted_on"] == {"split": "val", "n": 400, "positives": int(labels.sum())}
    json.dumps(calibrator, allow_nan=False)


def test_platt_stays_finite_on_a_perfectly_separated_split():
    """Platt's smoothed targets: a separated validation split does not send the slope to infinity."""
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    calibrator = fit_calibrator("platt", labels, scores)
    out = apply_calibrator(calibrator, scores)
    assert np.isfinite([calibrator["a"], calibrator["b"]]).all()
    assert (out[:3] < 0.5).all() and (out[3:] > 0.5).all()
    assert out.min() > 0.05 and out.max() < 0.95  # never 0 or 1 from six films


def test_isotonic_gives_sklearns_isotonic_regression():
    labels, scores = _miscalibrated(300, seed=2)
    calibrator = fit_calibrator("isotonic", labels, scores)
    sk = IsotonicRegression(out_of_bounds="clip").fit(scores, labels)
    outside = np.array([-0.5, 0.0, 1.0, 1.5])  # clipped at both ends, as sklearn clips
    tried = np.concatenate([GRID, scores, outside])
    np.testing.assert_allclose(apply_calibrator(calibrator, tried), sk.predict(tried), atol=1e-12)
    assert calibrator["x_thresholds"] == sk.X_thresholds_.tolist()


@pytest.mark.parametrize("kind", ["platt", "isotonic"])
def test_calibration_is_monotonic_and_lowers_the_expected_calibration_error(kind):
    val_labels, val_scores = _miscalibrated(2000, seed=3)
    test_labels, test_scores = _miscalibrated(2000, seed=4)
    calibrator = fit_calibrator(kind, val_labels, val_scores)
    assert (np.diff(apply_calibrator(calibrator, GRID)) >= 0).all()
    calibrated = apply_calibrator(calibrator, test_scores)
    before, after = _ece(test_labels, test_scores), _ece(test_labels, calibrated)
    assert before > 0.08 and after < before / 2, (before, after)
    brier = lambda p: np.mean((p - test_labels) ** 2)  # noqa: E731
    assert brier(calibrated) < brier(test_scores)


def test_calibrate_probs_replaces_the_positive_column_and_keeps_rows_summing_to_one():
    labels, scores = _miscalibrated(100, seed=5)
    calibrator = fit_calibrator("platt", labels, scores)
    probs = np.stack([1 - scores, scores], axis=1).astype(np.float32)
    out = calibrate_probs(calibrator, probs)
    np.testing.assert_allclose(out[:, 1], apply_calibrator(calibrator, probs[:, 1]), atol=1e-6)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
    assert out.dtype == np.float32 and calibrate_probs(None, probs) is probs


@pytest.mark.parametrize("kind", ["platt", "isotonic"])
def test_a_validation_split_of_one_class_is_refused_in_one_line(kind):
    with pytest.raises(BadRun) as err:
        fit_calibrator(kind, [0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4])
    assert "no positive rows" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- a trained run
@pytest.fixture(scope="module")
def platt_run(small_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("platt-run")
    # lr 0.001: at the default 0.01 this random-feature head saturates to probabilities of 0 and 1
    train_head(small_store, out, epochs=3, batch_size=8, lr=0.001, ctx="cpu", progress=False,
               calibrate="platt")
    return out


def test_a_calibrated_run_keeps_a_calibrator_fitted_on_its_best_heads_validation_probabilities(platt_run, small_store):
    saved = json.loads((platt_run / CALIBRATION).read_text())
    state = json.loads((platt_run / "state.json").read_text())
    config = json.loads((platt_run / "config.json").read_text())
    assert saved["epoch"] == state["best_epoch"] and config["calibration"]["kind"] == "platt"
    head, _ = load_head(platt_run, ctx="cpu")
    x_val, y_val, _ = small_store.load("val")
    refit = fit_calibrator("platt", y_val, predict_probs(head, x_val, mx.cpu())[:, 1])
    assert saved["fitted_on"] == refit["fitted_on"] and saved["fitted_on"]["n"] == len(y_val)
    # the optimiser stops within its tolerance, and the probabilities it saw in training can differ
    # from these in the last float32 bit (another thread count): the fits agree to 1e-4, their
    # calibrated probabilities to 1e-5
    assert saved["a"] == pytest.approx(refit["a"], rel=1e-4) and saved["b"] == pytest.approx(refit["b"], rel=1e-4, abs=1e-5)
    grid = np.linspace(0.01, 0.99, 50)
    assert np.abs(apply_calibrator(saved, grid) - apply_calibrator(refit, grid)).max() < 1e-5
    assert load_run_calibrator(platt_run) == saved


def test_predict_applies_the_runs_calibrator_after_the_softmax(platt_run, small_store):
    paths = [it["path"] for it in small_store.items[:5]]
    results = predict(platt_run, paths, ctx="cpu")
    saved = json.loads((platt_run / CALIBRATION).read_text())
    from mxvision.data import transforms
    net, _ = load_classifier(platt_run, ctx="cpu")
    raw = net(mx.nd.array(np.stack([transforms.load_image(p, "imagenet224") for p in paths]))).asnumpy()
    # Platt's formula written out here, not through apply_calibrator
    positive = 1 / (1 + np.exp(saved["a"] * _logit(raw[:, 1].astype(np.float64)) + saved["b"]))
    got = np.array([r["probabilities"]["nodule"] for r in results])
    np.testing.assert_allclose(got, positive, atol=1e-5)
    assert np.abs(got - raw[:, 1]).max() > 1e-3  # calibration changed what predict says
    assert all(r["calibration"] == "calibrated (platt)" for r in results)
    np.testing.assert_allclose([sum(r["probabilities"].values()) for r in results], 1.0, atol=1e-6)


def test_an_uncalibrated_run_says_so_and_has_no_calibrator(small_run, small_store):
    assert load_run_calibrator(small_run) is None
    result = predict(small_run, [small_store.items[0]["path"]], ctx="cpu")[0]
    assert result["calibration"] == "uncalibrated"


HOSTILE = {
    "not json": "{kind: platt",
    "a list": "[1, 2]",
    "an unknown kind": {"kind": "sigmoid"},
    "a NaN slope": {"a": float("nan")},
    "a string slope": {"a": "1.0"},
    "decreasing thresholds": {"kind": "isotonic", "x_thresholds": [0.9, 0.1], "y_thresholds": [0.0, 1.0]},
    "thresholds above 1": {"kind": "isotonic", "x_thresholds": [0.1, 0.9], "y_thresholds": [0.0, 2.0]},
    "uneven thresholds": {"kind": "isotonic", "x_thresholds": [0.1, 0.9], "y_thresholds": [0.5]},
    "no fitted_on": {"fitted_on": None},
    "another epoch": {"epoch": 99},
    "a boolean epoch": {"epoch": True},
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_calibration_file_is_refused_in_one_line_naming_it(case, platt_run, small_store, tmp_path):
    run = shutil.copytree(platt_run, tmp_path / "run")
    change = HOSTILE[case]
    if isinstance(change, str):
        text = change
    else:
        text = json.dumps({**json.loads((run / CALIBRATION).read_text()), **change})
    (run / CALIBRATION).write_text(text)
    with pytest.raises(BadRun) as err:
        load_run_calibrator(run)
    message = str(err.value)
    assert str(run / CALIBRATION) in message and "\n" not in message
    code, _, stderr = run_cli("predict", "--run", run, small_store.items[0]["path"])
    one_line_error(code, stderr, CALIBRATION)


def test_calibration_refusals_come_before_the_run_folder_is_made(small_store, tmp_path):
    with pytest.raises(MxvisionError, match="calibrate 'sigmoid': must be one of platt, isotonic"):
        train_head(small_store, tmp_path / "a", epochs=1, batch_size=8, calibrate="sigmoid")
    with pytest.raises(BadRun, match="split 'nosuch' has no normal and no nodule rows"):
        train_head(small_store, tmp_path / "b", epochs=1, batch_size=8, calibrate="platt", val_split="nosuch")
    code, _, err = run_cli("train", "--features", small_store.path, "--out", tmp_path / "c", "--calibrate", "beta")
    one_line_error(code, err, "--calibrate")
    assert not list(tmp_path.iterdir())


def test_train_calibrate_from_the_command_line_and_a_rerun_without_it(small_store, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli("train", "--features", small_store.path, "--out", run, "--epochs", 2,
                             "--batch-size", 8, "--calibrate", "isotonic", "--quiet", "--ctx", "cpu")
    assert code == 0, err
    saved = json.loads((run / CALIBRATION).read_text())
    assert saved["kind"] == "isotonic" and saved["fitted_on"]["split"] == "val"
    fitted = saved["fitted_on"]
    assert (f"calibrated (isotonic) on split 'val' ({fitted['n']} images, {fitted['positives']} positive): "
            f"{run}/{CALIBRATION}") in out
    code, out, err = run_cli("predict", "--run", run, "--json", small_store.items[0]["path"])
    assert code == 0 and json.loads(out)[0]["calibration"] == "calibrated (isotonic)"
    # resumed without --calibrate: the calibrator of a head that may no longer be the best goes
    code, out, err = run_cli("train", "--features", small_store.path, "--out", run, "--epochs", 3,
                             "--batch-size", 8, "--quiet", "--ctx", "cpu")
    assert code == 0, err
    assert not (run / CALIBRATION).exists() and load_run_calibrator(run) is None
    assert json.loads((run / "config.json").read_text()).get("calibration") is None
