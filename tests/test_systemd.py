"""sd_notify over a real AF_UNIX datagram socket, and the unit file."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from edgeva.systemd import Notifier

REPO = Path(__file__).resolve().parents[1]


def _recv_fields(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_messages_reach_the_socket(tmp_path, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(2)
    if abstract:
        name = f"edgeva-test-{os.getpid()}"
        sock.bind("\0" + name)
        env = {"NOTIFY_SOCKET": "@" + name}
    else:
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        env = {"NOTIFY_SOCKET": path}
    env.update(WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid()))
    n = Notifier(env)
    try:
        assert n.enabled and n.watchdog_interval_s == 2.0
        assert n.ready("1 camera")
        fields = _recv_fields(sock)
        assert fields["READY"] == "1" and fields["STATUS"] == "1 camera" and fields["MAINPID"] == str(os.getpid())
        assert n.watchdog_due()
        n.watchdog()
        assert _recv_fields(sock) == {"WATCHDOG": "1"}
        assert not n.watchdog_due()
        n.reloading()
        assert _recv_fields(sock)["RELOADING"] == "1"
        n.stopping()
        assert _recv_fields(sock)["STOPPING"] == "1"
    finally:
        n.close()
        sock.close()


def test_disabled_outside_systemd_and_foreign_watchdog_pid():
    n = Notifier({})
    assert not n.enabled and not n.ready() and not n.watchdog_due()
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent/sock", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval_s is None
    assert n.ready() is False  # a missing socket is logged, never raised


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_file_verifies(tmp_path):
    unit = tmp_path / "edgeva.service"
    # verify needs ExecStart's binary to exist: point it at a real executable, keep the rest.
    text = (REPO / "systemd" / "edgeva.service").read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    unit.write_text(text.replace(exec_start, f"ExecStart={shutil.which('true')} run"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "edgeva.service" in line and "Failed to" not in line or "Unknown" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
    for option in ("Type=notify", "WatchdogSec=", "NoNewPrivileges=yes", "ProtectSystem=strict",
                   "PrivateTmp=yes", "DynamicUser=yes", "RuntimeDirectory=edgeva", "ExecReload="):
        assert option in text
