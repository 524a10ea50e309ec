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
* **TIFF** -- classic or BigTIFF, little or big endian, recognised by its byte-order mark;
  decoded by OpenCV's libtiff. Unsigned 1/8/16-bit samples are divided by the full scale of
  their bit depth, as for PNG (TIFF's MaxSampleValue tag is, by the specification, statistics
  only). 32/64-bit **float** samples have no full scale at all (they may be attenuation values,
  counts or already normalised intensities), so they are min-max scaled to [0, 1] like DICOM,
  after refusing NaN/inf and blank images. WhiteIsZero is inverted so bone is bright. Multi-page
  files: the **first page** (the full-resolution image; later pages are usually thumbnails).
  Refused with a clear message: CMYK ("separated"), signed-integer samples, other bit depths.
* **DICOM** -- recognised by the ``DICM`` magic at byte 128 (or, for files without the 128-byte
  preamble, a ``.dcm``/``.dicom`` suffix *and* a DICOM data element at byte 0); read by
  :mod:`mxvision.io.dicom` (pydicom, within bounds; compressed transfer syntaxes need its
  plugins, Pillow for the JPEG ones), modality/VOI LUTs applied, the first frame.

Anything a user can get wrong raises :class:`~mxvision.errors.BadImage` naming the file: missing,
unreadable (permissions, a directory, a FIFO or device, more than ``MAX_FILE_BYTES``), empty, not
an image (the message says what it looks like: GIF, WebP, ZIP, HTML, NumPy, text, ...),
truncated or corrupt, **animated** (APNG with more than one frame; GIF is refused as a format),
CMYK/YCCK JPEG and TIFF (their ink-to-luminance conversion depends on an ICC profile mxvision
does not apply, so any grey it produced could be silently wrong), non-finite values, blank
(constant) images in every format (:func:`~mxvision.io.headers.check_not_blank`), images smaller
than ``MIN_SIDE`` pixels a side, and images whose *declared* size exceeds ``MAX_PIXELS`` or whose
decoding would need more than ``MAX_DECODE_BYTES``. Sizes are read from the headers
(:mod:`mxvision.io.headers`, :mod:`mxvision.io.dicom`) **before** any pixel is decoded, so a
tiny file declaring a 50000x50000 image (a decompression bomb) is refused without allocating it,
and so is a JPEG of endless scans (time). As a second line, ``mxvision/__init__.py`` sets
OpenCV's own limit ``OPENCV_IO_MAX_IMAGE_PIXELS`` to ``MAX_PIXELS`` (read once, when cv2
loads), so a size a decoder finds but no header parser saw is refused as well. A file is opened
once, checked to be a regular file with ``fstat`` (so a FIFO cannot block and ``/dev/zero``
cannot fill the memory) and read with its own size, never more than the cap.

The decoders' own chatter never reaches the terminal, because every problem already becomes
one ``BadImage`` line: OpenCV's log level is lowered to FATAL on import (unless the user set
``OPENCV_LOG_LEVEL``), pydicom's warnings are silenced, and what libpng and libjpeg print
through C's ``stderr`` is captured while OpenCV decodes (:mod:`mxvision.io.quiet_decode`) and
logged at DEBUG level instead.
"""
import os
import stat
import struct

import cv2
import numpy as np

from mxvision.errors import BadImage
from mxvision.utils import READ_FLAGS, file_kind
from mxvision.io.dicom import read_dicom
from mxvision.io.quiet_decode import imdecode
from mxvision.io.headers import (
    BIGTIFF_MAGIC, JPEG_MAGIC, MAX_DECODE_BYTES, MAX_PIXELS, MIN_SIDE, PNG_MAGIC, TIFF_MAGIC, ImageInfo,
    check_not_blank, check_size, jpeg_header, looks_like, normalize_view, png_header, png_image_chunks,
    tiff_header)

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
    return decode_image(_read_bytes(path), path)


def decode_image(data: bytes, path="<upload>") -> np.ndarray:
    """:func:`read_image` on bytes already in memory (an upload); ``path`` names them in errors
    (a ``.dcm`` name lets a DICOM stream without preamble be recognised, as for a file)."""
    if not data:
        raise BadImage(path, "file is empty (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise BadImage(path, f"file is {len(data)} bytes, over the limit of {MAX_FILE_BYTES} "
                             f"bytes for one image")
    if _is_dicom(path, data):
        dicom = read_dicom(path, data)
        img, scaled = dicom.decode(dicom.info()), True
    else:
        info = _raster_info(path, data)
        img, scaled = _decode_raster(path, data, info), info.sample == "float"
    if img.ndim != 2:
        raise BadImage(path, f"decoded to an unexpected array shape {img.shape}")
    if scaled:
        # Integer PNG/JPEG/TIFF samples divided by their full scale are finite and in [0, 1]
        # already; min-max scaled ones are clipped against rounding.
        np.clip(img, 0.0, 1.0, out=img)
    return np.ascontiguousarray(img, dtype=np.float32)


def image_info(path) -> ImageInfo:
    """Read only the header of ``path``: format, declared size, bit depth and frame count.

    Applies the same checks as :func:`read_image` that need no decoding (size limits, format,
    animation, CMYK), so it is a cheap way to validate a whole dataset before a long
    feature-extraction run.
    """
    data = _read_bytes(path)
    if _is_dicom(path, data):
        return read_dicom(path, data).info()
    return _raster_info(path, data)


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
    dicom = read_dicom(path, data)
    ds = dicom.dataset
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
            "bits_stored": dicom.integer("BitsStored", 0, 64) or 0, "transfer_syntax": syntax,
            "modality": str(ds.get("Modality", "") or "")}


# --------------------------------------------------------------------------- reading and sniffing
def _read_bytes(path) -> bytes:
    """Read the whole file, turning every OS failure into a one-line BadImage.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor (no race
    between the check and the read): a FIFO would block forever and ``/dev/zero`` never ends.
    The read asks for the size ``fstat`` gave (plus one byte, to notice growth), never for the
    cap: a buffered ``read(n)`` reserves ``n`` bytes up front, and reserving 1 GiB per image
    failed under ``ulimit -v``.
    """
    try:
        fd = os.open(path, READ_FLAGS)
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
            raise BadImage(path, f"is {file_kind(info.st_mode)}, not an image file")
        if info.st_size > MAX_FILE_BYTES:
            raise BadImage(path, f"file is {info.st_size} bytes, over the limit of "
                                 f"{MAX_FILE_BYTES} bytes for one image")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(info.st_size + 1)
    except OSError as exc:
        raise BadImage(path, f"cannot read the file ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > info.st_size:
        # More bytes than fstat promised: a /proc or /sys file (size 0, endless: reading on up to
        # the cap cost 1 GB of memory per file) or one still being written. Neither is an image.
        raise BadImage(path, f"reads longer than its size on disk ({info.st_size} bytes): a /proc "
                             "file or one still being written, not an image file")
    if not data:
        raise BadImage(path, "file is empty (0 bytes)")
    return data


def _bare_dicom(data: bytes) -> bool:
    """A DICOM stream without preamble starts with a group 0x0000-0x0008 data element."""
    if len(data) < 8:
        return False
    little, big = struct.unpack("<H", data[:2])[0], struct.unpack(">H", data[:2])[0]
    return little in (0x0000, 0x0002, 0x0004, 0x0008) or big in (0x0002, 0x0004, 0x0008)


def _is_dicom(path, data: bytes) -> bool:
    if data.startswith((PNG_MAGIC, JPEG_MAGIC)) or data[:4] in TIFF_MAGIC + BIGTIFF_MAGIC:
        return False
    return data[128:132] == b"DICM" or (str(path).lower().endswith(DICOM_SUFFIXES)
                                        and _bare_dicom(data))


def _raster_info(path, data: bytes) -> ImageInfo:
    """Identify PNG/JPEG/TIFF from the leading bytes and check the size its header declares."""
    if data.startswith(PNG_MAGIC):
        info = png_header(path, data)
    elif data.startswith(JPEG_MAGIC):
        info = jpeg_header(path, data)
    elif data[:4] in TIFF_MAGIC + BIGTIFF_MAGIC:
        info = tiff_header(path, data)
    elif str(path).lower().endswith(DICOM_SUFFIXES):
        raise BadImage(path, f"not a DICOM file: no DICM marker and no data element at the "
                             f"start (looks like {looks_like(data)})")
    else:
        raise BadImage(path, f"not a supported image: looks like {looks_like(data)} "
                             f"(expected PNG, JPEG, TIFF or DICOM content)")
    # a PNG may be copied once, without its ancillary chunks (headers.png_image_chunks)
    check_size(path, info, len(data) * (2 if info.format == "png" else 1))
    return info


# --------------------------------------------------------------------------- PNG / JPEG / TIFF
def _decode_raster(path, data: bytes, info: ImageInfo) -> np.ndarray:
    """Decode PNG/JPEG/TIFF with OpenCV and reduce to luminance on the sample's full scale.

    ``IMREAD_ANYDEPTH | IMREAD_ANYCOLOR`` keeps 16-bit and float samples, expands palettes,
    drops alpha and (unlike ``IMREAD_UNCHANGED``) applies the EXIF orientation.
    """
    if info.format == "png":
        data = png_image_chunks(path, data)
    img, error = imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None and "CV_IO_MAX_IMAGE" in error:
        raise BadImage(path, f"the {info.format.upper()} decoder found an image over "
                             f"{MAX_PIXELS // 1_000_000} megapixels (refused before decoding)")
    if img is None:
        raise BadImage(path, f"cannot decode the {info.format.upper()} data (truncated or corrupt)")
    if img.shape[:2] not in ((info.height, info.width), (info.width, info.height)):
        raise BadImage(path, f"decoded to {img.shape[1]}x{img.shape[0]} pixels, but the header "
                             f"declares {info.width}x{info.height}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3:
        code = {3: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGRA2GRAY}.get(img.shape[2])
        if code is None:
            raise BadImage(path, f"unsupported number of colour channels ({img.shape[2]})")
        img = cv2.cvtColor(img.astype(np.float32) if img.dtype == np.float64 else img, code)
    if info.sample == "float":
        return _scale_float(path, img, invert=info.colour == "miniswhite")
    check_not_blank(path, img.min(), img.max())  # stored values: "every pixel is 0" (or 255, ...)
    if img.dtype == np.uint8:
        # OpenCV decodes 8-bit WhiteIsZero TIFF through libtiff's RGBA path, already inverted.
        return np.divide(img, np.float32(255.0), dtype=np.float32)
    if img.dtype != np.uint16:
        raise BadImage(path, f"unsupported sample type {img.dtype} after decoding")
    # 16-bit PNG/TIFF: full scale 65535 (see module docstring). A 12-bit JPEG decoded to uint16
    # holds values up to 2**12 - 1, its precision from the SOF header.
    full_scale = float(2 ** info.bit_depth - 1) if info.format == "jpeg" else 65535.0
    out = np.divide(img, np.float32(full_scale), dtype=np.float32)
    if info.colour == "miniswhite":  # 16-bit comes out uninverted
        np.subtract(np.float32(1.0), out, out=out)
    return out


def _scale_float(path, img: np.ndarray, invert: bool) -> np.ndarray:
    """Float samples: refuse NaN/inf and blank images, then min-max scale to [0, 1]."""
    arr = img.astype(np.float64)
    if not np.isfinite(arr).all():
        raise BadImage(path, "contains NaN or infinite pixel values")
    low, high = float(arr.min()), float(arr.max())
    check_not_blank(path, low, high)
    if not np.isfinite(high - low):
        raise BadImage(path, f"float image has an unusable value range ({low:g} to {high:g})")
    arr -= low
    arr /= high - low
    if invert:
        np.subtract(1.0, arr, out=arr)
    return arr.astype(np.float32)


__all__ = ["read_image", "decode_image", "image_info", "dicom_tags", "ImageInfo", "MAX_PIXELS", "MIN_SIDE",
           "MAX_FILE_BYTES", "MAX_DECODE_BYTES", "DICOM_SUFFIXES"]
