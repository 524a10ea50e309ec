"""Multi-label training: the NaN-masked binary cross-entropy, pathology targets in the feature
store, `train --labels` and fine-tuning such a run, on real synthetic films.

The films come from :mod:`mxvision.data.synth` (pairs of the same anatomy without and with a
nodule); the index gets a ``Nodule`` column that follows the nodule (every fifth film missing)
and an ``Effusion`` column that is missing on three films in four.
"""
import json
import math

import mxnet as mx
import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from support.cli import one_line_error, run_cli
from mxvision.data.index import read_index, write_index
from mxvision.data.synth import make_synthetic_dataset
from mxvision.errors import BadIndex, BadRun, MxvisionError
from mxvision.features.extract import extract_features
from mxvision.features.store import FeatureStore, check_manifest
from mxvision.train.finetune import finetune_run
from mxvision.train.loop import load_head, predict_probs, train_head
from mxvision.train.multilabel import masked_bce_loss, target_matrix


def multilabel_index(folder, n_pairs=20, size=96):
    """A synthetic index with the pathology columns Nodule (follows the nodule, every fifth film
    missing) and Effusion (seeded 0/1 on one film in four, the rest missing)."""
    index = read_index(make_synthetic_dataset(folder, n_per_class=n_pairs, size=size, seed=0))
    rng = np.random.default_rng(0)
    nodule = ["" if k % 5 == 0 else ("1" if label == "nodule" else "0")
              for k, label in enumerate(index.labels)]
    effusion = [("1" if rng.random() < 0.4 else "0") if k % 4 == 1 else "" for k in range(len(index))]
    index = index.with_column("Nodule", nodule).with_column("Effusion", effusion)
    return write_index(index, folder / "multi.csv")


def extract(index_csv, out):
    return extract_features(index_csv, out, backbone="resnet18_v2", weights="none", ctx="cpu",
                            batch_size=8, shard_size=16, progress=False)


@pytest.fixture(scope="module")
def multi_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multilabel")
    csv_path = multilabel_index(folder)
    return extract(csv_path, folder / "features")


@pytest.fixture(scope="module")
def multi_run(multi_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("multirun")
    state = train_head(multi_store, out, epochs=6, batch_size=8, ctx="cpu", progress=False,
                       labels="all", keep_checkpoints=0)
    return out, state


# ----------------------------------------------------------------------------- the loss
def _logits_and_targets(seed=0, n=12, labels=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (n, labels)).astype(np.float32)
    targets = (rng.random((n, labels)) < 0.4).astype(np.float32)
    targets[rng.random((n, labels)) < 0.35] = np.nan
    targets[0] = np.nan  # a film with no known label at all
    return logits, targets


def test_masked_loss_is_the_mean_binary_cross_entropy_over_the_known_entries():
    logits, targets = _logits_and_targets()
    known = ~np.isnan(targets)
    loss = masked_bce_loss(mx.nd.array(logits), mx.nd.array(targets))
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    expected = log_loss(targets[known], probs[known], labels=[0, 1])  # sklearn, known entries only
    assert loss.shape == (len(logits),)
    assert float(loss.mean().asscalar()) == pytest.approx(expected, rel=1e-5)
    assert np.isfinite(loss.asnumpy()).all()


def test_missing_labels_change_neither_the_loss_nor_the_gradient():
    """Whatever the network outputs where the label is missing, the loss and every other
    entry's gradient stay the same, and the missing entries get no gradient."""
    logits, targets = _logits_and_targets(seed=1)
    missing = np.isnan(targets)
    other = logits.copy()
    other[missing] = np.random.default_rng(2).normal(0, 50, missing.sum())
    results = []
    for x in (logits, other):
        xs = mx.nd.array(x)
        xs.attach_grad()
        with mx.autograd.record():
            loss = masked_bce_loss(xs, mx.nd.array(targets))
        loss.backward()
        results.append((float(loss.sum().asscalar()), xs.grad.asnumpy()))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert np.all(grad_a[missing] == 0) and np.all(grad_b[missing] == 0)
    np.testing.assert_allclose(grad_a[~missing], grad_b[~missing], rtol=1e-5, atol=1e-8)
    # the gradient of sum(loss) is N * (sigmoid - target) / (known entries): the masked mean's
    n_known = (~missing).sum()
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    expected = len(logits) * (probs - np.nan_to_num(targets)) / n_known
    np.testing.assert_allclose(grad_a[~missing], expected[~missing], rtol=1e-4, atol=1e-6)


def test_a_batch_without_any_known_label_gives_zero_loss():
    loss = masked_bce_loss(mx.nd.ones((3, 2)), mx.nd.array(np.full((3, 2), np.nan)))
    assert np.all(loss.asnumpy() == 0)


# ----------------------------------------------------------------------------- the targets
def test_target_matrix_reads_store_items_and_index_records(multi_store, tmp_path):
    index = read_index(multi_store.items[0]["path"].rsplit("/images/", 1)[0] + "/multi.csv")
    from_index = target_matrix(index.records(), ["Effusion", "Nodule"])
    by_id = {it["id"]: it for it in multi_store.items}
    from_store = target_matrix([by_id[i] for i in index.ids], ["Effusion", "Nodule"],
                               multi_store.pathologies)
    np.testing.assert_array_equal(from_index, from_store)  # NaN in the same places
    assert from_store.dtype == np.float32 and from_store.shape == (len(index), 2)
    nodule = np.array([{"1": 1.0, "0": 0.0, "": np.nan}[v] for v in index.column("Nodule")])
    np.testing.assert_array_equal(from_store[:, 1], nodule)
    assert np.isnan(from_store[:, 0]).mean() > 0.7


def test_the_store_records_the_pathology_targets(multi_store):
    m = multi_store.manifest
    assert multi_store.pathologies == ["Nodule", "Effusion"]
    index = read_index(multi_store.items[0]["path"].rsplit("/images/", 1)[0] + "/multi.csv")
    values = {"1": 1, "0": 0, "": None}
    expected = {i: [values[n], values[e]] for i, n, e in
                zip(index.ids, index.column("Nodule"), index.column("Effusion"))}
    assert {it["id"]: it["targets"] for it in m["items"]} == expected


def test_a_plain_index_gives_the_items_of_before(small_store):
    assert small_store.pathologies == []
    assert all("targets" not in it for it in small_store.items)


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m["items"][0].update(targets=[1]), "targets are not a list of 2"),
    (lambda m: m["items"][1].update(targets=[2, None]), "other than 1, 0 or null"),
    (lambda m: m["items"][1].update(targets=[True, None]), "other than 1, 0 or null"),
    (lambda m: m["items"][1].update(targets=[0.5, None]), "other than 1, 0 or null"),
    (lambda m: m["items"][2].pop("targets"), "targets are not a list"),
    (lambda m: m.update(pathologies=["Nodule", "Nodule"]), "distinct names"),
    (lambda m: m.update(pathologies="Nodule"), "pathologies is a string"),
    (lambda m: m.update(pathologies=[]), "names no pathologies"),
])
def test_check_manifest_refuses_malformed_targets(multi_store, edit, problem):
    manifest = json.loads(json.dumps(multi_store.manifest))
    edit(manifest)
    with pytest.raises(BadRun, match=problem):
        check_manifest(manifest, "manifest.json")


def test_a_manifest_without_pathologies_still_reads(small_store):
    manifest = json.loads(json.dumps(small_store.manifest))
    manifest.pop("pathologies", None)
    assert check_manifest(manifest, "manifest.json")["pathologies"] == []


def test_extraction_resumes_with_the_same_targets_and_refuses_changed_ones(tmp_path):
    csv_path = multilabel_index(tmp_path, n_pairs=4, size=64)
    first = extract(csv_path, tmp_path / "features")
    again = extract(csv_path, tmp_path / "features")  # same index: every shard is kept
    assert again.manifest["shards"] == first.manifest["shards"]
    index = read_index(csv_path)
    flipped = ["0" if v == "1" else "1" if v == "0" else v for v in index.column("Nodule")]
    write_index(index.with_column("Nodule", flipped), tmp_path / "multi.csv")
    with pytest.raises(BadRun, match="another index or configuration"):
        extract(csv_path, tmp_path / "features")


def test_a_pathology_value_that_is_not_1_0_or_empty_is_refused(tmp_path):
    csv_path = multilabel_index(tmp_path, n_pairs=3, size=64)
    index = read_index(csv_path)
    write_index(index.with_column("Effusion", ["2"] + index.column("Effusion")[1:]), csv_path)
    with pytest.raises(BadIndex, match="row 1: pathology Effusion is '2'"):
        extract(csv_path, tmp_path / "features")


# ----------------------------------------------------------------------------- training
def test_train_records_the_task_and_picks_the_best_epoch_by_mean_val_auc(multi_store, multi_run):
    run, state = multi_run
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "multilabel" and config["labels"] == ["Nodule", "Effusion"]
    head, _ = load_head(run, ctx="cpu")
    x, _, ids = multi_store.load("val")
    probs = predict_probs(head, x, mx.cpu(), sigmoid=True)
    assert probs.shape == (len(ids), 2)
    by_id = {it["id"]: it for it in multi_store.items}
    truth = target_matrix([by_id[i] for i in ids], ["Nodule", "Effusion"], multi_store.pathologies)
    aucs = [roc_auc_score(truth[~np.isnan(truth[:, j]), j], probs[~np.isnan(truth[:, j]), j])
            for j in range(2) if len(np.unique(truth[~np.isnan(truth[:, j]), j])) == 2]
    best = next(r for r in state["history"] if r["epoch"] == state["best_epoch"])
    assert best["val_auc"] == pytest.approx(np.mean(aucs), abs=1e-6)
    scores = [r["val_auc"] for r in state["history"]]
    assert best["val_auc"] == max(s for s in scores if not math.isnan(s))
    known = ~np.isnan(truth)
    assert best["val_loss"] == pytest.approx(log_loss(truth[known], probs[known], labels=[0, 1]), rel=1e-4)


def test_train_resumes_a_multilabel_run_and_refuses_other_labels(multi_store, multi_run, tmp_path):
    run, state = multi_run
    again = train_head(multi_store, run, epochs=6, batch_size=8, ctx="cpu", progress=False,
                       labels="all", keep_checkpoints=0)
    assert again["history"] == state["history"]  # nothing left to train: the same run
    with pytest.raises(BadRun, match=r"other settings \(labels\)"):
        train_head(multi_store, run, epochs=6, batch_size=8, ctx="cpu", progress=False,
                   labels="Nodule", keep_checkpoints=0)
    with pytest.raises(BadRun, match=r"other settings \(labels\)"):
        train_head(multi_store, run, epochs=6, batch_size=8, ctx="cpu", progress=False,
                   keep_checkpoints=0)


@pytest.mark.parametrize("labels, problem", [
    ("Nodule,Pneumonia", "has no pathology Pneumonia; it has Nodule, Effusion"),
    ("Nodule,Nodule", "Nodule given twice"),
    ("Nodule,", "without empty names"),
])
def test_labels_the_store_cannot_train_are_refused(multi_store, tmp_path, labels, problem):
    with pytest.raises(MxvisionError, match=problem):
        train_head(multi_store, tmp_path / "run", epochs=1, ctx="cpu", progress=False, labels=labels)
    assert not (tmp_path / "run").exists()


def test_a_label_without_negatives_in_train_is_refused_and_left_out_of_all(tmp_path):
    csv_path = multilabel_index(tmp_path, n_pairs=8, size=64)
    index = read_index(csv_path)
    # Effusion positive wherever it is known in train: nothing to learn from
    effusion = ["1" if s == "train" and v else v for s, v in zip(index.splits, index.column("Effusion"))]
    write_index(index.with_column("Effusion", effusion), csv_path)
    store = extract(csv_path, tmp_path / "features")
    with pytest.raises(BadRun, match=r"pathology Effusion has \d+ positive\(s\) among the \d+ known "
                                     "labels of split 'train'; training needs both"):
        train_head(store, tmp_path / "run", epochs=1, ctx="cpu", progress=False, labels="Effusion")
    state = train_head(store, tmp_path / "run", epochs=1, batch_size=4, ctx="cpu", progress=False,
                       labels="all")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["labels"] == ["Nodule"]
    assert state["last_epoch"] == 1


def test_a_store_without_pathology_targets_is_refused(small_store, tmp_path):
    with pytest.raises(BadRun, match="holds no pathology targets"):
        train_head(small_store, tmp_path / "run", epochs=1, ctx="cpu", progress=False, labels="all")


def test_the_cli_trains_with_labels_and_refuses_bad_ones(multi_store, tmp_path):
    code, out, err = run_cli("train", "--features", multi_store.path, "--out", tmp_path / "r",
                             "--epochs", "2", "--batch-size", "8", "--labels", "Nodule", "--quiet",
                             "--ctx", "cpu")
    assert code == 0, err
    assert "best epoch" in out
    assert json.loads((tmp_path / "r" / "config.json").read_text())["labels"] == ["Nodule"]
    code, out, err = run_cli("train", "--features", multi_store.path, "--out", tmp_path / "s",
                             "--labels", "Nodule,Mass", "--ctx", "cpu")
    assert code == 2
    one_line_error(code, err, "has no pathology Mass")
    assert not (tmp_path / "s").exists()


def test_export_refuses_a_multilabel_run_in_one_line(multi_run, tmp_path):
    run, _ = multi_run
    code, out, err = run_cli("export", "--run", run, "--out", tmp_path / "model" / "x", "--ctx", "cpu")
    one_line_error(code, err, "is a multi-label run")
    assert not (tmp_path / "model").exists()


# ----------------------------------------------------------------------------- fine-tuning
def test_finetune_of_a_multilabel_run_uses_the_masked_loss_and_its_labels(multi_store, multi_run, tmp_path):
    run, _ = multi_run
    state = finetune_run(run, tmp_path / "tuned", stages=1, epochs=1, lr=0.001, batch_size=8,
                         ctx="cpu", progress=False)
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["task"] == "multilabel" and config["labels"] == ["Nodule", "Effusion"]
    row = state["history"][0]
    assert 0 <= row["val_auc"] <= 1 and math.isfinite(row["val_loss"])
    # the epoch's val AUC is the mean per-label AUC of the tuned network on the val films
    from mxvision.train.finetune import image_probs, split_items
    from mxvision.train.loop import load_classifier
    net, _ = load_classifier(tmp_path / "tuned", ctx="cpu", softmax=False)
    items = split_items(config, "val")
    probs = 1 / (1 + np.exp(-image_probs(net, items, config["features"]["preprocessing"]["name"], mx.cpu())))
    truth = target_matrix(items, config["labels"], multi_store.pathologies)
    aucs = [roc_auc_score(truth[~np.isnan(truth[:, j]), j], probs[~np.isnan(truth[:, j]), j])
            for j in range(2) if len(np.unique(truth[~np.isnan(truth[:, j]), j])) == 2]
    assert row["val_auc"] == pytest.approx(np.mean(aucs), abs=1e-4)
