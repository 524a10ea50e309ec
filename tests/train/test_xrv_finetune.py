"""Fine-tuning a torchxrayvision port's classifier on real NIH films and labels (random weights)."""
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from support.xrv_files import DENSE
from support.xrv_labelled import nih_findings, nih_pathology_index, soft_weights

from mxvision import cli
from mxvision.data.index import read_index, write_index
from mxvision.inference import classify
from mxvision.models import zoo
from mxvision.models.xrv.common import DEFAULT_PATHOLOGIES
from mxvision.train.xrv_finetune import PARAMS_FILE, finetune_xrv

EFFUSION = DEFAULT_PATHOLOGIES.index("Effusion")


@pytest.fixture(scope="module")
def films(shared, tmp_path_factory):
    folder = tmp_path_factory.mktemp("xrv_finetune")
    index = nih_pathology_index(shared, folder / "nih.csv", [("Effusion", 24), ("No Finding", 36)])
    return {"folder": folder, "index": index, "weights": soft_weights(folder)}


@pytest.fixture(scope="module")
def run(films):
    out = films["folder"] / "run"
    # random weights: the validation films' AUC is chance whatever is learnt, so the epochs are
    # scored on the training films (val_split="train"), where learning shows
    config = finetune_xrv(films["index"], out, model=DENSE, weights=films["weights"], labels="Effusion",
                          epochs=8, lr=0.05, batch_size=64, val_split="train")
    return out, config


def raw_outputs(paths, weights):
    return np.array([r["outputs"] for r in classify(paths, model=DENSE, weights=weights, calibrated=False,
                                                     batch_size=16)])


def test_only_the_chosen_output_changes_and_it_learns(films, run, shared):
    out, config = run
    assert config["labels"] == ["Effusion"] and "Atelectasis" in config["untouched_outputs"]
    index = read_index(films["index"])
    before = raw_outputs(index.paths, films["weights"])
    after = raw_outputs(index.paths, str(out / PARAMS_FILE))
    others = [k for k in range(18) if k != EFFUSION]
    assert np.array_equal(after[:, others], before[:, others])  # bit for bit: no gradient reached them
    assert config["best_epoch"] > 0 and not np.allclose(after[:, EFFUSION], before[:, EFFUSION])
    history = config["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # the run's scoring AUC is the AUC of the saved network's outputs on its films, with labels
    # read from the shared labels.csv
    findings = nih_findings(shared)
    val = [i for i, s in enumerate(index.splits) if s == "train"]
    y = np.array([("Effusion" in findings[index.paths[i].rsplit("/", 1)[-1]]) for i in val], dtype=int)
    assert config["films"]["val"] == len(val) and 0 < y.sum() < len(y)
    assert config["val_label_auc_after"]["Effusion"] == pytest.approx(roc_auc_score(y, after[val, EFFUSION]), abs=1e-9)
    assert config["val_label_auc_before"]["Effusion"] == pytest.approx(roc_auc_score(y, before[val, EFFUSION]),
                                                                       abs=1e-9)
    assert "mxvision xrv calibrate --weights" in config["note"]


def test_films_without_a_label_change_nothing(films, run, tmp_path):
    """The masked loss: train films whose Effusion cell is empty leave the result as it was."""
    index = read_index(films["index"])
    train = [i for i, s in enumerate(index.splits) if s == "train"]
    blank = train[::3]
    cells = list(index.column("Effusion"))
    for i in blank:
        cells[i] = ""
    masked = tmp_path / "masked.csv"
    write_index(index.with_column("Effusion", cells), masked)
    dropped = tmp_path / "dropped.csv"
    write_index(index.select([i for i in range(len(index)) if i not in blank]), dropped)
    full_batch = dict(model=DENSE, weights=films["weights"], labels="Effusion", epochs=4, lr=0.05, batch_size=1000,
                      val_split="train")
    a = finetune_xrv(masked, tmp_path / "a", **full_batch)
    b = finetune_xrv(dropped, tmp_path / "b", **full_batch)
    assert a["films"]["train"] == b["films"]["train"] == len(train) - len(blank)
    wa = zoo.get_model(DENSE, weights=str(tmp_path / "a" / PARAMS_FILE)).classifier.weight.data().asnumpy()
    wb = zoo.get_model(DENSE, weights=str(tmp_path / "b" / PARAMS_FILE)).classifier.weight.data().asnumpy()
    assert not np.allclose(wa[EFFUSION], zoo.get_model(DENSE, weights=films["weights"]).classifier.weight.data()
                           .asnumpy()[EFFUSION])
    assert np.allclose(wa, wb, rtol=1e-5, atol=1e-9)


def test_cli_finetune_and_bad_labels(films, tmp_path, capsys):
    out = tmp_path / "cli_run"
    assert cli.main(["xrv", "finetune", "--model", DENSE, "--weights", films["weights"], "--index",
                     str(films["index"]), "--out", str(out), "--labels", "Effusion", "--epochs", "2", "--quiet"]) == 0
    said = capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    line = next(x for x in said.splitlines() if x.startswith("Effusion"))
    assert "%.3f -> %.3f" % (config["val_label_auc_before"]["Effusion"], config["val_label_auc_after"]["Effusion"]) in line
    for labels, problem in (("Effusionn", "--labels: 'Effusionn' is not one of torchxrayvision's pathologies"),):
        assert cli.main(["xrv", "finetune", "--model", DENSE, "--weights", films["weights"], "--index",
                         str(films["index"]), "--out", str(tmp_path / "bad"), "--labels", labels]) == 2
        err = capsys.readouterr().err.strip()
        assert problem in err and "\n" not in err and not (tmp_path / "bad").exists()
