"""BLAS loading (in fresh processes: it must happen before mlx.core is imported) and the compute
policy."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

from mlxinfer.backend import _candidate_paths, _shim_file_name, resolve_compute_policy

HAVE_OPENBLAS = sys.platform.startswith("linux") and bool(_candidate_paths())
HAVE_COMPILER = bool(shutil.which("cc") or shutil.which("gcc"))


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLXINFER_BLAS")}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environment, **env},
    )


GEMM_CHECK = (
    "import mlxinfer, mlx.core as mx; from mlxinfer.backend import blas_status;"
    "a = mx.random.normal((64, 64)); print(blas_status(), mx.allclose(a @ mx.eye(64), a).item())"
)


@pytest.mark.skipif(not HAVE_OPENBLAS, reason="no OpenBLAS library on this machine")
def test_openblas_loaded_by_import_and_silent(tmp_path):
    result = python(GEMM_CHECK, XDG_CACHE_HOME=str(tmp_path))  # an empty cache: compiles the shim
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[1] == "True"
    assert result.stdout.split()[0] == ("openblas+gemv" if HAVE_COMPILER else "openblas")
    assert "warning" not in result.stderr
    if HAVE_COMPILER:
        assert list((tmp_path / "mlxinfer").glob("gemv_shim-*.so"))
    maps = python("import mlxinfer; print(open('/proc/self/maps').read())").stdout
    assert "libopenblas" in maps  # the resolved file, e.g. libopenblasp-r0.3.21.so


@pytest.mark.skipif(not HAVE_OPENBLAS, reason="no OpenBLAS library on this machine")
def test_one_line_warning_when_no_compiler_builds_the_shim(tmp_path):
    """Without a C compiler decode runs at half speed: say so once, with the fix."""
    empty = tmp_path / "bin"
    empty.mkdir()
    result = python(
        GEMM_CHECK + "; from mlxinfer.backend import gemv_shim_status; print(gemv_shim_status())",
        XDG_CACHE_HOME=str(tmp_path / "cache"),  # nothing compiled yet
        PATH=str(empty),  # no cc, no gcc
        CC="cc",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["openblas", "True"]
    assert "no C compiler" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line]
    assert len(warnings) == 1 and warnings[0].startswith("mlxinfer: warning: no C compiler")
    assert "half" in warnings[0] and "apt-get install gcc" in warnings[0]


@pytest.mark.skipif(not HAVE_OPENBLAS, reason="no OpenBLAS library on this machine")
def test_gemv_shim_can_be_turned_off():
    result = python(GEMM_CHECK, MLXINFER_GEMV_SHIM="0")
    assert result.stdout.split() == ["openblas", "True"]


@pytest.mark.parametrize(
    "m, k, n",
    [
        (1, 576, 1536),
        (1, 1536, 576),
        (1, 33, 7),
        (5, 64, 1),
        (1, 9, 1),
        (2, 576, 1536),
        (3, 16, 9),
        (4, 16, 9),
        (4, 576, 960),
        (7, 1536, 576),
        (16, 576, 3072),
        (9, 20, 130),
        (16, 33, 200),
        (3, 64, 192),  # a decode step's attention (the shim computes these itself: "tiny")
        (3, 192, 64),
        (2, 256, 256),  # the most it computes itself (TINY elements of B)
        (1, 257, 256),  # one row more of B: OpenBLAS's GEMV
    ],
)
@pytest.mark.parametrize("a_transposed", [False, True])
@pytest.mark.parametrize("b_transposed", [False, True])
def test_matmul_exact_through_whatever_blas_is_loaded(m, k, n, a_transposed, b_transposed):
    """This process loaded mlxinfer first (conftest), so matrix-vector products go through the
    gemv shim when it is active: every layout of A and B, alpha and beta, against float64 numpy."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(m * 100 + k + n)
    a_np, b_np = rng.normal(size=(m, k)), rng.normal(size=(k, n))
    a = mx.array(a_np.T.astype(np.float32)).T if a_transposed else mx.array(a_np.astype(np.float32))
    b = mx.array(b_np.T.astype(np.float32)).T if b_transposed else mx.array(b_np.astype(np.float32))
    expected = a_np @ b_np
    scale = np.abs(expected).max()
    assert np.abs(np.array(a @ b) - expected).max() <= 1e-5 * scale
    c = mx.array(rng.normal(size=(m, n)).astype(np.float32))
    fused = np.array(mx.addmm(c, a, b, alpha=2.0, beta=0.5))
    assert np.abs(fused - (2 * expected + 0.5 * np.array(c))).max() <= 1e-5 * scale


def test_a_batched_decode_attention_is_exact():
    """Batches of tiny products, as a decode step's attention makes (what the shim computes on
    the calling thread): [3, hd] @ [hd, S] then [3, S] @ [S, hd] per row and KV head, against
    float64 numpy."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(7)
    q = rng.normal(size=(8, 3, 3, 64))  # 8 rows, 3 KV heads, 3 query heads each, head dim 64
    k, v = rng.normal(size=(8, 3, 200, 64)), rng.normal(size=(8, 3, 200, 64))  # 200 positions
    scores = np.array(
        mx.array(q.astype(np.float32)) @ mx.array(k.astype(np.float32)).swapaxes(-1, -2)
    )
    expected = q @ k.swapaxes(-1, -2)
    assert np.abs(scores - expected).max() <= 1e-5 * np.abs(expected).max()
    p = rng.random(size=(8, 3, 3, 200))
    out = np.array(mx.array(p.astype(np.float32)) @ mx.array(v.astype(np.float32)))
    assert np.abs(out - p @ v).max() <= 1e-5 * np.abs(p @ v).max()


def test_reference_blas_when_asked():
    result = python(GEMM_CHECK, MLXINFER_BLAS="reference")
    assert result.stdout.split() == ["reference", "True"]


def test_one_line_warning_when_mlx_imported_first():
    if not sys.platform.startswith("linux"):
        pytest.skip("BLAS loading is a Linux matter")
    result = python(
        "import mlx.core; import mlxinfer; import mlxinfer.backend as b; b.load_fast_blas()"
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("mlxinfer: warning")]
    assert len(warnings) == 1
    assert "import mlxinfer first" in warnings[0] and "libopenblas0-pthread" in warnings[0]


def test_one_line_warning_when_no_openblas_found():
    if not sys.platform.startswith("linux"):
        pytest.skip("BLAS loading is a Linux matter")
    result = python(GEMM_CHECK, MLXINFER_BLAS="/nonexistent/libopenblas.so.0")
    assert result.stdout.split() == ["reference", "True"]
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "reference BLAS" in warnings[0]


def test_compute_policy():
    import mlx.core as mx

    assert resolve_compute_policy("native") == "native"
    assert resolve_compute_policy("float32") == "float32"
    expected = "float32" if mx.default_device() == mx.cpu else "native"
    assert resolve_compute_policy("auto") == expected
    with pytest.raises(ValueError, match="compute must be one of auto, float32, native"):
        resolve_compute_policy("fast")


# -- where the gemv shim may be loaded from -------------------------------------------------------

SHIM_CHECK = (
    GEMM_CHECK + "; from mlxinfer.backend import gemv_shim_status; print(gemv_shim_status())"
)


def shim_run(cache, **env: str) -> tuple[list[str], str, list[str]]:
    """(blas status and matmul check, shim status, warning lines) of a fresh `import mlxinfer`."""
    result = python(SHIM_CHECK, XDG_CACHE_HOME=str(cache), **env)
    assert result.returncode == 0, result.stderr
    first, status = result.stdout.splitlines()
    return first.split(), status, [line for line in result.stderr.splitlines() if line]


def compiled_shim(cache) -> str:
    """A cache holding a shim compiled by an ordinary first import; the library's path."""
    blas, status, warnings = shim_run(cache)
    assert blas == ["openblas+gemv", "True"] and not warnings
    assert status.startswith("loaded from ")
    return status.removeprefix("loaded from ")


needs_shim = pytest.mark.skipif(
    not (HAVE_OPENBLAS and HAVE_COMPILER), reason="needs OpenBLAS and a C compiler"
)


@needs_shim
def test_shim_compiled_into_a_private_directory(tmp_path):
    """The cache directory is created 0700 and the library is written through a unique temporary
    file, even under umask 0: nothing else can write where the process loads code from."""
    cache = tmp_path / "cache"
    result = python("import os; os.umask(0); " + SHIM_CHECK, XDG_CACHE_HOME=str(cache))
    assert result.returncode == 0 and not result.stderr, result.stderr
    library = cache / "mlxinfer" / _shim_file_name()
    assert result.stdout.splitlines() == ["openblas+gemv True", f"loaded from {library}"]
    assert os.stat(cache / "mlxinfer").st_mode & 0o777 == 0o700
    assert os.stat(library).st_mode & 0o022 == 0
    assert os.listdir(cache / "mlxinfer") == [library.name]  # no temporary file left behind
    assert shim_run(cache) == (["openblas+gemv", "True"], f"loaded from {library}", [])  # reused


@needs_shim
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o720], ids=oct)
def test_shim_refused_from_a_directory_others_can_write(tmp_path, mode):
    library = compiled_shim(tmp_path)
    os.chmod(tmp_path / "mlxinfer", mode)
    blas, status, warnings = shim_run(tmp_path)
    assert blas == ["openblas", "True"]  # OpenBLAS without the shim
    directory = tmp_path / "mlxinfer"
    assert status == (
        f"skipped: refused the cache directory {directory}: writable by group or others "
        f"(mode {mode:o}); chmod go-w it"
    )
    assert len(warnings) == 1 and warnings[0].startswith("mlxinfer: warning: the gemv shim")
    assert str(directory) in warnings[0] and "writable by group or others" in warnings[0]
    assert os.path.exists(library)  # left alone: the user decides


@needs_shim
@pytest.mark.parametrize("mode", [0o666, 0o757, 0o620], ids=oct)
def test_shim_refused_when_others_can_write_the_library(tmp_path, mode):
    """A library that group or others could have replaced is never loaded."""
    library = compiled_shim(tmp_path)
    os.chmod(library, mode)
    blas, status, warnings = shim_run(tmp_path)
    assert blas == ["openblas", "True"]
    reason = f"writable by group or others (mode {mode:o}); delete it to rebuild it"
    assert status == f"skipped: refused {library}: {reason}"
    assert len(warnings) == 1 and library in warnings[0] and reason in warnings[0]


@needs_shim
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
@pytest.mark.parametrize("what", ["directory", "library"])
def test_shim_refused_when_another_user_owns_it(tmp_path, what):
    library = compiled_shim(tmp_path)
    os.chown(tmp_path / "mlxinfer" if what == "directory" else library, 65534, -1)
    blas, status, warnings = shim_run(tmp_path)
    assert blas == ["openblas", "True"]
    assert "owned by uid 65534, not by this user (uid 0)" in status
    assert len(warnings) == 1 and "owned by uid 65534" in warnings[0]


@needs_shim
def test_shim_refused_through_a_symlink(tmp_path):
    library = compiled_shim(tmp_path / "real")
    (tmp_path / "mlxinfer").mkdir(mode=0o700)
    os.symlink(library, tmp_path / "mlxinfer" / _shim_file_name())
    blas, status, warnings = shim_run(tmp_path)
    assert blas == ["openblas", "True"]
    assert status.endswith("not a regular file; delete it to rebuild it")
    assert len(warnings) == 1


@needs_shim
def test_garbage_library_is_one_warning(tmp_path):
    """A truncated or foreign file under the library's name: one warning naming it, no crash."""
    (tmp_path / "mlxinfer").mkdir(mode=0o700)
    library = tmp_path / "mlxinfer" / _shim_file_name()
    library.write_bytes(b"not a shared library")
    blas, status, warnings = shim_run(tmp_path)
    assert blas == ["openblas", "True"]
    assert status.startswith(f"skipped: loading {library} failed")
    assert len(warnings) == 1 and str(library) in warnings[0]


@pytest.mark.skipif(not HAVE_OPENBLAS, reason="no OpenBLAS library on this machine")
def test_unusable_cache_directory_never_fails_the_import():
    result = python(SHIM_CHECK, XDG_CACHE_HOME="/proc/nope")
    assert result.returncode == 0, result.stderr
    blas, status = result.stdout.splitlines()
    assert blas.split() == ["openblas", "True"]
    assert status == (
        "skipped: cannot create the cache directory /proc/nope/mlxinfer (No such file or directory)"
    )
    warnings = [line for line in result.stderr.splitlines() if line]
    assert len(warnings) == 1 and "/proc/nope/mlxinfer" in warnings[0]


@needs_shim
def test_relative_cache_home_is_ignored(tmp_path, monkeypatch):
    """A relative XDG_CACHE_HOME would load code from wherever the process starts: the XDG spec
    says to ignore it, so ~/.cache is used."""
    monkeypatch.chdir(tmp_path)
    blas, status, warnings = shim_run("cache", HOME=str(tmp_path / "home"))
    library = tmp_path / "home" / ".cache" / "mlxinfer" / _shim_file_name()
    assert (blas, status, warnings) == (["openblas+gemv", "True"], f"loaded from {library}", [])
    assert not (tmp_path / "cache").exists()


@needs_shim
def test_failed_compile_is_one_warning(tmp_path):
    compiler = tmp_path / "bin" / "cc"
    compiler.parent.mkdir()
    compiler.write_text("#!/bin/sh\necho 'cc: fatal error: out of cheese' >&2\nexit 1\n")
    compiler.chmod(0o755)
    blas, status, warnings = shim_run(tmp_path / "cache", CC=str(compiler))
    assert blas == ["openblas", "True"]
    assert status.startswith("skipped: compiling ") and f"with {compiler} failed" in status
    assert "exit status 1: cc: fatal error: out of cheese" in status
    assert len(warnings) == 1 and "out of cheese" in warnings[0]
    assert os.listdir(tmp_path / "cache" / "mlxinfer") == []  # the temporary file is removed


# -- the package import loads no MLX --------------------------------------------------------------


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime ARGS`; the modules it imported."""
    environment = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return result, {line.rsplit("|", 1)[1].strip() for line in lines[1:]}


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_mlx(flag):
    result, modules = imported_modules("-m", "mlxinfer", flag)
    assert result.returncode == 0, result.stderr
    assert "mlxinfer.cli" in modules and "mlxinfer.backend" in modules
    assert not {m for m in modules if m == "mlx" or m.startswith("mlx.")}
    assert (
        ("usage: mlxinfer" in result.stdout)
        if flag == "--help"
        else (result.stdout.startswith("mlxinfer 0.1.0 (MLX "))
    )


def test_public_api_imported_on_first_use():
    result = python(
        "import sys, mlxinfer, mlxinfer.cli; from mlxinfer.backend import blas_status;"
        "print('mlx.core' in sys.modules, blas_status());"
        "mlxinfer.load; print('mlx.core' in sys.modules, blas_status())"
    )
    assert result.returncode == 0, result.stderr
    before, after = result.stdout.splitlines()
    assert before.split()[0] == "False" and after.split()[0] == "True"
    assert before.split()[1:] == after.split()[1:]  # BLAS chosen before MLX came in


def test_every_public_name_resolves():
    """`mlxinfer.X` and `from mlxinfer import X` for every X in __all__, `dir()` lists them, and
    `mlxinfer.generate` stays the function after the submodule of that name is imported."""
    result = python(
        "import mlxinfer, mlxinfer.generate, inspect, sys;"
        "from mlxinfer.generate import generate_tokens;"
        "assert mlxinfer.generate is sys.modules['mlxinfer.generate'].generate;"
        "from mlxinfer import *;"
        "names = mlxinfer.__all__;"
        "assert all(globals()[n] is getattr(mlxinfer, n) for n in names);"
        "assert set(names) <= set(dir(mlxinfer)), set(names) - set(dir(mlxinfer));"
        "assert not inspect.ismodule(mlxinfer.generate);"
        "exec('from mlxinfer import ' + ', '.join(names));"
        "print(len(names), mlxinfer.__version__)"
    )
    assert result.returncode == 0, result.stderr
    import mlxinfer

    assert result.stdout.split() == [str(len(mlxinfer.__all__)), mlxinfer.__version__]
    # 22: CacheSpec and EngineOptions joined the 20
    assert len(set(mlxinfer.__all__)) == len(mlxinfer.__all__) == 22
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        mlxinfer.no_such_name  # noqa: B018


# -- the few-row kernel: chosen by the CPU's features, checked against OpenBLAS -----------------

KERNEL_REPORT = (
    "import json, mlxinfer; from mlxinfer.backend import gemv_kernel;"
    "print(json.dumps(gemv_kernel()))"
)


def kernel_report(**env: str) -> tuple[dict, list[str]]:
    """gemv_kernel() of a fresh process, and its warning lines."""
    result = python(KERNEL_REPORT, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), [line for line in result.stderr.splitlines() if line]


def cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo").read().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@needs_shim
def test_kernel_chosen_by_features_not_by_cpu_model():
    """GCC's target_clones("arch=haswell") resolver compared the CPU model with Haswell's, so every
    AMD CPU (and every Intel one that is not a Haswell without AVX-512) ran the SSE2 clone: 0.45x
    mlx-lm's batched decoding on a Zen 3. A CPU with AVX2 and FMA must get a wider kernel."""
    report, warnings = kernel_report()
    assert not warnings
    flags = cpu_flags()
    runnable = report["runnable"].split(", ")
    if platform.machine() in ("x86_64", "AMD64"):
        if {"avx2", "fma"} <= flags:
            assert report["selected"] in ("avx2", "avx512")
            assert "avx2" in runnable
        if "avx512f" in flags:
            assert report["selected"] == "avx512"
        if not {"avx2", "fma"} <= flags:
            assert report["selected"] == "generic"
        assert runnable[-1] == "generic"
    elif platform.machine() == "aarch64":
        assert report["selected"] == "neon" and runnable == ["neon"]


@needs_shim
def test_kernel_in_use_follows_its_own_check():
    """The check against OpenBLAS's GEMM decides: the kernel keeps the row counts where its time
    was not worse, OpenBLAS takes the rest (or everything)."""
    report, _ = kernel_report()
    in_use = report["in_use"]
    numbers = [float(x) for x in re.findall(r"(\d+\.\d+)", in_use)]
    if in_use.startswith("openblas"):
        small, blas = numbers
        assert small >= blas and report["selected"] in in_use  # printed to 0.01 ms
        return
    assert in_use.startswith(report["selected"] + ", 2-")
    small16, blas16, small8, blas8 = numbers
    rows = int(re.search(r"2-(\d+) rows", in_use).group(1))
    if small16 != blas16:  # equal to the printed 0.01 ms: either way
        assert rows == (16 if small16 < blas16 else 8)
    assert small8 <= blas8


@needs_shim
@pytest.mark.parametrize("kernel", ["avx512", "avx2", "generic", "neon", "openblas"])
def test_every_kernel_exact(kernel):
    """Each variant the CPU can run, forced, gives the products of numpy's float64 on every
    layout and row count the shim takes (2-16 rows, B stored either way, alpha and beta)."""
    report, _ = kernel_report()
    if kernel != "openblas" and kernel not in report["runnable"].split(", "):
        pytest.skip(f"this CPU cannot run {kernel} ({report['runnable']})")
    code = (
        "import mlxinfer, mlx.core as mx, numpy as np\n"
        "from mlxinfer.backend import gemv_kernel\n"
        "assert gemv_kernel()['in_use'].startswith(" + repr(kernel) + "), gemv_kernel()\n"
        "rng = np.random.default_rng(0)\n"
        "worst = 0.0\n"
        "for m, k, n in [(2, 576, 960), (3, 100, 300), (4, 576, 960), (5, 64, 300), (8, 576, 1536), (11, 100, 257), (16, 1536, 576), (16, 33, 1000)]:\n"
        "    for tb in (False, True):\n"
        "        a_np, b_np = rng.normal(size=(m, k)), rng.normal(size=(k, n))\n"
        "        a = mx.array(a_np.astype(np.float32))\n"
        "        b = mx.array(b_np.T.astype(np.float32)).T if tb else mx.array(b_np.astype(np.float32))\n"
        "        c = mx.array(rng.normal(size=(m, n)).astype(np.float32))\n"
        "        expected = a_np @ b_np\n"
        "        scale = np.abs(expected).max()\n"
        "        worst = max(worst, np.abs(np.array(a @ b) - expected).max() / scale)\n"
        "        fused = np.array(mx.addmm(c, a, b, alpha=2.0, beta=0.5))\n"
        "        worst = max(worst, np.abs(fused - (2 * expected + 0.5 * np.array(c))).max() / scale)\n"
        "print(worst)\n"
    )
    result = python(code, MLXINFER_GEMV_KERNEL=kernel)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) <= 1e-5


@needs_shim
def test_a_kernel_this_cpu_cannot_run_is_refused_in_one_line():
    report, warnings = kernel_report(MLXINFER_GEMV_KERNEL="sse9")
    assert len(warnings) == 1 and "MLXINFER_GEMV_KERNEL=sse9" in warnings[0]
    assert report["runnable"] in warnings[0]
    assert report["in_use"].split(",")[0].split(" ")[0] in (report["selected"], "openblas")


PREFILL_REPORT = (
    "import json, mlxinfer; from mlxinfer.backend import gemv_kernel, prefill_kernel_summary;"
    "print(json.dumps([gemv_kernel()['selected'], prefill_kernel_summary()]))"
)


@needs_shim
@pytest.mark.parametrize(
    "env, expected",
    [({}, "selected"), ({"MLXINFER_GEMV_KERNEL": "generic"}, "generic")]
    + [({"MLXINFER_NATIVE_PREFILL": "0"}, "off (MLXINFER_NATIVE_PREFILL=0)")],
)
def test_prefill_kernels_follow_the_features_or_the_forced_variant(env, expected):
    """The C prefill kernels (attention, SwiGLU) run the variant the CPU's features select, the
    one MLXINFER_GEMV_KERNEL forces, or none with MLXINFER_NATIVE_PREFILL=0; never the generic one
    on a CPU with AVX2 and FMA unless forced."""
    result = python(PREFILL_REPORT, **env)
    assert result.returncode == 0, result.stderr
    selected, prefill = json.loads(result.stdout)
    assert prefill == (selected if expected == "selected" else expected)
    if not env and {"avx2", "fma"} <= cpu_flags():
        assert prefill in ("avx2", "avx512")


def test_machine_facts_name_the_kernel_without_the_checks_timings():
    """Runs are grouped by their machine facts: the check's figures change from process to
    process, so the facts keep the kernel and its rows only."""
    from mlxinfer.backend import gemv_kernel
    from mlxinfer.bench.machine import machine_facts

    facts = machine_facts()
    assert "ms" not in facts["gemv_kernel"]
    kernel = gemv_kernel()
    if kernel is not None:
        assert kernel["in_use"].startswith(facts["gemv_kernel"])
    # the SIMD flags of /proc/cpuinfo that choose the kernel, in the order the facts list them
    simd = ("avx512f", "avx2", "fma", "asimd", "sve")
    assert facts["cpu_features"] == " ".join(f for f in simd if f in cpu_flags())
