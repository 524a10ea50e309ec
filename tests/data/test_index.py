"""The index CSV contract: reading, validation, writing, and the class-per-folder layout."""
import os

import numpy as np
import pytest

from mxvision.data.folder import index_from_folder
from mxvision.data.index import Index, read_index, write_index
from mxvision.errors import BadIndex


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x")
    return str(path)


def _write(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


@pytest.fixture
def dataset(tmp_path):
    """A folder with three images and an index mixing relative and absolute paths."""
    data = tmp_path / "data"
    _touch(data / "img" / "a.png")
    _touch(data / "img" / "b.png")
    outside = _touch(tmp_path / "elsewhere" / "c.png")
    csv_path = _write(data / "index.csv",
                      "path,label,patient_id,split,view,subtlety\n"
                      "img/a.png,normal,P1,train,PA,\n"
                      "img/b.png,nodule,,test,,4\n"
                      f"{outside},nodule,P3,,LL,2\n")
    return data, csv_path, outside


def test_read_resolves_paths_and_keeps_extra_columns(dataset):
    data, csv_path, outside = dataset
    index = read_index(csv_path, check_files=True)
    assert len(index) == 3
    assert index.paths == [str(data / "img" / "a.png"), str(data / "img" / "b.png"), outside]
    assert index.labels == ["normal", "nodule", "nodule"]
    assert index.classes == ["normal", "nodule"]
    assert index.label_ids.tolist() == [0, 1, 1]
    assert index.patient_ids == ["P1", "b", "P3"]  # missing patient -> file stem
    assert index.splits == ["train", "test", ""]
    assert index.views == ["PA", "", "LL"]
    assert index.ids[:2] == ["img/a.png", "img/b.png"]
    assert index.column("subtlety") == ["", "4", "2"]
    assert index.columns == ("path", "label", "patient_id", "split", "view", "subtlety")


def test_optional_columns_default_when_absent(tmp_path):
    csv_path = _write(tmp_path / "i.csv", "label,path\ncat,x/1.png\ndog,x/2.png\nbird,y/3.png\n")
    index = read_index(csv_path)
    assert index.classes == ["bird", "cat", "dog"]  # not Xvision labels: sorted
    assert index.label_ids.tolist() == [1, 2, 0]
    assert index.patient_ids == ["1", "2", "3"]
    assert index.splits == ["", "", ""] and index.views == ["", "", ""]
    assert index.missing() == index.paths


def test_header_with_bom_and_blank_lines(tmp_path):
    path = tmp_path / "i.csv"
    path.write_bytes("\ufeffpath,label\r\na.png,normal\r\n\r\nb.png,nodule\r\n".encode("utf-8"))
    index = read_index(path)
    assert index.labels == ["normal", "nodule"]


@pytest.mark.parametrize("text, problem", [
    ("", "empty file"),
    ("a.png,normal\nb.png,nodule\n", "line 1: missing column(s) path, label"),
    ("path,labels\na.png,normal\n", "line 1: missing column(s) label"),
    ("path,label,label\na.png,normal,x\n", "line 1: duplicate column(s) label"),
    ("path,label\n", "no images listed"),
    ("path,label\na.png,normal\nb.png,\n", "line 3: empty label"),
    ("path,label\na.png,normal\n,nodule\n", "line 3: empty path"),
    ("path,label,split\na.png,normal,train\nb.png,nodule,Test\n", "line 3: split 'Test'"),
    ("path,label\na.png,normal\nb.png,nodule\nsub/../a.png,nodule\n",
     "line 4: duplicate path"),
    ("path,label\na.png,normal\nb.png,nodule,extra\n", "line 3: 3 fields, the header has 2"),
])
def test_malformed_index_names_file_and_line(tmp_path, text, problem):
    csv_path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(BadIndex) as err:
        read_index(csv_path)
    message = str(err.value)
    assert message.startswith(f"{csv_path}: ")
    assert problem in message
    assert "\n" not in message


def test_duplicate_message_names_both_lines(tmp_path):
    csv_path = _write(tmp_path / "i.csv",
                      f"path,label\na.png,normal\n{tmp_path / 'a.png'},nodule\n")
    with pytest.raises(BadIndex, match=r"line 3: duplicate path .*a\.png \(also on line 2\)"):
        read_index(csv_path)


def test_missing_files_are_reported(dataset, tmp_path):
    data, csv_path, outside = dataset
    os.remove(data / "img" / "b.png")
    os.remove(outside)
    index = read_index(csv_path)  # check_files is off by default
    assert index.missing() == [str(data / "img" / "b.png"), outside]
    with pytest.raises(BadIndex, match=r"2 of 3 image files missing, first: .*img[/\\]b\.png$"):
        read_index(csv_path, check_files=True)


def test_missing_csv_and_folder_given(tmp_path):
    with pytest.raises(BadIndex, match="no such index CSV"):
        read_index(tmp_path / "nope.csv")
    with pytest.raises(BadIndex, match="is a folder"):
        read_index(tmp_path)


def test_write_read_round_trip(dataset, tmp_path):
    data, csv_path, outside = dataset
    index = read_index(csv_path)
    out = data / "copy.csv"
    assert write_index(index, out) == str(out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path,label,patient_id,split,view,subtlety"
    assert lines[1].startswith("img/a.png,")  # inside the folder: relative
    assert lines[3].startswith(outside + ",")  # outside: absolute
    again = read_index(out)
    assert again.records() == index.records()
    assert again.columns == index.columns and again.ids == index.ids
    # written elsewhere, the paths still point at the same files
    moved = read_index(write_index(index, tmp_path / "other" / "index.csv"))
    assert moved.paths == index.paths
    assert sorted(os.listdir(data)) == ["copy.csv", "img", "index.csv"]  # no temp files left


def test_write_replaces_existing_file(dataset):
    data, csv_path, _ = dataset
    index = read_index(csv_path)
    write_index(index.subset("train"), csv_path)
    assert read_index(csv_path).ids == ["img/a.png"]


def test_subset_keeps_class_order():
    index = Index([{"path": "a.png", "label": "normal", "split": "train"},
                   {"path": "b.png", "label": "nodule", "split": "test"},
                   {"path": "c.png", "label": "nodule", "split": "train"}], "/data")
    test = index.subset("test")
    assert test.labels == ["nodule"] and test.label_ids.tolist() == [1]
    assert index.subset("train").ids == ["a.png", "c.png"]
    assert len(index.subset("val")) == 0
    with pytest.raises(ValueError):
        index.subset("training")


def test_with_column_and_select_return_new_indexes():
    records = [{"path": f"{i}.png", "label": "normal" if i % 2 else "nodule"} for i in range(4)]
    index = Index(records, "/data")
    tagged = index.with_column("split", ["train", "val", "test", ""])
    assert tagged.splits == ["train", "val", "test", ""] and index.splits == ["", "", "", ""]
    assert tagged.select(np.array([False, True, True, False])).ids == ["1.png", "2.png"]
    with pytest.raises(BadIndex, match="split 'dev'"):
        index.with_column("split", ["dev"] * 4)


def test_classes_can_be_fixed_and_unknown_labels_refused(tmp_path):
    csv_path = _write(tmp_path / "i.csv", "path,label\na.png,nodule\nb.png,other\n")
    assert read_index(csv_path, classes=["other", "nodule"]).label_ids.tolist() == [1, 0]
    with pytest.raises(BadIndex, match="label.s. other not among the classes normal, nodule"):
        read_index(csv_path, classes=["normal", "nodule"])


def test_index_from_folder(tmp_path):
    root = tmp_path / "xrays"
    _touch(root / "normal" / "n2.PNG")
    _touch(root / "normal" / "n1.png")
    _touch(root / "nodule" / "k1.jpeg")
    _touch(root / "nodule" / "k2.dcm")
    _touch(root / "nodule" / "notes.txt")
    _touch(root / "nodule" / ".hidden.png")
    _touch(root / ".cache" / "x.png")
    index = index_from_folder(root)
    # sorted by folder then file name; label ids in the Xvision order
    assert index.ids == ["nodule/k1.jpeg", "nodule/k2.dcm", "normal/n1.png", "normal/n2.PNG"]
    assert index.labels == ["nodule", "nodule", "normal", "normal"]
    assert index.label_ids.tolist() == [1, 1, 0, 0]
    assert index.patient_ids == ["k1", "k2", "n1", "n2"]
    assert index.missing() == []
    assert read_index(write_index(index, root / "index.csv")).ids == index.ids


def test_index_from_folder_errors(tmp_path):
    with pytest.raises(BadIndex, match="no such folder"):
        index_from_folder(tmp_path / "absent")
    _touch(tmp_path / "flat" / "a.png")
    with pytest.raises(BadIndex, match="no class sub-folders"):
        index_from_folder(tmp_path / "flat")
    _touch(tmp_path / "tree" / "normal" / "a.png")
    _touch(tmp_path / "tree" / "nodule" / "readme.txt")
    with pytest.raises(BadIndex, match=r"tree[/\\]nodule: class folder has no images"):
        index_from_folder(tmp_path / "tree")


def test_an_index_with_200000_columns_is_read_in_linear_time(tmp_path):
    """Column bookkeeping was quadratic: 200,000 header columns (2.7 MB) took two minutes; a
    duplicate among them must still be found."""
    import time

    columns = 200_000
    header = "path,label," + ",".join(f"c{i}" for i in range(columns))
    rows = "".join(f"/data/{i}.png,nodule" + "," * columns + "\n" for i in range(6))
    (tmp_path / "wide.csv").write_text(header + "\n" + rows)
    tic = time.monotonic()
    index = read_index(tmp_path / "wide.csv")
    assert time.monotonic() - tic < 10
    assert len(index) == 6 and len(index.columns) == columns + 2
    (tmp_path / "dup.csv").write_text(header + ",c7\n" + rows.replace("\n", ",\n"))
    tic = time.monotonic()
    with pytest.raises(BadIndex, match="duplicate column.s. c7"):
        read_index(tmp_path / "dup.csv")
    assert time.monotonic() - tic < 10
