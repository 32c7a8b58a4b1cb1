"""BLAS loading (in fresh processes: it must happen before mlx.core is imported) and the compute
policy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from mlxinfer.backend import _candidate_paths, resolve_compute_policy

HAVE_OPENBLAS = sys.platform.startswith("linux") and bool(_candidate_paths())
HAVE_COMPILER = bool(shutil.which("cc") or shutil.which("gcc"))


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLXINFER_BLAS")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**environment, **env},
    )  # fmt: skip


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
    "m, k, n", [(1, 576, 1536), (1, 1536, 576), (1, 33, 7), (5, 64, 1), (1, 9, 1), (3, 16, 9)]
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
