"""What the command groups share: parsing and checking arguments, running a command, and the
options two commands both take (what commands print for programs to read: ``cli/output.py``).

:func:`run_command_line` is the one place that turns a command line into an exit code. A bad
argument is refused while parsing, before anything is created on disk: the argparse ``type=``
functions below (:class:`Number`, :func:`non_empty`, :func:`hex_digest`, ...) check each value, and
checks that involve several options (a range ``--radius MIN MAX``, split fractions) run right after
parsing (:func:`add_check`). Either way the user sees one line, ``mxvision: error: --batch-size 0:
must be a positive integer``, and exit status 2, never argparse's usage block. User mistakes found
later (``MxvisionError``) become one ``mxvision: error:`` line too, so a traceback always means a
bug in mxvision. Both ``mxvision`` and ``python -m mxvision.cli.distributed`` (the workers of a
cluster job) go through it.

The option sets below are shared by a plain command and its ``mxvision cluster`` twin (``extract``,
``train``, ``finetune``), so the twins take the same options with the same defaults and hand them
to the Python API the same way; ``--ctx`` is shared by every command that runs a network.
"""
import argparse
import logging
import math
import re
import sys

from mxvision.cli.output import safe_text
from mxvision.errors import MxvisionError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
CTX_HELP = "auto (GPU if MXNet sees one), cpu, gpu or gpu:N"
#: Largest integer an option takes unless it says otherwise: MXNet's C int, so no count overflows.
MAX_INT = 2 ** 31 - 1
#: Largest seed: NumPy's seeds are 32-bit.
MAX_SEED = 2 ** 32 - 1
#: Longest wait an option takes (about 116 days): beyond it ``time.sleep`` and socket timeouts
#: overflow instead of waiting.
MAX_SECONDS = 1e7
#: Smallest training batch: BatchNorm on a batch of one sample outputs its bias whatever the input
#: (the batch's own mean and variance), so nothing before it would ever learn.
MIN_TRAIN_BATCH = 2
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def single_line(text):
    """``text`` with every line break written as an escape (``\\n``) and every other control
    character as one too (``\\x1b``): an error message quoting a file name that holds a newline
    still takes one line, and one holding ESC or BEL cannot drive the user's terminal."""
    text = _LINE_BREAKS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
    return safe_text(text)


# ------------------------------------------------------------------------- checked arguments
class OptionValueError(argparse.ArgumentTypeError):
    """A value an option refuses. argparse adds the option's name (see
    :meth:`CommandLineParser.error`), giving ``--batch-size 0: must be a positive integer``."""

    def __init__(self, text, problem):
        self.shown, self.problem = shown_value(text), problem
        super().__init__(f"{self.shown}: {problem}")


def shown_value(text):
    """A command-line value as an error message quotes it: as typed when it is short and plain,
    else its ``repr`` (cut to 40 characters), so an empty or multi-line value stays visible."""
    text = str(text)
    if text and text.isprintable() and text.strip() == text and len(text) <= 40:
        return text
    quoted = repr(text)
    return quoted if len(quoted) <= 40 else quoted[:36] + "...'"


class Number:
    """An argparse ``type``: an ``int`` or a finite ``float`` within ``[low, high]`` (``low_open``:
    above ``low``, ``high_open``: below ``high``). NaN, infinities (``1e400`` reads as one) and
    text that is not a number are refused; ``problem`` is what the message says is needed. The
    attributes (``kind``, ``low``, ``high``) let tests and help text see what is accepted."""

    def __init__(self, kind, problem, low=None, high=None, low_open=False, high_open=False,
                 allowed=()):
        self.kind, self.problem, self.low, self.high = kind, problem, low, high
        self.low_open, self.high_open, self.allowed = low_open, high_open, tuple(allowed)
        self.__name__ = kind.__name__  # argparse names a type by it

    def __call__(self, text):
        try:
            value = self.kind(text)
        except (TypeError, ValueError, OverflowError):
            raise OptionValueError(text, self.problem) from None
        if value in self.allowed:
            return value
        if self.kind is float and not math.isfinite(value):
            raise OptionValueError(text, self.problem)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise OptionValueError(text, self.problem)
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise OptionValueError(text, self.problem)
        return value

    def __repr__(self):
        return f"Number({self.problem!r})"


def positive_int(high=MAX_INT, low=1):
    """An integer in ``[low, high]`` (default: 1 to :data:`MAX_INT`)."""
    what = "a positive integer" if low == 1 else f"an integer of at least {low}"
    return Number(int, f"must be {what}" + (f" up to {high}" if high != MAX_INT else ""),
                  low=low, high=high)


def non_negative_int(high=MAX_INT):
    """An integer in ``[0, high]``."""
    return Number(int, "must be an integer >= 0" + (f" up to {high}" if high != MAX_INT else ""),
                  low=0, high=high)


def positive_float(high=None):
    """A finite number above 0 (up to ``high``)."""
    return Number(float, "must be a finite number above 0" + (f" up to {high:g}" if high else ""),
                  low=0.0, low_open=True, high=high)


def non_negative_float(high=None):
    """A finite number of at least 0 (up to ``high``)."""
    return Number(float, "must be a finite number >= 0" + (f" up to {high:g}" if high else ""),
                  low=0.0, high=high)


def seconds(zero=True):
    """A duration in seconds: finite, at least 0 (above 0 unless ``zero``), at most
    :data:`MAX_SECONDS`."""
    return Number(float, f"must be a number of seconds {'>= 0' if zero else 'above 0'} up to "
                         f"{MAX_SECONDS:g}", low=0.0, low_open=not zero, high=MAX_SECONDS)


seed = Number(int, f"must be an integer from 0 to {MAX_SEED}", low=0, high=MAX_SEED)
#: ``[0, 1)``: a fraction of something that must leave a remainder (a split), or SGD momentum.
fraction = Number(float, "must be a number >= 0 and below 1", low=0.0, high=1.0, high_open=True)
#: ``[0, 1]``: a probability, an AUC, an opacity.
probability = Number(float, "must be a number from 0 to 1", low=0.0, high=1.0)
#: ``(0, 1)``: a target sensitivity (0 and 1 are met by any threshold at the extremes).
open_probability = Number(float, "must be a number above 0 and below 1", low=0.0, high=1.0,
                          low_open=True, high_open=True)


def non_empty(text):
    """A string option that must say something (a path, a name): an empty or blank value would
    silently mean the current folder or a default."""
    if not str(text).strip():
        raise OptionValueError(text, "must not be empty")
    return text


def hex_digest(algorithm, digits, skip=()):
    """An argparse ``type``: a ``digits``-long hexadecimal ``algorithm`` checksum (any case), or
    one of the words ``skip`` (no check)."""
    words = " or " + "/".join(skip) if skip else ""

    def check(text):
        if str(text).lower() in skip:
            return text
        if len(text) != digits or not re.fullmatch(r"[0-9a-fA-F]+", text):
            raise OptionValueError(text, f"must be a {algorithm} checksum of {digits} hex digits{words}")
        return text.lower()
    check.__name__ = f"{algorithm}_digest"
    return check


def ctx_spec(text):
    """``--ctx``'s form (auto, cpu, gpu, gpu:N; :func:`mxvision.runtime.parse_ctx` reads it and
    checks that the GPU exists)."""
    if not re.fullmatch(r"\s*(auto|cpu|gpu(:\d+)?)\s*", str(text), flags=re.IGNORECASE):
        raise OptionValueError(text, "expected auto, cpu, gpu or gpu:N")
    return text


def add_check(parser, check):
    """Run ``check(args)`` after ``parser`` (a command) has parsed its arguments: for conditions
    between options. It returns None or the one-line reason the command line is refused."""
    parser.set_defaults(argument_checks=tuple(parser.get_default("argument_checks") or ()) + (check,))


def add_range(parser, option, number, default=None, metavar=("MIN", "MAX"), help=None):
    """An option taking two ``number`` values, the lower first (``--radius 7 20``)."""
    action = parser.add_argument(option, type=number, nargs=2, default=default, metavar=metavar,
                                 help=help)

    def check(args):
        low, high = getattr(args, action.dest) or (None, None)
        if low is not None and low > high:
            return f"{option} {low:g} {high:g}: {metavar[0]} must not be above {metavar[1]}"
    add_check(parser, check)
    return action


class CommandLineParser(argparse.ArgumentParser):
    """argparse with mxvision's errors: one line, ``mxvision: error: --option VALUE: problem``,
    exit status 2, and no usage block (``--help`` still shows it). Sub-command parsers are of the
    same class (argparse makes them of the parent's class)."""

    def error(self, message):
        err = sys.exc_info()[1]  # argparse calls error(str(err)) while handling the ArgumentError
        if isinstance(err, argparse.ArgumentError) and err.argument_name and message == str(err):
            name = err.argument_name
            if all(part.startswith("-") for part in name.split("/")):
                name = max(name.split("/"), key=len)  # -n/--workers -> --workers
            cause = err.__context__
            if isinstance(cause, OptionValueError):
                message = f"{name} {cause.shown}: {cause.problem}"
            else:
                message = f"{name}: {err.message}"
        self.refuse(message)

    def refuse(self, message):
        """Print ``mxvision: error: MESSAGE`` (one line) and exit with status 2."""
        self.exit(EXIT_USER_ERROR, f"mxvision: error: {single_line(message)}\n")


def build_parser(groups):
    """The ``mxvision`` parser with the commands of ``groups`` (modules with ``add_parsers``)."""
    parser = CommandLineParser(
        prog="mxvision",
        description="Chest X-ray transfer learning (Xvision) and torchxrayvision-style models in MXNet.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in groups:
        group.add_parsers(sub)
    return parser


def parse_arguments(parser, argv=None):
    """Parse ``argv`` and run the command's :func:`add_check` checks; a refused command line
    exits with status 2 and one error line (SystemExit), having touched nothing."""
    args = parser.parse_args(argv)
    for check in getattr(args, "argument_checks", ()):
        problem = check(args)
        if problem:
            parser.refuse(problem)
    return args


def run_command_line(groups, argv=None):
    """Parse ``argv`` with the commands of ``groups``, run the command, return its exit code."""
    args = parse_arguments(build_parser(groups), argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="mxvision: %(message)s")
    try:
        return args.func(args) or 0
    except MxvisionError as err:
        print(f"mxvision: error: {single_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("mxvision: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:  # disk full, permission denied on an output folder, ...
        where = err.filename or "mxvision"
        print(f"mxvision: error: {single_line(where)}: {err.strerror or err}", file=sys.stderr)
        return EXIT_USER_ERROR


def add_ctx(parser):
    """``--ctx``: the device a command runs its network on."""
    parser.add_argument("--ctx", type=ctx_spec, default="auto", help=CTX_HELP)


def best_epoch_summary(state):
    """``best epoch N: val accuracy A, val AUC B`` of a training run's state."""
    best = next(r for r in state["history"] if r["epoch"] == state["best_epoch"])
    return (f"best epoch {best['epoch']}: val accuracy {best['val_accuracy']:.3f}, "
            f"val AUC {best['val_auc']:.3f}")


# ------------------------------------------------------------------------- extract
def add_extract_options(p):
    """The options of ``extract`` and ``cluster extract``."""
    p.add_argument("--index", type=non_empty, required=True,
                   help="index CSV (path,label[,patient_id,split,view]) or a folder per class")
    p.add_argument("--out", type=non_empty, required=True, help="feature store folder")
    p.add_argument("--backbone", type=non_empty, default="resnet50_v2")
    p.add_argument("--cut", type=non_empty, default="stage4_unit2_relu1", help="layer whose output is the feature")
    p.add_argument("--weights", type=non_empty, default="imagenet",
                   help="imagenet | none (random) | PATH to a .params file")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="continue with random weights when ImageNet weights cannot be had")
    p.add_argument("--preset", type=non_empty, default=None,
                   help="preprocessing preset (imagenet224, xrv224, xrv512; default: the backbone's own)")
    p.add_argument("--batch-size", type=positive_int(), default=16)
    p.add_argument("--shard-size", type=positive_int(), default=256, help="images per feature shard file")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="discard features of another configuration in --out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                   help="compute precision; bfloat16 and int8 (calibrated, oneDNN/VNNI) run on the CPU "
                        "only (default: float32)")
    p.add_argument("--calibration", type=non_empty, default=None, metavar="INDEX_OR_FOLDER",
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
#: ``--batch-size`` of training: see :data:`MIN_TRAIN_BATCH`.
train_batch = Number(int, f"must be an integer of at least {MIN_TRAIN_BATCH} (BatchNorm on a batch "
                          "of one sample outputs its bias, so nothing before it would learn)",
                     low=MIN_TRAIN_BATCH, high=MAX_INT)


def label_names(text):
    """``--labels``: ``all`` or ``NAME,NAME,...`` (distinct names, none empty); whether the
    feature store has them is checked when it is opened
    (:func:`mxvision.train.multilabel.choose_labels`)."""
    text = str(text).strip()
    if text == "all":
        return text
    names = [n.strip() for n in text.split(",")]
    if not text or not all(names):
        raise OptionValueError(text, "expected all or pathology names separated by commas "
                                     "(e.g. Nodule,Effusion)")
    if len(set(names)) != len(names):
        raise OptionValueError(text, "names a pathology twice")
    return ",".join(names)


def _labels_on_one_machine(args):
    if getattr(args, "labels", None) is not None and args.command != "train":
        return "--labels: multi-label training runs on one machine (`mxvision train`)"
    return None


def add_train_options(p, batch_size_help=None, calibrate=False):
    """The options of ``train`` and ``cluster train`` (whose batch is split over the workers);
    ``calibrate``: also ``--calibrate`` (``train`` only: the distributed trainer does not fit one)."""
    p.add_argument("--features", type=non_empty, required=True)
    p.add_argument("--out", type=non_empty, required=True, help="run folder (checkpoints, logs, curves)")
    p.add_argument("--epochs", type=positive_int(), default=20)
    p.add_argument("--lr", type=positive_float(), default=0.01)
    p.add_argument("--batch-size", type=train_batch, default=32,
                   help=batch_size_help or "samples per SGD step, at least 2 (default: 32)")
    p.add_argument("--momentum", type=fraction, default=0.0, help="SGD momentum, in [0, 1) (original: none)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds checkpoints")
    p.add_argument("--keep-checkpoints", type=non_negative_int(), default=3,
                   help="epoch checkpoints to keep (~200 MB each for the ResNet-50 head; 0 = all)")
    if calibrate:
        p.add_argument("--calibrate", choices=["platt", "isotonic"], default=None,
                       help="fit a probability calibrator on the validation split after training "
                            "(Platt's sigmoid or isotonic regression); predict, evaluate, export and "
                            "the served archive apply it")
    p.add_argument("--labels", type=label_names, default=None, metavar="all|NAME,NAME",
                   help="train one sigmoid output per pathology target of the store (all: every one "
                        "it has) with a binary cross-entropy that skips missing labels "
                        "(default: the softmax task of the label column)")
    add_check(p, _labels_on_one_machine)
    p.add_argument("--quiet", action="store_true")
    add_ctx(p)


def train_options(args):
    """The keyword arguments of :func:`mxvision.train.loop.train_head` (and of the distributed
    training) from :func:`add_train_options`' options; features and out aside."""
    return dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, momentum=args.momentum,
                seed=args.seed, ctx=args.ctx, resume=not args.no_resume, progress=not args.quiet,
                keep_checkpoints=args.keep_checkpoints,
                **({"calibrate": args.calibrate} if getattr(args, "calibrate", None) else {}),
                # only when given: `cluster train` takes none (refused while parsing)
                **({"labels": args.labels} if getattr(args, "labels", None) is not None else {}))


# ------------------------------------------------------------------------- finetune
def add_finetune_options(p):
    """The options of ``finetune`` and ``cluster finetune``."""
    p.add_argument("--run", type=non_empty, required=True,
                   help="a run trained with `mxvision train` (the starting head)")
    p.add_argument("--out", type=non_empty, required=True, help="new run folder")
    p.add_argument("--stages", type=positive_int(), default=1, help="how many last residual stages to train")
    p.add_argument("--epochs", type=positive_int(), default=5)
    p.add_argument("--lr", type=positive_float(), default=0.001)
    p.add_argument("--batch-size", type=train_batch, default=8,
                   help="images per SGD step, at least 2 per worker (default: 8)")
    p.add_argument("--momentum", type=fraction, default=0.9, help="SGD momentum, in [0, 1) (default 0.9)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    add_ctx(p)


def finetune_options(args):
    """The keyword arguments of :func:`mxvision.train.finetune.finetune_run` from
    :func:`add_finetune_options`' options; run and out aside."""
    return dict(stages=args.stages, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                momentum=args.momentum, seed=args.seed, ctx=args.ctx, resume=not args.no_resume,
                progress=not args.quiet)
