"""torchxrayvision's other models -- segmentation, autoencoder, baseline and covariate models: what they are.

Besides its 18-pathology classifiers (:mod:`.common`), torchxrayvision 1.5.7 ships models that
each keep their own input recipe, outputs and licence: ``baseline_models.chestx_det.PSPNet``,
``autoencoders.ResNetAE("101-elastic")``, ``baseline_models.jfhealthcare.DenseNet``,
``baseline_models.chexpert.DenseNet`` (an ensemble whose weights zip the user supplies),
``baseline_models.xinario.ViewModel``, ``baseline_models.mira.SexModel``,
``baseline_models.emory_hiti.RaceModel`` and ``baseline_models.riken.AgeModel``. This module is
their table -- data only, so the family modules, the weights cache and the registry can all read
it without importing one another. Every field is copied from torchxrayvision 1.5.7's source
(file names, resolutions ``fix_resolution`` uses, target order).

Licences: torchxrayvision documents a licence for one of these weights files (jfhealthcare,
Apache-2.0); for the others it documents none. ``licence`` says exactly that, and names the data
the weights were trained on, whose terms (several non-commercial) a user has to weigh.
"""
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from mxvision.errors import WeightsError
from mxvision.models.xrv.common import BASE_URL_ENV, DATASET_TERMS, RELEASE_URL  # one mirror variable for every xrv file

NOT_STATED = "not stated by torchxrayvision"


@dataclass(frozen=True)
class BaselineWeights:
    """One of torchxrayvision's non-classifier (or non-18-pathology) models and its weights file."""

    name: str                  # mxvision's registry name
    arch: str                  # the network class's ARCH
    resolution: int            # the size torchxrayvision's fix_resolution resizes to
    file: Optional[str]        # the release file name; None when the user must supply the weights
    targets: Tuple[str, ...]   # output names in torchxrayvision's order (empty: no class outputs)
    xrv_class: str             # torchxrayvision's class, for the docs and error messages
    licence: str
    source: str
    description: str = ""
    supplied_by_user: Optional[str] = None  # how to obtain weights that cannot be downloaded
    refused: Optional[str] = None           # why mxvision will not read these weights at all
    op_threshs = None                       # no operating points: outputs are not op_norm-calibrated
    ppv80_thres = None

    @property
    def url(self):
        if self.file is None:
            return None
        base = os.environ.get(BASE_URL_ENV) or RELEASE_URL
        return (base if base.endswith("/") else base + "/") + self.file

    @property
    def labels(self):
        return self.targets

    @property
    def preset(self):
        """The preprocessing preset of :mod:`mxvision.data.transforms`: 1 channel in [-1024, 1024]."""
        return "xrv%d" % self.resolution


_MIMIC = DATASET_TERMS["mimic"]
_CHEXPERT = DATASET_TERMS["chex"]

BASELINES = {w.name: w for w in (
    BaselineWeights(
        "chestx_det-pspnet", "pspnet", 512, "pspnet_chestxray_best_model_4.pth",
        ("Left Clavicle", "Right Clavicle", "Left Scapula", "Right Scapula", "Left Lung", "Right Lung",
         "Left Hilus Pulmonis", "Right Hilus Pulmonis", "Heart", "Aorta", "Facies Diaphragmatica",
         "Mediastinum", "Weasand", "Spine"),
        "baseline_models.chestx_det.PSPNet",
        NOT_STATED + "; trained on ChestX-Det (Deepwise AI Lab), see the dataset's terms",
        "https://github.com/Deepwise-AILab/ChestX-Det-Dataset",
        "PSPNet segmentation of 14 chest structures at 512x512 (Lian et al. 2021)"),
    BaselineWeights(
        "resnet_ae-101-elastic", "resnet_ae101", 224, "nihpcrsnamimic_ch-resnet101-2-ae-test2-elastic-e250.pt",
        (), "autoencoders.ResNetAE('101-elastic')",
        NOT_STATED + "; trained on NIH, PadChest, RSNA, MIMIC-CXR (%s) and CheXpert (%s)" % (_MIMIC, _CHEXPERT),
        "https://github.com/mlmed/torchxrayvision",
        "ResNet-101 autoencoder at 224x224: encode/decode/features (Cohen et al. 2021)"),
    BaselineWeights(
        "jfhealthcare-densenet121", "jfhealthcare_densenet121", 512,
        "baseline_models_jfhealthcare-DenseNet121_pre_train.pth",
        ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Effusion"),
        "baseline_models.jfhealthcare.DenseNet",
        "Apache-2.0 (as torchxrayvision documents it); trained on CheXpert (%s)" % _CHEXPERT,
        "https://github.com/jfhealthcare/Chexpert",
        "JF Healthcare DenseNet-121 with FPA attention and AVG_MAX pooling, 5 CheXpert outputs at 512"),
    BaselineWeights(
        "chexpert-densenet121-ensemble", "chexpert_ensemble", 320, None,
        ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion"),
        "baseline_models.chexpert.DenseNet",
        NOT_STATED + "; the Stanford CheXpert ensemble, trained on CheXpert (%s)" % _CHEXPERT,
        "https://academictorrents.com/details/5c7ee21e6770308f2d2b4bd829e896dbd9d3ee87",
        "the Stanford CheXpert ensemble of up to 30 DenseNet-121s at 320x320 (Irvin et al. 2019)",
        supplied_by_user="torchxrayvision does not download these weights: fetch the zip from "
                         "https://academictorrents.com/details/5c7ee21e6770308f2d2b4bd829e896dbd9d3ee87 "
                         "and pass it as weights=PATH (--weights PATH)"),
    BaselineWeights(
        "xinario-view-resnet50", "xinario_resnet50", 224, "xinario_chestViewSplit_resnet-50.pt",
        ("Frontal", "Lateral"), "baseline_models.xinario.ViewModel",
        NOT_STATED + "; see the source repository",
        "https://github.com/xinario/chestViewSplit",
        "ResNet-50 frontal/lateral view classifier (torchxrayvision resizes to 224)"),
    BaselineWeights(
        "mira-sex-resnet34", "mira_resnet34", 224, "mira_sex_resnet-all_epoch_13-step_7125.ckpt",
        ("Male", "Female"), "baseline_models.mira.SexModel",
        NOT_STATED + "; trained on CheXpert (%s)" % _CHEXPERT,
        "https://github.com/biomedia-mira/chexploration",
        "ResNet-34 patient-sex classifier at 224x224 (Glocker et al. 2023)"),
    BaselineWeights(
        "emory_hiti-race-resnet34", "emory_resnet34", 320,
        "resnet_race_detection_val-loss_0.157_mimic_public.pt",
        ("Asian", "Black", "White"), "baseline_models.emory_hiti.RaceModel",
        NOT_STATED + "; trained on MIMIC-CXR (%s)" % _MIMIC,
        "https://doi.org/10.1016/S2589-7500(22)00063-2",
        "ResNet-34 race classifier at 320x320, log-softmax outputs (Gichoya et al. 2022)"),
    BaselineWeights(
        "riken-age", "riken_age", 320,
        "baseline_models_riken_xray_age_every_model_age_senet154_v2_tl_26_ft_7_fp32.pt",
        ("Age",), "baseline_models.riken.AgeModel",
        NOT_STATED + "; see the source repository", "https://github.com/pirocv/xray_age",
        "SENet-154 age regression at 320x320 (Ieki et al. 2022)",
        refused="torchxrayvision ships these weights as a TorchScript archive (torch.jit.load): it "
                "holds Python code that loading would run, so mxvision does not read it; a plain "
                "state dict of the SENet-154 would make a port possible"),
)}


def get_baseline_spec(name):
    """The :class:`BaselineWeights` of ``name``, or WeightsError naming the known ones."""
    try:
        return BASELINES[name]
    except (KeyError, TypeError):
        raise WeightsError(name, "unknown torchxrayvision model; known: %s" % ", ".join(sorted(BASELINES))) from None
