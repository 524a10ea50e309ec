"""mxvision: the Xvision chest X-ray transfer-learning pipeline and torchxrayvision-style models in MXNet/Gluon."""
__version__ = "0.1.0"
