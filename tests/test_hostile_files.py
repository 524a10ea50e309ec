"""Files made to hurt: archives that reach outside, bombs, hostile XML/JSON/CSV, lying servers.

Complements tests/test_download.py (the basic refusals of each archive member kind and the
downloader's retry/resume matrix). Every case checks two things: the refusal is one clear
:class:`MxvisionError` line naming the file, and nothing was written where it should not be --
outside the destination *ever*, and inside it when the archive is refused half way (an archive
is extracted whole or not at all).

Label files are parsed by the OpenI/NIH readers (``mxvision/data/openi.py``, ``nih.py``);
reports go through ``defusedxml``. Known holes in those readers are written as ``xfail(strict)``
tests whose reason says the fix; they turn into failures (XPASS) once fixed, as a reminder to
drop the marker.
"""
import gzip
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from support.archive_builders import make_tar as _tar, tree_state
from support.httpserver import Fault, serve
from mxvision.data import nih
from mxvision.data import openi
from mxvision.data.index import MAX_PATH_CHARS, read_index
from mxvision.errors import BadIndex, DownloadError, MxvisionError
from mxvision.io.archive import safe_extract_tar, safe_extract_zip
from mxvision.io.download import download

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers
def _zip(path, members, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


@pytest.fixture
def arena(tmp_path):
    """A victim folder outside the destination, with a secret file; the destination is empty."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not copy or overwrite me")
    dest = tmp_path / "dest"
    dest.mkdir()
    return tmp_path, outside, dest


def _refused(extract, archive, dest, match, **limits):
    """Run ``extract``; it must raise one DownloadError line naming the archive."""
    with pytest.raises(DownloadError, match=match) as info:
        extract(archive, dest, **limits)
    message = str(info.value)
    assert message.startswith(f"{archive}: ") and "\n" not in message
    return message


# --------------------------------------------------------------------------- archives
def test_a_half_extracted_archive_is_rolled_back(arena):
    """A file 'a' then a member 'a/b': the clash is found only while writing; 'a' is removed."""
    root, _, dest = arena
    before = tree_state(root)
    z = _zip(root / "clash.zip", [("first.txt", b"1"), ("a", b"file"), ("a/b", b"under a file")])
    _refused(safe_extract_zip, z, dest, "cannot write member 'a/b'")
    t = _tar(root / "clash.tgz", [("d/first.txt", tarfile.REGTYPE, b"1"), ("a", tarfile.REGTYPE, b"f"),
                                  ("a/b", tarfile.REGTYPE, b"x")])
    _refused(safe_extract_tar, t, dest, "cannot write member 'a/b'")
    after = tree_state(root)
    assert {k: v for k, v in after.items() if not k.startswith("clash.")} == before


def test_a_corrupt_member_rolls_back_the_members_before_it(arena):
    root, _, dest = arena
    z = _zip(root / "crc.zip", [("good.txt", b"fine" * 100), ("bad.txt", b"Z" * 5000)],
             compression=zipfile.ZIP_STORED)
    data = bytearray(z.read_bytes())
    data[data.find(b"Z" * 100) + 50] ^= 0xFF  # stored bytes of bad.txt: its CRC no longer matches
    z.write_bytes(bytes(data))
    _refused(safe_extract_zip, z, dest, "corrupt member 'bad.txt'")
    assert tree_state(dest) == {}
    tgz = _tar(root / "cut.tgz", [("one.bin", tarfile.REGTYPE, os.urandom(50_000)),
                                  ("two.bin", tarfile.REGTYPE, os.urandom(50_000))])
    cut = root / "cut_half.tgz"
    cut.write_bytes(tgz.read_bytes()[:70_000])
    _refused(safe_extract_tar, cut, dest, "corrupt|not a readable tar")
    assert tree_state(dest) == {}


def test_forged_zip_sizes_are_caught_on_the_real_bytes(arena):
    """A bomb whose headers claim 1 KB: zipfile stops at the claimed size, the CRC fails, nothing
    stays; honest headers over the limit are refused before any byte is written."""
    root, _, dest = arena
    bomb = _zip(root / "bomb.zip", [("zeros.bin", bytes(5_000_000))])
    _refused(safe_extract_zip, bomb, dest, "5000000 bytes exceeds the 1000000-byte member limit",
             max_size=1_000_000)
    data = bytearray(bomb.read_bytes())
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central dir
        at = data.find(sig)
        data[at + offset:at + offset + 4] = (1000).to_bytes(4, "little")
    forged = root / "forged.zip"
    forged.write_bytes(bytes(data))
    _refused(safe_extract_zip, forged, dest, "corrupt member 'zeros.bin'", max_size=1_000_000)
    assert tree_state(dest) == {}
    assert len(bomb.read_bytes()) < 10_000  # it really was a 500:1 bomb


def test_member_count_is_limited(arena):
    root, _, dest = arena
    z = _zip(root / "many.zip", [(f"f{i}", b"") for i in range(60)])
    _refused(safe_extract_zip, z, dest, "more than 50 members", max_members=50)
    t = _tar(root / "many.tgz", [(f"f{i}", tarfile.REGTYPE, b"") for i in range(60)])
    _refused(safe_extract_tar, t, dest, "more than 50 members", max_members=50)
    assert tree_state(dest) == {}
    assert len(safe_extract_zip(z, dest, max_members=60)) == 60


def test_huge_declared_tar_member_is_refused_before_reading(arena):
    """A plain tar header declaring 20 GB with (almost) no data after it."""
    root, _, dest = arena
    info = tarfile.TarInfo("huge.bin")
    info.size = 20 << 30
    raw = root / "huge.tar"
    raw.write_bytes(info.tobuf(format=tarfile.GNU_FORMAT) + bytes(4096))
    _refused(safe_extract_tar, raw, dest, "exceeds the .*member limit|not a readable tar")
    assert tree_state(dest) == {}


@pytest.mark.parametrize("members, why", [
    ([("ok/../../evil", tarfile.REGTYPE, b"x")], "'..' in path"),
    ([("..\\evil", tarfile.REGTYPE, b"x")], "'..' in path"),
    ([("./../evil", tarfile.REGTYPE, b"x")], "'..' in path"),
    ([("//abs", tarfile.REGTYPE, b"x")], "absolute path"),
    ([("C:/evil", tarfile.REGTYPE, b"x")], "absolute path"),
    ([("h", tarfile.LNKTYPE, "/etc/passwd")], "link to absolute path"),
    ([("d/s", tarfile.SYMTYPE, "../x/../../outside/secret.txt")], "points outside"),
    ([("blk", tarfile.BLKTYPE, None)], "device, fifo"),
])
def test_tar_names_and_links_that_leave_are_refused_before_writing(arena, members, why):
    root, _, dest = arena
    before = tree_state(root)
    t = _tar(root / "bad.tgz", [("first.txt", tarfile.REGTYPE, b"1")] + members)
    _refused(safe_extract_tar, t, dest, why)
    assert {k: v for k, v in tree_state(root).items() if k != "bad.tgz"} == before


def test_existing_links_in_the_destination_are_neither_followed_nor_copied(arena):
    root, outside, dest = arena
    os.symlink(outside / "secret.txt", dest / "victim.txt")  # e.g. left by an earlier job
    os.symlink(outside, dest / "escape")
    secret = (outside / "secret.txt").read_text()
    # A member with the link's name replaces the link, it does not write through it.
    t = _tar(root / "over.tgz", [("victim.txt", tarfile.REGTYPE, b"new content")])
    safe_extract_tar(t, dest)
    assert (outside / "secret.txt").read_text() == secret
    assert not (dest / "victim.txt").is_symlink() and (dest / "victim.txt").read_bytes() == b"new content"
    z = _zip(root / "over.zip", [("escape/planted.txt", b"x")])
    _refused(safe_extract_zip, z, dest, "resolves outside the destination")
    # A hard link to a file reached through an existing link: that would copy the secret in.
    t = _tar(root / "steal.tgz", [("copy.txt", tarfile.LNKTYPE, "escape/secret.txt")])
    _refused(safe_extract_tar, t, dest, "not an extracted file")
    assert sorted(os.listdir(outside)) == ["secret.txt"] and not (dest / "copy.txt").exists()


def test_links_inside_the_archive_still_work(arena):
    root, _, dest = arena
    t = _tar(root / "fine.tgz", [("sub", tarfile.DIRTYPE, None), ("link", tarfile.SYMTYPE, "sub"),
                                 ("link/f.txt", tarfile.REGTYPE, b"data"),
                                 ("copy.txt", tarfile.LNKTYPE, "sub/f.txt")])
    safe_extract_tar(t, dest)
    assert (dest / "sub" / "f.txt").read_bytes() == b"data" == (dest / "copy.txt").read_bytes()


# --------------------------------------------------------------------------- XML (OpenI reports)
XML = b'<?xml version="1.0"?>\n'
BILLION_LAUGHS = XML + b"""<!DOCTYPE lolz [<!ENTITY lol "lol">
<!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<eCitation><uId id="CXR1"/><MeSH><major>&lol9;</major></MeSH></eCitation>"""
QUADRATIC = XML + b'<!DOCTYPE q [<!ENTITY a "' + b"A" * 50_000 + b'">]><eCitation><uId id="CXR1"/>' \
    + b"&a;" * 2000 + b"</eCitation>"
XXE = XML + b'<!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>' \
    b'<eCitation><uId id="CXR1"/><MeSH><major>&xxe;</major></MeSH></eCitation>'
PARAMETER_ENTITY = XML + b'<!DOCTYPE x [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>' \
    b'<eCitation><uId id="CXR1"/></eCitation>'


@pytest.mark.parametrize("name, data, fragment", [
    ("billion_laughs.xml", BILLION_LAUGHS, "EntitiesForbidden"),
    ("quadratic_blowup.xml", QUADRATIC, "EntitiesForbidden"),
    ("external_entity.xml", XXE, "EntitiesForbidden"),
    ("parameter_entity.xml", PARAMETER_ENTITY, "Forbidden"),
    ("not_xml.xml", b"\xff\xfe<\x00e\x00", "not a readable OpenI report XML"),
    ("no_uid.xml", b"<eCitation><uId/></eCitation>", "report has no <uId id=...>"),
])
def test_hostile_report_xml_is_refused_quickly(tmp_path, name, data, fragment):
    path = tmp_path / name
    path.write_bytes(data)
    tic = time.monotonic()
    with pytest.raises(BadIndex) as info:
        openi.load_reports(path)
    assert time.monotonic() - tic < 2.0  # no expansion happened
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and fragment in message
    assert "root:" not in message  # /etc/passwd was never read into anything


def test_an_external_dtd_is_never_fetched(http_server, tmp_path):
    (Path(http_server.directory) / "evil.dtd").write_text('<!ENTITY e "fetched">')
    path = tmp_path / "dtd.xml"
    path.write_bytes(XML + b'<!DOCTYPE eCitation SYSTEM "' + http_server.url.encode() + b'evil.dtd">'
                     b'<eCitation><uId id="CXR5"/></eCitation>')
    try:
        reports = openi.load_reports(path)
        assert [r.uid for r in reports] == ["CXR5"]
    except BadIndex:
        pass  # refusing the DTD outright is fine too
    assert http_server.count() == 0


def test_report_archive_members_are_size_capped_and_never_extracted(tmp_path):
    big = tmp_path / "reports.tgz"
    _tar(big, [("ecgen/1.xml", tarfile.REGTYPE, XML + b"<eCitation><uId id='CXR1'/>"
                + b"<x>" + b"A" * (openi.MAX_REPORT_BYTES + 10) + b"</x></eCitation>")])
    with pytest.raises(BadIndex, match="too large for a report"):
        openi.load_reports(big)
    evil = tmp_path / "evil.tgz"
    _tar(evil, [("../../escape.xml", tarfile.REGTYPE, XML + b"<eCitation><uId id='CXR2'/></eCitation>"),
                ("bomb.xml", tarfile.REGTYPE, BILLION_LAUGHS)])
    with pytest.raises(BadIndex, match="EntitiesForbidden"):
        openi.load_reports(evil)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tgz", "reports.tgz"]


# --------------------------------------------------------------------------- JSON (Xvision labels)
IMG = "/data/CXR10_IM-0002-1001.png"


def _load(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path, lambda: openi.load_reports(path)


def _clear_error(path, call, fragment=""):
    with pytest.raises(MxvisionError) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 400, message
    assert fragment in message
    return message


def test_json_labels_that_are_not_records_give_clear_errors(tmp_path):
    for name, text, fragment in [
        ("list.json", "[1, 2]", "expected a JSON object"),
        ("broken.json", '{"1": {"items": [', "not valid JSON"),
        ("latin1.json", "{}", ""),
        ("entry_not_object.json", '{"1": 5}', "not an Xvision record"),
        ("no_img.json", json.dumps({"1": {"items": ["nodule"]}}), "not an Xvision record"),
        ("not_openi_id.json", json.dumps({"1": {"items": [], "img": "/x/photo.png"}}),
         "not an OpenI id"),
        ("scraped_list.jsonl", "[1]\n", "not a scraped OpenI record"),
        ("scraped_no_id.jsonl", '{"major": []}\n', "not a scraped OpenI record"),
    ]:
        path, call = _load(tmp_path, name, text)
        if name == "latin1.json":
            path.write_bytes('{"1": {"items": ["n\xe9"], "img": "x"}}'.encode("latin-1"))
            fragment = "not valid JSON"
        _clear_error(path, call, fragment)


JSON_BUGS = "bug in mxvision/data/openi.py: "


@pytest.mark.parametrize("name, text", [
    ("img_int.json", json.dumps({"1": {"items": ["nodule"], "img": 5}})),
    ("items_int.json", json.dumps({"1": {"items": 5, "img": IMG}})),
    ("items_str.json", json.dumps({"1": {"items": "nodule", "img": IMG}})),
    ("items_dicts.json", json.dumps({"1": {"items": [{"a": 1}], "img": IMG}})),
    ("scraped_id_int.jsonl", json.dumps({"image_id": 5}) + "\n"),
    ("scraped_major_str.jsonl", json.dumps({"image_id": "CXR1_1_IM-0001-3001", "major": "x"}) + "\n"),
])
def test_json_labels_with_wrong_types_give_clear_errors(tmp_path, name, text):
    path, call = _load(tmp_path, name, text)
    _clear_error(path, call)


@pytest.mark.parametrize("name", ["nested.json", "nested.jsonl"])
def test_deeply_nested_json_gives_a_clear_error(tmp_path, name):
    path, call = _load(tmp_path, name, "[" * 100_000 + "]" * 100_000 + "\n")
    _clear_error(path, call)


def test_a_huge_field_does_not_make_a_huge_error(tmp_path):
    path, call = _load(tmp_path, "huge.json", json.dumps({"1": {"items": [], "img": "A" * 5_000_000}}))
    _clear_error(path, call)


@pytest.mark.parametrize("text", ["{bad", "[1]", '{"Nodule": 5}'])
def test_a_malformed_synonym_table_gives_a_clear_error(tmp_path, text):
    reports = tmp_path / "labels.json"
    reports.write_text(json.dumps({"1": {"items": ["nodule"], "img": IMG}}))
    synonyms = tmp_path / "synonyms.json"
    synonyms.write_text(text)
    with pytest.raises(MxvisionError, match="synonyms.json"):
        openi.openi_index(reports, tmp_path / "out.csv", synonyms=synonyms, views="all")


# --------------------------------------------------------------------------- CSV (index, NIH)
def _index(tmp_path, text, name="index.csv", binary=False):
    path = tmp_path / name
    if binary:
        path.write_bytes(text)
    else:
        with open(path, "w", encoding="utf-8", newline="") as f:  # write_text(newline=) is 3.10+
            f.write(text)
    return path


@pytest.mark.parametrize("name, text, fragment", [
    ("nul_path.csv", "path,label\na\x00b.png,nodule\n", "line 2: NUL byte in column path"),
    ("nul_label.csv", "path,label\na.png,nod\x00ule\n", "line 2: NUL byte in column label"),
    ("huge_field.csv", "path,label\na.png," + "x" * 200_000 + "\n", "field larger than field limit"),
    ("long_path.csv", "path,label\n" + "d/" * (MAX_PATH_CHARS // 2 + 1) + "a.png,nodule\n",
     f"characters long (limit {MAX_PATH_CHARS})"),
    ("bad_split.csv", "path,label,split\na.png,nodule," + "5" * 10_000 + "\n", "is not one of train"),
    ("short_row.csv", "path,label,split\na.png,nodule\n", "2 fields, the header has 3"),
    ("open_quote.csv", 'path,label\n"a.png,nodule\nb.png,normal\n', "fields, the header has 2"),
    ("empty_label.csv", "path,label\na.png,\n", "empty label"),
    ("header_only.csv", "path,label\n", "no images listed"),
    ("no_label_column.csv", "path,diagnosis\na.png,nodule\n", "missing column(s) label"),
    ("dup_normalised.csv", "path,label\nx/../a.png,nodule\n./a.png,normal\n", "duplicate path"),
])
def test_hostile_index_csv_gives_one_clear_badindex(tmp_path, name, text, fragment):
    path = _index(tmp_path, text, name)
    with pytest.raises(BadIndex) as info:
        read_index(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 500, message
    assert fragment in message, message


def test_index_encodings_bom_and_binary(tmp_path):
    bom = _index(tmp_path, "\ufeffpath,label\na.png,nodule\n", "bom.csv")
    assert read_index(bom).labels == ["nodule"]
    for name, data in [("utf16.csv", "path,label\na.png,nodule\n".encode("utf-16")),
                       ("png.csv", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
                       ("gzip.csv", gzip.compress(b"path,label\na.png,nodule\n"))]:
        path = _index(tmp_path, data, name, binary=True)
        with pytest.raises(BadIndex, match="not UTF-8"):
            read_index(path)


def test_an_oversized_index_is_refused_without_reading_it(tmp_path, monkeypatch):
    import mxvision.data.index as index_module
    path = _index(tmp_path, "path,label\n" + "a.png,nodule\n" * 100, "big.csv")
    monkeypatch.setattr(index_module, "MAX_INDEX_BYTES", 1000)
    with pytest.raises(BadIndex, match="larger than 1000 bytes"):
        read_index(path)


def test_hostile_nih_label_table_gives_clear_errors(tmp_path):
    header = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
    for name, text, fragment in [
        ("huge.csv", header + "a.png," + "x" * 200_000 + ",0,1,50,M,PA\n", "field larger"),
        ("pid.csv", header + "a.png,Nodule,0,not-a-number,50,M,PA\n", "is not a number"),
        ("short.csv", header + "a.png,Nodule\n", "expected at least 7"),
        ("other.csv", "path,label\na.png,nodule\n", "not the NIH Data_Entry table"),
    ]:
        path = _index(tmp_path, text, name)
        with pytest.raises(BadIndex) as info:
            nih.read_data_entry(path)
        assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value)
    binary = _index(tmp_path, b"\xff\xfe\x00garbage" * 100, "binary.csv", binary=True)
    with pytest.raises(BadIndex):
        nih.read_data_entry(binary)


# --------------------------------------------------------------------------- lying servers
FAST = dict(retries=2, timeout=2, backoff=0.01, progress=False)


def test_an_html_page_served_as_an_archive_leaves_nothing(http_server, tmp_path):
    """A mirror that stored its error page under the archive's name (served 200, octet-stream)."""
    (Path(http_server.directory) / "NLMCXR_reports.tgz").write_bytes(
        b"<!DOCTYPE html><html><body>Service temporarily unavailable</body></html>\n")
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="HTML page") as info:
        download(http_server.url + "NLMCXR_reports.tgz", cache / "NLMCXR_reports.tgz", **FAST)
    assert str(info.value).startswith(http_server.url) and "\n" not in str(info.value)
    assert sorted(os.listdir(cache)) == []


def test_a_lying_content_length_never_leaves_a_finished_looking_file(http_server, tmp_path):
    data = os.urandom(200_000)
    (Path(http_server.directory) / "w.params").write_bytes(data)
    sha1 = hashlib.sha1(data).hexdigest()
    cache = tmp_path / "cache"
    # Announces (and sends) 100 bytes fewer than the file has: the checksum catches it.
    http_server.add_faults(Fault.lie_length(len(data) - 100))
    with pytest.raises(DownloadError, match="sha1|failed after") as info:
        download(http_server.url + "w.params", cache / "w.params", sha1=sha1, **FAST)
    assert "\n" not in str(info.value)
    assert not (cache / "w.params").exists()
    assert all(not name.endswith(".params") for name in os.listdir(cache))
    # The server mends its ways: the next call completes and verifies.
    download(http_server.url + "w.params", cache / "w.params", sha1=sha1, **FAST)
    assert (cache / "w.params").read_bytes() == data


def test_a_download_killed_9_resumes_where_it_stopped(tmp_path):
    """kill -9 while the server stalls after 100 KB: the .part survives, the rerun resumes it."""
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(400_000)
    (www / "big.bin").write_bytes(data)
    sha256 = hashlib.sha256(data).hexdigest()
    dest = tmp_path / "cache" / "big.bin"
    script = ("import sys\nfrom mxvision.io.download import download\n"
              "download(sys.argv[1], sys.argv[2], sha256=sys.argv[3], retries=3, timeout=30, "
              "backoff=0.01, progress=False)\n")
    with serve(www, faults=[Fault.truncate(after=100_000), Fault.stall(60)]) as server:
        proc = subprocess.Popen([sys.executable, "-c", script, server.url + "big.bin", str(dest), sha256],
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
        part = Path(str(dest) + ".part")
        deadline = time.monotonic() + 60
        while server.count() < 2 and time.monotonic() < deadline:  # the retry is stalling now
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert part.stat().st_size == 100_000 and not dest.exists()
        download(server.url + "big.bin", dest, sha256=sha256, **FAST)
        assert server.requests[-1].headers.get("Range") == "bytes=100000-"
    assert dest.read_bytes() == data and not part.exists()


def test_special_members_never_reach_the_disk(arena):
    """Belt and braces for the mode bits a zip can carry: setuid bits are not applied either."""
    root, _, dest = arena
    with zipfile.ZipFile(root / "suid.zip", "w") as zf:
        info = zipfile.ZipInfo("tool.sh")
        info.create_system = 3
        info.external_attr = (stat.S_IFREG | 0o4755) << 16
        zf.writestr(info, b"#!/bin/sh\n")
    (path,) = safe_extract_zip(root / "suid.zip", dest)
    assert not os.stat(path).st_mode & (stat.S_ISUID | stat.S_ISGID)
