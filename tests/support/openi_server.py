"""A local stand-in for OpenI (127.0.0.1 only): the search API and the collection archives.

``/api/search?query=&coll=cxr&m=M&n=N`` answers in the real format (see
mxvision/data/openi_scrape.py), built from the real report archive with the standard library's
XML parser -- independently of mxvision's own parser, so the tests compare two readings of the
same XML. Every answer is written to ``_api/search_mM_nN.json`` under the served folder and
served through tests/support/httpserver.py (a ``FileHandler`` subclass), so its faults (drops,
5xx, 429, truncation, HTML) apply to API pages as to files; a fault for one page is
``Fault.status(404, path=api_path(101, 200))``.
"""
import json
import os
import tarfile
import urllib.parse
import xml.etree.ElementTree as ET

from support.httpserver import FileHandler, Server


def api_path(m, n):
    return f"/_api/search_m{m}_n{n}.json"


def read_archive_records(tgz, limit=None):
    """One API-style record per image of the real report archive, in report-number order."""
    reports = []
    with tarfile.open(tgz) as tf:
        for member in tf.getmembers():
            if not member.name.endswith(".xml"):
                continue
            root = ET.parse(tf.extractfile(member)).getroot()
            uid = root.find("uId").get("id")
            major = [e.text.strip() for e in root.iter("major") if e.text and e.text.strip()]
            images = [e.get("id") for e in root.iter("parentImage")]
            reports.append((int(uid[3:]), uid, major, images))
    records = []
    for number, uid, major, images in sorted(reports):
        for k, image_id in enumerate(images):
            records.append({
                "uid": uid, "pmcid": str(number), "docSource": "CXR", "articleType": "rr",
                "title": "Indiana University Chest X-ray Collection",
                "MeSH": {"minor": [], "major": major}, "Problems": ";".join(major),
                "image": {"id": f"F{k + 1}", "caption": "Xray Chest PA and Lateral",
                          "modalityMajor": "x", "mention": ""},
                "imgThumb": f"/imgs/100/{number % 400}/{number}/{image_id}.png",
                "imgLarge": f"/imgs/512/{number % 400}/{number}/{image_id}.png",
                "imgThumbLarge": f"/imgs/137/{number % 400}/{number}/{image_id}.png",
                "imgGrid150": f"/imgs/150/{number % 400}/{number}/{image_id}.png",
            })
            if limit is not None and len(records) >= limit:
                return records
    return records


class _OpenIHandler(FileHandler):
    def serve_request(self, send_body):
        parts = urllib.parse.urlsplit(self.path)
        if parts.path == "/api/search":
            q = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
            m, n = int(q.get("m", ["1"])[0]), int(q.get("n", ["10"])[0])
            srv = self.server.owner
            page = srv.records[m - 1:n]
            body = {"min": m, "max": m + len(page) - 1, "count": len(page),
                    "total": len(srv.records), "approximage": "false", "list": page}
            target = os.path.join(srv.directory, api_path(m, n).lstrip("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", encoding="utf-8") as f:
                json.dump(body, f)
            srv.queries.append(dict((k, v[0]) for k, v in q.items()))
            self.path = api_path(m, n)
        return super().serve_request(send_body)


class OpenIServer(Server):
    """Serves ``directory`` plus the search API over ``records``."""

    def __init__(self, directory, records, faults=()):
        super().__init__(directory, faults, handler=_OpenIHandler)
        self.records = records
        self.queries = []
