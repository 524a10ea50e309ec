"""What an image file's header declares, read from its bytes without decoding a pixel.

:mod:`mxvision.io.images` sniffs the format from the leading bytes and calls the parser here
for PNG (IHDR, and an APNG ``acTL`` before the first IDAT), JPEG (the first SOFn frame header)
and classic TIFF (the first image file directory, and the page count). Each returns an
:class:`ImageInfo` or raises :class:`~mxvision.errors.BadImage` naming the file, so size limits
(decompression bombs), animation and CMYK are refused before anything is allocated. Offsets
read from a hostile file are only ever used through bounds-checked ``struct.unpack_from``.

:func:`normalize_view` gives the one spelling of a radiograph's view (DICOM ``ViewPosition``,
OpenI's and NIH's label columns); it lives here, at the bottom, because the DICOM header reader
needs it and the dataset code (:mod:`mxvision.data.views`) builds its ``views=`` filter on it.
"""
import struct
import zlib
from typing import NamedTuple

from mxvision.errors import BadImage

#: Largest accepted image, in pixels (width x height). The biggest real chest radiographs are
#: about 4300x4300 (43 cm detector at 0.1 mm), under 20 MP; 100 MP leaves a wide margin while
#: capping the decode at a few hundred MB instead of what a hostile header could demand.
MAX_PIXELS = 100_000_000

#: Smallest accepted side, in pixels. Anything smaller cannot be a radiograph (the smallest real
#: inputs here, the NIH thumbnails, are 64x64) and is usually an icon, a 1x1 tracking pixel or a
#: placeholder saved by a failed export.
MIN_SIDE = 32

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG start-of-frame markers: every SOFn except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Markers without a length field.
_JPEG_STANDALONE = {0x01} | set(range(0xD0, 0xD8))
TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
BIGTIFF_MAGIC = (b"II+\x00", b"MM\x00+")
# TIFF PhotometricInterpretation values OpenCV/libtiff turn into grey or BGR.
_TIFF_COLOUR = {0: "miniswhite", 1: "grey", 2: "rgb", 3: "palette", 6: "ycbcr"}
_TIFF_TYPES = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i"}  # BYTE SHORT LONG SBYTE SSHORT SLONG
_MAX_TIFF_PAGES = 10_000
_MAX_PNG_CHUNKS = 10_000  # ancillary chunks before IDAT; real files have a few dozen at most
# What other content looks like, for the "not a supported image" message (leading bytes).
_LOOKS_LIKE = ((b"GIF87a", "a GIF image"), (b"GIF89a", "a GIF image"), (b"BM", "a BMP image"),
               (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"), (b"\xffO\xffQ", "a JPEG 2000 image"),
               (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"),
               (b"\x1f\x8b", "a gzip file"), (b"\x93NUMPY", "a NumPy array file"),
               (b"\x1a\x45\xdf\xa3", "a video (Matroska/WebM)"))


class ImageInfo(NamedTuple):
    """What a file's header declares: format ('png'/'jpeg'/'tiff'/'dicom'), size, bits, frames
    (pages for TIFF), colour model (e.g. 'grey', 'rgb', 'palette', 'miniswhite'; '' when the
    decoder decides) and sample type ('uint' or 'float')."""

    format: str
    width: int
    height: int
    bit_depth: int
    frames: int = 1
    colour: str = ""
    sample: str = "uint"


def looks_like(data: bytes) -> str:
    """A short guess at what non-image content is, for the error message."""
    for magic, what in _LOOKS_LIKE:
        if data.startswith(magic):
            return what
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (never loaded)"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "a WebP image"
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    if head.startswith(b"<?xml") or head.startswith(b"<"):
        return "XML or HTML text"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in data[:512]):
        return "a text file"
    return "unrecognised binary data"


def check_size(path, info: ImageInfo) -> None:
    """Refuse empty, bomb-sized (over ``MAX_PIXELS``) and icon-sized (under ``MIN_SIDE``) images."""
    width, height = info.width, info.height
    if width <= 0 or height <= 0:
        raise BadImage(path, f"header declares an empty image ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise BadImage(path, f"header declares {width}x{height} pixels, over the limit of "
                             f"{MAX_PIXELS // 1_000_000} megapixels (refused before decoding)")
    if min(width, height) < MIN_SIDE:
        raise BadImage(path, f"image is only {width}x{height} pixels; "
                             f"at least {MIN_SIDE} pixels a side are needed")


def normalize_view(value):
    """``'pa'`` -> ``'PA'``, ``'LL'``/``'RL'``/``'LARGE LATERAL'``/``'LAT'`` -> ``'LATERAL'``,
    ``'AP SUPINE'`` -> ``'AP'``; empty/None/NaN -> ``''``; anything else is kept upper-cased.

    Sources spell views differently (OpenI's DICOM headers: ``PA``, ``AP``, ``LL``, ``RL``,
    ``LATERAL``, ``LARGE LATERAL``; NIH: ``PA``/``AP``), and the ``views=`` filter must see one
    spelling per view.
    """
    text = " ".join(str(value if value is not None else "").split()).upper()
    if text in ("", "NAN", "NONE", "UNKNOWN"):
        return ""
    if text in ("PA", "POSTERO-ANTERIOR", "POSTEROANTERIOR") or text.startswith("PA "):
        return "PA"
    if text in ("AP", "ANTERO-POSTERIOR", "ANTEROPOSTERIOR") or text.startswith("AP "):
        return "AP"
    if text in ("LL", "RL", "LAT", "LLAT", "RLAT") or "LATERAL" in text:
        return "LATERAL"
    return text


def png_header(path, data: bytes) -> ImageInfo:
    """PNG: the IHDR chunk must come first (PNG spec 5.6); it holds width, height, bit depth.

    The chunks before the first IDAT are walked for an APNG ``acTL`` (animation control) chunk,
    which the APNG specification requires to precede the image data.
    """
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise BadImage(path, "truncated or corrupt PNG (no IHDR header)")
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
    pos, chunks = 8, 0
    while pos + 16 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            break
        chunks += 1
        if chunks > _MAX_PNG_CHUNKS:
            raise BadImage(path, f"corrupt PNG (over {_MAX_PNG_CHUNKS} chunks before the image data)")
        if kind == b"acTL":
            frames = struct.unpack(">I", data[pos + 8:pos + 12])[0]
            if frames > 1:
                raise BadImage(path, f"animated PNG (APNG with {frames} frames); a radiograph "
                                     f"is one still image")
        pos += 12 + length
    colour = {0: "grey", 2: "rgb", 3: "palette", 4: "grey+alpha", 6: "rgba"}.get(colour_type, "")
    return ImageInfo("png", width, height, bit_depth, 1, colour)


def png_verify(path, data: bytes) -> None:
    """Check the CRC of every complete chunk before libpng sees the file.

    libpng reports a CRC error by printing ``libpng error: ...`` to stderr itself (OpenCV
    installs no handler), which would break the one-line rule; checking first turns the usual
    corruption (flipped bits, bytes lost in a copy) into a ``BadImage`` at ~1 GB/s. Inflating the
    image data as well would catch the rest but doubles the decode time, so a crafted file with
    valid CRCs and broken deflate data still gets libpng's line in addition to the BadImage.
    """
    view, pos, chunks = memoryview(data), 8, 0
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        chunks += 1
        if chunks > 100 * _MAX_PNG_CHUNKS:  # real files: < 100 + one IDAT per 8-64 KB
            raise BadImage(path, f"corrupt PNG (over {100 * _MAX_PNG_CHUNKS} chunks)")
        if end > len(data):
            break  # truncated: OpenCV refuses it quietly
        if zlib.crc32(view[pos + 4:end - 4]) != struct.unpack(">I", data[end - 4:end])[0]:
            raise BadImage(path, f"corrupt PNG (CRC error in the {_chunk_name(kind)} chunk)")
        pos = end


def _chunk_name(kind: bytes) -> str:
    return kind.decode("ascii") if kind.isalpha() else repr(kind)


def jpeg_header(path, data: bytes) -> ImageInfo:
    """JPEG: walk the marker segments up to the first start-of-frame (SOFn) segment."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            raise BadImage(path, "corrupt JPEG (bad marker before the frame header)")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        if marker in _JPEG_SOF:
            if pos + 10 > end:
                break
            precision, height, width, components = struct.unpack(">BHHB", data[pos + 4:pos + 10])
            if height == 0:  # height deferred to a DNL marker, which libjpeg does not support
                raise BadImage(path, "unsupported JPEG (height given by a DNL marker)")
            if components == 4:
                raise BadImage(path, "CMYK/YCCK JPEG (4 colour components) is not supported: "
                                     "its grey depends on an ink profile; export greyscale or RGB")
            if components not in (1, 3):
                raise BadImage(path, f"unsupported JPEG with {components} colour components")
            colour = "grey" if components == 1 else "rgb"
            return ImageInfo("jpeg", width, height, precision, 1, colour)
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    raise BadImage(path, "truncated or corrupt JPEG (no frame header)")


def _tiff_tags(data: bytes, endian: str, ifd: int):
    """The first value of every numeric tag of the IFD at ``ifd``, and the next IFD's offset."""
    count = struct.unpack_from(endian + "H", data, ifd)[0]
    tags = {}
    for k in range(count):
        entry = ifd + 2 + 12 * k
        tag, kind, n = struct.unpack_from(endian + "HHI", data, entry)
        fmt = _TIFF_TYPES.get(kind)
        if fmt is None or n == 0:
            continue
        inline = struct.calcsize(fmt) * n <= 4
        where = entry + 8 if inline else struct.unpack_from(endian + "I", data, entry + 8)[0]
        tags[tag] = struct.unpack_from(endian + fmt, data, where)[0]
    return tags, struct.unpack_from(endian + "I", data, ifd + 2 + 12 * count)[0]


def tiff_header(path, data: bytes) -> ImageInfo:
    """TIFF: read IFD 0 (size, bits, sample format, colour model) and count the pages."""
    endian = "<" if data[:2] == b"II" else ">"
    try:
        ifd = struct.unpack_from(endian + "I", data, 4)[0]
        tags, following = _tiff_tags(data, endian, ifd)
        pages, seen = 1, {ifd}
        while following and following not in seen and pages < _MAX_TIFF_PAGES:
            seen.add(following)  # a cycle of directories ends the count
            pages += 1
            count = struct.unpack_from(endian + "H", data, following)[0]
            following = struct.unpack_from(endian + "I", data, following + 2 + 12 * count)[0]
    except struct.error:
        raise BadImage(path, "truncated or corrupt TIFF (image directory outside the file)") from None
    if 256 not in tags or 257 not in tags:
        raise BadImage(path, "corrupt TIFF (no ImageWidth/ImageLength in the first directory)")
    bits, spp, fmt = tags.get(258, 1), tags.get(277, 1), tags.get(339, 1)
    photometric = tags.get(262, 1 if spp == 1 else 2)
    if photometric == 5:
        raise BadImage(path, "CMYK (separated) TIFF is not supported: its grey depends on an ink "
                             "profile; export greyscale or RGB")
    if photometric not in _TIFF_COLOUR:
        raise BadImage(path, f"unsupported TIFF colour model (PhotometricInterpretation "
                             f"{photometric})")
    if fmt == 2:
        raise BadImage(path, f"signed-integer TIFF samples ({bits}-bit) are not supported; "
                             f"expected unsigned 8/16-bit or float samples")
    if (fmt, bits) not in ((1, 1), (1, 8), (1, 16), (3, 32), (3, 64)):
        raise BadImage(path, f"unsupported TIFF samples ({bits}-bit, SampleFormat {fmt}); "
                             f"expected unsigned 1/8/16-bit or 32/64-bit float")
    return ImageInfo("tiff", tags[256], tags[257], bits, pages, _TIFF_COLOUR[photometric],
                     "float" if fmt == 3 else "uint")


__all__ = ["ImageInfo", "MAX_PIXELS", "MIN_SIDE", "looks_like", "check_size", "normalize_view",
           "png_header", "png_verify", "jpeg_header", "tiff_header"]
