"""`mlxinfer env`: what a bug report needs."""

from __future__ import annotations

import argparse
import json
import os
import sys


def environment() -> dict:
    """What a bug report needs: the machine facts every benchmark run records
    (bench/machine.py: versions, CPU, device, BLAS, the kernels, the commit), with the details a
    report adds: where Python is, the gemv kernel's check figures, the op set's source, Metal, the
    C compiler, and where the default model is."""
    import mlx.core as mx

    from ..backend import c_compiler, gemv_kernel_summary
    from ..bench.machine import machine_facts
    from ..loading import DEFAULT_MODEL_INSTALL, default_model_path

    facts = machine_facts()
    try:
        default_model = str(default_model_path())
    except FileNotFoundError:
        default_model = f"not installed ({DEFAULT_MODEL_INSTALL})"
    return {
        "mlxinfer": facts["mlxinfer"],
        "commit": facts["commit"],
        "mlx": facts["mlx"],
        "mlx-lm": facts["mlx_lm"],
        "python": f"{facts['python']} ({sys.executable})",
        "platform": facts["os"],
        "cpu": f"{facts['cpu']}, {facts['cores']} cores, {facts['memory_gb']} GB",
        "cpu features": facts["cpu_features"] or "unknown",
        "device": facts["backend"],
        "metal": mx.metal.is_available(),
        "compute policy (auto)": facts["compute_policy"],
        "kernels (auto)": _auto_kernels(),
        "blas": facts["blas"],
        "gemv shim": facts["gemv_shim"],
        "gemv kernel": gemv_kernel_summary(),  # with the check's figures, which the facts leave out
        "prefill kernels": facts["prefill_kernel"],
        "c compiler": c_compiler() or "none found",
        "default model": default_model,
        "distributed": _distributed(),
    }


def _distributed() -> str:
    """MLX's distributed layer: whether it is there, and the group this process would join (as
    `mlx.launch` describes it in the environment; not joined here, which would wait for the
    other ranks)."""
    import mlx.core as mx

    if not mx.distributed.is_available():
        return "not available in this MLX"
    rank, hostfile = os.environ.get("MLX_RANK"), os.environ.get("MLX_HOSTFILE")
    if rank is None and hostfile is None:
        return "available; not launched (a group of one: run under mlx.launch to use --parallel)"
    size = "?"
    if hostfile:
        try:
            with open(hostfile, encoding="utf-8") as f:
                size = str(len(json.load(f)))
        except (OSError, ValueError):
            size = "? (hostfile unreadable)"
    return f"rank {rank if rank is not None else '?'} of {size} (hostfile {hostfile or 'none'})"


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
