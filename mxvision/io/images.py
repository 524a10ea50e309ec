"""Read any chest X-ray file a user has into one canonical form: a 2-D float32 array in [0, 1].

Everything downstream (feature extraction, training, prediction, RecordIO packing) starts from
this single representation, so a PNG exported from a PACS, a JPEG from a public dataset and the
original DICOM of the same radiograph all enter the network the same way.

Supported inputs, recognised by their content (magic bytes), never by their extension (a PNG
named ``.jpg`` is read as the PNG it is):

* **PNG** -- 1/2/4/8/16-bit grayscale, palette, grey+alpha, RGB and RGBA, decoded by OpenCV.
  OpenCV expands palette images through their palette (checked: the JSRT originals, whose palette
  maps index i to grey 255-i, come out as the grey, not the index), so Pillow is not needed.
  Colour is reduced to luminance (ITU-R BT.601 weights, ``cv2.COLOR_BGR2GRAY``); alpha is dropped,
  not composited: radiographs saved with alpha carry it fully opaque (all 21 RGBA NIH files do)
  and compositing a stray transparent region onto a background would invent pixel values.
  A 16-bit PNG is divided by 65535: the PNG specification requires encoders to scale samples to
  the full range of the bit depth (a 12-bit detector image is stored left-shifted, its ``sBIT``
  chunk only records the original precision), so 65535 is the sample's full-scale white, exactly
  as 255 is for 8-bit.
* **JPEG** -- baseline/progressive, grey or colour; the EXIF orientation is applied (photographs
  of films are often stored rotated), colour reduced to luminance as above.
* **TIFF** -- classic (not Big-) TIFF, little or big endian, recognised by its byte-order mark;
  decoded by OpenCV's libtiff. Unsigned 1/8/16-bit samples are divided by the full scale of
  their bit depth, as for PNG (TIFF's MaxSampleValue tag is, by the specification, statistics
  only). 32/64-bit **float** samples have no full scale at all (they may be attenuation values,
  counts or already normalised intensities), so they are min-max scaled to [0, 1] like DICOM,
  after refusing NaN/inf and blank images. WhiteIsZero is inverted so bone is bright. Multi-page
  files: the **first page** (the full-resolution image; later pages are usually thumbnails).
  Refused with a clear message: CMYK ("separated"), signed-integer samples, other bit depths.
* **DICOM** -- recognised by the ``DICM`` magic at byte 128 (or, for files without the 128-byte
  preamble, a ``.dcm``/``.dicom`` suffix *and* a DICOM data element at byte 0). Decoded by
  pydicom; compressed transfer syntaxes need its plugins
  (the JPEG-baseline samples need Pillow or pylibjpeg). The stored values are mapped the way a
  viewer would show them: modality LUT / rescale, then the first VOI LUT or window, then
  MONOCHROME1 is inverted so bone is always bright, then min-max scaling to [0, 1] (stored
  values have no fixed full scale, unlike PNG/JPEG samples; this matches torchxrayvision's
  ``read_xray_dcm``). Multi-frame objects: the **first frame** is used -- for radiography the
  extra frames are derived views (e.g. dual-energy bone/soft-tissue) of the first.

Anything a user can get wrong raises :class:`~mxvision.errors.BadImage` naming the file: missing,
unreadable (permissions, a directory, a FIFO or device, more than ``MAX_FILE_BYTES``), empty, not
an image (the message says what it looks like: GIF, WebP, ZIP, HTML, NumPy, text, ...),
truncated or corrupt, **animated** (APNG with more than one frame; GIF is refused as a format),
CMYK/YCCK JPEG and TIFF (their ink-to-luminance conversion depends on an ICC profile mxvision
does not apply, so any grey it produced could be silently wrong), non-finite values, images
smaller than ``MIN_SIDE`` pixels a side, and images whose *declared* size exceeds
``MAX_PIXELS``. The size is read from the PNG IHDR / JPEG SOF / TIFF IFD / DICOM Rows-Columns
header **before** any pixel is decoded, so a tiny file declaring a 50000x50000 image (a
decompression bomb) is refused without allocating it. A file is opened once, checked to be a
regular file with ``fstat`` (so a FIFO cannot block and ``/dev/zero`` cannot fill the memory) and
read with a size cap.

The decoders' own chatter is kept off stderr, because every problem already becomes one
``BadImage`` line: OpenCV's log level is lowered to FATAL on import (unless the user set
``OPENCV_LOG_LEVEL``) and pydicom's warnings are silenced while a file is parsed. Corrupt JPEG
*scan data* is the one thing no reader can detect (the format carries no checksum): libjpeg
decodes what it can and prints a warning.

The header parsers (PNG, JPEG, TIFF) live in :mod:`mxvision.io.headers`; this module reads the
file, sniffs the format, decodes and scales.
"""
import io
import logging
import os
import stat
import struct
import warnings

import cv2
import numpy as np

from mxvision.errors import BadImage, one_line
from mxvision.io.headers import (
    BIGTIFF_MAGIC, JPEG_MAGIC, MAX_PIXELS, MIN_SIDE, PNG_MAGIC, TIFF_MAGIC, ImageInfo, check_size, jpeg_header, looks_like,
    normalize_view, png_header, png_verify, tiff_header)

#: Largest file read, in bytes. An uncompressed 100 MP 16-bit image is 200 MB; 1 GiB leaves room
#: for multi-frame DICOM while refusing a mislabelled disk image or video before it fills memory.
MAX_FILE_BYTES = 1 << 30

#: File name suffixes of DICOM files (content decides the format; these only admit a DICOM file
#: saved without its 128-byte preamble).
DICOM_SUFFIXES = (".dcm", ".dicom")

# Every decode failure becomes one BadImage line, so the decoders' own log lines are noise.
if "OPENCV_LOG_LEVEL" not in os.environ and hasattr(cv2, "setLogLevel"):
    cv2.setLogLevel(1)  # LOG_LEVEL_FATAL


def read_image(path) -> np.ndarray:
    """Decode the chest X-ray at ``path`` to a 2-D float32 luminance array in [0, 1].

    Raises :class:`BadImage` (message names the file) for anything that is not a usable image.
    """
    data = _read_bytes(path)
    info = _sniff(path, data)
    if info.format == "dicom":
        img = _decode_dicom(path, data)
    else:
        img = _decode_raster(path, data, info)
    if img.ndim != 2:
        raise BadImage(path, f"decoded to an unexpected array shape {img.shape}")
    if info.format == "dicom" or info.sample == "float":
        # Integer PNG/JPEG/TIFF samples divided by their full scale are finite and in [0, 1]
        # already; skipping these passes saves ~10% of the decode CPU per 512 px film.
        if not np.isfinite(img).all():
            raise BadImage(path, "contains NaN or infinite pixel values")
        np.clip(img, 0.0, 1.0, out=img)
    return np.ascontiguousarray(img, dtype=np.float32)


def image_info(path) -> ImageInfo:
    """Read only the header of ``path``: format, declared size, bit depth and frame count.

    Applies the same checks as :func:`read_image` that need no decoding (size limits, format,
    animation, CMYK), so it is a cheap way to validate a whole dataset before a long
    feature-extraction run.
    """
    return _sniff(path, _read_bytes(path))


def dicom_tags(path) -> dict:
    """The header facts a dataset needs from a DICOM file, without decoding pixels.

    Returns ``view`` (``ViewPosition`` normalised to PA/AP/LATERAL, falling back to the code
    meaning of ``ViewCodeSequence``; ``""`` when neither says), ``view_raw``, ``patient_id``,
    ``study_uid``, ``photometric``, ``bits_stored``, ``transfer_syntax`` and ``modality``
    (``""`` where absent). Raises :class:`BadImage` for a file that is not DICOM.
    """
    data = _read_bytes(path)
    if not (data[128:132] == b"DICM" or str(path).lower().endswith(DICOM_SUFFIXES)):
        raise BadImage(path, "not a DICOM file (no DICM marker and no .dcm suffix)")
    ds = _parse_dicom(path, data, stop_before_pixels=True)
    raw = str(ds.get("ViewPosition", "") or "").strip()
    view = normalize_view(raw)
    if not view:
        for item in ds.get("ViewCodeSequence", None) or []:
            meaning = str(item.get("CodeMeaning", "") or "").lower()
            if "postero-anterior" in meaning or "posteroanterior" in meaning:
                view = "PA"
            elif "antero-posterior" in meaning or "anteroposterior" in meaning:
                view = "AP"
            elif "lateral" in meaning:
                view = "LATERAL"
            if view:
                break
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return {"view": view, "view_raw": raw, "patient_id": str(ds.get("PatientID", "") or ""),
            "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
            "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
            "bits_stored": int(ds.get("BitsStored") or 0), "transfer_syntax": syntax,
            "modality": str(ds.get("Modality", "") or "")}


# --------------------------------------------------------------------------- reading and sniffing
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) \
    | getattr(os, "O_CLOEXEC", 0)


def _file_kind(mode) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _read_bytes(path) -> bytes:
    """Read the whole file, turning every OS failure into a one-line BadImage.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor (no race
    between the check and the read): a FIFO would block forever and ``/dev/zero`` never ends.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise BadImage(path, "file not found") from None
    except IsADirectoryError:
        raise BadImage(path, "is a directory, not an image file") from None
    except PermissionError:
        raise BadImage(path, "permission denied (cannot read the file)") from None
    except ValueError:  # os.open refuses names with NUL bytes (e.g. from a damaged index CSV)
        raise BadImage(path, "invalid file name (contains a NUL byte)") from None
    except OSError as exc:
        raise BadImage(path, f"cannot read the file ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise BadImage(path, "is a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise BadImage(path, f"is {_file_kind(info.st_mode)}, not an image file")
        if info.st_size > MAX_FILE_BYTES:
            raise BadImage(path, f"file is {info.st_size} bytes, over the limit of "
                                 f"{MAX_FILE_BYTES} bytes for one image")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise BadImage(path, f"cannot read the file ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:  # grew while being read
        raise BadImage(path, f"file is over the limit of {MAX_FILE_BYTES} bytes for one image")
    if not data:
        raise BadImage(path, "file is empty (0 bytes)")
    return data


def _bare_dicom(data: bytes) -> bool:
    """A DICOM stream without preamble starts with a group 0x0000-0x0008 data element."""
    if len(data) < 8:
        return False
    little, big = struct.unpack("<H", data[:2])[0], struct.unpack(">H", data[:2])[0]
    return little in (0x0000, 0x0002, 0x0004, 0x0008) or big in (0x0002, 0x0004, 0x0008)


def _sniff(path, data: bytes) -> ImageInfo:
    """Identify the format from the leading bytes and read the declared size from the header."""
    if data.startswith(PNG_MAGIC):
        info = png_header(path, data)
    elif data.startswith(JPEG_MAGIC):
        info = jpeg_header(path, data)
    elif data[:4] in TIFF_MAGIC:
        info = tiff_header(path, data)
    elif data[:4] in BIGTIFF_MAGIC:
        raise BadImage(path, "BigTIFF is not supported; save the image as classic TIFF, PNG or DICOM")
    elif data[128:132] == b"DICM" or (str(path).lower().endswith(DICOM_SUFFIXES)
                                      and _bare_dicom(data)):
        info = _dicom_header(path, data)
    elif str(path).lower().endswith(DICOM_SUFFIXES):
        raise BadImage(path, f"not a DICOM file: no DICM marker and no data element at the "
                             f"start (looks like {looks_like(data)})")
    else:
        raise BadImage(path, f"not a supported image: looks like {looks_like(data)} "
                             f"(expected PNG, JPEG, TIFF or DICOM content)")
    check_size(path, info)
    return info


def _dicom_header(path, data: bytes) -> ImageInfo:
    ds = _parse_dicom(path, data, stop_before_pixels=True)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise BadImage(path, "DICOM file has no image (no Rows/Columns; a report or DICOMDIR?)")
    bits = ds.get("BitsStored") or ds.get("BitsAllocated") or 0
    frames = int(ds.get("NumberOfFrames") or 1)
    return ImageInfo("dicom", int(cols), int(rows), int(bits), frames,
                     str(ds.get("PhotometricInterpretation", "") or ""))


# --------------------------------------------------------------------------- PNG / JPEG / TIFF
def _decode_raster(path, data: bytes, info: ImageInfo) -> np.ndarray:
    """Decode PNG/JPEG/TIFF with OpenCV and reduce to luminance on the sample's full scale.

    ``IMREAD_ANYDEPTH | IMREAD_ANYCOLOR`` keeps 16-bit and float samples, expands palettes,
    drops alpha and (unlike ``IMREAD_UNCHANGED``) applies the JPEG EXIF orientation.
    """
    if info.format == "png":
        png_verify(path, data)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error:
        img = None
    if img is None:
        raise BadImage(path, f"cannot decode the {info.format.upper()} data (truncated or corrupt)")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3:
        code = {3: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGRA2GRAY}.get(img.shape[2])
        if code is None:
            raise BadImage(path, f"unsupported number of colour channels ({img.shape[2]})")
        img = cv2.cvtColor(img.astype(np.float32) if img.dtype == np.float64 else img, code)
    if info.sample == "float":
        return _scale_float(path, img, invert=info.colour == "miniswhite")
    if img.dtype == np.uint8:
        # OpenCV decodes 8-bit WhiteIsZero TIFF through libtiff's RGBA path, already inverted.
        return img.astype(np.float32) / np.float32(255.0)
    if img.dtype != np.uint16:
        raise BadImage(path, f"unsupported sample type {img.dtype} after decoding")
    # 16-bit PNG/TIFF: full scale 65535 (see module docstring). A 12-bit JPEG decoded to uint16
    # holds values up to 2**12 - 1, its precision from the SOF header.
    full_scale = float(2 ** info.bit_depth - 1) if info.format == "jpeg" else 65535.0
    out = img.astype(np.float32) / np.float32(full_scale)
    return 1.0 - out if info.colour == "miniswhite" else out  # 16-bit comes out uninverted


def _scale_float(path, img: np.ndarray, invert: bool) -> np.ndarray:
    """Float samples: refuse NaN/inf and blank images, then min-max scale to [0, 1]."""
    arr = img.astype(np.float64)
    if not np.isfinite(arr).all():
        raise BadImage(path, "contains NaN or infinite pixel values")
    low, high = float(arr.min()), float(arr.max())
    if not high > low or not np.isfinite(high - low):
        raise BadImage(path, "float image is blank or has an unusable value range "
                             f"({low:g} to {high:g})")
    out = (arr - low) / (high - low)
    return (1.0 - out if invert else out).astype(np.float32)


# --------------------------------------------------------------------------- DICOM decoding
def _pydicom():
    """pydicom, imported lazily (only DICOM inputs pay for it) and made quiet on first use.

    pydicom logs each oddity of a damaged header as a warning, and each failed decoder plugin as
    an error with its traceback; the file then either decodes (the oddity did not matter) or is
    refused with one BadImage line that carries the plugin's message, so those records would
    only break the one-line rule. Its logger is raised to CRITICAL unless the application changed
    it from the WARNING pydicom sets on import.
    """
    import pydicom

    if not getattr(_pydicom, "quiet", False):
        logger = logging.getLogger("pydicom")
        if logger.level == logging.WARNING:
            logger.setLevel(logging.CRITICAL)
        _pydicom.quiet = True
    return pydicom


def _parse_dicom(path, data: bytes, stop_before_pixels: bool = False):
    pydicom = _pydicom()

    try:
        with warnings.catch_warnings():  # damaged headers warn, then fail or are refused below
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # pydicom raises many types (InvalidDicomError, EOFError, ...)
        reason = one_line(exc, limit=200) or type(exc).__name__
        raise BadImage(path, f"unreadable DICOM ({reason})") from None


def _dicom_values(ds, photometric: str, frames: int):
    """Presentation values of the first frame: modality LUT and VOI (grey), or the palette."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    # pixel_array converts YBR colour to RGB; index=0 decodes only the first frame.
    arr = pixel_array(ds, index=0 if frames > 1 else None)
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        arr = apply_modality_lut(arr, ds)
        if ds.get("VOILUTSequence"):
            # A VOI LUT is indexed by (integer) modality output values.
            arr = np.rint(arr).astype(np.int64)
        arr = apply_voi_lut(arr, ds, index=0).astype(np.float64)
    elif photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    return arr


def _decode_dicom(path, data: bytes) -> np.ndarray:
    """Stored values -> presentation values (modality LUT, VOI, MONOCHROME1) -> min-max [0, 1]."""
    ds = _parse_dicom(path, data)
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise BadImage(path, "DICOM file has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    frames = int(ds.get("NumberOfFrames") or 1)
    try:
        with warnings.catch_warnings():  # oddities either do not matter or end in BadImage
            warnings.simplefilter("ignore")
            arr = _dicom_values(ds, photometric, frames)
    except Exception as exc:  # decoder plugins raise ValueError, RuntimeError, KeyError, ...
        reason = one_line(exc, limit=200) or type(exc).__name__
        raise BadImage(path, f"cannot decode the DICOM pixel data ({reason})") from None

    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[2] == 3:  # RGB, YBR (converted) or palette colour
        arr = cv2.cvtColor(arr.astype(np.float32), cv2.COLOR_RGB2GRAY).astype(np.float64)
    elif arr.ndim != 2:
        raise BadImage(path, f"unsupported DICOM pixel layout {arr.shape} ({photometric or '?'})")
    if not np.isfinite(arr).all():
        raise BadImage(path, "contains NaN or infinite pixel values")
    low, high = float(arr.min()), float(arr.max())
    if high <= low:
        raise BadImage(path, "DICOM image is blank (every pixel has the same value)")
    img = (arr - low) / (high - low)
    if photometric == "MONOCHROME1":  # low values are white: invert so bone is bright
        img = 1.0 - img
    return img.astype(np.float32)


__all__ = ["read_image", "image_info", "dicom_tags", "ImageInfo", "MAX_PIXELS", "MIN_SIDE",
           "MAX_FILE_BYTES", "DICOM_SUFFIXES"]
