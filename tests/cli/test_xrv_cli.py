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
    assert cli.main(["models", "--names"]) == 0
    names = capsys.readouterr().out.split()
    assert all(name in names for name in WEIGHTS)


def test_models_command_states_each_xrv_licence(capsys):
    from mxvision.models import zoo
    assert cli.main(["models"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    for name in zoo.list_models(family="xrv") + zoo.list_models(family="xrv-other"):
        assert zoo.get_model_config(name).licence in rows[name], name
    assert cli.main(["models", "--family", "xrv-other", "--names"]) == 0
    assert "riken-age" in capsys.readouterr().out.split()
    assert cli.main(["models", "--family", "nope"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--family nope: unknown" in err[0]


# --------------------------------------------------------------------------- whole indexes, recalibration
@pytest.fixture(scope="module")
def labelled(shared, tmp_path_factory):
    """Soft random weights, and an index of 12 NIH films with an effusion and 20 normal ones."""
    from support.xrv_labelled import nih_pathology_index, soft_weights
    folder = tmp_path_factory.mktemp("labelled")
    index = nih_pathology_index(shared, folder / "nih.csv", [("Effusion", 12), ("No Finding", 20)])
    return {"folder": folder, "weights": soft_weights(folder), "index": index}


def _with_broken_row(index_csv, folder):
    """The index plus one row naming an unreadable PNG (its other cells copied from row 1)."""
    import csv as csv_module
    with open(index_csv, newline="") as f:
        rows = list(csv_module.reader(f))
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    extra = list(rows[1])
    extra[rows[0].index("path")] = str(broken)
    extra[rows[0].index("patient_id")] = "broken-patient"
    out = folder / "with_broken.csv"
    with open(out, "w", newline="") as f:
        csv_module.writer(f).writerows(rows + [extra])
    return out, len(rows) - 1 + 1


def test_classify_index_writes_one_row_per_film(labelled, tmp_path, capsys):
    import csv as csv_module
    from mxvision.data.index import read_index
    index_csv, n = _with_broken_row(labelled["index"], tmp_path)
    out = tmp_path / "scores" / "scores.csv"
    assert cli.main(["classify", "--index", str(index_csv), "--out", str(out), "--model", DENSE,
                     "--weights", labelled["weights"], "--batch-size", "8", "--quiet"]) == 1  # one unreadable
    said = capsys.readouterr().out
    assert "%d films scored" % n in said and "1 unreadable" in said and str(out) in said
    assert os.listdir(out.parent) == ["scores.csv"]  # written atomically: no temporary file left
    with open(out, newline="") as f:
        rows = list(csv_module.DictReader(f))
    index = read_index(index_csv)
    assert len(rows) == n == len(index)
    assert [r["path"] for r in rows] == index.paths and [r["id"] for r in rows] == index.ids
    assert [r["patient_id"] for r in rows] == index.column("patient_id")
    assert [r["label:Effusion"] for r in rows] == index.column("Effusion")
    broken = rows[-1]
    assert "broken.png" in broken["error"] and broken["Effusion"] == "" and broken["patient_id"] == "broken-patient"
    api = classify(index.paths[:-1], model=DENSE, weights=labelled["weights"], batch_size=8)
    for row, result in zip(rows[:-1], api):
        assert row["error"] == ""
        for name in DEFAULT_PATHOLOGIES:
            value = result["scores"][name]
            assert (row[name] == "") if value is None else float(row[name]) == pytest.approx(value, abs=1e-7)
    assert all(r["Infiltration"] == "" for r in rows)  # untrained by mimic_nb: no score, not a number


def test_classify_files_to_csv_and_exactly_one_input(samples, labelled, tmp_path, capsys):
    import csv as csv_module
    out = tmp_path / "s.csv"
    assert cli.main(["classify", *samples, "--out", str(out), "--model", DENSE, "--weights",
                     labelled["weights"], "--no-calibration", "--quiet"]) == 0
    capsys.readouterr()
    with open(out, newline="") as f:
        rows = list(csv_module.DictReader(f))
    assert [r["path"] for r in rows] == samples and "id" not in rows[0]
    raw = classify(samples, model=DENSE, weights=labelled["weights"], calibrated=False)
    assert float(rows[1]["Effusion"]) == pytest.approx(raw[1]["scores"]["Effusion"], abs=1e-7)
    for argv in (["classify", "--model", DENSE], ["classify", samples[0], "--index", str(labelled["index"])]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == "mxvision: error: mxvision classify: give IMAGE files or folders, or --index CSV (one of the two)"


def test_xrv_calibrate_then_classify_with_the_thresholds(labelled, tmp_path, capsys):
    out = tmp_path / "thresholds.json"
    assert cli.main(["xrv", "calibrate", "--model", DENSE, "--weights", labelled["weights"], "--index",
                     str(labelled["index"]), "--out", str(out), "--quiet"]) == 0
    said = capsys.readouterr().out
    doc = json.loads(out.read_text())
    effusion = doc["pathologies"]["Effusion"]
    assert effusion["positives"] == 12 and effusion["op_thresh"] is not None and doc["min_positives"] == 10
    line = next(x for x in said.splitlines() if x.startswith("Effusion"))
    assert "%.3f" % effusion["auc"] in line and "%.4g" % effusion["op_thresh"] in line
    assert "refused: these weights have no trained output" in next(
        x for x in said.splitlines() if x.startswith("Infiltration"))
    sample = str(labelled["index"].parent / "one.png")
    shutil.copy(read_index_first(labelled["index"]), sample)
    assert cli.main(["classify", sample, "--model", DENSE, "--weights", labelled["weights"], "--thresholds",
                     str(out), "--json", "--quiet"]) == 0
    recal = json.loads(capsys.readouterr().out)[0]
    raw = classify([sample], model=DENSE, weights=labelled["weights"], calibrated=False)[0]["outputs"]
    thresholds = np.array(WEIGHTS[DENSE].op_threshs, dtype=np.float32)
    thresholds[DEFAULT_PATHOLOGIES.index("Effusion")] = effusion["op_thresh"]
    assert np.allclose(recal["outputs"], xrv_common.op_norm(np.array(raw)[None], thresholds)[0], atol=2e-6)
    assert recal["thresholds"]["recalibrated"] == ["Effusion"]
    # the same file for other weights, or with min-positives beyond any pathology: one line
    assert cli.main(["classify", sample, "--model", DENSE, "--weights", weights_pt_path(tmp_path),
                     "--thresholds", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "fitted on the outputs of weights with sha1" in err and "\n" not in err
    assert cli.main(["xrv", "calibrate", "--model", DENSE, "--weights", labelled["weights"], "--index",
                     str(labelled["index"]), "--out", str(tmp_path / "none.json"), "--min-positives", "13",
                     "--quiet"]) == 0
    assert "0 thresholds fitted (min 13 positives)" in capsys.readouterr().out
    assert cli.main(["classify", sample, "--model", DENSE, "--weights", labelled["weights"], "--thresholds",
                     str(tmp_path / "none.json"), "--quiet"]) == 2
    assert "holds no op_thresh" in capsys.readouterr().err


def read_index_first(index_csv):
    from mxvision.data.index import read_index
    return read_index(index_csv).paths[0]


def weights_pt_path(folder):
    return str(write_release_file(DENSE, folder / "other.pt", seed=1)[0])


def test_calibrate_without_labels_is_one_line(labelled, tmp_path, capsys):
    index = tmp_path / "plain.csv"
    index.write_text("path,label\n%s,x\n" % read_index_first(labelled["index"]))
    assert cli.main(["xrv", "calibrate", "--model", DENSE, "--weights", labelled["weights"], "--index",
                     str(index), "--out", str(tmp_path / "t.json"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mxvision: error: %s: no pathology labels" % index) and "\n" not in err
    assert not (tmp_path / "t.json").exists()


def test_output_that_is_a_folder_is_refused_first(labelled, tmp_path, capsys):
    for argv in (["classify", "--index", str(labelled["index"]), "--out", str(tmp_path)],
                 ["xrv", "calibrate", "--index", str(labelled["index"]), "--out", str(tmp_path)]):
        assert cli.main(argv + ["--model", DENSE, "--weights", labelled["weights"], "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mxvision: error: %s: is a folder; give the file name of the" % tmp_path)
        assert "\n" not in err


def test_calibrate_one_split(labelled, tmp_path, capsys):
    from mxvision.data.index import read_index
    index = read_index(labelled["index"])
    split = index.splits[0]
    out = tmp_path / "split.json"
    assert cli.main(["xrv", "calibrate", "--model", DENSE, "--weights", labelled["weights"], "--index",
                     str(labelled["index"]), "--out", str(out), "--split", split, "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert doc["split"] == split and doc["images"]["scored"] == index.splits.count(split) < len(index)
    assert "films of split %s" % split in capsys.readouterr().out
    assert cli.main(["xrv", "calibrate", "--model", DENSE, "--weights", labelled["weights"], "--index",
                     str(labelled["index"]), "--out", str(out), "--split", "nosuch", "--quiet"]) == 2
    assert "no film in split 'nosuch'" in capsys.readouterr().err
