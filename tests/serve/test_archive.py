"""Model archives and the handler's scoring, without the server: what MMS will load and run."""
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mxvision.errors import BadImage, MxvisionError
from mxvision.inference import classify, predict
from mxvision.serve.archive import MANIFEST, PARAMS, SYMBOL, export_archive, read_manifest, sha256_file
from mxvision.serve.cam import find_cam_layer
from mxvision.serve.handler import ArchiveModel, request_image, request_options
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
        assert got["dtype"] == xvision_mar["manifest"]["precision"] == "float32" and "int8" not in got
        assert "precision_note" not in got


def test_the_handler_scores_an_upload_exactly_as_classify_scores_the_file(xrv_mar, shared, tmp_path):
    model = ArchiveModel(_unpack(xrv_mar["archive"], tmp_path / "x"))
    paths = sorted(p for p in (shared / "data" / "samples").iterdir() if p.is_file())
    served = model.score([model.prepare(p.read_bytes(), p.name) for p in paths])
    # in one batch, as the handler scores them: oneDNN's float32 kernels for batch 1 and batch N
    # differ in the last digits on some CPUs (1.6e-5 on an AVX-512 AMD EPYC)
    offline = classify(paths, model=XRV_MODEL, weights="none", batch_size=len(paths))
    assert len(served) == len(offline) == len(paths) >= 5
    for got, want in zip(served, offline):
        assert got["dtype"] == want["dtype"] == "float32" and "int8" not in got
        assert got["scores"].keys() == want["scores"].keys()
        for name, value in want["scores"].items():
            if value is None:
                assert got["scores"][name] is None
            else:
                assert abs(got["scores"][name] - value) <= 1e-5, name


def _explain_gradcam(explainer, model, paths, target):
    import mxnet as mx
    from mxvision.audit.explain import grad_cam

    x = mx.nd.array(np.stack([model.prepare(p.read_bytes(), p.name) for p in paths]))
    heat, logits, chosen = grad_cam(explainer.features, explainer.head, x, target)
    return heat, logits, chosen


def test_the_served_gradcam_is_explains_gradcam_of_the_same_network(xvision_mar, xrv_mar, small_run, shared, tmp_path):
    """One code path: Grad-CAM on the archive's graph (split by mxvision.serve.cam) equals
    mxvision.audit.explain's on the Gluon network it was exported from."""
    from mxvision.audit.explain import explainer_from_run, explainer_from_xrv
    from mxvision.io.images import read_image

    paths = sorted(p for p in (shared / "data" / "samples").iterdir() if p.suffix in (".png", ".jpg"))[:3]
    cases = [(xvision_mar, explainer_from_run(small_run), None),
             (xrv_mar, explainer_from_xrv(XRV_MODEL, weights="none"), "Mass")]
    for mar, explainer, target in cases:
        model = ArchiveModel(_unpack(mar["archive"], tmp_path / mar["name"]))
        k = model.cam_target(target)
        assert k == (explainer.default_target if target is None else explainer.target_index(target))
        served = model.gradcam([model.prepare(p.read_bytes(), p.name) for p in paths],
                               [read_image(p) for p in paths], k)
        heat, logits, chosen = _explain_gradcam(explainer, model, paths, k)
        assert heat.max() > 0  # a map with something in it, not two empty ones agreeing
        for got, h, v, c in zip(served, heat, logits, chosen):
            assert got["target"] == model.labels[c]
            assert abs(got["logit"] - v) <= 1e-4 * max(1.0, abs(v))
            np.testing.assert_allclose(np.array(got["grid"]), h, atol=1e-4)
            assert got["overlay"].startswith("data:image/png;base64,")


def test_the_gradcam_layer_is_the_feature_map_explain_splits_at(xvision_mar, xrv_mar):
    assert xvision_mar["manifest"]["cam_layer"].endswith("relu1")  # the backbone's cut, stage*_unit*_relu1
    assert xrv_mar["manifest"]["cam_layer"].endswith("_relu0")  # after the DenseNet's final BatchNorm
    graph = {"nodes": [{"op": "null", "name": "data", "inputs": []},
                       {"op": "FullyConnected", "name": "fc", "inputs": [[0, 0, 0]]}], "heads": [[1, 0, 0]]}
    with pytest.raises(MxvisionError, match="Grad-CAM cannot split"):
        find_cam_layer(graph)


def test_gradcam_options_are_read_from_form_fields_and_refused_when_unclear(xrv_mar, tmp_path):
    assert request_options({"body": b"x"}) == (False, None)
    assert request_options({"data": b"x", "gradcam": b"1", "target": b"Mass"}) == (True, "Mass")
    assert request_options({"data": b"x", "gradcam": "true"}) == (True, None)
    with pytest.raises(MxvisionError, match="gradcam=maybe"):
        request_options({"gradcam": b"maybe"})
    # an option field is never taken for the image
    with pytest.raises(BadImage, match="empty"):
        request_image({"gradcam": b"1", "target": b"Mass"})
    model = ArchiveModel(_unpack(xrv_mar["archive"], tmp_path / "x"))
    assert model.cam_target(None) == model.labels.index("Nodule")
    with pytest.raises(MxvisionError, match="target=Bogus.*choose one of Atelectasis"):
        model.cam_target("Bogus")


def test_the_handler_answers_through_mms_context_without_response_headers(xvision_mar, shared, tmp_path):
    """MMS 1.1.11 drops the worker when a reply with response headers arrives in pieces
    (CodecUtils.readMap): the handler must set none -- checked with MMS's own Context."""
    from mms.context import Context, RequestProcessor

    from mxvision.serve.handler import BATCH_FIELD, Service

    folder = _unpack(xvision_mar["archive"], tmp_path / "x")
    context = Context("xv", str(folder), {}, 4, None, "1.1.11")
    film = (shared / "data" / "samples" / "00000001_000.png").read_bytes()
    data = [{"body": bytearray(film)}, {"body": bytearray(b"not an image")}, {"data": bytearray(film)}]
    context.request_processor = [RequestProcessor({}) for _ in data]
    answers = Service(context).handle(data, context)
    assert [json.loads(a).get(BATCH_FIELD) for a in answers] == [2, None, 2]
    assert [context.get_response_status(i)[0] for i in range(3)] == [200, 400, 200]
    assert all(context.get_response_headers(i) == {} for i in range(3))


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


@pytest.fixture(scope="module")
def platt_mar(small_store, tmp_path_factory):
    from mxvision.train.loop import train_head

    run = tmp_path_factory.mktemp("platt-run")
    # lr 0.001: at the default 0.01 this random-feature head saturates to probabilities of 0 and 1
    train_head(small_store, run, epochs=3, batch_size=8, lr=0.001, ctx="cpu", progress=False, calibrate="platt")
    return run, export_archive(tmp_path_factory.mktemp("mar") / "cal.mar", run=run)


def test_a_calibrated_run_is_served_with_its_calibrator_exactly_as_predict_applies_it(platt_mar, synth_index, tmp_path):
    import mxnet as mx

    run, mar = platt_mar
    saved = json.loads((run / "calibration.json").read_text())
    assert read_manifest(mar["archive"])["calibration"] == saved and saved["kind"] == "platt"
    assert "calibrated (platt)" in mar["manifest"]["output"]
    model = ArchiveModel(_unpack(mar["archive"], tmp_path / "x"))
    paths = sorted(Path(synth_index).parent.rglob("*.png"))[:6]
    inputs = [model.prepare(p.read_bytes(), p.name) for p in paths]
    served = model.score(inputs)
    offline = predict(run, paths)
    for got, want in zip(served, offline):
        np.testing.assert_allclose(list(got["probabilities"].values()), list(want["probabilities"].values()),
                                   atol=1e-5)
        assert got["predicted"] == want["predicted"]
        assert got["calibration"] == want["calibration"] == "calibrated (platt)"
    raw = model.net(mx.nd.array(np.stack(inputs))).asnumpy()[:, 1]
    served_positive = np.array([r["probabilities"]["nodule"] for r in served])
    assert np.abs(served_positive - raw).max() > 1e-3  # the served scores are not the bare softmax


def test_an_archive_whose_calibrator_was_edited_is_refused_when_loaded(platt_mar, tmp_path):
    from mxvision.errors import BadRun

    folder = _unpack(platt_mar[1]["archive"], tmp_path / "x")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["calibration"]["kind"] = "beta"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BadRun, match="calibration: kind 'beta' is not one of platt, isotonic"):
        ArchiveModel(folder)


def test_an_uncalibrated_archive_says_so(xvision_mar, small_store, tmp_path):
    assert xvision_mar["manifest"]["calibration"] is None
    model = ArchiveModel(_unpack(xvision_mar["archive"], tmp_path / "x"))
    path = Path(small_store.items[0]["path"])
    assert model.score([model.prepare(path.read_bytes(), path.name)])[0]["calibration"] == "uncalibrated"


# --------------------------------------------------------------------------- INT8 archives of a port
@pytest.fixture(scope="module")
def int8_films(shared, tmp_path_factory):
    from support.xrv_int8 import int8_setup
    return int8_setup(shared, tmp_path_factory.mktemp("int8"))


def test_an_int8_archive_serves_classifys_checked_int8_scores(int8_films, tmp_path):
    from support.xrv_files import DENSE
    setup = int8_films
    done = export_archive(tmp_path / "q.mar", model=DENSE, weights=setup["weights"], dtype="int8",
                          calibration=str(setup["calibration"]), int8_tolerance=1.0)
    manifest = done["manifest"]
    assert manifest["precision"] == "int8" and manifest["int8"]["films"] == 4 and manifest["cam_layer"] is None
    model = ArchiveModel(_unpack(done["archive"], tmp_path / "q"))
    served = model.score([model.prepare(Path(p).read_bytes(), Path(p).name) for p in setup["samples"]])
    offline = classify(setup["samples"], model=DENSE, weights=setup["weights"], dtype="int8",
                       calibration=str(setup["calibration"]), int8_tolerance=1.0)
    fp32 = classify(setup["samples"], model=DENSE, weights=setup["weights"])
    for got, want, full in zip(served, offline, fp32):
        assert got["dtype"] == want["dtype"] == "int8" and got["int8"] == manifest["int8"]
        assert got["int8"]["max_score_difference"] == want["int8"]["max_score_difference"]
        assert got["precision_note"] == "INT8 scores, within %.3f of float32 on 4 held-out calibration films" % (
            manifest["int8"]["max_score_difference"])
        names = [n for n, v in want["scores"].items() if v is not None]
        assert [n for n, v in got["scores"].items() if v is None] == [n for n, v in want["scores"].items() if v is None]
        np.testing.assert_allclose([got["scores"][n] for n in names], [want["scores"][n] for n in names], atol=1e-5)
        assert not np.allclose([got["scores"][n] for n in names], [full["scores"][n] for n in names], atol=1e-6)
    with pytest.raises(MxvisionError, match="INT8, which has no gradient"):  # the handler keeps the scores
        model.gradcam([model.prepare(Path(setup["samples"][0]).read_bytes())], [None], model.cam_target("Nodule"))


def test_an_int8_archive_beyond_the_tolerance_is_refused_and_not_written(int8_films, tmp_path):
    from support.xrv_files import DENSE
    setup = int8_films
    code, _, err = run_cli("export", "--model", DENSE, "--weights", setup["weights"], "--mar", tmp_path / "q.mar",
                           "--dtype", "int8", "--calibration", setup["calibration"], "--int8-tolerance", "0.000001")
    one_line_error(code, err, "--dtype int8", "differ from float32 by up to", "score in float32")
    assert not (tmp_path / "q.mar").exists()
    code, _, err = run_cli("export", "--model", DENSE, "--weights", setup["weights"], "--mar", tmp_path / "q.mar",
                           "--calibration", setup["calibration"])
    one_line_error(code, err, "--calibration is for --model NAME --mar OUT.mar --dtype int8")
    with pytest.raises(MxvisionError, match="served in float32 or int8"):
        export_archive(tmp_path / "b.mar", model=DENSE, weights=setup["weights"], dtype="bfloat16")
    assert not (tmp_path / "b.mar").exists()
