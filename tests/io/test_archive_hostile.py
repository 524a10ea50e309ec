"""Hostile and damaged archives, bombs and endless downloads (issue 14, item 3).

What must hold whatever the archive: nothing is written outside the destination, whatever the
order of its links; no link pointing outside survives; stamps written afterwards never follow a
link; a corrupt or truncated archive (tar header, gzip CRC and length, xz, bz2, zip) fails with
one line naming it and leaves no partial result; decompression and downloads stop at a cap; and
the archive's file modes survive (masked, never setuid or writable by others). Every archive is
generated here with tests/support/archive_builders.py; the CLI cases run the real command line.
"""
import gzip
import os
import random
import stat
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from support.archive_builders import (cut, flip_byte, gzip_bomb, make_tar, make_zip, patch_zip,
                                      tar_bytes, tree_state)
from support.cli import one_line_error, run_cli
from support.httpserver import Fault
from mxvision.data import nih, openi
from mxvision.data.openi_download import EXTRACTED_MARK, extract_once
from mxvision.errors import BadIndex, DownloadError
from mxvision.io.archive import MAX_READ, safe_extract_tar, safe_extract_zip

REG, DIR, SYM, HARD = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
# With "a -> ." each "a/" stays in the destination and each "../" climbs one level above it.
CLIMB_TWO = "a/a/../../victim"


def _refused(call, subject, *fragments, error=DownloadError):
    """``call()`` raises ``error`` whose message is one line naming ``subject``."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{subject}: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture
def nest(tmp_path):
    """``outer/inner/`` for archives and destinations; ``outer/victim`` is two levels above a
    destination ``outer/inner/dest``, where CLIMB_TWO lands."""
    inner = tmp_path / "outer" / "inner"
    inner.mkdir(parents=True)
    return inner, tmp_path / "outer" / "victim"


# ------------------------------------------------------------------ links, whatever their order
@pytest.mark.parametrize("victim_exists", [False, True])
@pytest.mark.parametrize("dest_exists", [False, True])
def test_link_order_attack_on_the_stamp_writes_nothing_outside(nest, victim_exists, dest_exists):
    """Each link is harmless when it is made; together the stamp resolves two levels up."""
    inner, victim = nest
    if victim_exists:
        victim.write_bytes(b"precious")
    dest = inner / "dest"
    if dest_exists:
        dest.mkdir()
        (dest / "earlier.txt").write_bytes(b"kept")
    before = tree_state(dest)
    t = make_tar(inner / "evil.tgz", [(EXTRACTED_MARK, SYM, CLIMB_TWO), ("a", SYM, ".")])
    _refused(lambda: extract_once(t, dest), t, EXTRACTED_MARK, "resolves outside the destination")
    assert victim.read_bytes() == b"precious" if victim_exists else not os.path.lexists(victim)
    assert sorted(os.listdir(inner)) == ["dest", "evil.tgz"] if dest_exists else ["evil.tgz"]
    assert tree_state(dest) == before


@pytest.mark.parametrize("members", [
    [("images/x.png", SYM, "/etc/passwd")],
    [("images/x.png", SYM, "../../etc/passwd")],
    [("images/x.png", SYM, "../" + CLIMB_TWO), ("a", SYM, ".")],
    [("a", SYM, "."), ("images/x.png", SYM, "../" + CLIMB_TWO)],
    [("up", SYM, "a/a/../.."), ("a", SYM, "."), ("up/victim", REG, b"pwned")],
    [("a", SYM, "."), ("a/a/b", SYM, ".."), ("a/b/victim", REG, b"pwned")],
    [("x", REG, b"1"), ("copy", HARD, CLIMB_TWO), ("a", SYM, ".")],
], ids=["absolute", "dotdot", "chain-link-first", "chain-link-last", "write-through-chain",
        "nested-chain", "hardlink-through-chain"])
def test_links_pointing_outside_never_survive(nest, members):
    inner, victim = nest
    t = make_tar(inner / "t.tgz", [("images", DIR, None)] + members)
    _refused(lambda: safe_extract_tar(t, inner / "dest"), t)
    assert not os.path.lexists(victim) and sorted(os.listdir(inner)) == ["t.tgz"]


def test_a_member_over_a_link_is_refused_if_the_link_leaves_else_replaces_it(nest):
    """Never written through; refused outright when the link leads outside (as tarfile's 'data'
    filter does, so every Python version behaves the same)."""
    inner, victim = nest
    victim.write_bytes(b"precious")
    t = make_tar(inner / "t.tgz", [("x", SYM, CLIMB_TWO), ("a", SYM, "."), ("x", REG, b"mine")])
    _refused(lambda: safe_extract_tar(t, inner / "dest"), t, "'x'", "resolves outside")
    assert victim.read_bytes() == b"precious" and sorted(os.listdir(inner)) == ["t.tgz"]
    t = make_tar(inner / "t.tgz", [("f", REG, b"f"), ("x", SYM, "f"), ("x", REG, b"mine")])
    safe_extract_tar(t, inner / "dest")
    assert tree_state(inner / "dest") == {"f": b"f", "x": b"mine"}


def test_a_new_link_that_leaves_through_a_link_already_in_the_destination_is_undone(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_bytes(b"old")
    os.symlink(outside, dest / "old")  # left there by someone else
    before = tree_state(dest)
    t = make_tar(tmp_path / "t.tgz", [("keep.txt", REG, b"new"), ("new", SYM, "old/secret.txt")])
    _refused(lambda: safe_extract_tar(t, dest), t, "'new'", "resolves outside the destination")
    assert tree_state(dest) == before and tree_state(outside) == {"secret.txt": b"secret"}
    assert sorted(os.listdir(tmp_path)) == ["dest", "outside", "t.tgz"]


def test_a_merge_that_fails_half_way_puts_back_what_it_replaced(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a.txt").write_bytes(b"old a")
    (dest / "b").write_bytes(b"a file where the archive has a folder")
    before = tree_state(dest)
    t = make_tar(tmp_path / "t.tgz", [("a.txt", REG, b"new a"), ("b/c.txt", REG, b"c")])
    _refused(lambda: safe_extract_tar(t, dest), t, "cannot write member 'b'")
    assert tree_state(dest) == before and sorted(os.listdir(tmp_path)) == ["dest", "t.tgz"]


def test_the_stamp_is_never_read_or_written_through_a_link_or_a_fifo(nest):
    inner, victim = nest
    victim.write_bytes(b"precious")
    dest = inner / "dest"
    dest.mkdir()
    os.symlink(victim, dest / EXTRACTED_MARK)
    t = make_tar(inner / "ok.tgz", [("f.txt", REG, b"data")])
    assert extract_once(t, dest) == 1
    assert victim.read_bytes() == b"precious" and not (dest / EXTRACTED_MARK).is_symlink()
    assert extract_once(t, dest) is None  # the stamp it wrote counts
    (dest / EXTRACTED_MARK).unlink()
    os.mkfifo(dest / EXTRACTED_MARK)  # reading a FIFO would block for ever
    assert extract_once(t, dest) == 1 and (dest / EXTRACTED_MARK).is_file()


# ------------------------------------------------------------------ corrupt and truncated archives
def _three_members():
    rng = random.Random(0)
    return [(f"m{i}.bin", REG, rng.getrandbits(160_000).to_bytes(20_000, "little")) for i in range(3)]


@pytest.mark.parametrize("compress", [False, True])
def test_a_bad_tar_header_midway_fails_and_extracts_nothing(tmp_path, compress):
    raw = bytearray(tar_bytes([(f"{name}.txt", REG, name.encode() * 600)
                               for name in ("one", "two", "three")]))
    second = raw.find(b"two.txt")
    raw[second + 100] ^= 0x55  # the header's mode field: its checksum no longer matches
    t = tmp_path / ("bad.tgz" if compress else "bad.tar")
    t.write_bytes(gzip.compress(bytes(raw), mtime=0) if compress else bytes(raw))
    _refused(lambda: safe_extract_tar(t, tmp_path / "dest"), t, f"bad tar header at byte {second}")
    assert sorted(os.listdir(tmp_path)) == [t.name]


@pytest.mark.parametrize("damage", ["data", "crc", "length"])
def test_gzip_damage_is_caught_by_its_crc_and_length(tmp_path, damage):
    raw = tar_bytes([("a.txt", REG, b"A" * 5000), ("b.txt", REG, b"B" * 5000)])
    data = bytearray(gzip.compress(raw, compresslevel=0, mtime=0))  # stored: bytes as they are
    at = {"data": data.find(b"B" * 100) + 10, "crc": len(data) - 8, "length": len(data) - 1}[damage]
    data[at] ^= 0x01
    t = tmp_path / "t.tgz"
    t.write_bytes(bytes(data))
    _refused(lambda: safe_extract_tar(t, tmp_path / "dest"), t, "corrupt")
    assert sorted(os.listdir(tmp_path)) == ["t.tgz"]


@pytest.mark.parametrize("damage", ["cut", "flip"])
@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_truncated_or_damaged_compressed_tars_fail_in_one_line(tmp_path, compression, damage):
    good = make_tar(tmp_path / f"good.tar.{compression}", _three_members(), mode="w:" + compression)
    size = os.path.getsize(good)
    bad = tmp_path / f"bad.tar.{compression}"
    if damage == "cut":
        cut(good, size * 2 // 3, bad)
    else:
        flip_byte(good, size // 2, bad)
    _refused(lambda: safe_extract_tar(bad, tmp_path / "dest"), bad)
    assert not (tmp_path / "dest").exists()
    assert len(safe_extract_tar(good, tmp_path / "dest")) == 3  # the undamaged one extracts


@pytest.mark.parametrize("damage, fragment", [
    ("crc", "corrupt member 'data.bin'"),
    ("encrypted", "encrypted"),
    ("method", "compression method 98"),
    ("size past end", "corrupt member 'data.bin'"),
    ("offset past end", "corrupt member 'data.bin'"),
])
def test_damaged_zips_fail_in_one_line_and_leave_nothing(tmp_path, damage, fragment):
    z = make_zip(tmp_path / "ok.zip", [("first.txt", b"1"), ("data.bin", bytes(range(256)) * 40)],
                 compression=zipfile.ZIP_STORED)
    one = make_zip(tmp_path / "one.zip", [("data.bin", bytes(range(256)) * 40)],
                   compression=zipfile.ZIP_STORED)
    bad = tmp_path / "bad.zip"
    if damage == "crc":
        flip_byte(z, Path(z).read_bytes().find(bytes(range(256))) + 300, bad)
    elif damage == "encrypted":
        patch_zip(one, bad, flags=0x1)
    elif damage == "method":
        patch_zip(one, bad, method=98)
    elif damage == "size past end":
        patch_zip(one, bad, compressed_size=10 ** 9, file_size=10 ** 9)
    else:
        patch_zip(one, bad, header_offset=10 ** 6)
    _refused(lambda: safe_extract_zip(bad, tmp_path / "dest"), bad, fragment)
    assert not (tmp_path / "dest").exists()


# ------------------------------------------------------------------ modes
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_file_modes_are_kept_masked_and_never_setuid_or_writable_by_others(tmp_path, umask):
    modes = {"run.sh": 0o755, "data.txt": 0o644, "private": 0o600, "suid": 0o4755,
             "everyone": 0o666, "readonly": 0o444}
    expected = {"run.sh": 0o755, "data.txt": 0o644, "private": 0o600, "suid": 0o755,
                "everyone": 0o644, "readonly": 0o644}
    t = make_tar(tmp_path / "m.tgz", [(name, REG, b"x", mode) for name, mode in modes.items()])
    z = make_zip(tmp_path / "m.zip", [(name, b"x", stat.S_IFREG | mode) for name, mode in modes.items()])
    old = os.umask(umask)
    try:
        safe_extract_tar(t, tmp_path / "tar")
        safe_extract_zip(z, tmp_path / "zip")
    finally:
        os.umask(old)
    for folder in ("tar", "zip"):
        got = {name: stat.S_IMODE(os.stat(tmp_path / folder / name).st_mode) for name in modes}
        assert got == {name: mode & ~umask for name, mode in expected.items()}, folder


# ------------------------------------------------------------------ decompression caps
def test_declared_sizes_over_the_cap_are_refused_before_anything_is_decompressed(tmp_path):
    t = make_tar(tmp_path / "t.tgz", [("a", REG, b"x" * 3000), ("b", REG, b"x" * 3000)])
    _refused(lambda: safe_extract_tar(t, tmp_path / "dest", max_total=5000), t,
             "beyond the 5000-byte limit")
    huge = tarfile.TarInfo("huge.bin")
    huge.size = 1 << 40  # a terabyte declared, a megabyte of zeros behind it
    bomb = tmp_path / "bomb.tgz"
    bomb.write_bytes(gzip.compress(huge.tobuf(format=tarfile.GNU_FORMAT) + bytes(1 << 20)))
    _refused(lambda: safe_extract_tar(bomb, tmp_path / "dest"), bomb, "exceeds the")
    pax = tarfile.TarInfo("header")
    pax.type, pax.size = tarfile.XHDTYPE, 1 << 30  # tarfile would read a pax header whole
    paxbomb = tmp_path / "pax.tgz"
    paxbomb.write_bytes(gzip.compress(pax.tobuf(format=tarfile.USTAR_FORMAT) + bytes(1 << 20)))
    _refused(lambda: safe_extract_tar(paxbomb, tmp_path / "dest"), paxbomb,
             "a header or read of %d bytes, more than the %d-byte limit" % (pax.size, MAX_READ))
    assert sorted(os.listdir(tmp_path)) == ["bomb.tgz", "pax.tgz", "t.tgz"]


NIH_HEADER = (b"Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              b"View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
NIH_ROW = b"00000001_000.png,No Finding,0,1,58,M,PA,2682,2749,0.143,0.143\n"


def test_a_gzip_bombed_label_table_is_refused_at_the_cap(tmp_path):
    """5 GB of valid rows in 5 MB: refused after 32 MiB, quickly, whatever reads it."""
    block = NIH_ROW * ((1 << 20) // len(NIH_ROW))
    table = gzip_bomb(tmp_path / "Data_Entry_2017_v2020.csv.gz", NIH_HEADER, block, 5000)
    assert os.path.getsize(table) < 20 << 20
    start = time.monotonic()
    _refused(lambda: nih.read_data_entry(table), table, "more than", error=BadIndex)
    metadata = gzip_bomb(tmp_path / "nlmcxr_dicom_metadata.csv.gz", b"imageid,View Position\n",
                         b"CXR1_1_IM-0001-3001,PA\n" * 40_000, 5000)
    _refused(lambda: openi.read_metadata(metadata), metadata, "more than", error=BadIndex)
    assert time.monotonic() - start < 10
    small = gzip_bomb(tmp_path / "small.csv.gz", NIH_HEADER, NIH_ROW, 3)
    assert len(nih.read_data_entry(small)) == 3


# ------------------------------------------------------------------ the real command line
def _reports(count=150):
    return [(f"ecgen-radiology/{i}.xml", REG,
             b'<eCitation><uId id="CXR%d"/><MeSH><major>normal</major></MeSH>'
             b'<parentImage id="CXR%d_1_IM-0001-3001"/></eCitation>' % (i, i))
            for i in range(1, count + 1)]


def _index_openi(reports, out):
    return run_cli("data", "index", "openi", "--reports", reports, "--views", "all", "--out", out)


@pytest.mark.parametrize("damage", ["xz flipped", "xz cut", "header midway", "gzip crc"])
def test_index_openi_refuses_a_damaged_report_archive_in_one_line(tmp_path, damage):
    if damage.startswith("xz"):
        good = make_tar(tmp_path / "good.tar.xz", _reports(), mode="w:xz")
        size = os.path.getsize(good)
        bad = tmp_path / "bad.tar.xz"
        flip_byte(good, size // 2, bad) if damage == "xz flipped" else cut(good, size // 2, bad)
    else:
        data = bytearray(tar_bytes(_reports()))
        suffix = ".tar"
        if damage == "header midway":
            data[data.find(b"ecgen-radiology/75.xml") + 100] ^= 0x55
        else:  # stored gzip; one report's "normal" becomes "nosmal": only the CRC can tell
            good_gz = gzip.compress(bytes(data), compresslevel=0, mtime=0)
            data = bytearray(good_gz)
            data[data.find(b"normal", data.find(b"CXR99")) + 2] ^= 0x01
            suffix = ".tgz"
        good = tmp_path / ("good" + suffix)
        good.write_bytes(good_gz if suffix == ".tgz" else tar_bytes(_reports()))
        bad = tmp_path / ("bad" + suffix)
        bad.write_bytes(bytes(data))
    assert _index_openi(good, tmp_path / "good.csv")[0] == 0
    code, out, err = _index_openi(bad, tmp_path / "bad.csv")
    one_line_error(code, err, str(bad))
    assert code == 2 and not (tmp_path / "bad.csv").exists()


@pytest.mark.parametrize("kind", ["link order", "gzip crc", "xz cut"])
def test_download_url_extract_refuses_hostile_archives_in_one_line(http_server, nest, kind):
    inner, victim = nest
    www = Path(http_server.directory)
    if kind == "link order":
        name = "evil.tgz"
        make_tar(www / name, [(EXTRACTED_MARK, SYM, CLIMB_TWO), ("a", SYM, ".")])
    elif kind == "gzip crc":
        name = "crc.tgz"
        data = bytearray(gzip.compress(tar_bytes(_three_members()), compresslevel=0, mtime=0))
        data[len(data) // 2] ^= 0x01
        (www / name).write_bytes(bytes(data))
    else:
        name = "cut.tar.xz"
        good = make_tar(inner / "good.tar.xz", _three_members(), mode="w:xz")
        cut(good, os.path.getsize(good) // 2, www / name)
        good.unlink()
    code, out, err = run_cli("data", "download", "url", http_server.url + name, "--out",
                             inner / name, "--extract", inner / "dest", "--quiet", "--retries", "0")
    one_line_error(code, err, str(inner / name))
    assert code == 2 and not os.path.lexists(victim)
    assert sorted(os.listdir(inner)) == [name]  # the download is kept, nothing extracted


def test_download_url_stops_an_endless_source_at_the_cap(http_server, tmp_path):
    http_server.add_faults(Fault.endless())
    out = tmp_path / "endless.bin"
    start = time.monotonic()
    code, _, err = run_cli("data", "download", "url", http_server.url + "endless.bin", "--out",
                           out, "--max-size", "0.001", "--quiet", "--retries", "2")
    one_line_error(code, err, "download size cap", "1073741 bytes")
    assert code == 2 and os.listdir(tmp_path) == ["www"] and http_server.count() == 1
    assert time.monotonic() - start < 20
