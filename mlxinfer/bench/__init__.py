"""Benchmark sweeps (issue 12, in progress): the grid of settings (grid.py), the statistics of
repeated measurements (stats.py) and the runs database (db.py). The sweep runner, the mlx-lm
baseline worker and the `mlxinfer bench` command build on these."""
