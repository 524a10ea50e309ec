"""Streaming shuffled batches from a feature store, and training the head on them."""
import numpy as np
import pytest

from mxvision.features.stream import ShardStream, window_size
from mxvision.train.loop import train_head
from mxvision.utils import read_json


def _epoch(stream, epoch):
    return [(x.copy(), y.copy()) for x, y in stream.epoch(epoch)]


def test_every_row_once_per_epoch_deterministic_by_seed_and_epoch(small_store):
    x_all, y_all, _ = small_store.load("train")
    stream = ShardStream(small_store, "train", batch_size=4, seed=3, window_shards=2)
    first = _epoch(stream, 1)
    assert all(len(x) == 4 for x, _ in first[:-1]) and len(first[-1][0]) > 1
    seen = np.concatenate([x for x, _ in first])
    n_expected = len(x_all) - (1 if len(x_all) % 4 == 1 else 0)  # a trailing batch of 1 is dropped
    assert len(seen) == n_expected
    # the rows are the train rows, each once, with their labels (compared as sets of rows)
    key = lambda a: [tuple(r) for r in a.reshape(len(a), -1)[:, :8].round(5).tolist()]  # noqa: E731
    label_of = dict(zip(key(x_all), y_all))
    assert len(label_of) == len(x_all), "the test's row key must tell the train rows apart"
    streamed = key(seen)
    assert len(set(streamed)) == len(streamed), "a row was streamed twice in one epoch"
    foreign = set(streamed) - set(label_of)
    assert not foreign, f"{len(foreign)} streamed row(s) are not rows of the train split"
    never = set(label_of) - set(streamed)
    assert len(never) == len(x_all) - n_expected, f"{len(never)} train row(s) never streamed"
    mislabelled = sum(label_of[r] != y for x, ys in first for r, y in zip(key(x), ys))
    assert mislabelled == 0, f"{mislabelled} streamed row(s) carry another row's label"
    again = _epoch(ShardStream(small_store, "train", batch_size=4, seed=3, window_shards=2), 1)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    other = _epoch(stream, 2)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_memory_is_bounded_by_the_window(small_store, monkeypatch):
    loaded = []
    original = small_store.iter_shards

    def spy(split=None, verify=True, order=None):
        loaded.append(list(order))
        return original(split, verify=verify, order=order)

    monkeypatch.setattr(small_store, "iter_shards", spy)
    stream = ShardStream(small_store, "train", batch_size=4, seed=0, window_shards=2)
    n = sum(len(x) for x, _ in stream.epoch(1))
    assert n > 0 and loaded and max(len(w) for w in loaded) <= 2
    assert sorted(s for w in loaded for s in w) == sorted(stream.shards)  # every shard, once
    row = small_store.row_bytes()
    assert window_size(small_store, "train", max_memory=2 * 8 * row) == 1


def test_training_streams_when_the_store_exceeds_the_memory_budget(small_store, tmp_path):
    state = train_head(small_store, tmp_path / "s", epochs=3, batch_size=8, ctx="cpu",
                       progress=False, max_memory=1, window_shards=2)
    config = read_json(tmp_path / "s" / "config.json")
    assert config["streaming"]["window_shards"] == 2
    assert [r["epoch"] for r in state["history"]] == [1, 2, 3]
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in state["history"])
    again = train_head(small_store, tmp_path / "s2", epochs=3, batch_size=8, ctx="cpu",
                       progress=False, max_memory=1, window_shards=2)
    assert [r["val_loss"] for r in again["history"]] == [r["val_loss"] for r in state["history"]]
    # small stores are loaded whole, as before: no streaming section
    train_head(small_store, tmp_path / "m", epochs=1, batch_size=8, ctx="cpu", progress=False)
    assert "streaming" not in read_json(tmp_path / "m" / "config.json")


def test_stream_argument_is_checked(small_store, tmp_path):
    from mxvision.errors import BadRun
    with pytest.raises(BadRun, match="stream"):
        train_head(small_store, tmp_path / "x", epochs=1, stream="sometimes", progress=False)
