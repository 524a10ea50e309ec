"""The run folder module on its own: checkpoint names, pruning, resuming, the log, reading a run."""
import csv
import json

import pytest

from mxvision.errors import BadRun
from mxvision.train import runs


def _touch(run_dir, number, exts, unit="epoch"):
    for ext in exts:
        path = runs.checkpoint_path(run_dir, number, ext, unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _names(run_dir):
    return sorted(p.name for p in (run_dir / runs.CHECKPOINTS).iterdir())


def test_checkpoint_names_of_epochs_and_steps(tmp_path):
    assert runs.checkpoint_path(tmp_path, 7, "params").relative_to(tmp_path).as_posix() == \
        "checkpoints/epoch-0007.params"
    assert runs.checkpoint_path(tmp_path, 250, "states", unit="step").name == "step-000250.states"


def test_pruning_keeps_the_newest_of_this_run_and_leaves_the_rest(tmp_path):
    for epoch in range(1, 6):
        _touch(tmp_path, epoch, ("params", "states", "backbone"))
    _touch(tmp_path, 9, ("params",))  # an earlier, longer run's: not this run's to prune
    _touch(tmp_path, 2, ("states",), unit="step")  # another unit: untouched
    (tmp_path / runs.CHECKPOINTS / ".epoch-0001.params.abc.tmp").write_bytes(b"")  # a temp file
    runs.prune_checkpoints(tmp_path, last=5, keep=2)
    assert _names(tmp_path) == [".epoch-0001.params.abc.tmp", "epoch-0004.backbone", "epoch-0004.params",
                                "epoch-0004.states", "epoch-0005.backbone", "epoch-0005.params",
                                "epoch-0005.states", "epoch-0009.params", "step-000002.states"]
    runs.prune_checkpoints(tmp_path, last=5, keep=0)  # 0 keeps all
    assert len(_names(tmp_path)) == 9
    runs.remove_checkpoints(tmp_path, "epoch")
    assert _names(tmp_path) == [".epoch-0001.params.abc.tmp", "step-000002.states"]


def _config(features_dir="/f", **hyper):
    """A head run's config.json with what runs.check_config requires."""
    return {"features": {"features_dir": features_dir, "backbone": "resnet18_v2", "cut": "stage4",
                         "weights": {"file": None, "sha1": "0", "description": "random"},
                         "preprocessing": {"name": "imagenet224"}, "feature_shape": [8],
                         "classes": ["normal", "nodule"]},
            "hyper": dict(dict.fromkeys(runs.FIXED_SETTINGS, 1), epochs=5, **hyper),
            "splits": {"train": "train", "val": "val"}}


def test_resuming_refuses_other_settings_and_an_unreadable_config(tmp_path):
    config = _config()
    assert runs.load_or_start(tmp_path, config, resume=True) == runs.new_state()  # nothing to resume
    (tmp_path / runs.CONFIG).write_text(json.dumps(config))
    (tmp_path / runs.STATE).write_text(json.dumps(dict(runs.new_state(), last_epoch=3)))
    assert runs.load_or_start(tmp_path, config, resume=True)["last_epoch"] == 3
    assert runs.load_or_start(tmp_path, config, resume=False)["last_epoch"] == 0
    other = _config("/g", lr=2)
    with pytest.raises(BadRun, match=r"holds a run with other settings \(lr, features\)"):
        runs.load_or_start(tmp_path, other, resume=True)
    (tmp_path / runs.CONFIG).write_text("{")
    with pytest.raises(BadRun, match="config.json: unreadable"):
        runs.load_or_start(tmp_path, config, resume=True)


def test_best_epoch_is_higher_auc_then_lower_loss(tmp_path):
    nan = float("nan")
    assert runs.is_better({"val_auc": 0.8, "val_loss": 9.0}, {"val_auc": 0.7, "val_loss": 0.1})
    assert runs.is_better({"val_auc": nan, "val_loss": 0.2}, {"val_auc": 0.9, "val_loss": 0.3})
    assert not runs.is_better({"val_auc": 0.7, "val_loss": 0.2}, {"val_auc": 0.7, "val_loss": 0.1})
    state = runs.new_state()
    for epoch, auc in ((1, 0.6), (2, 0.9), (3, 0.8)):
        _touch(tmp_path, epoch, ("params",))
        runs.checkpoint_path(tmp_path, epoch, "params").write_text(str(epoch))
        row = {"epoch": epoch, "val_auc": auc, "val_loss": 1.0}
        assert runs.update_best(tmp_path, state, row) == (epoch != 3)
        state["history"].append(row)
    assert state["best_epoch"] == 2 and runs.best_row(state) == state["history"][1]
    assert (tmp_path / runs.BEST).read_text() == "2"


def test_log_columns_and_float_format(tmp_path):
    history = [{"step": 2, "loss": 0.123456, "extra": "dropped"}]
    runs.write_log(tmp_path, history, columns=("step", "loss"), float_format=".4f", with_json=False)
    assert list(csv.reader(open(tmp_path / runs.LOG_CSV))) == [["step", "loss"], ["2", "0.1235"]]
    assert not (tmp_path / runs.LOG_JSON).exists()
    runs.write_log(tmp_path, [{"epoch": 1, "val_auc": 0.5}])
    assert list(csv.reader(open(tmp_path / runs.LOG_CSV))) == [["epoch", "val_auc"], ["1", "0.5"]]
    assert json.loads((tmp_path / runs.LOG_JSON).read_text()) == [{"epoch": 1, "val_auc": 0.5}]


def test_load_run_needs_a_config_and_a_best_head(tmp_path):
    (tmp_path / runs.CONFIG).write_text("{}")
    with pytest.raises(BadRun, match="not a training run"):
        runs.load_run(tmp_path)
    (tmp_path / runs.BEST).write_bytes(b"")
    (tmp_path / runs.STATE).write_text(json.dumps(runs.new_state()))
    (tmp_path / runs.CONFIG).write_text(json.dumps(_config()))
    assert runs.load_run(tmp_path) == (_config(), runs.new_state())


def test_a_run_of_steps_resumes_only_from_a_state_its_config_could_have_written(tmp_path):
    fresh = {"last_step": 0, "history": [], "best_step": None, "threshold": None}
    config = {"hyper": {"steps": 100}}
    same = lambda old, new: []  # noqa: E731
    (tmp_path / runs.CONFIG).write_text(json.dumps(config))
    state = dict(fresh, last_step=50, history=[{"step": 50, "loss": 0.1}], best_step=50)
    (tmp_path / runs.STATE).write_text(json.dumps(state))
    assert runs.load_or_start(tmp_path, config, True, changed=same, fresh=fresh) == state
    with pytest.raises(BadRun, match="holds a run of 50 steps already, more than the 40 asked for"):
        runs.load_or_start(tmp_path, {"hyper": {"steps": 40}}, True, changed=same, fresh=fresh)
    for bad_state, problem in [(dict(state, last_step=10 ** 9), "last_step 1000000000 is not from 0 to 100"),
                               (dict(state, best_step=7), "best_step 7 is not one of the steps in its history"),
                               (dict(state, history=[{"step": "50"}]), "history rows are not objects"),
                               ([state], "holds a list")]:
        (tmp_path / runs.STATE).write_text(json.dumps(bad_state))
        with pytest.raises(BadRun, match=problem):
            runs.load_or_start(tmp_path, config, True, changed=same, fresh=fresh)
    (tmp_path / runs.CONFIG).write_text(json.dumps({"hyper": {"steps": "100"}}))
    with pytest.raises(BadRun, match="config.json: lacks hyper's steps"):
        runs.load_or_start(tmp_path, config, True, changed=same, fresh=fresh)
