"""mxvision.features.cache: the entries of the user cache folders, listed and deleted."""
import json
import os

import pytest

from mxvision.errors import MxvisionError
from mxvision.features import cache, quantize
from support.cache_entries import KEY, XRV_NAME, fill_cache


@pytest.fixture
def filled(tmp_path, monkeypatch):
    monkeypatch.setenv("MXVISION_CACHE", str(tmp_path))
    return fill_cache(tmp_path)


def test_every_entry_is_listed_with_what_it_was_made_from(filled, tmp_path):
    entries = cache.list_entries()
    assert [(e.kind, e.name) for e in entries] == [
        ("quantized", KEY), ("incomplete", "cd" * 20), ("converted", XRV_NAME), ("downloaded", "resnet18_v2")]
    network, incomplete, converted, downloaded = entries
    assert network.paths == (filled["quantized"],) and network.label == "quantized network"
    assert network.size == sum(os.path.getsize(os.path.join(filled["quantized"], n))
                               for n in os.listdir(filled["quantized"]))
    assert network.created == "2026-12-06T01:02:03"
    assert network.made_from.startswith("resnet50_v2 cut stage4_unit2_relu1 (weights sha1 c0ffeec0), "
                                        "preset imagenet224, int8 calibrated (entropy) on 64 images")
    assert incomplete.size == 1000 and "interrupted" in incomplete.made_from
    assert converted.paths == filled["converted"] and converted.label == "converted weights"
    assert "torchxrayvision nih-pc-chex" in converted.made_from and "(densenet121, 224 px)" in converted.made_from
    assert converted.created == "2026-12-05T10:00:00"
    assert downloaded.size == 5000 and "pinned by the weights store" in downloaded.made_from
    assert [e.group for e in entries] == ["quantized", "quantized", "weights", "weights"]
    assert [e.name for e in cache.list_entries(["weights"])] == [XRV_NAME, "resnet18_v2"]
    assert cache.folders() == {"quantized": tmp_path / "quantized", "weights": tmp_path / "models"}
    assert quantize.find(filled["quantized"], "int8", KEY) is not None  # written as mxvision writes it


def test_clear_deletes_only_the_entries_of_the_kinds_asked_for(filled):
    done = cache.clear(["quantized"])
    assert [e.name for e in done.removed] == [KEY, "cd" * 20] and done.failed == []
    assert done.freed == sum(e.size for e in done.removed) > 1000
    assert not os.path.exists(filled["quantized"]) and not os.path.exists(filled["incomplete"])
    assert os.path.exists(filled["lock"])  # a lock is its holder's to remove
    assert all(os.path.exists(p) for p in (*filled["converted"], filled["downloaded"]))
    done = cache.clear(["weights"])
    assert len(done.removed) == 2 and not any(os.path.exists(p) for p in (*filled["converted"], filled["downloaded"]))
    assert open(filled["other"]).read() == "mine"
    assert cache.list_entries() == [] and cache.clear().removed == []


def test_damaged_records_and_missing_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("MXVISION_CACHE", str(tmp_path / "nothing-yet"))
    assert cache.list_entries() == []
    monkeypatch.setenv("MXVISION_CACHE", str(tmp_path))
    broken = tmp_path / "quantized" / ("ef" * 20)
    broken.mkdir(parents=True)
    (broken / "backbone-int8.json").write_text("{")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "x.xrv.json").write_text("[1]")
    entries = cache.list_entries()
    assert [e.made_from for e in entries] == ["no readable record (converted again when needed)",
                                               "unreadable sidecar (converted again when needed)"]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("MXVISION_CACHE", str(blocker))
    with pytest.raises(MxvisionError, match="cannot read the cache folder"):
        cache.list_entries(["weights"])
    with pytest.raises(MxvisionError, match="expected some of quantized, weights"):
        cache.list_entries(["models"])


@pytest.mark.parametrize("calibration, says", [
    # since conversion version 8: the calibration chosen on held-out images, and how many calibrated
    ({"mode": "agreement", "chosen": "p99.99", "calibrated_on": 32, "checked_on": 32, "n_images": 64},
     "calibrated (p99.99, chosen by agreement with float32 on 32 other images) on 32 images"),
    # too few images to hold any out: nothing was chosen
    ({"mode": "agreement", "chosen": "entropy", "calibrated_on": 3, "checked_on": 0, "n_images": 3},
     "calibrated (entropy) on 3 images"),
    # a damaged record is described, not a crash
    ({"mode": "agreement", "chosen": 7, "checked_on": 2}, "calibrated (7, chosen by agreement"),
    # since conversion version 9: ReLUs unfused for this CPU kind's kernels
    ({"mode": "agreement", "chosen": "p99.99", "calibrated_on": 32, "checked_on": 32, "relu_unfused": 14},
     "on 32 images, 14 ReLUs unfused for AVX-512 VNNI without AMX, MXNet"),
    ({"mode": "agreement", "chosen": "p99.99", "calibrated_on": 32, "checked_on": 32, "relu_unfused": 0},
     "on 32 images, MXNet"),
])
def test_a_quantized_entry_says_which_calibration_it_holds(tmp_path, monkeypatch, calibration, says):
    monkeypatch.setenv("MXVISION_CACHE", str(tmp_path))
    entry = tmp_path / "quantized" / KEY
    entry.mkdir(parents=True)
    (entry / "backbone-int8.json").write_text(json.dumps({"key": KEY, "dtype": "int8", "calibration": calibration}))
    (made_from,) = [e.made_from for e in cache.list_entries(["quantized"])]
    assert says in made_from, made_from


def test_human_size():
    assert [cache.human_size(n) for n in (0, 999, 1000, 56_450_231, 2_500_000_000)] == [
        "0 B", "999 B", "1.0 kB", "56.5 MB", "2.5 GB"]
