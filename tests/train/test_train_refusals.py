"""Settings a head cannot learn from are refused before the run folder exists; the smallest batch
that is accepted really trains.

A batch of one sample makes the head's BatchNorm output its bias (the batch is its own mean), so
with ``--batch-size 1`` no weight before it ever changed and epoch checkpoints were byte-identical;
a training split of one class "trained" to accuracy 1 and AUC NaN; ``--epochs 0`` crashed after
creating the run folder.
"""
import json
import math

import mxnet as mx
import numpy as np
import pytest

from support.cli import one_line_error, run_cli
from mxvision.data.index import read_index, write_index
from mxvision.errors import MxvisionError
from mxvision.features.extract import extract_features
from mxvision.train.loop import MIN_BATCH, train_head


@pytest.mark.parametrize("settings, fragment", [
    ({"batch_size": 1}, "batch size 1: must be at least 2"),
    ({"batch_size": 0}, "batch size 0"),
    ({"epochs": 0}, "epochs 0"),
    ({"lr": math.nan}, "lr nan"),
    ({"lr": -5.0}, "lr -5.0"),
])
def test_settings_that_cannot_train_are_refused_before_the_run_folder(small_store, tmp_path, settings,
                                                                      fragment):
    with pytest.raises(MxvisionError, match=fragment.replace(".", r"\.")) as err:
        train_head(small_store, tmp_path / "run", ctx="cpu", progress=False, **settings)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_the_smallest_batch_changes_the_weights_every_epoch(small_store, tmp_path):
    """Batches of MIN_BATCH rows, and an epoch whose last batch would hold one row (dropped)."""
    n_train = small_store.count("train")
    batch = next(b for b in range(MIN_BATCH, n_train) if n_train % b == 1)  # a trailing single row
    for size in (MIN_BATCH, batch):
        run = tmp_path / f"b{size}"
        state = train_head(small_store, run, epochs=2, batch_size=size, ctx="cpu", progress=False,
                           keep_checkpoints=0)
        assert len(state["history"]) == 2
        first, second = (mx.nd.load(str(run / "checkpoints" / f"epoch-000{e}.params")) for e in (1, 2))
        changed = [k for k in first if not np.array_equal(first[k].asnumpy(), second[k].asnumpy())]
        # every trained weight moved, those before the BatchNorm included
        assert {k for k in first if "running" not in k} <= set(changed), (size, changed)


@pytest.fixture(scope="module")
def one_class_store(synth_index, tmp_path_factory):
    """Features of an index whose train split holds normal films only."""
    folder = tmp_path_factory.mktemp("one_class")
    index = read_index(synth_index)
    splits = ["val" if (label, split) == ("nodule", "train") else split
              for label, split in zip(index.labels, index.splits)]
    index = write_index(index.with_column("split", splits), folder / "index.csv")
    return extract_features(index, folder / "features", backbone="resnet18_v2", weights="none", ctx="cpu",
                            batch_size=8, shard_size=8, progress=False)


def test_a_training_split_of_one_class_is_refused(one_class_store, tmp_path):
    with pytest.raises(MxvisionError, match="split 'train' has only class 'normal'"):
        train_head(one_class_store, tmp_path / "run", ctx="cpu", progress=False)
    assert not (tmp_path / "run").exists()
    code, out, err = run_cli("train", "--features", one_class_store.path, "--out", tmp_path / "run",
                             "--quiet", "--ctx", "cpu")
    assert code == 2 and err.count("\n") == 1 and "only class 'normal'" in err and "'train'" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("trainer", ["head", "simulated-distributed", "finetune"])
def test_a_diverging_run_stops_with_one_line_and_keeps_its_earlier_epochs(small_store, small_run,
                                                                          tmp_path, trainer):
    """A learning rate of 1e6 sends the loss to NaN: before, `train` died in sklearn ("Input
    contains NaN") and finetune recorded NaN metrics. The epochs before stay; nothing of that one."""
    out = tmp_path / "run"
    args = {"head": ["train", "--features", small_store.path, "--batch-size", 8],
            "simulated-distributed": ["cluster", "train", "--simulate", 2, "--features",
                                      small_store.path, "--batch-size", 8],
            "finetune": ["finetune", "--run", small_run, "--batch-size", 4]}[trainer]
    code, _, err = run_cli(*args, "--out", out, "--epochs", 3, "--lr", "1e6", "--ctx", "cpu", "--quiet")
    one_line_error(code, err, str(out), "training diverged in epoch", "learning rate 1e+06",
                   "lower --lr")
    epoch = int(err.split("training diverged in epoch ")[1].split(":")[0])
    assert ("no epoch was kept" if epoch == 1 else f"epochs up to {epoch - 1} are kept") in err
    saved = sorted(p.name for p in (out / "checkpoints").glob("epoch-*.params"))
    assert saved == [f"epoch-{e:04d}.params" for e in range(1, epoch)]
    if epoch > 1:
        state = json.loads((out / "state.json").read_text())
        assert state["last_epoch"] == epoch - 1
        assert all(math.isfinite(row["train_loss"]) for row in state["history"])
