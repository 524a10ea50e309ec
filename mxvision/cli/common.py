"""What the command groups share: running a command, and the options two commands both take.

:func:`run_command_line` is the one place that turns a parsed command into an exit code: user
mistakes (``MxvisionError``) become one ``mxvision: error:`` line, so a traceback always means a
bug in mxvision. Both ``mxvision`` and ``python -m mxvision.cli.distributed`` (the workers of a
cluster job) go through it.

The option sets below are shared by a plain command and its ``mxvision cluster`` twin (``extract``,
``train``, ``finetune``), so the twins take the same options with the same defaults and hand them
to the Python API the same way; ``--ctx`` is shared by every command that runs a network.
"""
import argparse
import logging
import sys

from mxvision.errors import MxvisionError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
CTX_HELP = "auto (GPU if MXNet sees one), cpu, gpu or gpu:N"


def build_parser(groups):
    """The ``mxvision`` parser with the commands of ``groups`` (modules with ``add_parsers``)."""
    parser = argparse.ArgumentParser(
        prog="mxvision",
        description="Chest X-ray transfer learning (Xvision) and torchxrayvision-style models in MXNet.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in groups:
        group.add_parsers(sub)
    return parser


def run_command_line(groups, argv=None):
    """Parse ``argv`` with the commands of ``groups``, run the command, return its exit code."""
    args = build_parser(groups).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="mxvision: %(message)s")
    try:
        return args.func(args) or 0
    except MxvisionError as err:
        print(f"mxvision: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("mxvision: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:  # disk full, permission denied on an output folder, ...
        where = err.filename or "mxvision"
        print(f"mxvision: error: {where}: {err.strerror or err}", file=sys.stderr)
        return EXIT_USER_ERROR


def add_ctx(parser):
    """``--ctx``: the device a command runs its network on."""
    parser.add_argument("--ctx", default="auto", help=CTX_HELP)


def best_epoch_summary(state):
    """``best epoch N: val accuracy A, val AUC B`` of a training run's state."""
    best = next(r for r in state["history"] if r["epoch"] == state["best_epoch"])
    return (f"best epoch {best['epoch']}: val accuracy {best['val_accuracy']:.3f}, "
            f"val AUC {best['val_auc']:.3f}")


# ------------------------------------------------------------------------- extract
def add_extract_options(p):
    """The options of ``extract`` and ``cluster extract``."""
    p.add_argument("--index", required=True, help="index CSV (path,label[,patient_id,split,view]) or a folder per class")
    p.add_argument("--out", required=True, help="feature store folder")
    p.add_argument("--backbone", default="resnet50_v2")
    p.add_argument("--cut", default="stage4_unit2_relu1", help="layer whose output is the feature")
    p.add_argument("--weights", default="imagenet", help="imagenet | none (random) | PATH to a .params file")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="continue with random weights when ImageNet weights cannot be had")
    p.add_argument("--preset", default=None, help="preprocessing preset (imagenet224, xrv224, xrv512; "
                   "default: the backbone's own)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=256, help="images per feature shard file")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="discard features of another configuration in --out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                   help="compute precision; bfloat16 and int8 (calibrated, oneDNN/VNNI) run on the CPU "
                        "only (default: float32)")
    p.add_argument("--calibration", default=None, metavar="INDEX_OR_FOLDER",
                   help="--dtype int8: images to calibrate on (index CSV or folder; default: a seeded "
                        "sample of 64 of the images being extracted)")
    p.add_argument("--storage-dtype", default="float32", choices=["float32", "float16"],
                   help="dtype of the stored features; float16 halves the disk (default: float32)")
    p.add_argument("--pooled", action="store_true",
                   help="store the global average of each feature map (2048 values, not 2048x7x7)")
    p.add_argument("--quiet", action="store_true")
    add_ctx(p)


def extract_options(args):
    """The keyword arguments of :func:`mxvision.features.extract.extract_features` (and of the
    distributed extraction) from :func:`add_extract_options`' options; index and out aside."""
    return dict(backbone=args.backbone, cut=args.cut, weights=args.weights, preset=args.preset,
                ctx=args.ctx, batch_size=args.batch_size, shard_size=args.shard_size,
                allow_random=args.allow_random_weights, strict=args.strict, overwrite=args.overwrite,
                progress=not args.quiet, dtype=args.dtype, calibration=args.calibration,
                storage_dtype=args.storage_dtype, pooled=args.pooled)


# ------------------------------------------------------------------------- train
def add_train_options(p, batch_size_help=None):
    """The options of ``train`` and ``cluster train`` (whose batch is split over the workers)."""
    p.add_argument("--features", required=True)
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, curves)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=32, help=batch_size_help)
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (original: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=3,
                   help="epoch checkpoints to keep (~200 MB each for the ResNet-50 head; 0 = all)")
    p.add_argument("--quiet", action="store_true")
    add_ctx(p)


def train_options(args):
    """The keyword arguments of :func:`mxvision.train.loop.train_head` (and of the distributed
    training) from :func:`add_train_options`' options; features and out aside."""
    return dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, momentum=args.momentum,
                seed=args.seed, ctx=args.ctx, resume=not args.no_resume, progress=not args.quiet,
                keep_checkpoints=args.keep_checkpoints)


# ------------------------------------------------------------------------- finetune
def add_finetune_options(p):
    """The options of ``finetune`` and ``cluster finetune``."""
    p.add_argument("--run", required=True, help="a run trained with `mxvision train` (the starting head)")
    p.add_argument("--out", required=True, help="new run folder")
    p.add_argument("--stages", type=int, default=1, help="how many last residual stages to train")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    add_ctx(p)


def finetune_options(args):
    """The keyword arguments of :func:`mxvision.train.finetune.finetune_run` from
    :func:`add_finetune_options`' options; run and out aside."""
    return dict(stages=args.stages, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                momentum=args.momentum, seed=args.seed, ctx=args.ctx, resume=not args.no_resume,
                progress=not args.quiet)
