"""Sweeps in a worker process, for the dashboard (whose scripts rerun on every click and must not
hold long work): start one, find its run in the database, follow it, stop it, and find it again
after a page reload or from another browser tab.

The worker is `mlxinfer bench` itself (`python -m mlxinfer bench ... --db DB`), so a sweep from the
dashboard is the same as one from the command line: every measurement committed as it is made, the
run resumable. Its output goes to a log file next to the database; the run row records its pid.

    job = start_sweep({"temperature": "0,0.7", "gen_tokens": "64"}, reps=3, db_path=path)
    run_id = job.run_id(db)        # None while the worker loads the model
    status(db.run(run_id))         # 'running', 'done', 'stopped', 'failed' or 'interrupted'
    stop(db.run(run_id))           # Ctrl-C: the worker marks the run stopped and exits
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .grid import AXES

_children: list[subprocess.Popen] = []  # workers this process started, reaped as they end


@dataclass
class Job:
    """A worker process started by `start_sweep`."""

    pid: int
    log: Path
    started: float
    process: subprocess.Popen | None = None  # only in the process that started it
    resume: int | None = None  # the run it continues

    def run_id(self, db) -> int | None:
        """The run the worker is measuring, once it has made (or taken up) it."""
        return db.run_of_process(self.pid, self.resume, self.started - 1)

    def exit_code(self) -> int | None:
        """The worker's exit status, or None while it runs."""
        if self.process is not None:
            return self.process.poll()
        return None if alive(self.pid) else -1

    def output(self, last: int = 4000) -> str:
        """The end of the worker's log (the error of a sweep refused before it ran)."""
        try:
            return self.log.read_text(errors="replace")[-last:]
        except OSError:
            return ""


def start_sweep(
    axes: dict[str, str],
    reps: int,
    db_path: str | Path,
    baseline: str | None = None,
    resume: int | None = None,
    target: str | None = None,
    api_key: str | None = None,
) -> Job:
    """Start `mlxinfer bench` on `axes` (axis -> comma list, as the flags take them) in a new
    process writing to `db_path`, measuring the server at `target` if given; or, with `resume`,
    continue that run. `api_key` (the target's) reaches the process in its environment, never
    on its command line (which `ps` shows and the database keeps)."""
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise ValueError(f"not a sweep axis: {unknown[0]!r}")
    db_path = Path(db_path)
    argv = [sys.executable, "-m", "mlxinfer", "bench", "--db", str(db_path)]
    if resume is not None:
        argv += ["--resume", str(resume)]
    else:
        for axis, value in axes.items():
            argv += [f"--{axis.replace('_', '-')}", str(value)]
        argv += ["--reps", str(reps)] + (["--baseline", baseline] if baseline else [])
        argv += ["--target", target] if target else []
    env = {**os.environ, "OPENAI_API_KEY": api_key} if api_key else None
    logs = db_path.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.time()
    log = (
        logs
        / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{int(started * 1e3) % 1000}.log"
    )
    with open(log, "w") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the dashboard's own Ctrl-C does not reach it
            env=env,
        )
    _children.append(process)
    return Job(process.pid, log, started, process, resume)


def alive(pid: int | None) -> bool:
    """Whether process `pid` exists on this machine and has not exited (a zombie has)."""
    for child in list(_children):  # reap the workers this process started
        if child.poll() is not None:
            _children.remove(child)
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return _command_line(pid) != ""


def _command_line(pid: int) -> str | None:
    """The command line of a live process, None if unknown; "" for a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return ""
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace")
        # a live process reads empty while it execs (a child just started) or as a kernel
        # thread: unknown, not dead (taken for a zombie, a just-started worker looked gone)
        return command or None
    except OSError:
        pass
    try:  # macOS, BSD: no /proc
        out = subprocess.run(
            ["ps", "-o", "stat=,command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not out:
        return ""
    state, _, command = out.partition(" ")
    return "" if state.startswith("Z") else command


def status(run) -> str:
    """A run's status as the database has it, except that a 'running' run whose process is gone
    (killed, crashed, the machine restarted) is 'interrupted': resume it."""
    if run["status"] == "running" and not alive(run["pid"]):
        return "interrupted"
    return run["status"]


def stop(run) -> bool:
    """Ask the process measuring `run` to stop as Ctrl-C does (it records the run as stopped and
    exits). False if it is not running, or if that pid is no longer an mlxinfer process (the
    pid was given to another program): nothing is signalled then."""
    if status(run) != "running":
        return False
    command = _command_line(run["pid"])
    if command is not None and "mlxinfer" not in command:
        return False
    try:
        os.kill(run["pid"], signal.SIGINT)
    except (ProcessLookupError, PermissionError):
        return False
    return True
