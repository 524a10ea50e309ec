"""Labels of an index CSV: blanks stripped; a missing value written as text and two spellings of one
class are refused naming the line, never turned into extra classes (mxvision/data/index.py)."""
import os
import re

import pytest

from support.cli import run_cli
from mxvision.data.index import Index, read_index
from mxvision.errors import BadIndex


def write_csv(folder, rows, name="index.csv"):
    path = folder / name
    path.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows), encoding="utf-8")
    return path


def test_blanks_around_labels_are_stripped(tmp_path):
    index = read_index(write_csv(tmp_path, [("a.png", " nodule"), ("b.png", "normal  "), ("c.png", "\tnodule")]))
    assert index.labels == ["nodule", "normal", "nodule"] and index.classes == ["normal", "nodule"]


@pytest.mark.parametrize("first, second", [("nodule", "Nodule"), ("Normal", "NORMAL"), ("Effusion", "effusion")])
def test_labels_differing_only_in_case_are_refused_naming_both_and_the_line(tmp_path, first, second):
    csv_path = write_csv(tmp_path, [("a.png", first), ("b.png", "other"), ("c.png", second)])
    with pytest.raises(BadIndex) as err:
        read_index(csv_path)
    message = str(err.value)
    assert message.startswith(f"{csv_path}: line 4: ") and "\n" not in message
    assert repr(first) in message and repr(second) in message and "line 2" in message


@pytest.mark.parametrize("label", ["nan", "NaN", "NAN", " nan ", "None", "null", "NULL", "N/A", "NA",
                                   "<NA>", "NaT"])
def test_a_missing_value_written_as_text_is_not_a_class(tmp_path, label):
    """nan was refused, but None (Python), null (JSON), <NA>/NaT (pandas) and NA or N/A
    (spreadsheets) became classes of their own."""
    csv_path = write_csv(tmp_path, [("a.png", "normal"), ("b.png", label)])
    with pytest.raises(BadIndex, match=r"line 3: label '%s' \(a missing value" % re.escape(label.strip())):
        read_index(csv_path)


@pytest.mark.parametrize("label", ["nodule\u200d", "\ufeffnodule", "no\u200bdule"])
def test_a_label_with_an_invisible_character_is_not_a_second_class(tmp_path, label):
    csv_path = write_csv(tmp_path, [("a.png", "nodule"), ("b.png", label)])
    with pytest.raises(BadIndex, match=r"line 3: label .* holds an invisible character \(U\+"):
        read_index(csv_path)


def test_labels_alike_after_unicode_normalisation_are_one_spelling_problem(tmp_path):
    csv_path = write_csv(tmp_path, [("a.png", "Kn\u00f6tchen"), ("b.png", "Kno\u0308tchen")])
    with pytest.raises(BadIndex, match="differs only in Unicode form"):
        read_index(csv_path)
    csv_path = write_csv(tmp_path, [("a.png", "Kn\u00f6tchen"), ("b.png", "No Finding"),
                                    ("c.png", "Pleural_Thickening")])
    assert sorted(read_index(csv_path).classes) == ["Kn\u00f6tchen", "No Finding", "Pleural_Thickening"]


def test_an_index_built_in_memory_is_checked_the_same_way(tmp_path):
    with pytest.raises(BadIndex, match=r"row 2: label 'Nodule' differs only in case from 'nodule' \(row 1\)"):
        Index([{"path": "a.png", "label": "nodule"}, {"path": "b.png", "label": "Nodule"}], tmp_path)
    with pytest.raises(BadIndex, match="row 1: empty label"):
        Index([{"path": "a.png", "label": " "}], tmp_path)


def test_extract_refuses_such_an_index_in_one_line_before_writing(tmp_path):
    csv_path = write_csv(tmp_path, [("a.png", "nodule"), ("b.png", "Nodule")])
    code, out, err = run_cli("extract", "--index", csv_path, "--out", tmp_path / "features",
                             "--backbone", "resnet18_v2", "--weights", "none", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "differs only in case" in err and "line 3" in err, err
    assert sorted(os.listdir(tmp_path)) == ["index.csv"]
