"""torchxrayvision's classifiers ported to MXNet: shared tables and checks, DenseNet-121, ResNet-50, weights."""
