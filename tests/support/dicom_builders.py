"""Small DICOM files built in memory for the tests (pydicom; nothing stored in the repository).

:func:`dicom_bytes` writes a valid file through pydicom. The raw builders below write the data
elements byte by byte instead, so a test can put into a file anything a file can hold -- a
``Rows`` of ``"sixty"``, a ``NumberOfFrames`` of ``-3``, lying lengths, nested items, a deflated
dataset that inflates to gigabytes -- which pydicom's own writer would refuse.
"""
import io
import struct
import zlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid)


def dicom_bytes(pixels=None, photometric="MONOCHROME2", syntax=ExplicitVRLittleEndian,
                bits_stored=None, **attrs):
    """A Secondary Capture DX file holding ``pixels`` (or no pixel data), plus ``attrs``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if pixels is not None:
        set_pixel_data(ds, pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for key, value in attrs.items():
        setattr(ds, key, value)
    if PYDICOM_MAJOR < 3:  # pydicom 2.4 (Python 3.8/3.9): the encoding is the dataset's to say
        ds.is_little_endian = syntax != ExplicitVRBigEndian
        ds.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buf = io.BytesIO()
    save(ds, buf)
    return buf.getvalue()


def save(ds, target, file_format=True):
    """``ds.save_as``: as a DICOM file (preamble and File Meta) or, with ``file_format=False``,
    as the dataset holds it; pydicom 2.4 names that option ``write_like_original``."""
    if PYDICOM_MAJOR >= 3:
        ds.save_as(target, enforce_file_format=file_format)
    else:
        ds.save_as(target, write_like_original=not file_format)


PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])


def set_pixel_data(ds, pixels, photometric, bits_stored):
    """pydicom 3's ``Dataset.set_pixel_data``; restated for pydicom 2.4, which lacks it."""
    if PYDICOM_MAJOR >= 3:
        return ds.set_pixel_data(pixels, photometric, bits_stored)
    samples = 3 if photometric in ("RGB", "YBR_FULL") else 1
    frames = pixels.shape[0] if pixels.ndim == (4 if samples == 3 else 3) else 1
    rows, columns = pixels.shape[1:3] if frames > 1 else pixels.shape[:2]
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    return None


def dicom_float(values):
    """A float-pixel DICOM (FloatPixelData), the one way DICOM stores NaN/inf."""
    rows, columns = values.shape
    return dicom_bytes(None, Rows=rows, Columns=columns, SamplesPerPixel=1, BitsAllocated=32,
                       PhotometricInterpretation="MONOCHROME2",
                       FloatPixelData=values.astype("float32").tobytes())


# --------------------------------------------------------------------------- raw builders
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
ROWS, COLUMNS, FRAMES, SAMPLES, BITS_ALLOCATED, BITS_STORED = (
    0x00280010, 0x00280011, 0x00280008, 0x00280002, 0x00280100, 0x00280101)
PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF


def element(tag, vr, value, length=None):
    """One Explicit VR Little Endian data element; ``length`` overrides the declared length."""
    value = value.encode() if isinstance(value, str) else bytes(value)
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB", b"UN") else b" "
    declared = len(value) if length is None else length
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr, 0, declared) + value
    return struct.pack("<HH2sH", group, elem, vr, declared) + value


def file_meta(syntax=ExplicitVRLittleEndian):
    """Preamble, ``DICM`` and the File Meta group, as pydicom writes them."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + fp.getvalue()


def image_elements(rows=64, columns=64, frames=None, bits=8, samples=1, photometric="MONOCHROME2",
                   pixels=None, extra=None):
    """The data elements of a grey ramp image (sorted by tag). ``extra`` maps a tag to a raw
    ``(vr, value)`` added or replacing one of these -- anything a file can hold, valid or not;
    ``pixels`` is the pixel data value, or a whole raw element when it starts with its tag."""
    count = rows * columns * samples * (frames if isinstance(frames, int) and frames > 0 else 1)
    if pixels is None:
        ramp = np.arange(count) % 251
        pixels = ramp.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    us = lambda v: struct.pack("<H", v)  # noqa: E731
    elements = {0x00080060: (b"CS", "DX"), SAMPLES: (b"US", us(samples)),
                0x00280004: (b"CS", photometric), ROWS: (b"US", us(rows)), COLUMNS: (b"US", us(columns)),
                BITS_ALLOCATED: (b"US", us(bits)), BITS_STORED: (b"US", us(bits)),
                0x00280102: (b"US", us(bits - 1)), 0x00280103: (b"US", us(0))}
    if frames is not None:
        elements[FRAMES] = (b"IS", str(frames))
    elements.update(extra or {})
    body = b"".join(element(tag, *elements[tag]) for tag in sorted(elements))
    if pixels[:4] == struct.pack("<HH", PIXEL_DATA >> 16, PIXEL_DATA & 0xFFFF):
        return body + pixels
    return body + element(PIXEL_DATA, b"OB" if bits == 8 else b"OW", pixels)


def encapsulated(fragments, offsets=b""):
    """An encapsulated Pixel Data element: undefined length, a basic offset table item, one item
    per fragment (raw bytes, or a prebuilt item when a fragment is a tuple ``(tag, payload)``),
    then the sequence delimiter."""
    items = [struct.pack("<HHI", 0xFFFE, 0xE000, len(offsets)) + offsets]
    for fragment in fragments:
        if isinstance(fragment, tuple):
            items.append(fragment[0] + fragment[1])
        else:
            items.append(struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment)) + fragment)
    return (struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, UNDEFINED) + b"".join(items)
            + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))


def raw_dicom(dataset, syntax=ExplicitVRLittleEndian, deflate=False):
    """A DICOM file of the raw ``dataset`` bytes; ``deflate`` compresses them (Deflated syntax)."""
    if deflate:
        packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        dataset = packer.compress(dataset) + packer.flush()
        syntax = DeflatedExplicitVRLittleEndian
    return file_meta(syntax) + dataset


def deflate_zeros(prefix, zeros, block=1 << 20):
    """Raw deflate of ``prefix`` and ``zeros`` zero bytes, made by repeating one full-flushed
    block: a gigabyte of zeros costs milliseconds and about a megabyte."""
    head = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [head.compress(prefix) + head.flush(zlib.Z_FULL_FLUSH)]
    blocks, rest = divmod(zeros, block)
    repeat = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.append((repeat.compress(bytes(block)) + repeat.flush(zlib.Z_FULL_FLUSH)) * blocks)
    tail = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.append(tail.compress(bytes(rest)) + tail.flush())
    return b"".join(out)


def deflated_bomb(inflated_bytes):
    """A Deflated-syntax file whose dataset -- a 64x64 image header, then a pixel data element
    ``inflated_bytes`` long -- inflates to about ``inflated_bytes``, from ~1/1000 of that."""
    head = image_elements(pixels=struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated_bytes))
    return file_meta(DeflatedExplicitVRLittleEndian) + deflate_zeros(head, inflated_bytes)
