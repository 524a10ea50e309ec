"""Hostile image files: bombs, lying headers, endless scans, malformed DICOM, decoder chatter.

Every file is generated here (nothing binary is committed) and goes through mxvision twice, each
time in a subprocess whose address space is capped at its own baseline + 1 GiB
(``RLIMIT_AS``, set once the libraries are loaded and a few good files were read, so the
baseline holds what the command needs anyway):

* ``read_image`` on every file, two threads at a time while a third writes numbered lines to
  stderr: each bad file is refused with its one-line ``BadImage`` within 10 s, peak RSS stays
  under 1 GB above the baseline, every good file is read, and stderr holds exactly the numbered
  lines -- no libpng/libjpeg chatter, no warning, nothing lost or reordered;
* ``mxvision predict`` on all of them at once: one line per file, ``ERROR`` and the reason for
  each bad one, scores for each good one, and nothing at all on stderr.

RecordIO records forged in a real pack are refused from their headers, before MXNet or OpenCV
allocate what they declare.
"""
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import pytest

pytest.importorskip("pydicom")
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, UID  # noqa: E402

from support.dicom_builders import (  # noqa: E402
    BITS_ALLOCATED, BITS_STORED, FRAMES, ROWS, SAMPLES, UNDEFINED, deflated_bomb, element,
    encapsulated, file_meta, image_elements, raw_dicom)
from support.image_builders import (  # noqa: E402
    insert_chunks, jpeg_bytes, jpeg_declaring, jpeg_with_scans, png_chunk, png_file, smooth_image,
    tiff_file, tiff_page, zlib_zeros)

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30
US = lambda value: struct.pack("<H", value)  # noqa: E731


def _duplicate_width_tiff():
    """libtiff keeps the first ImageWidth (15000); a reader keeping the last would see 100."""
    page = tiff_page(15000, 15000, data=zlib.compress(bytes(15000 * 200), 1), compression=8)
    page["entries"] = page["entries"][:1] + [(256, 4, 1, 100), (257, 4, 1, 100)] + page["entries"][1:]
    return tiff_file([page])


def _entry_flood_tiff():
    page = tiff_page(64, 64)
    page["entries"] += [(40000 + k, 3, 1, 1) for k in range(5000)]
    return tiff_file([page])


def _tile_bomb_tiff():
    """A 64x64 image in one 16384x16384 tile: the tile buffer, not the image, is the bomb."""
    entries = [(256, 4, 1, 64), (257, 4, 1, 64), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (277, 3, 1, 1), (322, 4, 1, 16384), (323, 4, 1, 16384), (324, 4, 1, "DATA"),
               (325, 4, 1, 16384 * 16384)]
    return tiff_file([{"entries": entries, "data": bytes(4096)}])


def _element_flood_dicom():
    flood = b"".join(struct.pack("<HH2sH", 0x0009, 0x1000 + k % 0xE000, b"LO", 0) for k in range(150_000))
    body = image_elements()
    return raw_dicom(element(0x00080060, b"CS", "DX") + flood + body[body.index(b"\x28\x00"):])


def _segmented_palette_dicom():
    segments = struct.pack("<HHH", 1, 65535, 0) * 100  # 100 linear segments of 65535 entries each
    descriptor = struct.pack("<HHH", 0, 0, 16)
    extra = {tag: (b"OW", segments) for tag in (0x00281221, 0x00281222, 0x00281223)}
    extra.update({tag: (b"US", descriptor) for tag in (0x00281101, 0x00281102, 0x00281103)})
    return raw_dicom(image_elements(photometric="PALETTE COLOR", extra=extra))


def _j2k(lie=None):
    """A JPEG 2000 codestream of a 64 px image (Pillow's OpenJPEG), its SIZ size patched to ``lie``."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(smooth_image(64)).save(buffer, "JPEG2000", no_jp2=True, irreversible=False)
    codestream = bytearray(buffer.getvalue())
    if lie:
        struct.pack_into(">II", codestream, codestream.find(b"\xff\x4f\xff\x51") + 8, lie, lie)
    return raw_dicom(image_elements(pixels=encapsulated([bytes(codestream)])), JPEG2000Lossless)


def _nested_encapsulation_dicom():
    inner = encapsulated([jpeg_bytes(smooth_image(64))])[12:]  # items of a second encapsulation
    item = (struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED), inner)
    return raw_dicom(image_elements(pixels=encapsulated([item])), JPEGBaseline8Bit)


IMG = smooth_image(128)
PNG = cv2.imencode(".png", IMG)[1].tobytes()
JPG = jpeg_bytes(IMG)
DEFLATED_OK = raw_dicom(image_elements(), deflate=True)
TEXT_BOMB = zlib.compress(bytes(7_000_000), 9)  # libpng inflates text chunks up to 8 MB each

# (file name, builder, None for a good file or a fragment of its one-line BadImage)
CASES = [
    # PNG: compressed ancillary chunks (skipped, never inflated), then broken or lying files
    ("png_ztxt_flood.png", lambda: insert_chunks(PNG, [png_chunk(b"zTXt", b"c%d\0\0" % k + TEXT_BOMB)
                                                       for k in range(60)]), None),
    ("png_iccp_bomb.png", lambda: insert_chunks(PNG, [png_chunk(b"iCCP", b"icc\0\0" + zlib_zeros(GiB))]), None),
    ("png_itxt_bomb.png", lambda: insert_chunks(PNG, [png_chunk(b"iTXt", b"T\0\1\0\0\0" + zlib_zeros(GiB))]),
     None),
    ("png_bad_deflate.png", lambda: png_file(128, 128, b"\x78\x9c" + bytes(range(256)) * 4),
     "cannot decode the PNG data"),
    ("png_truncated.png", lambda: PNG[:len(PNG) * 2 // 3], "chunk runs past the end of the file"),
    ("png_length_past_end.png", lambda: PNG[:33] + struct.pack(">I", 0x7FFFFFF0) + PNG[37:],
     "chunk runs past the end of the file"),
    ("png_zero_height.png", lambda: png_file(128, 0, zlib.compress(b"")), "empty image (128x0)"),
    ("png_ihdr_bomb.png", lambda: png_file(60000, 60000, zlib_zeros(1 << 20)), "megapixels"),
    ("png_rgba16_over_budget.png", lambda: png_file(9000, 9000, zlib_zeros(1 << 20), 16, 6),
     "over the limit of 900 MiB"),
    ("png_huge_palette.png", lambda: png_file(
        128, 128, zlib.compress(bytes(129 * 128)), colour_type=3,
        before_idat=[png_chunk(b"PLTE", bytes(3 * 300))]), "cannot decode the PNG data"),
    ("png_unknown_critical.png", lambda: insert_chunks(PNG, [png_chunk(b"ABCD", b"x")]),
     "unknown critical chunk ABCD"),
    ("png_7_bit.png", lambda: png_file(128, 128, zlib.compress(bytes(129 * 128)), bit_depth=7),
     "cannot decode the PNG data"),
    # JPEG: scans that never end, lying frame headers, corrupt and flooded streams
    ("jpg_endless_scans.jpg", lambda: jpeg_with_scans(smooth_image(2000), 100_000), "over 100 scans"),
    ("jpg_101_scans.jpg", lambda: jpeg_with_scans(IMG, 95), "over 100 scans"),
    ("jpg_sof_bomb.jpg", lambda: jpeg_declaring(JPG, 65000, 65000), "megapixels"),
    ("jpg_corrupt_scan.jpg", lambda: JPG[:400] + bytes(range(256))[::-1] * 4 + JPG[1424:], None),
    ("jpg_truncated.jpg", lambda: JPG[:len(JPG) // 2], "cannot decode the JPEG data"),
    ("jpg_marker_flood.jpg", lambda: JPG[:2] + b"\xff\xfe\x00\x02" * 20_000 + JPG[2:],
     "over 10000 marker segments"),
    ("jpg_fill_flood.jpg", lambda: JPG[:2] + b"\xff" * 5_000_000 + JPG[2:], None),
    # TIFF: every directory, duplicate tags, odd depths, BigTIFF
    ("tif_duplicate_width.tif", _duplicate_width_tiff, "tag 256 appears twice"),
    ("tif_second_page_bomb.tif", lambda: tiff_file([tiff_page(64, 64), tiff_page(50000, 50000, b"\0" * 16)]),
     "page 2 of the TIFF declares 50000x50000"),
    ("tif_entry_flood.tif", _entry_flood_tiff, "a directory of 5009 entries"),
    ("tif_rgb16_over_budget.tif", lambda: tiff_file([tiff_page(9000, 9000, b"\0" * 64, 16, 3)]),
     "over the limit of 900 MiB"),
    ("tif_tile_bomb.tif", _tile_bomb_tiff, "-pixel tiles for a 64x64 image (refused before decoding)"),
    ("tif_12_bit.tif", lambda: tiff_file([tiff_page(64, 64, bytes(64 * 96), bits=12)]), "12-bit"),
    ("tif_uint32.tif", lambda: tiff_file([tiff_page(64, 64, bytes(64 * 256), bits=32)]), "32-bit"),
    ("tif_64_samples.tif", lambda: tiff_file([tiff_page(64, 64, bytes(64 * 4096), samples=64)]),
     "64 samples per pixel"),
    ("bigtiff_bomb.tif", lambda: tiff_file([tiff_page(2 ** 33, 64, bytes(64), long_type=16)], big=True),
     "megapixels"),
    ("bigtiff_good.tif", lambda: tiff_file([tiff_page(64, 64, long_type=16)], big=True), None),
    # DICOM: deflate bombs, non-numeric and absurd image elements, lying and nested pixel data
    ("dcm_deflate_bomb.dcm", lambda: deflated_bomb(3 * GiB), "inflates to over 450 MiB"),
    ("dcm_deflate_truncated.dcm", lambda: DEFLATED_OK[:-40], "truncated deflated DICOM"),
    ("dcm_deflate_garbage.dcm", lambda: file_meta(UID("1.2.840.10008.1.2.1.99")) + bytes(range(256)) * 8,
     "corrupt deflated DICOM"),
    ("dcm_rows_text.dcm", lambda: raw_dicom(image_elements(extra={ROWS: (b"LO", "sixty")})),
     "Rows is not an integer ('sixty')"),
    ("dcm_frames_text.dcm", lambda: raw_dicom(image_elements(extra={FRAMES: (b"IS", "abc")})),
     "NumberOfFrames is not an integer ('abc')"),
    ("dcm_frames_negative.dcm", lambda: raw_dicom(image_elements(extra={FRAMES: (b"IS", "-3")})),
     "NumberOfFrames is -3"),
    ("dcm_frames_lying.dcm", lambda: raw_dicom(image_elements(extra={FRAMES: (b"IS", "99999999")})),
     "99999999 frame(s) of 64x64 need"),
    ("dcm_rows_two_values.dcm", lambda: raw_dicom(image_elements(extra={ROWS: (b"US", US(64) + US(64))})),
     "Rows holds 2 values"),
    ("dcm_bits_13.dcm", lambda: raw_dicom(image_elements(extra={BITS_ALLOCATED: (b"US", US(13))})),
     "BitsAllocated is 13"),
    ("dcm_samples_60000.dcm", lambda: raw_dicom(image_elements(extra={SAMPLES: (b"US", US(60000))})),
     "SamplesPerPixel is 60000"),
    ("dcm_stored_over_allocated.dcm", lambda: raw_dicom(image_elements(extra={BITS_STORED: (b"US", US(12))})),
     "BitsStored (12) exceeds"),
    ("dcm_pixels_short.dcm", lambda: raw_dicom(image_elements(pixels=bytes(1000))), "holds 1000 bytes"),
    ("dcm_over_budget.dcm", lambda: raw_dicom(image_elements(8000, 8000, bits=16, pixels=bytes(16))),
     "over the limit of 900 MiB"),
    ("dcm_element_flood.dcm", _element_flood_dicom, "over 100000 data elements"),
    ("dcm_frame_lies.dcm", lambda: raw_dicom(image_elements(pixels=encapsulated(
        [jpeg_declaring(jpeg_bytes(smooth_image(64)), 20000, 20000)])), JPEGBaseline8Bit),
     "first frame declares 20000x20000"),
    ("dcm_j2k_frame_lies.dcm", lambda: _j2k(lie=30000), "first frame declares 30000x30000"),
    ("dcm_frame_endless_scans.dcm", lambda: raw_dicom(image_elements(pixels=encapsulated(
        [jpeg_with_scans(smooth_image(64), 5000)])), JPEGBaseline8Bit), "over 100 scans"),
    ("dcm_nested_encapsulation.dcm", _nested_encapsulation_dicom, "nested in another"),
    ("dcm_fragment_flood.dcm", lambda: raw_dicom(image_elements(pixels=encapsulated([b""] * 150_000)),
                                                  JPEGBaseline8Bit), "over 100000 fragments"),
    ("dcm_voi_lut_huge.dcm", lambda: raw_dicom(image_elements(extra={0x00283010: (
        b"SQ", struct.pack("<HHI", 0xFFFE, 0xE000, 3_000_000) + bytes(3_000_000))})),
     "VOILUTSequence is 3000008 bytes"),
    ("dcm_segmented_palette.dcm", _segmented_palette_dicom, "segmented palette"),
    # good files in the same run
    ("good.png", lambda: PNG, None),
    ("good.jpg", lambda: JPG, None),
    ("good_progressive_colour.jpg", lambda: jpeg_bytes(smooth_image(128, channels=3), progressive=True), None),
    ("good.tif", lambda: tiff_file([tiff_page(64, 64)]), None),
    ("good_deflated.dcm", lambda: DEFLATED_OK, None),
    ("good_multiframe.dcm", lambda: raw_dicom(image_elements(frames=3)), None),
    ("good_j2k_frame.dcm", _j2k, None),
    ("good_jpeg_frame.dcm", lambda: raw_dicom(image_elements(pixels=encapsulated(
        [jpeg_bytes(smooth_image(64))])), JPEGBaseline8Bit), None),
]
GOOD = [name for name, _, fragment in CASES if fragment is None]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    for name, build, _ in CASES:
        (folder / name).write_bytes(build())
    return folder


# The baseline: the libraries loaded and good files read (threads, arenas), then the cap.
CAP_AFTER_WARM_UP = """
import re, resource
def vm_size():
    return int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
def cap_address_space():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + (1 << 30), hard))
"""

READ_ALL = CAP_AFTER_WARM_UP + """
import json, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from mxvision.errors import BadImage
from mxvision.io.images import read_image
folder, names, good = sys.argv[1], sys.argv[2].split("/"), sys.argv[3].split("/")
pool = ThreadPoolExecutor(2)
list(pool.map(lambda n: read_image(folder + "/" + n), good * 2))
cap_address_space()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def talk():
    for k in range(400):
        sys.stderr.write("own line %d\\n" % k)
        time.sleep(0.002)
talker = threading.Thread(target=talk)
talker.start()
def one(name):
    start = time.perf_counter()
    try:
        read_image(folder + "/" + name)
        outcome = "ok"
    except BadImage as err:
        outcome = str(err)
    except BaseException as err:
        outcome = "UNEXPECTED %s: %s" % (type(err).__name__, err)
    return {"name": name, "outcome": outcome, "seconds": time.perf_counter() - start}
results = list(pool.map(one, names))
talker.join()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"results": results, "rss_above_baseline": peak - base}))
"""


def test_every_file_is_read_or_refused_within_time_and_memory_and_quietly(corpus):
    names = [name for name, _, _ in CASES]
    proc = subprocess.run([sys.executable, "-c", READ_ALL, str(corpus), "/".join(names), "/".join(GOOD)],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    expected = {name: fragment for name, _, fragment in CASES}
    for result in report["results"]:
        name, outcome = result["name"], result["outcome"]
        if expected[name] is None:
            assert outcome == "ok", (name, outcome)
        else:
            assert outcome.startswith(f"{corpus / name}: ") and expected[name] in outcome, (name, outcome)
            assert "\n" not in outcome
        assert result["seconds"] < 10, (name, result["seconds"])
    assert report["rss_above_baseline"] < 1e9, report["rss_above_baseline"]
    # stderr: the other thread's lines, all of them, in order -- and nothing from any decoder
    assert proc.stderr.splitlines() == [f"own line {k}" for k in range(400)], proc.stderr[-2000:]


PREDICT = CAP_AFTER_WARM_UP + """
import sys
from mxvision import cli
run, folder, names, good = sys.argv[1], sys.argv[2], sys.argv[3].split("/"), sys.argv[4].split("/")
cli.main(["predict", "--run", run, "--ctx", "cpu"] + [folder + "/" + n for n in good])
cap_address_space()
for stream in (sys.stdout, sys.stderr):
    print("=== capped", file=stream, flush=True)
sys.exit(cli.main(["predict", "--run", run, "--ctx", "cpu"] + [folder + "/" + n for n in names]))
"""


def test_predict_lists_each_hostile_file_and_still_scores_the_good_ones(corpus, small_run):
    names = [name for name, _, _ in CASES]
    proc = subprocess.run([sys.executable, "-c", PREDICT, str(small_run), str(corpus), "/".join(names),
                           "/".join(GOOD)], capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    out = proc.stdout.split("=== capped\n", 1)[1].splitlines()
    err = proc.stderr.split("=== capped\n", 1)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(err) == 2 and err[1] == "", proc.stderr[-3000:]  # no chatter, no traceback
    assert len(out) == len(CASES)
    for (name, _, fragment), line in zip(CASES, out):
        path, status, detail = line.split("\t")
        assert path == str(corpus / name)
        if fragment is None:
            assert status != "ERROR" and "=" in detail, line
        else:
            assert status == "ERROR" and detail.startswith(f"{path}: ") and fragment in detail, line


# --------------------------------------------------------------------------- RecordIO records
@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """Real packs (224 px) of three records each, PNG- and JPEG-encoded."""
    from mxvision.data import recordio

    folder = tmp_path_factory.mktemp("pack")
    rows = ["path,label"]
    for k in range(3):
        cv2.imwrite(str(folder / f"{k}.png"), smooth_image(240, seed=k))
        rows.append(f"{folder / f'{k}.png'},{'normal' if k % 2 else 'nodule'}")
    (folder / "index.csv").write_text("\n".join(rows) + "\n")
    for encoding in ("png", "jpg"):
        recordio.pack_index(folder / "index.csv", folder / f"{encoding}.rec", encoding=encoding,
                            progress=False)
    return {encoding: folder / f"{encoding}.rec" for encoding in ("png", "jpg")}


def _rewrite(rec, key, payload=None, header=None):
    """Replace record ``key``'s image bytes (same label), or patch its 8-byte RecordIO header."""
    import mxnet as mx

    from mxvision.data.record_reader import open_source

    source = open_source(rec)
    reader = mx.recordio.MXIndexedRecordIO(source.idx, source.rec, "r")
    records = {k: reader.read_idx(k) for k in reader.keys}
    offsets = dict(reader.idx)
    reader.close()
    source.close()
    if payload is not None:
        label, _ = mx.recordio.unpack(records[key])
        records[key] = mx.recordio.pack(label, payload)
        writer = mx.recordio.MXIndexedRecordIO(source.idx, source.rec, "w")
        for k in sorted(records):
            writer.write_idx(k, records[k])
        writer.close()
    if header is not None:
        with open(source.rec, "r+b") as f:
            f.seek(offsets[key])
            f.write(header)


@pytest.mark.parametrize("encoding, forge, fragment", [
    ("png", dict(header=struct.pack("<II", 0xCED7230A, 400 << 20)), "record header declares 419430400 bytes"),
    ("png", dict(header=struct.pack("<II", 0xCED7230A, (1 << 29) | 100)), "continuation flag 1"),
    ("png", dict(header=b"\0" * 8), "no RecordIO header"),
    ("png", dict(payload=png_file(20000, 20000, zlib_zeros(1 << 20))), "record declares a 20000x20000 image"),
    ("png", dict(payload=png_file(224, 224, zlib.compress(bytes(673 * 224)), colour_type=2)), "of 3 x 8-bit"),
    ("png", dict(payload=b"GIF89a" + bytes(100)), "not png data"),
    ("jpg", dict(payload=jpeg_with_scans(smooth_image(224), 5000)), "over 100 scans"),
    ("jpg", dict(payload=jpeg_declaring(jpeg_bytes(smooth_image(224)), 30000, 30000)), "record declares a 30000x30000"),
])
def test_a_forged_record_is_refused_from_its_header(packs, tmp_path, encoding, forge, fragment):
    import shutil

    from mxvision.data.record_reader import RecordSource
    from mxvision.errors import BadImage

    copy = tmp_path / f"{encoding}.rec"
    for suffix in (".rec", ".idx", ".json", ".csv"):
        shutil.copy(packs[encoding].with_suffix(suffix), copy.with_suffix(suffix))
    _rewrite(copy, 1, **forge)
    source = RecordSource(copy)
    assert source.read(0)[1].shape == (224, 224)  # the records around it still read
    with pytest.raises(BadImage) as info:
        source.read(1)
    assert str(info.value).startswith(f"{copy}#1: ") and fragment in str(info.value), str(info.value)
    assert source.read(2)[1].shape == (224, 224)
    source.close()


def test_a_sequence_of_millions_of_items_is_refused_before_pydicom_builds_them(tmp_path):
    """1.5 million empty items in one undefined-length sequence (12 MB): pydicom built them all,
    twice (38 s, +1.9 GB RSS), and the file was then accepted."""
    import time

    import numpy as np

    from mxvision.errors import BadImage
    from mxvision.io.images import read_image
    from support.dicom_builders import dicom_bytes

    pixels = smooth_image(256, seed=3).astype(np.uint16) * 64
    good = dicom_bytes(pixels)
    at = good.index(struct.pack("<HH", 0x7FE0, 0x0010))  # splice before the pixel data
    sequence = (struct.pack("<HH2sHI", 0x0040, 0x0275, b"SQ", 0, 0xFFFFFFFF)
                + struct.pack("<HHI", 0xFFFE, 0xE000, 0) * 1_500_000
                + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    path = tmp_path / "items.dcm"
    path.write_bytes(good[:at] + sequence + good[at:])
    tic = time.monotonic()
    with pytest.raises(BadImage, match="1500000 sequence items or fragments, over the limit"):
        read_image(path)
    assert time.monotonic() - tic < 2
    path.write_bytes(good[:at] + sequence.replace(struct.pack("<HHI", 0xFFFE, 0xE000, 0) * 1_500_000,
                                                   struct.pack("<HHI", 0xFFFE, 0xE000, 0) * 10) + good[at:])
    assert read_image(path).shape == (256, 256)  # a few items: still read


def _tiled_tiff(width, height, tile_w, tile_h, tiles, bits=8, deflated=False):
    """A little-endian TIFF of ``width`` x ``height`` grey pixels in deflated tiles of
    ``tile_w`` x ``tile_h`` (``tiles``: the raw bytes of each tile, row-major, or its zlib stream
    when ``deflated``)."""
    blobs = list(tiles) if deflated else [zlib.compress(t, 6) for t in tiles]
    n = len(blobs)
    entries = [(256, 4, [width]), (257, 4, [height]), (258, 3, [bits]), (259, 3, [8]), (262, 3, [1]),
               (277, 3, [1]), (322, 4, [tile_w]), (323, 4, [tile_h]), (324, 4, None), (325, 4, [len(b) for b in blobs])]
    ifd_at = 8
    extra_at = ifd_at + 2 + 12 * len(entries) + 4
    offsets_at, counts_at = extra_at, extra_at + 4 * n
    data_at = counts_at + 4 * n if n > 1 else extra_at  # one offset and count fit their entries
    positions, pos = [], data_at
    for b in blobs:
        positions.append(pos)
        pos += len(b)
    entries[8] = (324, 4, positions)
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", len(entries)))
    for tag, kind, values in entries:
        if len(values) == 1:
            value = struct.pack("<HH", values[0], 0) if kind == 3 else struct.pack("<I", values[0])
        else:
            value = struct.pack("<I", offsets_at if tag == 324 else counts_at)
        out += struct.pack("<HHI", tag, kind, len(values)) + value
    out += struct.pack("<I", 0)
    if n > 1:
        out += struct.pack(f"<{n}I", *positions) + struct.pack(f"<{n}I", *[len(b) for b in blobs])
    return bytes(out) + b"".join(blobs)


def _zlib_repeated(block, times):
    """A zlib stream of ``block`` repeated ``times`` times, compressed once (full-flushed)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    one = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(times):
        adler = zlib.adler32(block, adler)
    return b"\x78\xda" + one * times + zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush() \
        + struct.pack(">I", adler)


def test_a_tiff_whose_tiles_dwarf_the_image_is_refused_before_decoding(tmp_path):
    """A 64x64 16-bit TIFF declaring one 23168x23168 tile (1 MB): +950 MB RSS, then scored."""
    import time

    from mxvision.errors import BadImage
    from mxvision.io.images import read_image

    side = 23168
    # the one tile's 1 GB, a ramp deflated 64 rows at a time (no 1 GB buffer in the test itself);
    # not constant, so without the tile rule the file is decoded (+1 GB) and accepted
    bomb = _tiled_tiff(64, 64, side, side, [_zlib_repeated(bytes(range(256)) * (side // 2), side // 64)],
                       bits=16, deflated=True)
    (tmp_path / "tile_bomb.tif").write_bytes(bomb)
    tic = time.monotonic()
    with pytest.raises(BadImage, match="23168x23168-pixel tiles for a 64x64 image"):
        read_image(tmp_path / "tile_bomb.tif")
    assert time.monotonic() - tic < 2
    # an ordinary tiled TIFF (tiles of 256 on a 300x200 image) still reads, pixel for pixel
    import numpy as np

    image = (np.arange(300 * 200) % 251).astype(np.uint8).reshape(200, 300)
    padded = np.zeros((256, 512), np.uint8)
    padded[:200, :300] = image
    tiles = [np.ascontiguousarray(padded[:, 0:256]).tobytes(), np.ascontiguousarray(padded[:, 256:512]).tobytes()]
    (tmp_path / "tiled.tif").write_bytes(_tiled_tiff(300, 200, 256, 256, tiles))
    got = read_image(tmp_path / "tiled.tif")
    np.testing.assert_allclose(got * 255, image, atol=1e-3)


def test_normal_tiled_tiffs_still_read_pixel_for_pixel(tmp_path):
    """The tile rule refuses only tiles far past the image: 16-bit 256 px tiles on a 600x500
    image (tiles overhanging two edges), 16 px tiles, and a 1024 px tile on a 64x64 image read."""
    import numpy as np

    from mxvision.io.images import read_image

    def tiled(image, tile):
        rows, cols = -(-image.shape[0] // tile), -(-image.shape[1] // tile)
        padded = np.zeros((rows * tile, cols * tile), image.dtype)
        padded[:image.shape[0], :image.shape[1]] = image
        tiles = [np.ascontiguousarray(padded[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]).astype("<u2"
                 if image.dtype == np.uint16 else np.uint8).tobytes() for r in range(rows) for c in range(cols)]
        return _tiled_tiff(image.shape[1], image.shape[0], tile, tile, tiles, bits=image.dtype.itemsize * 8)

    wide = (np.arange(500 * 600, dtype=np.uint32) * 37 % 65536).astype(np.uint16).reshape(500, 600)
    for name, image, tile in (("wide16.tif", wide, 256),
                              ("small_tiles.tif", (wide[:100, :80] // 256).astype(np.uint8), 16),
                              ("big_tile.tif", (wide[:64, :64] // 256).astype(np.uint8), 1024)):
        path = tmp_path / name
        path.write_bytes(tiled(image, tile))
        expected = image / (65535.0 if image.dtype == np.uint16 else 255.0)
        got = read_image(path)
        assert got.shape == image.shape, name
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=name)


STRIPS = """
import resource, sys
from mxvision.io.images import read_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    img = read_image(sys.argv[1])
    result = "%dx%d:%d" % (img.shape + (round(float(img[3, 5]) * 255),))
except Exception as exc:
    result = "%s(%s)" % (type(exc).__name__, str(exc).split(": ", 1)[1].replace(" ", "_"))
print(result, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("rows_per_strip", [64, 100_000, 23168 * 23168, 2 ** 32 - 1])
def test_rows_per_strip_past_the_image_is_one_strip_not_a_huge_buffer(tmp_path, rows_per_strip):
    """RowsPerStrip larger than ImageLength is legal (one strip): the decoder allocates the
    image's rows, not the declared ones (measured: +1 MB for 2**32-1 rows on 64x64), so strips
    need no rule of their own; this guards that. OpenCV itself refuses a strip of 64 x 23168**2
    declared pixels (its 1 GB tile check, before allocating): one line, no memory."""
    import numpy as np

    image = (np.arange(64 * 64) * 7 % 256).astype(np.uint8).reshape(64, 64)
    page = tiff_page(64, 64, data=zlib.compress(image.tobytes()), compression=8)
    page["entries"] = [e for e in page["entries"] if e[0] != 278] + [(278, 4, 1, rows_per_strip)]
    page["entries"].sort(key=lambda e: e[0])
    path = tmp_path / "strip.tif"
    path.write_bytes(tiff_file([page]))
    done = subprocess.run([sys.executable, "-c", STRIPS, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-2000:]
    result, grown_mb = done.stdout.split()
    if rows_per_strip == 23168 * 23168:
        assert result == "BadImage(cannot_decode_the_TIFF_data_(truncated_or_corrupt))", done.stdout
    else:
        assert result == f"64x64:{image[3, 5]}", done.stdout
    assert int(grown_mb) < 50, done.stdout


def _blank(fmt, value):
    import numpy as np

    from support.dicom_builders import dicom_bytes, dicom_float

    if fmt == "png16":
        return cv2.imencode(".png", np.full((64, 64), value, np.uint16))[1].tobytes()
    if fmt == "tif16":
        return tiff_file([tiff_page(64, 64, np.full((64, 64), value, "<u2").tobytes(), bits=16)])
    if fmt == "tif_float":
        return tiff_file([tiff_page(64, 64, np.full((64, 64), value, "<f4").tobytes(), bits=32,
                                    extra=[(339, 3, 1, 3)])])  # SampleFormat: IEEE float
    if fmt == "dcm":
        return dicom_bytes(np.full((64, 64), value, np.uint16))
    if fmt == "dcm_float":
        return dicom_float(np.full((64, 64), value, np.float32))
    if fmt == "tif":
        return tiff_file([tiff_page(64, 64, bytes([value]) * 4096)])
    return cv2.imencode("." + fmt, np.full((64, 64, 3) if fmt == "jpg" else (64, 64), value, np.uint8))[1].tobytes()


@pytest.mark.parametrize("fmt, value", [("png", 0), ("png", 255), ("jpg", 0), ("jpg", 200), ("tif", 0),
                                        ("png16", 4095), ("tif16", 0), ("tif_float", 3.5), ("dcm", 7),
                                        ("dcm_float", 0.25)])
def test_a_blank_image_is_one_and_the_same_refusal_in_every_format(tmp_path, fmt, value):
    """An all-black JPEG scored nodule=0.6755 while a blank DICOM or float TIFF was refused: now a
    constant image is refused after decoding in every format, with the one message naming the
    stored value (headers.check_not_blank)."""
    from mxvision.errors import BadImage
    from mxvision.io.images import read_image

    path = tmp_path / f"blank_{fmt}.{fmt[:3] if fmt[:3] != 'dcm' else 'dcm'}"
    path.write_bytes(_blank(fmt, value))
    with pytest.raises(BadImage) as info:
        read_image(path)
    assert str(info.value) == f"{path}: the image is blank (every pixel is {float(value):g})"


PAGEMAP_PREDICT = """
import contextlib, io, resource, sys
from mxvision import cli
run, good = sys.argv[1], sys.argv[2]
assert cli.main(["predict", "--run", run, "--ctx", "cpu", good]) == 0  # model and libraries loaded
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
err = io.StringIO()
with contextlib.redirect_stderr(err):
    try:
        code = cli.main(["predict", "--run", run, "--ctx", "cpu", "--strict", "/proc/self/pagemap"])
    except SystemExit as exc:
        code = exc.code
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
print("RESULT", code, grown)
print(err.getvalue(), end="", file=sys.stderr)
"""


def test_a_proc_file_through_predict_is_one_line_and_no_memory(tmp_path, small_run):
    """/proc/self/pagemap (fstat: a regular file of 0 bytes; it reads on for ever) was read to the
    1 GiB cap: +1 GB RSS per file. Now the extra byte past its size refuses it at once."""
    import numpy as np

    good = tmp_path / "good.png"
    good.write_bytes(cv2.imencode(".png", smooth_image(256))[1].tobytes())
    assert np.ptp(smooth_image(256)) > 0
    done = subprocess.run([sys.executable, "-c", PAGEMAP_PREDICT, str(small_run), str(good)],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, done.stdout[-2000:] + done.stderr[-2000:]
    _, code, grown_mb = result[0].split()
    assert code not in ("0", "None"), done.stderr
    assert done.stderr.splitlines() == [
        "mxvision: error: /proc/self/pagemap: reads longer than its size on disk (0 bytes): a /proc "
        "file or one still being written, not an image file"], done.stderr[-2000:]
    assert int(grown_mb) < 100, grown_mb
