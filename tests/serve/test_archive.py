"""Model archives and the handler's scoring, without the server: what MMS will load and run."""
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mxvision.errors import BadImage, MxvisionError
from mxvision.inference import classify, predict
from mxvision.serve.archive import MANIFEST, PARAMS, SYMBOL, export_archive, read_manifest, sha256_file
from mxvision.serve.handler import ArchiveModel, request_image
from support.cli import one_line_error, run_cli

XRV_MODEL = "densenet121-res224-all"


@pytest.fixture(scope="module")
def xvision_mar(small_run, tmp_path_factory):
    return export_archive(tmp_path_factory.mktemp("mar") / "xv.mar", run=small_run)


@pytest.fixture(scope="module")
def xrv_mar(tmp_path_factory):
    return export_archive(tmp_path_factory.mktemp("mar") / "dn.mar", model=XRV_MODEL, weights="none")


def _unpack(archive, folder):
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(folder)
    return folder


def test_an_archive_holds_the_network_its_manifest_and_the_handler_mms_runs(xvision_mar, small_run, tmp_path):
    with zipfile.ZipFile(xvision_mar["archive"]) as mar:
        assert sorted(mar.namelist()) == sorted([SYMBOL, PARAMS, MANIFEST, "mxvision_handler.py",
                                                 "MAR-INF/MANIFEST.json"])
        mms = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        handler = mar.read("mxvision_handler.py").decode()
    # "python": MMS runs the workers on the server's own interpreter ("python3" ran the first
    # python3 on PATH, which had no MMS, and every worker died)
    assert mms["runtime"] == "python" and mms["model"] == {"modelName": "xv", "handler": "mxvision_handler:handle"}
    assert "from mxvision.serve.handler import handle" in handler
    manifest = read_manifest(xvision_mar["archive"])
    run_config = json.loads((small_run / "config.json").read_text())
    assert manifest["family"] == "xvision" and manifest["classes"] == run_config["features"]["classes"]
    assert manifest["random_weights"] is True and "RANDOM" in manifest["weights"]["backbone"]
    folder = _unpack(xvision_mar["archive"], tmp_path / "x")
    assert manifest["files"] == {SYMBOL: sha256_file(folder / SYMBOL), PARAMS: sha256_file(folder / PARAMS)}


def test_an_xrv_archive_names_its_pathologies_and_the_outputs_it_cannot_give(xrv_mar):
    manifest = xrv_mar["manifest"]
    assert manifest["family"] == "xrv" and len(manifest["pathologies"]) == 18
    assert manifest["preprocessing"] == {"name": "xrv224", "resolution": 224}
    assert set(manifest["unavailable"]) <= set(manifest["pathologies"])
    assert all(manifest["unavailable"].values())
    assert len(manifest["op_threshs"]) == 18


def test_a_replaced_params_file_is_refused_when_the_server_loads_it(xvision_mar, tmp_path):
    folder = _unpack(xvision_mar["archive"], tmp_path / "x")
    data = bytearray((folder / PARAMS).read_bytes())
    data[-1] ^= 1
    (folder / PARAMS).write_bytes(bytes(data))
    with pytest.raises(MxvisionError, match="SHA-256"):
        ArchiveModel(folder)


def test_the_handler_scores_an_upload_exactly_as_predict_scores_the_file(xvision_mar, small_run, synth_index, tmp_path):
    model = ArchiveModel(_unpack(xvision_mar["archive"], tmp_path / "x"))
    paths = sorted(Path(synth_index).parent.rglob("*.png"))[:6]
    assert len(paths) == 6
    served = model.score([model.prepare(p.read_bytes(), p.name) for p in paths])
    offline = predict(small_run, paths)
    for got, want in zip(served, offline):
        np.testing.assert_allclose(list(got["probabilities"].values()), list(want["probabilities"].values()),
                                   atol=1e-5)
        assert got["predicted"] == want["predicted"]


def test_the_handler_scores_an_upload_exactly_as_classify_scores_the_file(xrv_mar, shared, tmp_path):
    model = ArchiveModel(_unpack(xrv_mar["archive"], tmp_path / "x"))
    paths = sorted(p for p in (shared / "data" / "samples").iterdir() if p.is_file())
    served = model.score([model.prepare(p.read_bytes(), p.name) for p in paths])
    offline = classify(paths, model=XRV_MODEL, weights="none")
    assert len(served) == len(offline) == len(paths) >= 5
    for got, want in zip(served, offline):
        assert got["scores"].keys() == want["scores"].keys()
        for name, value in want["scores"].items():
            if value is None:
                assert got["scores"][name] is None
            else:
                assert abs(got["scores"][name] - value) <= 1e-5, name


def test_a_request_without_an_image_is_a_bad_image():
    assert request_image({"body": bytearray(b"abc")}) == ("<upload>", b"abc")
    assert request_image({"film.dcm": bytearray(b"xyz")}) == ("film.dcm", b"xyz")
    with pytest.raises(BadImage, match="empty"):
        request_image({})


def test_export_refuses_what_it_cannot_archive(small_run, tmp_path):
    code, _, err = run_cli("export", "--model", XRV_MODEL, "--out", tmp_path / "p")
    one_line_error(code, err, "--model exports a model archive only")
    code, _, err = run_cli("export", "--run", small_run, "--model", XRV_MODEL, "--mar", tmp_path / "a.mar")
    one_line_error(code, err, "--run RUN", "--model NAME")
    code, _, err = run_cli("export", "--run", small_run, "--mar", tmp_path / "a.zip")
    one_line_error(code, err, "a.zip", "ends in .mar")
    code, _, err = run_cli("export", "--run", small_run, "--mar", tmp_path / "a.mar", "--dtype", "int8")
    one_line_error(code, err, "extracted in float32", "int8 backbone would not match")
    assert not (tmp_path / "a.mar").exists()
