"""Where mxvision runs: the MXNet device, the CPU threads, the real-data folder and the user cache.

Imports no MXNet at module level: ``use_every_core`` must run before MXNet is first imported,
and ``import mxvision`` must stay light.
"""
import os
import sys
from pathlib import Path

from mxvision.errors import MxvisionError

_REPO_ROOT = Path(__file__).resolve().parents[2]  # mxvision/runtime/__init__.py -> the checkout


def use_every_core():
    """Let MXNet's OpenMP operators use every core this process may run on.

    MXNet 1.9 halves the CPU count when OMP_NUM_THREADS is unset (it assumes hyper-threading),
    so on a 2-core machine without SMT every oneDNN convolution ran on ONE core; measured here,
    fp32 and INT8 extraction run ~1.6-2x faster with both. MXNet reads the variable once, when it
    is first imported, so ``mxvision/__init__.py`` calls this before any module can import MXNet
    (tests/test_runtime.py checks the CLI, the API and the training and inference modules); a
    value the user set, or an MXNet already imported, is left alone. The thread count also sets
    the float rounding of oneDNN's reductions, so figures are quoted with it.
    """
    if "OMP_NUM_THREADS" in os.environ or "mxnet" in sys.modules:
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores))


def num_gpus():
    """How many GPUs this MXNet build can use (0 for the CPU wheel, or when CUDA is absent)."""
    import mxnet as mx

    try:
        return mx.context.num_gpus()
    except mx.base.MXNetError:  # CUDA build on a host without a driver
        return 0


def parse_ctx(spec=None):
    """Turn ``None``/``"auto"``/``"cpu"``/``"gpu"``/``"gpu:1"`` (or an mx.Context) into a Context.

    ``auto`` picks ``gpu(0)`` when MXNet sees a GPU, so feature extraction runs there by default.
    """
    import mxnet as mx

    if isinstance(spec, mx.Context):
        return spec
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return mx.gpu(0) if num_gpus() > 0 else mx.cpu()
    if text == "cpu":
        return mx.cpu()
    if text == "gpu" or text.startswith("gpu:"):
        index_text = text.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise MxvisionError(f"--ctx {spec}", "expected cpu, gpu or gpu:N")
        index = int(index_text)
        available = num_gpus()
        if index >= available:
            raise MxvisionError(f"--ctx {spec}", f"MXNet sees {available} GPU(s) here; use --ctx cpu")
        return mx.gpu(index)
    raise MxvisionError(f"--ctx {spec}", "expected auto, cpu, gpu or gpu:N")


def shared_dir():
    """The real-data folder ``shared/`` (never part of the repository) as a Path, or None.

    ``MXVISION_SHARED`` overrides; the default is ``../shared`` beside the project checkout.
    """
    path = Path(os.environ.get("MXVISION_SHARED", _REPO_ROOT.parent / "shared"))
    return path if path.is_dir() else None


def user_cache_dir():
    """mxvision's cache folder as a Path: ``$MXVISION_CACHE`` when set, else the platform's user
    cache folder from ``platformdirs`` -- ``$XDG_CACHE_HOME/mxvision`` or ``~/.cache/mxvision`` on
    Linux, ``~/Library/Caches/mxvision`` on macOS, ``%LOCALAPPDATA%\\mxvision\\Cache`` on Windows.
    Nothing is created here; callers make the subfolder they write (e.g. ``quantized/``)."""
    base = os.environ.get("MXVISION_CACHE")
    if base:
        return Path(base).expanduser().absolute()
    import platformdirs
    return Path(platformdirs.user_cache_dir("mxvision", appauthor=False)).absolute()
