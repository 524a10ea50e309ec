"""The label rules on hand-written report terms, and their counts on the real OpenI archive."""
import json
import math
import os

import numpy as np
import pytest

from mxvision.errors import BadIndex

from mxvision.data import labels as L

# torchxrayvision's default_pathologies, copied from its README, in its order
XRV_DEFAULT = ['Atelectasis', 'Consolidation', 'Infiltration', 'Pneumothorax', 'Edema',
               'Emphysema', 'Fibrosis', 'Effusion', 'Pneumonia', 'Pleural_Thickening',
               'Cardiomegaly', 'Nodule', 'Mass', 'Hernia', 'Lung Lesion', 'Fracture',
               'Lung Opacity', 'Enlarged Cardiomediastinum']


def vec(major, automatic=()):
    return dict(zip(L.PATHOLOGIES, L.pathology_vector(major, automatic)))


def test_pathology_order_is_torchxrayvision():
    assert list(L.PATHOLOGIES) == XRV_DEFAULT
    assert set(L.OPENI_SYNONYMS) == set(L.PATHOLOGIES)
    assert set(L.NIH_FINDINGS) < set(L.PATHOLOGIES) and len(L.NIH_FINDINGS) == 14


@pytest.mark.parametrize("terms,label", [
    (["normal"], "normal"),
    ([" Normal "], "normal"),
    (["normal", "normal"], "normal"),
    (["normal", "Cardiomegaly/mild"], None),
    (["Pleura/base/bilateral/abnormal/chronic"], None),  # 'abnormal' contains 'normal'
    (["Nodule/lung/right"], "nodule"),
    (["Opacity/lung/base", "Nodule/lung/upper lobe/left"], "nodule"),  # with other findings
    (["Lymph Nodes/hilum"], None),
    (["No Indexing"], None),
    ([], None),
])
def test_xvision_rule(terms, label):
    assert L.xvision_label(terms) == label


def test_original_rule_is_reproduced_with_its_quirks():
    # the one image the original called normal and the archive codes as abnormal
    terms = ["Cicatrix/lung/base/bilateral/chronic", "Pleura/base/bilateral/abnormal/chronic",
             "Stents"]
    assert L.original_xvision_label(terms) == "normal"
    assert L.original_xvision_label(["Nodule/lung"]) == "nodule"
    assert L.original_xvision_label(["Calcinosis/lung", "Nodule/lung"]) == "nodule"
    assert L.original_xvision_label(["Opacity/lung", "Nodule/lung"]) is None  # dropped
    assert L.original_xvision_category(["Opacity/lung", "Nodule/lung"]) == "opacitynodule"
    assert L.original_xvision_category(["Stents"]) == "missing"


def test_normal_report_is_negative_everywhere_and_no_indexing_unknown():
    assert all(v == 0 for v in vec(["normal"]).values())
    assert all(math.isnan(v) for v in vec(["No Indexing"]).values())
    assert all(math.isnan(v) for v in vec(["Technical Quality of Image Unsatisfactory "]).values())
    assert all(math.isnan(v) for v in vec([]).values())


def test_synonyms_and_qualifiers():
    v = vec(["Pulmonary Atelectasis/base/left", "Thickening/pleura/apex/bilateral",
             "Costophrenic Angle/bilateral/blunted", "Hernia, Hiatal/large",
             "Fractures, Bone/ribs/healed", "Cardiac Shadow/enlarged/mild"])
    for name in ("Atelectasis", "Pleural_Thickening", "Effusion", "Hernia", "Fracture",
                 "Cardiomegaly"):
        assert v[name] == 1, name
    assert v["Pneumonia"] == 0 and v["Nodule"] == 0
    # subcutaneous emphysema is air in soft tissue, not lung emphysema
    assert vec(["Subcutaneous  Emphysema"])["Emphysema"] == 0
    assert vec(["Pulmonary Emphysema/severe"])["Emphysema"] == 1
    # a nodule is also a lung lesion; a mass in the lung too
    v = vec(["Nodule/lung/right"])
    assert v["Nodule"] == 1 and v["Lung Lesion"] == 1 and v["Mass"] == 0
    assert vec(["Mass/lung/right"])["Lung Lesion"] == 1


def test_automatic_terms_count_and_borderline_is_unknown():
    v = vec(["Lung/hypoinflation"], ["pleural effusions", "right lower lobe pneumonia"])
    assert v["Effusion"] == 1 and v["Pneumonia"] == 1
    assert vec(["Opacity/lung"], ["pericardial effusion"])["Effusion"] == 0
    v = vec(["Cardiomegaly/borderline"], ["cardiomegaly"])
    assert math.isnan(v["Cardiomegaly"])  # MTI drops the hedge; the annotators kept it
    assert vec(["Cardiomegaly/borderline", "Cardiomegaly/mild"])["Cardiomegaly"] == 1


def test_synonym_table_can_be_replaced(tmp_path):
    path = tmp_path / "syn.json"
    path.write_text(json.dumps({"Nodule": {"major": ["granuloma"], "automatic": []}}))
    table = L.load_synonyms(path)
    v = dict(zip(L.PATHOLOGIES, L.pathology_vector(["Granuloma/lung"], synonyms=table)))
    assert v["Nodule"] == 1 and v["Mass"] == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"Nodule": ["granuloma"]}))
    with pytest.raises(BadIndex, match="Nodule"):
        L.load_synonyms(bad)


def test_nih_vector_and_value_spelling():
    v = dict(zip(L.PATHOLOGIES, L.nih_vector("Cardiomegaly|Effusion")))
    assert v["Cardiomegaly"] == 1 and v["Effusion"] == 1 and v["Nodule"] == 0
    assert math.isnan(v["Lung Opacity"]) and math.isnan(v["Fracture"])
    assert np.nansum(L.nih_vector("No Finding")) == 0
    assert L.canonical_pathology("nodule") == "Nodule"
    assert L.canonical_pathology("pleural thickening") == "Pleural_Thickening"
    assert L.canonical_pathology("lung opacity") == "Lung Opacity"
    assert [L.format_value(x) for x in (1.0, 0.0, float("nan"))] == ["1", "0", ""]
    assert L.parse_value("1") == 1 and L.parse_value("0.0") == 0 and math.isnan(L.parse_value(""))
    assert math.isnan(L.parse_value("-1"))
    with pytest.raises(ValueError):
        L.parse_value("2")


def test_counts_on_the_real_archive_against_the_original(shared):
    """Our rule vs the original notebook's on the real reports and on xvision_datas.json."""
    from mxvision.data.openi import load_reports, read_xvision_json

    folder = os.path.join(shared, "data", "openi")
    reports = load_reports(os.path.join(folder, "NLMCXR_reports.tgz"))
    per_image = {i: r for r in reports for i in r.images}
    assert len(reports) == 3955 and len(per_image) == 7470
    ours = {i: L.xvision_label(r.major) for i, r in per_image.items()}
    assert sum(v == "normal" for v in ours.values()) == 2696
    assert sum(v == "nodule" for v in ours.values()) == 211
    original = {i: L.original_xvision_label(r.major)
                for r in read_xvision_json(os.path.join(folder, "xvision_datas.json"))
                for i in r.images}
    assert len(original) == 7469
    assert sum(v == "normal" for v in original.values()) == 2697
    assert sum(v == "nodule" for v in original.values()) == 98
    # every original nodule is ours too; the only normal we disagree on is the 'abnormal' one
    assert {i for i, v in original.items() if v == "nodule"} <= {
        i for i, v in ours.items() if v == "nodule"}
    assert [i for i, v in original.items() if v == "normal" and ours[i] != "normal"] == [
        "CXR2522_IM-1040-1001"]


def test_the_shipped_synonym_table_is_the_installed_package_data():
    import pkgutil  # importlib.resources.files is 3.9+
    shipped = json.loads(pkgutil.get_data("mxvision.data.tables", "openi_synonyms.json").decode("utf-8"))
    assert {k for k in shipped if not k.startswith("_")} == set(L.PATHOLOGIES)
    assert L.OPENI_SYNONYMS["Nodule"]["major"] == list(L.NODULE_TERMS)
    assert L.OPENI_SYNONYMS["Emphysema"] == {k: shipped["Emphysema"][k] for k in ("major", "automatic", "why")}
