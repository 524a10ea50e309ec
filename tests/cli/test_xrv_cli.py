"""``mxvision classify`` end to end on the real sample radiographs (weights generated here)."""
import json
import os
import shutil

import numpy as np
import pytest
from support.xrv_files import DENSE, write_release_file

from mxvision import cli
from mxvision.inference import classify
from mxvision.models.xrv import common as xrv_common
from mxvision.models.xrv import weights as xrv_weights
from mxvision.models.xrv.common import DEFAULT_PATHOLOGIES, WEIGHTS


@pytest.fixture(scope="module")
def weights_pt(tmp_path_factory):
    return str(write_release_file(DENSE, tmp_path_factory.mktemp("w") / "mimic_nb.pt")[0])


@pytest.fixture
def samples(shared):
    return [str(shared / "data" / "samples" / n) for n in ("16747_3_1.jpg", "00000001_000.png")]


def test_table_marks_untrained_outputs(samples, weights_pt, capsys):
    assert cli.main(["classify", *samples, "--model", DENSE, "--weights", weights_pt, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "calibrated (op_threshs)" in out and weights_pt in out
    rows = {line[:28].strip(): line[28:].split() for line in out.splitlines()[2:]
            if line[:28].strip() in DEFAULT_PATHOLOGIES}
    assert list(rows) == list(DEFAULT_PATHOLOGIES)
    assert rows["Infiltration"] == ["(untrained)", "(untrained)"]  # mimic_nb has no Infiltration output
    values = [float(v) for v in rows["Atelectasis"]]
    assert all(0 <= v <= 1 for v in values)
    assert "(untrained): these weights were not trained" in out


def test_json_matches_the_api_and_calibration_switch(samples, weights_pt, capsys):
    assert cli.main(["classify", samples[0], "--model", DENSE, "--weights", weights_pt, "--json", "--quiet"]) == 0
    calibrated = json.loads(capsys.readouterr().out)[0]
    assert calibrated["calibrated"] is True and len(calibrated["outputs"]) == 18
    assert calibrated["scores"]["Infiltration"] is None and calibrated["unavailable"]["Infiltration"] == "untrained"
    api = classify([samples[0]], model=DENSE, weights=weights_pt)[0]
    assert np.allclose(api["outputs"], calibrated["outputs"], atol=1e-7)

    assert cli.main(["classify", samples[0], "--model", DENSE, "--weights", weights_pt, "--json",
                     "--no-calibration", "--quiet"]) == 0
    raw = json.loads(capsys.readouterr().out)[0]
    assert raw["calibrated"] is False
    probs = np.array(raw["outputs"])
    thresholds = np.array(WEIGHTS[DENSE].op_threshs, dtype=np.float32)
    assert np.allclose(xrv_common.op_norm(probs[None], thresholds)[0], calibrated["outputs"], atol=1e-5)
    assert raw["scores"]["Infiltration"] is None and raw["scores"]["Atelectasis"] == pytest.approx(probs[0])


def test_unreadable_image_is_listed_and_strict_fails(samples, weights_pt, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    assert cli.main(["classify", samples[0], str(bad), "--model", DENSE, "--weights", weights_pt, "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "ERROR\t" in out and "broken.png" in out and "Atelectasis" in out
    assert cli.main(["classify", str(bad), "--model", DENSE, "--weights", weights_pt, "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mxvision: error: ") and "broken.png" in err and "\n" not in err


def test_weights_that_do_not_fit_give_one_line(samples, tmp_path, capsys):
    pt = write_release_file("resnet50-res512-all", tmp_path / "resnet.pt")[0]
    assert cli.main(["classify", samples[0], "--model", DENSE, "--weights", str(pt)]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit densenet121" in err and "\n" not in err


def test_unknown_model_is_an_argument_error(samples, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["classify", samples[0], "--model", "densenet121-res224-bogus"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_published_weights_are_downloaded_once(samples, weights_pt, http_server, monkeypatch, tmp_path, capsys):
    spec = WEIGHTS[DENSE]
    shutil.copy(weights_pt, os.path.join(http_server.directory, spec.file))
    monkeypatch.setenv(xrv_common.BASE_URL_ENV, http_server.url)
    cache = tmp_path / "cache"
    for _ in range(2):
        assert cli.main(["classify", samples[1], "--model", DENSE, "--cache", str(cache), "--json", "--quiet"]) == 0
        result = json.loads(capsys.readouterr().out)[0]
        assert "torchxrayvision %s weights" % DENSE in result["weights"]
    assert http_server.count("/" + spec.file) == 1
    local = classify([samples[1]], model=DENSE, weights=weights_pt)[0]["outputs"]
    assert np.allclose(result["outputs"], local, atol=1e-6)


def test_unreachable_release_says_how_to_fix(samples, monkeypatch, tmp_path, capsys):
    from support.httpserver import closed_port_url
    monkeypatch.setenv(xrv_common.BASE_URL_ENV, closed_port_url())
    monkeypatch.setenv("MXVISION_CACHE", str(tmp_path))
    monkeypatch.setattr(xrv_weights, "fetch_weights", _fetch_no_retry)  # no 15 s of retries
    assert cli.main(["classify", samples[0], "--model", DENSE, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "could not download" in err and "MXVISION_XRV_BASE_URL" in err and "--weights" in err


_real_fetch = xrv_weights.fetch_weights


def _fetch_no_retry(name, **kwargs):
    kwargs.update(retries=0, timeout=5)
    return _real_fetch(name, **kwargs)


def test_models_command_lists_the_xrv_names(capsys):
    assert cli.main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert all(name in names for name in WEIGHTS)
