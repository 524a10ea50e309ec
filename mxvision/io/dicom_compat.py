"""The pydicom calls :mod:`mxvision.io.dicom` makes, for pydicom 3 and for pydicom 2.4.

pydicom 3 needs Python >= 3.10; on Python 3.8 and 3.9 pip installs pydicom 2.4, where these
functions live elsewhere or do not exist: decoding one frame (``pydicom.pixels.pixel_array``),
taking one encapsulated frame (``pydicom.encaps.get_frame``), the LUTs (``pydicom.pixels``), and
the encoding a dataset was read with (``Dataset.original_encoding``). Each function below gives
pydicom 3's result on either. CI runs the DICOM tests (tests/io, tests/test_bad_inputs.py) on
Python 3.8 with pydicom 2.4.4; the two real sample files and generated MONOCHROME1/2, rescaled and
windowed, implicit VR, RGB and multi-frame files decoded bit-identically with both (2026-12-05).
"""
import io

import pydicom

PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])

#: Colour spaces pydicom 3's ``pixel_array`` converts to RGB (``as_rgb=True``); pydicom 2.4 leaves
#: them as decoded (its Pillow plugin even asks for YCbCr back), so they are converted here.
_YBR_TO_RGB = ("YBR_FULL", "YBR_FULL_422")


def original_encoding(ds):
    """``(implicit VR, little endian)`` of the dataset as it was read (None when unknown)."""
    if PYDICOM_MAJOR >= 3:
        return ds.original_encoding
    return ds.read_implicit_vr, ds.read_little_endian


def first_frame(fragments: bytes, number_of_frames: int) -> bytes:
    """The first frame of encapsulated pixel data (``fragments``: the value, Basic Offset Table
    item first)."""
    if PYDICOM_MAJOR >= 3:
        from pydicom.encaps import get_frame

        return get_frame(io.BytesIO(fragments), 0, number_of_frames=number_of_frames)
    from pydicom.encaps import generate_pixel_data_frame

    return next(generate_pixel_data_frame(bytes(fragments), number_of_frames))


def pixel_array(stream: bytes, syntax=None, body_start=0):
    """The first frame of the file ``stream`` holds, as pydicom 3's ``pixel_array(src, index=0)``
    returns it: YBR converted to RGB, palette and LUTs not applied. ``syntax`` overrides the
    transfer syntax of the dataset starting at ``body_start`` (an inflated deflated dataset is
    Explicit VR Little Endian)."""
    if PYDICOM_MAJOR >= 3:
        from pydicom.pixels import pixel_array as decode

        options = {"transfer_syntax_uid": syntax} if syntax else {}
        return decode(io.BytesIO(stream), index=0, **options)
    return _pixel_array_pydicom2(stream, syntax, body_start)


def _pixel_array_pydicom2(stream: bytes, syntax, body_start):
    from pydicom.encaps import encapsulate
    from pydicom.filereader import read_dataset, read_partial
    from pydicom.pixel_data_handlers.util import convert_color_space

    if syntax:  # the dataset after the File Meta group was inflated: read it as what it now is
        meta = read_partial(io.BytesIO(stream[:body_start]), force=True).file_meta
        ds = read_dataset(io.BytesIO(memoryview(stream)[body_start:]), False, True)
        ds.file_meta = meta
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds = read_partial(io.BytesIO(stream), force=True)
    ds.is_implicit_VR, ds.is_little_endian = ds.read_implicit_vr, ds.read_little_endian
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:  # pydicom 2 decodes every frame: keep the first one only
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.PixelData = encapsulate([first_frame(ds.PixelData, frames)])
        else:
            samples = 2 if str(ds.PhotometricInterpretation).endswith("_422") else ds.SamplesPerPixel
            size = (ds.Rows * ds.Columns * samples * ds.BitsAllocated + 7) // 8
            ds.PixelData = ds.PixelData[:size + size % 2]
        ds.NumberOfFrames = 1
    arr = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric in _YBR_TO_RGB and arr.ndim == 3:
        arr = convert_color_space(arr, "YBR_FULL", "RGB")  # 4:2:2 is upsampled when decoded
    return arr


def lut_functions():
    """``(apply_color_lut, apply_modality_lut, apply_voi_lut)``."""
    if PYDICOM_MAJOR >= 3:
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
    else:
        from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut, apply_voi_lut
    return apply_color_lut, apply_modality_lut, apply_voi_lut
