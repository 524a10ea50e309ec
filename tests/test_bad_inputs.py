"""A corpus of 80 bad inputs (generated here) through the API and the CLI.

Hospital exports contain every kind of broken file. For each one this checks the whole contract:

* API: ``read_image`` raises :class:`BadImage` -- and nothing else -- whose message is one line
  that starts with the file's path and says what is wrong (``image_info`` agrees wherever the
  problem is visible in the header);
* batch CLI: ``mxvision extract`` skips the file, counts it and lists it with its reason in the
  manifest, exit 0, one warning line on stderr and no traceback; ``--strict`` stops at the first
  bad file with one ``mxvision: error: <path>: ...`` line, exit 2, and leaves no finished-looking
  store, shard or temp file;
* ``mxvision predict`` prints one ``ERROR`` line per bad file (exit 1); ``--strict`` one stderr
  line per file (exit 2), checked for a sample of every problem family.

The last part checks what is *read* rather than refused (TIFF 8/16-bit/float, big-endian,
multi-page, WhiteIsZero; content sniffed regardless of extension), so the refusals are not
bought by refusing everything.
"""
import contextlib
import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from mxvision.errors import BadImage, BadIndex
from mxvision.io.images import MAX_FILE_BYTES, image_info, read_image

pydicom = pytest.importorskip("pydicom")
from PIL import Image  # noqa: E402  (Pillow is a dependency: pydicom's JPEG plugin)
from support.dicom_builders import dicom_bytes, dicom_float, save  # noqa: E402
from pydicom.uid import JPEGBaseline8Bit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOBODY = 65534


# --------------------------------------------------------------------------- writers
def _chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
        ">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_bytes(img):
    return cv2.imencode(".png", img)[1].tobytes()


def jpg_bytes(img):
    return cv2.imencode(".jpg", img)[1].tobytes()


def png_declaring(width, height, idat=None):
    """A PNG whose IHDR declares width x height grey pixels, with the given (or a tiny) IDAT."""
    return (b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", idat if idat is not None else zlib.compress(b"\x00" * 100))
            + _chunk(b"IEND", b""))


def real_png_bomb(side):
    """A valid PNG of side x side black pixels: ~100 MP that compress to ~100 KB."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return png_declaring(side, side, idat)


def jpeg_declaring(width, height):
    jpg = bytearray(jpg_bytes(gradient()))
    sof = jpg.find(b"\xff\xc0")
    jpg[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(jpg)


def tiff_bytes(arr, photometric=None, sample_format=None, endian="<", pages=1, declare=None,
               bits=None):
    """An uncompressed single-strip TIFF written by hand, so every header field is controlled."""
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    height, width, spp = arr.shape
    if declare:
        width, height = declare
    fmt = sample_format or {"u": 1, "i": 2, "f": 3}[arr.dtype.kind]
    bits = bits or arr.dtype.itemsize * 8
    photometric = photometric if photometric is not None else (1 if spp == 1 else 2)
    pixels = arr.astype(arr.dtype.newbyteorder(endian)).tobytes()
    out = bytearray((b"II*\x00" if endian == "<" else b"MM\x00*") + b"\0\0\0\0")
    ifds = []
    for _ in range(pages):
        strip = len(out)
        out += pixels + b"\0" * (len(pixels) % 2)
        arrays = len(out)
        out += struct.pack(endian + "%dH" % spp, *[bits] * spp)
        out += struct.pack(endian + "%dH" % spp, *[fmt] * spp)

        def short(tag, value):
            return tag, 3, 1, struct.pack(endian + "HH", value, 0)

        def long_(tag, value):
            return tag, 4, 1, struct.pack(endian + "I", value)

        def per_sample(tag, value, offset):
            if spp == 1:
                return short(tag, value)
            return tag, 3, spp, struct.pack(endian + "I", offset)

        entries = sorted([long_(256, width), long_(257, height), per_sample(258, bits, arrays),
                          short(259, 1), short(262, photometric), long_(273, strip),
                          short(277, spp), long_(278, height), long_(279, len(pixels)),
                          short(284, 1), per_sample(339, fmt, arrays + 2 * spp)])
        ifds.append(len(out))
        out += struct.pack(endian + "H", len(entries))
        for tag, kind, count, value in entries:
            out += struct.pack(endian + "HHI", tag, kind, count) + value
        out += b"\0\0\0\0"
    struct.pack_into(endian + "I", out, 4, ifds[0])
    for this, following in zip(ifds, ifds[1:]):
        n = struct.unpack_from(endian + "H", out, this)[0]
        struct.pack_into(endian + "I", out, this + 2 + 12 * n, following)
    return bytes(out)


def dicom_patched(**attrs):
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(gradient())))
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    save(ds, buf)
    return buf.getvalue()


def dicom_bad_jpeg():
    """JPEG-baseline transfer syntax whose one encapsulated frame is not a JPEG stream."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(gradient())))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xe0" + bytes(200)])
    buf = io.BytesIO()
    save(ds, buf)
    return buf.getvalue()


def pil_bytes(frames, fmt, **kw):
    buf = io.BytesIO()
    images = [Image.fromarray(f) for f in frames]
    if fmt == "JPEG-CMYK":
        images[0].convert("CMYK").save(buf, "JPEG")
    else:
        images[0].save(buf, fmt, save_all=len(images) > 1, append_images=images[1:], **kw)
    return buf.getvalue()


def npy_bytes(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def gradient(height=64, width=80, dtype=np.uint8):
    ramp = np.linspace(0, np.iinfo(dtype).max if dtype != np.float32 else 1, width)
    return np.tile(ramp.round().astype(dtype) if dtype != np.float32 else ramp.astype(dtype),
                   (height, 1))


def noise(side=96, seed=2):
    return np.random.RandomState(seed).randint(0, 256, (side, side), dtype=np.uint8)


GOOD_PNG = png_bytes(noise())
GOOD_JPG = jpg_bytes(noise())
GOOD_TIF = tiff_bytes(gradient())
GOOD_DCM = dicom_bytes(gradient())


def _flip(data, offset):
    out = bytearray(data)
    out[offset] ^= 0xFF
    return bytes(out)


def _tiff_ifd_loop(data):
    data = bytearray(data)
    ifd = struct.unpack_from("<I", data, 4)[0]
    count = struct.unpack_from("<H", data, ifd)[0]
    struct.pack_into("<I", data, ifd + 2 + 12 * count, ifd)  # "next directory": itself
    return bytes(data)


def _tiff_no_width():
    data = bytearray(GOOD_TIF)
    ifd = struct.unpack_from("<I", data, 4)[0]
    struct.pack_into("<H", data, ifd + 2, 999)  # first entry (ImageWidth) becomes an unknown tag
    return bytes(data)


# --------------------------------------------------------------------------- the corpus
# (file name, content: bytes | "special kind", fragment of the BadImage message, header-visible)
SPECIAL = {"fifo", "dir", "broken_link", "loop", "device", "sparse", "missing", "locked",
           "long_name", "not_dir"}
F = np.float32
LONG_NAME = "x" * 300 + ".png"
CASES = [
    # empty, not an image, or an image format mxvision does not read
    ("empty.png", b"", "empty (0 bytes)", True),
    ("empty.jpg", b"", "empty (0 bytes)", True),
    ("empty.dcm", b"", "empty (0 bytes)", True),
    ("empty.tif", b"", "empty (0 bytes)", True),
    ("csv_text.png", b"patient id,label\n1,nodule\n" * 20, "looks like a text file", True),
    ("random.jpg", np.random.RandomState(3).bytes(5000), "unrecognised binary data", True),
    ("login_page.png", b"<!DOCTYPE html><html><body>Please log in</body></html>", "HTML page", True),
    ("report.png", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "PDF document", True),
    ("archive.png", b"PK\x03\x04" + bytes(60), "ZIP archive", True),
    ("gzipped.png", gzip.compress(GOOD_PNG), "gzip file", True),
    ("nan_array.npy", npy_bytes(np.full((64, 64), np.nan, F)), "NumPy array file", True),
    ("inf_array.png", npy_bytes(np.full((64, 64), np.inf, F)), "NumPy array file", True),
    ("pickled.png", pickle.dumps({"pixels": [1, 2, 3]}, protocol=4), "pickle (never loaded)", True),
    ("static.gif", pil_bytes([noise()], "GIF"), "GIF image", True),
    ("animated_gif.png", pil_bytes([noise(), 255 - noise()], "GIF"), "GIF image", True),
    ("webp.png", pil_bytes([noise()], "WEBP"), "WebP image", True),
    ("bitmap.bmp", pil_bytes([noise()], "BMP"), "BMP image", True),
    ("jpeg2000.jpg", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(100), "JPEG 2000", True),
    # truncated or corrupt PNG
    ("png_half.png", GOOD_PNG[:len(GOOD_PNG) // 2], "cannot decode the PNG data", False),
    ("png_magic_only.png", GOOD_PNG[:8], "no IHDR header", True),
    ("png_ihdr_only.png", GOOD_PNG[:33], "cannot decode the PNG data", False),
    ("png_bad_crc.png", _flip(GOOD_PNG, 60), "CRC error in the IDAT chunk", False),
    ("png_bad_crc_ancillary.png", GOOD_PNG[:33] + _chunk(b"tEXt", b"k\x00v")[:-1] + b"\x00"
     + GOOD_PNG[33:], "CRC error in the tEXt chunk", False),
    ("png_no_idat.png", GOOD_PNG[:33] + _chunk(b"IEND", b""), "cannot decode the PNG data", False),
    ("png_chunk_flood.png", GOOD_PNG[:33] + _chunk(b"tEXt", b"k\x00v") * 10_001 + GOOD_PNG[33:],
     "over 10000 chunks before the image data", True),
    # valid CRCs around broken deflate data: refused, but libpng also prints its own line
    ("png_bad_zlib.png", png_declaring(64, 64, b"\x78\x9c" + bytes(range(200))),
     "cannot decode the PNG data", False),
    # truncated or corrupt JPEG
    ("jpg_half.jpg", GOOD_JPG[:len(GOOD_JPG) // 2], "cannot decode the JPEG data", False),
    ("jpg_soi_only.jpg", b"\xff\xd8\xff", "no frame header", True),
    ("jpg_header_only.jpg", GOOD_JPG[:40], "no frame header", True),
    ("jpg_bad_marker.jpg", GOOD_JPG[:2] + b"\xff\xe0\x00\x10" + bytes(14) + b"\x00\x00garbage",
     "bad marker", True),
    ("jpg_scan_before_frame.jpg", b"\xff\xd8\xff\xda\x00\x08" + bytes(100), "no frame header", True),
    ("jpg_dnl_height.jpg", jpeg_declaring(80, 0), "DNL marker", True),
    # declared sizes: tiny, empty and decompression bombs (refused before decoding)
    ("png_1x1.png", png_bytes(np.zeros((1, 1), np.uint8)), "only 1x1 pixels", True),
    ("jpg_1x1.jpg", jpg_bytes(np.zeros((1, 1), np.uint8)), "only 1x1 pixels", True),
    ("png_31x400.png", png_bytes(np.zeros((31, 400), np.uint8)), "only 400x31 pixels", True),
    ("tif_1x1.tif", tiff_bytes(np.zeros((1, 1), np.uint8)), "only 1x1 pixels", True),
    ("dcm_1x1.dcm", dicom_bytes(np.zeros((1, 1), np.uint8)), "only 1x1 pixels", True),
    ("png_0x0.png", png_declaring(0, 0), "empty image (0x0)", True),
    ("png_20000x20000.png", png_declaring(20000, 20000), "megapixels", True),
    ("jpg_20000x20000.jpg", jpeg_declaring(20000, 20000), "megapixels", True),
    ("tif_20000x20000.tif", tiff_bytes(gradient(), declare=(20000, 20000)), "megapixels", True),
    ("dcm_20000x20000.dcm", dicom_patched(Rows=20000, Columns=20000), "megapixels", True),
    ("png_real_bomb.png", real_png_bomb(10001), "megapixels", True),
    # TIFF-like data: 16-bit/float are read (see the end); these are the broken ones
    ("tif_ifd_outside.tif", b"II*\x00" + struct.pack("<I", 10 ** 6) + bytes(50),
     "image directory outside the file", True),
    ("tif_no_width.tif", _tiff_no_width(), "no ImageWidth", True),
    ("tif_strip_too_short.tif", tiff_bytes(gradient(), declare=(80, 500)), "cannot decode the TIFF data",
     False),
    ("tif_float_nan.tif", tiff_bytes(np.where(gradient(dtype=F) > .5, np.nan, 1).astype(F)),
     "NaN or infinite", False),
    ("tif_float_inf.tif", tiff_bytes(np.where(gradient(dtype=F) > .5, np.inf, 0).astype(F)),
     "NaN or infinite", False),
    ("tif_float64_neginf.tif", tiff_bytes(np.full((40, 40), -np.inf)), "NaN or infinite", False),
    ("tif_float_blank.tif", tiff_bytes(np.full((40, 40), 3.5, F)), "blank", False),
    ("tif_int16.tif", tiff_bytes(gradient().astype(np.int16)), "signed-integer", True),
    ("tif_uint32.tif", tiff_bytes(gradient().astype(np.uint32)), "unsupported TIFF samples", True),
    ("tif_float16.tif", tiff_bytes(gradient(dtype=F).astype(np.float16)), "unsupported TIFF samples", True),
    ("tif_cmyk.tif", tiff_bytes(np.dstack([gradient()] * 4), photometric=5), "CMYK", True),
    ("tif_cielab.tif", tiff_bytes(np.dstack([gradient()] * 3), photometric=8), "colour model", True),
    ("bigtiff.tif", b"II+\x00\x08\x00\x00\x00" + bytes(100), "BigTIFF", True),
    # NaN / inf arrays in DICOM
    ("dcm_float_nan.dcm", dicom_float(np.where(gradient(dtype=F) > .5, np.nan, 1)), "NaN", False),
    ("dcm_float_inf.dcm", dicom_float(np.where(gradient(dtype=F) > .5, np.inf, 1)), "infinite", False),
    # colour models and animation
    ("cmyk.jpg", pil_bytes([noise()], "JPEG-CMYK"), "CMYK/YCCK JPEG", True),
    ("apng.png", pil_bytes([noise(), 255 - noise()], "PNG"), "animated PNG", True),
    ("apng_named.jpg", pil_bytes([noise(), noise(5), noise(6)], "PNG"), "APNG with 3 frames", True),
    # corrupt DICOM
    ("dcm_truncated.dcm", GOOD_DCM[:len(GOOD_DCM) - 3000], "DICOM", False),
    ("dcm_garbage_after_magic.dcm", bytes(128) + b"DICM" + np.random.RandomState(4).bytes(400),
     "DICOM", True),
    ("dcm_no_pixels.dcm", dicom_patched(PixelData=None), "no pixel data", False),
    ("dcm_blank.dcm", dicom_bytes(np.full((40, 40), 7, np.uint8)), "blank", False),
    ("dcm_no_rows.dcm", dicom_patched(Rows=None, PixelData=None), "no image (no Rows/Columns", True),
    ("dcm_bad_jpeg_pixels.dcm", dicom_bad_jpeg(), "cannot decode the DICOM pixel data", False),
    ("dcm_short_pixels.dcm", dicom_patched(PixelData=bytes(100)), "cannot decode the DICOM pixel data",
     False),
    ("text_named.dcm", b"PatientID,Label\n1,nodule\n" * 30, "not a DICOM file", True),
    ("html_named.dicom", b"<html><body>404 Not Found</body></html>" * 3, "not a DICOM file", True),
    # the file system: permissions, special files, links, names
    ("locked.png", "locked", "permission denied", True),
    ("folder.png", "dir", "is a directory", True),
    ("broken_link.png", "broken_link", "file not found", True),
    ("link_loop.png", "loop", "cannot read the file (Too many levels of symbolic links)", True),
    ("fifo.png", "fifo", "named pipe (FIFO)", True),
    ("dev_zero.png", "device", "is a device", True),
    ("sparse_huge.dcm", "sparse", "over the limit of %d bytes" % MAX_FILE_BYTES, True),
    ("missing_from_disk.png", "missing", "file not found", True),
    (LONG_NAME, "long_name", "File name too long", True),
    ("not_a_dir.png/inside.png", "not_dir", "Not a directory", True),
]


def _write_case(folder, name, content):
    path = folder / name
    if not isinstance(content, str):
        path.write_bytes(content)
    elif content == "locked":
        path.write_bytes(GOOD_PNG)
        path.chmod(0)
    elif content == "dir":
        path.mkdir()
    elif content == "broken_link":
        os.symlink(folder / "no-such-target.png", path)
    elif content == "loop":
        os.symlink(path, path)
    elif content == "fifo":
        os.mkfifo(path)
    elif content == "device":
        os.symlink("/dev/zero", path)
    elif content == "sparse":
        with open(path, "wb") as f:
            f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk space used
    elif content == "not_dir":
        (folder / name.split("/")[0]).write_bytes(GOOD_PNG)
    return path


@pytest.fixture(scope="module")
def corpus():
    """The corpus in a folder nobody-readable (so the permission case can run as root too)."""
    folder = Path(tempfile.mkdtemp(prefix="mxvision-bad-"))
    folder.chmod(0o755)
    paths = {name: _write_case(folder, name, content) for name, content, _, _ in CASES}
    yield folder, paths
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink():
            p.chmod(0o644)
    subprocess.run(["rm", "-rf", str(folder)], check=True)


@contextlib.contextmanager
def unprivileged():
    """Root reads files regardless of their mode: drop to 'nobody' for the permission case."""
    if not IS_ROOT:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_the_corpus_is_big_and_varied():
    assert len(CASES) >= 50
    assert len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("name, fragment, in_header",
                         [(n, f, h) for n, _, f, h in CASES], ids=[n[:40] for n, *_ in CASES])
def test_api_raises_one_clear_badimage_naming_the_file(corpus, name, fragment, in_header):
    _, paths = corpus
    path = paths[name]
    calls = [read_image] + ([image_info] if in_header else [])
    for call in calls:
        with unprivileged() if name == "locked.png" else contextlib.nullcontext():
            with pytest.raises(BadImage) as info:
                call(path)
        message = str(info.value)
        assert message.startswith(f"{path}: "), message
        assert "\n" not in message and len(message) < len(str(path)) + 260, message
        assert fragment in message, message


def test_the_permission_case_is_about_the_mode(corpus):
    """As the same (unprivileged) user, an identical readable file in the same folder is read."""
    folder, paths = corpus
    readable = folder / "readable_twin.png"
    readable.write_bytes(GOOD_PNG)
    with unprivileged():
        assert read_image(readable).shape == (96, 96)
        with pytest.raises(BadImage, match="permission denied"):
            read_image(paths["locked.png"])


def test_nul_byte_in_a_path_is_a_badimage(tmp_path):
    with pytest.raises(BadImage, match="NUL byte"):
        read_image(str(tmp_path / "a\x00b.png"))


# --------------------------------------------------------------------------- the CLI
def _cli(*args, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mxvision", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=str(ROOT))


# libpng prints its own "libpng error: ..." line for these (see mxvision.io.headers.png_verify).
LIBPNG_NOISE = {"png_bad_zlib.png"}


def _our_lines(stderr):
    """stderr lines, minus libpng's own line for the known cases (at most one each)."""
    lines = stderr.strip().splitlines()
    ours = [line for line in lines if not line.startswith("libpng error: ")]
    assert len(lines) - len(ours) <= len(LIBPNG_NOISE), lines
    return ours


def _cli_cases():
    """Cases whose failure does not depend on who runs the CLI (as root, the mode-0 file reads)."""
    return [(n, f) for n, _, f, _ in CASES if not (IS_ROOT and n == "locked.png")]


@pytest.fixture(scope="module")
def batch_index(corpus, tmp_path_factory):
    """An index: 3 good images, then every bad one (labels alternate), then 3 good ones."""
    folder, paths = corpus
    good = []
    for k in range(6):
        path = folder / f"good_{k}.png"
        path.write_bytes(png_bytes(noise(96, seed=10 + k)))
        good.append(path)
    rows = [(good[k], "normal" if k % 2 else "nodule") for k in range(3)]
    rows += [(paths[n], "normal" if i % 2 else "nodule") for i, (n, _) in enumerate(_cli_cases())]
    rows += [(good[k], "normal" if k % 2 else "nodule") for k in range(3, 6)]
    csv_path = tmp_path_factory.mktemp("batch") / "index.csv"
    lines = ["path,label,split"]
    lines += [f'"{p}",{lab},{["train", "val"][i % 2]}' for i, (p, lab) in enumerate(rows)]
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path, len(rows)


EXTRACT = ("--backbone", "resnet18_v2", "--weights", "none", "--batch-size", "8", "--ctx", "cpu",
           "--quiet")


def test_extract_skips_counts_and_lists_every_bad_file(batch_index, tmp_path):
    csv_path, n_rows = batch_index
    out = tmp_path / "features"
    proc = _cli("extract", "--index", csv_path, "--out", out, "--shard-size", "64", *EXTRACT)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    bad = _cli_cases()
    assert _our_lines(proc.stderr) == [
        f"mxvision: skipped {len(bad)} unreadable image(s); they are listed in {out / 'manifest.json'}"]
    assert f"6 feature maps (512, 7, 7) in {out} ({len(bad)} skipped)" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_skipped"] == len(bad) and manifest["n_features"] == 6
    by_id = {s["id"]: s["problem"] for s in manifest["skipped"]}
    items = {it["id"]: it["path"] for it in manifest["items"]}
    assert len(by_id) == len(bad)
    for name, fragment in bad:
        item_id = next(i for i, p in items.items() if p.endswith("/" + name))
        problem = by_id[item_id]
        assert problem.startswith(items[item_id] + ": ") and fragment in problem, problem
    # The skipped rows are exactly the bad ones; every good row has its features.
    stored = {r for s in manifest["shards"] for r in s["rows"]}
    assert stored == {0, 1, 2, n_rows - 3, n_rows - 2, n_rows - 1}
    assert not list(out.glob(".*tmp"))


def test_extract_strict_fails_with_one_line_and_no_finished_outputs(batch_index, tmp_path):
    csv_path, _ = batch_index
    out = tmp_path / "strict"
    # Shards of 2: the first shard (good images) is finished before the first bad file is met.
    proc = _cli("extract", "--index", csv_path, "--out", out, "--shard-size", "2", "--strict",
                *EXTRACT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    first_bad = _cli_cases()[0][0]
    assert len(lines) == 1 and lines[0].startswith("mxvision: error: ") and first_bad in lines[0], lines
    assert "Traceback" not in proc.stderr
    # The shard of good images finished before the failure is kept, listed whole in an unfinished
    # manifest, so a rerun does not compute it again.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False  # never mistaken for a finished store
    assert [s["rows"] for s in manifest["shards"]] == [[0, 1]]
    for shard in manifest["shards"]:
        assert (out / shard["file"]).stat().st_size == shard["bytes"]
    assert not list(out.glob(".*tmp"))
    from mxvision.errors import BadRun
    from mxvision.features.extract import FeatureStore
    with pytest.raises(BadRun, match="did not finish|not a feature store"):
        FeatureStore(out).load()


def test_predict_lists_every_bad_file_on_its_own_line(small_run, corpus, batch_index):
    _, paths = corpus
    # A folder argument means "its images"; the over-long name: see the next test.
    bad = [c for c in _cli_cases() if c[0] not in ("folder.png", LONG_NAME)]
    good = corpus[0] / "good_0.png"
    args = [paths[n] for n, _ in bad] + [good]
    proc = _cli("predict", "--run", small_run, "--ctx", "cpu", *args)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and _our_lines(proc.stderr) == [], proc.stderr
    lines = proc.stdout.rstrip("\n").split("\n")
    assert len(lines) == len(args)
    for (name, fragment), line in zip(bad, lines):
        path, status, message = line.split("\t")
        assert path == str(paths[name]) and status == "ERROR", line
        assert message.startswith(f"{path}: ") and fragment in message, line
    assert lines[-1].startswith(f"{good}\t") and "ERROR" not in lines[-1]


def _main(capfd, *args):
    """The CLI in-process (mxvision.cli.main): exit code and every stderr line, C-level included."""
    from mxvision.cli import main
    capfd.readouterr()
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err.strip().splitlines()


def test_predict_reports_an_unstattable_path_as_that_files_error(small_run, corpus, capfd):
    _, paths = corpus
    good = corpus[0] / "good_0.png"
    code, out, err = _main(capfd, "predict", "--run", small_run, "--ctx", "cpu", paths[LONG_NAME], good)
    assert code == 1, err
    first, second = out.rstrip("\n").split("\n")
    assert first.startswith(f"{paths[LONG_NAME]}\tERROR\t") and "File name too long" in first
    assert second.startswith(f"{good}\t")


# One case of each family is enough to check the strict path's printing per file.
STRICT_SAMPLE = ["empty.png", "login_page.png", "png_bad_crc.png", "jpg_half.jpg", "png_20000x20000.png",
                 "tif_float_nan.tif", "cmyk.jpg", "apng.png", "dcm_bad_jpeg_pixels.dcm", "fifo.png"]


def test_predict_strict_prints_one_line_per_bad_file(small_run, corpus, capfd):
    _, paths = corpus
    fragments = {n: f for n, _, f, _ in CASES}
    for name in STRICT_SAMPLE:
        code, out, err = _main(capfd, "predict", "--strict", "--ctx", "cpu", "--run", small_run,
                               paths[name])
        assert code == 2 and out == "", (name, out)
        assert len(err) == 1 and err[0].startswith(f"mxvision: error: {paths[name]}: "), err
        assert fragments[name] in err[0]


def test_duplicate_and_missing_index_rows(corpus, tmp_path, capfd):
    """Duplicate ids stop the job before any work (BadIndex); a missing file is skipped."""
    folder, _ = corpus
    good = folder / "good_dup.png"
    good.write_bytes(GOOD_PNG)
    index = tmp_path / "dups.csv"
    index.write_text(f"path,label\n{good},normal\n{folder}/./sub/../good_dup.png,nodule\n")
    code, _, err = _main(capfd, "extract", "--index", index, "--out", tmp_path / "f", *EXTRACT)
    assert code == 2
    assert err == [f"mxvision: error: {index}: line 3: duplicate path {good} (also on line 2)"]
    assert not (tmp_path / "f").exists()
    from mxvision.data.index import read_index
    with pytest.raises(BadIndex, match="duplicate path"):
        read_index(index)


# --------------------------------------------------------------------------- what is read
def test_tiff_8_16_bit_and_float_are_read_on_their_full_scale(tmp_path):
    g8 = gradient()
    cases = {
        "u8.tif": (tiff_bytes(g8), g8 / 255.0),
        "u8_big_endian.tif": (tiff_bytes(g8, endian=">"), g8 / 255.0),
        "u16.tif": (tiff_bytes(g8.astype(np.uint16) * 257), g8 / 255.0),
        "u16_big_endian.tif": (tiff_bytes(g8.astype(np.uint16) * 257, endian=">"), g8 / 255.0),
        # float: min-max scaled (no full scale); negative/attenuation-like values are fine
        "f32.tif": (tiff_bytes(g8.astype(F) * 3.0 - 100.0), g8 / 255.0),
        "f64.tif": (tiff_bytes(g8.astype(np.float64) / 1000.0), g8 / 255.0),
        # WhiteIsZero: inverted so bone stays bright, at 8 and 16 bits and for floats
        "u8_white_is_zero.tif": (tiff_bytes(g8, photometric=0), 1 - g8 / 255.0),
        "u16_white_is_zero.tif": (tiff_bytes(g8.astype(np.uint16) * 257, photometric=0),
                                  1 - g8 / 255.0),
        "f32_white_is_zero.tif": (tiff_bytes(g8.astype(F), photometric=0), 1 - g8 / 255.0),
        "rgb.tif": (tiff_bytes(np.dstack([g8] * 3)), g8 / 255.0),
        # multi-page: the first page
        "pages.tif": (tiff_bytes(g8, pages=3), g8 / 255.0),
        # a directory chain that loops back on itself: counted once, read
        "ifd_loop.tif": (_tiff_ifd_loop(tiff_bytes(g8)), g8 / 255.0),
        # content decides, not the name
        "tiff_named.png": (tiff_bytes(g8), g8 / 255.0),
        "png_named.jpg": (png_bytes(g8), g8 / 255.0),
        "dicom_named.png": (GOOD_DCM, g8 / 255.0),
    }
    for name, (data, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        out = read_image(path)
        assert out.dtype == np.float32 and out.shape == expected.shape, name
        np.testing.assert_allclose(out, expected, atol=1e-5, err_msg=name)
    assert image_info(tmp_path / "pages.tif")[:5] == ("tiff", 80, 64, 8, 3)
    assert image_info(tmp_path / "ifd_loop.tif").frames == 1
    assert image_info(tmp_path / "f32.tif").sample == "float"
    assert image_info(tmp_path / "u16.tif").bit_depth == 16


def test_single_frame_apng_and_plain_jpeg_are_not_refused(tmp_path):
    """Only animation is refused: an APNG control chunk announcing one frame is a still image."""
    img = noise()
    one = tmp_path / "one_frame.png"
    one.write_bytes(pil_bytes([img], "PNG"))  # Pillow writes a plain PNG for one frame
    data = one.read_bytes()
    ihdr_end = 8 + 25
    actl = _chunk(b"acTL", struct.pack(">II", 1, 0))
    single = tmp_path / "single_actl.png"
    single.write_bytes(data[:ihdr_end] + actl + data[ihdr_end:])
    np.testing.assert_allclose(read_image(single), img / 255.0, atol=1e-6)
    rgb = tmp_path / "rgb.jpg"
    rgb.write_bytes(pil_bytes([np.dstack([img] * 3)], "JPEG"))
    assert read_image(rgb).shape == img.shape
