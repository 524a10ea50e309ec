"""Frontal or lateral, for films whose metadata gives no view: torchxrayvision's view model.

A ``views`` selection (``--views frontal``) can only judge films whose source records a view;
PNG and JPEG files, and sources without view metadata, have none. :class:`ViewPredictor` runs
``xinario-view-resnet50`` (torchxrayvision's ``baseline_models.xinario.ViewModel``, see
:mod:`.covariates`) on such films, the way torchxrayvision's demo does (the model card's
preprocessing: ``normalize`` to [-1024, 1024], center crop, resize to 224) and answers
``FRONTAL`` (a frontal film whose projection, PA or AP, the model cannot tell:
:data:`mxvision.data.views.FRONTAL_UNSPECIFIED`) or ``LATERAL``. It is the ``predictor`` that
:meth:`mxvision.data.dataset.XrayDataset.with_predicted_views` takes: the data layer receives it
instead of importing a model, and records ``source`` (``model:xinario-view-resnet50``) in the
index's ``view_source`` column for every view it filled.
"""
import collections

import mxnet as mx
import numpy as np
from tqdm import tqdm

from mxvision.data.views import FRONTAL_UNSPECIFIED, LATERAL
from mxvision.data.xrv_transforms import load_xray, preprocess
from mxvision.errors import BadImage
from mxvision.models import zoo
from mxvision.models.xrv.baseline_specs import BASELINES
from mxvision.runtime import hybridize_for_inference, parse_ctx

VIEW_MODEL = "xinario-view-resnet50"
#: the view spelling of each of the model's targets (Frontal, Lateral)
TARGET_VIEWS = {"Frontal": FRONTAL_UNSPECIFIED, "Lateral": LATERAL[0]}


class ViewPredictor:
    """``predictor(paths)`` -> ``FRONTAL``/``LATERAL`` per film (``""`` for an unreadable one).

    ``weights``: None or ``"pretrained"`` (torchxrayvision's release file, downloaded and
    converted once), or the path of a ``.pt``/``.params`` file; a bad one raises WeightsError
    here, before any film is read. After a call, ``counts`` holds how many films got each view
    and ``unreadable`` the files that could not be read (their view stays unknown).
    """

    def __init__(self, weights=None, ctx=None, batch_size=8, progress=False, root=None):
        self.model = VIEW_MODEL
        self.source = "model:" + VIEW_MODEL
        self.ctx = parse_ctx(ctx)
        self.net = zoo.get_model(VIEW_MODEL, weights=weights, ctx=self.ctx, root=root, progress=progress)
        hybridize_for_inference(self.net, self.ctx)
        self.resolution = BASELINES[VIEW_MODEL].resolution
        self.views = [TARGET_VIEWS[t] for t in self.net.targets]
        self.batch_size = max(1, int(batch_size))
        self.progress = progress
        self.counts = collections.Counter()
        self.unreadable = []

    @property
    def weights(self):
        """What the weights are (published, or which file), for messages."""
        return self.net.weights_info["description"]

    def __call__(self, paths):
        paths = list(paths)
        views = [""] * len(paths)
        batch = []

        def flush():
            if batch:
                x = mx.nd.array(np.stack([img for _, img in batch]), ctx=self.ctx)
                for (i, _), k in zip(batch, self.net(x).asnumpy().argmax(axis=1)):
                    views[i] = self.views[int(k)]
                    self.counts[views[i]] += 1
                batch.clear()

        for i, path in enumerate(tqdm(paths, desc="views", unit="img", disable=not self.progress or len(paths) < 2)):
            try:
                batch.append((i, preprocess(load_xray(path), self.resolution)))
            except BadImage:
                self.unreadable.append(path)  # stays unknown: the index's later stages report the file
                continue
            if len(batch) >= self.batch_size:
                flush()
        flush()
        return views


__all__ = ["ViewPredictor", "VIEW_MODEL", "TARGET_VIEWS"]
