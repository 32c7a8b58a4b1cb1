"""The machine and software a measurement was taken on, and the memory it still has.

`machine_facts()` is what every run in the database and every benchmark result records: CPU or
chip, cores, memory, OS, MLX device, BLAS, the gemv shim, the op set and compute policy "auto"
picks, the versions of MLX, mlx-lm and mlxinfer, and the git commit of the checkout (with
"-dirty" when tracked files have changes), so that two runs can be told apart by what changed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def machine_facts() -> dict:
    import mlx.core as mx

    from .. import __version__
    from ..backend import (
        blas_status,
        cpu_features,
        cpu_name,
        gemv_kernel_summary,
        gemv_shim_status,
        prefill_kernel_summary,
        resolve_compute_policy,
    )
    from ..ops import resolve_kernels

    memory = total_memory_bytes()
    return {
        "cpu": cpu_name(),
        "cpu_features": cpu_features(),
        "cores": os.cpu_count(),
        "memory_gb": round(memory / 2**30, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "backend": str(mx.default_device()),
        "blas": blas_status(),
        "gemv_shim": gemv_shim_status(),
        "gemv_kernel": gemv_kernel_summary(timings=False),  # stable: runs group by these facts
        "prefill_kernel": prefill_kernel_summary(),
        "op_set": resolve_kernels("auto"),
        "compute_policy": resolve_compute_policy("auto"),
        "mlx": mx.__version__,  # type: ignore[attr-defined]
        "mlx_lm": _package("mlx-lm"),
        "mlxinfer": __version__,
        "commit": git_commit(),
    }


PACKAGE = Path(__file__).resolve().parent.parent  # mlxinfer/


def git_commit(package: Path = PACKAGE) -> str:
    """The short commit of the checkout mlxinfer runs from, "-dirty" when tracked files changed;
    "unknown" for an installed copy that is not its own checkout (not the commit of some other
    repository around it), or without git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=package,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != package.parent:
            return "unknown"
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def total_memory_bytes() -> int:
    """The machine's physical memory (0 where the OS does not say)."""
    if not hasattr(os, "sysconf"):
        return 0
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory_mb() -> float | None:
    """Memory the system could still give (Linux: MemAvailable), or None where unknown (macOS
    reports its unified memory differently; MLX's own limit applies there)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
