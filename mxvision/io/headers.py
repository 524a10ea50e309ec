"""What an image file's header declares, read from its bytes without decoding a pixel.

:mod:`mxvision.io.images` sniffs the format from the leading bytes and calls the parser here
for PNG (IHDR, and an APNG ``acTL`` before the first IDAT), JPEG (the frame header, and every
scan) and TIFF, classic or Big (every image file directory). Each returns an :class:`ImageInfo`
or raises :class:`~mxvision.errors.BadImage` naming the file, so :func:`check_size` can refuse
decompression bombs, and animation, CMYK and endless JPEG scans are refused, before anything is
allocated. Offsets read from a hostile file are only ever used through bounds-checked
``struct.unpack_from``, and every walk is bounded (chunks, markers, directories, entries).

Why decoding is then bounded in time as well as memory: each decoder's work is a fixed number
of passes over the declared pixels plus one pass over the file's bytes -- libpng one pass (seven
for Adam7), libtiff one, libjpeg one per *scan*. The scan count is the only pass count a file
chooses, so :func:`jpeg_header` counts the scans and refuses more than ``JPEG_MAX_SCANS``; with
the pixel limit and the file size limit that caps the decode at a few seconds (100 scans of a
100 MP image: ~0.5 s when the scans are empty, ~7.5 s when each carries real data, measured on a
2-core machine), where an unchecked file of tiny scans keeps libjpeg busy for hours.

:func:`normalize_view` gives the one spelling of a radiograph's view (DICOM ``ViewPosition``,
OpenI's and NIH's label columns); it lives here, at the bottom, because the DICOM header reader
needs it and the dataset code (:mod:`mxvision.data.views`) builds its ``views=`` filter on it.
"""
import re
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

#: Most memory one image may take while it is read: the file's bytes (and a DICOM's inflated
#: dataset) plus every array decoding and scaling need (:func:`decode_bytes`), estimated from the
#: header before a pixel is decoded. 900 MiB reads a 100 MP 8-bit grey or RGB PNG, a 100 MP 16-bit
#: grey TIFF or a 28 MP 16-bit DICOM (a 43 cm detector at 0.1 mm is 18.5 MP), and keeps any single
#: file under 1 GB beyond what the pipeline itself holds (measured: tests/io/test_hostile_images.py).
MAX_DECODE_BYTES = 900 << 20

#: Most scans accepted in one JPEG. libjpeg reads every scan a file holds, each a pass over the
#: whole image, so a file of thousands of tiny scans decodes for hours; real encoders write one
#: (baseline) or 6-10 (progressive). 100 is libtiff's own limit for a JPEG inside a TIFF
#: (``LIBTIFF_JPEG_MAX_ALLOWED_SCAN_NUMBER``).
JPEG_MAX_SCANS = 100

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG start-of-frame markers: every SOFn except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
JPEG_LS_SOF = 0xF7  # SOF55: JPEG-LS, found in DICOM frames (libjpeg does not decode it)
# Markers without a length field.
_JPEG_STANDALONE = {0x01} | set(range(0xD0, 0xD8))
_JPEG_MAX_MARKERS = 10_000  # segments outside the scans; real files have a few dozen
# Scan data ends at the next marker: 0xFF followed by neither 0x00 (a stuffed byte), 0xFF (fill)
# nor RST0-7. Searching for it runs in C, so counting scans costs ~1 ms per MB.
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
_JPEG_FILL = re.compile(rb"\xff+")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
BIGTIFF_MAGIC = (b"II+\x00", b"MM\x00+")
# TIFF PhotometricInterpretation values OpenCV/libtiff turn into grey or BGR.
_TIFF_COLOUR = {0: "miniswhite", 1: "grey", 2: "rgb", 3: "palette", 6: "ycbcr"}
# BYTE SHORT LONG SBYTE SSHORT SLONG LONG8 SLONG8 IFD8
_TIFF_TYPES = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 16: "Q", 17: "q", 18: "Q"}
_MAX_TIFF_PAGES = 10_000
_MAX_TIFF_ENTRIES = 4096  # per directory: libtiff refuses more ("Sanity check on directory count")
_MAX_TIFF_TOTAL_ENTRIES = 100_000  # over all directories; real files have tens per page
_MAX_PNG_CHUNKS = 10_000  # ancillary chunks before IDAT; real files have a few dozen at most
# The chunks libpng is given (see png_image_chunks): the critical ones, tRNS (transparency, which
# decides whether a palette expands to BGR or BGRA) and eXIf (OpenCV applies its orientation).
_PNG_KEPT = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"eXIf"}
# What other content looks like, for the "not a supported image" message (leading bytes).
_LOOKS_LIKE = ((b"GIF87a", "a GIF image"), (b"GIF89a", "a GIF image"), (b"BM", "a BMP image"),
               (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"), (b"\xffO\xffQ", "a JPEG 2000 image"),
               (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"),
               (b"\x1f\x8b", "a gzip file"), (b"\x93NUMPY", "a NumPy array file"),
               (b"\x1a\x45\xdf\xa3", "a video (Matroska/WebM)"))


class ImageInfo(NamedTuple):
    """What a file's header declares: format ('png'/'jpeg'/'tiff'/'dicom'), size, bits, frames
    (pages for TIFF), colour model (e.g. 'grey', 'rgb', 'palette', 'miniswhite'; '' when the
    decoder decides), sample type ('uint' or 'float') and samples (channels) per pixel."""

    format: str
    width: int
    height: int
    bit_depth: int
    frames: int = 1
    colour: str = ""
    sample: str = "uint"
    samples: int = 1


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


def decode_bytes(info: ImageInfo) -> int:
    """Memory decoding ``info``'s image takes: the decoder's output and the working arrays.

    Per pixel: the decoded samples (OpenCV gives palette, grey+alpha and 8-bit TIFF as up to
    four channels), a grey copy of colour, and the float32 result; float samples are scaled in
    float64; DICOM values pass through pydicom's float64 LUTs (two arrays alive at once).
    Measured peaks stay under this estimate (tests/io/test_hostile_images.py).
    """
    pixels = max(info.width, 0) * max(info.height, 0)
    size = 1 if info.bit_depth <= 8 else 2 if info.bit_depth <= 16 else 4 if info.bit_depth <= 32 else 8
    channels = max(info.samples, 1)
    if info.format == "dicom":
        return pixels * (channels * (size + 8) + 20)
    if info.colour in ("palette", "grey+alpha") or (info.format == "tiff" and size == 1):
        channels = max(channels, 4)
    per_pixel = channels * size + (size if channels > 1 else 0) + 4
    if info.sample == "float":
        per_pixel += 8
    return pixels * per_pixel


def check_size(path, info: ImageInfo, file_bytes: int = 0) -> None:
    """Refuse empty, bomb-sized (over ``MAX_PIXELS``, or decoding past ``MAX_DECODE_BYTES``
    together with the ``file_bytes`` already in memory) and icon-sized (under ``MIN_SIDE``)
    images."""
    width, height = info.width, info.height
    if width <= 0 or height <= 0:
        raise BadImage(path, f"header declares an empty image ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise BadImage(path, f"header declares {width}x{height} pixels, over the limit of "
                             f"{MAX_PIXELS // 1_000_000} megapixels (refused before decoding)")
    if min(width, height) < MIN_SIDE:
        raise BadImage(path, f"image is only {width}x{height} pixels; "
                             f"at least {MIN_SIDE} pixels a side are needed")
    need = file_bytes + decode_bytes(info)
    if need > MAX_DECODE_BYTES:
        raise BadImage(path, f"reading this {width}x{height} image ({info.samples} x "
                             f"{info.bit_depth}-bit samples) needs about {need // 2 ** 20} MiB, over "
                             f"the limit of {MAX_DECODE_BYTES // 2 ** 20} MiB (refused before decoding)")


def check_not_blank(path, low, high) -> None:
    """Refuse a constant image (``low == high``, the smallest and largest finite sample), in every
    format alike: a blank DICOM or float image has no range to scale, and a blank PNG, JPEG or TIFF
    (an all-black JPEG scored nodule=0.68) is a failed export, not a radiograph. ``low`` is
    reported as stored (0 or 255 for 8-bit, the presentation value for DICOM)."""
    if high == low:
        raise BadImage(path, f"the image is blank (every pixel is {float(low):g})")


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


# --------------------------------------------------------------------------- PNG
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
    colour, samples = {0: ("grey", 1), 2: ("rgb", 3), 3: ("palette", 3), 4: ("grey+alpha", 2),
                       6: ("rgba", 4)}.get(colour_type, ("", 4))
    return ImageInfo("png", width, height, bit_depth, 1, colour, "uint", samples)


def png_image_chunks(path, data: bytes):
    """The file with only the chunks libpng needs (``_PNG_KEPT``), every CRC checked first.

    libpng prints its own lines to stderr for a bad CRC and for odd ancillary chunks (text and
    ICC profiles it cannot parse), and inflates every zTXt/iTXt/iCCP chunk -- up to 8 MB each,
    thousands of them, seconds of CPU for a 2 MB file -- although none changes a decoded pixel
    (checked: gAMA, sRGB, sBIT, iCCP and text chunks leave OpenCV's output identical). Checking
    CRCs here (~1 GB/s) turns the usual corruption into a ``BadImage``, and dropping the other
    ancillary chunks leaves libpng nothing to inflate but the image. A chunk running past the
    end of the file is refused: OpenCV's reader allocates the length a chunk declares. Returns
    ``data`` itself when nothing is dropped (no copy for a plain file).
    """
    view = memoryview(data)
    pos, start, chunks, kept, dropped = 8, 8, 0, [view[:8]], False
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        chunks += 1
        if chunks > 100 * _MAX_PNG_CHUNKS:  # real files: < 100 + one IDAT per 8-64 KB
            raise BadImage(path, f"corrupt PNG (over {100 * _MAX_PNG_CHUNKS} chunks)")
        if end > len(data) or length > 0x7FFFFFFF:  # the reader would allocate what it declares
            raise BadImage(path, f"cannot decode the PNG data (truncated: the {_chunk_name(kind)} "
                                 f"chunk runs past the end of the file)")
        if zlib.crc32(view[pos + 4:end - 4]) != struct.unpack(">I", data[end - 4:end])[0]:
            raise BadImage(path, f"corrupt PNG (CRC error in the {_chunk_name(kind)} chunk)")
        if kind not in _PNG_KEPT:
            if not 97 <= kind[0] <= 122:  # bit 5 of the first letter clear: a critical chunk
                raise BadImage(path, f"corrupt PNG (unknown critical chunk {_chunk_name(kind)})")
            kept.append(view[start:pos])
            start, dropped = end, True
        pos = end
        if kind == b"IEND":
            break
    if not dropped:
        return data
    kept.append(view[start:])  # the chunks since the last one dropped, and any truncated tail
    return b"".join(kept)


def _chunk_name(kind: bytes) -> str:
    return kind.decode("ascii") if kind.isalpha() else repr(kind)


# --------------------------------------------------------------------------- JPEG
def jpeg_header(path, data, jpeg_ls=False) -> ImageInfo:
    """JPEG: the first start-of-frame (SOFn) segment, after every scan is counted.

    The marker segments are walked to the end of the image (EOI); each scan's entropy-coded
    data is skipped by searching for the next marker. More than ``JPEG_MAX_SCANS`` scans are
    refused (see the module docstring). ``jpeg_ls`` also accepts a JPEG-LS frame header (SOF55),
    for DICOM frames.
    """
    sof = _JPEG_SOF | {JPEG_LS_SOF} if jpeg_ls else _JPEG_SOF
    pos, end, info, scans, markers = 2, len(data), None, 0, 0
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            if info is None:
                raise BadImage(path, "corrupt JPEG (bad marker before the frame header)")
            found = _JPEG_NEXT_MARKER.search(data, pos)  # libjpeg skips stray bytes too
            if found is None:
                break
            pos = found.start()
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes
            pos = _JPEG_FILL.match(data, pos).end() - 1
            continue
        markers += 1
        if markers > _JPEG_MAX_MARKERS:
            raise BadImage(path, f"corrupt JPEG (over {_JPEG_MAX_MARKERS} marker segments)")
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9):  # a second start of image, or the end of image
            break
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xDA:
            if info is None:
                break  # a scan before any frame header
            scans += 1
            if scans > JPEG_MAX_SCANS:
                raise BadImage(path, f"JPEG has over {JPEG_MAX_SCANS} scans, each a full pass over "
                                     f"the image (refused before decoding)")
            found = _JPEG_NEXT_MARKER.search(data, pos + 2 + length)
            if found is None:
                break
            pos = found.start()
            continue
        if marker in sof and info is None:
            info = _jpeg_frame(path, data, pos)
        pos += 2 + length
    if info is None:
        raise BadImage(path, "truncated or corrupt JPEG (no frame header)")
    return info


def _jpeg_frame(path, data, pos) -> ImageInfo:
    if pos + 10 > len(data):
        raise BadImage(path, "truncated or corrupt JPEG (no frame header)")
    precision, height, width, components = struct.unpack(">BHHB", data[pos + 4:pos + 10])
    if height == 0:  # height deferred to a DNL marker, which libjpeg does not support
        raise BadImage(path, "unsupported JPEG (height given by a DNL marker)")
    if components == 4:
        raise BadImage(path, "CMYK/YCCK JPEG (4 colour components) is not supported: "
                             "its grey depends on an ink profile; export greyscale or RGB")
    if components not in (1, 3):
        raise BadImage(path, f"unsupported JPEG with {components} colour components")
    colour = "grey" if components == 1 else "rgb"
    return ImageInfo("jpeg", width, height, precision, 1, colour, "uint", components)


# --------------------------------------------------------------------------- TIFF
def _tiff_directory(path, data, endian, big, ifd):
    """The first value of every numeric tag of the IFD at ``ifd``, and the next IFD's offset.

    A tag given twice is refused: libtiff keeps the first, a reader keeping the last would check
    one size and let libtiff decode another.
    """
    count_fmt, offset_fmt, entry_size = ("Q", "Q", 20) if big else ("H", "I", 12)
    head = struct.calcsize(count_fmt)
    count = struct.unpack_from(endian + count_fmt, data, ifd)[0]
    if count > _MAX_TIFF_ENTRIES:
        raise BadImage(path, f"corrupt TIFF (a directory of {count} entries; libtiff reads at "
                             f"most {_MAX_TIFF_ENTRIES})")
    tags, seen = {}, set()
    for k in range(count):
        entry = ifd + head + entry_size * k
        tag, kind = struct.unpack_from(endian + "HH", data, entry)
        n = struct.unpack_from(endian + offset_fmt, data, entry + 4)[0]
        if tag in seen:
            raise BadImage(path, f"corrupt TIFF (tag {tag} appears twice in one directory)")
        seen.add(tag)
        fmt = _TIFF_TYPES.get(kind)
        if fmt is None or n == 0:
            continue
        value_at = entry + 4 + struct.calcsize(offset_fmt)
        if struct.calcsize(fmt) * n > (8 if big else 4):
            value_at = struct.unpack_from(endian + offset_fmt, data, value_at)[0]
        tags[tag] = struct.unpack_from(endian + fmt, data, value_at)[0]
    return tags, count, struct.unpack_from(endian + offset_fmt, data, ifd + head + entry_size * count)[0]


def tiff_header(path, data: bytes) -> ImageInfo:
    """TIFF or BigTIFF: every image file directory is read; page 0 (the one decoded) must hold
    a supported image, and no page may declare more than the size limits allow."""
    endian = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    kind, pages, total = "BigTIFF" if big else "TIFF", [], 0
    try:
        if big and struct.unpack_from(endian + "HH", data, 4) != (8, 0):
            raise BadImage(path, "corrupt BigTIFF (offsets are not 8 bytes)")
        ifd, seen = struct.unpack_from(endian + ("Q" if big else "I"), data, 8 if big else 4)[0], set()
        while ifd and ifd not in seen and len(pages) < _MAX_TIFF_PAGES:
            seen.add(ifd)  # a cycle of directories ends the walk
            tags, count, ifd = _tiff_directory(path, data, endian, big, ifd)
            total += count
            if total > _MAX_TIFF_TOTAL_ENTRIES:
                raise BadImage(path, f"corrupt {kind} (over {_MAX_TIFF_TOTAL_ENTRIES} directory entries)")
            pages.append(tags)
    except struct.error:
        raise BadImage(path, f"truncated or corrupt {kind} (image directory outside the file)") from None
    if not pages:
        raise BadImage(path, f"corrupt {kind} (no image directory)")
    infos = [_tiff_page(path, k, tags, len(pages)) for k, tags in enumerate(pages)]
    for k, (tags, info) in enumerate(zip(pages, infos), start=1):
        _check_tiles(path, k, tags, info)
    for k, info in enumerate(infos[1:], start=2):
        if info.width * info.height > MAX_PIXELS or decode_bytes(info) > MAX_DECODE_BYTES:
            raise BadImage(path, f"page {k} of the TIFF declares {info.width}x{info.height} pixels "
                                 f"of {info.samples} x {info.bit_depth}-bit samples, over the limits "
                                 f"(refused before decoding)")
    return infos[0]


def _check_tiles(path, k, tags, info):
    """A decoder allocates one whole tile however small the image: a 1 MB 64x64 TIFF declaring
    23168x23168 tiles took +950 MB and was then scored. Tiles may exceed a small image (a 256 px
    tile on a 100 px image), so a tile is refused only past 4x the image's area (and at least
    1 Mpx) or past the pixel and decode-byte limits. Strips hold at most the image's rows."""
    if 322 not in tags and 323 not in tags:
        return
    width, height = tags.get(322, 0), tags.get(323, 0)
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise BadImage(path, f"corrupt TIFF (page {k} declares tiles of {width}x{height} pixels)")
    area = width * height
    tile = info._replace(width=width, height=height)
    if area > max(4 * info.width * info.height, 1 << 20) or area > MAX_PIXELS or \
            decode_bytes(tile) > MAX_DECODE_BYTES:
        raise BadImage(path, f"page {k} of the TIFF declares {width}x{height}-pixel tiles for a "
                             f"{info.width}x{info.height} image (refused before decoding)")


def _tiff_page(path, k, tags, pages) -> ImageInfo:
    """Page ``k``'s declared image; page 0 must also be one mxvision decodes."""
    where = "first directory" if k == 0 else f"directory {k + 1}"
    if 256 not in tags or 257 not in tags:
        raise BadImage(path, f"corrupt TIFF (no ImageWidth/ImageLength in the {where})")
    bits, spp, fmt = tags.get(258, 1), tags.get(277, 1), tags.get(339, 1)
    photometric = tags.get(262, 1 if spp == 1 else 2)
    info = ImageInfo("tiff", tags[256], tags[257], bits, pages, _TIFF_COLOUR.get(photometric, ""),
                     "float" if fmt == 3 else "uint", spp)
    if k > 0:
        return info
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
    if not 1 <= spp <= 4:
        raise BadImage(path, f"unsupported TIFF with {spp} samples per pixel; expected 1 to 4")
    return info


__all__ = ["ImageInfo", "MAX_PIXELS", "MIN_SIDE", "MAX_DECODE_BYTES", "JPEG_MAX_SCANS",
           "looks_like", "decode_bytes", "check_size", "check_not_blank", "normalize_view",
           "png_header", "png_image_chunks", "jpeg_header", "tiff_header"]
