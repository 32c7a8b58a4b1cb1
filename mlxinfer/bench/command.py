"""`mlxinfer bench`: a sweep from the command line, and what the runs database holds.

mlxinfer bench --temperature 0,0.8 --top-p 1.0,0.9 --prompt-tokens 64,512 [--reps 5]
mlxinfer bench --sweep sweep.toml        # the same axes as a TOML table
mlxinfer bench --resume RUN_ID           # a stopped run, without repeating what it has
mlxinfer bench --target http://127.0.0.1:8080 --concurrency 1,8   # any OpenAI-compatible server
mlxinfer bench --baseline mlx-lm-server  # mlxinfer serve and mlx_lm.server, alternating
mlxinfer bench list | export RUN_ID --csv FILE / --json FILE | compare RUN_A RUN_B
mlxinfer bench positions RUN_ID          # latency by token position
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from .db import METRICS
from .grid import AXES, SAMPLING_AXES, sampling_label


class BenchUsageError(ValueError):
    """A bad flag or value: the command exits 2 before anything runs."""


def add_parser(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="benchmark sweeps, kept in a SQLite database",
        description="Sweep sampling settings, lengths, context depth, concurrency, KV cache kind, "
        "compute policy and model; every measurement goes to the runs database as it finishes.",
    )
    grid = bench.add_argument_group("grid (each a comma list; default: one value)")
    for axis in AXES:
        grid.add_argument(f"--{axis.replace('_', '-')}", dest=f"axis_{axis}", metavar="LIST")
    bench.add_argument("--sweep", metavar="FILE", help="the axes as a TOML table (flags add to it)")
    bench.add_argument("--reps", type=int, default=5, help="measured repetitions (default 5)")
    bench.add_argument(
        "--db",
        metavar="PATH",
        help="the runs database (default: MLXINFER_DB, else ~/.local/share/mlxinfer/runs.sqlite)",
    )
    bench.add_argument("--resume", type=int, metavar="RUN_ID", help="continue a stopped run")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument(
        "--baseline",
        choices=["mlx-lm", "mlx-lm-server"],
        help="run every configuration through mlx-lm too, alternating: in its own process "
        "(mlx-lm), or as mlx_lm.server over HTTP beside `mlxinfer serve` or the --target",
    )
    bench.add_argument(
        "--target",
        metavar="URL",
        help="measure the OpenAI-compatible server at URL over streamed HTTP instead of the "
        "in-process engine (concurrency = requests in flight; kv and compute are its own)",
    )
    bench.add_argument(
        "--api-key",
        metavar="KEY",
        default=None,
        help="the --target's API key (default: OPENAI_API_KEY; never stored)",
    )
    actions = bench.add_subparsers(dest="bench_command", metavar="ACTION")
    # --db after the action too; SUPPRESS keeps one given before it
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS, help="the runs database")
    actions.add_parser("list", help="the runs in the database", parents=[where])
    export = actions.add_parser(
        "export", help="a run's measurements as CSV or JSON", parents=[where]
    )
    export.add_argument("run_id", type=int, metavar="RUN_ID")
    export.add_argument("--csv", metavar="FILE", help="every measurement, one row each")
    export.add_argument("--json", dest="export_json", metavar="FILE", help="per configuration")
    positions = actions.add_parser(
        "positions",
        help="latency by token position: the first token, then the median gap per stretch",
        parents=[where],
    )
    positions.add_argument("run_id", type=int, metavar="RUN_ID")
    positions.add_argument("--buckets", type=int, default=8, help="stretches of the generation")
    positions.add_argument("--csv", metavar="FILE", help="every position's p50 and p90 gap")
    compare = actions.add_parser(
        "compare", help="two runs' shared configurations, with ratios", parents=[where]
    )
    compare.add_argument("run_a", type=int, metavar="RUN_A")
    compare.add_argument("run_b", type=int, metavar="RUN_B")
    compare.add_argument(
        "--metric",
        default="decode_tps",
        choices=METRICS,
        metavar="METRIC",
        help=f"one of {', '.join(METRICS)} (default decode_tps)",
    )


def run(args: argparse.Namespace) -> int:
    from . import report
    from .db import RunsDB

    db = RunsDB(args.db)
    if args.bench_command == "list":
        for r in db.runs():
            print(f"{r['id']:>4}  {r['status']:<8} {r['command']}")
        return 0
    if args.bench_command == "export":
        db.run(args.run_id)
        if not args.csv and not args.export_json:
            raise BenchUsageError("export needs --csv FILE or --json FILE")
        check_writable("--csv", args.csv)
        check_writable("--json", args.export_json)
        if args.csv:
            write("--csv", args.csv, report.to_csv(db, args.run_id))
        if args.export_json:
            write("--json", args.export_json, report.to_json(report.summarize(db, args.run_id)))
        return 0
    if args.bench_command == "positions":
        db.run(args.run_id)
        if args.buckets < 1:
            raise BenchUsageError(f"--buckets must be >= 1, got {args.buckets}")
        check_writable("--csv", args.csv)
        items = report.latency_by_position(db, args.run_id)
        print(report.position_table(items, args.buckets))
        if args.csv:
            write("--csv", args.csv, report.positions_csv(items))
        return 0
    if args.bench_command == "compare":
        db.run(args.run_a), db.run(args.run_b)
        for row in report.compare(db, args.run_a, args.run_b, args.metric):
            interval = row["interval"]
            ci = f" [{interval['low']:.2f}, {interval['high']:.2f}]" if interval else ""
            print(
                f"{row['engine']:<9} {row['settings']}  {row['a']:.2f} -> {row['b']:.2f}  "
                f"x{row['ratio']:.2f}{ci}"
            )
        return 0
    return _sweep(args, db)


def _sweep(args: argparse.Namespace, db) -> int:
    from . import report
    from .grid import parse_axes
    from .sweep import Sweep, too_long

    check_writable("--json", args.json)  # before measuring, not after
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or None
    if args.resume is not None:
        if args.target is not None or args.baseline is not None:
            raise BenchUsageError(
                "--resume continues a run with its own --target and --baseline: give neither"
            )
        sweep = Sweep.resume(db, args.resume, api_key=api_key)
        seconds = None  # its pace says (the estimate would count what it has)
    else:
        raw = _read_sweep_file(args.sweep) if args.sweep else {}
        for axis in AXES:
            value = getattr(args, f"axis_{axis}")
            if value is not None:
                raw[axis] = value
        try:
            axes = parse_axes(raw)
        except ValueError as e:
            raise BenchUsageError(str(e)) from None
        if args.reps < 1:
            raise BenchUsageError(f"--reps must be >= 1, got {args.reps}")
        command = "mlxinfer bench " + " ".join(_without_secrets(sys.argv[2:]))
        sweep_text = Path(args.sweep).read_text() if args.sweep else None
        if args.target is not None:
            from .http import normalized_url

            try:
                normalized_url(args.target)
            except ValueError as e:
                raise BenchUsageError(f"--target: {e}") from None
            if args.baseline == "mlx-lm":
                raise BenchUsageError(
                    "--baseline mlx-lm runs in process; beside a --target use mlx-lm-server"
                )
        sweep = Sweep(
            axes,
            args.reps,
            db,
            command,
            sweep_text,
            baseline=args.baseline,
            target=args.target,
            api_key=api_key,
        )
        seconds = sweep.estimated_seconds()
    if seconds is not None and too_long(seconds):
        print(
            f"mlxinfer bench: warning: this sweep takes ~{_duration(seconds)} at the speeds "
            f"this database has measured; {_stopping(sweep.run_id)}",
            file=sys.stderr,
            flush=True,
        )
    _interrupt_on(signal.SIGINT, signal.SIGTERM)  # also when started from the dashboard
    cancel = threading.Event()
    show = Progress(sweep.swept, sweep.reps, sys.stderr, warned=seconds is not None)
    try:
        for event in sweep.run(cancel):
            show(event)
    except KeyboardInterrupt:
        db.finish_run(sweep.run_id, "stopped")
        print(
            f"\nstopped; resume with: mlxinfer bench --resume {sweep.run_id} --db {db.path}",
            file=sys.stderr,
        )
        return 130
    items = report.summarize(db, sweep.run_id)
    print(report.markdown_table(items))
    print(f"run {sweep.run_id} in {db.path}", file=sys.stderr)
    if args.json:
        try:
            write("--json", args.json, report.to_json(items))
        except BenchUsageError as e:  # it could be written when the sweep started
            print(
                f"mlxinfer bench: error: {e}; the run is kept (mlxinfer bench export "
                f"{sweep.run_id} --json FILE)",
                file=sys.stderr,
            )
            return 1
    measured = any(item["decode_tps"] is not None for item in items)
    return 0 if measured else 1  # some failures are a sweep's result; nothing measured is not


def _without_secrets(argv: list[str]) -> list[str]:
    """The command line as the database keeps it: an --api-key's value replaced by ***."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("***")
            hide = False
        elif arg == "--api-key":
            out.append(arg)
            hide = True
        elif arg.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(arg)
    return out


def _stopping(run_id: int) -> str:
    return f"Ctrl-C stops it, and --resume {run_id} continues it"


def check_writable(flag: str, path: str | None) -> None:
    """An output file, checked before any work: a file that exists can be written, or its
    directory takes a new one (nothing is left there); else a BenchUsageError naming the flag."""
    if path is None:
        return
    target = Path(path)
    try:
        if target.exists():
            with open(target, "a"):  # opened for writing, not changed (a directory: EISDIR)
                pass
        else:
            with tempfile.TemporaryFile(dir=target.parent):
                pass
    except OSError as e:
        raise _cannot_write(flag, path, e) from None


def write(flag: str, path: str, text: str) -> None:
    """`text` into the file of `flag`; a failure is a BenchUsageError naming both."""
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise _cannot_write(flag, path, e) from None


def _cannot_write(flag: str, path: str, error: OSError) -> BenchUsageError:
    return BenchUsageError(f"{flag} {path}: cannot write there: {error.strerror or error}")


def _interrupt_on(*signals) -> None:
    """Stop cleanly on these signals (KeyboardInterrupt), whatever the parent process left."""

    def interrupt(number, frame):
        raise KeyboardInterrupt

    for number in signals:
        signal.signal(number, interrupt)


class Progress:
    """The progress line on stderr: a bar of the measurements made, the configuration in hand (its
    swept settings), the repetition and engine, and the time left at the pace so far. On a
    terminal the line redraws itself; elsewhere (a CI log) each configuration gets one line.
    Failures always get their own line."""

    WIDTH = 24

    def __init__(self, swept: list[str], reps: int, stream, warned: bool = False):
        self.swept, self.reps, self.stream = swept, reps, stream
        self.live = stream.isatty()
        self.failures: set = set()  # a configuration that cannot be set up fails every rep
        self.warned = warned  # about a long sweep: once, here or before it started

    def _warn_if_long(self, event) -> None:
        """Once the first configuration is measured (its pace includes loading the model), a
        sweep with more than LONG_SWEEP_S left is said so on a line of its own."""
        from .sweep import too_long

        if self.warned or event.index < 1 or not too_long(event.eta_s):
            return
        self.warned = True
        self._line(
            f"mlxinfer bench: warning: ~{_duration(event.eta_s)} left at this pace; "
            f"{_stopping(event.run_id)}",
            final=True,
        )

    def __call__(self, event) -> None:
        if event.kind in ("finished", "stopped"):
            if self.live:
                print(file=self.stream)
            return
        if event.kind == "skipped":
            return
        if event.kind == "measured":
            self._warn_if_long(event)
        sampling = [k for k in self.swept if k in SAMPLING_AXES]
        settings = " ".join(
            [sampling_label(event.config)] * bool(sampling)
            + [f"{k}={event.config[k]}" for k in self.swept if k not in SAMPLING_AXES]
        )
        where = f"config {event.index + 1}/{event.total} {settings}"
        if event.kind == "failed":
            if (event.index, event.engine, event.error) not in self.failures:
                self.failures.add((event.index, event.engine, event.error))
                self._line(f"{where} {event.engine} failed: {event.error}", final=True)
            return
        if event.kind == "started":
            doing = "loading and warming up"
        else:
            doing = f"rep {event.rep + 1}/{self.reps} {event.engine}"
        done = event.step / event.steps if event.steps else 1.0
        bar = "#" * round(done * self.WIDTH)
        left = "" if event.eta_s is None else f" ~{_duration(event.eta_s)} left"
        text = f"[{bar:<{self.WIDTH}}] {event.step}/{event.steps} {where}: {doing}{left}"
        if self.live or event.kind == "started":
            self._line(text)

    def _line(self, text: str, final: bool = False) -> None:
        if self.live:
            end = "\n" if final else ""
            print(f"\r\033[K{text}", end=end, file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _read_sweep_file(path: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise BenchUsageError(f"cannot read sweep file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise BenchUsageError(f"sweep file {path} is not valid TOML: {e}") from None
    return {k.replace("-", "_"): v for k, v in data.items()}
