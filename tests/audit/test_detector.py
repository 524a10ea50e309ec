"""The from-scratch nodule detector: insertion, batches, training, resume, evaluation, CLI.

Small on purpose (tiny cartoon films of the session's synthetic set, 64-128 px inputs): the whole
file must stay well under a minute on two shared cores.
"""
import json
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from mxvision import cli
from mxvision.audit import lesion
from mxvision.cli import detector as lesion_cli
from mxvision.data import synth
from mxvision.data.index import read_index
from mxvision.errors import BadIndex, BadRun
from mxvision.io.images import read_image
from mxvision.models import zoo
from mxvision.audit.detector import load_detector, make_batch, train_detector
from mxvision.audit.detector_evaluation import evaluate_detector

EASY = {"radius": [24, 32], "contrast": [70, 100]}  # big, bright nodules: learnable in seconds
SMALL = {"size": 64, "batch_pairs": 2, "val_variants": 2}


def _params(path):
    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


@pytest.fixture(scope="module")
def easy_run(synth_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("detector")
    state = train_detector(synth_index, out, ctx="cpu", progress=False, steps=120, size=128, batch_pairs=4,
                           lr=3e-3, checkpoint_every=40, val_variants=3, **EASY)
    return out, state


@pytest.fixture(scope="module")
def easy_pairs(synth_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("easy_pairs")
    lesion.make_lesion_pairs(synth_index, out, variants=3, splits=["val", "test"], progress=False,
                             radius=tuple(EASY["radius"]), contrast=tuple(EASY["contrast"]))
    return out / "index.csv"


def test_training_insertion_is_the_insertion_synth_writes():
    """Training passes the film's precomputed lung depth; the nodules are those of ``mxvision synth``."""
    rng = np.random.default_rng(5)
    img = synth.make_radiograph(rng, 256)
    mask = lesion.lung_mask(img)
    depth = lesion.lung_depth(mask)
    for k in range(10):
        a, na = lesion.insert_random_nodule(img, mask, np.random.default_rng(k), (4, 40), (15, 60))
        b, nb = lesion.insert_random_nodule(img, mask, np.random.default_rng(k), (4, 40), (15, 60), depth)
        assert na == nb
        assert np.array_equal(a, b) and (a != img).any()


def test_nodule_versions_are_the_files_synth_writes(synth_index, tmp_path):
    out = lesion.make_lesion_pairs(synth_index, tmp_path, variants=2, seed=4, splits=["val"], progress=False)
    src = read_index(synth_index)
    k = next(i for i, (lab, s) in enumerate(zip(src.labels, src.splits)) if lab == "normal" and s == "val")
    versions = lesion.nodule_versions(lesion.to_uint8(read_image(src.paths[k])), src.ids[k], 2, seed=4)
    stem = Path(src.paths[k]).stem
    written = [p for p, lab in zip(out.paths, out.labels) if lab == "nodule" and Path(p).stem.startswith(stem)]
    assert len(written) == 2
    for (img, _), path in zip(versions, sorted(written)):
        assert np.array_equal(img, lesion.to_uint8(read_image(path)))


def test_batches_pair_each_film_with_its_nodule_and_are_reproducible(synth_index):
    from mxvision.features.extract import load_index
    from mxvision.audit.detector import DEFAULTS, training_films

    hyper = dict(DEFAULTS, **SMALL, **EASY)
    films = training_films(load_index(synth_index), "train")
    x, t, ignore = make_batch(films, np.random.default_rng([0, 1]), hyper)
    assert x.shape == (4, 1, 64, 64) and t.shape == ignore.shape == (4, 1, 8, 8) and not ignore.any()
    assert t[0::2].sum() == 0 and (t[1::2].sum(axis=(1, 2, 3)) >= 1).all()
    diff = np.abs(x[1::2] - x[0::2])[:, 0]
    for d, target in zip(diff, t[1::2, 0]):  # the two members differ only near the nodule
        ys, xs = np.nonzero(d > 1e-6)
        cy, cx = np.argwhere(target).mean(axis=0) * 8 + 4
        assert len(ys) and np.hypot(ys - cy, xs - cx).max() < 20
    x2, t2, _ = make_batch(films, np.random.default_rng([0, 1]), hyper)
    assert np.array_equal(x, x2) and np.array_equal(t, t2)


def test_films_with_a_real_nodule_serve_as_backgrounds_with_that_nodule_ignored(synth_index):
    from mxvision.features.extract import load_index
    from mxvision.audit.detector import DEFAULTS, training_films

    index = load_index(synth_index)
    films = training_films(index, "train", "all")
    assert len(films) == 16 and len(training_films(index, "train")) == 8
    real = [f for f in films if f[4]]
    assert len(real) == 8
    for _, img, mask, _, ignore in real:  # no inserted nodule can land on the real one
        yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
        assert not mask[np.hypot(xx - ignore[0]["x"], yy - ignore[0]["y"]) <= ignore[0]["radius"]].any()
    x, t, ignore = make_batch(real, np.random.default_rng(2), dict(DEFAULTS, **SMALL, **EASY, augment=1.0))
    assert (ignore.sum(axis=(1, 2, 3)) >= 1).all() and (ignore[0::2] == ignore[1::2]).all()
    assert (t * ignore).sum() == 0 and t[1::2].sum() > 0


def test_network_is_in_the_zoo_and_keeps_stride_8():
    net = zoo.get_model("nodule_net", width=16, extra=1, seed=1)
    assert "nodule_net" in zoo.list_models()
    assert net(mx.nd.zeros((2, 1, 64, 96))).shape == (2, 1, 8, 12)


def test_training_learns_to_score_inserted_nodules(easy_run, easy_pairs, tmp_path):
    out, state = easy_run
    assert [r["step"] for r in state["history"]] == [40, 80, 120]
    best = next(r for r in state["history"] if r["step"] == state["best_step"])
    assert best["val_auc"] >= 0.85 and state["history"][-1]["loss"] < state["history"][0]["loss"]
    assert np.isfinite(state["threshold"])
    for name in ("config.json", "state.json", "log.csv", "best.params"):
        assert (out / name).is_file()
    m = evaluate_detector(out, easy_pairs, split=None, out_dir=tmp_path, resamples=200)
    assert m["n_films"] == 4 and m["n_nodule"] == 12 and m["auc"] >= 0.8 and m["paired_auc"] >= 0.8
    assert m["ci95"]["auc"][0] <= m["auc"] <= m["ci95"]["auc"][1]
    assert sum(map(sum, m["confusion_matrix"])) == 16 and m["sensitivity"] >= 0.5
    assert m["pointing"]["n"] == 12 and m["pointing"]["hit_rate"] >= 0.75  # it points at the nodule
    assert json.loads((tmp_path / "metrics.json").read_text())["auc"] == m["auc"]
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 17
    untrained = zoo.get_model("nodule_net", seed=0)
    untrained.save_parameters(str(tmp_path / "untrained.params"))
    before = evaluate_detector(out, easy_pairs, split=None, params=str(tmp_path / "untrained.params"),
                               resamples=0)
    assert m["paired_auc"] > before["paired_auc"]  # the scores rose because of training


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(synth_index, tmp_path):
    kw = dict(ctx="cpu", progress=False, steps=6, checkpoint_every=2, **SMALL)
    train_detector(synth_index, tmp_path / "straight", **kw)
    paused = train_detector(synth_index, tmp_path / "resumed", stop_at=3, **kw)
    assert paused["last_step"] == 3 and paused["threshold"] is None
    state = train_detector(synth_index, tmp_path / "resumed", **kw)
    assert [r["step"] for r in state["history"]] == [2, 3, 4, 6] and state["threshold"] is not None
    a = _params(tmp_path / "straight" / "checkpoints" / "step-000006.params")
    b = _params(tmp_path / "resumed" / "checkpoints" / "step-000006.params")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    kept = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert kept == ["step-000004.params", "step-000004.states", "step-000006.params", "step-000006.states"]
    with pytest.raises(BadRun, match="lr"):
        train_detector(synth_index, tmp_path / "resumed", lr=0.1, **kw)
    kw["steps"] = 2  # a fresh start over an old run drops the old run's checkpoints
    train_detector(synth_index, tmp_path / "resumed", resume=False, **kw)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == \
        ["step-000002.params", "step-000002.states"]


def test_bad_inputs_are_refused(synth_index, tmp_path):
    with pytest.raises(BadRun, match="not a detector run"):
        load_detector(tmp_path)
    with pytest.raises(BadIndex, match="nodule_contrast"):  # an index that is not synth's
        evaluate_detector(_tiny_run(synth_index, tmp_path), synth_index)
    with pytest.raises(BadRun, match="multiple of 8"):
        train_detector(synth_index, tmp_path / "odd", size=60)


def _tiny_run(synth_index, tmp_path):
    train_detector(synth_index, tmp_path / "tiny", ctx="cpu", progress=False, steps=1, **SMALL)
    return tmp_path / "tiny"


def _cli(monkeypatch, capsys, *argv):
    assert lesion_cli in cli.COMMAND_GROUPS  # `mxvision detector` is a registered command group
    code = cli.main(list(argv))
    return code, capsys.readouterr()


def test_cli_train_evaluate_score_and_one_line_errors(synth_index, easy_run, easy_pairs, tmp_path,
                                                     monkeypatch, capsys):
    code, out = _cli(monkeypatch, capsys, "detector", "train", "--index", str(synth_index), "--out",
                     str(tmp_path / "run"), "--steps", "2", "--size", "64", "--batch-pairs", "2",
                     "--val-variants", "1", "--quiet", "--ctx", "cpu")
    assert code == 0 and "finished step 2" in out.out
    code, out = _cli(monkeypatch, capsys, "detector", "evaluate", "--run", str(easy_run[0]), "--pairs",
                     str(easy_pairs), "--out", str(tmp_path / "eval"), "--bootstrap", "50", "--ctx", "cpu")
    assert code == 0 and "paired AUC" in out.out and (tmp_path / "eval" / "metrics.json").is_file()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    good = read_index(easy_pairs).paths[0]
    code, out = _cli(monkeypatch, capsys, "detector", "score", str(good), str(bad), "--run", str(easy_run[0]),
                     "--out", str(tmp_path / "scores.csv"), "--ctx", "cpu")
    assert code == 1 and "peak" in out.out and "skipped" in out.out and "bad.png" in out.out
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 2
    for argv, text in ((("evaluate", "--run", str(tmp_path), "--pairs", str(easy_pairs)), "not a detector run"),
                       (("evaluate", "--run", str(easy_run[0]), "--pairs", str(tmp_path / "no.csv")), "no.csv"),
                       (("train", "--index", str(synth_index), "--out", str(tmp_path / "r2"), "--size", "50"),
                        "multiple of 8"),
                       (("score", str(bad), "--run", str(easy_run[0]), "--strict"), "bad.png")):
        code, out = _cli(monkeypatch, capsys, "detector", *argv)
        assert code == 2 and text in out.err
        assert out.err.count("\n") == 1 and out.err.startswith("mxvision: error:")
