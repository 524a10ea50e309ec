"""A plain-text summary of an index: images per label and split, patients, views, pathologies."""
import collections

from mxvision.data import labels as L
from mxvision.data.dataset import NORMAL, OTHER

MAX_LABEL_ROWS = 15  # more label combinations than this are grouped into one row


def summary_table(index):
    """A plain-text table of image counts per label (rows) and split (columns), with patients and
    views per split, and -- when the index has pathology columns -- positive/negative/unknown
    counts per pathology and split."""
    splits = [s for s in ("train", "val", "test", "") if s in set(index.splits)]
    names = [s or "unassigned" for s in splits]
    header = ["label"] + names + ["total"]

    def counts(values, keys):
        rows = []
        for key in keys:
            per = [sum(1 for v, s in zip(values, index.splits) if v == key and s == sp)
                   for sp in splits]
            rows.append([key or "(none)"] + per + [sum(per)])
        return rows

    freq = collections.Counter(index.labels)
    keys = sorted(freq, key=lambda c: (c != NORMAL, c != OTHER, -freq[c], c))
    shown = keys[:MAX_LABEL_ROWS] if len(keys) > MAX_LABEL_ROWS + 1 else keys
    rows = counts(index.labels, shown)
    if len(shown) < len(keys):
        rest = set(keys[len(shown):])
        per = [sum(1 for v, s in zip(index.labels, index.splits) if v in rest and s == sp)
               for sp in splits]
        rows.append([f"({len(rest)} other label combinations)"] + per + [sum(per)])
    rows.append(["all images"] + [sum(1 for s in index.splits if s == sp) for sp in splits]
                + [len(index)])
    pids = index.patient_ids
    rows.append(["patients"] + [len({p for p, s in zip(pids, index.splits) if s == sp})
                                for sp in splits] + [len(set(pids))])
    out = [_format(header, rows)]
    views = index.views
    if any(views):
        out.append(_format(["view"] + names + ["total"], counts(views, sorted(set(views)))))
    patho = [c for c in index.columns if c in L.PATHOLOGIES]
    if patho:
        prow = []
        for p in patho:
            vals = index.column(p)
            cells = []
            for sp in splits:
                sel = [v for v, s in zip(vals, index.splits) if s == sp]
                cells.append(f"{sel.count('1')}/{sel.count('0')}/{sel.count('')}")
            prow.append([p] + cells + [f"{vals.count('1')}/{vals.count('0')}/{vals.count('')}"])
        out.append(_format(["pathology (pos/neg/unknown)"] + names + ["total"], prow))
    return "\n\n".join(out)


def _format(header, rows):
    table = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = []
    for k, r in enumerate(table):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
