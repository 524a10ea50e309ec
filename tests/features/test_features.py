import csv
import os

import mxnet as mx
import numpy as np
import pytest

from mxvision.errors import BadImage, BadIndex, BadRun
from mxvision.features.extract import FeatureStore, extract_features
from mxvision.utils import read_json


def _extract(index, out, **kw):
    args = dict(backbone="resnet18_v2", weights="none", ctx="cpu", batch_size=8, shard_size=8,
                progress=False)
    args.update(kw)
    return extract_features(index, out, **args)


def test_manifest_describes_the_features(small_store, synth_index):
    m = small_store.manifest
    assert m["complete"] and m["backbone"] == "resnet18_v2" and m["cut"] == "stage4_unit2_relu1"
    assert m["feature_shape"] == [512, 7, 7] and m["dtype"] == "float32"
    assert m["preprocessing"]["name"] == "imagenet224"
    assert m["weights"]["spec"] == "none" and "RANDOM" in m["weights"]["description"]
    assert m["classes"] == ["normal", "nodule"]
    with open(synth_index) as f:
        n_rows = sum(1 for _ in csv.DictReader(f))
    assert len(m["items"]) == n_rows == m["n_features"]
    assert sorted(r for s in m["shards"] for r in s["rows"]) == list(range(n_rows))
    assert {it["split"] for it in m["items"]} == {"train", "val", "test"}
    x, y, ids = small_store.load()
    assert x.shape == (n_rows, 512, 7, 7) and len(ids) == n_rows and set(y) == {0, 1}
    assert np.isfinite(x).all() and x.std() > 0


def test_default_backbone_gives_2048x7x7(synth_index, tmp_path):
    from mxvision.data.index import read_index
    index = read_index(synth_index)
    store = extract_features(index.subset("test"), tmp_path / "f", weights="none", ctx="cpu",
                             progress=False)
    assert store.manifest["feature_shape"] == [2048, 7, 7]
    assert store.manifest["backbone"] == "resnet50_v2"


def test_resume_recomputes_only_damaged_shards(small_store, synth_index, tmp_path):
    out = tmp_path / "f"
    first = _extract(synth_index, out)
    shards = first.manifest["shards"]
    assert len(shards) >= 3
    before = {s["file"]: os.stat(out / s["file"]).st_mtime_ns for s in shards}
    x_before, _, _ = first.load()
    victim = shards[1]["file"]
    with open(out / victim, "r+b") as f:  # a damaged shard (truncated) must be redone
        f.truncate(100)
    again = _extract(synth_index, out)
    after = {s["file"]: os.stat(out / s["file"]).st_mtime_ns for s in again.manifest["shards"]}
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {victim}
    np.testing.assert_array_equal(again.load()[0], x_before)
    # the same random backbone as the shared fixture: identical features
    np.testing.assert_allclose(x_before, small_store.load()[0], rtol=1e-5, atol=1e-6)


def test_other_configuration_in_out_dir_is_refused(synth_index, tmp_path):
    _extract(synth_index, tmp_path / "f")
    with pytest.raises(BadRun, match="another index or configuration"):
        _extract(synth_index, tmp_path / "f", cut="stage4_unit1_relu1")


def _index_with_bad_image(synth_index, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    rows = list(csv.DictReader(open(synth_index)))[:6]
    base = os.path.dirname(synth_index)
    for r in rows:
        r["path"] = os.path.join(base, r["path"])
    rows.append(dict(rows[0], path=str(bad), patient_id="broken"))
    index = tmp_path / "index.csv"
    with open(index, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return index


def test_unreadable_images_are_skipped_and_listed(synth_index, tmp_path):
    index = _index_with_bad_image(synth_index, tmp_path)
    store = _extract(index, tmp_path / "f")
    m = store.manifest
    assert m["n_skipped"] == 1 and m["n_features"] == 6
    assert "broken.png" in m["skipped"][0]["problem"]
    with pytest.raises(BadImage, match="broken.png"):
        _extract(index, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict" / "manifest.json").exists() or \
        not read_json(tmp_path / "strict" / "manifest.json")["complete"]


def test_missing_index_and_incomplete_store_fail_clearly(tmp_path):
    with pytest.raises(BadIndex, match="nope.csv"):
        _extract(tmp_path / "nope.csv", tmp_path / "f")
    with pytest.raises(BadRun, match="not a feature store"):
        FeatureStore(tmp_path)


def test_shard_files_are_plain_ndarray_files(small_store):
    shard = small_store.manifest["shards"][0]
    loaded = mx.nd.load(str(small_store.path / shard["file"]))
    assert list(loaded) == ["features"] and loaded["features"].shape[0] == len(shard["rows"])


@pytest.mark.gpu
@pytest.mark.skipif(__import__("mxvision.runtime", fromlist=["num_gpus"]).num_gpus() == 0,
                    reason="no GPU visible to MXNet (the PyPI CPU wheel, or no CUDA 11.2 host)")
def test_gpu_extraction_matches_cpu(synth_index, small_store, tmp_path):
    store = _extract(synth_index, tmp_path / "gpu", ctx="gpu:0")
    assert store.manifest["ctx"].startswith("gpu")
    np.testing.assert_allclose(store.load()[0], small_store.load()[0], rtol=1e-3, atol=1e-3)


def test_a_folder_per_class_is_an_index(synth_index, tmp_path):
    images = os.path.join(os.path.dirname(synth_index), "images")
    store = _extract(images, tmp_path / "f")
    labels = {it["label"] for it in store.items}
    assert labels == {"normal", "nodule"} and store.classes == ["normal", "nodule"]
    n_files = sum(len(os.listdir(os.path.join(images, c))) for c in ("normal", "nodule"))
    assert store.manifest["n_features"] == n_files
    assert store.manifest["splits_assigned"]["grouped_by"] == "patient_id"


@pytest.mark.parametrize("loader", ["thread", "process"])
def test_every_stored_row_is_the_backbone_applied_to_its_own_image(synth_index, loader, tmp_path):
    """Batches are computed asynchronously and read back one step later (several per shard, a
    padded last batch): each row must still be the features of its own image, in index order."""
    from mxvision.data import transforms
    from mxvision.features.extract import load_extractor

    store = _extract(synth_index, tmp_path / "f", batch_size=3, shard_size=7, loader=loader, workers=2)
    x, _, ids = store.load()
    info = dict(store.manifest, features_dir=str(store.path))
    net, _ = load_extractor(info, ctx="cpu", fp32_weights_file=store.path / "backbone.params")
    preset = transforms.get_preset(store.manifest["preprocessing"])
    paths = {item["id"]: item["path"] for item in store.items}
    for row, image_id in enumerate(ids):
        one = net(mx.nd.array(transforms.load_image(paths[image_id], preset)[None])).asnumpy()[0]
        np.testing.assert_allclose(x[row], one, rtol=1e-4, atol=1e-5, err_msg=image_id)


def test_a_malformed_conversion_cache_entry_is_passed_over_with_a_warning(tmp_path, caplog):
    """A cached INT8 backbone is only a cache: a damaged record is named in a warning and
    converted again (overwritten), never a traceback; load_block, which must use the store's own
    record, refuses it instead (tests/test_tampered.py)."""
    import json
    from mxvision.features import quantize
    info_file = tmp_path / quantize.file_names("int8")[2]
    good = {"key": "k", "dtype": "int8", "symbol": "s.json", "params": "p.params", "symbol_sha1": "0",
            "params_sha1": "0"}
    for content, problem in [("{", "unreadable"), ("[1]", "is not a JSON object"),
                             (json.dumps({"key": "k"}), "lacks dtype, symbol"),
                             (json.dumps(dict(good, symbol="../../s.json")), "not a file name inside")]:
        info_file.write_text(content)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert quantize.find(tmp_path, "int8", "k") is None
        assert problem in caplog.text and str(info_file) in caplog.text


def test_missing_images_of_a_large_index_are_counted_at_once(tmp_path, caplog):
    """Every path is stat-ed before a backbone is built (a record counts as present when its pack
    is): a large index hears at once how many files are missing, and one with none refuses."""
    from mxvision.data.index import Index
    from mxvision.features.extract import LARGE_INDEX, check_images_exist, missing_images
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "pack.rec").write_bytes(b"x")
    assert missing_images([str(tmp_path / "a.png"), f"{tmp_path}/pack.rec#3", f"{tmp_path}/gone.rec#1",
                           str(tmp_path / "b.png")]) == [f"{tmp_path}/gone.rec#1", str(tmp_path / "b.png")]
    rows = [{"path": "a.png", "label": "normal"}] + \
        [{"path": f"img/{i}.png", "label": "nodule"} for i in range(LARGE_INDEX - 1)]
    with caplog.at_level("WARNING"):
        check_images_exist(Index(rows, tmp_path))
    assert f"{LARGE_INDEX - 1} of {LARGE_INDEX} image files are missing (first: {tmp_path / 'img' / '0.png'})" \
        in caplog.text
    with pytest.raises(BadIndex, match=f"none of the {LARGE_INDEX - 1} image files exist"):
        check_images_exist(Index(rows[1:], tmp_path, source="index.csv"))


def test_manifest_rewrites_take_a_bounded_share_of_a_long_extraction(synth_index, tmp_path, monkeypatch):
    """The unfinished manifest lists every image: rewriting it after each shard made a large
    extraction quadratic. Here each rewrite is made to cost what a 100,000-image manifest costs
    (a slow write_json: the code under test is unchanged); rewrites are then skipped so that they
    take about MANIFEST_SHARE of the run, and the final manifest still lists every shard."""
    from mxvision.features import extract
    from mxvision.utils import write_json as real_write_json
    import time

    writes = []

    def slow_write_json(path, obj):
        tic = time.monotonic()
        time.sleep(0.4)
        real_write_json(path, obj)
        writes.append((time.monotonic() - tic, obj["complete"], len(obj["shards"])))

    monkeypatch.setattr(extract, "write_json", slow_write_json)
    tic = time.monotonic()
    store = _extract(synth_index, tmp_path / "f", shard_size=1, batch_size=1)
    seconds = time.monotonic() - tic
    n_shards = len(store.manifest["shards"])
    assert n_shards == store.manifest["n_features"] > 10
    unfinished = [w for w in writes if not w[1]]
    assert writes[-1][1] and writes[-1][2] == n_shards  # the final manifest lists every shard
    assert 1 <= len(unfinished) < n_shards / 2, (len(unfinished), n_shards)
    spent = sum(w[0] for w in unfinished)
    assert spent <= extract.MANIFEST_SHARE * seconds + 2 * 0.45, (spent, seconds)


def test_two_streams_store_what_one_stream_stores(synth_index, tmp_path, caplog):
    """streams=2 runs alternate batches on a second copy of the network that shares its weights:
    row for row, the store is the one a single stream writes (5 batches: the copies' outputs
    must not be mixed up), and the manifest says how it ran. In this process MXNet's engine has
    one CPU worker, so the copies take turns, and a warning says so."""
    one = _extract(synth_index, tmp_path / "one", batch_size=5, shard_size=10)
    assert "copies take turns" not in caplog.text
    two = _extract(synth_index, tmp_path / "two", batch_size=5, shard_size=10, streams=2)
    assert "2 streams, but MXNet's engine has MXNET_CPU_WORKER_NTHREADS=1 CPU workers" in caplog.text
    x1, _, ids1 = one.load()
    x2, _, ids2 = two.load()
    assert list(ids1) == list(ids2) and len(ids1) == 24
    np.testing.assert_array_equal(x2, x1)
    assert (one.manifest["timing"]["streams"], two.manifest["timing"]["streams"]) == (1, 2)


def test_mxvision_streams_runs_the_copies_side_by_side_with_the_same_features(synth_index, tmp_path):
    """The real switch, as a user sets it: MXVISION_STREAMS=3 before the process starts gives MXNet's
    engine 3 workers of one thread; `extract` stores the features one stream of every core stores
    (oneDNN's float32 rounding may depend on the thread count: equal within 1e-5 of the range)."""
    import subprocess
    import sys

    stores = {}
    for streams in ("1", "3"):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MXNET_CPU_WORKER_NTHREADS")}
        env["MXVISION_STREAMS"] = streams
        out = tmp_path / f"streams-{streams}"
        done = subprocess.run([sys.executable, "-m", "mxvision", "extract", "--index", str(synth_index),
                               "--out", str(out), "--weights", "none", "--backbone", "resnet18_v2",
                               "--batch-size", "3", "--shard-size", "7", "--quiet"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert ("3 streams side by side" in done.stdout) == (streams == "3"), done.stdout
        assert "take turns" not in done.stderr
        stores[streams] = FeatureStore(out)
    x1, _, ids1 = stores["1"].load()
    x3, _, ids3 = stores["3"].load()
    assert list(ids3) == list(ids1) and stores["3"].manifest["timing"]["streams"] == 3
    np.testing.assert_allclose(x3, x1, rtol=0, atol=1e-5 * np.abs(x1).max())


def test_stream_copies_share_the_weights_and_compute_the_same(small_store):
    from mxvision.features.extract import load_extractor, stream_copies

    info = dict(small_store.manifest, features_dir=str(small_store.path))
    net, _ = load_extractor(info, ctx="cpu", fp32_weights_file=small_store.path / "backbone.params")
    net.hybridize(static_alloc=True, static_shape=True)
    rng = np.random.default_rng(0)
    xs = [mx.nd.array(rng.normal(size=(2, 3, 128, 128)).astype("float32")) for _ in range(3)]
    alone = [net(x).asnumpy() for x in xs]
    copies = stream_copies(net, 3)
    assert len(copies) == 3 and copies[0] is net
    assert len({id(c) for c in copies}) == 3  # three networks, so the engine can run three at once
    mine = net.collect_params()
    for copy in copies[1:]:
        theirs = copy.collect_params()
        assert sorted(theirs.keys()) == sorted(mine.keys())
        assert all(theirs[name] is mine[name] for name in mine.keys())  # the same arrays, not copies
    outs = [c(x) for c, x in zip(copies, xs)]  # queued together, each its own input and memory
    for out, want in zip(outs, alone):
        np.testing.assert_array_equal(out.asnumpy(), want)


@pytest.mark.parametrize("value", ["0", "two", "-1", "65", "²"])
def test_a_bad_stream_count_is_one_line(synth_index, tmp_path, value):
    import subprocess
    import sys

    env = dict(os.environ, MXVISION_STREAMS=value)
    done = subprocess.run([sys.executable, "-m", "mxvision", "extract", "--index", str(synth_index), "--out",
                           str(tmp_path / "f"), "--weights", "none", "--backbone", "resnet18_v2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mxvision: error: MXVISION_STREAMS: expected a whole number"), lines
    assert not (tmp_path / "f").exists()
