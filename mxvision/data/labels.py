"""Label rules: the Xvision Normal/Nodule task and the 18 torchxrayvision pathologies.

Everything that turns report annotations into labels lives here as plain data and small pure
functions, so each rule can be read in one place and tested on hand-written examples.

**The Xvision task** (:func:`xvision_label`), applied to an OpenI report's MeSH *major* terms:

* ``normal`` -- every major term is exactly ``normal`` (case and surrounding blanks ignored). The
  Indiana annotators code a report with no finding as the single term ``normal``.
* ``nodule`` -- at least one major term is a nodule term: its descriptor (the text before the
  first ``/``; ``Nodule/lung/right`` has descriptor ``Nodule``) is one of :data:`NODULE_TERMS`.
  Other findings may be present too.
* ``None`` -- anything else; the image is left out of the Normal-vs-Nodule task.

The original Xvision notebook did something else, reproduced verbatim-in-spirit by
:func:`original_xvision_label` so the two can be compared: it joined the terms with ``/``,
lower-cased them and looked for 15 *substrings*; an image was ``normal`` when ``normal`` was the
only substring found (so ``Pleura/.../abnormal`` counted as normal) and ``nodule`` when ``nodule``
was found alone or together with ``calcinosis`` only (so a nodule with any other listed finding
was dropped). docs/DATA.md gives the counts both rules produce on the real archive.

**Pathologies** (:func:`pathology_vector`): the torchxrayvision order :data:`PATHOLOGIES`, one
value per pathology -- ``1.0`` positive, ``0.0`` negative, ``NaN`` unknown. For an OpenI report:

1. a report whose major terms are all uninformative (``No Indexing``, ``Technical Quality of
   Image Unsatisfactory``) or absent is unknown for every pathology;
2. a pathology is positive when a major term matches one of its ``major`` patterns, or an
   automatic (MTI) term matches one of its ``automatic`` patterns (the automatic terms of this
   archive are positive findings: no report coded ``normal`` has any);
3. a pathology whose only matching major terms carry an uncertainty qualifier (``borderline``)
   is unknown, whatever the automatic terms say (MTI turns "borderline cardiomegaly" into
   ``cardiomegaly``);
4. everything else is negative: the annotators coded every finding they read in the report.

Patterns are shell-style globs (``fnmatch``), matched case-insensitively after collapsing blanks.
A major term ``Descriptor/q1/q2`` is matched as ``descriptor`` and as ``descriptor/q`` for each
qualifier ``q``, so ``thickening/pleura`` matches ``Thickening/pleura/apex/bilateral``.
Synonym tables can be replaced by a JSON file of the same shape (:func:`load_synonyms`).
"""
import fnmatch
import json
import math
import re
from pathlib import Path

import numpy as np

from mxvision.errors import BadIndex

#: torchxrayvision's ``default_pathologies``, in its order.
PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
    "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass",
    "Hernia", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)

#: The 14 ChestX-ray14 (NIH) findings, spelt as in ``Data_Entry_2017_v2020.csv``.
NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)
NIH_NO_FINDING = "No Finding"

#: Major-term descriptors that make an OpenI report a Nodule case for the Xvision task.
NODULE_TERMS = ("nodule", "pulmonary nodules", "solitary pulmonary nodule",
                "multiple pulmonary nodules")
NORMAL_TERM = "normal"
#: Major terms that say nothing about findings; a report with only these is unknown.
UNINFORMATIVE_TERMS = ("no indexing", "technical quality of image unsatisfactory")
#: Qualifiers that make a major term uncertain (the pathology becomes NaN, not positive).
UNCERTAIN_QUALIFIERS = ("borderline",)

_BLANKS = re.compile(r"\s+")


def norm_term(term):
    """Lower-case, trimmed, inner blanks collapsed (the archive has 'Subcutaneous  Emphysema')."""
    return _BLANKS.sub(" ", str(term or "")).strip().lower()


def term_parts(term):
    """``'Nodule/lung/right'`` -> ``['nodule', 'lung', 'right']`` (normalised, empty parts
    dropped)."""
    return [p for p in (norm_term(x) for x in str(term or "").split("/")) if p]


def descriptor(term):
    """The MeSH descriptor of a major term: the normalised text before the first ``/``."""
    parts = term_parts(term)
    return parts[0] if parts else ""


# ------------------------------------------------------------------------------ Xvision task
def is_normal(major_terms):
    """True when there is at least one major term and every one is exactly ``normal``."""
    terms = [norm_term(t) for t in major_terms]
    return bool(terms) and all(t == NORMAL_TERM for t in terms)


def is_nodule(major_terms):
    """True when some major term's descriptor is one of :data:`NODULE_TERMS`."""
    return any(descriptor(t) in NODULE_TERMS for t in major_terms)


def xvision_label(major_terms):
    """``'normal'``, ``'nodule'`` or None for one report's major MeSH terms (module docstring)."""
    if is_normal(major_terms):
        return "normal"
    if is_nodule(major_terms):
        return "nodule"
    return None


#: The substrings the original Xvision notebook (scraper/process.ipynb) searched for, in its
#: order, including the trailing blank of ``"spine/degenerative "``.
ORIGINAL_XVISION_CHECK = (
    "normal", "opacity", "cardiomegaly", "calcinosis", "lung/hypoinflation",
    "calcified granuloma", "thoracic vertebrae/degenerative", "lung/hyperdistention",
    "spine/degenerative ", "catheters, indwelling", "granulomatous disease", "nodule",
    "surgical instruments", "scoliosis", "spondylosis",
)


def original_xvision_category(items):
    """The original notebook's category string: the matched substrings concatenated in
    :data:`ORIGINAL_XVISION_CHECK` order, or ``'missing'``."""
    text = "/".join(items).lower()
    return "".join(c for c in ORIGINAL_XVISION_CHECK if c in text) or "missing"


def original_xvision_label(items):
    """The original Xvision rule: category ``normal`` -> normal; ``nodule`` or
    ``calcinosisnodule`` -> nodule; anything else -> None. Kept to compare against, not to use."""
    category = original_xvision_category(items)
    if category == "normal":
        return "normal"
    if category in ("nodule", "calcinosisnodule"):
        return "nodule"
    return None


# ------------------------------------------------------------------------------ pathologies
def load_synonyms(path):
    """Read a synonym table from JSON: ``{pathology: {"major": [...], "automatic": [...]}}``.

    Pathologies not in the file keep no synonyms (they come out negative or unknown), so a file
    can restrict the mapping as well as extend it. Keys starting with ``_`` are comments. Raises
    BadIndex on a malformed table.
    """
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, ValueError, RecursionError) as err:
        raise BadIndex(path, f"unreadable synonym table ({type(err).__name__})") from None
    if not isinstance(table, dict):
        raise BadIndex(path, "expected a JSON object of pathology -> synonyms")
    table = {k: v for k, v in table.items() if not str(k).startswith("_")}
    for name, entry in table.items():
        if not isinstance(entry, dict) or not all(
                isinstance(entry.get(k, []), list) for k in ("major", "automatic")):
            raise BadIndex(path, f"{str(name)[:60]!r} needs lists under 'major' and/or 'automatic'")
    return table


def _shipped_table(name):
    """A table shipped beside this module in ``tables/`` (package data of ``mxvision.data.tables``)."""
    return Path(__file__).resolve().parent / "tables" / name


#: OpenI synonyms: pathology -> {"major": globs on descriptor[/qualifier], "automatic": globs};
#: the table, with why some terms are left out, is ``mxvision/data/tables/openi_synonyms.json``.
OPENI_SYNONYMS = load_synonyms(_shipped_table("openi_synonyms.json"))


def _major_keys(term):
    """What the major patterns are matched against: the descriptor, and descriptor/qualifier."""
    parts = term_parts(term)
    if not parts:
        return [], []
    return [parts[0]] + [f"{parts[0]}/{q}" for q in parts[1:]], parts[1:]


def _matches(keys, patterns):
    return any(fnmatch.fnmatchcase(k, p) for k in keys for p in patterns)


def pathology_vector(major_terms, automatic_terms=(), pathologies=PATHOLOGIES,
                     synonyms=None):
    """float32 vector over ``pathologies``: 1 positive, 0 negative, NaN unknown (module
    docstring). ``synonyms`` defaults to :data:`OPENI_SYNONYMS`."""
    synonyms = OPENI_SYNONYMS if synonyms is None else synonyms
    majors = [t for t in major_terms if norm_term(t)]
    out = np.full(len(pathologies), np.nan, dtype=np.float32)
    informative = [t for t in majors if norm_term(t) not in UNINFORMATIVE_TERMS]
    if not informative:
        return out
    autos = [norm_term(t) for t in automatic_terms if norm_term(t)]
    for j, name in enumerate(pathologies):
        entry = synonyms.get(name, {})
        major_patterns = [p.lower() for p in entry.get("major", [])]
        auto_patterns = [p.lower() for p in entry.get("automatic", [])]
        certain = uncertain = False
        for term in informative:
            keys, qualifiers = _major_keys(term)
            if _matches(keys, major_patterns):
                if any(q in UNCERTAIN_QUALIFIERS for q in qualifiers):
                    uncertain = True
                else:
                    certain = True
        if certain:
            out[j] = 1.0
        elif uncertain:
            out[j] = np.nan
        elif _matches(autos, auto_patterns):
            out[j] = 1.0
        else:
            out[j] = 0.0
    return out


def nih_vector(finding_labels, pathologies=PATHOLOGIES):
    """Vector for an NIH ``Finding Labels`` value (``'Cardiomegaly|Effusion'``, ``'No Finding'``):
    the 14 NIH findings are 1/0, the pathologies NIH does not label are NaN."""
    found = {f.strip() for f in str(finding_labels).split("|") if f.strip()}
    out = np.full(len(pathologies), np.nan, dtype=np.float32)
    for j, name in enumerate(pathologies):
        if name in NIH_FINDINGS:
            out[j] = 1.0 if name in found else 0.0
    return out


def canonical_pathology(name):
    """Map a label spelling to the torchxrayvision name (``'nodule'`` -> ``'Nodule'``,
    ``'pleural thickening'`` -> ``'Pleural_Thickening'``); unknown names come back stripped."""
    key = norm_term(name).replace("_", " ")
    for p in PATHOLOGIES:
        if norm_term(p).replace("_", " ") == key:
            return p
    return str(name).strip()


def format_value(v):
    """1/0/NaN -> ``'1'``/``'0'``/``''`` for CSV."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or (
            isinstance(v, np.floating) and np.isnan(v)):
        return ""
    return "1" if float(v) >= 0.5 else "0"


def parse_value(text):
    """``'1'``/``'1.0'``/``'0'``/``''``/``'nan'``/``'-1'`` -> 1.0/0.0/NaN (``-1``, CheXpert's
    uncertain, is NaN)."""
    text = str(text).strip().lower()
    if text in ("", "nan", "-1", "-1.0", "u", "unknown"):
        return float("nan")
    value = float(text)
    if value not in (0.0, 1.0):
        raise ValueError(f"pathology value {text!r} is not 1, 0 or empty")
    return value


__all__ = ["PATHOLOGIES", "NIH_FINDINGS", "NIH_NO_FINDING", "NODULE_TERMS", "OPENI_SYNONYMS",
           "UNINFORMATIVE_TERMS", "UNCERTAIN_QUALIFIERS", "ORIGINAL_XVISION_CHECK",
           "norm_term", "descriptor", "is_normal", "is_nodule", "xvision_label",
           "original_xvision_category", "original_xvision_label", "load_synonyms",
           "pathology_vector", "nih_vector", "canonical_pathology", "format_value",
           "parse_value"]
