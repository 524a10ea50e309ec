"""The calibrated INT8 network is cached once for every feature store (mxvision.features.quantize):
by default in the user's cache folder, one calibration for concurrent extractions of one key, a
damaged entry converted again, an unwritable cache warned about and done without."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from mxvision.features import quantize
from mxvision.features.extract import FeatureStore, extract_features
from mxvision.io.download import locked_file
from mxvision.utils import file_digest
from support.jsrt_films import small_jsrt_index

SYMBOL, PARAMS, INFO = quantize.file_names("int8")
#: The same extraction as the CLI line below (its default calibration: a seeded sample of the
#: extracted images), so the API and the command line make the same cache key.
EXTRACT = dict(backbone="resnet18_v2", weights="none", ctx="cpu", batch_size=8, shard_size=8,
               progress=False, dtype="int8")


def cli_extract(index, out):
    return [sys.executable, "-m", "mxvision", "-v", "extract", "--index", str(index), "--out", str(out),
            "--backbone", "resnet18_v2", "--weights", "none", "--ctx", "cpu", "--batch-size", "8",
            "--shard-size", "8", "--dtype", "int8", "--quiet"]


@pytest.fixture(scope="module")
def first(synth_index, tmp_path_factory):
    """An INT8 extraction with MXVISION_CACHE unset: it calibrates and caches in XDG_CACHE_HOME."""
    xdg = tmp_path_factory.mktemp("xdg")
    mp = pytest.MonkeyPatch()
    mp.delenv("MXVISION_CACHE")
    mp.setenv("XDG_CACHE_HOME", str(xdg))
    try:
        store = extract_features(synth_index, tmp_path_factory.mktemp("first"), **EXTRACT)
    finally:
        mp.undo()
    return store, xdg / "mxvision" / "quantized"


def digests(folder):
    return {name: file_digest(os.path.join(folder, name), "sha1") for name in (SYMBOL, PARAMS)}


def leftovers(root):
    """Lock files and temporary folders in the cache root (a finished run leaves none)."""
    return sorted(n for n in os.listdir(root) if n.startswith("."))


def test_int8_is_cached_by_default_in_the_user_cache_and_a_new_store_reuses_it(first, synth_index, tmp_path,
                                                                                 monkeypatch, caplog):
    store, root = first
    precision = store.manifest["precision"]
    entry = root / precision["key"]
    assert precision["cache"] == "stored" and precision["cache_entry"] == str(entry)
    assert sorted(os.listdir(entry)) == sorted([SYMBOL, PARAMS, INFO]) and leftovers(root) == []
    assert digests(entry) == digests(store.path)
    record = json.loads((entry / INFO).read_text())
    assert record["preprocessing"]["name"] == "imagenet224" and record["calibration"]["n_images"] > 0

    monkeypatch.delenv("MXVISION_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(root.parent.parent))
    caplog.set_level("INFO", logger="mxvision.features.quantize")
    again = extract_features(synth_index, tmp_path / "again", **EXTRACT)
    assert again.manifest["precision"]["cache"] == "hit" and again.manifest["precision"]["key"] == precision["key"]
    assert "calibration on" not in caplog.text and f"using the cached int8 backbone {entry}" in caplog.text
    assert digests(again.path) == digests(entry)
    np.testing.assert_array_equal(again.load()[0], store.load()[0])
    first_s, second_s = store.manifest["timing"]["setup_seconds"], again.manifest["timing"]["setup_seconds"]
    print(f"setup_seconds: calibrating {first_s}, from the cache {second_s}")
    assert second_s < first_s

    # the store itself is looked at first: a resumed run neither copies nor calibrates
    resumed = extract_features(synth_index, tmp_path / "again", **EXTRACT)
    assert resumed.manifest["precision"]["cache"] == "store"


def test_concurrent_extractions_of_one_key_calibrate_once(first, synth_index, tmp_path):
    """Two `mxvision extract --dtype int8` processes on an empty cache: both find the key's lock
    taken (here by the test, so that neither can finish before the other has started), then one
    calibrates and installs the entry while the other waits, and the other copies it."""
    key = first[0].manifest["precision"]["key"]
    cache = tmp_path / "cache"
    root = cache / "quantized"
    root.mkdir(parents=True)
    env = dict(os.environ, MXVISION_CACHE=str(cache))
    lock = root / f".{key}.lock"
    logs = [tmp_path / f"{n}.err" for n in (1, 2)]
    procs = []
    try:
        with locked_file(lock):
            for n, log in enumerate(logs, 1):
                with open(log, "w") as err:
                    procs.append(subprocess.Popen(cli_extract(synth_index, tmp_path / f"store{n}"), env=env,
                                                  stdout=subprocess.DEVNULL, stderr=err))
            deadline = time.monotonic() + 600
            while not all("waiting for another process converting the int8 backbone" in log.read_text()
                          for log in logs):
                assert time.monotonic() < deadline, [log.read_text()[-2000:] for log in logs]
                assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
                time.sleep(0.2)
            os.unlink(lock)  # released the way holders release it (see locked_file)
        for p, log in zip(procs, logs):
            assert p.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    assert sum("INT8 calibration on" in t for t in texts) == 1, texts
    stores = [FeatureStore(tmp_path / f"store{n}") for n in (1, 2)]
    assert sorted(s.manifest["precision"]["cache"] for s in stores) == ["hit", "stored"]
    assert digests(stores[0].path) == digests(stores[1].path) == digests(root / key)
    assert leftovers(root) == []


def test_a_damaged_or_partial_cache_entry_is_converted_again(first, synth_index, tmp_path, monkeypatch, caplog):
    store, root = first
    key = store.manifest["precision"]["key"]
    cache = tmp_path / "cache"
    shutil.copytree(root, cache / "quantized")
    entry = cache / "quantized" / key
    partial = tmp_path / "partial"
    shutil.copytree(entry, partial)
    (partial / PARAMS).unlink()
    assert quantize.find(partial, "int8", key) is None  # a partial entry is not used
    params = entry / PARAMS
    data = bytearray(params.read_bytes())
    data[len(data) // 2] ^= 0xFF
    params.write_bytes(bytes(data))  # same size, one byte changed: only the sha1 tells
    assert quantize.find(entry, "int8", key) is None

    monkeypatch.setenv("MXVISION_CACHE", str(cache))
    caplog.set_level("INFO", logger="mxvision.features.quantize")
    again = extract_features(synth_index, tmp_path / "again", **EXTRACT)
    assert f"the cached int8 backbone {entry} is damaged" in caplog.text and "calibration on" in caplog.text
    assert again.manifest["precision"]["cache"] == "stored"
    assert quantize.find(entry, "int8", key) is not None  # replaced by an intact entry
    assert digests(entry) == digests(again.path)
    assert leftovers(cache / "quantized") == []
    x, _, _ = again.load()
    assert np.corrcoef(x.ravel(), store.load()[0].ravel())[0, 1] > 0.999


def test_an_unwritable_cache_is_warned_about_once_and_extraction_goes_on(synth_index, tmp_path, monkeypatch,
                                                                         caplog):
    blocker = tmp_path / "a-file"  # a file where the cache folder should be: unwritable even for root
    blocker.write_text("not a folder")
    monkeypatch.setenv("MXVISION_CACHE", str(blocker))
    with caplog.at_level("WARNING"):
        store = extract_features(synth_index, tmp_path / "store", **EXTRACT)
    assert store.manifest["complete"] and store.manifest["precision"]["cache"] == "off"
    warnings = [r.getMessage() for r in caplog.records if "cannot write the cache folder" in r.getMessage()]
    assert len(warnings) == 1 and str(blocker / "quantized") in warnings[0], caplog.text
    assert "\n" not in warnings[0] and "set MXVISION_CACHE" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        quantize.warn_unwritable(blocker / "quantized", "again")  # the next store: no second warning
    assert caplog.text == ""
    assert blocker.read_text() == "not a folder"


def test_a_second_int8_extract_of_real_films_reuses_the_calibration(shared, tmp_path):
    """The issue's check, on 12 JSRT films with the Xvision trunk (resnet50_v2 to
    stage4_unit2_relu1): the second `mxvision extract --dtype int8` into a new folder takes the
    calibrated network from the user cache (XDG_CACHE_HOME here) instead of calibrating again.
    setup_seconds is recorded and printed; that it is under 5 s is measured in
    docs/BENCHMARKS.md, not asserted (a loaded machine would make that flaky)."""
    index = small_jsrt_index(shared, tmp_path / "jsrt.csv")
    env = {k: v for k, v in os.environ.items() if k != "MXVISION_CACHE"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    manifests = []
    for run in ("first", "second"):
        cmd = [sys.executable, "-m", "mxvision", "extract", "--index", str(index), "--out", str(tmp_path / run),
               "--backbone", "resnet50_v2", "--weights", "none", "--ctx", "cpu", "--dtype", "int8", "--quiet"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stderr[-3000:]
        manifests.append(FeatureStore(tmp_path / run).manifest)
        # the calibration chosen, and the held-out error it was chosen by, are printed
        calib = manifests[-1]["precision"]["calibration"]
        assert f"INT8: {calib['chosen']} calibration on {calib['calibrated_on']} films, chosen on " in r.stdout
    first_m, second_m = manifests
    key = first_m["precision"]["key"]
    assert [m["precision"]["cache"] for m in manifests] == ["stored", "hit"]
    assert second_m["precision"]["key"] == key
    assert first_m["precision"]["cache_entry"] == str(tmp_path / "xdg" / "mxvision" / "quantized" / key)
    assert digests(tmp_path / "first") == digests(tmp_path / "second")
    setup = [m["timing"]["setup_seconds"] for m in manifests]
    print(f"JSRT, 12 films, resnet50_v2 INT8: setup_seconds first {setup[0]}, second {setup[1]}")
    assert setup[1] < setup[0]
