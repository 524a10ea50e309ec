"""Images from folders: which files count as images, the file-and-folder arguments of ``predict``,
``classify`` and the detector, and an index from a folder with one sub-folder per class
(``root/normal/*.png``, ``root/nodule/*.png``).

The class-folder layout is what the original Xvision notebooks expected and the easiest one for
users to make by hand; the CLI turns it into an index CSV so splits get recorded and reproducible.
Every command that lists a folder takes the same files from it (:func:`image_names`), so
``mxvision predict DIR`` and ``mxvision data index folder`` never disagree about what is an image.
"""
import os
from pathlib import Path

from mxvision.errors import BadIndex
from mxvision.data.index import Index
from mxvision.io.images import DICOM_SUFFIXES

#: File name suffixes (any case) taken as images when a folder is listed. The reader decides the
#: format from the content; the suffix only decides which entries of a folder are taken. Formats
#: mxvision does not read (BMP) are listed on purpose, so they are reported as unreadable instead
#: of silently left out.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp") + DICOM_SUFFIXES


def is_image_name(name):
    """True for a file name with an image suffix that is not hidden (dot files such as macOS
    ``._scan.png`` companions are never radiographs)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def image_names(folder):
    """Sorted names of the images directly inside ``folder`` (:func:`is_image_name`).

    Entries are taken by name, whatever their kind: a broken link or a sub-folder called
    ``x.png`` is listed, so that reading it reports the problem instead of the file vanishing.
    """
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if is_image_name(e.name))


def expand_images(inputs, require=False):
    """Image paths from a mix of file and folder arguments: a folder gives its images
    (:func:`image_names`), anything else is kept as given.

    A path that cannot be examined (a name too long to stat, a folder that cannot be listed) is
    kept as it is, so reading it reports the problem for that one input and the others are
    still processed. With ``require``, a folder without images raises BadIndex ``no images found
    in DIR`` (saying so when the folder is named like an image file), and so does an empty
    ``inputs``: a command given nothing to read says so instead of printing nothing.
    """
    paths = []
    for item in map(Path, inputs):
        try:
            if item.is_dir():
                names = image_names(item)
                if require and not names:
                    raise BadIndex(f"no images found in {item}" + (
                        " (a folder, although named like an image file)" if is_image_name(item.name)
                        else f" (images are files ending in {', '.join(IMAGE_SUFFIXES)})"))
                paths.extend(item / name for name in names)
                continue
        except OSError:
            pass
        paths.append(item)
    if require and not paths:
        raise BadIndex("no images given")
    return paths


def index_from_folder(root):
    """Index every image directly inside ``root/<class>/``; the sub-folder name is the label.

    Images are what :func:`image_names` lists. There is no patient information, so each image
    counts as its own patient (see :attr:`Index.patient_ids`). A class folder without images is an
    error rather than a silently missing class. Rows are sorted by label, then file name, so the
    result does not depend on directory listing order.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise BadIndex(root, "no such folder")
    with os.scandir(root) as entries:
        class_dirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not class_dirs:
        raise BadIndex(root, "no class sub-folders; expected e.g. root/normal/*.png and "
                             "root/nodule/*.png")
    records = []
    for label in class_dirs:
        folder = os.path.join(root, label)
        names = image_names(folder)
        if not names:
            raise BadIndex(folder, f"class folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        records.extend({"path": os.path.join(folder, n), "label": label} for n in names)
    return Index(records, root, source=root)


__all__ = ["IMAGE_SUFFIXES", "is_image_name", "image_names", "expand_images", "index_from_folder"]
