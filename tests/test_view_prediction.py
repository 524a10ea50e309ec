"""The view predictor on real films: torchxrayvision's view model, frontal or lateral per film.

Random weights (no trained ones exist here), shifted so the films do not all get the same answer
(``support.view_model``): what is checked is the plumbing -- model card preprocessing, target
order to view spelling, batching, unreadable files, bad weights -- not the model's accuracy.
"""
import os

import mxnet as mx
import numpy as np
import pytest
from support.view_model import split_view_weights

from mxvision.data.xrv_transforms import load_xray, preprocess
from mxvision.errors import WeightsError
from mxvision.models import zoo
from mxvision.view_prediction import VIEW_MODEL, ViewPredictor

FILMS = ["00000001_000.png", "00027426_000.png", "16747_3_1.jpg", "Fake_MONOHR1.dcm"]


@pytest.fixture(scope="module")
def films(shared):
    return [os.path.join(shared, "data", "samples", n) for n in FILMS]


@pytest.fixture(scope="module")
def weights(films, tmp_path_factory):
    return split_view_weights(films, tmp_path_factory.mktemp("view") / "view.params")


def test_each_film_gets_the_models_answer(films, weights):
    path, frontal = weights
    predictor = ViewPredictor(weights=path, batch_size=3)  # two batches: 3 + 1
    views = predictor(films)
    net = zoo.get_model(VIEW_MODEL, weights=path)
    logits = net(mx.nd.array(np.stack([preprocess(load_xray(f), 224) for f in films]))).asnumpy()
    assert views == [("FRONTAL", "LATERAL")[k] for k in logits.argmax(1)]  # target 0 Frontal, 1 Lateral
    assert views[films.index(frontal)] == "FRONTAL" and views.count("LATERAL") == len(films) - 1
    assert predictor.counts == {"FRONTAL": 1, "LATERAL": len(films) - 1} and predictor.unreadable == []
    assert predictor.source == "model:xinario-view-resnet50" and path in predictor.weights


def test_an_unreadable_film_stays_unknown(films, weights, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    predictor = ViewPredictor(weights=weights[0])
    views = predictor([films[0], str(broken), films[1]])
    assert views[1] == "" and views[0] and views[2] and predictor.unreadable == [str(broken)]


def test_bad_weights_are_refused_before_any_film(tmp_path, films):
    with pytest.raises(WeightsError, match="no such weights file"):
        ViewPredictor(weights=str(tmp_path / "missing.pt"))
    wrong = zoo.get_model("mira-sex-resnet34", weights="none")
    wrong.save_parameters(str(tmp_path / "sex.params"))
    with pytest.raises(WeightsError, match="does not fit xinario_resnet50") as err:
        ViewPredictor(weights=str(tmp_path / "sex.params"))
    assert "\n" not in str(err.value)
