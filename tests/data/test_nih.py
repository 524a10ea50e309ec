"""NIH ChestX-ray14: the official tables (header quirks included) and the real 1,000-image subset."""
import gzip
import json
import os

import cv2
import numpy as np
import pytest

from mxvision.data import nih
from mxvision.data.dataset import XrayDataset
from mxvision.data.index import read_index
from mxvision.data.labels import PATHOLOGIES
from mxvision.data.splits import check_no_patient_leak
from mxvision.errors import BadIndex

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
          "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
ROWS = [
    ("00000001_000.png", "Cardiomegaly", 0, 1, "PA"),
    ("00000001_001.png", "Cardiomegaly|Nodule", 1, 1, "PA"),
    ("00000002_000.png", "No Finding", 0, 2, "PA"),
    ("00000003_000.png", "Nodule", 0, 3, "AP"),
    ("00000004_000.png", "No Finding", 0, 4, "AP"),
    ("00000005_000.png", "Hernia", 0, 5, "PA"),
    ("00000099_000.png", "No Finding", 0, 99, "PA"),  # listed, not on disk
]
BOXES = ("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
         "00000001_001.png,Nodule,225.084745762712,547.019216763771,86.77,79.18\n"
         "00000001_001.png,Cardiomegaly,10,20,30,40\n")


@pytest.fixture
def tiny_nih(tmp_path):
    folder = tmp_path / "nih"
    images = folder / "images_001" / "images"
    images.mkdir(parents=True)
    lines = [HEADER]
    for name, findings, follow, pid, view in ROWS:
        lines.append(f"{name},{findings},{follow},{pid},50,M,{view},2500,2048,0.143,0.143\n")
        if pid != 99:
            cv2.imwrite(str(images / name), np.full((64, 64), 90, np.uint8))
    with gzip.open(folder / "Data_Entry_2017_v2020.csv.gz", "wt") as f:
        f.write("".join(lines))
    (folder / "BBox_List_2017.csv").write_text(BOXES)
    return folder


def test_read_tables_despite_their_headers(tiny_nih):
    rows = nih.read_data_entry(tiny_nih / "Data_Entry_2017_v2020.csv.gz")
    assert rows[0]["patient_id"] == "00000001" and rows[0]["width"] == "2500"
    assert rows[0]["spacing_y"] == "0.143"
    boxes = nih.read_bboxes(tiny_nih / "BBox_List_2017.csv")
    assert boxes["00000001_001.png"][0] == ["Nodule", 225.08, 547.02, 86.77, 79.18]


def test_dataset_labels_views_and_boxes(tiny_nih):
    ds = nih.nih_dataset(tiny_nih / "Data_Entry_2017_v2020.csv.gz", tiny_nih,
                         tiny_nih / "BBox_List_2017.csv")
    assert len(ds) == 6 and ds.missing == 1
    assert ds.pathologies == list(PATHOLOGIES)
    lab = dict(zip(PATHOLOGIES, ds.labels[1]))
    assert lab["Cardiomegaly"] == 1 and lab["Nodule"] == 1 and lab["Mass"] == 0
    assert np.isnan(lab["Lung Opacity"])
    assert list(ds.normal) == [False, False, True, False, True, False]
    assert ds.views == ["PA", "PA", "PA", "AP", "AP", "PA"]
    assert json.loads(ds.table[1]["bboxes"])[1] == ["Cardiomegaly", 10.0, 20.0, 30.0, 40.0]
    assert ds.table[0]["bboxes"] == ""
    relabelled = ds.relabel(["Nodule", "Tuberculosis"])
    assert relabelled.pathologies == ["Nodule", "Tuberculosis"]
    assert relabelled.labels[1, 0] == 1 and np.isnan(relabelled.labels[:, 1]).all()


def test_index_tasks_and_view_filter(tiny_nih, tmp_path):
    entry = tiny_nih / "Data_Entry_2017_v2020.csv.gz"
    index, info = nih.nih_index(entry, tiny_nih, tmp_path / "n.csv")  # views PA by default
    assert info == {"listed": 7, "images_found": 6, "indexed": 2, "patients": 2}
    assert sorted(index.labels) == ["nodule", "normal"]
    index, _ = nih.nih_index(entry, tiny_nih, tmp_path / "n.csv", views="frontal")
    assert sorted(index.labels) == ["nodule", "nodule", "normal", "normal"]
    index, _ = nih.nih_index(entry, tiny_nih, tmp_path / "p.csv", task="pathologies",
                             views="all")
    back = read_index(tmp_path / "p.csv")
    assert back.column("Nodule") == index.column("Nodule")
    assert "Cardiomegaly|Nodule" in back.labels and "Hernia" in back.labels
    assert back.column("Fracture") == [""] * 6
    ds = XrayDataset.from_index(back)
    assert ds.pathologies == list(PATHOLOGIES) and np.isnan(ds.labels[:, 15]).all()
    with pytest.raises(BadIndex, match="none of the 7 images"):
        nih.nih_index(entry, _empty(tmp_path), tmp_path / "x.csv")


def _empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir(exist_ok=True)
    return folder


def test_real_subset_grouped_by_patient(shared, tmp_path):
    folder = os.path.join(shared, "data", "nih")
    out = tmp_path / "nih.csv"
    index, info = nih.nih_index(os.path.join(folder, "Data_Entry_2017_v2020.csv.gz"),
                                os.path.join(folder, "images"), out, task="pathologies",
                                views="frontal")
    assert info["listed"] == 112120 and info["images_found"] == 1000 == len(index)
    back = read_index(out)
    check_no_patient_leak(back)
    splits_of = {}
    for pid, s in zip(back.patient_ids, back.splits):
        splits_of.setdefault(pid, set()).add(s)
    assert all(len(s) == 1 for s in splits_of.values())
    assert max(back.patient_ids.count(p) for p in set(back.patient_ids)) > 1  # follow-ups
    assert any(b for b in back.column("bboxes"))  # BBox_List found beside the table
    assert set(back.views) == {"PA", "AP"}
