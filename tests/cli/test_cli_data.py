"""``mxvision data ...`` as a user runs it: real files, one-line errors, non-zero exit codes.

Runs the real CLI in-process through ``mxvision.cli.main``."""
import os

import pytest

from support.cli import one_line_error, run_cli
from mxvision.data.index import read_index
from mxvision.data.splits import check_no_patient_leak


def run_data(*argv):
    """(exit code, stdout, stderr) of ``mxvision data ARGV...``."""
    return run_cli("data", *argv)


@pytest.mark.parametrize("argv", [
    [], ["download"], ["download", "openi"], ["download", "url"], ["scrape", "openi"],
    ["index"], ["index", "openi"], ["index", "jsrt"], ["index", "nih"], ["index", "folder"],
    ["index", "merge"], ["summary"], ["pack"]])
def test_every_action_has_help(argv):
    code, out, _ = run_data(*argv, "--help")
    assert code == 0 and out.startswith("usage: ")


def test_index_jsrt_nih_merge_and_summary(shared, tmp_path):
    jsrt = tmp_path / "jsrt.csv"
    code, out, err = run_data("index", "jsrt", "--root", os.path.join(shared, "data", "jsrt"),
                              "--out", jsrt)
    assert code == 0, err
    assert "wrote 154 images of 154 patients" in out
    nih = tmp_path / "nih.csv"
    code, out, err = run_data("index", "nih", "--csv",
                              os.path.join(shared, "data", "nih", "Data_Entry_2017_v2020.csv.gz"),
                              "--images", os.path.join(shared, "data", "nih", "images"),
                              "--out", nih)
    assert code == 0, err
    index = read_index(nih)
    assert set(index.views) == {"PA"} and set(index.labels) == {"normal", "nodule"}
    assert index.columns[:5] == ("path", "label", "patient_id", "split", "view")
    check_no_patient_leak(index)
    merged = tmp_path / "merged.csv"
    code, out, err = run_data("index", "merge", jsrt, nih, "--out", merged)
    assert code == 0, err
    m = read_index(merged)
    assert len(m) == 154 + len(index)
    assert {p.split(":")[0] for p in m.patient_ids} == {"jsrt", "nih"}
    code, out, err = run_data("summary", merged)
    assert code == 0, err
    assert "no patient is in two splits" in out
    header = next(l for l in out.splitlines() if l.startswith("label"))
    assert header.split() == ["label", "train", "val", "test", "total"]
    normal = next(l for l in out.splitlines() if l.startswith("normal")).split()
    assert int(normal[-1]) == m.labels.count("normal")


def test_index_folder_reads_dicom_tags(tmp_path, shared):
    import shutil
    root = tmp_path / "classes"
    (root / "normal").mkdir(parents=True)
    (root / "nodule").mkdir()
    samples = os.path.join(shared, "data", "samples")
    shutil.copy(os.path.join(samples, "Fake_MONOHR1.dcm"), root / "normal" / "a.dcm")
    shutil.copy(os.path.join(samples, "00000001_000.png"), root / "nodule" / "b.png")
    out = tmp_path / "f.csv"
    code, _, err = run_data("index", "folder", "--root", root, "--out", out)
    assert code == 0, err
    index = read_index(out)
    by_label = dict(zip(index.labels, zip(index.views, index.patient_ids)))
    assert by_label["normal"] == ("PA", "16d7f894-55d7-4d95-8957-d18987f0e981")
    assert by_label["nodule"] == ("", "b")


def test_pack_and_its_mistakes(tmp_path, synth_index):
    out = tmp_path / "packs" / "synth.rec"
    code, text, err = run_data("pack", synth_index, "--out", out, "--quiet")
    assert code == 0, err
    assert "packed 24 images (224 px, png" in text
    for suffix in (".rec", ".idx", ".json", ".csv"):
        assert (tmp_path / "packs" / f"synth{suffix}").is_file()
    one_line_error(*run_data("pack", synth_index, "--out", out, "--preset", "xrv512",
                             "--quiet")[::2], "holds another pack")
    one_line_error(*run_data("pack", synth_index, "--out", tmp_path / "x.bin")[::2],
                   "NAME.rec")


def test_user_mistakes_are_one_line(tmp_path, shared):
    one_line_error(*run_data("summary", tmp_path / "none.csv")[::2], "no such index CSV")
    one_line_error(*run_data("index", "nih", "--csv", tmp_path / "none.csv", "--images",
                             tmp_path, "--out", tmp_path / "o.csv")[::2], "no such file")
    one_line_error(*run_data("index", "openi", "--reports", tmp_path / "none.tgz",
                             "--views", "all", "--out", tmp_path / "o.csv")[::2], "no such")
    one_line_error(*run_data("index", "openi", "--reports",
                             os.path.join(shared, "data", "openi", "NLMCXR_reports.tgz"),
                             "--views", "PA,sideways", "--out", tmp_path / "o.csv")[::2],
                   "sideways")
    one_line_error(*run_data("index", "jsrt", "--root", tmp_path, "--out",
                             tmp_path / "o.csv")[::2], "labels.csv")
    one_line_error(*run_data("download", "url", "http://127.0.0.1:9/x.tgz", "--out",
                             tmp_path / "x.tgz", "--retries", "0", "--quiet")[::2],
                   "127.0.0.1:9")
    assert not (tmp_path / "x.tgz").exists()
