"""Radiograph views: one spelling per view, and the ``views=`` filter.

Sources spell views differently (OpenI's DICOM headers: ``PA``, ``AP``, ``LL``, ``RL``,
``LATERAL``, ``LARGE LATERAL``; NIH: ``PA``/``AP``; DICOM ``ViewPosition``). :func:`normalize_view`
maps them to ``PA``, ``AP``, ``LATERAL`` or ``""`` (unknown); anything else is kept upper-cased.
It is defined in :mod:`mxvision.io.headers` (the DICOM header reader needs it, and ``io`` sits
below ``data``) and re-exported here, where the rest of the view vocabulary lives.

A fourth spelling, ``FRONTAL``, is a frontal film whose projection (PA or AP) is not known: what
torchxrayvision's view model (``xinario-view-resnet50``, frontal vs lateral) predicts for a film
whose metadata has no view (``mxvision data index ... --view-model``, which also records the
prediction in a ``view_source`` column), and how CheXpert's ``Frontal/Lateral`` column reads.

A ``views`` selection is a list (or comma-separated string) of tokens: a view (``PA``, ``AP``,
``LATERAL``), a group (``frontal`` = PA + AP + FRONTAL, ``lateral``), ``unknown`` (no view
recorded) or ``all``/``*`` (everything, unknown included). The default is :data:`DEFAULT_VIEWS` = PA only:
frontal, and AP only when asked, since AP films are mostly bedside films of sicker patients.
"""
from mxvision.errors import MxvisionError
from mxvision.io.headers import normalize_view

FRONTAL = ("PA", "AP")
#: a frontal film of unknown projection: admitted by ``frontal``, not by ``PA`` or ``AP``
FRONTAL_UNSPECIFIED = "FRONTAL"
LATERAL = ("LATERAL",)
DEFAULT_VIEWS = ("PA",)
_GROUPS = {"frontal": FRONTAL + (FRONTAL_UNSPECIFIED,), "lateral": LATERAL, "unknown": ("",)}
_ALL = ("all", "*", "any")


def view_group(view):
    """``'frontal'``, ``'lateral'`` or ``''`` (unknown/other) for a normalised view."""
    view = normalize_view(view)
    if view in _GROUPS["frontal"]:
        return "frontal"
    if view in LATERAL:
        return "lateral"
    return ""


def parse_views(views):
    """The set of normalised views a selection admits, or None for 'all'.

    Accepts None (the default, PA), a comma-separated string or an iterable of tokens; raises
    MxvisionError on an unknown token so a typo does not silently select nothing.
    """
    if views is None:
        views = DEFAULT_VIEWS
    if isinstance(views, str):
        views = [v for v in views.split(",")]
    allowed = set()
    for token in views:
        key = str(token).strip()
        if key.lower() in _ALL:
            return None
        if key.lower() in _GROUPS:
            allowed.update(_GROUPS[key.lower()])
            continue
        view = normalize_view(key)
        if view not in FRONTAL + LATERAL:
            raise MxvisionError(f"view {key!r}", "unknown; use PA, AP, LATERAL, frontal, lateral, "
                                                 "unknown or all")
        allowed.add(view)
    if not allowed:
        raise MxvisionError("views", "empty selection; use e.g. PA or frontal or all")
    return allowed


def view_mask(views_of_rows, views=None):
    """Booleans: which rows (their view values) the selection ``views`` keeps."""
    allowed = parse_views(views)
    if allowed is None:
        return [True] * len(views_of_rows)
    return [normalize_view(v) in allowed for v in views_of_rows]


def describe_views(views=None):
    """A short human description of a selection, for messages: ``'PA'``, ``'AP, PA'``, ``'all'``."""
    allowed = parse_views(views)
    if allowed is None:
        return "all"
    return ", ".join(sorted(v or "unknown" for v in allowed))


__all__ = ["FRONTAL", "FRONTAL_UNSPECIFIED", "LATERAL", "DEFAULT_VIEWS", "normalize_view", "view_group", "parse_views",
           "view_mask", "describe_views"]
