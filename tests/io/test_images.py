"""read_image / image_info: every input kind decodes to the right luminance, every bad file is refused.

Synthetic files are written with OpenCV, pydicom, or by hand (palette PNG, forged headers) so the
expected values are known exactly; real files from ../shared check the formats seen in practice.
"""
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
import zlib

import cv2
import numpy as np
import pytest

from mxvision.errors import BadImage
from mxvision.io.images import MAX_PIXELS, MIN_SIDE, dicom_tags, image_info, read_image

pydicom = pytest.importorskip("pydicom")
from support.dicom_builders import (  # noqa: E402
    BITS_STORED, dicom_bytes, dicom_float, image_elements, raw_dicom, save)
from support.image_builders import (  # noqa: E402
    insert_chunks, png_chunk, png_file, smooth_image, tiff_file, tiff_page, zlib_zeros)

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- writers
def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
        ">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def write_palette_png(path, indices: np.ndarray, palette_rgb: np.ndarray):
    """An 8-bit colour-type-3 PNG written by hand (no Pillow): IHDR, PLTE, IDAT, IEND."""
    height, width = indices.shape
    raw = b"".join(b"\x00" + row.astype(np.uint8).tobytes() for row in indices)
    data = (b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
            + _chunk(b"PLTE", palette_rgb.astype(np.uint8).tobytes())
            + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))
    path.write_bytes(data)
    return path


def write_dicom(path, pixels: np.ndarray, photometric="MONOCHROME2", bits_stored=None, **attrs):
    Path(path).write_bytes(dicom_bytes(pixels, photometric, bits_stored=bits_stored, **attrs))
    return path


def gradient(height=64, width=80):
    """A horizontal ramp 0..255 (uint8), distinct in every column."""
    return np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))


def assert_bad(path, fragment):
    """read_image(path) raises BadImage whose one-line message names the file and the problem."""
    with pytest.raises(BadImage) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    assert fragment in message, message
    return message


# --------------------------------------------------------------------------- PNG and JPEG values
def test_gray8_png_is_scaled_by_255(tmp_path):
    img = gradient()
    path = tmp_path / "g8.png"
    cv2.imwrite(str(path), img)
    out = read_image(path)
    assert out.dtype == np.float32 and out.shape == img.shape
    np.testing.assert_allclose(out, img / 255.0, atol=1e-6)


def test_gray16_png_is_scaled_by_65535(tmp_path):
    img = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16 + 7).astype(np.uint16)
    path = tmp_path / "g16.png"
    cv2.imwrite(str(path), img)
    out = read_image(path)
    np.testing.assert_allclose(out, img / 65535.0, atol=1e-6)
    assert image_info(path).bit_depth == 16


def test_palette_png_decodes_to_palette_grey_not_index(tmp_path):
    indices = np.tile(np.arange(256, dtype=np.uint8), (40, 1))
    palette = np.repeat((255 - np.arange(256))[:, None], 3, axis=1)  # index i -> grey 255 - i
    out = read_image(write_palette_png(tmp_path / "pal.png", indices, palette))
    np.testing.assert_allclose(out, (255 - indices) / 255.0, atol=1e-6)


def test_coloured_palette_png_becomes_luminance(tmp_path):
    indices = np.zeros((40, 40), np.uint8)
    indices[:, 20:] = 1
    palette = np.zeros((256, 3), np.uint8)
    palette[0] = (255, 0, 0)  # pure red
    palette[1] = (0, 0, 255)  # pure blue
    out = read_image(write_palette_png(tmp_path / "palc.png", indices, palette))
    assert out[0, 0] == pytest.approx(0.299, abs=2 / 255)
    assert out[0, 39] == pytest.approx(0.114, abs=2 / 255)


def test_rgb_png_is_bt601_luminance(tmp_path):
    bgr = np.zeros((40, 60, 3), np.uint8)
    bgr[:, :20] = (0, 0, 255)   # red
    bgr[:, 20:40] = (0, 255, 0)  # green
    bgr[:, 40:] = (200, 200, 200)  # grey stays grey
    path = tmp_path / "rgb.png"
    cv2.imwrite(str(path), bgr)
    out = read_image(path)
    assert out.shape == (40, 60)
    np.testing.assert_allclose(out[0, [0, 20, 40]], [0.299, 0.587, 200 / 255], atol=2 / 255)


def test_rgba_png_drops_alpha(tmp_path):
    grey = gradient(48, 48)
    for alpha in (0, 255):
        bgra = np.dstack([grey, grey, grey, np.full_like(grey, alpha)])
        path = tmp_path / f"rgba{alpha}.png"
        cv2.imwrite(str(path), bgra)
        np.testing.assert_allclose(read_image(path), grey / 255.0, atol=1e-6)


def test_jpeg_and_exif_orientation(tmp_path):
    img = gradient(60, 100)
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    plain = tmp_path / "plain.jpg"
    plain.write_bytes(enc.tobytes())
    out = read_image(plain)
    assert out.shape == (60, 100)
    assert np.abs(out - img / 255.0).mean() < 2 / 255
    # Same JPEG with an EXIF APP1 segment saying "rotate 90 degrees clockwise" (orientation 6).
    tiff = (b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x0112, 3, 1, 6)
            + struct.pack("<I", 0))
    app1 = b"Exif\x00\x00" + tiff
    rotated = tmp_path / "rotated.jpg"
    rotated.write_bytes(enc.tobytes()[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2)
                        + app1 + enc.tobytes()[2:])
    turned = read_image(rotated)
    assert turned.shape == (100, 60)
    np.testing.assert_allclose(turned, np.rot90(out, k=-1), atol=1e-6)


def test_type_is_decided_by_content_not_extension(tmp_path):
    img = gradient()
    path = tmp_path / "really_a_png.jpg"
    cv2.imwrite(str(tmp_path / "x.png"), img)
    os.replace(tmp_path / "x.png", path)
    np.testing.assert_allclose(read_image(path), img / 255.0, atol=1e-6)
    assert image_info(path).format == "png"


def test_large_image_decodes(tmp_path):
    img = np.random.RandomState(0).randint(0, 256, (2048, 2048), dtype=np.uint8)
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    out = read_image(path)
    assert out.shape == (2048, 2048)
    assert np.array_equal(np.rint(out * 255).astype(np.uint8), img)


# --------------------------------------------------------------------------- DICOM
def test_dicom_monochrome1_modality_and_window(tmp_path):
    stored = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (40, 1))  # 64 columns, 0..4032
    path = write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1", bits_stored=12,
                       RescaleSlope=2, RescaleIntercept=-1000, RescaleType="US",
                       WindowCenter=3000, WindowWidth=2000)
    out = read_image(path)
    modality = stored.astype(float) * 2 - 1000  # window 2000..4000 = stored 1500..2500
    windowed = np.clip((modality - 2000) / 2000, 0, 1)
    expected = 1 - windowed  # MONOCHROME1: high values are dark
    assert out.shape == (40, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=0.01)
    assert out[0, 0] == 1.0 and out[0, -1] == 0.0
    info = image_info(path)
    assert (info.format, info.width, info.height, info.bit_depth) == ("dicom", 64, 40, 12)


def test_dicom_monochrome2_without_window_is_min_max(tmp_path):
    stored = np.tile(np.arange(100, 1124, 16, dtype=np.uint16), (40, 1))
    out = read_image(write_dicom(tmp_path / "m2.dcm", stored, bits_stored=12))
    np.testing.assert_allclose(out, (stored - 100.0) / (stored.max() - 100.0), atol=1e-6)


def test_dicom_multiframe_uses_first_frame(tmp_path):
    first = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    frames = np.stack([first, first[:, ::-1], np.zeros_like(first)])
    path = write_dicom(tmp_path / "mf.dcm", frames)
    assert image_info(path).frames == 3
    np.testing.assert_allclose(read_image(path), first / first.max(), atol=1e-6)


def test_dicom_without_preamble_is_read_by_suffix(tmp_path):
    stored = gradient()
    ds_path = write_dicom(tmp_path / "with.dcm", stored)
    ds = pydicom.dcmread(ds_path)
    ds.preamble = None
    bare = tmp_path / "bare.dcm"
    save(ds, bare, file_format=False)
    assert bare.read_bytes()[128:132] != b"DICM"
    np.testing.assert_allclose(read_image(bare), read_image(ds_path))


def test_dicom_rgb_becomes_luminance(tmp_path):
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[:, :20, 1] = 255  # green left half, black right half
    out = read_image(write_dicom(tmp_path / "rgb.dcm", rgb, "RGB"))
    assert out[0, 0] == pytest.approx(1.0) and out[0, 39] == pytest.approx(0.0)


def test_dicom_float_nan_refused(tmp_path):
    values = np.random.RandomState(1).rand(40, 40).astype(np.float32)
    values[5, 5] = np.nan
    path = tmp_path / "nan.dcm"
    path.write_bytes(dicom_float(values))
    assert_bad(path, "NaN")


def test_dicom_problems_refused(tmp_path):
    good = write_dicom(tmp_path / "good.dcm", gradient())
    data = good.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 1000])
    assert_bad(truncated, "DICOM")
    blank = write_dicom(tmp_path / "blank.dcm", np.full((40, 40), 7, np.uint8))
    assert_bad(blank, "blank")
    ds = pydicom.dcmread(good)
    del ds.PixelData
    nopix = tmp_path / "nopix.dcm"
    save(ds, nopix)
    assert_bad(nopix, "no pixel data")
    ds = pydicom.dcmread(good)
    ds.Rows, ds.Columns = 30000, 30000  # declared 900 MP, pixel data far too short
    bomb = tmp_path / "bomb.dcm"
    save(ds, bomb)
    assert_bad(bomb, "megapixels")


# --------------------------------------------------------------------------- refused files
def test_missing_empty_directory_and_not_an_image(tmp_path):
    assert_bad(tmp_path / "nope.png", "not found")
    assert_bad(tmp_path, "directory")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert_bad(empty, "empty")
    text = tmp_path / "notes.png"
    text.write_text("patient id,label\n1,nodule\n" * 20)
    assert_bad(text, "not a supported image")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files regardless of their permission bits")
def test_unreadable_permission(tmp_path):
    path = tmp_path / "locked.png"
    cv2.imwrite(str(path), gradient())
    path.chmod(0)
    try:
        assert_bad(path, "permission denied")
    finally:
        path.chmod(0o644)


def test_truncated_and_corrupt_png_and_jpeg(tmp_path):
    img = np.random.RandomState(2).randint(0, 256, (128, 128), dtype=np.uint8)
    png = cv2.imencode(".png", img)[1].tobytes()
    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    cases = {"half.png": png[: len(png) // 2], "header_only.png": png[:20],
             "half.jpg": jpg[: len(jpg) // 2], "header_only.jpg": jpg[:40]}
    crc = bytearray(png)
    crc[60] ^= 0xFF  # inside IDAT: the chunk CRC no longer matches
    cases["crc.png"] = bytes(crc)
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(BadImage) as info:
            read_image(path)
        assert str(info.value).startswith(f"{path}: ")
        assert any(word in str(info.value) for word in ("truncated", "corrupt")), str(info.value)


def test_decompression_bombs_refused_before_decoding(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 100
    # A PNG whose IHDR declares side x side grey pixels, with a tiny (invalid) IDAT.
    bomb_png = tmp_path / "bomb.png"
    bomb_png.write_bytes(b"\x89PNG\r\n\x1a\n"
                         + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                         + _chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + _chunk(b"IEND", b""))
    assert_bad(bomb_png, "megapixels")
    # A real JPEG whose SOF0 frame header is patched to declare side x side.
    jpg = bytearray(cv2.imencode(".jpg", gradient())[1].tobytes())
    sof = jpg.find(b"\xff\xc0")
    jpg[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    bomb_jpg = tmp_path / "bomb.jpg"
    bomb_jpg.write_bytes(bytes(jpg))
    assert_bad(bomb_jpg, "megapixels")
    with pytest.raises(BadImage, match="megapixels"):
        image_info(bomb_jpg)


def test_tiny_images_refused(tmp_path):
    for shape in [(1, 1), (MIN_SIDE - 1, 200), (200, 8)]:
        path = tmp_path / f"tiny_{shape[0]}x{shape[1]}.png"
        cv2.imwrite(str(path), np.zeros(shape, np.uint8))
        assert_bad(path, "pixels")
    ok = tmp_path / "ok.png"  # not constant: a blank image is refused (below)
    cv2.imwrite(str(ok), np.arange(MIN_SIDE * MIN_SIDE, dtype=np.uint8).reshape(MIN_SIDE, MIN_SIDE))
    assert read_image(ok).shape == (MIN_SIDE, MIN_SIDE)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
@pytest.mark.parametrize("value", [0, 255, 97])
def test_a_blank_image_is_refused_like_a_blank_dicom(tmp_path, suffix, value):
    """An all-black JPEG scored nodule=0.6755 before; DICOM and float images were already refused."""
    path = tmp_path / f"blank{suffix}"
    cv2.imwrite(str(path), np.full((256, 256), value, np.uint8))
    assert_bad(path, "the image is blank")
    cv2.imwrite(str(path), np.full((256, 256), value, np.uint8) ^ np.eye(256, dtype=np.uint8) * 255)
    assert read_image(path).shape == (256, 256)  # one line of other pixels: an image


# --------------------------------------------------------------------------- real files (../shared)
def test_jsrt_fullres_palette_matches_512_downsample(shared):
    for name in ("JPCLN003.png", "JPCNN001.png"):
        full = read_image(shared / "data/jsrt/fullres" / name)
        assert full.shape == (2048, 2048)
        small = read_image(shared / "data/jsrt/images" / name)
        resized = cv2.resize(full, (512, 512), interpolation=cv2.INTER_AREA)
        # Decoding palette indices instead of greys would give a correlation near -1.
        assert np.corrcoef(resized.ravel(), small.ravel())[0, 1] > 0.95


def test_nih_rgb_and_rgba_pngs(shared):
    files = sorted((shared / "data/nih/images").glob("*.png"))
    # PNG colour type (byte 25 of the file): 2 = RGB, 6 = RGBA.
    by_type = {}
    for path in files:
        by_type.setdefault(path.read_bytes()[25], path)
        if 2 in by_type and 6 in by_type:
            break
    assert 2 in by_type and 6 in by_type, "expected RGB and RGBA files among the NIH images"
    for path in (by_type[2], by_type[6]):
        out = read_image(path)
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert out.shape == (64, 64) and 0 <= out.min() < out.max() <= 1
        np.testing.assert_allclose(out, cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) / 255.0,
                                   atol=1 / 255 + 1e-6)


def test_sample_jpeg_and_pngs(shared):
    jpg = read_image(shared / "data/samples/16747_3_1.jpg")
    assert jpg.shape == (885, 1036) and jpg.dtype == np.float32
    assert 0 <= jpg.min() and jpg.max() <= 1 and jpg.std() > 0.05
    for name in ("00000001_000.png", "00027426_000.png"):
        png = read_image(shared / "data/samples" / name)
        assert png.shape == (512, 512) and png.std() > 0.05


def test_sample_dicoms_and_monochrome1_inversion(shared):
    samples = shared / "data/samples"
    real = read_image(samples / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    fake = read_image(samples / "Fake_MONOHR1.dcm")  # same pixels, labelled MONOCHROME1
    for img in (real, fake):
        assert img.shape == (1024, 1024) and img.dtype == np.float32
        assert img.min() == 0.0 and img.max() == 1.0 and img.std() > 0.05
    np.testing.assert_allclose(fake, 1.0 - real, atol=1e-6)


# --------------------------------------------------------------------------- bounded reading
def test_a_file_is_read_with_its_own_size_not_the_cap(tmp_path):
    """A buffered read(n) reserves n bytes up front: asking for the 1 GiB cap per image made
    plain PNGs fail with MemoryError under ``ulimit -v``. Here the address space left is 512 MiB."""
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"{k}.png")
        cv2.imwrite(str(paths[-1]), smooth_image(512, seed=k))
    script = (
        "import re, resource, sys\n"
        "from mxvision.io.images import read_image\n"
        "size = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (512 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
        "print([read_image(p).shape for p in sys.argv[1:]])\n")
    proc = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True, text=True,
                          timeout=120, cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[(512, 512), (512, 512), (512, 512)]"


def test_ancillary_png_chunks_change_no_pixel_and_are_never_inflated(tmp_path):
    img = (np.arange(96 * 96).reshape(96, 96) * 7 % 65536).astype(np.uint16)
    plain = cv2.imencode(".png", img)[1].tobytes()
    bomb = zlib_zeros(1 << 30)  # 1 GiB of zeros in ~1 MB: libpng would inflate 8 MB of it, 60 times
    extra = [png_chunk(b"gAMA", struct.pack(">I", 100000)), png_chunk(b"sBIT", b"\x0c"),
             png_chunk(b"sRGB", b"\x00"), png_chunk(b"pHYs", bytes(9)), png_chunk(b"tEXt", b"k\x00v"),
             png_chunk(b"iCCP", b"p\x00\x00" + bomb)] + [png_chunk(b"zTXt", b"k%d\x00\x00" % k + bomb[:9000])
                                                      for k in range(100)]
    (tmp_path / "plain.png").write_bytes(plain)
    (tmp_path / "extra.png").write_bytes(insert_chunks(plain, extra))
    start = time.perf_counter()
    extra_read = read_image(tmp_path / "extra.png")
    assert time.perf_counter() - start < 1.0  # libpng inflates 8 MB of each: ~2 s here
    np.testing.assert_array_equal(extra_read, read_image(tmp_path / "plain.png"))
    # eXIf is kept: OpenCV applies its orientation (6: rotate 90 degrees clockwise)
    exif = (b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x0112, 3, 1, 6)
            + struct.pack("<I", 0))
    wide = cv2.imencode(".png", smooth_image(96)[:64])[1].tobytes()
    (tmp_path / "turned.png").write_bytes(insert_chunks(wide, [png_chunk(b"eXIf", exif)]))
    assert read_image(tmp_path / "turned.png").shape == (96, 64)


def test_bigtiff_reads_like_classic_tiff(tmp_path):
    for name, big, long_type in (("classic.tif", False, 4), ("big.tif", True, 16)):
        (tmp_path / name).write_bytes(tiff_file([tiff_page(80, 48, long_type=long_type)], big=big))
    classic, big = read_image(tmp_path / "classic.tif"), read_image(tmp_path / "big.tif")
    assert classic.shape == (48, 80)
    np.testing.assert_array_equal(classic, big)
    assert image_info(tmp_path / "big.tif").width == 80


def test_a_deflated_dicom_reads_like_the_same_file_uncompressed(tmp_path):
    elements = image_elements(rows=48, columns=80, frames=2, bits=16)
    (tmp_path / "plain.dcm").write_bytes(raw_dicom(elements))
    (tmp_path / "deflated.dcm").write_bytes(raw_dicom(elements, deflate=True))
    plain = read_image(tmp_path / "plain.dcm")
    assert plain.shape == (48, 80) and plain.max() == 1.0
    np.testing.assert_array_equal(read_image(tmp_path / "deflated.dcm"), plain)
    tags = dicom_tags(tmp_path / "deflated.dcm")
    assert tags["transfer_syntax"] == "1.2.840.10008.1.2.1.99" and tags["bits_stored"] == 16


def test_dicom_tags_refuses_a_non_numeric_bits_stored_in_one_line(tmp_path):
    path = tmp_path / "odd.dcm"
    path.write_bytes(raw_dicom(image_elements(extra={BITS_STORED: (b"IS", "twelve")})))
    with pytest.raises(BadImage, match=r"BitsStored is not an integer \('twelve'\)$"):
        dicom_tags(path)


def test_the_decode_budget_counts_samples_and_depth(tmp_path):
    """9000x9000 is under 100 MP, but as 16-bit RGBA it needs over 1 GiB to decode."""
    (tmp_path / "grey.png").write_bytes(png_file(9000, 9000, b""))
    (tmp_path / "rgba16.png").write_bytes(png_file(9000, 9000, b"", bit_depth=16, colour_type=6))
    assert image_info(tmp_path / "grey.png").samples == 1
    with pytest.raises(BadImage, match="needs about 1081 MiB, over the limit of 900 MiB"):
        image_info(tmp_path / "rgba16.png")


def test_opencv_itself_refuses_what_mxvision_refuses():
    """Importing mxvision sets OpenCV's own limit (read once, when cv2 loads) to MAX_PIXELS, so a
    size OpenCV's decoder finds is bounded even where no header parser of mxvision looked."""
    script = ("import mxvision, cv2, numpy as np, sys\n"
              "try:\n"
              "    cv2.imdecode(np.frombuffer(sys.stdin.buffer.read(), np.uint8), cv2.IMREAD_GRAYSCALE)\n"
              "    print('decoded')\n"
              "except cv2.error as err:\n"
              "    print('refused' if 'CV_IO_MAX_IMAGE_PIXELS' in str(err) else err)\n")
    side = int(MAX_PIXELS ** 0.5) + 1  # one row over the limit: 100 MB if allocated
    proc = subprocess.run([sys.executable, "-c", script], input=png_file(side, side, zlib_zeros(1 << 20)),
                          capture_output=True, timeout=120, cwd=str(ROOT),
                          env={k: v for k, v in dict(os.environ, PYTHONPATH=str(ROOT)).items()
                               if k != "OPENCV_IO_MAX_IMAGE_PIXELS"})
    assert proc.stdout.decode().strip() == "refused", proc.stdout + proc.stderr


def test_a_proc_file_is_refused_without_reading_it_to_the_cap():
    """/proc/self/pagemap is a 'regular file' of size 0 that reads on for ever: reading on up to
    the 1 GiB cap cost 1 GB of memory per file (2 GB when two decode threads met two of them)."""
    import subprocess
    import sys

    code = ("import resource\n"
            "from mxvision.io.images import read_image\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n"
            "    read_image('/proc/self/pagemap')\n"
            "except Exception as err:\n"
            "    print(type(err).__name__, err)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    message, grown_mb = done.stdout.strip().splitlines()
    assert message.startswith("BadImage /proc/self/pagemap: reads longer than its size on disk")
    assert int(grown_mb) < 100
