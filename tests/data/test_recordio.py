"""RecordIO packs: what goes in comes back out (up to uint8 rounding), resumably, thread-safely."""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mxvision.data import transforms
from mxvision.data.dataset import XrayDataset
from mxvision.data.index import Index, read_index, write_index
from mxvision.errors import BadImage, BadRun
from mxvision.data import record_reader, recordio

TOL = 0.5 / 255 / 0.224 * 1.001  # uint8 rounding after ImageNet normalisation (min std)


@pytest.fixture(scope="module")
def packed(synth_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "synth.rec"
    manifest = recordio.pack_index(synth_index, out, progress=False)
    return out, manifest


def test_round_trip_matches_the_file_route(packed, synth_index):
    out, manifest = packed
    index = read_index(synth_index)
    packed_index = read_index(str(out)[:-4] + ".csv")
    assert manifest["count"] == len(index) == len(packed_index)
    assert packed_index.labels == index.labels and packed_index.splits == index.splits
    assert packed_index.patient_ids == index.patient_ids
    assert packed_index.column("source_path") == index.paths
    src = record_reader.open_source(out)
    for k, (rec_path, path, label_id) in enumerate(zip(packed_index.paths, index.paths,
                                                       index.label_ids)):
        assert record_reader.split_record_path(rec_path) == (str(out), k)
        a = record_reader.load_image(rec_path, "imagenet224")
        b = transforms.load_image(path, "imagenet224")
        assert a.shape == b.shape == (3, 224, 224) and a.dtype == np.float32
        assert np.abs(a - b).max() <= TOL
        header, img = src.read(k)
        assert header.label == label_id and header.id == k and img.dtype == np.uint8
    # another preset of the same size reads the same pack
    assert record_reader.load_image(packed_index.paths[0], "xrv224").shape == (1, 224, 224)
    # a plain path goes to the file route unchanged
    assert np.array_equal(record_reader.load_image(index.paths[0]),
                          transforms.load_image(index.paths[0]))


def test_encodings_agree(packed, synth_index, tmp_path):
    out, _ = packed
    raw = tmp_path / "raw.rec"
    recordio.pack_index(synth_index, raw, encoding="raw", progress=False)
    a, b = record_reader.open_source(out), record_reader.open_source(raw)
    for k in range(len(a)):
        assert np.array_equal(a.read(k)[1], b.read(k)[1])  # png is lossless on uint8
    jpg = tmp_path / "jpg.rec"
    recordio.pack_index(synth_index, jpg, encoding="jpg", progress=False)
    c = record_reader.open_source(jpg)
    assert np.abs(c.image(0) - a.image(0)).mean() < 0.01


def test_concurrent_reads_agree(packed):
    out, _ = packed
    src = record_reader.open_source(out)
    alone = [src.load(k) for k in src.keys]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(src.load, src.keys * 3))
    for k, img in enumerate(together):
        assert np.array_equal(img, alone[k % len(alone)])


def test_mistakes(packed, synth_index, tmp_path, monkeypatch):
    out, _ = packed
    with pytest.raises(BadImage, match="needs 512"):
        record_reader.load_image(f"{out}#0", "xrv512")
    with pytest.raises(BadImage, match="no such record"):
        record_reader.load_image(f"{out}#999", "imagenet224")
    with pytest.raises(BadImage, match="no such RecordIO pack"):
        record_reader.load_image(f"{tmp_path / 'nope.rec'}#0")
    with pytest.raises(BadRun, match="NAME.rec"):
        recordio.pack_index(synth_index, tmp_path / "x.bin", progress=False)
    with pytest.raises(BadRun, match="another pack"):
        recordio.pack_index(synth_index, out, preset="xrv512", progress=False)
    # the pack's own index (NAME.csv) must never replace the index being packed
    own = tmp_path / "mine.csv"
    own.write_bytes(open(synth_index, "rb").read())
    with pytest.raises(BadRun, match="is the index being packed"):
        recordio.pack_index(own, tmp_path / "mine.rec", progress=False)
    assert own.read_bytes() == open(synth_index, "rb").read()
    assert not (tmp_path / "mine.rec").exists()
    # a finished pack of the same index is not redone
    monkeypatch.setattr(recordio, "prepare_record", lambda *a: pytest.fail("recomputed"))
    assert recordio.pack_index(synth_index, out, progress=False)["count"] == 24


def test_unreadable_images_are_skipped_or_fatal(synth_index, tmp_path):
    index = read_index(synth_index)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    records = index.records()
    records[3]["path"] = str(bad)
    broken = Index(records, index.root, columns=index.columns)
    manifest = recordio.pack_index(broken, tmp_path / "b.rec", progress=False)
    assert manifest["count"] == 23 and [s["row"] for s in manifest["skipped"]] == [3]
    assert "broken.png" in manifest["skipped"][0]["problem"]
    assert len(read_index(tmp_path / "b.csv")) == 23
    with pytest.raises(BadImage, match="broken.png"):
        recordio.pack_index(broken, tmp_path / "s.rec", strict=True, progress=False)


def test_interrupted_pack_resumes_without_redoing_records(synth_index, tmp_path, monkeypatch):
    real = recordio.prepare_record
    calls = []

    def dies_after_ten(path, size, encoding):
        calls.append(path)
        if len(calls) > 10:
            raise KeyboardInterrupt
        return real(path, size, encoding)

    out = tmp_path / "r.rec"
    monkeypatch.setattr(recordio, "prepare_record", dies_after_ten)
    with pytest.raises(KeyboardInterrupt):
        recordio.pack_index(synth_index, out, workers=1, progress=False)
    assert not (tmp_path / "r.json").exists() and (tmp_path / "r.rec.part").exists()
    with pytest.raises(BadImage, match="unfinished pack"):
        record_reader.load_image(f"{out}#0")
    calls.clear()
    monkeypatch.setattr(recordio, "prepare_record", lambda *a: (calls.append(a[0]), real(*a))[1])
    manifest = recordio.pack_index(synth_index, out, workers=1, progress=False)
    assert manifest["count"] == 24 and len(calls) == 24 - 10
    assert sorted(os.listdir(tmp_path)) == ["r.csv", "r.idx", "r.json", "r.rec"]
    fresh = tmp_path / "fresh" / "f.rec"
    recordio.pack_index(synth_index, fresh, progress=False)
    a, b = record_reader.open_source(out), record_reader.open_source(fresh)
    for k in range(24):
        assert np.array_equal(a.read(k)[1], b.read(k)[1])


def test_pathology_vectors_travel_in_the_header(synth_index, tmp_path):
    index = read_index(synth_index)
    ds = XrayDataset.from_index(index).relabel(["Nodule", "Mass"])
    multi = ds.to_index(task="pathologies", views="all")
    write_index(multi, tmp_path / "multi.csv")
    manifest = recordio.pack_index(tmp_path / "multi.csv", tmp_path / "m.rec", progress=False)
    assert manifest["label_kind"] == {"pathologies": ["Nodule", "Mass"]}
    header, _ = record_reader.open_source(tmp_path / "m.rec").read(0)
    assert header.flag == 2 and np.isnan(header.label[1])
    assert header.label[0] == (1.0 if read_index(tmp_path / "multi.csv").column("Nodule")[0]
                               == "1" else 0.0)
    json.loads((tmp_path / "m.json").read_text())
