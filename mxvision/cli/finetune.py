"""``mxvision finetune``: train the last backbone stages and the head end to end from images."""


def _cmd_finetune(args):
    from mxvision.train.finetune import finetune_run
    state = finetune_run(args.run, args.out, stages=args.stages, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, momentum=args.momentum, seed=args.seed,
                         ctx=args.ctx, resume=not args.no_resume, progress=not args.quiet)
    best = next(r for r in state["history"] if r["epoch"] == state["best_epoch"])
    print(f"best epoch {best['epoch']}: val accuracy {best['val_accuracy']:.3f}, "
          f"val AUC {best['val_auc']:.3f}; fine-tuned run in {args.out}")


def add_parsers(sub):
    p = sub.add_parser("finetune", help="fine-tune the last backbone stage(s) + head of a run, from images")
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
    p.add_argument("--ctx", default="auto", help="auto (GPU if MXNet sees one), cpu, gpu or gpu:N")
    p.set_defaults(func=_cmd_finetune)
