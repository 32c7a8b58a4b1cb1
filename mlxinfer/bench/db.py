"""The runs database: every benchmark measurement, committed to SQLite the moment it exists.

One file, shared with the dashboard: `MLXINFER_DB`, else `$XDG_DATA_HOME/mlxinfer/runs.sqlite`
(`~/.local/share/mlxinfer/runs.sqlite`). WAL mode, one transaction per measurement: a sweep that
is killed loses at most the measurement in progress, and `done(run_id)` says what a resumed run
need not repeat.

    runs            a sweep: its command or sweep file, start, end, status, machine, repetitions,
                    its baseline and the server it measured over HTTP (target), if any
    machines        the machine and software facts (CPU, memory, OS, backend, BLAS, versions, commit)
    configurations  one row per grid point of a run: its settings (JSON) and stable key
    measurements    one row per configuration, engine and repetition: the metrics, or the error
    token_times     each generated token's arrival time (ms from the request's start), first request
    requests        every concurrent request of a measurement: TTFT, end-to-end time, tokens, gaps
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .grid import with_defaults

# 2: runs.pid; 3: measurements.output_tps; 4: requests; 5: runs.target;
# 6: measurements.acceptance_rate
SCHEMA_VERSION = 6
DB_ENV = "MLXINFER_DB"
METRICS = (
    "ttft_ms",
    "prefill_tps",
    "decode_tps",
    "tpot_ms",
    "itl_p50_ms",
    "itl_p90_ms",
    "itl_p99_ms",
    "e2e_ms",
    "peak_memory_mb",
    "kv_cache_mb",
    "bandwidth_gbs",
    "predicted_memory_mb",  # weights + the KV cache as allocated, from the architecture
    "output_tps",  # all of a measurement's generated tokens / its wall time (schema 3)
    "acceptance_rate",  # speculative decoding: accepted / proposed tokens (schema 6)
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS machines (
    id INTEGER PRIMARY KEY,
    facts TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    command TEXT NOT NULL,
    sweep TEXT,
    started REAL NOT NULL,
    ended REAL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'stopped', 'failed')),
    machine_id INTEGER REFERENCES machines(id),
    reps INTEGER NOT NULL,
    baseline TEXT,
    pid INTEGER,  -- the process measuring it while it runs
    target TEXT  -- the server's URL when it measured one over HTTP (schema 5)
);
CREATE TABLE IF NOT EXISTS configurations (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    position INTEGER NOT NULL,
    key TEXT NOT NULL,
    settings TEXT NOT NULL,
    UNIQUE (run_id, key)
);
CREATE TABLE IF NOT EXISTS measurements (
    id INTEGER PRIMARY KEY,
    configuration_id INTEGER NOT NULL REFERENCES configurations(id),
    engine TEXT NOT NULL,
    rep INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT,
    {", ".join(f"{m} REAL" for m in METRICS)},
    tokens TEXT,
    recorded REAL NOT NULL,
    UNIQUE (configuration_id, engine, rep)
);
CREATE TABLE IF NOT EXISTS token_times (
    measurement_id INTEGER NOT NULL REFERENCES measurements(id),
    position INTEGER NOT NULL,
    t_ms REAL NOT NULL,
    PRIMARY KEY (measurement_id, position)
);
CREATE TABLE IF NOT EXISTS requests (  -- each concurrent request of a measurement (schema 4)
    measurement_id INTEGER NOT NULL REFERENCES measurements(id),
    request INTEGER NOT NULL,
    ttft_ms REAL NOT NULL,
    e2e_ms REAL NOT NULL,
    tokens INTEGER NOT NULL,  -- how many it generated
    gaps TEXT NOT NULL,  -- its inter-token latencies (ms), a JSON list
    PRIMARY KEY (measurement_id, request)
);
"""


def _tables(conn: sqlite3.Connection) -> dict[str, frozenset[str]]:
    """Each table of a database (SQLite's own aside) -> its columns."""
    names = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    return {
        n: frozenset(c[0] for c in conn.execute("SELECT name FROM pragma_table_info(?)", (n,)))
        for (n,) in names
    }


@functools.cache
def _columns() -> dict[str, frozenset[str]]:
    """Each table of the schema -> its columns."""
    schema = sqlite3.connect(":memory:")
    schema.executescript(_SCHEMA)
    columns = _tables(schema)
    schema.close()
    return columns


def default_db_path() -> Path:
    """MLXINFER_DB, else the user's data directory."""
    if os.environ.get(DB_ENV):
        return Path(os.environ[DB_ENV]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "mlxinfer" / "runs.sqlite"


def _decoded(rows: Sequence[sqlite3.Row], *columns: str) -> list[dict]:
    """Rows as dicts, the JSON text of `columns` decoded (NULL stays None)."""
    out = []
    for row in rows:
        item = dict(row)
        for column in columns:
            item[column] = None if item[column] is None else json.loads(item[column])
        if item.get("settings") is not None:
            item["settings"] = with_defaults(item["settings"])
        out.append(item)
    return out


LOCKED_WAIT_S = 10.0  # how long opening waits for another process creating the database


class RunsDB:
    """The runs database at `path` (created with its schema if new)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_db_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file where a directory should be, no permission
            reason = "a file is in the way" if isinstance(e, FileExistsError) else e.strerror
            raise ValueError(
                f"runs database {self.path}: cannot create the directory "
                f"{e.filename or self.path.parent}: {reason}"
            ) from None
        deadline = time.monotonic() + LOCKED_WAIT_S
        self.conn: sqlite3.Connection | None = None
        while True:
            try:
                self._open()
                return
            except sqlite3.OperationalError as e:
                # Two processes creating the database at once: switching it to WAL takes a lock
                # that SQLite's busy timeout does not wait for ("database is locked", 1 open in
                # 10 under that race), so the whole opening is tried again, for a while.
                self._discard()
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise ValueError(f"{self.path} is not a usable runs database: {e}") from None
                time.sleep(0.02)
            except sqlite3.DatabaseError as e:
                self._discard()
                raise ValueError(f"{self.path} is not a usable runs database: {e}") from None
            except ValueError:  # another program's database, or a newer schema
                self._discard()
                raise

    def _discard(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _open(self) -> None:
        """Connect, and create or migrate the schema."""
        self.conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=LOCKED_WAIT_S
        )
        self.conn.row_factory = sqlite3.Row
        version = self._check_schema()  # before anything is written: it may be someone else's
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        if version != SCHEMA_VERSION:  # new, or older (no write on every open)
            with self._transaction():  # another process may be doing the same: read again
                version = self.conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 1:  # runs gained the pid of the process measuring them
                    self.conn.execute("ALTER TABLE runs ADD COLUMN pid INTEGER")
                has_measurements = "measurements" in _tables(self.conn)
                if version in (1, 2) and has_measurements:  # gained the total output throughput
                    self.conn.execute("ALTER TABLE measurements ADD COLUMN output_tps REAL")
                if version in (1, 2, 3, 4):  # runs gained the server they measured
                    self.conn.execute("ALTER TABLE runs ADD COLUMN target TEXT")
                if version in (1, 2, 3, 4, 5) and has_measurements:  # gained speculation's rate
                    self.conn.execute("ALTER TABLE measurements ADD COLUMN acceptance_rate REAL")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _check_schema(self) -> int:
        """The database's schema version, after refusing (ValueError naming the file) one that
        is not a runs database: a newer version, tables of another program in a file that has
        no version, tables of our names with other columns."""
        self.conn.execute("BEGIN")  # one snapshot: another process may be creating it
        try:
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            tables = _tables(self.conn)
        finally:
            if self.conn.in_transaction:  # (a file that is not SQLite fails before it begins)
                self.conn.execute("ROLLBACK")
        if version not in (0, 1, 2, 3, 4, 5, SCHEMA_VERSION):
            raise ValueError(
                f"{self.path}: runs database schema version {version}; this mlxinfer reads "
                f"version {SCHEMA_VERSION}"
            )
        not_ours = f"{self.path} is not a runs database"
        if version == 0 and tables:  # ours get their version in the transaction that makes them
            raise ValueError(f"{not_ours}: it has tables of its own ({', '.join(sorted(tables))})")
        expected = {name: set(columns) for name, columns in _columns().items()}
        if version == 1:
            expected["runs"] -= {"pid"}  # added by the migration to version 2
        if version in (1, 2):
            expected["measurements"] -= {"output_tps"}  # added by the migration to version 3
        if version in (1, 2, 3, 4):
            expected["runs"] -= {"target"}  # added by the migration to version 5
        if version in (1, 2, 3, 4, 5):
            expected["measurements"] -= {"acceptance_rate"}  # added by the migration to 6
        for name, columns in tables.items():
            lacking = expected.get(name, set()) - columns
            if lacking:
                raise ValueError(
                    f"{not_ours}: its table {name!r} has no {', '.join(sorted(lacking))}"
                )
        missing = set(expected) - set(tables)
        if version == SCHEMA_VERSION and missing:
            raise ValueError(f"{not_ours}: it has no {', '.join(sorted(missing))} table")
        return version

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def _transaction(self):
        """One transaction (the connection is in autocommit mode, where `with conn` is not one):
        all of it is committed, or none."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- writing -----------------------------------------------------------------------------

    def start_run(
        self,
        command: str,
        machine: Mapping,
        reps: int,
        sweep: str | None = None,
        baseline: str | None = None,
        target: str | None = None,
    ) -> int:
        facts = json.dumps(dict(machine), sort_keys=True)
        with self._transaction():
            self.conn.execute("INSERT OR IGNORE INTO machines (facts) VALUES (?)", (facts,))
            machine_id = self.conn.execute(
                "SELECT id FROM machines WHERE facts = ?", (facts,)
            ).fetchone()[0]
            cursor = self.conn.execute(
                "INSERT INTO runs (command, sweep, started, status, machine_id, reps, baseline, "
                "pid, target) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                (command, sweep, time.time(), machine_id, reps, baseline, os.getpid(), target),
            )
        return cursor.lastrowid

    def add_configurations(self, run_id: int, configs: Sequence[tuple[str, Mapping]]) -> list[int]:
        """(key, settings) pairs in grid order -> their ids; configurations a resumed run already
        has keep theirs."""
        with self._transaction():
            for position, (key, settings) in enumerate(configs):
                self.conn.execute(
                    "INSERT OR IGNORE INTO configurations (run_id, position, key, settings) "
                    "VALUES (?, ?, ?, ?)",
                    (run_id, position, key, json.dumps(dict(settings), sort_keys=True)),
                )
            rows = self.conn.execute(
                "SELECT key, id FROM configurations WHERE run_id = ?", (run_id,)
            ).fetchall()
        ids = dict(rows)
        return [ids[key] for key, _ in configs]

    def record(
        self,
        configuration_id: int,
        engine: str,
        rep: int,
        metrics: Mapping | None = None,
        tokens: Sequence[int] | None = None,
        token_times_ms: Sequence[float] = (),
        error: str | None = None,
        requests: Sequence[Mapping] = (),
    ) -> int:
        """One measurement (or its failure), committed with its token times and its requests
        (each {ttft_ms, e2e_ms, tokens, gaps}: what latency percentiles and goodput are computed
        from) in one transaction."""
        values = [None if metrics is None else metrics.get(m) for m in METRICS]
        status = "failed" if error is not None else "ok"
        with self._transaction():
            cursor = self.conn.execute(
                f"INSERT INTO measurements (configuration_id, engine, rep, status, error, "
                f"{', '.join(METRICS)}, tokens, recorded) "
                f"VALUES (?, ?, ?, ?, ?, {', '.join('?' * len(METRICS))}, ?, ?)",
                (
                    configuration_id,
                    engine,
                    rep,
                    status,
                    error,
                    *values,
                    None if tokens is None else json.dumps(list(tokens)),
                    time.time(),
                ),
            )
            self.conn.executemany(
                "INSERT INTO token_times (measurement_id, position, t_ms) VALUES (?, ?, ?)",
                [(cursor.lastrowid, i, float(t)) for i, t in enumerate(token_times_ms)],
            )
            self.conn.executemany(
                "INSERT INTO requests (measurement_id, request, ttft_ms, e2e_ms, tokens, gaps) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        cursor.lastrowid,
                        i,
                        float(r["ttft_ms"]),
                        float(r["e2e_ms"]),
                        int(r["tokens"]),
                        json.dumps([float(g) for g in r["gaps"]]),
                    )
                    for i, r in enumerate(requests)
                ],
            )
        return cursor.lastrowid

    def finish_run(self, run_id: int, status: str) -> None:
        with self._transaction():
            self.conn.execute(
                "UPDATE runs SET status = ?, ended = ? WHERE id = ?", (status, time.time(), run_id)
            )

    def resume_run(self, run_id: int) -> sqlite3.Row:
        """Mark a stopped, failed or interrupted run as running again, by this process; returns
        its row. Refused (ValueError) when it is done, or while another process that is alive
        still measures it: both would measure it, and its pid, the one Stop signals, would be
        this process's."""
        from . import jobs

        with self._transaction():  # read and taken at once: of two resumes, one takes it
            run = self.run(run_id)
            if run["status"] == "done":
                raise ValueError(f"run {run_id} is already done")
            if run["pid"] != os.getpid() and jobs.status(run) == "running":  # its owner lives
                raise ValueError(
                    f"run {run_id} is still being measured by process {run['pid']}: stop that one "
                    "first (Ctrl-C there, or Stop on the dashboard), or let it finish"
                )
            self.conn.execute(
                "UPDATE runs SET status = 'running', ended = NULL, pid = ? WHERE id = ?",
                (os.getpid(), run_id),
            )
        return self.run(run_id)

    # -- reading -----------------------------------------------------------------------------

    def run(self, run_id: int) -> sqlite3.Row:
        row = self.conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise ValueError(f"no run {run_id} in {self.path}")
        return row

    def runs(self) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM runs ORDER BY id").fetchall()

    def configurations(self, run_id: int) -> list[dict]:
        """A run's configurations' settings, in grid order."""
        rows = self.conn.execute(
            "SELECT settings FROM configurations WHERE run_id = ? ORDER BY position", (run_id,)
        ).fetchall()
        return [with_defaults(json.loads(r[0])) for r in rows]

    def done(self, run_id: int) -> set[tuple[str, str, int]]:
        """(configuration key, engine, repetition) of every measurement a run has, failed or not."""
        rows = self.conn.execute(
            "SELECT c.key, m.engine, m.rep FROM measurements m "
            "JOIN configurations c ON c.id = m.configuration_id WHERE c.run_id = ?",
            (run_id,),
        ).fetchall()
        return {(r[0], r[1], r[2]) for r in rows}

    def measurements(self, run_id: int) -> list[dict]:
        """Every measurement of a run with its configuration's settings, in grid order."""
        rows = self.conn.execute(
            "SELECT c.position, c.settings, m.* FROM measurements m "
            "JOIN configurations c ON c.id = m.configuration_id WHERE c.run_id = ? "
            "ORDER BY c.position, m.engine, m.rep",
            (run_id,),
        ).fetchall()
        return _decoded(rows, "settings", "tokens")

    def measurement_counts(self) -> dict[int, int]:
        """run id -> how many measurements it has (failed ones too)."""
        rows = self.conn.execute(
            "SELECT c.run_id, COUNT(m.id) FROM configurations c "
            "LEFT JOIN measurements m ON m.configuration_id = c.id GROUP BY c.run_id"
        ).fetchall()
        return {run_id: count for run_id, count in rows}

    def machine(self, machine_id: int | None) -> dict:
        """The machine facts a run recorded (empty for none or an unknown id)."""
        if machine_id is None:
            return {}
        row = self.conn.execute("SELECT facts FROM machines WHERE id = ?", (machine_id,)).fetchone()
        return json.loads(row[0]) if row else {}

    def successful_speeds(self) -> list[tuple[str, dict, float, float]]:
        """(engine, configuration settings, prefill_tps, decode_tps) of every successful
        measurement with both speeds: what estimates of a sweep's duration are made from."""
        rows = self.conn.execute(
            "SELECT m.engine, c.settings, m.prefill_tps, m.decode_tps FROM measurements m "
            "JOIN configurations c ON c.id = m.configuration_id "
            "WHERE m.status = 'ok' AND m.prefill_tps > 0 AND m.decode_tps > 0"
        ).fetchall()
        return [(engine, with_defaults(json.loads(s)), p, d) for engine, s, p, d in rows]

    def run_of_process(self, pid: int, run_id: int | None = None, since: float = 0.0) -> int | None:
        """The run a worker process `pid` is measuring: `run_id` if that run is now its (a run it
        resumed), else its latest run started at or after `since`; None before it has one."""
        if run_id is not None:
            row = self.conn.execute(
                "SELECT id FROM runs WHERE id = ? AND pid = ?", (run_id, pid)
            ).fetchone()
        else:
            row = self.conn.execute(
                "SELECT id FROM runs WHERE pid = ? AND started >= ? ORDER BY id DESC LIMIT 1",
                (pid, since),
            ).fetchone()
        return None if row is None else row[0]

    def requests(self, run_id: int) -> list[dict]:
        """Every request of a run's successful measurements: the measurement's id, settings,
        engine and rep, and the request's ttft_ms, e2e_ms, tokens and gaps (ms). Empty for runs
        made before schema 4, which kept only each measurement's means."""
        rows = self.conn.execute(
            "SELECT m.id AS measurement_id, c.position, c.settings, m.engine, m.rep, r.request, "
            "r.ttft_ms, r.e2e_ms, r.tokens, r.gaps FROM requests r "
            "JOIN measurements m ON m.id = r.measurement_id "
            "JOIN configurations c ON c.id = m.configuration_id "
            "WHERE c.run_id = ? AND m.status = 'ok' "
            "ORDER BY c.position, m.engine, m.rep, r.request",
            (run_id,),
        ).fetchall()
        return _decoded(rows, "settings", "gaps")

    def token_times(self, measurement_id: int) -> list[float]:
        rows = self.conn.execute(
            "SELECT t_ms FROM token_times WHERE measurement_id = ? ORDER BY position",
            (measurement_id,),
        ).fetchall()
        return [r[0] for r in rows]
