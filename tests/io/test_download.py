"""The downloader against a real local HTTP server that misbehaves on purpose (tests/httpserver.py)."""
import hashlib
import logging
import os
import threading
import time

import pytest

from support.archive_builders import make_tar as _tar
from support.httpserver import Fault, closed_port_url, http_server, serve, wait_until  # noqa: F401 (fixture)
from mxvision.errors import DownloadError
from mxvision.io.download import DEFAULT_MAX_BYTES, check_hash, download, size_cap
from mxvision.utils import file_digest

SIZE = 300_000
FAST = dict(retries=3, timeout=2, backoff=0.01, progress=False)


@pytest.fixture
def payload(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(SIZE)
    (www / "blob.bin").write_bytes(data)
    return www, data, hashlib.sha1(data).hexdigest(), hashlib.sha256(data).hexdigest()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_plain_download_verifies_both_hashes_and_sends_user_agent(payload, tmp_path):
    www, data, sha1, sha256 = payload
    dest = tmp_path / "out" / "blob.bin"
    with serve(www) as server:
        got = download(server.url + "blob.bin", dest, sha1=sha1, sha256=sha256, **FAST)
        assert got == str(dest)
        assert dest.read_bytes() == data
        assert server.requests[0].headers["User-Agent"].startswith("mxvision/")
        # already present and verified: no second request
        download(server.url + "blob.bin", dest, sha1=sha1, **FAST)
        assert server.count() == 1
    assert _leftovers(dest.parent) == ["blob.bin"]


def test_dropped_connection_resumes_with_range_and_is_byte_identical(payload, tmp_path):
    www, data, sha1, _ = payload
    dest = tmp_path / "blob.bin"
    with serve(www, faults=[Fault.drop(after=100_000), Fault.drop(after=50_000)]) as server:
        download(server.url + "blob.bin", dest, sha1=sha1, **FAST)
        ranges = [r.headers.get("Range") for r in server.requests]
    assert dest.read_bytes() == data
    # A TCP reset may discard bytes still in flight, so the client resumes at most where the
    # server stopped, and each resume starts further on.
    assert ranges[0] is None and len(ranges) == 3
    offsets = [int(r[len("bytes="):-1]) for r in ranges[1:]]
    assert all(r == "bytes=%d-" % o for r, o in zip(ranges[1:], offsets))
    assert 0 < offsets[0] <= 100_000 and offsets[0] < offsets[1] <= offsets[0] + 50_000
    assert _leftovers(tmp_path) == ["blob.bin", "www"]


def test_server_ignoring_range_restarts_cleanly(payload, tmp_path):
    www, data, sha1, _ = payload
    dest = tmp_path / "blob.bin"
    with serve(www, faults=[Fault.truncate(after=70_000), Fault.ignore_range()]) as server:
        download(server.url + "blob.bin", dest, sha1=sha1, **FAST)
        assert server.requests[1].headers.get("Range") == "bytes=70000-"
        assert server.count() == 2
    assert dest.read_bytes() == data


def test_500_then_ok(payload, tmp_path):
    www, data, sha1, _ = payload
    with serve(www, faults=[Fault.status(500), Fault.status(503)]) as server:
        download(server.url + "blob.bin", tmp_path / "b", sha1=sha1, **FAST)
        assert server.count() == 3
    assert (tmp_path / "b").read_bytes() == data


def test_429_retry_after_is_honoured(payload, tmp_path):
    www, data, _, _ = payload
    with serve(www, faults=[Fault.status(429, retry_after=1)]) as server:
        start = time.monotonic()
        download(server.url + "blob.bin", tmp_path / "b", **FAST)
        elapsed = time.monotonic() - start
        assert server.count() == 2
    assert 0.9 <= elapsed < 5
    assert (tmp_path / "b").read_bytes() == data


def test_retry_after_is_bounded_by_max_wait(payload, tmp_path):
    www, data, _, _ = payload
    with serve(www, faults=[Fault.status(429, retry_after=3600)]) as server:
        start = time.monotonic()
        download(server.url + "blob.bin", tmp_path / "b", max_wait=0.1, **FAST)
        assert time.monotonic() - start < 3
        assert server.count() == 2


def test_persistent_truncation_fails_cleanly_keeping_a_resumable_prefix(payload, tmp_path):
    www, data, sha1, _ = payload
    dest = tmp_path / "b"
    faults = [Fault.truncate(after=10_000)] * 4  # Content-Length is right, the body stops short
    with serve(www, faults=faults) as server:
        with pytest.raises(DownloadError) as info:
            download(server.url + "blob.bin", dest, sha1=sha1, **FAST)
        assert server.count() == 4
    message = str(info.value)
    assert "\n" not in message and message.startswith(server.url + "blob.bin: failed after 4 attempts")
    assert "closed after" in message and "to resume" in message
    assert not dest.exists()
    part = tmp_path / "b.part"
    assert part.read_bytes() == data[:40_000]  # four 10 kB slices, each resumed where it stopped
    # A later call (checksum given) picks the prefix up and finishes the file.
    with serve(www) as server:
        download(server.url + "blob.bin", dest, sha1=sha1, **FAST)
        assert server.requests[0].headers["Range"] == "bytes=40000-"
    assert dest.read_bytes() == data and not part.exists()


def test_stale_part_without_checksum_is_not_resumed(payload, tmp_path):
    www, data, _, _ = payload
    (tmp_path / "b.part").write_bytes(b"junk from another version")
    with serve(www) as server:
        download(server.url + "blob.bin", tmp_path / "b", **FAST)
        assert "Range" not in server.requests[0].headers
    assert (tmp_path / "b").read_bytes() == data


def test_content_length_too_small_is_caught_by_the_checksum(payload, tmp_path):
    www, data, sha1, _ = payload
    with serve(www, faults=[Fault.lie_length(1000)]) as server:
        with pytest.raises(DownloadError, match="sha1 of the 1000 downloaded bytes is"):
            download(server.url + "blob.bin", tmp_path / "b", sha1=sha1, **FAST)
        assert server.count() == 1
    assert _leftovers(tmp_path) == ["www"]  # neither the file nor the .part


def test_content_length_too_large_then_416_means_complete(payload, tmp_path):
    www, data, sha1, _ = payload
    with serve(www, faults=[Fault.lie_length(SIZE + 500)]) as server:
        download(server.url + "blob.bin", tmp_path / "b", sha1=sha1, **FAST)
        assert server.requests[1].headers["Range"] == "bytes=%d-" % SIZE
    assert (tmp_path / "b").read_bytes() == data


def test_html_page_instead_of_file_fails_at_once(payload, tmp_path):
    www, _, sha1, _ = payload
    with serve(www, faults=[Fault.html()]) as server:
        with pytest.raises(DownloadError, match="HTML page") as info:
            download(server.url + "blob.bin", tmp_path / "b", sha1=sha1, **FAST)
        assert server.count() == 1
    assert "\n" not in str(info.value)
    assert _leftovers(tmp_path) == ["www"]


@pytest.mark.parametrize("code", [404, 403])
def test_not_found_and_forbidden_fail_at_once(payload, tmp_path, code):
    www, _, _, _ = payload
    url_path = "missing.bin" if code == 404 else "blob.bin"
    faults = [] if code == 404 else [Fault.status(403)]
    with serve(www, faults=faults) as server:
        with pytest.raises(DownloadError, match="HTTP %d" % code) as info:
            download(server.url + url_path, tmp_path / "b", **FAST)
        assert server.count() == 1
    assert str(info.value).startswith(server.url + url_path + ": ")
    assert _leftovers(tmp_path) == ["www"]


def test_stall_times_out_then_retries(payload, tmp_path):
    www, data, sha1, _ = payload
    with serve(www, faults=[Fault.stall(5)]) as server:
        start = time.monotonic()
        download(server.url + "blob.bin", tmp_path / "b", sha1=sha1, retries=2, timeout=0.3,
                 backoff=0.01, progress=False)
        assert time.monotonic() - start < 3
        assert server.count() == 2
    assert (tmp_path / "b").read_bytes() == data


def test_unreachable_server_gives_one_line_error_after_retries(tmp_path, caplog):
    url = closed_port_url() + "x.bin"
    with caplog.at_level(logging.WARNING, logger="mxvision.io.download"):
        with pytest.raises(DownloadError) as info:
            download(url, tmp_path / "x.bin", retries=2, timeout=1, backoff=0.01, progress=False)
    message = str(info.value)
    assert message.startswith(url + ": failed after 3 attempts") and "refused" in message.lower()
    assert "\n" not in message
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2
    assert list(tmp_path.iterdir()) == []


def test_user_errors_fail_at_once_as_download_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(DownloadError, match="cannot create the folder"):
        download("http://127.0.0.1:9/x", blocker / "sub" / "x", **FAST)
    start = time.monotonic()
    with pytest.raises(DownloadError, match="unknown url type"):
        download("gopherx://example/x", tmp_path / "x", **FAST)
    assert time.monotonic() - start < 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_checksum_mismatch_deletes_everything(payload, tmp_path):
    www, _, _, _ = payload
    with serve(www) as server:
        with pytest.raises(DownloadError, match="expected 0{64}"):
            download(server.url + "blob.bin", tmp_path / "b", sha256="0" * 64, **FAST)
    assert _leftovers(tmp_path) == ["www"]


def test_concurrent_downloads_of_one_path_fetch_once(payload, tmp_path):
    www, data, sha1, _ = payload
    dest = tmp_path / "b"
    errors = []

    def run():
        try:
            download(server.url + "blob.bin", dest, sha1=sha1, **FAST)
        except Exception as err:  # surfaced below
            errors.append(err)

    with serve(www, faults=[Fault.stall(0.5)]) as server:
        first = threading.Thread(target=run)
        first.start()
        assert wait_until(lambda: server.count() == 1)
        second = threading.Thread(target=run)  # must wait for the first one's lock
        second.start()
        first.join(10)
        second.join(10)
        assert server.count() == 1
    assert errors == [] and dest.read_bytes() == data
    assert _leftovers(tmp_path) == ["b", "www"]


def test_an_endless_source_stops_at_the_cap_and_leaves_nothing(payload, tmp_path):
    www, data, sha1, _ = payload
    dest = tmp_path / "blob.bin"
    with serve(www, faults=[Fault.endless(), Fault.endless()]) as server:
        with pytest.raises(DownloadError, match="more than 400000 bytes: stopped at the download "
                                                "size cap") as info:
            download(server.url + "blob.bin", dest, max_bytes=400_000, **FAST)
        assert server.count() == 1  # a cap is not transient: no retry
        cap = size_cap(1000)  # a known size: 5 % more, at least 1 MiB more
        with pytest.raises(DownloadError, match="more than %d bytes" % cap):
            download(server.url + "blob.bin", dest, expected_size=1000, **FAST)
        download(server.url + "blob.bin", dest, sha1=sha1, expected_size=SIZE, **FAST)
    assert "\n" not in str(info.value) and dest.read_bytes() == data
    assert _leftovers(tmp_path) == ["blob.bin", "www"]
    assert cap == 1000 + (1 << 20) and size_cap(10 ** 9) == 10 ** 9 + 5 * 10 ** 7
    assert size_cap(10 ** 12) == size_cap(None) == DEFAULT_MAX_BYTES and size_cap(None, 5) == 5


def test_an_announced_size_over_the_cap_fails_before_downloading(payload, tmp_path):
    www, data, sha1, _ = payload
    with serve(www, faults=[Fault.lie_length(10 ** 12)]) as server:
        with pytest.raises(DownloadError, match="announces 1000000000000 bytes, more than the "
                                                "%d-byte download size cap" % DEFAULT_MAX_BYTES):
            download(server.url + "blob.bin", tmp_path / "a.bin", **FAST)
        with pytest.raises(DownloadError, match="announces %d bytes, more than the 1000-byte" % SIZE):
            download(server.url + "blob.bin", tmp_path / "b.bin", max_bytes=1000, **FAST)
        assert server.count() == 2
    assert _leftovers(tmp_path) == ["www"]


def test_http_server_fixture_and_progress_bar(http_server, capsys):
    www = http_server.directory
    with open(os.path.join(www, "f.bin"), "wb") as f:
        f.write(b"z" * 50_000)
    http_server.add_faults(Fault.status(502, path="/f.bin"))
    dest = os.path.join(os.path.dirname(www), "f.bin")
    download(http_server.url + "f.bin", dest, retries=1, backoff=0.01, progress=True)
    assert open(dest, "rb").read() == b"z" * 50_000
    assert [r.fault for r in http_server.requests] == ["status", None]
    assert "f.bin" in capsys.readouterr().err  # the tqdm bar was drawn


def test_check_hash(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc" * 100_000)
    sha1 = hashlib.sha1(f.read_bytes()).hexdigest()
    sha256 = hashlib.sha256(f.read_bytes()).hexdigest()
    assert file_digest(f, "sha1") == sha1
    assert check_hash(f, sha1=sha1) and check_hash(f, sha256=sha256.upper(), sha1=sha1)
    assert not check_hash(f, sha1=sha1, sha256="1" * 64)
    assert not check_hash(tmp_path / "missing", sha1=sha1)
    with pytest.raises(ValueError):
        check_hash(f)
    with pytest.raises(ValueError):
        check_hash(f, sha1=sha1[:8])


# --- hostile archives ------------------------------------------------------------------------

import io  # noqa: E402
import stat  # noqa: E402
import tarfile  # noqa: E402
import zipfile  # noqa: E402

from mxvision.io.download import safe_extract_tar, safe_extract_zip  # noqa: E402


def _zip(path, members):
    """members: (name, bytes, unix_mode or None)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.create_system = 3
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root)
                  for f in files + [x for x in dirs if os.path.islink(os.path.join(d, x))])


def test_zip_extracts_normal_members(tmp_path):
    z = _zip(tmp_path / "ok.zip", [("a.params", b"x" * 1000, None), ("sub/", b"", stat.S_IFDIR | 0o755),
                                   ("sub/b.txt", b"hi", stat.S_IFREG | 0o644)])
    written = safe_extract_zip(z, tmp_path / "out")
    assert sorted(os.path.relpath(p, tmp_path / "out") for p in written) == ["a.params", "sub/b.txt"]
    assert (tmp_path / "out" / "sub" / "b.txt").read_bytes() == b"hi"


@pytest.mark.parametrize("name, mode, why", [
    ("/etc/evil", None, "absolute path"),
    ("C:\\evil", None, "absolute path"),
    ("../evil", None, "'..' in path"),
    ("ok/../../evil", None, "'..' in path"),
    ("link", stat.S_IFLNK | 0o777, "symbolic link"),
    ("dev", stat.S_IFCHR | 0o644, "device"),
])
def test_zip_refuses_hostile_members_before_writing_anything(tmp_path, name, mode, why):
    z = _zip(tmp_path / "bad.zip", [("first.txt", b"1", None), (name, b"../../etc/passwd", mode)])
    with pytest.raises(DownloadError, match=why) as info:
        safe_extract_zip(z, tmp_path / "out")
    assert str(info.value).startswith(str(z) + ": refusing to extract member")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]  # not even an empty "out"


def test_zip_size_limits_and_garbage(tmp_path):
    z = _zip(tmp_path / "big.zip", [("a", b"0" * 5000, None), ("b", b"0" * 5000, None)])
    with pytest.raises(DownloadError, match="exceeds the 4000-byte member limit"):
        safe_extract_zip(z, tmp_path / "out", max_size=4000)
    with pytest.raises(DownloadError, match="beyond the 8000-byte limit"):
        safe_extract_zip(z, tmp_path / "out", max_total=8000)
    assert _tree(tmp_path / "out") == []
    html = tmp_path / "page.zip"
    html.write_bytes(b"<html>login</html>")
    with pytest.raises(DownloadError, match="not a readable zip archive"):
        safe_extract_zip(html, tmp_path / "out")


def test_tar_extracts_files_dirs_and_inside_links(tmp_path):
    t = _tar(tmp_path / "ok.tgz", [("d", tarfile.DIRTYPE, None), ("d/f.txt", tarfile.REGTYPE, b"data"),
                                   ("d/sym", tarfile.SYMTYPE, "f.txt"), ("hard", tarfile.LNKTYPE, "d/f.txt")])
    safe_extract_tar(t, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "d" / "sym").read_bytes() == b"data" and os.readlink(out / "d" / "sym") == "f.txt"
    assert (out / "hard").read_bytes() == b"data" and not (out / "hard").is_symlink()


@pytest.mark.parametrize("members, why", [
    ([("/abs", tarfile.REGTYPE, b"x")], "absolute path"),
    ([("../up", tarfile.REGTYPE, b"x")], "'..' in path"),
    ([("s", tarfile.SYMTYPE, "/etc/passwd")], "link to absolute path"),
    ([("d/s", tarfile.SYMTYPE, "../../outside")], "points outside"),
    ([("h", tarfile.LNKTYPE, "../outside")], "points outside"),
    ([("dev", tarfile.CHRTYPE, None)], "device, fifo"),
    ([("fifo", tarfile.FIFOTYPE, None)], "device, fifo"),
    # Each link is harmless lexically; together a/b resolves to dest/.. -- caught by realpath.
    ([("a", tarfile.SYMTYPE, "."), ("a/b", tarfile.SYMTYPE, ".."), ("a/b/evil", tarfile.REGTYPE, b"x")],
     "resolves outside the destination"),
])
def test_tar_refuses_hostile_members(tmp_path, members, why):
    t = _tar(tmp_path / "bad.tgz", members)
    with pytest.raises(DownloadError, match=why):
        safe_extract_tar(t, tmp_path / "dest" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tgz"]  # no "dest/out" either
    assert not any("evil" in p or "up" == p for p in _tree(tmp_path / "dest"))


def test_tar_does_not_write_through_existing_symlink_or_beyond_limits(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "out"
    dest.mkdir()
    os.symlink(outside, dest / "escape")
    t = _tar(tmp_path / "t.tgz", [("escape/x.txt", tarfile.REGTYPE, b"pwned")])
    with pytest.raises(DownloadError, match="resolves outside the destination"):
        safe_extract_tar(t, dest)
    assert list(outside.iterdir()) == []
    big = _tar(tmp_path / "big.tgz", [("f", tarfile.REGTYPE, b"0" * 3000)])
    with pytest.raises(DownloadError, match="3000 bytes exceeds the 1000-byte member limit"):
        safe_extract_tar(big, dest, max_size=1000)
    assert not (dest / "f").exists()
