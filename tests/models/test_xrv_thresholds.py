"""Recomputed torchxrayvision thresholds on real NIH films with their real labels (random weights).

Each figure is checked against a computation written here from the definitions (a loop over the
candidate thresholds), not against the code under test.
"""
import json

import numpy as np
import pytest
from sklearn.metrics import roc_curve
from support.xrv_files import DENSE
from support.xrv_labelled import nih_findings, nih_pathology_index, soft_weights

from mxvision.data.index import read_index
from mxvision.errors import WeightsError
from mxvision.inference import calibrate_xrv, classify
from mxvision.models import zoo
from mxvision.models.xrv.common import DEFAULT_PATHOLOGIES, WEIGHTS, op_norm
from mxvision.models.xrv.thresholds import fit_thresholds, load_thresholds

#: Films picked from the NIH sample: 14 with an effusion, then 6 with atelectasis (no effusion),
#: then 50 normal ones.
COUNTS = [("Effusion", 14), ("Atelectasis", 6), ("No Finding", 50)]
EFFUSION = DEFAULT_PATHOLOGIES.index("Effusion")


def brute_force_youden(y, p):
    """The threshold t of largest tpr - fpr among the scores (calling p >= t positive); the
    highest t on ties, as a walk down the ROC curve from the strictest threshold meets it first."""
    best, best_t = -np.inf, None
    for t in sorted(set(p), reverse=True):
        called = p >= t
        j = called[y == 1].mean() - called[y == 0].mean()
        if j > best + 1e-12:
            best, best_t = j, t
    return best_t, best


def brute_force_ppv80(y, p):
    """torchxrayvision's PPV-80 point: the lowest threshold whose PPV exceeds 0.8, then the next
    lower threshold (its ``thres[idx - 1]``)."""
    ts = sorted(set(p))
    for k, t in enumerate(ts):
        called = p >= t
        if y[called].mean() > 0.8:
            return ts[max(k - 1, 0)]
    return ts[-1]


@pytest.fixture(scope="module")
def setup(shared, tmp_path_factory):
    folder = tmp_path_factory.mktemp("xrv_thresholds")
    weights = soft_weights(folder)
    index = nih_pathology_index(shared, folder / "nih.csv", COUNTS)
    out = folder / "thresholds.json"
    doc = calibrate_xrv(index, out, model=DENSE, weights=weights, min_positives=10)
    raw = classify(read_index(index).paths, model=DENSE, weights=weights, calibrated=False, batch_size=8)
    return {"folder": folder, "weights": weights, "index": index, "out": out, "doc": doc,
            "probs": np.array([r["outputs"] for r in raw]), "paths": [r["path"] for r in raw]}


def truth(shared, paths, finding):
    """1/0 per film from the shared labels.csv's finding_labels (read here, not by mxvision)."""
    findings = nih_findings(shared)
    return np.array([finding in findings[p.rsplit("/", 1)[-1]] for p in paths], dtype=int)


def test_effusion_threshold_is_the_roc_point_of_largest_youden_j(setup, shared):
    y = truth(shared, setup["paths"], "Effusion")
    p = setup["probs"][:, EFFUSION]
    assert len(set(p)) == len(p)  # the soft weights give no ties: the threshold is well defined
    entry = setup["doc"]["pathologies"]["Effusion"]
    assert (entry["n"], entry["positives"]) == (len(y), 14) and entry["refused"] is None
    expected, j = brute_force_youden(y, p)
    assert entry["op_thresh"] == pytest.approx(expected, rel=1e-12)
    assert entry["youden_j"] == pytest.approx(j, abs=1e-12)
    fpr, tpr, thr = roc_curve(y, p)  # the same point as sklearn's curve gives
    assert entry["op_thresh"] == pytest.approx(thr[np.argmax(tpr - fpr)], rel=1e-12)
    assert entry["ppv80_thresh"] == pytest.approx(brute_force_ppv80(y, p), rel=1e-12)
    from sklearn.metrics import roc_auc_score
    assert entry["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert entry["ci_delong"][0] <= entry["auc"] <= entry["ci_delong"][1]
    assert entry["at_op_thresh"]["sensitivity"] == pytest.approx((p[y == 1] >= expected).mean())


def test_too_few_positives_untrained_and_unlabelled_are_refused(setup, shared):
    entries = setup["doc"]["pathologies"]
    atelectasis = entries["Atelectasis"]
    positives = int(truth(shared, setup["paths"], "Atelectasis").sum())
    assert 6 <= positives < 10  # six picked for it, and any the effusion films have
    assert atelectasis["positives"] == positives and atelectasis["op_thresh"] is None
    assert atelectasis["ppv80_thresh"] is None
    assert "only %d positive films (minimum 10)" % positives in atelectasis["refused"]
    assert atelectasis["auc"] is not None  # the AUC is still reported, with its n
    assert "no trained output" in entries["Infiltration"]["refused"]  # mimic_nb has no Infiltration
    for name in ("Edema", "Consolidation", "Pneumothorax", "Cardiomegaly"):  # trained by mimic_nb
        positives = int(truth(shared, setup["paths"], name).sum())
        assert entries[name]["positives"] == positives
        assert (entries[name]["op_thresh"] is None) == (positives < 10)
    fracture = entries["Fracture"]  # NIH has no Fracture label: the column is empty
    assert (fracture["n"], fracture["refused"]) == (0, "no film has a label for it")
    assert setup["doc"]["min_positives"] == 10 and setup["doc"]["model"] == DENSE


def test_min_positives_lowered_fits_atelectasis(setup, shared):
    doc = calibrate_xrv(setup["index"], setup["folder"] / "five.json", model=DENSE, weights=setup["weights"],
                        min_positives=5)
    y = truth(shared, setup["paths"], "Atelectasis")
    p = setup["probs"][:, DEFAULT_PATHOLOGIES.index("Atelectasis")]
    expected, _ = brute_force_youden(y, p)
    assert doc["pathologies"]["Atelectasis"]["op_thresh"] == pytest.approx(expected, rel=1e-12)


def test_loaded_thresholds_change_calibrated_scores_as_op_norm_says(setup):
    fitted = setup["doc"]["pathologies"]["Effusion"]["op_thresh"]
    net = zoo.get_model(DENSE, weights=setup["weights"], thresholds=str(setup["out"]))
    expected = np.array(WEIGHTS[DENSE].op_threshs, dtype=np.float32)
    expected[EFFUSION] = fitted
    assert np.array_equal(net.op_threshs, expected, equal_nan=True)
    assert net.thresholds_info["recalibrated"] == ["Effusion"]
    paths = setup["paths"][:6]
    recal = classify(paths, model=DENSE, weights=setup["weights"], thresholds=str(setup["out"]), batch_size=6)
    published = classify(paths, model=DENSE, weights=setup["weights"], batch_size=6)
    probs = setup["probs"][:6]
    want = op_norm(probs, expected)
    got = np.array([r["outputs"] for r in recal])
    assert np.allclose(got, want, atol=2e-6)
    before = np.array([r["outputs"] for r in published])
    assert np.allclose(before, op_norm(probs, WEIGHTS[DENSE].op_threshs), atol=2e-6)
    others = [k for k in range(18) if k != EFFUSION]
    assert np.allclose(got[:, others], before[:, others], atol=1e-6)  # only Effusion moves
    assert not np.allclose(got[:, EFFUSION], before[:, EFFUSION], atol=1e-3)
    # at the fitted threshold the calibrated score crosses 0.5
    assert ((got[:, EFFUSION] >= 0.5) == (probs[:, EFFUSION] >= np.float32(fitted))).all()
    assert recal[0]["thresholds"]["recalibrated"] == ["Effusion"]


def _doc(setup, **change):
    doc = json.loads(setup["out"].read_text())
    doc.update(change)
    return doc


@pytest.mark.parametrize("case, expected", [
    ("other model", "fitted for model 'densenet121-res224-all', not densenet121-res224-mimic_nb"),
    ("other weights", "fitted on the outputs of weights with sha1"),
    ("not json", "not a thresholds JSON"),
    ("nan", "not a thresholds JSON"),
    ("out of range", "must be a number between 0 and 1"),
    ("unknown pathology", "unknown pathology 'Effusionx"),
    ("deep", "not a thresholds JSON"),
    ("list", "not a thresholds file"),
    ("huge", "a thresholds file is a few KB"),
    ("string", "must be a number between 0 and 1"),
])
def test_hostile_or_wrong_files_give_one_line(setup, tmp_path, case, expected):
    path = tmp_path / "t.json"
    doc = _doc(setup)
    if case == "other model":
        doc["model"] = "densenet121-res224-all"
    elif case == "other weights":
        doc["weights"]["sha1"] = "0" * 40
    elif case == "out of range":
        doc["pathologies"]["Effusion"]["op_thresh"] = 1.5
    elif case == "unknown pathology":
        doc["pathologies"]["Effusionx\n"] = doc["pathologies"]["Effusion"]
    elif case == "string":
        doc["pathologies"]["Effusion"]["op_thresh"] = "0.3"
    text = json.dumps(doc)
    if case == "not json":
        text = "\x89PNG garbage"
    elif case == "nan":
        text = text.replace('"op_thresh": %r' % doc["pathologies"]["Effusion"]["op_thresh"], '"op_thresh": NaN', 1)
        assert "NaN" in text
    elif case == "deep":
        text = "[" * 100000 + "]" * 100000
    elif case == "list":
        text = "[1, 2]"
    elif case == "huge":
        text = " " * (2 << 20) + text
    path.write_text(text)
    with pytest.raises(WeightsError) as err:
        load_thresholds(path, DENSE, setup["doc"]["weights"]["sha1"])
    message = str(err.value)
    assert expected in message and "\n" not in message and str(path) in message


def test_one_class_and_worse_than_chance_are_refused():
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(40, 18))
    y = (np.arange(40) < 15).astype(float)
    targets = np.stack([np.zeros(40), y, y], axis=1)
    probs[:, 1] = np.where(y == 1, 0.1, 0.9) + rng.uniform(0, 0.01, 40)  # positives score lower
    probs[:, 2] = np.where(y == 1, 0.9, 0.1) + rng.uniform(0, 0.01, 40)
    out = fit_thresholds(targets, probs, ["Atelectasis", "Consolidation", "Infiltration"], min_positives=10)
    assert out["Atelectasis"]["refused"] == "needs positive and negative films (0 of 40 positive)"
    assert out["Consolidation"]["op_thresh"] is None and "no ROC point better than chance" in out["Consolidation"]["refused"]
    assert out["Consolidation"]["auc"] == pytest.approx(0.0)
    assert out["Infiltration"]["refused"] is None and out["Infiltration"]["youden_j"] == pytest.approx(1.0)
    assert out["Infiltration"]["op_thresh"] == pytest.approx(probs[y == 1, 2].min())


def test_saturated_best_point_is_refused_and_a_saturated_ppv_threshold_loads(setup, tmp_path):
    y = np.array([1] * 10 + [0] * 30, dtype=float)
    probs = np.full((40, 18), 0.3)
    probs[:10, 0] = 1.0  # the positives saturate the float32 sigmoid
    probs[10:, 0] = np.linspace(0.1, 0.9, 30)
    out = fit_thresholds(y[:, None], probs, ["Atelectasis"])
    assert out["Atelectasis"]["op_thresh"] is None and "saturated output 1" in out["Atelectasis"]["refused"]
    doc = _doc(setup)
    doc["pathologies"]["Effusion"]["ppv80_thresh"] = 1.0  # what a saturated output gives, and allowed
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    loaded = load_thresholds(path, DENSE, setup["doc"]["weights"]["sha1"])
    assert loaded["ppv80_threshs"][EFFUSION] == 1.0


def test_document_is_strict_json_with_its_provenance(setup):
    from mxvision.models.xrv.thresholds import thresholds_document
    from mxvision.utils import file_digest
    doc = setup["doc"]
    assert doc["index_sha256"] == file_digest(setup["index"], "sha256")
    assert doc["weights"]["sha1"] == file_digest(setup["weights"], "sha1")
    assert doc["images"] == {"scored": 70, "unreadable": 0} and doc["created"].endswith("+00:00")
    odd = thresholds_document(DENSE, {}, setup["index"], {"Edema": {"auc": float("nan"), "ci": [np.float32(0.5),
                                                                                             float("inf")]}},
                              10, 1, 0)
    assert odd["pathologies"]["Edema"] == {"auc": None, "ci": [0.5, None]}
    json.loads(json.dumps(odd, allow_nan=False))


def test_jsrt_labels_column_gives_the_nodule_threshold(shared, setup, tmp_path):
    """An index without pathology columns: its label column (JSRT's nodule/normal) is read as findings."""
    from mxvision.data.jsrt import jsrt_index
    csv_path = tmp_path / "jsrt.csv"
    jsrt_index(shared / "data" / "jsrt", csv_path)
    doc = calibrate_xrv(csv_path, tmp_path / "jsrt.json", model="densenet121-res224-all", weights=setup["weights"])
    assert list(doc["pathologies"]) == ["Nodule"]
    nodule = doc["pathologies"]["Nodule"]
    films = sorted((shared / "data" / "jsrt" / "images").glob("*.png"))
    assert nodule["n"] == len(films) and nodule["positives"] == sum(f.name.startswith("JPCLN") for f in films)
    raw = classify(read_index(csv_path).paths, model="densenet121-res224-all", weights=setup["weights"],
                   calibrated=False, batch_size=16)
    y = np.array([r["path"].rsplit("/", 1)[-1].startswith("JPCLN") for r in raw], dtype=int)
    p = np.array([r["outputs"][DEFAULT_PATHOLOGIES.index("Nodule")] for r in raw])
    expected, j = brute_force_youden(y, p)
    if j > 0:
        assert nodule["op_thresh"] == pytest.approx(expected, rel=1e-12)
    else:  # random weights may rank the films worse than chance: no operating point to give
        assert nodule["op_thresh"] is None and "no ROC point better than chance" in nodule["refused"]
