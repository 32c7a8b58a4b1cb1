"""Benchmark sweeps: the grid of settings (grid.py), the statistics of repeated measurements
(stats.py), the runs database (db.py), the machine facts every run records (machine.py), the
sweep runner (sweep.py), background sweeps (jobs.py), the mlx-lm baseline worker (baseline.py),
measuring servers over HTTP (http.py) and starting them (servers.py), reports (report.py) and the `mlxinfer bench` command (command.py)."""
