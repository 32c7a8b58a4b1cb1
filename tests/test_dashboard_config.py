"""`streamlit run dashboard/app.py`, the README's other way in, listens on this machine only
(dashboard/.streamlit/config.toml), from whatever directory it is started in."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def other_addresses() -> list[str]:
    """This machine's IPv4 addresses that are not loopback (none on some sandboxes)."""
    addresses = set()
    try:
        addresses |= {
            info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        }
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
            addresses.add(s.getsockname()[0])
        except OSError:
            pass
    return sorted(a for a in addresses if not a.startswith("127.") and a != "0.0.0.0")


def connects(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


def test_streamlit_run_listens_on_localhost_only(tmp_path):
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()  # no user config: the dashboard's own must do it
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(APP),
            "--server.port",
            str(port),
            "--server.headless",
            "true",
        ],
        cwd=tmp_path,
        env={**os.environ, "HOME": str(home), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        # the address it prints comes after it listens: wait for both
        while time.monotonic() < deadline and not (
            connects("127.0.0.1", port) and any("URL" in line for line in lines)
        ):
            assert process.poll() is None, "".join(lines)
            time.sleep(0.2)
        assert connects("127.0.0.1", port)
        for address in other_addresses():
            assert not connects(address, port), f"the dashboard answers on {address}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        reader.join(timeout=10)
    output = "".join(lines)
    assert "Network URL" not in output
    assert f"http://127.0.0.1:{port}" in output
