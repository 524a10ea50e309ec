"""PNG, JPEG and TIFF files built byte by byte for the tests, so every header field is chosen.

Nothing here is stored in the repository. The bombs are cheap to make: a zlib stream of a
gigabyte of zeros is one full-flushed deflate block repeated (milliseconds, about a megabyte).
"""
import struct
import zlib

import cv2
import numpy as np


# --------------------------------------------------------------------------- PNG
def png_chunk(kind, payload):
    """One PNG chunk with its CRC."""
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def png_file(width, height, idat, bit_depth=8, colour_type=0, before_idat=(), interlace=0):
    """A PNG whose IHDR declares ``width`` x ``height``, with raw ``before_idat`` chunks."""
    return (b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0,
                                             interlace))
            + b"".join(before_idat) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def insert_chunks(png, chunks):
    """``png`` (a real file) with raw ``chunks`` inserted right after its IHDR."""
    return png[:33] + b"".join(chunks) + png[33:]


def zlib_zeros(count, block=1 << 20):
    """A zlib stream (header, deflate, Adler-32) of ``count`` zero bytes, ``count`` a multiple of
    ``block``: one full-flushed block of zeros repeated."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    one = packer.compress(bytes(block)) + packer.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()
    adler, zeros = 1, bytes(block)
    for _ in range(count // block):
        adler = zlib.adler32(zeros, adler)
    return b"\x78\xda" + one * (count // block) + final + struct.pack(">I", adler)


def smooth_image(side=128, seed=0, channels=1):
    """A smooth random image (compresses like a radiograph), uint8."""
    small = np.random.RandomState(seed).randint(0, 256, (16, 16, channels), dtype=np.uint8)
    img = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)
    return img if channels > 1 else img.reshape(side, side)


# --------------------------------------------------------------------------- JPEG
def jpeg_bytes(img, progressive=False, quality=90):
    flags = [cv2.IMWRITE_JPEG_QUALITY, quality] + ([cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if progressive else [])
    return cv2.imencode(".jpg", img, flags)[1].tobytes()


def jpeg_with_scans(img, extra_scans):
    """A progressive JPEG of ``img`` followed by ``extra_scans`` empty AC refinement scans: each
    one more pass of libjpeg over the whole image, ten bytes of file apiece."""
    jpg = jpeg_bytes(img, progressive=True)
    components = 1 if img.ndim == 2 else 3
    ids = b"".join(bytes([k + 1, 0]) for k in range(components))
    sos = b"\xff\xda" + struct.pack(">HB", 6 + 2 * components, components) + ids + b"\x01\x3f\x10"
    if components > 1:  # an AC scan holds one component
        sos = b"\xff\xda\x00\x08\x01\x01\x00\x01\x3f\x10"
    return jpg[:-2] + sos * extra_scans + b"\xff\xd9"


def jpeg_declaring(jpg, width, height):
    """``jpg`` with its frame header patched to declare ``width`` x ``height``."""
    out = bytearray(jpg)
    sof = next(k for k in range(2, len(out) - 1) if out[k] == 0xFF and out[k + 1] in (0xC0, 0xC1, 0xC2))
    out[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(out)


# --------------------------------------------------------------------------- TIFF
_TYPE_FORMATS = {3: "H", 4: "I", 16: "Q"}


def tiff_file(pages, endian="<", big=False):
    """A TIFF (or BigTIFF) of ``pages``: each a dict with ``entries`` -- ``(tag, type, count,
    value)``, the value an int, bytes, or ``"DATA"`` for the offset of the page's ``data`` -- in
    the order given (duplicates and disorder stay as written)."""
    offset_fmt, count_fmt, entry_size, inline = ("Q", "Q", 20, 8) if big else ("I", "H", 12, 4)
    head = (b"II" if endian == "<" else b"MM") + (struct.pack(endian + "HHH", 43, 8, 0) if big
                                                     else struct.pack(endian + "H", 42))
    out = bytearray(head + bytes(struct.calcsize(offset_fmt)))
    directories = []
    for page in pages:
        data_at = len(out)
        out += page["data"] + b"\0" * (len(page["data"]) % 2)
        entries = []
        for tag, kind, count, value in page["entries"]:
            if value == "DATA":
                value = data_at
            if isinstance(value, int):
                value = struct.pack(endian + _TYPE_FORMATS[kind], value)
            if len(value) > inline:
                at = len(out)
                out += value + b"\0" * (len(value) % 2)
                value = struct.pack(endian + offset_fmt, at)
            entries.append((tag, kind, count, value.ljust(inline, b"\0")))
        directories.append(len(out))
        out += struct.pack(endian + count_fmt, len(entries))
        for tag, kind, count, value in entries:
            out += struct.pack(endian + "HH" + offset_fmt, tag, kind, count) + value
        out += bytes(struct.calcsize(offset_fmt))
    struct.pack_into(endian + offset_fmt, out, len(head), directories[0])
    for this, following in zip(directories, directories[1:]):
        count = struct.unpack_from(endian + count_fmt, out, this)[0]
        struct.pack_into(endian + offset_fmt, out, this + struct.calcsize(count_fmt) + entry_size * count,
                         following)
    return bytes(out)


def tiff_page(width, height, data=None, bits=8, samples=1, photometric=None, compression=1,
              extra=(), long_type=4):
    """One uncompressed single-strip page (``data`` defaults to a ramp of the declared size);
    ``extra`` entries are appended; ``long_type`` 16 writes sizes as BigTIFF's LONG8."""
    if data is None:
        count = width * height * samples * max(bits // 8, 1)
        data = (np.arange(count) % 251).astype(np.uint8).tobytes()
    photometric = photometric if photometric is not None else (1 if samples == 1 else 2)
    bits_value = bits if samples == 1 else struct.pack("<" + "H" * samples, *[bits] * samples)
    entries = [(256, long_type, 1, width), (257, long_type, 1, height), (258, 3, samples, bits_value),
               (259, 3, 1, compression), (262, 3, 1, photometric), (273, long_type, 1, "DATA"),
               (277, 3, 1, samples), (278, long_type, 1, height), (279, long_type, 1, len(data))]
    return {"entries": entries + list(extra), "data": data}
