"""``mxvision compare``: two evaluations of the same films, matched by id, DeLong's paired test;
refusals of folders that cannot be compared. The figures are checked against sklearn's AUCs and
against the paired test run on the films aligned here."""
import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from support.cli import one_line_error, run_cli
from mxvision.evaluate.compare import compare_evaluations
from mxvision.errors import MxvisionError
from mxvision.evaluate import evaluate_run
from mxvision.train.intervals import delong_paired
from mxvision.train.loop import train_head
from mxvision.utils import read_json


def write_predictions(folder, ids, labels, p_positive, classes=("normal", "nodule")):
    """A predictions.csv as `mxvision evaluate` writes it (binary: p_<second class> positive)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label", "predicted"] + [f"p_{c}" for c in classes])
        for film, label, p in zip(ids, labels, p_positive):
            probs = [1 - p, p] + [0.0] * (len(classes) - 2)
            writer.writerow([film, classes[label], classes[int(p >= 0.5)]] + [f"{v:.6f}" for v in probs])
    return folder


@pytest.fixture
def two_evaluations(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    labels = rng.integers(0, 2, n)
    ids = [f"film{k:03d}.png" for k in range(n)]
    p_a = 1 / (1 + np.exp(-(2 * labels - 1 + rng.normal(size=n))))
    p_b = 1 / (1 + np.exp(-(0.5 * (2 * labels - 1) + rng.normal(size=n))))
    order = rng.permutation(n)  # B lists the films in another order
    a = write_predictions(tmp_path / "a", ids, labels, p_a)
    b = write_predictions(tmp_path / "b", [ids[k] for k in order], labels[order], p_b[order])
    # what the CSV holds (6 decimals), aligned by film
    return a, b, labels, np.round(p_a, 6), np.round(p_b, 6)


def test_compare_matches_films_by_id(two_evaluations):
    a, b, labels, p_a, p_b = two_evaluations
    r = compare_evaluations(a, b)
    assert r["auc_a"] == pytest.approx(roc_auc_score(labels, p_a))
    assert r["auc_b"] == pytest.approx(roc_auc_score(labels, p_b))
    test = delong_paired(labels, p_a, p_b)
    assert r["difference"] == pytest.approx(test["difference"]) and r["se"] == pytest.approx(test["se"])
    assert r["ci"] == pytest.approx([test["low"], test["high"]])
    assert r["p_value"] == pytest.approx(test["p_value"])
    assert (r["n"], r["n_positive"], r["positive_class"]) == (60, int(labels.sum()), "nodule")
    assert "DeLong" in r["method"]
    swapped = compare_evaluations(b, a)
    assert swapped["difference"] == pytest.approx(-r["difference"])
    assert swapped["p_value"] == pytest.approx(r["p_value"])


def test_compare_command_prints_and_writes_json(two_evaluations, tmp_path):
    a, b, *_ = two_evaluations
    expected = compare_evaluations(a, b)
    code, out, err = run_cli("compare", a, b, "--json", "--out", tmp_path / "cmp.json")
    assert code == 0, err
    assert json.loads(out) == expected == read_json(tmp_path / "cmp.json")
    code, out, err = run_cli("compare", a, b)
    assert code == 0, err
    assert f"AUC {expected['auc_a']:.4f}" in out and f"AUC {expected['auc_b']:.4f}" in out
    assert f"{expected['difference']:+.4f}" in out and "60 films" in out


def test_refuses_folders_that_scored_different_films(two_evaluations):
    a, b, labels, p_a, _ = two_evaluations
    ids = [f"film{k:03d}.png" for k in range(60)]
    write_predictions(b, ids[:-1] + ["other.png"], labels, p_a)
    code, _, err = run_cli("compare", a, b)
    one_line_error(code, err, str(a), str(b), "different films", "'film059.png' only in the first")
    assert code == 2


def test_refuses_a_film_labelled_differently(two_evaluations):
    a, b, labels, p_a, _ = two_evaluations
    ids = [f"film{k:03d}.png" for k in range(60)]
    relabelled = labels.copy()
    relabelled[7] = 1 - relabelled[7]
    write_predictions(b, ids, relabelled, p_a)
    with pytest.raises(MxvisionError, match="1 films labelled differently, e.g. 'film007.png'") as err:
        compare_evaluations(a, b)
    assert str(a) in str(err.value) and str(b) in str(err.value)


def test_refuses_a_folder_without_predictions_and_a_task_that_is_not_binary(two_evaluations, tmp_path):
    a, *_ = two_evaluations
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("compare", a, tmp_path / "empty")
    one_line_error(code, err, str(tmp_path / "empty"), "no predictions.csv")
    three = write_predictions(tmp_path / "three", ["x", "y"], [0, 2], [0.2, 0.3],
                              classes=("normal", "nodule", "mass"))
    code, _, err = run_cli("compare", three, three)
    one_line_error(code, err, str(three), "3 classes", "binary")


def test_refuses_malformed_predictions(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "predictions.csv").write_text("id,label,predicted,p_normal,p_nodule\n"
                                            "a,normal,normal,0.9,0.1\na,nodule,normal,0.6,0.4\n")
    with pytest.raises(MxvisionError, match="line 3: film 'a' appears twice"):
        compare_evaluations(folder, folder)
    (folder / "predictions.csv").write_text("id,label,predicted,p_normal,p_nodule\n"
                                            "a,normal,normal,0.9,nan\n")
    with pytest.raises(MxvisionError, match="line 2: a probability is NaN"):
        compare_evaluations(folder, folder)


def test_compare_two_real_evaluations(small_run, small_store, tmp_path):
    """Two heads trained on the same features, evaluated by `evaluate_run`: compare reads their
    folders and reports the AUCs their metrics.json hold."""
    other = tmp_path / "run-b"
    train_head(small_store, other, epochs=2, batch_size=8, seed=1, ctx="cpu", progress=False,
               keep_checkpoints=0)
    reports = [evaluate_run(run, small_store.path, tmp_path / name, ctx="cpu", audit=False)
               for run, name in ((small_run, "eval-a"), (other, "eval-b"))]
    r = compare_evaluations(tmp_path / "eval-a", tmp_path / "eval-b")
    assert r["auc_a"] == pytest.approx(reports[0]["auc"], abs=1e-5)
    assert r["auc_b"] == pytest.approx(reports[1]["auc"], abs=1e-5)
    assert r["n"] == reports[0]["n"] and r["run_a"] == reports[0]["run_dir"]
    assert r["n_positive"] == reports[0]["support"]["nodule"]
    assert r["ci"][0] <= r["difference"] <= r["ci"][1] and 0 <= r["p_value"] <= 1
