"""``mxvision serve``: MXNet Model Server with mxvision model archives, and the page beside it."""
import signal
import time

from mxvision.errors import MxvisionError
from mxvision.cli.common import add_check, non_empty, non_negative_int, positive_int

#: MMS 1.1.11 refuses ports above 32766 ("Invalid port number"); the management API takes PORT+1
#: and the page PORT+2
MAX_PORT = 32764


def _cmd_serve(args):
    from mxvision.serve import server

    if args.stop:
        stopped = server.stop(args.port, args.state)
        print(f"stopped the server on port {args.port}" if stopped else
              f"no mxvision server was running on port {args.port}")
        return 0
    if not args.archives:
        raise MxvisionError("serve", "give the model archives to serve (NAME.mar, from "
                                     "`mxvision export --mar`)")
    running = server.start(args.archives, port=args.port, workers=args.workers,
                           batch_size=args.batch_size, max_batch_delay=args.max_batch_delay,
                           public=args.public, state_dir=args.state, page=not args.no_page,
                           max_image_bytes=args.max_image_mb << 20)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops the server as Ctrl-C does
    # Why the lines are printed inside the try: a Ctrl-C right after "logs:" (a script waiting for
    # that line) must stop the server too, not escape as an interrupted command
    try:
        if args.public:
            print("WARNING: the inference API listens on every interface and has no authentication; "
                  "put it behind a proxy that has")
        for name in running.models:
            print(f"model {name}: POST {running.inference_url}{name}")
        if running.page_url:
            print(f"web page: {running.page_url}")
        print(f"logs: {running.state / 'logs'}; Ctrl-C (or `mxvision serve --stop --port {args.port}`) stops it",
              flush=True)
        while running.process.poll() is None:
            time.sleep(0.5)
        print(f"the server stopped (exit status {running.process.returncode})")
    except KeyboardInterrupt:
        print("stopping the server")
    finally:
        running.stop()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _check_serve(args):
    if args.stop and args.archives:
        return "--stop takes no model archives (it stops the server on --port)"
    return None


def add_parsers(sub):
    p = sub.add_parser("serve", help="serve model archives with MXNet Model Server (and a web page)",
                       description="Start MXNet Model Server on 127.0.0.1 with mxvision model archives, "
                                   "wait until it is healthy, print the inference and page URLs, and "
                                   "stop it on Ctrl-C. Needs Java and `pip install mxvision[serve]`.")
    p.add_argument("archives", type=non_empty, nargs="*", metavar="MODEL.mar")
    p.add_argument("--port", type=positive_int(MAX_PORT, low=1024), default=8080,
                   help="inference API port (management: PORT+1, page: PORT+2; default 8080)")
    p.add_argument("--workers", type=positive_int(64), default=1, help="worker processes per model")
    p.add_argument("--batch-size", type=positive_int(256), default=1,
                   help="requests the server gathers into one forward pass (default 1)")
    p.add_argument("--max-batch-delay", type=non_negative_int(60_000), default=100, metavar="MS",
                   help="how long the server waits to fill a batch (milliseconds, default 100)")
    p.add_argument("--max-image-mb", type=positive_int(4096), default=64, metavar="MB",
                   help="largest image body a request may carry (default 64 MB; larger: HTTP 413)")
    p.add_argument("--public", action="store_true",
                   help="listen on every interface instead of 127.0.0.1 (no authentication!)")
    p.add_argument("--no-page", action="store_true", help="do not serve the web page")
    p.add_argument("--state", type=non_empty, metavar="DIR",
                   help="the server's config, logs and pid (default: TMPDIR/mxvision-serve-PORT)")
    p.add_argument("--stop", action="store_true", help="stop the server started on --port")
    add_check(p, _check_serve)
    p.set_defaults(func=_cmd_serve)
