"""Real NIH films with their real labels, and random DenseNet weights whose outputs do not saturate.

The random weights of :mod:`support.xrv_files` give logits of +-50 on real films (float32 sigmoid
outputs of exactly 0 or 1: ties, so no ROC curve to fit a threshold on); scaling the classifier
down keeps each output's ranking of the films and spreads the sigmoid values over (0, 1).
"""
import csv


from support.xrv_files import DENSE, write_release_file
from mxvision.data.index import write_index
from mxvision.data.nih import nih_index
from mxvision.models import zoo


def soft_weights(folder, scale=0.02, seed=0):
    """``(path, sha1-able .params)`` of random mimic_nb weights with a scaled-down classifier."""
    pt = write_release_file(DENSE, folder / "mimic_nb.pt", seed=seed)[0]
    net = zoo.get_model(DENSE, weights=str(pt), calibrated=False)
    weight = net.classifier.weight
    weight.set_data(weight.data() * scale)
    path = folder / ("mimic_nb-soft-%d.params" % seed)
    net.save_parameters(str(path))
    return str(path)


def nih_findings(shared):
    """{file name: set of findings} from the shared NIH labels.csv (its own columns, not mxvision's)."""
    with open(shared / "data" / "nih" / "labels.csv", newline="") as f:
        return {r["filename"]: set(r["finding_labels"].split("|")) for r in csv.DictReader(f)}


def nih_pathology_index(shared, out_csv, counts):
    """An index CSV with pathology columns (``mxvision data index nih --task pathologies``) of the
    NIH sample films: for each (finding, n) of ``counts`` in turn, the first n films with that
    finding and none of the earlier ones; ``("No Finding", n)`` picks normal films."""
    nih = shared / "data" / "nih"
    full, _ = nih_index(nih / "Data_Entry_2017_v2020.csv.gz", nih / "images", out_csv.with_suffix(".all.csv"),
                        task="pathologies", views=["PA", "AP"])
    findings = nih_findings(shared)
    names = [p.rsplit("/", 1)[-1] for p in full.paths]
    chosen, taken = [], set()
    for finding, n in counts:
        rows = [i for i, name in enumerate(names) if finding in findings[name] and i not in taken
                and not any(f in findings[name] for f, _ in counts[:counts.index((finding, n))])]
        chosen += rows[:n]
        taken.update(rows[:n])
    write_index(full.select(sorted(chosen)), out_csv)
    return out_csv
