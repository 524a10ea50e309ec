"""An index from a folder with one sub-folder per class: ``root/normal/*.png``,
``root/nodule/*.png``.

This is the layout the original Xvision notebooks expected and the easiest one for users to make
by hand; the CLI can turn it into an index CSV so splits get recorded and reproducible.
"""
import os

from mxvision.errors import BadIndex
from mxvision.data.index import Index

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm")


def _is_image(name, extensions):
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions


def index_from_folder(root, extensions=IMAGE_EXTENSIONS):
    """Index every image directly inside ``root/<class>/``; the sub-folder name is the label.

    Hidden entries are skipped. There is no patient information, so each image counts as its own
    patient (see :attr:`Index.patient_ids`). A class folder without images is an error rather than
    a silently missing class. Rows are sorted by label, then file name, so the result does not
    depend on directory listing order.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise BadIndex(root, "no such folder")
    extensions = tuple(e.lower() for e in extensions)
    with os.scandir(root) as entries:
        class_dirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not class_dirs:
        raise BadIndex(root, "no class sub-folders; expected e.g. root/normal/*.png and "
                             "root/nodule/*.png")
    records = []
    for label in class_dirs:
        folder = os.path.join(root, label)
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if e.is_file() and _is_image(e.name, extensions))
        if not names:
            raise BadIndex(folder, f"class folder has no images ({', '.join(extensions)})")
        records.extend({"path": os.path.join(folder, n), "label": label} for n in names)
    return Index(records, root, source=root)
