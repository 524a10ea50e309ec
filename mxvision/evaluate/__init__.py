"""Evaluating trained runs: what a radiologist can weigh, with where every figure came from.

* :mod:`~mxvision.evaluate.classification` - :func:`evaluate_run`: a softmax head on its own
  held-out split or on another store (external validation, refused when it shares patients or
  pixels with the training store), with AUC intervals, calibration, operating points chosen on
  validation, the confusion matrix, ROC and reliability PNGs and the shortcut audit;
* :mod:`~mxvision.evaluate.multilabel` - the same for heads trained on several pathologies
  (``train --labels``): per-label AUC with intervals, missing labels left out;
* :mod:`~mxvision.evaluate.compare` - two evaluations of the same films, DeLong's paired test
  (``mxvision compare``).
"""
from mxvision.evaluate.classification import evaluate_run, plot_confusion_matrix, plot_roc_curve

__all__ = ["evaluate_run", "plot_confusion_matrix", "plot_roc_curve"]
