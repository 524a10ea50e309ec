"""The index CSV: the one contract between the data sources and the pipeline.

Every source (a class-per-folder tree, JSRT, NIH, the synthetic demo set) is turned into an index
with the columns ``path,label[,patient_id,split,view]``; feature extraction, training and
evaluation only ever read an index. Extra columns (nodule coordinates, subtlety, ...) are carried
through untouched so later stages can use them.

Paths in the CSV may be relative to the CSV's own folder (so a dataset folder can be moved as a
whole) or absolute. In memory every path is absolute; the stable image id is the path relative to
the index's folder, which does not change when the folder moves.

Problems a user can fix raise :class:`~mxvision.errors.BadIndex` with a one-line message that
names the CSV and the line. Index files come from spreadsheets, scripts and other people, so the
reader also refuses what would only fail (or mislead) later: NUL bytes in any field (no file
name can hold one), paths longer than ``MAX_PATH_CHARS``, fields beyond the ``csv`` module's
131,072-character limit, files over ``MAX_INDEX_BYTES``, text that is not UTF-8 (a UTF-8 BOM is
fine), and two rows naming the same image (also when spelled differently, ``a/../b.png`` and
``b.png``). Values quoted in messages are shortened, so a hostile field cannot turn an error
into megabytes of output.

Labels: surrounding blanks are stripped; an empty label, or ``nan`` in any case (what pandas and
``str(float("nan"))`` write for a missing value), is refused naming the line, as are two labels
that differ only in case (``Nodule`` and ``nodule``): each would otherwise become a class of its
own, silently. The index is not the place to guess which spelling was meant.
"""
import collections
import csv
import io
import os
import stat
import unicodedata

import numpy as np

from mxvision.errors import BadIndex
from mxvision.utils import READ_FLAGS, atomic_path, file_kind

REQUIRED_COLUMNS = ("path", "label")
#: The optional columns the pipeline understands, written right after the required ones.
KNOWN_COLUMNS = ("patient_id", "split", "view")
SPLITS = ("train", "val", "test")
#: Xvision's class order: label id 0 is normal, 1 is nodule (so "positive" means nodule).
XVISION_CLASSES = ("normal", "nodule")
#: Longest accepted image path (Linux PATH_MAX); longer ones cannot be opened anyway.
MAX_PATH_CHARS = 4096
#: Largest index CSV read (NIH ChestX-ray14's 112,120 rows take 8 MB, CheXpert's 224,316 rows
#: 30 MB; the rows of 256 MiB already take several GB as Python records).
MAX_INDEX_BYTES = 256 << 20
#: Labels (compared lower-cased) that are a missing value written as text, not a class: what pandas
#: (``nan``, ``<NA>``, ``NaT``), Python (``None``), JSON (``null``) and spreadsheets (``NA``, ``N/A``)
#: write for an empty cell.
MISSING_LABELS = ("nan", "<na>", "nat", "none", "null", "na", "n/a")


def _short(value, limit=60):
    """``repr`` of a value cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def default_classes(labels):
    """The class order for ``labels``: Xvision's ``normal, nodule`` when the labels are (a subset
    of) those two, so nodule is always id 1 even in a one-class subset; otherwise sorted."""
    found = set(labels)
    if found and found <= set(XVISION_CLASSES):
        return list(XVISION_CLASSES)
    return sorted(found)


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


class Index:
    """An immutable table of images: one record (a dict of strings) per image.

    ``records`` are mappings with at least ``path`` and ``label``; relative paths are resolved
    against ``root`` (the folder the index belongs to, e.g. the CSV's folder). ``classes`` fixes
    the label order (default :func:`default_classes`). ``source`` names the index in error
    messages. Methods that change something return a new Index.
    """

    def __init__(self, records, root, columns=None, classes=None, source=None, _lines=None):
        self._root = os.path.abspath(os.fspath(root))
        self._source = str(source) if source is not None else self._root
        records = [dict(r) for r in records]

        def where(i):  # lines of the CSV when read from one, else row numbers
            return f"line {_lines[i]}" if _lines is not None else f"row {i + 1}"

        self._columns = self._column_order(records, columns)
        self._records = []
        seen, spellings = {}, {}
        for i, rec in enumerate(records):
            rec = {c: "" if rec.get(c) is None else str(rec.get(c)) for c in self._columns}
            for c in ("path", "label", "split"):
                if c in rec:
                    rec[c] = rec[c].strip()
            if not rec["path"]:
                raise BadIndex(self._source, f"{where(i)}: empty path")
            if "\x00" in rec["path"]:
                raise BadIndex(self._source, f"{where(i)}: NUL byte in path {_short(rec['path'])}")
            if len(rec["path"]) > MAX_PATH_CHARS:
                raise BadIndex(self._source, f"{where(i)}: path is {len(rec['path'])} characters "
                                             f"long (limit {MAX_PATH_CHARS}): {_short(rec['path'])}")
            if not rec["label"]:
                raise BadIndex(self._source, f"{where(i)}: empty label for {rec['path']}")
            if rec["label"].lower() in MISSING_LABELS:
                raise BadIndex(self._source, f"{where(i)}: label {_short(rec['label'])} (a missing "
                                             f"value, not a class) for {_short(rec['path'])}")
            hidden = [c for c in rec["label"] if unicodedata.category(c) == "Cf"]
            if hidden:  # a zero-width joiner or BOM would make a second class that looks the same
                raise BadIndex(self._source, f"{where(i)}: label {ascii(rec['label'])} holds an "
                                             f"invisible character (U+{ord(hidden[0]):04X})")
            key = unicodedata.normalize("NFKC", rec["label"]).casefold()
            first = spellings.setdefault(key, (rec["label"], i))
            if first[0] != rec["label"]:
                how = "case" if first[0].casefold() == rec["label"].casefold() else "Unicode form"
                raise BadIndex(self._source, f"{where(i)}: label {_short(rec['label'])} differs only "
                                             f"in {how} from {_short(first[0])} ({where(first[1])}); "
                                             f"use one spelling")
            if rec.get("split", "") not in SPLITS + ("",):
                raise BadIndex(self._source, f"{where(i)}: split {_short(rec['split'])} is not one "
                                             f"of train, val, test or empty")
            path = os.path.expanduser(rec["path"])
            rec["path"] = os.path.normpath(os.path.join(self._root, path))
            if rec["path"] in seen:
                raise BadIndex(self._source, f"{where(i)}: duplicate path {rec['path']} "
                                             f"(also on {where(seen[rec['path']])})")
            seen[rec["path"]] = i
            self._records.append(rec)
        self._classes = list(classes) if classes is not None else default_classes(self.labels)
        unknown = sorted(set(self.labels) - set(self._classes))
        if unknown:
            shown = ", ".join(_short(u, 40)[1:-1] for u in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise BadIndex(self._source, f"label(s) {shown}{more} not among the classes "
                                         f"{', '.join(self._classes)}")

    @staticmethod
    def _column_order(records, columns):
        """path, label, then the given columns (or every key in first-seen order)."""
        if columns is None:
            columns = [k for r in records for k in r]
        # dict.fromkeys keeps first-seen order in linear time (`c not in order` on a list was
        # quadratic: a 200,000-column index took minutes)
        return tuple(dict.fromkeys([*REQUIRED_COLUMNS, *columns]))

    # -- construction helpers ------------------------------------------------------------------
    def _derive(self, records, columns=None):
        return Index(records, self._root, columns=columns or self._columns, classes=self._classes,
                     source=self._source)

    def select(self, rows):
        """A new Index with the rows at the integer positions (or boolean mask) ``rows``."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return self._derive([self._records[int(i)] for i in rows])

    def subset(self, split):
        """The rows of one split (``train``, ``val``, ``test`` or ``""`` for unassigned); the
        class order is kept so label ids agree with the full index."""
        if split not in SPLITS + ("",):
            raise ValueError(f"unknown split {split!r}")
        return self.select([s == split for s in self.splits])

    def with_column(self, name, values):
        """A new Index with column ``name`` set to ``values`` (one per row), added if new."""
        values = list(values)
        if len(values) != len(self):
            raise ValueError(f"{len(values)} values for {len(self)} rows")
        records = [dict(r, **{name: v}) for r, v in zip(self._records, values)]
        return self._derive(records, columns=self._columns + (name,))

    # -- columns -------------------------------------------------------------------------------
    def column(self, name, default=""):
        """The values of any column as a list (``default`` for every row when it is absent)."""
        return [r.get(name, default) for r in self._records]

    @property
    def columns(self):
        return self._columns

    @property
    def root(self):
        """The folder relative paths and ids are resolved against."""
        return self._root

    @property
    def source(self):
        """What error messages name: the CSV or folder this index came from."""
        return self._source

    @property
    def paths(self):
        """Absolute, normalised image paths."""
        return self.column("path")

    @property
    def labels(self):
        return self.column("label")

    @property
    def classes(self):
        return list(self._classes)

    @property
    def label_ids(self):
        """Integer class id per row (position of the label in :attr:`classes`), int64 array."""
        lookup = {c: i for i, c in enumerate(self._classes)}
        return np.array([lookup[lab] for lab in self.labels], dtype=np.int64)

    @property
    def patient_ids(self):
        """The ``patient_id`` column; where it is absent or empty, the image's file stem, i.e. each
        such image counts as its own patient (right for one image per patient, as in JSRT)."""
        return [r.get("patient_id") or _stem(r["path"]) for r in self._records]

    @property
    def splits(self):
        """``train``/``val``/``test`` per row, ``""`` where unassigned or the column is absent."""
        return self.column("split")

    @property
    def views(self):
        """The ``view`` column (e.g. ``PA``), ``""`` where absent."""
        return self.column("view")

    @property
    def ids(self):
        """Stable image ids: the path relative to :attr:`root`, with ``/`` separators."""
        return [_relative(r["path"], self._root) for r in self._records]

    def records(self):
        """Copies of the rows as dicts (absolute paths)."""
        return [dict(r) for r in self._records]

    def missing(self):
        """Absolute paths of the image files that do not exist."""
        return [p for p in self.paths if not os.path.isfile(p)]

    def __len__(self):
        return len(self._records)

    def __repr__(self):
        return f"Index({len(self)} images, classes={self._classes}, source={self._source!r})"


def _relative(path, folder):
    try:
        rel = os.path.relpath(path, folder)
    except ValueError:  # another drive on Windows
        return path.replace(os.sep, "/")
    return rel.replace(os.sep, "/")


def _inside(path, folder):
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:
        return False


_NUL_STAND_IN = "\udc00"


def _read_capped(csv_path):
    """The text of an index CSV, refusing before reading what no index is: a folder, a device,
    FIFO or socket (``/dev/zero`` would be read to the cap, a FIFO would block forever), a file
    over :data:`MAX_INDEX_BYTES`, text that is not UTF-8. The file is opened non-blocking and
    checked with ``fstat`` on the open descriptor, so it cannot be swapped after the check."""
    try:
        fd = os.open(csv_path, READ_FLAGS)
    except FileNotFoundError:
        raise BadIndex(csv_path, "no such index CSV") from None
    except IsADirectoryError:
        raise BadIndex(csv_path, "is a folder, expected an index CSV file") from None
    except OSError as err:
        raise BadIndex(csv_path, f"cannot read ({err.strerror or err})") from None
    info = os.fstat(fd)
    too_big = BadIndex(csv_path, f"larger than {MAX_INDEX_BYTES} bytes; not an index CSV?")
    problem = ("is a folder, expected an index CSV file" if stat.S_ISDIR(info.st_mode) else
               f"not a regular file ({file_kind(info.st_mode)}); expected an index CSV"
               if not stat.S_ISREG(info.st_mode) else None)
    if problem or info.st_size > MAX_INDEX_BYTES:
        os.close(fd)
        raise BadIndex(csv_path, problem) if problem else too_big
    with open(fd, "rb") as f:
        try:
            data = f.read(MAX_INDEX_BYTES + 1)  # the file may have grown since fstat
        except OSError as err:
            raise BadIndex(csv_path, f"cannot read ({err.strerror or err})") from None
    if len(data) > MAX_INDEX_BYTES:
        raise too_big
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadIndex(csv_path, "not UTF-8 text; expected an index CSV") from None


def read_index(csv_path, check_files=False, classes=None):
    """Read and validate an index CSV; relative paths are resolved against the CSV's folder.

    With ``check_files`` every image must exist, else BadIndex names the first missing one and how
    many are missing. ``classes`` fixes the label order (e.g. that of a trained model).
    """
    csv_path = os.path.abspath(os.fspath(csv_path))
    # Python 3.8-3.10's csv refuses a NUL outright ("line contains NUL", no column): NUL goes in
    # as a lone surrogate, which strict UTF-8 text never holds, so every Python names the column
    text = _read_capped(csv_path).replace("\x00", _NUL_STAND_IN)
    reader = csv.reader(io.StringIO(text, newline=""))
    records, lines = [], []
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise BadIndex(csv_path, "empty file; expected a header line with path,label")
        header = [h.replace(_NUL_STAND_IN, "\x00").strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise BadIndex(csv_path, f"line 1: missing column(s) {', '.join(missing)} "
                                     f"(header: {','.join(header)[:80]})")
        dups = sorted(h for h, n in collections.Counter(header).items() if n > 1)  # linear: a
        # header of 200,000 columns took minutes with header.count per column
        if dups or "" in header:
            what = f"duplicate column(s) {', '.join(dups)}" if dups else "an unnamed column"
            raise BadIndex(csv_path, f"line 1: {what} in the header")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            if len(row) != len(header):
                raise BadIndex(csv_path, f"line {reader.line_num}: {len(row)} fields, "
                                         f"the header has {len(header)}")
            for column, cell in zip(header, row):
                if _NUL_STAND_IN in cell:
                    raise BadIndex(csv_path, f"line {reader.line_num}: NUL byte in column "
                                             f"{column} ({_short(cell.replace(_NUL_STAND_IN, chr(0)))})")
            records.append(dict(zip(header, row)))
            lines.append(reader.line_num)
    except csv.Error as err:
        raise BadIndex(csv_path, f"line {reader.line_num}: malformed CSV ({err})") from None
    if not records:
        raise BadIndex(csv_path, "no images listed after the header")

    index = Index(records, os.path.dirname(csv_path), columns=header, classes=classes,
                  source=csv_path, _lines=lines)
    if check_files:
        absent = index.missing()
        if absent:
            raise BadIndex(csv_path, f"{len(absent)} of {len(index)} image files missing, "
                                     f"first: {absent[0]}")
    return index


def write_index(index, csv_path):
    """Write ``index`` as CSV atomically; paths inside the CSV's folder are written relative to it
    (so the folder can be moved), others absolute. Returns the absolute CSV path."""
    csv_path = os.path.abspath(os.fspath(csv_path))
    folder = os.path.dirname(csv_path)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(index.columns)
    for rec in index.records():
        path = rec["path"]
        rec["path"] = _relative(path, folder) if _inside(path, folder) else path
        writer.writerow([rec.get(c, "") for c in index.columns])
    with atomic_path(csv_path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(out.getvalue())
    return csv_path
