"""Predicted views in the data layer: unknown views filled by a predictor passed in, recorded as
predicted, known views untouched, and the ``views`` selection judging the predictions.

The predictor here is a stand-in (a dict lookup): the data layer must not know it is a model.
The real view model on real films is in ``tests/models/test_xrv_view_predictor.py`` and
``tests/cli/test_cli_view_model.py``.
"""
import numpy as np
import pytest

from mxvision.data.dataset import XrayDataset, csv_dataset
from mxvision.data.index import write_index
from mxvision.data.views import FRONTAL_UNSPECIFIED, parse_views, view_group, view_mask
from mxvision.errors import MxvisionError


class LookupPredictor:
    """Answers from a table, remembering which paths it was asked about."""

    source = "model:lookup"

    def __init__(self, answers):
        self.answers = answers
        self.asked = []

    def __call__(self, paths):
        self.asked.extend(paths)
        return [self.answers[p] for p in paths]


def _dataset(tmp_path):
    rows = [{"path": str(tmp_path / n), "view": v, "patient_id": "p%d" % i, "label": "class%d" % (i % 2)}
            for i, (n, v) in enumerate([("pa.png", "PA"), ("lat.png", "LL"), ("u1.png", ""),
                                        ("u2.png", ""), ("u3.png", ""), ("ap.png", "AP")])]
    labels = np.array([[1], [0], [1], [0], [1], [0]], dtype=np.float32)
    return XrayDataset(rows, ["Nodule"], labels, name="t", root=str(tmp_path))


def _answers(tmp_path):
    return {str(tmp_path / "u1.png"): "FRONTAL", str(tmp_path / "u2.png"): "LATERAL",
            str(tmp_path / "u3.png"): ""}  # u3: unreadable, the predictor cannot tell


def test_the_vocabulary_admits_a_predicted_frontal_view():
    assert "FRONTAL" in parse_views("frontal") and "FRONTAL" not in parse_views("PA,AP")
    assert parse_views("FRONTAL") == parse_views("frontal") == {"PA", "AP", FRONTAL_UNSPECIFIED}
    assert view_group("Frontal") == "frontal" and view_group("LATERAL") == "lateral"
    assert view_mask(["FRONTAL", "PA", "LATERAL", ""], "PA") == [False, True, False, False]
    assert view_mask(["FRONTAL", "PA", "LATERAL", ""], "lateral,unknown") == [False, False, True, True]


def test_unknown_views_are_filled_and_recorded_known_ones_untouched(tmp_path):
    ds = _dataset(tmp_path)
    predictor = LookupPredictor(_answers(tmp_path))
    filled = ds.with_predicted_views(predictor)
    assert predictor.asked == [str(tmp_path / n) for n in ("u1.png", "u2.png", "u3.png")]  # only the unknown
    assert filled.views == ["PA", "LATERAL", "FRONTAL", "LATERAL", "", "AP"]
    assert filled.column("view_source") == ["", "", "model:lookup", "model:lookup", "", ""]
    assert ds.views == ["PA", "LATERAL", "", "", "", "AP"]  # a new dataset; the old one is unchanged


def test_the_selection_judges_predicted_views(tmp_path):
    predictor = LookupPredictor(_answers(tmp_path))
    index = _dataset(tmp_path).to_index(task="pathologies", views="frontal", view_predictor=predictor)
    by_name = {p.rsplit("/", 1)[1]: r for p, r in zip(index.paths, index.records())}
    assert sorted(by_name) == ["ap.png", "pa.png", "u1.png"]  # lateral and still-unknown films dropped
    assert by_name["u1.png"]["view"] == "FRONTAL" and by_name["u1.png"]["view_source"] == "model:lookup"
    assert by_name["pa.png"]["view_source"] == ""
    assert index.columns[:6] == ("path", "label", "patient_id", "split", "view", "view_source")
    # without a predictor nothing is predicted and no view_source column appears
    plain = _dataset(tmp_path).to_index(task="pathologies", views="frontal")
    assert len(plain) == 2 and "view_source" not in plain.columns


def test_folder_labels_index_predicts_too(tmp_path):
    predictor = LookupPredictor(_answers(tmp_path))
    index = _dataset(tmp_path).folder_labels_index(views="lateral", view_predictor=predictor)
    assert sorted(p.rsplit("/", 1)[1] for p in index.paths) == ["lat.png", "u2.png"]
    assert index.column("view_source") == ["" if p.endswith("lat.png") else "model:lookup" for p in index.paths]


def test_a_view_typo_fails_before_any_prediction(tmp_path):
    predictor = LookupPredictor(_answers(tmp_path))
    with pytest.raises(MxvisionError, match="'PAA'"):
        _dataset(tmp_path).to_index(views="PAA", view_predictor=predictor)
    assert predictor.asked == []


def test_a_predicted_index_keeps_its_record_when_merged_again(tmp_path):
    """An index written with predicted views, read back: the views are known now, their source
    stays, and nothing is predicted again."""
    predictor = LookupPredictor(_answers(tmp_path))
    first = _dataset(tmp_path).to_index(task="pathologies", views="all", view_predictor=predictor)
    write_index(first, tmp_path / "first.csv")
    again = LookupPredictor(_answers(tmp_path))
    index = csv_dataset(tmp_path / "first.csv").to_index(task="pathologies", views="all", view_predictor=again)
    assert again.asked == [str(tmp_path / "u3.png")]  # only the film still without a view
    sources = dict(zip(index.paths, index.column("view_source")))
    assert sources[str(tmp_path / "u1.png")] == "model:lookup" and sources[str(tmp_path / "pa.png")] == ""
