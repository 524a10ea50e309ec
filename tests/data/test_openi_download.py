"""The OpenI bulk-archive API (mxvision.data.openi_download), called directly: addresses, checksums,
download from a local server on 127.0.0.1 laid out like OpenI's site, and extract-once."""
import hashlib
import io
import os
import random
import tarfile

import pytest

from support.httpserver import Fault
from mxvision.data import openi_download as od
from mxvision.errors import DownloadError


def _tgz(path, files):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def site(http_server):
    """A fake NLMCXR_reports.tgz at OpenI's path on the test server; (server, sha256)."""
    folder = os.path.join(http_server.directory, "imgs", "collections")
    os.makedirs(folder)
    path = _tgz(os.path.join(folder, "NLMCXR_reports.tgz"),
                {"ecgen-radiology/1.xml": b"<eCitation/>", "ecgen-radiology/2.xml": random.Random(0).getrandbits(160_000).to_bytes(20_000, "little")})
    with open(path, "rb") as f:
        return http_server, hashlib.sha256(f.read()).hexdigest()


def test_known_checksum_is_the_shared_archive(shared):
    name, known = od.OPENI_FILES["reports"]
    path = os.path.join(shared, "data", "openi", name)
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == known


def test_addresses_keys_and_checksum_options():
    assert od.openi_archive_url("reports") == "https://openi.nlm.nih.gov/imgs/collections/NLMCXR_reports.tgz"
    assert od.openi_archive_url("images", "http://m/x") == "http://m/x/imgs/collections/NLMCXR_png.tgz"
    assert od.openi_archive_keys("all") == ["reports", "images"]
    assert od.openi_archive_keys("images") == ["images"]
    with pytest.raises(ValueError, match="xrays"):
        od.openi_archive_keys("xrays")
    assert od.expected_sha256(None, "abc") == "abc"
    assert od.expected_sha256("SKIP", "abc") is None and od.expected_sha256("", "abc") is None
    assert od.expected_sha256("f00", "abc") == "f00" and od.expected_sha256(None) is None


def test_download_verifies_resumes_and_extracts_once(site, tmp_path):
    server, sha256 = site
    server.add_faults(Fault.drop(after=1500))
    got = od.download_openi_archive("reports", tmp_path / "dl", base_url=server.url.rstrip("/"),
                                    sha256=sha256, retries=2, backoff=0.01, progress=False)
    assert got == {"key": "reports", "path": os.path.join(tmp_path / "dl", "NLMCXR_reports.tgz"),
                   "bytes": os.path.getsize(got["path"]), "sha256": sha256, "verified": True,
                   "extract_dir": os.path.join(tmp_path / "dl", "NLMCXR_reports")}
    assert server.pending_faults() == [] and any(r.headers.get("Range") not in (None, "bytes=0-") for r in server.requests)
    assert od.extract_once(got["path"], got["extract_dir"]) == 2
    assert os.path.isfile(os.path.join(got["extract_dir"], od.EXTRACTED_MARK))
    assert od.extract_once(got["path"], got["extract_dir"]) is None  # same archive: nothing to do
    os.utime(got["path"], (0, 0))  # another archive (mtime) under the same name: extracted again
    assert od.extract_once(got["path"], got["extract_dir"]) == 2


def test_unverified_download_reports_its_own_checksum_and_a_wrong_one_fails(site, tmp_path):
    server, sha256 = site
    got = od.download_openi_archive("reports", tmp_path / "a", base_url=server.url, sha256="skip",
                                    progress=False)
    assert got["sha256"] == sha256 and got["verified"] is False
    with pytest.raises(DownloadError, match="sha256"):
        od.download_openi_archive("reports", tmp_path / "b", base_url=server.url, sha256="0" * 64,
                                  retries=0, progress=False)
    assert not os.path.exists(tmp_path / "b" / "NLMCXR_reports.tgz")
