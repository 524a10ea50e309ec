"""Does a test set share patients or images with the data a model was trained on?

An external validation only means something when none of its films, and none of its patients,
were seen in training. Two checks, both over item dicts (``id, path, patient_id``; a feature
store's ``items`` or an index's records):

* **patients** - the same ``patient_id`` on both sides. Ids are compared as written, so two
  sources that number patients independently (JSRT ``JPCLN001`` and NIH ``00000001``) never
  collide by accident, while a re-extraction of the training index is caught at once.
* **images** - the same decoded pixels on both sides, whatever the file name, folder or container
  (a PNG copied under another name, a DICOM exported again as PNG). The digest is SHA-1 of the
  decoded luminance array (:func:`mxvision.io.images.read_image`) with its shape, so it does not
  depend on how the file was compressed. Decoding runs in threads (OpenCV and pydicom release the
  GIL for the heavy part).
"""
import hashlib
from concurrent.futures import ThreadPoolExecutor

from mxvision.errors import MxvisionError
from mxvision.io.images import read_image

#: Threads that decode images for the pixel check.
DECODE_THREADS = 4


def pixel_digest(path):
    """SHA-1 (hex) of the image's decoded pixels and shape: equal for the same picture in any
    file name or lossless container."""
    img = read_image(path)
    digest = hashlib.sha1(repr(img.shape).encode())
    digest.update(img.tobytes())
    return digest.hexdigest()


def _digests(items, what, progress=None):
    def one(item):
        try:
            return pixel_digest(item["path"])
        except MxvisionError as err:  # moved or damaged since extraction: the check cannot be made
            raise MxvisionError(f"{what} image {item['path']}",
                                f"cannot be read for the overlap check ({err}); "
                                "pass --allow-overlap to evaluate without the check") from None
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        return list(pool.map(one, items))


def find_overlap(train_items, test_items, pixels=True):
    """Patients and images of ``test_items`` that also occur in ``train_items``.

    Returns ``{"patients": [patient ids], "images": [(test id, train id)], "n_train": ...,
    "n_test": ..., "pixels_checked": bool}``; both lists empty means no overlap.
    """
    train_patients = {it["patient_id"] for it in train_items}
    patients = sorted({it["patient_id"] for it in test_items} & train_patients)
    images = []
    if pixels:
        seen = {}
        for item, digest in zip(train_items, _digests(train_items, "training")):
            seen.setdefault(digest, item["id"])
        for item, digest in zip(test_items, _digests(test_items, "test")):
            if digest in seen:
                images.append((item["id"], seen[digest]))
    return {"patients": patients, "images": images, "n_train": len(train_items),
            "n_test": len(test_items), "pixels_checked": bool(pixels)}


def overlap_problem(overlap):
    """One line describing an overlap (count and one example), or None when there is none."""
    parts = []
    if overlap["patients"]:
        parts.append(f"{len(overlap['patients'])} patient id(s) also in the training store "
                     f"(e.g. {overlap['patients'][0]!r})")
    if overlap["images"]:
        test_id, train_id = overlap["images"][0]
        parts.append(f"{len(overlap['images'])} image(s) with the same pixels as a training image "
                     f"(e.g. {test_id!r} = training {train_id!r})")
    return "; ".join(parts) or None
