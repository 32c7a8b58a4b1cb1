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
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
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
# Force the shim's few-row kernel: avx512, avx2, generic (neon on AArch64), or openblas.
KERNEL_ENV = "MLXINFER_GEMV_KERNEL"
NATIVE_PREFILL_ENV = "MLXINFER_NATIVE_PREFILL"  # 0: prefill attention and SwiGLU by MLX's ops
CHECK_ENV = "MLXINFER_GEMV_CHECK"  # 1: time even a forced kernel against OpenBLAS; 0: never
SHIM_SOURCES = (  # headers: included per ISA
    "gemv_shim.c",
    "small_gemm.h",
    "vector_math.h",
    "decode_attention.h",
    "flash_attention.h",
)
SHIM_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]  # OpenMP: small_gemm's threads

_status: str | None = None  # what load_fast_blas found; see blas_status()
_shim_status = "not tried"  # what became of the gemv shim; see gemv_shim_status()
_shim: ctypes.CDLL | None = None  # the loaded shim, for gemv_kernel()


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
    prepared = _prepare_shim()
    if prepared is None:
        return False
    shim, library = prepared
    kernel = os.environ.get(KERNEL_ENV, "")
    check = {"0": 0, "1": 1}.get(os.environ.get(CHECK_ENV, ""), -1)
    try:
        shim.mlxinfer_gemv_shim_init.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        code = shim.mlxinfer_gemv_shim_init(openblas.encode(), kernel.encode(), check)
        if code == 2:  # a forced kernel this CPU cannot run (or no such kernel): choose by features
            _warn(
                f"{KERNEL_ENV}={kernel} is not one of the kernels this CPU can run "
                f"({_shim_text(shim.mlxinfer_gemv_shim_kernels, 1)}, openblas); "
                "choosing by the CPU's features"
            )
            code = shim.mlxinfer_gemv_shim_init(openblas.encode(), b"", check)
        if code != 0:
            _shim_status = "skipped: OpenBLAS has no sgemv"
            return False  # stays local: MLX never sees it
        # Global scope order decides which cblas_sgemm MLX binds: the shim first, OpenBLAS after.
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(openblas, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        _shim_status = f"skipped: loading {library} failed ({_reason(e)})"
        return False
    _shim_status = f"loaded from {library}"
    global _shim
    _shim = shim
    return True


@functools.cache  # once per process, whichever OpenBLAS candidates are tried: one warning at most
def _prepare_shim() -> tuple[ctypes.CDLL, Path] | None:
    """The compiled shim, loaded locally (its cblas_sgemm not yet visible), and its path; or None
    with `_shim_status` saying why.

    The library replaces cblas_sgemm in this process, so it is loaded only from a directory and a
    file that nobody but this user can write: both owned by the user, neither writable by group or
    others (see `_untrusted`). Anything else, a cache directory that cannot be made, a failed
    compile or a library that does not load is one warning line, never a failed import."""
    global _shim_status
    if os.environ.get("MLXINFER_GEMV_SHIM", "1") == "0":
        _shim_status = "off (MLXINFER_GEMV_SHIM=0)"
        return None
    source = Path(__file__).with_name("gemv_shim.c")
    try:
        cache = _shim_cache_dir()
    except RuntimeError as e:  # Path.home() found no home directory
        return _skip_shim(f"no cache directory ({e}); set XDG_CACHE_HOME")
    try:
        library = cache / _shim_file_name()
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)  # the mode applies to the last part
    except OSError as e:
        return _skip_shim(f"cannot create the cache directory {cache} ({_reason(e)})")
    if problem := _untrusted(cache, directory=True):
        fix = "chmod go-w it" if "writable" in problem else "set XDG_CACHE_HOME elsewhere"
        return _skip_shim(f"refused the cache directory {cache}: {problem}; {fix}")
    if not os.path.lexists(library):
        compiler = c_compiler()
        if compiler is None:
            _shim_status = "skipped: no C compiler"
            _warn(
                "no C compiler found, so the gemv shim is skipped and CPU decoding runs about half "
                f"as fast; {COMPILER_FIX}, or set MLXINFER_GEMV_SHIM=0 to silence this"
            )
            return None
        if not _compile_shim(compiler, source, library):
            return None
    if problem := _untrusted(library, directory=False):
        return _skip_shim(f"refused {library}: {problem}; delete it to rebuild it")
    try:
        shim = ctypes.CDLL(str(library), mode=ctypes.RTLD_LOCAL)
        shim.mlxinfer_gemv_shim_init  # noqa: B018 (a library without it is not the shim)
    except (OSError, AttributeError) as e:
        return _skip_shim(f"loading {library} failed ({_reason(e)}); delete it to rebuild it")
    return shim, library


def _shim_cache_dir() -> Path:
    """$XDG_CACHE_HOME/mlxinfer, or ~/.cache/mlxinfer (a relative XDG_CACHE_HOME is ignored, as
    the XDG spec says: it would depend on the working directory)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "mlxinfer"


def _shim_file_name() -> str:
    """The compiled library's name: a new source gets a new file."""
    sources = [Path(__file__).with_name(name) for name in SHIM_SOURCES]
    digest = hashlib.sha256(
        b"".join(s.read_bytes() for s in sources) + " ".join(SHIM_FLAGS).encode()
    )
    return f"gemv_shim-{digest.hexdigest()[:16]}.so"


def _compile_shim(compiler: str, source: Path, library: Path) -> bool:
    """Compile into a fresh, unpredictably named file in the (private) cache directory, then rename
    it: concurrent first imports never see half a file, and nothing can be planted at the name the
    compiler writes."""
    partial = None
    try:
        fd, name = tempfile.mkstemp(prefix=f"{library.stem}.", suffix=".tmp", dir=library.parent)
        os.close(fd)
        partial = Path(name)
        build = [compiler, *SHIM_FLAGS, str(source), "-o", name, "-ldl", "-lpthread"]
        try:
            subprocess.run(build, check=True, capture_output=True, timeout=60)
        except subprocess.CalledProcessError:  # no OpenMP runtime: small_gemm on one thread
            build.remove("-fopenmp")
            subprocess.run(build, check=True, capture_output=True, timeout=60)
        os.chmod(partial, 0o755)  # the linker may recreate the file with the umask's mode
        os.replace(partial, library)
        return True
    except (OSError, subprocess.SubprocessError) as e:
        if partial is not None:
            partial.unlink(missing_ok=True)
        _skip_shim(f"compiling {source} with {compiler} failed ({_reason(e)})")
        return False


def _untrusted(path: Path, directory: bool) -> str | None:
    """Why `path` must not be trusted with this process's code, or None: it must be a directory
    (followed through symlinks) or a regular file (not a symlink), owned by this user, and not
    writable by group or others."""
    try:
        st = os.stat(path) if directory else os.lstat(path)
    except OSError as e:
        return _reason(e)
    if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
        return "not a directory" if directory else "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _skip_shim(why: str) -> None:
    """The shim is off for a reason the user should hear: one warning line; the status says why."""
    global _shim_status
    _shim_status = f"skipped: {why}"
    _warn(f"the gemv shim is skipped, so CPU decoding runs about half as fast: {why}")


def _reason(e: BaseException) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        errors = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        return f"exit status {e.returncode}" + (f": {errors[0][:200]}" if errors else "")
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def c_compiler() -> str | None:
    """The C compiler the shim is built with: $CC, else cc, else gcc; None when there is none."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo on Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


SIMD_FLAGS = ("avx512f", "avx2", "fma", "asimd", "sve")  # what decides the shim's kernel


def cpu_features() -> str:
    """The SIMD features that matter here, from /proc/cpuinfo's flags (x86) or Features
    (AArch64): e.g. "avx512f avx2 fma"; "" where unknown."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return ""
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            present = set(line.split(":", 1)[1].split())
            return " ".join(flag for flag in SIMD_FLAGS if flag in present)
    return ""


def gemv_kernel_summary(timings: bool = True) -> str:
    """One line for reports: the few-row kernel in use (see gemv_kernel), or why there is none.
    `timings=False` drops the check's figures, which differ from process to process ("avx512,
    2-16 rows"): for the machine facts runs are grouped by."""
    kernel = gemv_kernel()
    if kernel is None:
        return f"none (gemv shim {gemv_shim_status()})"
    return kernel["in_use"] if timings else kernel["in_use"].split(" (")[0]


def gemv_shim_status() -> str:
    """What became of the gemv shim: 'loaded from PATH', 'off (...)', 'skipped: why' (no compiler,
    a failed compile, a cache directory or library file it refused and why), or 'not tried' (not
    Linux, no OpenBLAS, or OpenBLAS preloaded by the user)."""
    blas_status()
    return _shim_status


def gemv_kernel() -> dict[str, str] | None:
    """The shim's few-row kernel (batched decoding's matmuls), or None without the shim:
    `selected` is what the CPU's features choose (avx512, avx2, generic; neon on AArch64);
    `runnable` the kernels this CPU can run; `in_use` what runs and why, after the one-time check
    against OpenBLAS's GEMM (a kernel slower than OpenBLAS is not used), or forced by
    MLXINFER_GEMV_KERNEL. Asking for `in_use` runs that check (~10 ms) if no batch has yet."""
    blas_status()
    if _shim is None:
        return None
    return {
        "selected": _shim_text(_shim.mlxinfer_gemv_shim_feature_kernel),
        "runnable": _shim_text(_shim.mlxinfer_gemv_shim_kernels, 1),
        "in_use": _shim_text(_shim.mlxinfer_gemv_shim_kernel_status),
    }


class AttentionJob(ctypes.Structure):
    """gemv_shim.c's attention_job: q `[B, H, T, hd]` over k, v `[B, KV, S, hd]` (strides in
    floats for the first three axes), out `[B, H, T, hd]` contiguous; row b's keys the first
    `lengths[b]` of S when lengths is set."""

    _fields_ = [
        *((name, ctypes.c_int) for name in ("B", "H", "KV", "T", "S", "hd")),
        ("scale", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in ("q", "k", "v")),
        *((name, ctypes.c_long * 3) for name in ("q_strides", "k_strides", "v_strides")),
        ("out", ctypes.c_void_p),
        ("query_block", ctypes.c_int),
        ("lengths", ctypes.c_void_p),  # int32 [B]: keys each row holds (a batch's decode), or NULL
    ]


_NATIVE_SIGNATURES = {
    "mlxinfer_attention": [ctypes.POINTER(AttentionJob), ctypes.c_int],
    # gate, up, out, n, variant
    "mlxinfer_swiglu": [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_long,
        ctypes.c_int,
    ],
}


def native_prefill_kernel(name: str):
    """One of the shim's prefill kernels, `mlxinfer_attention` (causal attention of a chunk, taking
    an AttentionJob) or `mlxinfer_swiglu`, ready to call (returns 0 when done); None without the
    shim or with MLXINFER_NATIVE_PREFILL=0."""
    blas_status()
    if _shim is None or os.environ.get(NATIVE_PREFILL_ENV, "1") == "0":
        return None
    return _native_function(name)


@functools.cache  # once per kernel: every layer of every prefill chunk asks for it
def _native_function(name: str):
    function = getattr(_shim, name)
    function.argtypes = _NATIVE_SIGNATURES[name]
    function.restype = ctypes.c_int
    return function


def prefill_kernel_summary() -> str:
    """The variant of the native prefill kernels ("avx512", "avx2", "generic", "neon"), or why
    there is none."""
    if native_prefill_kernel("mlxinfer_attention") is None:
        if _shim is None:
            return f"none (gemv shim {gemv_shim_status()})"
        return f"off ({NATIVE_PREFILL_ENV}=0)"
    return _shim_text(_shim.mlxinfer_prefill_kernel)


def kernel_index(name: str) -> int:
    """The shim's index of a kernel variant by name (avx512, avx2, generic, neon), for forcing one
    in a call (`mlxinfer_attention`'s variant); ValueError for a name this build lacks."""
    blas_status()
    names = _shim_text(_shim.mlxinfer_gemv_shim_kernels, 0).split(", ") if _shim else []
    if name not in names:
        raise ValueError(f"no kernel {name!r} in the gemv shim (it has: {', '.join(names)})")
    return names.index(name)


def _shim_text(function, *args) -> str:
    function.restype = ctypes.c_char_p
    return function(*args).decode()


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
