"""`mlxinfer env`: what a bug report needs."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .options import package_version


def environment() -> dict:
    """What a bug report needs: versions, device and backend, BLAS, the gemv shim, the compiler,
    and where the default model is."""
    import platform

    import mlx.core as mx

    from ..backend import (
        blas_status,
        c_compiler,
        cpu_features,
        cpu_name,
        gemv_kernel_summary,
        gemv_shim_status,
        prefill_kernel_summary,
        resolve_compute_policy,
    )
    from ..loading import DEFAULT_MODEL_INSTALL, default_model_path

    try:
        default_model = str(default_model_path())
    except FileNotFoundError:
        default_model = f"not installed ({DEFAULT_MODEL_INSTALL})"
    return {
        "mlxinfer": package_version("mlxinfer"),
        "mlx": mx.__version__,  # type: ignore[attr-defined]
        "mlx-lm": package_version("mlx-lm"),
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "platform": platform.platform(),
        "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
        "cpu features": cpu_features() or "unknown",
        "device": str(mx.default_device()),
        "metal": mx.metal.is_available(),
        "compute policy (auto)": resolve_compute_policy("auto"),
        "kernels (auto)": _auto_kernels(),
        "blas": blas_status(),
        "gemv shim": gemv_shim_status(),
        "gemv kernel": gemv_kernel_summary(),
        "prefill kernels": prefill_kernel_summary(),
        "c compiler": c_compiler() or "none found",
        "default model": default_model,
    }


def _auto_kernels() -> str:
    """The op set "auto" picks, and whether the environment chose it (or is invalid)."""
    from ..ops import KERNELS_ENV, resolve_kernels

    try:
        chosen = resolve_kernels("auto")
    except ValueError as e:
        return f"error: {e}"
    return f"{chosen} (from ${KERNELS_ENV})" if os.environ.get(KERNELS_ENV) else chosen


def run_env(args: argparse.Namespace) -> int:
    facts = environment()
    if args.json:
        print(json.dumps(facts))
    else:
        width = max(len(k) for k in facts)
        for key, value in facts.items():
            print(f"{key + ':':{width + 1}} {value}")
    return 0
