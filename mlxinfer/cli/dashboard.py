"""`mlxinfer dashboard`: the Streamlit dashboard, started with the model and database chosen."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .options import EXIT_INTERRUPTED, UsageError


def dashboard_app() -> Path:
    """The dashboard's app.py: where the package was installed with it (mlxinfer.dashboard, the
    repository's dashboard/ under an editable install), else beside the source checkout's
    mlxinfer/ (an editable install made before the dashboard was part of the package)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("mlxinfer.dashboard")
    except ImportError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "app.py").is_file():
            return Path(location) / "app.py"
    return Path(__file__).resolve().parent.parent.parent / "dashboard" / "app.py"


def run_dashboard(args: argparse.Namespace) -> int:
    """`streamlit run dashboard/app.py` with the model and database chosen, in the foreground."""
    import signal
    import subprocess

    from ..bench.db import DB_ENV, RunsDB

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    if args.model is not None and not Path(args.model).expanduser().exists():
        raise UsageError(f"--model {args.model}: no such file or directory")
    app = dashboard_app()
    if not app.is_file():
        raise UsageError(
            f"the dashboard is not installed ({app} is missing): reinstall mlxinfer "
            "(`pip install .` from a clone installs it with the package)"
        )
    env = dict(os.environ)
    if args.db is not None:
        env[DB_ENV] = str(Path(args.db).expanduser().resolve())
    try:
        RunsDB(env.get(DB_ENV)).close()  # a path that cannot hold the database fails here
    except (ValueError, OSError) as e:
        raise UsageError(f"runs database: {e}") from None
    if args.model is not None:
        env["MLXINFER_MODEL"] = str(Path(args.model).expanduser().resolve())
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.port",
        str(args.port),
        "--server.address",
        args.host,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "viewer",
        "--client.showErrorDetails",
        "type",
    ]
    print(f"mlxinfer dashboard: http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    process = subprocess.Popen(command, env=env)
    signal.signal(signal.SIGTERM, lambda number, frame: process.terminate())  # pass it on
    try:
        return process.wait()
    except KeyboardInterrupt:  # the child got the Ctrl-C too
        process.wait()
        return EXIT_INTERRUPTED
