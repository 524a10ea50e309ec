"""DICOM files, read by pydicom within bounds checked before pydicom allocates anything.

pydicom trusts a file more than mxvision can: it inflates a deflated dataset whole (a 4 MB file
inflates to gigabytes), reads every header element a file holds (a million tiny ones take
seconds), lets its JPEG/JPEG 2000 plugins decode whatever size a frame's own header claims, and
turns a non-numeric ``Rows`` or ``NumberOfFrames`` into a traceback. So here:

* the File Meta group is walked first; a **deflated** dataset is inflated by a bounded
  ``zlib.decompressobj`` (``max_length``), at most ``MAX_INFLATED_BYTES``, and pydicom reads the
  inflated bytes as the Explicit VR Little Endian dataset they are;
* the header is read up to the pixel data, at most ``MAX_ELEMENTS`` top-level elements, and each
  sequence mxvision opens (LUTs, view codes) is at most ``MAX_SEQUENCE_BYTES``;
* ``Rows``, ``Columns``, ``NumberOfFrames``, ``SamplesPerPixel``, ``BitsAllocated`` and
  ``BitsStored`` must be single integers in their DICOM ranges; the image then passes
  :func:`~mxvision.io.headers.check_size` like any other format;
* native pixel data must hold every declared frame, and only the first frame is read;
* encapsulated data: fragments are counted (``MAX_FRAGMENTS``) before pydicom gathers the first
  frame, whose own header (JPEG, JPEG-LS, JPEG 2000) must declare the image the DICOM header
  does; a JPEG frame is held to ``JPEG_MAX_SCANS`` like a JPEG file. Segmented palette colour
  tables, which pydicom expands without a bound, are refused.

Values are then mapped the way a viewer shows them: modality LUT / rescale, the first VOI LUT
or window, MONOCHROME1 inverted so bone is bright, min-max scaled to [0, 1] (stored values have
no fixed full scale; this matches torchxrayvision's ``read_xray_dcm``). Multi-frame objects: the
**first frame** -- for radiography the other frames are derived views of it.
"""
import io
import logging
import struct
import warnings
import zlib

import cv2
import numpy as np

from mxvision.errors import BadImage, one_line
from mxvision.io.headers import MAX_DECODE_BYTES, ImageInfo, check_not_blank, check_size, jpeg_header

#: Most top-level data elements read from one header; real files have a few hundred.
MAX_ELEMENTS = 100_000
MAX_ITEMS = 200_000  # sequence items + pixel-data fragments in the whole file
#: Largest sequence (bytes) mxvision opens: a VOI LUT of 65536 16-bit entries is 128 KB.
MAX_SEQUENCE_BYTES = 1 << 21
#: Most fragments walked in encapsulated pixel data; real files have one to a few hundred a frame.
MAX_FRAGMENTS = 100_000
#: Largest deflated dataset once inflated. Its pixels must still fit ``MAX_DECODE_BYTES`` beside
#: it, so half of that is already more than any deflated file that can be decoded holds.
MAX_INFLATED_BYTES = MAX_DECODE_BYTES // 2

DEFLATED = "1.2.840.10008.1.2.1.99"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_META_ELEMENTS = 1000
_INFLATE_PIECE = 1 << 24
_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_OPENED_SEQUENCES = ("ModalityLUTSequence", "VOILUTSequence", "ViewCodeSequence")
_IMAGE_ELEMENTS = (("Rows", 1, 65535), ("Columns", 1, 65535), ("SamplesPerPixel", 1, 4),
                   ("BitsAllocated", 1, 64), ("BitsStored", 1, 64),
                   ("NumberOfFrames", 1, 2 ** 31 - 1))


def _pydicom():
    """pydicom, imported lazily (only DICOM inputs pay for it) and made quiet on first use.

    pydicom logs and warns about each oddity of a damaged header, and logs each failed decoder
    plugin with its traceback; the file then either decodes (the oddity did not matter) or is
    refused with one BadImage line that carries the plugin's message, so those records would
    only break the one-line rule. Its logger is raised to CRITICAL unless the application changed
    it from the WARNING pydicom sets on import, and its warnings are ignored.
    """
    import pydicom

    if not getattr(_pydicom, "quiet", False):
        logger = logging.getLogger("pydicom")
        if logger.level == logging.WARNING:
            logger.setLevel(logging.CRITICAL)
        _pydicom.quiet = True
    # Its warnings by a filter, (re)placed at the front on each use (the warnings module keeps
    # one copy): a catch_warnings block is not thread-safe -- threads decoding at once restore
    # each other's filters, and can leave "ignore" on for good.
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    return pydicom


def _meta(data: bytes):
    """``(end, transfer syntax)`` of the File Meta group (group 2, Explicit VR Little Endian
    by the standard), or ``(None, '')`` when the bytes hold none mxvision can walk."""
    pos, syntax = (132 if data[128:132] == b"DICM" else 0), ""
    for _ in range(_META_ELEMENTS):
        if pos + 8 > len(data) or struct.unpack_from("<H", data, pos)[0] != 2:
            return (pos, syntax) if syntax else (None, "")
        elem, vr = struct.unpack_from("<H2s", data, pos + 2)
        if vr in _LONG_VRS:
            start, length = pos + 12, struct.unpack_from("<I", data, pos + 8)[0] if pos + 12 <= len(data) else 0
        else:
            start, length = pos + 8, struct.unpack_from("<H", data, pos + 6)[0]
        if elem == 0x0010:
            syntax = data[start:start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    return None, ""


def _inflate(path, head, compressed, limit: int) -> bytes:
    """``head`` followed by the deflated dataset inflated, at most ``limit`` bytes of it: a bomb
    stops there. Inflated piece by piece into one growing buffer, so a dataset is held once (a
    single ``decompress`` call would hold its output twice while joining it)."""
    inflater, out, total, pending = zlib.decompressobj(-zlib.MAX_WBITS), io.BytesIO(), 0, compressed
    out.write(head)
    try:
        while not inflater.eof:
            piece = inflater.decompress(pending, _INFLATE_PIECE)
            total += len(piece)
            if total > limit:
                raise BadImage(path, f"deflated DICOM dataset inflates to over {limit // 2 ** 20} "
                                     f"MiB (refused while inflating)")
            out.write(piece)
            pending = inflater.unconsumed_tail
            if not pending and len(piece) < _INFLATE_PIECE:
                break
    except zlib.error as exc:
        raise BadImage(path, f"corrupt deflated DICOM ({one_line(exc, limit=120)})") from None
    if not inflater.eof:
        raise BadImage(path, "truncated deflated DICOM (the deflate stream ends early)")
    return out.getvalue()


class DicomFile:
    """One DICOM file parsed up to its pixel data, every bound above checked on the way.

    ``dataset`` is pydicom's header (no pixel data), ``stream`` the bytes pydicom reads (the
    file's, or the file meta and the inflated dataset), ``held`` the bytes both take in memory.
    """

    def __init__(self, path, data: bytes):
        self.path, self.stream, self.held, self.syntax = path, data, len(data), None
        meta_end, syntax = _meta(data)
        self.body_start = meta_end or 0
        if syntax == DEFLATED or (meta_end is None and DEFLATED.encode() in data[:65536]):
            if meta_end is None:
                raise BadImage(path, "deflated DICOM whose File Meta group cannot be read")
            self.stream = _inflate(path, data[:meta_end], memoryview(data)[meta_end:],
                                   MAX_INFLATED_BYTES)
            self.syntax = _EXPLICIT_LE
            self.held += len(self.stream)
        self.dataset, self.pixel_at = self._read_header()

    def _read_header(self):
        _pydicom()
        from pydicom.filereader import read_dataset, read_partial

        from mxvision.io.dicom_compat import original_encoding

        # pydicom builds every item of a sequence (twice: the header read, then pixel_array), and
        # MAX_ELEMENTS counts top-level elements only: a 12 MB file of 1.5 million empty items in
        # one undefined-length sequence took 38 s and 1.9 GB before it was accepted. Item tags
        # (FFFE,E000) are counted in the raw bytes first, in milliseconds; by chance a 4-byte
        # pattern occurs about once per 4 GB of pixel data, so the bound cannot refuse real files.
        items = self.stream.count(b"\xfe\xff\x00\xe0") + self.stream.count(b"\xff\xfe\xe0\x00")
        if items > MAX_ITEMS:
            raise BadImage(self.path, f"DICOM file holds {items} sequence items or fragments, over "
                                      f"the limit of {MAX_ITEMS} (refused before parsing them)")
        counted = [0]

        def stop(tag, vr, length):
            counted[0] += 1
            return tag in _PIXEL_TAGS or counted[0] > MAX_ELEMENTS

        fp = io.BytesIO(self.stream)
        try:
            if self.syntax:  # inflated: pydicom would inflate it again from the meta's syntax
                meta = read_partial(io.BytesIO(self.stream[:self.body_start]), force=True).file_meta
                fp.seek(self.body_start)
                ds = read_dataset(fp, False, True, stop_when=stop)
                ds.file_meta = meta
            else:
                ds = read_partial(fp, stop_when=stop, force=True)
            for keyword in _OPENED_SEQUENCES:
                value = getattr(ds.get_item(keyword), "value", None) if keyword in ds else None
                if isinstance(value, (bytes, bytearray)) and len(value) > MAX_SEQUENCE_BYTES:
                    raise BadImage(self.path, f"DICOM {keyword} is {len(value)} bytes, over "
                                              f"the limit of {MAX_SEQUENCE_BYTES}")
        except BadImage:
            raise
        except Exception as exc:  # pydicom raises many types (InvalidDicomError, EOFError, ...)
            reason = one_line(exc, limit=200) or type(exc).__name__
            raise BadImage(self.path, f"unreadable DICOM ({reason})") from None
        if counted[0] > MAX_ELEMENTS:
            raise BadImage(self.path, f"DICOM header has over {MAX_ELEMENTS} data elements "
                                      f"(refused before reading them)")
        at = fp.tell()  # pydicom stops with the file at the element that stopped it
        little = self.syntax is not None or original_encoding(ds)[1] is not False
        if at + 8 <= len(self.stream):
            group, elem = struct.unpack_from("<HH" if little else ">HH", self.stream, at)
            if (group << 16 | elem) in _PIXEL_TAGS:
                return ds, at
        return ds, None

    def integer(self, keyword, low, high):
        """The element's single integer value in ``low..high`` (None when absent), or BadImage."""
        try:
            value = self.dataset.get(keyword)
        except Exception:  # noqa: BLE001 - pydicom's conversion of a malformed value
            raise BadImage(self.path, f"DICOM element {keyword} is unreadable") from None
        if value is None or value in ("", b""):
            return None
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            if len(value) != 1:
                raise BadImage(self.path, f"DICOM element {keyword} holds {len(value)} values, "
                                          f"expected one integer")
            value = value[0]
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        try:
            number = int(text.strip())
        except ValueError:
            raise BadImage(self.path, f"DICOM element {keyword} is not an integer "
                                      f"({one_line(repr(text), limit=40)})") from None
        if not low <= number <= high:
            raise BadImage(self.path, f"DICOM element {keyword} is {number}, outside {low}..{high}")
        return number

    def info(self) -> ImageInfo:
        """The declared image, every integer element checked, then :func:`check_size`."""
        values = {k: self.integer(k, low, high) for k, low, high in _IMAGE_ELEMENTS}
        rows, cols, allocated = values["Rows"], values["Columns"], values["BitsAllocated"]
        if rows is None or cols is None:
            raise BadImage(self.path, "DICOM file has no image (no Rows/Columns; a report or DICOMDIR?)")
        if allocated is not None and allocated not in (1, 8, 16, 32, 64):
            raise BadImage(self.path, f"DICOM element BitsAllocated is {allocated}; expected 1, "
                                      f"8, 16, 32 or 64")
        if values["BitsStored"] and allocated and values["BitsStored"] > allocated:
            raise BadImage(self.path, f"DICOM BitsStored ({values['BitsStored']}) exceeds "
                                      f"BitsAllocated ({allocated})")
        photometric = str(self.dataset.get("PhotometricInterpretation", "") or "").strip()
        info = ImageInfo("dicom", cols, rows, values["BitsStored"] or allocated or 16,
                         values["NumberOfFrames"] or 1, photometric, "uint",
                         values["SamplesPerPixel"] or 1)
        check_size(self.path, info, self.held)
        self.bits_allocated = allocated or 16
        return info

    def check_pixels(self, info: ImageInfo) -> None:
        """Native data must hold every declared frame; an encapsulated first frame must declare
        this image in its own header. Nothing is decoded."""
        if self.pixel_at is None:
            raise BadImage(self.path, "DICOM file has no pixel data")
        at, stream = self.pixel_at, self.stream
        from mxvision.io.dicom_compat import original_encoding

        implicit_vr, little_endian = original_encoding(self.dataset)
        implicit = self.syntax is None and implicit_vr
        endian = "<" if self.syntax is not None or little_endian is not False else ">"
        if implicit:
            length, value_at = struct.unpack_from(endian + "I", stream, at + 4)[0], at + 8
        elif stream[at + 4:at + 6] in _LONG_VRS and at + 12 <= len(stream):
            length, value_at = struct.unpack_from(endian + "I", stream, at + 8)[0], at + 12
        else:
            length, value_at = struct.unpack_from(endian + "H", stream, at + 6)[0], at + 8
        if length != 0xFFFFFFFF:
            samples = 2 if info.colour.upper().endswith("_422") else info.samples  # chroma halved
            need = (info.width * info.height * samples * self.bits_allocated * info.frames + 7) // 8
            held = min(length, len(stream) - value_at)
            if held < need:
                raise BadImage(self.path, f"cannot decode the DICOM pixel data (it holds {held} "
                                          f"bytes; {info.frames} frame(s) of {info.width}x"
                                          f"{info.height} need {need})")
            return
        self._check_first_frame(info, value_at)

    def _check_first_frame(self, info, value_at):
        pos, fragments, stream = value_at, 0, self.stream
        while pos + 8 <= len(stream):
            group, elem, length = struct.unpack_from("<HHI", stream, pos)
            if (group, elem) == (0xFFFE, 0xE0DD):
                break
            if (group, elem) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
                raise BadImage(self.path, "cannot decode the DICOM pixel data (an encapsulated item "
                                          "that is not a fragment, or one nested in another)")
            fragments += 1
            if fragments > MAX_FRAGMENTS:
                raise BadImage(self.path, f"cannot decode the DICOM pixel data (over "
                                          f"{MAX_FRAGMENTS} fragments)")
            pos += 8 + length
        from mxvision.io.dicom_compat import first_frame

        try:
            frame = first_frame(memoryview(stream)[value_at:], info.frames)
        except Exception as exc:  # noqa: BLE001 - pydicom's ValueError for bad offsets
            raise BadImage(self.path, f"cannot decode the DICOM pixel data (its first frame: "
                                      f"{one_line(exc, limit=160)})") from None
        try:
            declared = _frame_size(self.path, frame)
        except BadImage as err:
            raise BadImage(self.path, f"cannot decode the DICOM pixel data (its first frame: "
                                      f"{err.problem})") from None
        if declared is not None and declared != (info.width, info.height, info.samples):
            raise BadImage(self.path, "cannot decode the DICOM pixel data (its first frame declares "
                                      "%dx%d x %d samples, the header %dx%d x %d; refused before "
                                      "decoding)" % (declared + (info.width, info.height, info.samples)))

    def decode(self, info: ImageInfo) -> np.ndarray:
        """The first frame as presentation values scaled to [0, 1] (float32)."""
        self.check_pixels(info)
        if "SegmentedRedPaletteColorLookupTableData" in self.dataset:
            raise BadImage(self.path, "DICOM with a segmented palette colour table is not "
                                      "supported; export it as MONOCHROME2 or RGB")
        from mxvision.io.dicom_compat import pixel_array

        photometric = info.colour.upper()
        try:  # YBR is converted to RGB; only the first frame is read
            arr = pixel_array(self.stream, self.syntax, self.body_start)
            arr = _presentation(self.dataset, photometric, arr)
        except Exception as exc:  # decoder plugins raise ValueError, RuntimeError, KeyError, ...
            reason = one_line(exc, limit=200) or type(exc).__name__
            raise BadImage(self.path, f"cannot decode the DICOM pixel data ({reason})") from None
        return _scale(self.path, arr, photometric)


def _frame_size(path, frame: bytes):
    """``(width, height, components)`` a compressed frame declares, or None for other codings."""
    if frame[:2] == b"\xff\xd8":
        info = jpeg_header(path, frame, jpeg_ls=True)
        return info.width, info.height, info.samples
    start = frame.find(b"jp2c") + 4 if frame[4:8] == b"jP  " else 0
    if frame[start:start + 4] == b"\xff\x4f\xff\x51" and len(frame) >= start + 42:
        xsiz, ysiz, x_offset, y_offset = struct.unpack_from(">IIII", frame, start + 8)
        components = struct.unpack_from(">H", frame, start + 40)[0]
        return xsiz - x_offset, ysiz - y_offset, components
    return None


def _presentation(ds, photometric, arr):
    """Modality LUT and VOI (grey), or the palette; float64 for grey."""
    from mxvision.io.dicom_compat import lut_functions

    apply_color_lut, apply_modality_lut, apply_voi_lut = lut_functions()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        arr = apply_modality_lut(arr, ds)
        if ds.get("VOILUTSequence"):
            arr = np.rint(arr).astype(np.int64)  # a VOI LUT is indexed by integer modality values
        return apply_voi_lut(arr, ds, index=0).astype(np.float64, copy=False)
    if photometric == "PALETTE COLOR":
        return apply_color_lut(arr, ds)
    return arr


def _scale(path, arr, photometric) -> np.ndarray:
    """Colour to BT.601 luminance, then min-max to [0, 1] in place; MONOCHROME1 inverted."""
    if arr.ndim == 3 and arr.shape[2] == 3:  # RGB, YBR (converted) or palette colour
        arr = cv2.cvtColor(arr.astype(np.float32), cv2.COLOR_RGB2GRAY)
    elif arr.ndim != 2:
        raise BadImage(path, f"unsupported DICOM pixel layout {arr.shape} ({photometric or '?'})")
    if arr.dtype != np.float64 or not arr.flags.writeable:
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise BadImage(path, "contains NaN or infinite pixel values")
    low, high = float(arr.min()), float(arr.max())
    check_not_blank(path, low, high)
    if not np.isfinite(high - low):
        raise BadImage(path, f"DICOM values have an unusable range ({low:g} to {high:g})")
    arr -= low
    arr /= high - low
    if photometric == "MONOCHROME1":  # low values are white: invert so bone is bright
        np.subtract(1.0, arr, out=arr)
    return arr.astype(np.float32)


def read_dicom(path, data: bytes) -> DicomFile:
    """Parse ``data``, the bytes of ``path``, up to the pixel data within the bounds above."""
    return DicomFile(path, data)


__all__ = ["DicomFile", "read_dicom", "DEFLATED", "MAX_ELEMENTS", "MAX_ITEMS", "MAX_SEQUENCE_BYTES",
           "MAX_FRAGMENTS", "MAX_INFLATED_BYTES"]
