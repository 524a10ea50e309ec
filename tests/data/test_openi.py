"""OpenI: report parsing, the index on the real archive, and both download routes against a local
server on 127.0.0.1 that misbehaves on purpose (tests/httpserver.py, tests/openi_server.py)."""
import hashlib
import json
import os
import shutil
import tarfile
import time

import cv2
import numpy as np
import pytest

from support.httpserver import Fault
from support.openi_server import OpenIServer, api_path, read_archive_records
from mxvision.data import openi
from mxvision.data.index import read_index
from mxvision.data.openi_scrape import STATE_FILE, USER_AGENT, scrape
from mxvision.data.splits import check_no_patient_leak
from mxvision.errors import BadIndex, DownloadError

FAST = dict(retries=4, timeout=5, backoff=0.01, progress=False)

REPORT = b"""<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR77"/>
<MedlineCitation><Article><Abstract>
<AbstractText Label="FINDINGS">Small nodule in the right upper lobe.</AbstractText>
<AbstractText Label="IMPRESSION">Nodule.</AbstractText></Abstract></Article></MedlineCitation>
<MeSH><major>Nodule/lung/upper lobe/right</major><major>Opacity/lung</major>
<automatic>nodule</automatic></MeSH>
<parentImage id="CXR77_IM-0001-1001"><figureId>F1</figureId></parentImage>
<parentImage id="CXR77_IM-0001-2001"><figureId>F2</figureId></parentImage>
</eCitation>"""


@pytest.fixture(scope="module")
def openi_dir(shared):
    return os.path.join(shared, "data", "openi")


@pytest.fixture(scope="module")
def archive(openi_dir):
    return os.path.join(openi_dir, "NLMCXR_reports.tgz")


@pytest.fixture(scope="module")
def real_reports(archive):
    return openi.load_reports(archive)


def test_parse_report():
    rep = openi.parse_report(REPORT, "77.xml")
    assert rep.uid == "CXR77"
    assert rep.major == ("Nodule/lung/upper lobe/right", "Opacity/lung")
    assert rep.automatic == ("nodule",)
    assert rep.images == ("CXR77_IM-0001-1001", "CXR77_IM-0001-2001")
    assert rep.findings.startswith("Small nodule") and rep.impression == "Nodule."
    assert openi.uid_of_image("CXR10_IM-0002-1001") == "CXR10"


def test_hostile_and_broken_xml_are_refused():
    bomb = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
            b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
            b'<eCitation><uId id="CXR1"/><MeSH><major>&lol2;</major></MeSH></eCitation>')
    with pytest.raises(BadIndex, match="bomb.xml"):
        openi.parse_report(bomb, "bomb.xml")
    with pytest.raises(BadIndex, match="not a readable"):
        openi.parse_report(b"<eCitation><uId", "cut.xml")


def test_archive_folder_and_xml_routes_agree(tmp_path, real_reports):
    xml = tmp_path / "reports" / "77.xml"
    xml.parent.mkdir()
    xml.write_bytes(REPORT)
    archive = tmp_path / "r.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(xml, arcname="ecgen-radiology/77.xml")
    assert openi.load_reports(archive) == openi.load_reports(xml.parent) == openi.load_reports(xml)
    assert len(real_reports) == 3955
    assert sum(len(r.images) for r in real_reports) == 7470
    assert real_reports[0].uid == "CXR1" and real_reports[0].major == ("normal",)
    with pytest.raises(BadIndex, match="no such"):
        openi.load_reports(tmp_path / "absent.tgz")


def test_xvision_json_has_the_archive_terms(openi_dir, real_reports):
    xv = openi.read_xvision_json(os.path.join(openi_dir, "xvision_datas.json"))
    by_uid = {r.uid: r for r in real_reports}
    assert sum(len(r.images) for r in xv) == 7469
    for rep in xv:
        assert rep.major == by_uid[rep.uid].major
        assert set(rep.images) <= set(by_uid[rep.uid].images)


@pytest.fixture(scope="module")
def real_dataset(real_reports, openi_dir):
    meta = openi.read_metadata(os.path.join(openi_dir, "nlmcxr_dicom_metadata.csv.gz"))
    return openi.openi_dataset(real_reports, metadata=meta)


def test_real_index_counts_and_patient_grouped_splits(archive, tmp_path, real_dataset):
    out = tmp_path / "openi.csv"
    index, info = openi.openi_index(archive, out)  # metadata found beside the archive; views PA
    assert info["reports"] == 3955 and info["images"] == 7470
    assert index.labels.count("normal") == 1445 and index.labels.count("nodule") == 85
    assert set(index.views) == {"PA"}
    assert all(p.startswith("CXR") for p in index.patient_ids)
    _assert_no_overlap(read_index(out))
    assert real_dataset.to_index().splits == index.splits  # deterministic for a seed
    assert real_dataset.to_index(seed=1).splits != index.splits
    # all views: the frontal and lateral films of one study are always on the same side
    every = real_dataset.to_index(views="all")
    assert every.labels.count("normal") == 2696 and every.labels.count("nodule") == 211
    _assert_no_overlap(every)
    split_of = {}
    for pid, s in zip(every.patient_ids, every.splits):
        assert split_of.setdefault(pid, s) == s
    orig = real_dataset.to_index(views="all", task="nodule-original")
    assert orig.labels.count("normal") == 2697 and orig.labels.count("nodule") == 98


def _assert_no_overlap(index):
    check_no_patient_leak(index)
    groups = {s: {p for p, t in zip(index.patient_ids, index.splits) if t == s}
              for s in ("train", "val", "test")}
    assert all(groups.values())
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"] \
        and not groups["val"] & groups["test"]


def test_pathologies_index_has_18_columns(real_dataset):
    index = real_dataset.to_index(task="pathologies", views="frontal")
    from mxvision.data.labels import PATHOLOGIES
    assert [c for c in index.columns if c in PATHOLOGIES] == list(PATHOLOGIES)
    assert set(index.views) == {"PA", "AP"}
    assert index.labels.count("normal") == 1530
    for lab, nod in zip(index.labels, index.column("Nodule")):
        assert ("Nodule" in lab.split("|")) == (nod == "1")


def test_images_folder_keeps_only_present_images(archive, tmp_path, real_reports):
    folder = tmp_path / "png" / "nested"
    folder.mkdir(parents=True)
    wanted = [i for r in real_reports[:40] for i in r.images]
    img = np.full((64, 64), 128, np.uint8)
    for image_id in wanted:
        cv2.imwrite(str(folder / f"{image_id}.png"), img)
    index, info = openi.openi_index(archive, tmp_path / "i.csv", images=tmp_path / "png",
                                    views="all", task="pathologies")
    assert info["images_missing"] == 7470 - len(wanted)
    assert index.missing() == [] and len(index) <= len(wanted)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadIndex, match="none of the 7470 images"):
        openi.openi_index(archive, tmp_path / "j.csv", images=tmp_path / "empty", views="all")


def test_views_need_metadata(tmp_path):
    xml_dir = tmp_path / "xml"
    xml_dir.mkdir()
    (xml_dir / "77.xml").write_bytes(REPORT)
    with pytest.raises(BadIndex, match="--metadata FILE or --views all"):
        openi.openi_index(xml_dir, tmp_path / "x.csv")
    index, _ = openi.openi_index(xml_dir, tmp_path / "x.csv", views="all")
    assert index.labels == ["nodule", "nodule"] and index.views == ["", ""]


# ------------------------------------------------------------------ bulk archive download (CLI)
@pytest.fixture
def www_archive(tmp_path, archive):
    www = tmp_path / "www"
    (www / "imgs" / "collections").mkdir(parents=True)
    shutil.copy(archive, www / "imgs" / "collections" / "NLMCXR_reports.tgz")
    return www


def run_cli(*argv):
    from support.cli import run_cli as run_mxvision
    return run_mxvision("data", *argv)


def test_download_survives_drops_errors_and_truncation(www_archive, tmp_path, archive, openi_dir):
    out = tmp_path / "dl"
    faults = [Fault.drop(after=300_000), Fault.status(500), Fault.status(429, retry_after=0),
              Fault.truncate(after=200_000), Fault.drop(after=50_000)]
    with _serving(www_archive, faults) as server:
        code, out_text, err = run_cli("download", "openi", "--out", out, "--base-url",
                                      server.url, "--retries", "8", "--backoff", "0.01",
                                      "--quiet")
        ranges = [r.headers.get("Range") for r in server.requests]
        agents = {r.headers.get("User-Agent") for r in server.requests}
    assert code == 0, err
    assert server.pending_faults() == []
    assert any(r and r != "bytes=0-" for r in ranges)  # resumed, not restarted
    assert all(a.startswith("mxvision/") for a in agents)
    got = out / "NLMCXR_reports.tgz"
    assert hashlib.sha256(got.read_bytes()).hexdigest() == hashlib.sha256(
        open(archive, "rb").read()).hexdigest()
    assert "(verified)" in out_text
    assert sorted(os.listdir(out)) == ["NLMCXR_reports", "NLMCXR_reports.tgz"]
    xmls = [f for _, _, fs in os.walk(out / "NLMCXR_reports") for f in fs if f.endswith(".xml")]
    assert len(xmls) == 3955
    code, text, err = run_cli("index", "openi", "--reports", got, "--metadata",
                              os.path.join(openi_dir, "nlmcxr_dicom_metadata.csv.gz"),
                              "--out", tmp_path / "o.csv", "--quiet")
    assert code == 0, err
    assert "normal 1445, nodule 85" in text


def test_download_that_cannot_complete_fails_cleanly(www_archive, tmp_path):
    out = tmp_path / "dl"
    with _serving(www_archive, [Fault.truncate(after=1000)] * 3) as server:
        code, _, err = run_cli("download", "openi", "--out", out, "--base-url", server.url,
                               "--retries", "2", "--backoff", "0.01", "--quiet")
    assert code == 2
    lines = [l for l in err.splitlines() if l.startswith("mxvision: error:")]
    assert len(lines) == 1 and "failed after 3 attempts" in lines[0], err
    assert "Traceback" not in err
    assert not (out / "NLMCXR_reports.tgz").exists()
    assert "kept in" in lines[0] and (out / "NLMCXR_reports.tgz.part").stat().st_size == 3000
    # a body cut short *and* announced short passes the size check; only the checksum sees it
    out = tmp_path / "dl2"
    with _serving(www_archive, [Fault.lie_length(500_000)]) as server:
        code, _, err = run_cli("download", "openi", "--out", out, "--base-url", server.url,
                               "--backoff", "0.01", "--quiet")
    assert code == 2 and "sha256" in err and "deleted it" in err
    assert not (out / "NLMCXR_reports.tgz").exists()
    assert not (out / "NLMCXR_reports.tgz.part").exists()
    with _serving(www_archive) as server:  # the next run completes
        code, _, err = run_cli("download", "openi", "--out", out, "--base-url", server.url,
                               "--quiet", "--no-extract")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["NLMCXR_reports.tgz"]


class _serving:
    def __init__(self, www, faults=(), records=()):
        self.server = OpenIServer(www, list(records), faults)

    def __enter__(self):
        return self.server.start()

    def __exit__(self, *exc):
        self.server.stop()


# ------------------------------------------------------------------ the search API (scraper)
@pytest.fixture(scope="module")
def api_records(archive):
    return read_archive_records(archive, limit=250)


def test_scrape_pages_politely_through_faults(tmp_path, api_records, real_reports):
    www = tmp_path / "www"
    www.mkdir()
    faults = [Fault.status(500), Fault.status(429, retry_after=0), Fault.drop(after=700),
              Fault.truncate(after=100)]
    out = tmp_path / "scrape"
    start = time.monotonic()
    with _serving(www, faults, api_records) as server:
        result = scrape(out, base_url=server.url, page_size=100, delay=0.2, **FAST)
        agents = {r.headers.get("User-Agent") for r in server.requests}
        queries = list(server.queries)
    elapsed = time.monotonic() - start
    assert result["complete"] and result["records"] == 250 and result["pages"] == 3
    assert agents == {USER_AGENT} and "OpenI-scraper" in USER_AGENT
    assert [(q["m"], q["n"]) for q in queries if q] [-3:] == [("1", "100"), ("101", "200"),
                                                              ("201", "300")]
    assert all(q["coll"] == "cxr" for q in queries)
    assert elapsed >= 2 * 0.2  # at least the rate limit between the 3 pages
    lines = [json.loads(l) for l in open(result["records_file"], encoding="utf-8")]
    assert [l["image_id"] for l in lines] == [r["imgLarge"].rsplit("/", 1)[1][:-4]
                                              for r in api_records]
    # the scraped records become the same reports as the bulk archive
    scraped = openi.read_scraped(result["records_file"])
    by_uid = {r.uid: r for r in real_reports}
    assert scraped and all(r.major == by_uid[r.uid].major for r in scraped)
    assert all(set(r.images) <= set(by_uid[r.uid].images) for r in scraped)
    assert lines[0]["img_url"].startswith(server.url + "imgs/512/")


def test_scrape_resumes_after_an_interruption(tmp_path, api_records):
    www = tmp_path / "www"
    www.mkdir()
    out = tmp_path / "scrape"
    with _serving(www, [Fault.status(404, path=api_path(101, 200))], api_records) as server:
        with pytest.raises(DownloadError, match="404"):
            scrape(out, base_url=server.url, page_size=100, delay=0, **FAST)
        state = json.load(open(out / STATE_FILE))
        assert state["next_m"] == 101 and state["records"] == 100 and not state["complete"]
        with open(out / "openi_records.jsonl", "a") as f:
            f.write('{"half": "a page cut by the interruption"')
        seen = len(server.queries)
        result = scrape(out, base_url=server.url, page_size=100, delay=0, **FAST)
        resumed = [q["m"] for q in server.queries[seen:]]
    assert resumed == ["101", "201"]  # page 1 not asked again
    assert result["records"] == 250 and result["complete"]
    ids = [json.loads(l)["image_id"] for l in open(out / "openi_records.jsonl")]
    assert len(ids) == len(set(ids)) == 250
    with pytest.raises(DownloadError, match="another scrape"):
        scrape(out, base_url="http://127.0.0.1:9/", page_size=100, delay=0, **FAST)


def test_scrape_refuses_an_html_page_and_fetches_images(tmp_path, api_records):
    www = tmp_path / "www"
    for rec in api_records[:6]:
        target = www / rec["imgLarge"].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), np.full((64, 64), 100, np.uint8))
    out = tmp_path / "s"
    with _serving(www, [Fault.html()], api_records) as server:
        with pytest.raises(DownloadError, match="HTML page"):
            scrape(out, base_url=server.url, page_size=3, delay=0, **FAST)
        result = scrape(out, base_url=server.url, page_size=3, delay=0, max_records=6,
                        images=True, **FAST)
    assert result["records"] == 6 and not result["complete"]
    assert result["images_downloaded"] == 6
    index, info = openi.openi_index(out / "openi_records.jsonl", tmp_path / "s.csv",
                                    images=out / "images", views="all", task="pathologies")
    assert info["images"] == 6 and info["images_missing"] == 0 and index.missing() == []
