"""``mxvision finetune``: train the last backbone stages and the head end to end from images."""
from mxvision.cli.common import add_finetune_options, best_epoch_summary, finetune_options


def _cmd_finetune(args):
    from mxvision.train.finetune import finetune_run
    state = finetune_run(args.run, args.out, **finetune_options(args))
    print(f"{best_epoch_summary(state)}; fine-tuned run in {args.out}")


def add_parsers(sub):
    """The ``finetune`` command (its data-parallel twin is ``mxvision cluster finetune``)."""
    p = sub.add_parser("finetune", help="fine-tune the last backbone stage(s) + head of a run, from images")
    add_finetune_options(p)
    p.set_defaults(func=_cmd_finetune)
