"""``bandit-router serve`` writes JSON log lines with the request id (a real process)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, port: int, timeout_s: float = 60.0) -> None:
    """Until the served process answers /readyz with 200 (fails if it exits first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, "serve exited before it was ready"
        assert time.monotonic() < deadline, f"serve not ready within {timeout_s:g} s"
        time.sleep(0.2)


def test_serve_json_logs_carry_request_id(tmp_path):
    port = free_port()
    env = {**os.environ, "BANDIT_ROUTER_DATA_DIR": str(tmp_path),
           "BANDIT_ROUTER_ADMIN_KEY": "bra_test-logs-0123456789abcdefghijklmnopqrstuvwxyz"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                             "--access-log"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(proc, port)
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"X-Request-ID": "trace-me"})
        assert r.headers["x-request-id"] == "trace-me"
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    access = [entry for entry in lines if entry.get("request_id") == "trace-me"]
    assert len(access) == 1, stderr[-2000:]
    assert access[0]["logger"] == "service.access" and access[0]["path"] == "/healthz"
    assert access[0]["status"] == 200
    # uvicorn's own lines are JSON too (no text access line alongside ours).
    assert any(entry["logger"].startswith("uvicorn") for entry in lines)
    assert "GET /healthz HTTP/1.1" not in stderr
