"""Starting MXNet parameter-server jobs: a local cluster to try them, MXNet's launcher for hosts.

A distributed MXNet job is a *scheduler*, one or more *servers* and N *workers*; each process
learns its role and the scheduler's address from environment variables (DMLC_ROLE,
DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT, DMLC_NUM_WORKER, DMLC_NUM_SERVER). A process that imports
mxnet with DMLC_ROLE=scheduler or server runs that role's loop inside the import and then exits
(mxnet/kvstore/kvstore_server.py), so those two roles need no script: ``python -c "import mxnet"``.

:func:`run_local` starts them all on 127.0.0.1 with a free port. ps-lite detects no failures:
when a worker dies, the others wait in their next barrier or push forever and the scheduler and
servers never exit. So every process goes into one new process group, the launcher watches
them, and on the first failure, at the timeout or when interrupted it kills the whole group
(with any decode processes a worker started) and checks that no member is left.

:func:`run_mxnet_launcher` runs MXNet's own ``tools/launch.py`` (ssh, mpi, sge, yarn or local),
which the 1.9.1 wheel ships; its ``dmlc_tracker`` calls ``Thread.isAlive``, removed in Python 3.9
(fixed in dmlc/dmlc-core#665, after MXNet 1.9.1), so on Python 3.11 it crashes right after
starting the scheduler and leaves it running. This restores the old alias first. This module
imports no MXNet: the launcher stays light, and never forks a process with MXNet threads.
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mxvision.errors import MxvisionError

# scheduler / server: the loop runs in MXNet's import; mxvision first, for its MXNet compatibility
ROLE_COMMAND = [sys.executable, "-c", "import mxvision, mxnet"]
TERM_GRACE = 2.0  # seconds between SIGTERM and SIGKILL when stopping the group


class ClusterError(MxvisionError):
    """A local cluster that failed (a process exited non-zero, or the timeout passed); stopped."""

    def __init__(self, subject, problem, log_dir=None, pgid=None, codes=None):
        super().__init__(subject, problem)
        self.log_dir, self.pgid, self.codes = log_dir, pgid, codes or {}


@dataclass
class ClusterResult:
    codes: dict  # process name -> exit code (negative: killed by that signal)
    seconds: float
    log_dir: Path
    pgid: int
    leftovers: list = field(default_factory=list)  # scheduler/servers that had to be killed at the end


def free_port(host="127.0.0.1"):
    """A TCP port free on ``host`` now (the scheduler binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def live_members(pgid):
    """PIDs of the processes of group ``pgid`` that still run (zombies excluded), from /proc."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            pids.append(int(entry.name))
    return pids


def resolve_command(command):
    """``mxvision ...`` runs with this interpreter (the same virtual environment)."""
    command = [str(c) for c in command]
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise MxvisionError("cluster", "no worker command given (e.g. -- mxvision cluster extract ...)")
    if command[0] == "mxvision":
        command = [sys.executable, "-m", "mxvision"] + command[1:]
    return command


def _in_group(pgid):
    """Popen arguments putting the child in process group ``pgid`` (0: a new one it leads) before
    it runs anything: ``process_group`` from Python 3.11 on (no Python code between fork and
    exec), ``preexec_fn`` before."""
    if sys.version_info >= (3, 11):
        return {"process_group": pgid}
    return {"preexec_fn": lambda: os.setpgid(0, pgid)}


def _describe(code):
    return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"


def _last_line(log_dir, name):
    """`` ("<its last log line>")`` for the one-line error, when the process logged to a file."""
    try:
        lines = (Path(log_dir) / f"{name}.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return f' ("{lines[-1].strip()[:300]}")' if lines else ""


def _stop(pgid, procs):
    """SIGTERM the group, SIGKILL it after TERM_GRACE, reap our children, wait until none is left."""
    for sig, wait in ((signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, 10.0)):
        if not live_members(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while live_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
    for _, proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # cannot happen after SIGKILL unless the kernel is stuck
            pass
    return live_members(pgid)


def run_local(command, workers=2, servers=1, timeout=None, log_dir=None, env=None,
              host="127.0.0.1", worker_output="file", grace=15.0, poll=0.1):
    """Run ``command`` as ``workers`` workers of a local cluster with ``servers`` servers.

    Every process logs to ``log_dir`` (default: a new temporary folder), workers to
    ``worker-<i>.log`` unless ``worker_output="inherit"`` (this terminal). Workers get
    ``MXVISION_WORKER_INDEX`` (launch order; their kvstore rank may differ), ``PYTHONUNBUFFERED``
    and, unless ``env`` or the environment sets it, ``OMP_NUM_THREADS`` = cores / workers.
    Returns a :class:`ClusterResult` when every worker exited 0; otherwise raises
    :class:`ClusterError` after stopping every process of the job (also on KeyboardInterrupt).
    """
    if workers < 1 or servers < 1:
        raise MxvisionError("cluster", f"need at least one worker and one server, not {workers}/{servers}")
    if timeout is not None and timeout <= 0:
        raise MxvisionError("cluster", f"timeout must be positive, not {timeout}")
    command = resolve_command(command)
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="mxvision-cluster-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DMLC_", "PS_"))}
    base.update(env or {})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    base.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))
    base.update(DMLC_PS_ROOT_URI=host, DMLC_PS_ROOT_PORT=str(free_port(host)), DMLC_NODE_HOST=host,
                DMLC_NUM_WORKER=str(workers), DMLC_NUM_SERVER=str(servers), PYTHONUNBUFFERED="1")
    roles = [("scheduler", "scheduler", ROLE_COMMAND)] + \
            [(f"server-{i}", "server", ROLE_COMMAND) for i in range(servers)] + \
            [(f"worker-{i}", "worker", command) for i in range(workers)]
    procs, pgid, files = [], None, []
    started = time.monotonic()
    deadline = started + timeout if timeout else None
    try:
        for name, role, cmd in roles:
            role_env = dict(base, DMLC_ROLE=role)
            if role == "worker":
                role_env["MXVISION_WORKER_INDEX"] = name.split("-")[1]
            else:
                role_env["OMP_NUM_THREADS"] = "1"
            out = None
            if role != "worker" or worker_output == "file":
                out = open(log_dir / f"{name}.log", "wb")
                files.append(out)
            proc = subprocess.Popen(cmd, env=role_env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT if out else None,
                                    **_in_group(0 if pgid is None else pgid))
            pgid = proc.pid if pgid is None else pgid
            procs.append((name, proc))
        worker_procs = [p for name, p in procs if name.startswith("worker")]
        roles_done_at = None
        while True:
            codes = {name: p.poll() for name, p in procs}
            bad = [(n, c) for n, c in codes.items() if c not in (None, 0)
                   and (n.startswith("worker") or any(w.poll() is None for w in worker_procs))]
            if bad:
                name, code = bad[0]
                raise ClusterError("cluster", f"{name} {_describe(code)} after "
                                   f"{time.monotonic() - started:.1f} s{_last_line(log_dir, name)}; "
                                   f"stopped the job (logs: {log_dir})", log_dir, pgid, codes)
            if all(c == 0 for n, c in codes.items() if n.startswith("worker")):
                break
            if roles_done_at is None and any(c is not None for n, c in codes.items()
                                             if not n.startswith("worker")):
                roles_done_at = time.monotonic()
            if roles_done_at is not None and time.monotonic() - roles_done_at > grace:
                raise ClusterError("cluster", f"the scheduler or a server ended while workers still "
                                   f"ran; stopped the job (logs: {log_dir})", log_dir, pgid, codes)
            if deadline is not None and time.monotonic() > deadline:
                raise ClusterError("cluster", f"timed out after {timeout:g} s; stopped the job "
                                   f"(logs: {log_dir})", log_dir, pgid, codes)
            time.sleep(poll)
        # The workers are done: rank 0 told the servers to stop, the scheduler follows.
        end = time.monotonic() + grace
        while any(p.poll() is None for _, p in procs) and time.monotonic() < end:
            time.sleep(poll)
        leftovers = [name for name, p in procs if p.poll() is None]
        return ClusterResult({name: p.poll() for name, p in procs}, round(time.monotonic() - started, 3),
                             log_dir, pgid, leftovers)
    finally:
        if pgid is not None:
            left = _stop(pgid, procs)
            if left:  # only a process in uninterruptible sleep survives SIGKILL
                print(f"mxvision: warning: processes {left} of group {pgid} outlived SIGKILL",
                      file=sys.stderr)
        for f in files:
            f.close()


def mxnet_launcher_path():
    """MXNet's tools/launch.py, as shipped in the installed wheel."""
    import importlib.util
    spec = importlib.util.find_spec("mxnet")  # locates the package without importing it
    path = Path(spec.origin).parent / "tools" / "launch.py" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise MxvisionError("mxnet/tools/launch.py", "not in the installed MXNet; install the PyPI wheel")
    return path


def run_mxnet_launcher(argv):
    """Run MXNet's launch.py with ``argv`` (its own options, then the command), in this process."""
    import runpy
    path = mxnet_launcher_path()
    if not hasattr(threading.Thread, "isAlive"):  # removed in Python 3.9; dmlc_tracker calls it
        threading.Thread.isAlive = threading.Thread.is_alive
    saved = sys.argv
    sys.argv = [str(path)] + [str(a) for a in argv]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved
