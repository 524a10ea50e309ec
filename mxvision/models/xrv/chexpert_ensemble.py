"""The Stanford CheXpert ensemble (torchxrayvision's ``baseline_models.chexpert.DenseNet``) in Gluon.

Irvin et al. 2019 (arXiv:1901.07031) published their CheXpert ensemble as one zip of
``torch.save``d checkpoints (https://academictorrents.com/details/5c7ee21e6770308f2d2b4bd829e896dbd9d3ee87);
torchxrayvision 1.5.7 does not download it: the user passes the zip (``weights_zip=``), and so
here (``get_model("chexpert-densenet121-ensemble", weights=ZIP)``; ``--weights ZIP``).

Which checkpoints make the ensemble is torchxrayvision's ``predict_configs.json``, shipped beside
this module (:data:`CONFIG_FILE`, copied unchanged but for an ``_about`` key): per task, a list
of 30 ``{"ckpt_path", "is_3class"}`` entries. As in torchxrayvision's ``Tasks2Models``, tasks
with the same list form a group -- (Atelectasis, Edema), (Cardiomegaly, Pleural Effusion),
(Consolidation) -- whose first ``num_models`` checkpoints (default 30: 90 DenseNet-121s) each
give a probability per task of the group; per task these are combined by the configuration's
``aggregation_method`` (``"mean"``; ``"max"`` is also read).

Each checkpoint is torchxrayvision's ``chexpert.model.DenseNet121`` inside ``nn.DataParallel``:
torchvision's DenseNet-121 (:class:`~.torchvision_densenet.DenseNetBlock`) with its ``classifier``
replaced by a Linear of one output per task of the checkpoint's ``task_sequence`` -- three per
task for a 3-class ("uncertainty") model, turned into P(positive) by
:func:`uncertain_logits_to_probs`; otherwise a sigmoid. The probability of a task is the output
the checkpoint's own ``task_sequence`` names.

Input as torchxrayvision's ``forward``: (N, 1, 320, 320) in [-1024, 1024] (resized to 320 with a
warning otherwise), repeated to 3 channels and divided by 512 inside ``hybrid_forward``.
Outputs (``output="scores"``): the 5 aggregated probabilities in torchxrayvision's order --
Atelectasis, Cardiomegaly, Consolidation, Edema, Effusion ("Pleural Effusion" in the
configuration) -- probabilities always, as torchxrayvision returns (there are no logits to give).
``output="features"`` / :meth:`CheXpertEnsemble.features`: torchxrayvision's ``features``, every
member's pooled 1024 vector, group by group, in (N, groups x num_models x 1024).

Reading the zip (:func:`read_ensemble_zip`) is a security boundary: the zip is opened as a
regular file of bounded size and its directory bounded before ``zipfile`` parses it; every member
name is checked (no absolute path, no ``..``, no duplicates); only the members the configuration
names are read, each through :func:`~mxvision.io.torchfile.files.read_zip_member` (declared size
bounded before anything is reserved -- a zip bomb is refused --, CRC checked) and unpickled by the
restricted reader (:func:`~mxvision.io.torchfile.reader.read_torch_bytes`: tensors and plain data
only; a pickled class or function is refused by name). A checkpoint must be a dict whose
``task_sequence`` maps task names to distinct output indices and whose ``model_state`` is a state
dict; its other entries (``ckpt_info``: epoch, iteration, a metric as plain numbers and strings)
are read and not used.
"""
import json
import os
import pkgutil

import mxnet as mx
from mxnet.gluon import HybridBlock, nn

from mxvision.errors import MxvisionError, WeightsError, one_line
from mxvision.io.torchfile.files import open_weights_file, open_zip, read_zip_member
from mxvision.io.torchfile.reader import PICKLE_ALLOWANCE, byte_limit_for, read_torch_bytes, state_dict_from
from mxvision.io.torchfile.unpickler import describe
from mxvision.models.registry import register_model
from mxvision.models.xrv.baseline import BaselineModel, three_channels
from mxvision.models.xrv.baseline_specs import BASELINES
from mxvision.models.xrv.torchvision_densenet import DenseNetBlock
from mxvision.runtime import parse_ctx
from mxvision.utils import file_digest

NAME = "chexpert-densenet121-ensemble"
CONFIG_FILE = "chexpert_predict_configs.json"
#: torchxrayvision's output order (its forward's list); the configuration calls Effusion "Pleural Effusion"
OUTPUT_TASKS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
DEFAULT_NUM_MODELS = 30  # torchxrayvision's DenseNet(num_models=30): every checkpoint of the zip
INPUT_SCALE = 512.0  # torchxrayvision: "x = x / 512", [-1024, 1024] -> [-2, 2]
#: the Stanford group's 14 CheXpert tasks, in their code's order: the output layout of a member
#: with random weights. A member read from the zip takes its checkpoint's own ``task_sequence``.
CHEXPERT_TASKS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Airspace Opacity",
                  "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                  "Pleural Other", "Fracture", "Support Devices")
MAX_TASKS = 100  # a task_sequence longer than this is not a CheXpert checkpoint
MAX_ZIP_DIRECTORY = 8 << 20  # the zip's central directory: ~100,000 entries (the ensemble has 90)
MAX_NAME = 1024  # characters in a member name


# --------------------------------------------------------------------------- the configuration
def predict_config():
    """``(aggregation, groups)`` from the shipped ``predict_configs.json``: ``aggregation`` is
    ``"mean"`` or ``"max"``; ``groups`` lists ``(tasks, checkpoints)`` in torchxrayvision's order
    -- tasks sharing one checkpoint list, ``checkpoints`` that list of ``(ckpt_path, is_3class)``."""
    config = json.loads(pkgutil.get_data(__package__, CONFIG_FILE).decode("utf-8"))
    aggregation = config["aggregation_method"]
    if aggregation not in ("mean", "max"):  # torchxrayvision's Tasks2Models.get_config
        raise ValueError("%s: aggregation_method %r (expected 'mean' or 'max')" % (CONFIG_FILE, aggregation))
    groups = {}
    for task, entries in config["task2models"].items():
        checkpoints = tuple((entry["ckpt_path"], bool(entry["is_3class"])) for entry in entries)
        groups.setdefault(checkpoints, []).append(task)
    return aggregation, [(tuple(tasks), list(checkpoints)) for checkpoints, tasks in groups.items()]


def check_num_models(num_models, available):
    """``num_models`` as an int in 1..``available``, or MxvisionError saying what is allowed."""
    if isinstance(num_models, bool) or not isinstance(num_models, int) or not 1 <= num_models <= available:
        raise MxvisionError(NAME, "num_models must be a whole number from 1 to %d (checkpoints per task in "
                                  "the ensemble), not %r" % (available, num_models))
    return num_models


def uncertain_logits_to_probs(F, logits):
    """torchxrayvision's ``uncertain_logits_to_probs``: (N, 3 x tasks) logits of a 3-class model
    (negative, uncertain, positive per task) -> (N, tasks) P(positive), a softmax over the
    uncertain and positive logits."""
    triples = F.reshape(logits, shape=(0, -1, 3))
    probs = F.softmax(F.slice_axis(triples, axis=2, begin=1, end=3), axis=-1)
    return F.reshape(F.slice_axis(probs, axis=2, begin=1, end=2), shape=(0, -1))


# --------------------------------------------------------------------------- the network
class EnsembleMember(HybridBlock):
    """One checkpoint: ``model`` is its DenseNet-121 (structural names: the checkpoint's keys without
    ``module.``); called, it gives its probabilities for ``tasks`` (N, len(tasks)), or with
    ``output="features"`` its pooled (N, 1024) vector."""

    def __init__(self, ckpt_path, uncertainty, tasks, output="scores", task_sequence=None, **kwargs):
        super().__init__(**kwargs)
        self.ckpt_path, self.uncertainty, self.tasks, self.output = ckpt_path, uncertainty, tuple(tasks), output
        self.task_indices = ()
        self.model = None  # built by configure, which knows the number of outputs
        self.configure(task_sequence or {task: i for i, task in enumerate(CHEXPERT_TASKS)})

    def configure(self, task_sequence, source=NAME):
        """Take a checkpoint's ``task_sequence`` ({task: output index}): the classifier gets one
        output per task (three for a 3-class model), rebuilt if that number changes."""
        missing = [t for t in self.tasks if t not in task_sequence]
        if missing:
            raise WeightsError(source, "its task_sequence has no %r, which the ensemble takes from this "
                                       "checkpoint (it has %s)" % (missing[0], ", ".join(sorted(task_sequence))))
        self.task_indices = tuple(task_sequence[t] for t in self.tasks)
        num_outputs = len(task_sequence) * (3 if self.uncertainty else 1)
        if self.model is None or self.model.num_outputs != num_outputs:
            with self.name_scope():
                self.model = DenseNetBlock(output="scores" if self.output == "scores" else "pooled",
                                           num_classes=num_outputs)
            self.model.num_outputs = num_outputs

    def hybrid_forward(self, F, x):
        if self.output != "scores":
            return self.model(x)
        logits = self.model(x)
        probs = uncertain_logits_to_probs(F, logits) if self.uncertainty else F.sigmoid(logits)
        return F.concat(*[F.slice_axis(probs, axis=1, begin=i, end=i + 1) for i in self.task_indices], dim=1)

    def pooled(self, x):
        """torchxrayvision's ``features2`` of this member (NDArray in, (N, 1024) out)."""
        out = mx.nd.relu(self.model.features(x))
        return mx.nd.flatten(mx.nd.Pooling(out, kernel=(1, 1), global_pool=True, pool_type="avg"))


class CheXpertEnsemble(BaselineModel):
    """torchxrayvision's ``baseline_models.chexpert.DenseNet``: 5 CheXpert probabilities at 320x320,
    from ``num_models`` checkpoints per task group (see the module docstring). Weights come only
    from the user's zip (:meth:`load_weights_file`) or are random (``init_random``)."""

    ARCH = "chexpert_ensemble"
    OUTPUTS = ("scores", "features")
    APPLY_SIGMOID = True  # the outputs are probabilities; there is no other form

    def __init__(self, spec=None, output="scores", calibrated=False, apply_sigmoid=True,
                 num_models=DEFAULT_NUM_MODELS, **kwargs):
        super().__init__(spec, output=output, calibrated=False, apply_sigmoid=True, **kwargs)
        if apply_sigmoid is False:
            raise MxvisionError(NAME, "the ensemble averages probabilities: it has no logits to give "
                                      "(apply_sigmoid=False)")
        self.aggregation, groups = predict_config()
        self.num_models = check_num_models(num_models, min(len(c) for _, c in groups))
        self.groups = [(tasks, checkpoints[:self.num_models]) for tasks, checkpoints in groups]
        with self.name_scope():
            self.members = nn.HybridSequential()
            with self.members.name_scope():
                for tasks, checkpoints in self.groups:
                    for ckpt_path, uncertainty in checkpoints:
                        self.members.add(EnsembleMember(ckpt_path, uncertainty, tasks, output=output))

    def _grouped_members(self):
        """``(tasks, members)`` per group, in the configuration's order."""
        members, start = list(self.members), 0
        for tasks, checkpoints in self.groups:
            yield tasks, members[start:start + len(checkpoints)]
            start += len(checkpoints)

    def hybrid_forward(self, F, x):
        x = three_channels(F, x) / INPUT_SCALE
        if self.output == "features":
            return F.concat(*[member(x) for member in self.members], dim=1)
        combine = F.mean if self.aggregation == "mean" else F.max
        probs = {}
        for tasks, members in self._grouped_members():
            outputs = [member(x) for member in members]  # each (N, len(tasks))
            for column, task in enumerate(tasks):
                votes = F.concat(*[F.slice_axis(o, axis=1, begin=column, end=column + 1) for o in outputs], dim=1)
                probs[task] = combine(votes, axis=1, keepdims=True)
        return F.concat(*[probs[task] for task in OUTPUT_TASKS], dim=1)

    def postprocess(self, out):
        return out  # already probabilities

    def features(self, x):
        """torchxrayvision's ``features``: resize/check like ``forward``, then every member's pooled
        vector, group by group -- (N, groups x num_models x 1024)."""
        x = three_channels(mx.nd, self.prepare(x)) / INPUT_SCALE
        return mx.nd.concat(*[member.pooled(x) for member in self.members], dim=1)

    def load_torch_state_dict(self, state, source="weights", ctx=None):
        raise WeightsError(source, "the CheXpert ensemble has no single state dict; load its zip with "
                                   "load_weights_file (get_model(%r, weights=ZIP))" % NAME)

    def load_weights_file(self, path, ctx=None):
        """Load the members' checkpoints from the ensemble's zip (the file torchxrayvision's
        ``weights_zip`` names), read safely (see the module docstring); one-line errors."""
        path = os.fspath(path)
        ctx = ctx or mx.cpu()
        members = list(self.members)
        for member, (ckpt_path, task_sequence, state) in zip(members, read_ensemble_zip(
                path, [m.ckpt_path for m in members], self._member_limit(members))):
            source = "%s, member %s" % (path, ckpt_path)
            member.configure(task_sequence, source)
            member.model.load_torch_state_dict(state, source=source, ctx=ctx)
        self.weights_info = {"spec": path, "file": path, "sha1": file_digest(path, "sha1"),
                             "description": "%s: %d checkpoints per task group from %s"
                                            % (NAME, self.num_models, path)}
        # the operators for ctx in the members' DenseNets (some just rebuilt by configure); this
        # also drops any graph built before, which read the members' old task indices
        return self.for_context(ctx)

    @staticmethod
    def _member_limit(members):
        """Most tensor bytes one checkpoint may hold: a DenseNet-121 with room for float64 and an
        optimizer's state (byte_limit_for); a longer task_sequence changes only a small Linear."""
        return byte_limit_for(4 * 1024 * 3 * MAX_TASKS + members[0].model.expected_weights_bytes())

    def __repr__(self):
        return "CheXpert-DenseNet121-ensemble(%d per task group, %s)" % (self.num_models, self.weights)


# --------------------------------------------------------------------------- reading the zip
def _check_member_name(path, name):
    """Refuse a member name no zip of checkpoints has: absolute, climbing with '..', NUL, overlong."""
    clean = name.replace("\\", "/")
    if len(name) > MAX_NAME or "\x00" in name:
        problem = "an overlong name" if len(name) > MAX_NAME else "a NUL byte in its name"
    elif clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        problem = "an absolute path"
    elif ".." in clean.split("/"):
        problem = "'..' in its path"
    else:
        return
    raise WeightsError(path, "member %s has %s: not the CheXpert ensemble's zip, or a hostile one"
                       % (one_line(repr(name[:200]), 200), problem))


def _checkpoint_parts(checkpoint, source):
    """``(task_sequence, state dict)`` of one unpickled checkpoint, checked."""
    if not isinstance(checkpoint, dict):
        raise WeightsError(source, "holds %s, not a CheXpert checkpoint (a dict with task_sequence and "
                                   "model_state)" % describe(checkpoint))
    missing = [k for k in ("task_sequence", "model_state") if k not in checkpoint]
    if missing:
        raise WeightsError(source, "a dict without %s: not a CheXpert checkpoint (it has %s)"
                           % (missing[0], ", ".join(describe(k) for k in list(checkpoint)[:6])))
    sequence = checkpoint["task_sequence"]
    if not isinstance(sequence, dict) or not 0 < len(sequence) <= MAX_TASKS:
        raise WeightsError(source, "task_sequence is %s, not a dict of up to %d tasks"
                           % (describe(sequence), MAX_TASKS))
    for task, index in sequence.items():
        if not isinstance(task, str) or isinstance(index, bool) or not isinstance(index, int):
            raise WeightsError(source, "task_sequence maps %s to %s; it maps task names to output indices"
                               % (describe(task), describe(index)))
    if sorted(sequence.values()) != list(range(len(sequence))):
        raise WeightsError(source, "task_sequence's output indices %s are not 0..%d, each once"
                           % (describe(tuple(sorted(sequence.values()))), len(sequence) - 1))
    return dict(sequence), state_dict_from(checkpoint["model_state"], source)


def read_ensemble_zip(path, ckpt_paths, max_bytes):
    """Yield ``(ckpt_path, task_sequence, state_dict)`` for each of ``ckpt_paths``, in order, from
    the ensemble's zip at ``path``, one checkpoint in memory at a time. ``max_bytes``: the tensor
    bytes one checkpoint may hold. Everything refused is one WeightsError line naming the zip
    (and the member)."""
    path = os.fspath(path)
    member_bytes = max_bytes + PICKLE_ALLOWANCE
    with open_weights_file(path, len(ckpt_paths) * member_bytes + MAX_ZIP_DIRECTORY,
                           what="CheXpert ensemble weights zip") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(4) != b"PK\x03\x04":
            raise WeightsError(path, "not a zip file: the CheXpert ensemble's weights are the zip of "
                                     "checkpoints torchxrayvision reads (its weights_zip)")
        with open_zip(f, size, path, MAX_ZIP_DIRECTORY, usual="the ensemble's takes a few kB") as zf:
            by_name = {}
            for info in zf.infolist():
                _check_member_name(path, info.filename)
                if info.filename in by_name:
                    raise WeightsError(path, "member %s appears twice (which one is meant?): corrupt or "
                                             "hostile zip" % one_line(repr(info.filename), 200))
                by_name[info.filename] = info
            absent = [p for p in ckpt_paths if p not in by_name]
            if absent:
                raise WeightsError(path, "has no member %s (%d of the %d checkpoints the ensemble needs are "
                                         "missing): not the CheXpert ensemble's zip?" % (absent[0], len(absent),
                                                                                        len(ckpt_paths)))
            for ckpt_path in ckpt_paths:
                source = "%s, member %s" % (path, ckpt_path)
                raw = read_zip_member(zf, by_name[ckpt_path], path, member_bytes)
                checkpoint = read_torch_bytes(raw, source, allow_modules=False, max_bytes=max_bytes)
                del raw
                task_sequence, state = _checkpoint_parts(checkpoint, source)
                yield ckpt_path, task_sequence, state


# --------------------------------------------------------------------------- the registry entry
def ensemble_factory(weights=None, weights_file=None, pretrained=True, num_models=DEFAULT_NUM_MODELS, ctx=None,
                     output="scores", apply_sigmoid=None, calibrated=True, thresholds=None, root=None,
                     progress=True, cut=None):
    """``get_model("chexpert-densenet121-ensemble", weights=ZIP, num_models=30)``.

    ``weights``: the path of the ensemble's zip (``weights_file=`` says the same), or ``"none"``
    (random, seeded). The pretrained weights are not downloaded (torchxrayvision does not either):
    asking for them says where to get the zip. ``num_models``: checkpoints per task group, 1 to 30
    (torchxrayvision's default 30: 90 DenseNet-121s, ~2.5 GB of weights). ``output``: ``"scores"``
    or ``"features"``. No backbone cuts, no operating points, no logits: ``cut``, ``thresholds``
    and ``apply_sigmoid=False`` are refused; ``calibrated``, ``root`` and ``progress`` are accepted
    for the other models' sake and mean nothing here.
    """
    spec = BASELINES[NAME]
    if cut is not None:
        raise WeightsError(NAME, "an ensemble of 90 networks is not a backbone of the feature pipeline (cut %r)" % cut)
    if thresholds is not None:
        raise WeightsError(NAME, "no operating points to replace: its outputs are the ensemble's probabilities")
    if weights is None:
        weights = weights_file if weights_file is not None else ("pretrained" if pretrained else "none")
    choice = str(weights)
    if choice.lower() in ("pretrained", "default", "xrv"):
        raise WeightsError(NAME, spec.supplied_by_user)
    ctx = parse_ctx(ctx)
    net = CheXpertEnsemble(spec, output=output, apply_sigmoid=apply_sigmoid, num_models=num_models)
    if choice.lower() in ("none", "random"):
        return net.init_random(ctx=ctx)
    return net.load_weights_file(choice, ctx=ctx)


register_model(NAME, family="xrv-other", preset=BASELINES[NAME].preset, network=CheXpertEnsemble,
               outputs=BASELINES[NAME].targets, licence=BASELINES[NAME].licence, source=BASELINES[NAME].source,
               description="torchxrayvision %s: %s" % (BASELINES[NAME].xrv_class,
                                                      BASELINES[NAME].description))(ensemble_factory)
