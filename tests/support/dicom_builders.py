"""Small DICOM files built in memory for the tests (pydicom; nothing stored in the repository)."""
import io

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


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
        ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for key, value in attrs.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_float(values):
    """A float-pixel DICOM (FloatPixelData), the one way DICOM stores NaN/inf."""
    rows, columns = values.shape
    return dicom_bytes(None, Rows=rows, Columns=columns, SamplesPerPixel=1, BitsAllocated=32,
                       PhotometricInterpretation="MONOCHROME2",
                       FloatPixelData=values.astype("float32").tobytes())
