"""Small file helpers shared by every stage: atomic writes, checksums and PNG figures.

Every output of mxvision is written to a temporary file in the destination folder and renamed into
place, so a crash never leaves a half-written file under a final name.
"""
import contextlib
import hashlib
import json
import math
import os
import stat
import tempfile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else delete it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def clean_stale_temps(folder):
    """Delete the temporary files that killed ``atomic_path`` writes left in ``folder``.

    A ``kill -9`` between ``mkstemp`` and the rename leaves ``.<name>.<random>.tmp`` behind (a
    25 MB backbone or 50 MB checkpoint each time). They are never mistaken for finished files,
    but they waste disk, so every resumable job removes them when it (re)starts in ``folder``.
    Only regular files and links named like that are removed, never followed; returns their names.
    Call it only where a single job owns ``folder`` (a concurrent writer's temp file would go).
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and \
                not entry.is_dir(follow_symlinks=False):
            try:
                os.remove(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:
                pass
    return sorted(removed)


def write_json(path, obj):
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def file_digest(path, algorithm="sha256", chunk=1 << 20):
    """Hex digest of a file, read in chunks (feature shards can be hundreds of MB)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


#: Flags for opening a file mxvision reads: non-blocking, so that a FIFO named as an input cannot
#: hang the open; the file's kind is then checked with ``fstat`` on the open descriptor.
READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) \
    | getattr(os, "O_CLOEXEC", 0)


def file_kind(mode):
    """What a non-regular file is, in words, from its ``st_mode`` (for one-line refusals)."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def new_figure(figsize):
    """A matplotlib Figure on its own Agg canvas, not pyplot's: library code must not touch pyplot
    or ``matplotlib.use()``, which would switch a running Jupyter kernel's backend and make the
    notebook's own plots vanish."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path, dpi=100):
    """Lay out ``fig`` and write it as a PNG at ``path`` atomically; return the Figure (a notebook
    displays it as it is)."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return fig


def json_safe(obj):
    """``obj`` with NaN and infinities as null (JSON has none) and numpy scalars as Python numbers,
    through dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):  # a numpy scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
