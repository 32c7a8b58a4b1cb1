"""Backend set-up that must happen before MLX computes anything.

Fast BLAS on Linux: the mlx-cpu wheel links the reference BLAS (float32 GEMM ~5 GFLOP/s here).
OpenBLAS loaded with RTLD_GLOBAL before the first `import mlx.core` takes over its symbols
(~100 GFLOP/s). `mlxinfer/__init__.py` calls `load_fast_blas()` before importing anything that
imports MLX; when no OpenBLAS can be loaded, it says so once, in one line, with the fix.

This module must not import mlx at module level.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

BLAS_ENV = "MLXINFER_BLAS"  # a path to a BLAS shared library, or "reference" to keep MLX's own
BLAS_FIX = "apt-get install libopenblas0-pthread (Debian/Ubuntu)"
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

COMPILER_FIX = "apt-get install gcc (Debian/Ubuntu)"

_status: str | None = None  # what load_fast_blas found; see blas_status()
_shim_status = "not tried"  # what became of the gemv shim; see gemv_shim_status()


def load_fast_blas() -> str:
    """Load OpenBLAS globally if MLX will run on the Linux CPU; return the status string."""
    global _status
    if _status is not None:
        return _status
    if not sys.platform.startswith("linux"):
        _status = "not needed (not Linux)"
        return _status
    if _openblas_mapped():
        _status = "openblas"  # preloaded by the user (LD_PRELOAD)
        return _status
    requested = os.environ.get(BLAS_ENV)
    if requested == "reference":
        _status = "reference"  # requested with MLXINFER_BLAS=reference
        return _status
    if "mlx.core" in sys.modules:
        _status = "reference"
        _warn(
            "mlx.core was imported before mlxinfer, so MLX keeps its slow reference BLAS; "
            f"import mlxinfer first, or set LD_PRELOAD to libopenblas.so.0 ({BLAS_FIX})"
        )
        return _status
    for path in [requested] if requested else _candidate_paths():
        if _load_gemv_shim(path):
            _status = "openblas+gemv"
            return _status
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _status = "openblas"
        return _status
    _status = "reference"
    _warn(
        f"MLX on the CPU is using its slow reference BLAS (float32 matmuls ~20x slower); {BLAS_FIX}"
    )
    return _status


def _load_gemv_shim(openblas: str) -> bool:
    """Compile (once, into a cache dir) gemv_shim.c and load it, then OpenBLAS behind it: MLX's
    matrix-vector products then run at GEMV bandwidth (~2x decode on OpenBLAS 0.3.21). Needs a C
    compiler the first time; without one it says so once, with the fix, and returns False having
    loaded nothing. MLXINFER_GEMV_SHIM=0 skips it silently."""
    global _shim_status
    if os.environ.get("MLXINFER_GEMV_SHIM", "1") == "0":
        _shim_status = "off (MLXINFER_GEMV_SHIM=0)"
        return False
    source = Path(__file__).with_name("gemv_shim.c")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlxinfer"
    library = cache / f"gemv_shim-{digest}.so"
    if not library.is_file():
        compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if compiler is None:
            _shim_status = "skipped: no C compiler"
            _warn(
                "no C compiler found, so the gemv shim is skipped and CPU decoding runs about half "
                f"as fast; {COMPILER_FIX}, or set MLXINFER_GEMV_SHIM=0 to silence this"
            )
            return False
        cache.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        build = [compiler, "-O2", "-shared", "-fPIC", str(source), "-o", str(partial), "-ldl"]
        try:
            subprocess.run(build, check=True, capture_output=True, timeout=60)
            partial.replace(library)  # atomic: concurrent first imports never see half a file
        except (OSError, subprocess.SubprocessError) as e:
            partial.unlink(missing_ok=True)
            _shim_status = f"skipped: compiling it with {compiler} failed"
            _warn(f"{_shim_status} ({type(e).__name__}); CPU decoding runs about half as fast")
            return False
    try:
        shim = ctypes.CDLL(str(library), mode=ctypes.RTLD_LOCAL)
        if shim.mlxinfer_gemv_shim_init(openblas.encode()) != 0:
            _shim_status = "skipped: OpenBLAS has no sgemv"
            return False  # stays local: MLX never sees it
        # Global scope order decides which cblas_sgemm MLX binds: the shim first, OpenBLAS after.
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(openblas, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        _shim_status = f"skipped: loading {library} failed ({e})"
        return False
    _shim_status = f"loaded from {library}"
    return True


def gemv_shim_status() -> str:
    """What became of the gemv shim: 'loaded from PATH', 'off (...)', 'skipped: why', or
    'not tried' (not Linux, no OpenBLAS, or OpenBLAS preloaded by the user)."""
    blas_status()
    return _shim_status


def blas_status() -> str:
    """'openblas+gemv', 'openblas', 'reference', or why no BLAS was needed."""
    return _status or load_fast_blas()


def _candidate_paths() -> list[str]:
    found = ctypes.util.find_library("openblas")
    return [p for p in _CANDIDATES if Path(p).is_file()] + ([found] if found else [])


def _openblas_mapped() -> bool:
    """OpenBLAS already in the process (LD_PRELOAD, or loaded by an earlier import)? numpy's own
    copy is symbol-prefixed (scipy_openblas) and does not count."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any("libopenblas" in line and "scipy_openblas" not in line for line in maps.splitlines())


def _warn(message: str) -> None:
    print(f"mlxinfer: warning: {message}", file=sys.stderr)


# -- compute policy -------------------------------------------------------------------------------

COMPUTE_POLICIES = ("auto", "float32", "native")


def resolve_compute_policy(policy: str) -> str:
    """'auto' -> 'float32' on the CPU (MLX's CPU quantized and half-precision matmuls do not use
    BLAS and are slow), 'native' on a GPU (quantized and bf16 weights are what make Metal fast)."""
    if policy not in COMPUTE_POLICIES:
        raise ValueError(f"compute must be one of {', '.join(COMPUTE_POLICIES)}, got {policy!r}")
    if policy != "auto":
        return policy
    import mlx.core as mx

    return "float32" if mx.default_device() == mx.cpu else "native"
