"""Read any chest X-ray file a user has into one canonical form: a 2-D float32 array in [0, 1].

Everything downstream (feature extraction, training, prediction, RecordIO packing) starts from
this single representation, so a PNG exported from a PACS, a JPEG from a public dataset and the
original DICOM of the same radiograph all enter the network the same way.

Supported inputs, recognised by their content (magic bytes), never by their extension:

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
* **DICOM** -- recognised by the ``DICM`` magic at byte 128 (or, for files without the 128-byte
  preamble, a ``.dcm`` suffix). Decoded by pydicom; compressed transfer syntaxes need its plugins
  (the JPEG-baseline samples need Pillow or pylibjpeg). The stored values are mapped the way a
  viewer would show them: modality LUT / rescale, then the first VOI LUT or window, then
  MONOCHROME1 is inverted so bone is always bright, then min-max scaling to [0, 1] (stored
  values have no fixed full scale, unlike PNG/JPEG samples; this matches torchxrayvision's
  ``read_xray_dcm``). Multi-frame objects: the **first frame** is used -- for radiography the
  extra frames are derived views (e.g. dual-energy bone/soft-tissue) of the first.

Anything a user can get wrong raises :class:`~mxvision.errors.BadImage` naming the file: missing,
unreadable, empty, not an image, truncated or corrupt, non-finite values, images smaller than
``MIN_SIDE`` pixels a side, and images whose *declared* size exceeds ``MAX_PIXELS``. The size is
read from the PNG IHDR / JPEG SOF / DICOM Rows-Columns header **before** any pixel is decoded, so
a tiny file declaring a 50000x50000 image (a decompression bomb) is refused without allocating it.
"""
import io
import struct
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from mxvision.errors import BadImage

#: Largest accepted image, in pixels (width x height). The biggest real chest radiographs are
#: about 4300x4300 (43 cm detector at 0.1 mm), under 20 MP; 100 MP leaves a wide margin while
#: capping the decode at a few hundred MB instead of what a hostile header could demand.
MAX_PIXELS = 100_000_000

#: Smallest accepted side, in pixels. Anything smaller cannot be a radiograph (the smallest real
#: inputs here, the NIH thumbnails, are 64x64) and is usually an icon, a 1x1 tracking pixel or a
#: placeholder saved by a failed export.
MIN_SIDE = 32

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG start-of-frame markers: every SOFn except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Markers without a length field.
_JPEG_STANDALONE = {0x01} | set(range(0xD0, 0xD8))


class ImageInfo(NamedTuple):
    """What a file's header declares: format ('png'/'jpeg'/'dicom'), size, bits, frames."""

    format: str
    width: int
    height: int
    bit_depth: int
    frames: int = 1


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
    if not np.isfinite(img).all():
        raise BadImage(path, "contains NaN or infinite pixel values")
    np.clip(img, 0.0, 1.0, out=img)
    return np.ascontiguousarray(img, dtype=np.float32)


def image_info(path) -> ImageInfo:
    """Read only the header of ``path``: format, declared size, bit depth and frame count.

    Applies the same checks as :func:`read_image` that need no decoding (size limits, format),
    so it is a cheap way to validate a whole dataset before a long feature-extraction run.
    """
    return _sniff(path, _read_bytes(path))


# --------------------------------------------------------------------------- reading and sniffing
def _read_bytes(path) -> bytes:
    """Read the whole file, turning every OS failure into a one-line BadImage."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadImage(path, "file not found") from None
    except IsADirectoryError:
        raise BadImage(path, "is a directory, not an image file") from None
    except PermissionError:
        raise BadImage(path, "permission denied (cannot read the file)") from None
    except OSError as exc:
        raise BadImage(path, f"cannot read the file ({exc.strerror or exc})") from None
    if not data:
        raise BadImage(path, "file is empty (0 bytes)")
    return data


def _sniff(path, data: bytes) -> ImageInfo:
    """Identify the format from the leading bytes and read the declared size from the header."""
    if data.startswith(_PNG_MAGIC):
        info = _png_header(path, data)
    elif data.startswith(_JPEG_MAGIC):
        info = _jpeg_header(path, data)
    elif data[128:132] == b"DICM" or str(path).lower().endswith(".dcm"):
        info = _dicom_header(path, data)
    else:
        raise BadImage(path, "not a supported image (expected PNG, JPEG or DICOM content)")
    _check_size(path, info)
    return info


def _check_size(path, info: ImageInfo) -> None:
    width, height = info.width, info.height
    if width <= 0 or height <= 0:
        raise BadImage(path, f"header declares an empty image ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise BadImage(path, f"header declares {width}x{height} pixels, over the limit of "
                             f"{MAX_PIXELS // 1_000_000} megapixels (refused before decoding)")
    if min(width, height) < MIN_SIDE:
        raise BadImage(path, f"image is only {width}x{height} pixels; "
                             f"at least {MIN_SIDE} pixels a side are needed")


def _png_header(path, data: bytes) -> ImageInfo:
    """PNG: the IHDR chunk must come first (PNG spec 5.6); it holds width, height, bit depth."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise BadImage(path, "truncated or corrupt PNG (no IHDR header)")
    width, height, bit_depth = struct.unpack(">IIB", data[16:25])
    return ImageInfo("png", width, height, bit_depth)


def _jpeg_header(path, data: bytes) -> ImageInfo:
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
            precision, height, width = struct.unpack(">BHH", data[pos + 4:pos + 9])
            if height == 0:  # height deferred to a DNL marker, which libjpeg does not support
                raise BadImage(path, "unsupported JPEG (height given by a DNL marker)")
            return ImageInfo("jpeg", width, height, precision)
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    raise BadImage(path, "truncated or corrupt JPEG (no frame header)")


def _dicom_header(path, data: bytes) -> ImageInfo:
    ds = _parse_dicom(path, data, stop_before_pixels=True)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise BadImage(path, "DICOM file has no image (no Rows/Columns; a report or DICOMDIR?)")
    bits = ds.get("BitsStored") or ds.get("BitsAllocated") or 0
    frames = int(ds.get("NumberOfFrames") or 1)
    return ImageInfo("dicom", int(cols), int(rows), int(bits), frames)


# --------------------------------------------------------------------------- PNG / JPEG decoding
def _decode_raster(path, data: bytes, info: ImageInfo) -> np.ndarray:
    """Decode PNG/JPEG with OpenCV and reduce to luminance on the sample's full scale.

    ``IMREAD_ANYDEPTH | IMREAD_ANYCOLOR`` keeps 16-bit samples, expands palettes, drops alpha
    and (unlike ``IMREAD_UNCHANGED``) applies the JPEG EXIF orientation.
    """
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None:
        raise BadImage(path, f"cannot decode the {info.format.upper()} data (truncated or corrupt)")
    if img.ndim == 3:
        code = {3: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGRA2GRAY}.get(img.shape[2])
        if code is None:
            raise BadImage(path, f"unsupported number of colour channels ({img.shape[2]})")
        img = cv2.cvtColor(img, code)
    if img.dtype == np.uint8:
        full_scale = 255.0
    elif img.dtype == np.uint16:
        # 16-bit PNG: full scale 65535 (see module docstring). A 12-bit JPEG decoded to uint16
        # holds values up to 2**12 - 1, its precision from the SOF header.
        full_scale = 65535.0 if info.format == "png" else float(2 ** info.bit_depth - 1)
    else:
        raise BadImage(path, f"unsupported sample type {img.dtype} after decoding")
    return img.astype(np.float32) / np.float32(full_scale)


# --------------------------------------------------------------------------- DICOM decoding
def _parse_dicom(path, data: bytes, stop_before_pixels: bool = False):
    import pydicom  # imported lazily: only DICOM inputs pay for it

    try:
        return pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # pydicom raises many types (InvalidDicomError, EOFError, ...)
        raise BadImage(path, f"unreadable DICOM ({_one_line(exc)})") from None


def _decode_dicom(path, data: bytes) -> np.ndarray:
    """Stored values -> presentation values (modality LUT, VOI, MONOCHROME1) -> min-max [0, 1]."""
    from pydicom.pixels import (apply_color_lut, apply_modality_lut, apply_voi_lut,
                                pixel_array)

    ds = _parse_dicom(path, data)
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise BadImage(path, "DICOM file has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    frames = int(ds.get("NumberOfFrames") or 1)
    try:
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
    except Exception as exc:  # decoder plugins raise ValueError, RuntimeError, KeyError, ...
        raise BadImage(path, f"cannot decode the DICOM pixel data ({_one_line(exc)})") from None

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


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["read_image", "image_info", "ImageInfo", "MAX_PIXELS", "MIN_SIDE"]
