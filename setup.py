"""Packaging for mxvision.

MXNet ships as several distributions (``mxnet`` for CPU, ``mxnet-cu112`` etc. for CUDA) that all
provide the ``mxnet`` module. If a CUDA build is already installed we must not pull the CPU wheel
over it, so the MXNet requirement is chosen at install time.
"""
import json
import os
import subprocess
import sys
from importlib import metadata

from setuptools import find_packages, setup

MXNET_VERSION = "1.9.1"


def _installed_distributions():
    """Names and versions of the distributions installed in the target environment.

    pip builds in an isolated environment that hides the target's site-packages, so when the
    in-process view shows no MXNet we ask the target interpreter itself, without pip's overlay.
    """
    found = {(d.metadata["Name"] or "").lower(): d.version for d in metadata.distributions()}
    if any(name.startswith("mxnet") for name in found):
        return found
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = ("import importlib.metadata as m, json; "
             "print(json.dumps({(d.metadata['Name'] or '').lower(): d.version for d in m.distributions()}))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env=env, timeout=60, check=True).stdout
        found.update(json.loads(out))
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return found


def _mxnet_requirement():
    """``mxnet==1.9.1``, unless a CUDA build of the same version is installed: then keep that one."""
    for name, version in _installed_distributions().items():
        if name.startswith("mxnet-cu") and version == MXNET_VERSION:
            return f"{name}=={MXNET_VERSION}"
    return f"mxnet=={MXNET_VERSION}"


setup(
    name="mxvision",
    version="0.1.0",
    description="Chest X-ray transfer learning (Xvision) and torchxrayvision-style models in MXNet/Gluon",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # 3.8 and 3.9 get pydicom 2.4 (mxvision.io.dicom_compat); 3.13 is the newest checked
    python_requires=">=3.8,<3.14",
    packages=find_packages(include=["mxvision", "mxvision.*"]),
    package_data={"mxvision": ["py.typed"], "mxvision.data.tables": ["*.json"], "mxvision.models.xrv": ["*.json"],
                  "mxvision.serve": ["page/*.html"]},
    install_requires=[
        # Python 3.13 has no NumPy < 2 wheel, which MXNet's metadata asks for: there the Makefile
        # installs MXNet with --no-deps first (`pip check` then reports that override), see README.
        _mxnet_requirement() + "; python_version < '3.13'",
        # NumPy 1.24 removed np.bool, which MXNet reads: mxvision.runtime.compat restores the names
        # MXNet needs, so each Python gets a NumPy it has wheels for.
        "numpy<1.24; python_version < '3.12'",  # the NumPy the figures in README were measured with
        "numpy>=1.26,<2; python_version == '3.12'",
        "numpy>=2.1; python_version >= '3.13'",
        "setuptools; python_version >= '3.12'",  # MXNet imports distutils, gone from 3.12's stdlib
        "gluoncv==0.10.5.post0",
        # OpenCV >= 4.12 prints "[ WARN ]" lines on stderr for truncated PNGs; gluoncv pulls the GUI
        # build, pinned alike so that both provide the same cv2.
        "opencv-python-headless<4.12",
        "opencv-python<4.12",
        "scikit-learn",
        "matplotlib",
        "tqdm",
        "pydicom",  # 3.x from Python 3.10; 2.4 on 3.8/3.9 (mxvision.io.dicom_compat)
        "Pillow",  # pydicom decodes JPEG-compressed DICOM (both real samples) through Pillow
        "defusedxml",
        "platformdirs",  # the user cache folder (~/.cache/mxvision on Linux): mxvision.runtime.user_cache_dir
    ],
    extras_require={
        # selenium drives Debian's chromium + chromium-driver in the page test (tests/serve)
        "test": ["pytest", "nbclient", "nbformat", "ipykernel", "selenium"],
        # onnx < 1.15 has no wheel for Python 3.12+; there mxvision.runtime.compat gives mx.onnx the
        # onnx.mapping that 1.15 removed
        "onnx": ["onnx<1.15; python_version < '3.12'", "onnx>=1.15; python_version >= '3.12'",
                 "onnxruntime"],
        # The parity suite against torchxrayvision itself (tests/parity; `make setup-parity`, part
        # of `make test`, installs it).
        # torch==2.13.0 is the CPU wheel lying on the project's machines (any other torch from PyPI
        # is a CUDA build of several GB; it needs Python >= 3.10). torchxrayvision 1.5.7 is added
        # with --no-deps (Makefile): its torchvision dependency would pull a CUDA torch; the rest of
        # what it imports is listed here. scikit-image 0.25 needs NumPy >= 1.24.
        # `mxvision serve`: MXNet Model Server (its frontend needs a Java runtime, 8 or newer)
        "serve": ["multi-model-server==1.1.11"],
        "parity": ["torch==2.13.0; python_version == '3.11'", "scikit-image<0.25", "imageio",
                   "pandas", "requests"],
    },
    entry_points={"console_scripts": ["mxvision=mxvision.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        *[f"Programming Language :: Python :: 3.{minor}" for minor in range(8, 14)],
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
