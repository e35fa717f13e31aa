"""Worker processes that outlive one test: the simulated worker and the real `sglang serve`.

pytest-trio runs every test in its own trio loop, so processes shared by several tests are
started here with plain `subprocess` from session or module fixtures, and stopped by the
PID we got back (their whole process group: a real worker spawns its scheduler). Nothing
here sleeps to synchronise: start-up is a poll of `/health` with a deadline.

The real worker is `sglang serve` 0.5.23 with the test plugin of the top-level `sglang/`
folder (`dsrouter-sglang-testplugin`, turned on by `DSROUTER_TEST_PLUGIN=1`), which swaps
the model pipeline for a tiny CPU one. Without sglang installed the real tests skip, unless
`DSROUTER_REQUIRE_SGLANG=1` (CI) makes that a failure.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import attrs
import httpx
import pytest

from tests.launcher.helpers import alive, free_port_block

REQUIRE_VAR = "DSROUTER_REQUIRE_SGLANG"
REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIST = "dsrouter-sglang-testplugin"
START_TIMEOUT_S = 180.0
"""A real worker starts in ~25 s on 2 idle cores; several at once on a busy CI machine take
longer, and a slow start is not what these tests are about."""
STOP_TIMEOUT_S = 20.0


def path_with_venv() -> str:
    """PATH with this interpreter's `bin` first, so `sglang` is found in an unactivated
    virtualenv too (the launcher runs `["sglang", "serve"]` from PATH)."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def sglang_missing() -> str | None:
    """Why the real worker cannot run here, or None when it can."""
    if shutil.which("sglang", path=path_with_venv()) is None:
        return "the `sglang` command is not installed (pip install -e '.[worker]')"
    try:
        importlib.metadata.version(PLUGIN_DIST)
    except importlib.metadata.PackageNotFoundError:
        return f"{PLUGIN_DIST} is not installed (pip install -e sglang/)"
    return None


def require_sglang() -> None:
    """Skip the calling test or fixture without sglang; fail instead under CI's flag."""
    reason = sglang_missing()
    if reason is None:
        return
    if os.environ.get(REQUIRE_VAR) == "1":
        pytest.fail(f"{REQUIRE_VAR}=1 but {reason}")
    pytest.skip(reason)


def plugin_env(step_s: float = 0.0, warmup_s: float = 0.0, load_s: float = 0.0) -> dict[str, str]:
    """The environment a real worker needs here: the plugin on, no model hub."""
    return {
        "DSROUTER_TEST_PLUGIN": "1",
        "DSROUTER_TEST_STEP_S": str(step_s),
        "DSROUTER_TEST_WARMUP_S": str(warmup_s),
        "DSROUTER_TEST_LOAD_S": str(load_s),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": path_with_venv(),
    }


def make_models(directory: Path) -> dict[str, Path]:
    """Weight-less model directories (`image`, `image-v2`, `video`, `video-v2`)."""
    from dsrouter_sglang_testplugin.models import make_models as make

    return make(directory)


@attrs.define
class Process:
    """A worker we started: its process group, its URL, what its start-up looked like."""

    popen: subprocess.Popen[bytes]
    url: str
    log: Path
    readiness: list[str] = attrs.Factory(list)
    """The distinct `/health` answers seen while starting, in order: `refused`,
    `503 empty`, `503 <json>`, `200`."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def children(self) -> list[int]:
        """PIDs of the worker's direct children (a real worker's scheduler)."""
        return children(self.pid)

    def stop(self) -> int | None:
        """SIGTERM the group, SIGKILL it after `STOP_TIMEOUT_S`; the exit status."""
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.popen.wait(STOP_TIMEOUT_S)
        _signal_group(self.pid, signal.SIGKILL)  # stragglers of the group, if any
        return self.popen.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def children(pid: int) -> list[int]:
    """Live direct children of `pid`, from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in task.read_text().split()]
        except OSError:
            continue
    return [child for child in found if alive(child)]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`."""
    below = children(pid)
    return below + [grandchild for child in below for grandchild in descendants(child)]


def schedulers(pid: int) -> list[int]:
    """The scheduler processes of the real worker `pid` (`sgl_diffusion::scheduler...`,
    the title sglang gives them; the multiprocessing helpers are left alone)."""
    found = []
    for child in children(pid):
        try:
            title = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"sgl_diffusion" in title:
            found.append(child)
    return found


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def spawn(
    argv: list[str],
    log: Path,
    url: str,
    env: Mapping[str, str] | None = None,
    in_log_dir: bool = True,
) -> Process:
    """Start `argv` in its own process group with output to `log` (not waited for).

    `in_log_dir`: run it in the log's directory, where a real worker leaves the files it
    writes relative to its working directory (uploads, outputs)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=log.parent if in_log_dir else None,
            start_new_session=True,
        )
    return Process(popen, url, log)


def wait_ready(processes: list[Process], timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll every `/health` until all answer 200, recording what each showed on the way.

    Fails (after stopping nothing: the caller's fixture owns the processes) when one exits
    or the deadline passes, with the tail of its log.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(processes)
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while pending:
            for process in list(pending):
                state = _health_state(client, process.url)
                if not process.readiness or process.readiness[-1] != state:
                    process.readiness.append(state)
                if state == "200":
                    pending.remove(process)
                elif process.popen.poll() is not None:
                    raise AssertionError(
                        f"{process.url} exited with {process.popen.returncode} while starting:"
                        f"\n{process.tail()}"
                    )
            if pending and time.monotonic() > deadline:
                raise AssertionError(
                    f"not ready within {timeout_s:g} s: "
                    + "; ".join(f"{p.url} {p.readiness}\n{p.tail()}" for p in pending)
                )
            if pending:
                time.sleep(0.05)  # a poll interval; readiness itself is the /health answer


def _health_state(client: httpx.Client, url: str) -> str:
    try:
        answer = client.get(f"{url}/health")
    except httpx.TransportError:
        return "refused"
    if answer.status_code == 503:
        return "503 " + (answer.text or "empty")
    return str(answer.status_code)


def real_worker_argv(model: Path, port: int, outputs: Path, *extra: str) -> list[str]:
    """`sglang serve` as the launcher runs it, on `port`, with internal ports after it."""
    return [
        "sglang",
        "serve",
        "--model-path",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--scheduler-port",
        str(port + 2),
        "--master-port",
        str(port + 3),
        "--strict-ports",
        "true",
        "--sleep-on-idle",
        "--output-path",
        str(outputs),
        *extra,
    ]


def start_real_workers(
    models: list[Path], directory: Path, env: Mapping[str, str]
) -> list[Process]:
    """Real workers, one per model, started together and waited for together."""
    processes = []
    for index, model in enumerate(models):
        port = free_port_block(4)
        home = directory / f"worker-{index}"
        argv = real_worker_argv(model, port, home / "outputs")
        processes.append(spawn(argv, home / "worker.log", f"http://127.0.0.1:{port}", env))
    try:
        wait_ready(processes)
    except BaseException:
        for process in processes:
            process.stop()
        raise
    return processes


def start_simworkers(arg_lists: list[list[str]], directory: Path) -> list[Process]:
    """Simulated workers (`python -m dsrouter.simworker ARGS`), waited for together."""
    processes = []
    for index, args in enumerate(arg_lists):
        port = free_port_block(2)
        argv = [sys.executable, "-m", "dsrouter.simworker", "--host", "127.0.0.1"]
        argv += ["--port", str(port), *args]
        log = directory / f"simworker-{index}" / "worker.log"
        # in this directory: `-m dsrouter.simworker` must import the dsrouter under test
        processes.append(spawn(argv, log, f"http://127.0.0.1:{port}", in_log_dir=False))
    try:
        wait_ready(processes, timeout_s=30.0)
    except BaseException:
        for process in processes:
            process.stop()
        raise
    return processes


def start_router(config: str, directory: Path, env: Mapping[str, str]) -> Process:
    """`dsrouter run --config` on an ephemeral port of 127.0.0.1; returns once it says
    `dsrouter ready` (with a `[launcher]`, once every launched worker is ready; it listens
    before that)."""
    path = directory / "router.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config)
    argv = [sys.executable, "-m", "dsrouter", "run", "--host", "127.0.0.1", "--port", "0"]
    # It runs in `directory` (so do the workers it launches, and what they write there), so
    # PYTHONPATH makes `-m dsrouter` import the dsrouter under test.
    env = {**env, "PYTHONPATH": str(REPO)}
    router = spawn([*argv, "--config", str(path)], directory / "router.log", "", env)
    marker = "dsrouter listening on "
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        lines = router.log.read_text(errors="replace").splitlines()
        for line in lines:
            if marker in line:
                router.url = line.split(marker, 1)[1].strip()
        if router.url and any("dsrouter ready: " in line for line in lines):
            break
        if router.popen.poll() is not None or time.monotonic() > deadline:
            router.stop()
            raise AssertionError(f"the router did not start:\n{router.tail(60)}")
        time.sleep(0.1)  # a poll interval of the log file
    return router
