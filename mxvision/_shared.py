"""Where the real-data folder ``shared/`` lives (never part of the repository).

``MXVISION_SHARED`` overrides; the default is ``../shared`` beside the project checkout.
"""
import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir():
    """Return the shared data folder as a Path, or None when it is absent."""
    path = Path(os.environ.get("MXVISION_SHARED", _REPO_ROOT.parent / "shared"))
    return path if path.is_dir() else None
