"""JSRT as an index: the real labels.csv from ../shared, plus a made-up folder for the errors."""
import os

import numpy as np
import pytest

from mxvision.data.index import read_index
from mxvision.data.jsrt import jsrt_index, read_jsrt
from mxvision.data.splits import check_no_patient_leak, split_counts
from mxvision.errors import BadIndex


@pytest.fixture(scope="module")
def jsrt_root(shared):
    return os.path.join(shared, "data", "jsrt")


def test_read_jsrt(jsrt_root):
    index = read_jsrt(jsrt_root)
    assert len(index) == 154
    assert index.classes == ["normal", "nodule"]
    assert index.labels.count("nodule") == 96 and index.labels.count("normal") == 58
    assert index.missing() == []
    assert set(index.views) == {"PA"}
    assert len(set(index.patient_ids)) == 154
    assert all(i.startswith("images/JPC") for i in index.ids)
    # nodule files are JPCLN*, normals JPCNN*
    assert all((lab == "nodule") == ("JPCLN" in p) for p, lab in zip(index.paths, index.labels))
    for column in ("nodule_subtlety_1to5", "nodule_size_mm", "nodule_x_512", "nodule_y_512",
                   "diagnosis"):
        assert column in index.columns
    xs = [float(x) for x, lab in zip(index.column("nodule_x_512"), index.labels) if lab == "nodule"]
    assert len(xs) == 96 and 0 < min(xs) and max(xs) < 512
    assert all(x == "" for x, lab in zip(index.column("nodule_x_512"), index.labels)
               if lab == "normal")


def test_jsrt_index_is_split_by_patient_and_round_trips(jsrt_root, tmp_path):
    out = tmp_path / "jsrt.csv"
    index = jsrt_index(jsrt_root, out, seed=0)
    check_no_patient_leak(index)
    counts = split_counts(index)
    assert set(counts) == {"train", "val", "test"}
    for split in ("val", "test"):
        n = sum(counts[split].values())
        assert 18 <= n <= 28
        assert abs(counts[split]["nodule"] / n - 96 / 154) < 0.08
    again = read_index(out, check_files=True)
    assert again.records() == index.records() and again.columns == index.columns
    assert again.splits == index.splits
    other = jsrt_index(jsrt_root, tmp_path / "seed1.csv", seed=1)
    assert other.splits != index.splits
    assert jsrt_index(jsrt_root, tmp_path / "seed0.csv", seed=0).splits == index.splits


def _fake_jsrt(root, rows, header="filename,label,patient_id,nodule_x_512"):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(os.path.join(root, "labels.csv"), "w", encoding="utf-8") as f:
        f.write(header + "\n" + "".join(r + "\n" for r in rows))
    return str(root)


def test_read_jsrt_errors(tmp_path):
    with pytest.raises(BadIndex, match=r"labels\.csv: no such file"):
        read_jsrt(tmp_path)
    root = _fake_jsrt(tmp_path / "a", ["A.png,nodule,A,10"], header="file,label,patient_id,x")
    with pytest.raises(BadIndex, match="missing column.s. filename"):
        read_jsrt(root)
    root = _fake_jsrt(tmp_path / "b", ["A.png,nodule,A,10", "B.png,abnormal,B,"])
    with pytest.raises(BadIndex, match="line 3: label 'abnormal'"):
        read_jsrt(root)
    root = _fake_jsrt(tmp_path / "c", ["A.png,nodule,A,10", "B.png,normal,B,"])
    with pytest.raises(BadIndex, match=r"2 of 2 listed images missing, first: .*A\.png"):
        read_jsrt(root)
    index = read_jsrt(root, check_files=False)
    assert index.ids == ["images/A.png", "images/B.png"]
    assert index.label_ids.tolist() == [1, 0]
    assert np.array_equal(index.column("nodule_x_512"), ["10", ""])
