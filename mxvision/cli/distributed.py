"""``mxvision cluster``: the command line of :mod:`mxvision.distributed`, i.e. data-parallel
extraction, head training and fine-tuning on MXNet's parameter server.

One feature, one package, one command: :mod:`mxvision.distributed.cluster` starts the scheduler,
server and worker processes; :mod:`mxvision.distributed.kvstore` gives each worker its kvstore and
its share of an extraction; :mod:`mxvision.distributed.train` trains the head data-parallel
(fine-tuning is :func:`mxvision.train.finetune.finetune_run` given a kvstore).

    mxvision cluster local -n 2 -s 1 -- mxvision cluster extract --index I.csv --out F
    mxvision cluster local -n 2 -- mxvision cluster train --features F --out RUN
    mxvision cluster extract --index I.csv --out F --share 1/2   # re-run a lost share alone
    mxvision cluster merge --out F --workers 2
    mxvision cluster local -n 2 -- mxvision cluster finetune --run RUN --out FT
    mxvision cluster launch -n 4 -s 2 -H hosts --launcher ssh -- /venv/bin/mxvision cluster train ...

``extract``, ``train`` and ``finetune`` take the options of the plain commands (``cli/common.py``);
under a launcher each process runs its share. A failing worker exits at once (``os._exit``): a
normal exit would wait in ps-lite's shutdown barrier for workers that are waiting for it, i.e.
forever.
"""
import argparse
import os
import signal
import sys
import traceback

from mxvision.errors import MxvisionError
from mxvision.cli.common import (EXIT_INTERRUPTED, add_extract_options, add_finetune_options,
                                 add_train_options, best_epoch_summary, extract_options,
                                 finetune_options, non_empty, non_negative_float, positive_int,
                                 run_command_line, seconds, train_options)

KVSTORES = ["dist_sync", "dist_device_sync"]
#: Most workers (or servers) a local cluster starts, or a simulation runs.
MAX_PROCESSES = 1024


def _as_worker(job):
    """Run a launched worker's job; on any error leave at once with a non-zero status."""
    from mxvision.distributed.kvstore import in_cluster
    if not in_cluster():
        return job()
    try:
        return job()
    except MxvisionError as err:
        print(f"mxvision: error: worker: {err}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except BaseException:  # a bug: show it, still do not hang the job
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cmd_local(args):
    from mxvision.distributed.cluster import run_local
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the job when we are stopped
    result = run_local(args.command, workers=args.workers, servers=args.servers, timeout=args.timeout,
                       log_dir=args.log_dir, worker_output="file" if args.log_dir else "inherit")
    print(f"cluster: {args.workers} worker(s) and {args.servers} server(s) finished in "
          f"{result.seconds:.1f} s (logs: {result.log_dir})")
    if result.leftovers:
        print(f"cluster: warning: {', '.join(result.leftovers)} did not exit by themselves; stopped",
              file=sys.stderr)
    odd = {name: code for name, code in result.codes.items() if code}
    if odd:
        print(f"cluster: warning: after the workers finished: {odd} (exit codes)", file=sys.stderr)


def _cmd_launch(args):
    from mxvision.distributed.cluster import run_mxnet_launcher
    argv = args.launch_args[1:] if args.launch_args[:1] == ["--"] else args.launch_args
    run_mxnet_launcher(argv)


def _cmd_extract(args):
    from mxvision.distributed import kvstore as distributed
    if args.share:
        rank, n = distributed.parse_share(args.share)
        store = distributed.extract_share(args.index, args.out, rank, n, **extract_options(args))
        done = "nothing to do" if store is None else f"{store.manifest['n_features']} feature maps"
        print(f"share {rank}/{n}: {done}; once every share is done: "
              f"mxvision cluster merge --out {args.out} --workers {n}")
        return

    def job():
        kv = distributed.worker_kvstore(args.kvstore)
        m = distributed.extract_distributed(args.index, args.out, kv=kv, **extract_options(args)).manifest
        if kv.rank == 0:
            print(f"{m['n_features']} feature maps {tuple(m['feature_shape'])} in {args.out} "
                  f"({m['n_skipped']} skipped), extracted by {kv.num_workers} workers")
    _as_worker(job)


def _cmd_merge(args):
    from mxvision.distributed.kvstore import merge_shares
    m = merge_shares(args.out, args.workers).manifest
    print(f"{m['n_features']} feature maps in {args.out} ({m['n_skipped']} skipped)")


def _cmd_train(args):
    from mxvision.distributed import kvstore as distributed
    stream = {"auto": "auto", "yes": True, "no": False}[args.stream]

    def job():
        kv = None if args.simulate else distributed.worker_kvstore(args.kvstore)
        from mxvision.distributed.train import train_distributed
        state = train_distributed(args.features, args.out, kv=kv, simulate=args.simulate,
                                  wd=args.wd, stream=stream, **train_options(args))
        if state.get("best_epoch"):
            print(f"{best_epoch_summary(state)}; run in {args.out}")
    _as_worker(job)


def _cmd_finetune(args):
    from mxvision.distributed import kvstore as distributed
    from mxvision.train.finetune import finetune_run

    def job():
        kv = distributed.worker_kvstore(args.kvstore)
        state = finetune_run(args.run, args.out, kvstore=kv, **finetune_options(args))
        if kv.rank == 0 and state.get("best_epoch"):
            print(f"best epoch {state['best_epoch']} of {kv.num_workers} workers' fine-tuning; "
                  f"run in {args.out}")
    _as_worker(job)


def add_parsers(sub):
    """``mxvision cluster {local,launch,extract,merge,train,finetune}``."""
    group = sub.add_parser("cluster", help="distributed extraction/training on MXNet's parameter server")
    csub = group.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND")
    csub.required = True

    p = csub.add_parser("local", help="run a command as N workers of a local cluster (scheduler and "
                        "servers on 127.0.0.1); stops every process when one fails")
    p.add_argument("-n", "--workers", type=positive_int(MAX_PROCESSES), default=2)
    p.add_argument("-s", "--servers", type=positive_int(MAX_PROCESSES), default=1)
    p.add_argument("--timeout", type=seconds(zero=False), default=None,
                   help="seconds before the whole job is stopped")
    p.add_argument("--log-dir", type=non_empty, default=None, help="write each process's output to this folder "
                   "(default: workers print here, scheduler/server logs go to a temporary folder)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the worker command")
    p.set_defaults(func=_cmd_local)

    p = csub.add_parser("launch", help="MXNet's tools/launch.py (ssh, mpi, sge, yarn, local), "
                        "working on Python >= 3.9", add_help=False)
    p.add_argument("launch_args", nargs=argparse.REMAINDER,
                   help="launch.py's options (-n, -s, -H, --launcher, ...) then the command")
    p.set_defaults(func=_cmd_launch)

    p = csub.add_parser("extract", help="a worker's share of a distributed extraction (or --share R/N alone)")
    add_extract_options(p)
    p.add_argument("--share", type=non_empty, default=None, metavar="R/N",
                   help="extract share R of N without a cluster (e.g. to re-run a lost worker's share)")
    p.add_argument("--kvstore", default="dist_sync", choices=KVSTORES)
    p.set_defaults(func=_cmd_extract)

    p = csub.add_parser("merge", help="merge the finished shares of OUT into one feature store")
    p.add_argument("--out", type=non_empty, required=True, help="the feature store folder (holding shares/)")
    p.add_argument("--workers", type=positive_int(), required=True, help="N of the shares R-of-N")
    p.set_defaults(func=_cmd_merge)

    p = csub.add_parser("train", help="data-parallel head training (every worker runs it), or --simulate N")
    add_train_options(p, batch_size_help="global batch, split evenly over the workers (default: 32)")
    p.add_argument("--wd", type=non_negative_float(), default=0.0, help="weight decay")
    p.add_argument("--simulate", type=positive_int(MAX_PROCESSES), default=None, metavar="N",
                   help="no cluster: run N workers' arithmetic in this process (the reference)")
    p.add_argument("--stream", choices=["auto", "yes", "no"], default="auto",
                   help="stream each worker's shards instead of loading them (auto: above 1 GiB)")
    p.add_argument("--kvstore", default="dist_sync", choices=KVSTORES)
    p.set_defaults(func=_cmd_train)

    p = csub.add_parser("finetune", help="data-parallel fine-tuning: each worker takes its slice of every batch")
    add_finetune_options(p)
    p.add_argument("--kvstore", default="dist_sync", choices=KVSTORES)
    p.set_defaults(func=_cmd_finetune)


if __name__ == "__main__":  # `python -m mxvision.cli.distributed ...` == `mxvision cluster ...`
    sys.exit(run_command_line([sys.modules[__name__]], ["cluster"] + sys.argv[1:]))
