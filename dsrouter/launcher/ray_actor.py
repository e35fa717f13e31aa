"""The Ray actor that hosts one worker slot on its node (`backend = "ray"`).

The router creates one detached, named actor per slot (`ray_backend.py`); Ray runs this
class in a worker process on the node of the slot's placement-group bundle. The actor:

* **holds its ports.** `__init__` binds the HTTP port (with HTTP port + 1 for the worker's
  broker), the master and the scheduler port on the wildcard address with port 0, so the
  kernel picks free ones, and keeps those sockets bound (never listening) for the actor's
  whole life. The server binds the same ports with SO_REUSEADDR, which Linux allows next to
  a bound socket that does not listen, while nothing else on the node can take them: no
  probe-then-bind race, and a server restarted by the same actor gets the same URL.
* **runs the server through the group keeper** (`groupkeeper.py`), in a process group of its
  own, with `CUDA_VISIBLE_DEVICES` set from `ray.get_gpu_ids()`. The keeper ends the group
  (SIGTERM, then SIGKILL after `stop_timeout_s`) when `stop` asks or when this process dies.
  It is spawned from one long-lived thread (`_spawner`), because its parent-death signal
  fires when the *thread* that forked it exits.
* **keeps the output.** Lines go to `<log_dir>/worker-<i>.log` on the node (rotated like the
  local backend's) or, without `log_dir`, to this actor's stdout, which Ray writes to its
  own log files and forwards to the router's output; the last lines of the current run are
  kept for `tail`, to explain an exit during start-up.

Its methods are called concurrently (a threaded actor): `wait_exit` blocks while `describe`
or `stop` run. Nothing here imports ray at module level, so the module loads without it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs

from dsrouter.config import LauncherConfig
from dsrouter.launcher.logs import TAIL_LINES, RotatingFile
from dsrouter.launcher.plan import worker_argv
from dsrouter.launcher.ports import WorkerPorts
from dsrouter.units import MiB

KEEPER = "dsrouter.launcher.groupkeeper"
KILL_GRACE_S = 10.0
"""Beyond `stop_timeout_s`, how long the keeper may take to end the group before the actor
SIGKILLs both groups itself."""
PORT_TRIES = 50


def describe_status(code: int | None) -> str:
    """The keeper's exit status as the operator reads it (128 + N: killed by signal N)."""
    if code is None:
        return "still running"
    if code > 128:
        try:
            return f"killed by {signal.Signals(code - 128).name}"
        except ValueError:
            return f"killed by signal {code - 128}"
    if code < 0:
        return f"keeper killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def reserve_ports() -> tuple[WorkerPorts, list[socket.socket]]:
    """Free ports for one worker, each held by a bound socket that the caller keeps open."""
    held: list[socket.socket] = []

    def hold(port: int) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            sock.close()
            return None
        return sock

    for _ in range(PORT_TRIES):
        http = hold(0)
        assert http is not None
        broker = hold(http.getsockname()[1] + 1)
        if broker is not None:
            held += [http, broker]
            break
        http.close()
    else:
        raise OSError(f"no two consecutive free ports found in {PORT_TRIES} tries")
    for _ in range(2):
        sock = hold(0)
        assert sock is not None
        held.append(sock)
    http_port, _, master, scheduler = (sock.getsockname()[1] for sock in held)
    return WorkerPorts(http=http_port, master=master, scheduler=scheduler), held


@attrs.define
class _Run:
    """One server started by this actor: the keeper, the server behind it, how it ended."""

    number: int
    settings: tuple[tuple[str, ...], dict[str, str]]
    """The command line and `launcher.env` it was started with."""
    keeper: subprocess.Popen[bytes]
    server_pid: int
    exited: threading.Event = attrs.Factory(threading.Event)
    status: str | None = None


class WorkerHost:
    """One worker slot on a Ray node (made a Ray actor by `ray_backend`, not here)."""

    def __init__(self, index: int, log_dir: str, log_max_mb: int) -> None:
        import ray

        self.index = index
        self.node_ip = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.gpus = [str(gpu) for gpu in ray.get_gpu_ids()]
        self.ports, self._held = reserve_ports()
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="dsrouter-spawner")
        self._lock = threading.Lock()
        self._run: _Run | None = None
        self._runs = 0
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._file: RotatingFile | None = None
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._file = RotatingFile(Path(log_dir) / f"worker-{index}.log", log_max_mb * MiB)

    def url(self) -> str:
        return f"http://{self.node_ip}:{self.ports.http}"

    def describe(self) -> dict[str, Any]:
        """Where this slot runs and what its server is doing (the router polls this)."""
        run = self._run
        return {
            "url": self.url(),
            "node_ip": self.node_ip,
            "node_id": self.node_id,
            "gpus": self.gpus,
            "actor_pid": os.getpid(),
            "run": None if run is None else run.number,
            "pid": None if run is None or run.exited.is_set() else run.server_pid,
            "keeper_pid": None if run is None or run.exited.is_set() else run.keeper.pid,
            "log_file": None if self._file is None else str(self._file.path),
        }

    def start(self, cfg: LauncherConfig) -> dict[str, Any]:
        """Have the server run with `cfg`; `describe()` afterwards, plus `adopted`.

        A server that already runs this command line and environment is kept (`adopted`:
        a restarted router re-attaching); one started with other settings is stopped first.
        Raises `OSError` only when Python itself cannot be started (a missing command is
        the keeper's early exit).
        """
        argv = worker_argv(attrs.evolve(cfg, worker_host=self.node_ip), self.ports)
        settings = (argv, dict(cfg.env))
        with self._lock:
            run = self._run
            if run is not None and not run.exited.is_set():
                if run.settings == settings:
                    return {**self.describe(), "adopted": True}
                self._end(run, cfg.stop_timeout_s)
            self._run = self._spawner.submit(self._spawn, settings, cfg).result()
        return {**self.describe(), "adopted": False}

    def _spawn(self, settings: tuple[tuple[str, ...], dict[str, str]], cfg: LauncherConfig) -> _Run:
        argv, _ = settings
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **cfg.env}
        env["DSROUTER_KEEPER_PARENT"] = str(os.getpid())
        if cfg.num_gpus_per_worker:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        pid_read, pid_write = os.pipe()
        out_read, out_write = os.pipe()
        try:
            keeper = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    KEEPER,
                    str(cfg.stop_timeout_s),
                    str(pid_write),
                    "--",
                    *argv,
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out_write,
                stderr=out_write,
                pass_fds=(pid_write,),
                start_new_session=True,
            )
        finally:
            os.close(pid_write)
            os.close(out_write)
        with os.fdopen(pid_read) as pid_file:
            line = pid_file.readline()
        self._runs += 1
        run = _Run(self._runs, settings, keeper, int(line) if line.strip() else -1)
        self.tail.clear()
        self._emit(f"starting worker {self.index} on {self.node_ip}: {' '.join(argv)}\n")
        threading.Thread(target=self._pump, args=(out_read,), daemon=True).start()
        threading.Thread(target=self._reap, args=(run,), daemon=True).start()
        return run

    def _pump(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as output:
            for raw in output:
                self._emit(raw.decode(errors="replace"))

    def _emit(self, line: str) -> None:
        self.tail.append(line.rstrip("\n"))
        if self._file is not None:
            self._file.write(line.encode())
        else:
            sys.stdout.write(f"[worker {self.index}] {line}")
            sys.stdout.flush()

    def _reap(self, run: _Run) -> None:
        code = run.keeper.wait()
        run.status = describe_status(code)
        run.exited.set()

    def wait_exit(self, run: int, timeout_s: float) -> str | None:
        """How run number `run` ended, once it has; None if it still runs after `timeout_s`."""
        current = self._run
        if current is None or current.number != run:
            return "replaced by a later run"
        if current.exited.wait(timeout_s):
            return current.status
        return None

    def stop(self, timeout_s: float) -> str | None:
        """End the server's group (through its keeper); how it ended, None if nothing ran."""
        run = self._run
        if run is None:
            return None
        self._end(run, timeout_s)
        return run.status

    def _end(self, run: _Run, timeout_s: float) -> None:
        if not run.exited.is_set():
            run.keeper.send_signal(signal.SIGTERM)
            if not run.exited.wait(timeout_s + KILL_GRACE_S):
                for group in (run.server_pid, run.keeper.pid):
                    if group > 0:  # -1: the keeper never started the server
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(group, signal.SIGKILL)
                run.exited.wait(KILL_GRACE_S)

    def output_tail(self) -> list[str]:
        return list(self.tail)
