"""A common shape for every chest X-ray source, so sources can be filtered, merged and relabelled.

Each reader (OpenI, NIH ChestX-ray14, JSRT, a folder of class sub-folders, any index CSV) returns
an :class:`XrayDataset` with the attributes torchxrayvision users expect:

* ``pathologies`` -- label names, in order (a subset or reordering of
  :data:`~mxvision.data.labels.PATHOLOGIES` for the real sources);
* ``labels`` -- an ``(N, len(pathologies))`` float32 matrix, 1 positive, 0 negative, NaN unknown;
* ``paths``, ``patient_ids``, ``views`` (normalised, see :mod:`~mxvision.data.views`), ``splits``;
* ``normal`` -- per row, whether the source says the image has *no finding at all* (OpenI: the
  report is coded ``normal``; NIH: ``No Finding``; JSRT: a non-nodule film). This is not the
  same as "all 18 pathologies negative": a report of a tortuous aorta is negative for all 18
  and still not normal;
* ``table`` (alias ``csv``) -- the underlying rows as dicts with every source column.

:meth:`XrayDataset.to_index` turns a dataset into the index CSV the pipeline reads (``path,
label,patient_id,split,view`` + the source's columns), for one of the tasks in :data:`TASKS`,
with a patient-grouped, label-stratified split.
"""
import os

import numpy as np

from mxvision.errors import BadIndex
from mxvision.data import labels as L
from mxvision.data.index import Index
from mxvision.data.splits import assign_splits, check_no_patient_leak
from mxvision.data.views import normalize_view, parse_views, view_mask

#: ``nodule``: Xvision's Normal vs Nodule; ``nodule-original``: the same with the original
#: notebook's rule (OpenI only, for comparison); ``pathologies``: the multi-label task.
TASKS = ("nodule", "nodule-original", "pathologies")
NORMAL = "normal"
OTHER = "other"  # pathologies task: no listed pathology positive, but not a normal study
_INTERNAL = ("xvision", "xvision_original")  # per-row task labels computed by a source reader


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


class XrayDataset:
    """Rows (dicts with at least ``path``) + a pathology label matrix + a ``normal`` flag.

    ``records`` may carry ``patient_id``, ``view``, ``split`` and any other columns. ``labels``
    is ``(N, P)``; ``normal`` defaults to "every pathology known and negative". ``name`` names
    the source (used as a patient-id prefix when datasets are merged); ``root`` is the folder
    image ids are relative to. Methods return new datasets.
    """

    def __init__(self, records, pathologies, labels, normal=None, name="", root=None):
        self._records = [dict(r) for r in records]
        self._pathologies = list(pathologies)
        labels = np.asarray(labels, dtype=np.float32)
        if labels.ndim != 2:
            labels = labels.reshape(len(self._records), len(self._pathologies))
        if labels.shape != (len(self._records), len(self._pathologies)):
            raise ValueError(f"labels of shape {labels.shape} for {len(self._records)} rows and "
                             f"{len(self._pathologies)} pathologies")
        self._labels = labels
        if normal is None:
            normal = [len(self._pathologies) > 0 and not np.isnan(row).any() and not row.any()
                      for row in labels]
        self._normal = np.asarray(normal, dtype=bool).reshape(len(self._records))
        self.name = name
        for r in self._records:
            if not r.get("path"):
                raise ValueError("every record needs a path")
            r["view"] = normalize_view(r.get("view"))
        paths = [r["path"] for r in self._records]
        self.root = os.path.abspath(root) if root else (
            os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
            if paths else os.getcwd())

    # -- attributes ----------------------------------------------------------------------------
    @property
    def pathologies(self):
        return list(self._pathologies)

    @property
    def labels(self):
        """``(N, P)`` float32: 1 positive, 0 negative, NaN unknown (a copy)."""
        return self._labels.copy()

    @property
    def normal(self):
        return self._normal.copy()

    @property
    def table(self):
        """The rows as dicts (copies), every source column included."""
        return [dict(r) for r in self._records]

    csv = table  # torchxrayvision calls its table ``csv``

    @property
    def paths(self):
        return [r["path"] for r in self._records]

    @property
    def patient_ids(self):
        """``patient_id`` per row; where absent, the file stem (one image = one patient)."""
        return [str(r.get("patient_id") or "") or _stem(r["path"]) for r in self._records]

    @property
    def views(self):
        return [r.get("view", "") for r in self._records]

    @property
    def splits(self):
        return [r.get("split", "") for r in self._records]

    def column(self, name, default=""):
        return [r.get(name, default) for r in self._records]

    def __len__(self):
        return len(self._records)

    def __repr__(self):
        return (f"XrayDataset({self.name or 'unnamed'}: {len(self)} images, "
                f"{len(set(self.patient_ids))} patients, pathologies={self._pathologies})")

    # -- derived datasets ----------------------------------------------------------------------
    def _derive(self, records, labels, normal, pathologies=None, name=None):
        return XrayDataset(records, self._pathologies if pathologies is None else pathologies,
                           labels, normal, name=self.name if name is None else name,
                           root=self.root)

    def select(self, rows):
        """Rows at integer positions, or a boolean mask."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64)
        return self._derive([self._records[i] for i in rows], self._labels[rows],
                            self._normal[rows])

    def filter_views(self, views=None):
        """Keep the rows whose view the selection admits (default: PA; see views.py)."""
        return self.select(np.array(view_mask(self.views, views), dtype=bool))

    def with_predicted_views(self, predictor):
        """The dataset with every unknown view (``""``) filled by ``predictor`` and a column
        ``view_source`` saying which views were predicted, by what.

        ``predictor(paths)`` returns one view per path (a spelling of :mod:`~.views`; ``""``
        where it cannot tell, e.g. an unreadable file, which then stays unknown) and its
        ``source`` attribute names it (``model:xinario-view-resnet50``): the ``view_source`` of
        the rows it filled. Rows with a view keep it, and their ``view_source`` (``""`` unless
        an earlier prediction set it). The predictor is passed in because it is a model, which
        the data layer does not import (:class:`mxvision.view_prediction.ViewPredictor`).
        """
        records = [dict(r, view_source=r.get("view_source") or "") for r in self._records]
        unknown = [i for i, r in enumerate(records) if not r["view"]]
        views = list(predictor([records[i]["path"] for i in unknown])) if unknown else []
        if len(views) != len(unknown):
            raise ValueError(f"the view predictor gave {len(views)} views for {len(unknown)} films")
        for i, view in zip(unknown, views):
            if normalize_view(view):
                records[i].update(view=normalize_view(view), view_source=predictor.source)
        return self._derive(records, self._labels, self._normal)

    def relabel(self, pathologies=L.PATHOLOGIES):
        """Reorder the label columns to ``pathologies``; ones this source lacks become NaN,
        ones not asked for are dropped (torchxrayvision's ``relabel_dataset``)."""
        pathologies = list(pathologies)
        out = np.full((len(self), len(pathologies)), np.nan, dtype=np.float32)
        for j, name in enumerate(pathologies):
            if name in self._pathologies:
                out[:, j] = self._labels[:, self._pathologies.index(name)]
        return self._derive(self._records, out, self._normal, pathologies=pathologies)

    @staticmethod
    def merge(datasets, name="merged"):
        """Concatenate datasets: the union of pathologies (torchxrayvision order first, then
        others as met), NaN where a source lacks one. A ``dataset`` column records the source
        and patient ids are prefixed with it, so two sources cannot share a patient by accident.
        """
        datasets = list(datasets)
        order = [p for p in L.PATHOLOGIES if any(p in d.pathologies for d in datasets)]
        for d in datasets:
            order += [p for p in d.pathologies if p not in order]
        records, blocks, normal = [], [], []
        for d in datasets:
            tag = d.name or "dataset"
            for r, pid in zip(d.table, d.patient_ids):
                r["dataset"] = tag
                r["patient_id"] = f"{tag}:{pid}"
                records.append(r)
            blocks.append(d.relabel(order).labels)
            normal.append(d.normal)
        labels = np.concatenate(blocks) if blocks else np.zeros((0, len(order)), np.float32)
        roots = [d.root for d in datasets]
        root = os.path.commonpath(roots) if roots else None
        return XrayDataset(records, order, labels,
                           np.concatenate(normal) if normal else [], name=name, root=root)

    # -- tasks ---------------------------------------------------------------------------------
    def xvision_labels(self, original=False):
        """``'normal'``/``'nodule'``/None per row for the Xvision task.

        A reader may fix the rule per row (OpenI does, from the major MeSH terms); otherwise a
        row is ``nodule`` when its Nodule label is 1 and ``normal`` when the source calls it
        normal. ``original=True`` asks for the original notebook's rule (OpenI rows only).
        """
        key = "xvision_original" if original else "xvision"
        nodule = (self._labels[:, self._pathologies.index("Nodule")] == 1
                  if "Nodule" in self._pathologies else np.zeros(len(self), bool))
        out = []
        for i, r in enumerate(self._records):
            if key in r:
                out.append(r[key] or None)
            elif original:
                raise BadIndex(self.name or "dataset", "the original Xvision rule needs OpenI "
                                                       "MeSH terms (task nodule-original)")
            elif nodule[i]:
                out.append("nodule")
            elif self._normal[i]:
                out.append(NORMAL)
            else:
                out.append(None)
        return out

    def pathology_labels(self):
        """Per row: the positive pathologies joined by ``|`` (NIH style), ``normal`` for a normal
        study, ``other`` when none is positive and the study is not normal, None when every
        label is unknown."""
        out = []
        for row, normal in zip(self._labels, self._normal):
            positives = [p for p, v in zip(self._pathologies, row) if v == 1]
            if positives:
                out.append("|".join(positives))
            elif normal:
                out.append(NORMAL)
            elif np.isnan(row).all():
                out.append(None)
            else:
                out.append(OTHER)
        return out

    def folder_labels_index(self, views=None, seed=0, val=0.15, test=0.15, source=None,
                            view_predictor=None):
        """An :class:`Index` whose labels are the dataset's own (a class folder's name, any
        classes), over the rows of the selected ``views``, with a patient-grouped split.
        ``view_predictor``: fills unknown views first (:meth:`with_predicted_views`).
        Raises BadIndex when no row is of those views."""
        source = source or self.name or "dataset"
        parse_views(views)  # a typo fails before any film's view is predicted
        data = self.with_predicted_views(view_predictor) if view_predictor is not None else self
        keep = view_mask(data.views, views)
        records = [dict(r, patient_id=p) for r, p, k in zip(data.table, data.patient_ids, keep) if k]
        if not records:
            raise BadIndex(source, f"no image of view(s) {views}; try --views all")
        columns = ["patient_id", "split", "view"] + (["view_source"] if view_predictor is not None else [])
        index = Index(records, data.root, columns=columns, source=source)
        return assign_splits(index, val=val, test=test, seed=seed)

    def to_index(self, task="nodule", views=None, seed=0, val=0.15, test=0.15, root=None,
                 source=None, view_predictor=None):
        """An :class:`Index` for ``task`` (see :data:`TASKS`) over the rows of the selected
        ``views``, with a patient-grouped split stratified by label (for ``pathologies``:
        by normal / other / any finding). Rows the task has no label for are left out; every
        source column is kept, and for ``pathologies`` one column per pathology (1, 0 or empty).
        ``view_predictor``: fills unknown views before the selection (:meth:`with_predicted_views`).
        Raises BadIndex when nothing is left.
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
        source = source or self.name or "dataset"
        parse_views(views)  # a typo fails before any film's view is predicted
        data = self.with_predicted_views(view_predictor) if view_predictor is not None else self
        data = data.filter_views(views)
        if len(data) == 0:
            raise BadIndex(source, f"no image of view(s) {views or 'PA'} (of {len(self)}); "
                                   f"choose --views, e.g. frontal or all")
        if task == "pathologies":
            labels = data.pathology_labels()
        else:
            labels = data.xvision_labels(original=(task == "nodule-original"))
        keep = [i for i, lab in enumerate(labels) if lab]
        if not keep:
            raise BadIndex(source, f"none of the {len(data)} images has a label for task {task}")
        data = data.select(keep)
        labels = [labels[i] for i in keep]
        records = []
        for r, lab, pid, row in zip(data._records, labels, data.patient_ids, data._labels):
            rec = {k: v for k, v in r.items() if k not in _INTERNAL}
            rec.update(label=lab, patient_id=pid, split="")
            if task == "pathologies":
                rec.update({p: L.format_value(v) for p, v in zip(data._pathologies, row)})
            records.append(rec)
        extra = [k for r in data._records for k in r if k not in _INTERNAL]
        first = ["patient_id", "split", "view"] + (["view_source"] if "view_source" in extra else [])
        columns = first + [k for k in dict.fromkeys(extra) if k not in ["path", "label"] + first]
        if task == "pathologies":
            columns += [p for p in data._pathologies if p not in columns]
        root = root or data.root
        index = Index(records, root, columns=columns, source=source)
        if task == "pathologies":
            coarse = [NORMAL if lab == NORMAL else OTHER if lab == OTHER else "finding"
                      for lab in labels]
            strat = Index([{"path": r["path"], "label": c, "patient_id": p}
                           for r, c, p in zip(index.records(), coarse, index.patient_ids)],
                          root, source=source)
            split = assign_splits(strat, val=val, test=test, seed=seed).splits
        else:
            split = assign_splits(index, val=val, test=test, seed=seed).splits
        index = index.with_column("split", split)
        check_no_patient_leak(index)
        return index

    # -- construction from an index ------------------------------------------------------------
    @classmethod
    def from_index(cls, index, name="", pathologies=None):
        """Wrap an :class:`Index` (JSRT, a class-folder tree, any index CSV).

        If the index has pathology columns (as written by the ``pathologies`` task) they are the
        labels; otherwise the ``label`` column is read as ``|``-separated findings where
        ``normal``/``No Finding`` means normal, each finding a pathology (known names are
        spelt as in torchxrayvision, so ``nodule`` -> ``Nodule``) that is 1 or 0 per row.
        """
        records = index.records()
        cols = [c for c in index.columns if c in L.PATHOLOGIES] if pathologies is None else [
            c for c in pathologies if c in index.columns]
        normal_words = {NORMAL, L.norm_term(L.NIH_NO_FINDING)}
        normal = [L.norm_term(r["label"]) in normal_words for r in records]
        if cols:
            matrix = np.array([[L.parse_value(r.get(c, "")) for c in cols] for r in records],
                              dtype=np.float32).reshape(len(records), len(cols))
            names = cols
        else:
            found = [[L.canonical_pathology(x) for x in r["label"].split("|") if x.strip()]
                     for r in records]
            seen = {p for f, n in zip(found, normal) if not n for p in f if p != OTHER}
            names = [p for p in L.PATHOLOGIES if p in seen] + sorted(
                p for p in seen if p not in L.PATHOLOGIES)
            if pathologies is not None:
                names = list(pathologies)
            matrix = np.array([[1.0 if p in f else 0.0 for p in names] for f in found],
                              dtype=np.float32).reshape(len(records), len(names))
        for r, pid in zip(records, index.patient_ids):
            r["patient_id"] = pid
        return cls(records, names, matrix, normal, name=name, root=index.root)


def find_images(folder, names):
    """``{name: path}`` for the file names found anywhere under ``folder`` (one walk)."""
    wanted, found = set(names), {}
    for d, _, files in os.walk(folder):
        for f in files:
            if f in wanted and f not in found:
                found[f] = os.path.join(d, f)
    return found


def jsrt_dataset(root):
    """JSRT (``root/labels.csv`` + ``root/images/``): pathology ``Nodule``, non-nodule films
    normal, every labels.csv column kept (subtlety, size, coordinates, diagnosis, ...)."""
    from mxvision.data.jsrt import read_jsrt

    return XrayDataset.from_index(read_jsrt(root), name="jsrt")


def folder_dataset(root, dicom_tags=True):
    """A class-per-folder tree (``root/<label>/*``). For DICOM files the view and patient id are
    read from the header (``ViewPosition``, ``PatientID``) when ``dicom_tags``, so their splits
    are grouped by patient."""
    from mxvision.errors import BadImage
    from mxvision.io.images import DICOM_SUFFIXES, dicom_tags as read_tags
    from mxvision.data.folder import index_from_folder

    ds = XrayDataset.from_index(index_from_folder(root), name=os.path.basename(
        os.path.abspath(root)) or "folder")
    if dicom_tags:
        for r in ds._records:
            if r["path"].lower().endswith(DICOM_SUFFIXES):
                try:
                    tags = read_tags(r["path"])
                except BadImage:
                    continue  # extraction will report the unreadable file
                r["view"] = normalize_view(tags["view"])
                if tags["patient_id"]:
                    r["patient_id"] = tags["patient_id"]
    return ds


def csv_dataset(csv_path):
    """Any index CSV (``path,label[,patient_id,split,view,...]``; pathology columns if any)."""
    from mxvision.data.index import read_index

    index = read_index(csv_path)
    return XrayDataset.from_index(index, name=os.path.splitext(os.path.basename(csv_path))[0])


__all__ = ["XrayDataset", "TASKS", "find_images", "jsrt_dataset", "folder_dataset",
           "csv_dataset"]
