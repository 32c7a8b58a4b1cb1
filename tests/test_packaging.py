"""What `pip install .` (not editable) puts on a machine: the package with its C sources and the
dashboard, so that `mlxinfer dashboard` serves every page from the installed copy, far from any
source checkout."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS, dashboard_server

ROOT = Path(__file__).resolve().parent.parent
# the installed copy only: no PYTHONPATH pointing back at a checkout
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def tracked_copy(destination: Path) -> Path:
    """The repository's tracked files (what a clean clone has), copied to `destination`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False, timeout=60
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no clean copy of the sources to install")
    for name in listed.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with mlxinfer installed from a clean copy of the sources, not editable.
    Its dependencies come from this environment's site-packages (a .pth file: no downloads),
    whose editable mlxinfer is not seen (.pth files are read only in site directories)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tracked_copy(tmp / "src")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        env=CLEAN_ENV,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (Path(purelib) / "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    result = subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=CLEAN_ENV,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    shutil.rmtree(source)  # nothing of the checkout is left to fall back on
    return venv


def test_the_installed_package_has_its_sources_and_the_dashboard(installed):
    code = (
        "import mlxinfer, pathlib; from mlxinfer.cli.dashboard import dashboard_app;"
        "package = pathlib.Path(mlxinfer.__file__).parent;"
        "print(package); print(dashboard_app());"
        "print(all((package / n).is_file() for n in ('gemv_shim.c', 'small_gemm.h',"
        " 'vector_math.h', 'flash_attention.h', 'bench/kjv_genesis.txt')))"
    )
    result = subprocess.run(
        [installed / "bin" / "python", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=installed,
        env=CLEAN_ENV,
    )
    assert result.returncode == 0, result.stderr
    package, app, sources = result.stdout.split()
    assert package.startswith(str(installed)) and sources == "True"
    assert app == f"{package}/dashboard/app.py"
    assert Path(package, "dashboard", ".streamlit", "config.toml").is_file()
    assert Path(package, "dashboard", "views", "chat.py").is_file()


@pytest.mark.browser
def test_mlxinfer_dashboard_from_a_non_editable_install_serves_the_chat(installed, tmp_path):
    """`pip install .` then `mlxinfer dashboard`: the Chat page, in Chromium."""
    from playwright.sync_api import sync_playwright

    command = [str(installed / "bin" / "mlxinfer")]
    with dashboard_server(
        command, tmp_path / "runs.sqlite", tmp_path, cwd=tmp_path, env=CLEAN_ENV
    ) as url:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(url)
            page.get_by_role("heading", name="Chat").wait_for()
            page.get_by_test_id("stChatInputTextArea").wait_for()
            for name in ("Sweep", "Results", "Metrics"):  # every page is listed
                page.get_by_role("link", name=name).first.wait_for()
            browser.close()
