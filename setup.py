"""Packaging for mxvision.

MXNet ships as several distributions (``mxnet`` for CPU, ``mxnet-cu112`` etc. for CUDA) that all
provide the ``mxnet`` module. If a CUDA build is already installed we must not pull the CPU wheel
over it, so the MXNet requirement is chosen at install time.
"""
from importlib import metadata

from setuptools import find_packages, setup

MXNET_VERSION = "1.9.1"


def _mxnet_requirement():
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("mxnet-cu") and dist.version == MXNET_VERSION:
            return f"{name}=={MXNET_VERSION}"
    return f"mxnet=={MXNET_VERSION}"


setup(
    name="mxvision",
    version="0.1.0",
    description="Chest X-ray transfer learning (Xvision) and torchxrayvision-style models in MXNet/Gluon",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.8,<3.12",
    packages=find_packages(include=["mxvision", "mxvision.*"]),
    package_data={"mxvision": ["py.typed"]},
    install_requires=[
        _mxnet_requirement(),
        "numpy<1.24",  # MXNet 1.9.1 reads np.bool, removed in NumPy 1.24
        "gluoncv==0.10.5.post0",
        "opencv-python-headless",
        "scikit-learn",
        "matplotlib",
        "tqdm",
        "pydicom",
        "Pillow",  # pydicom decodes JPEG-compressed DICOM (both real samples) through Pillow
        "defusedxml",
    ],
    extras_require={
        "test": ["pytest", "nbclient", "nbformat", "ipykernel"],
        "onnx": ["onnx<1.15", "onnxruntime"],
    },
    entry_points={"console_scripts": ["mxvision=mxvision.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
