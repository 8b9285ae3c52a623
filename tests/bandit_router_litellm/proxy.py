"""A real LiteLLM Proxy process on loopback, for the plug-in's tests and the gateway
benchmark: ``litellm --config <file> --port <free port>``, offline.

No network: ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (the bundled price map, not a download),
``LITELLM_TELEMETRY=False``, no ``DATABASE_URL`` (no Prisma, no spend logs), no Redis.
The proxy's output goes to a log file the tests read (the key check) and show when the
proxy does not start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fakes.openai_upstream import free_port

__all__ = ["litellm_cli", "running_proxy", "require_proxy", "decision_with_feedback",
           "MASTER_KEY"]

MASTER_KEY = "sk-litellm-test-master"  # noqa: S105 - a throwaway key of a test proxy
START_TIMEOUT_S = 180.0  # ~30 s on an idle 2-core machine; much more under load


def litellm_cli() -> str | None:
    """The ``litellm`` command of this interpreter's environment, if installed."""
    beside = Path(sys.executable).with_name("litellm")
    return str(beside) if beside.exists() else shutil.which("litellm")


def require_proxy() -> None:
    """Skip the calling test module (saying why) without the ``[litellm]`` extra."""
    pytest.importorskip("litellm", reason="the [litellm] extra is not installed "
                                          "(pip install -e '.[litellm]')")
    if litellm_cli() is None:
        pytest.skip("the litellm command is not installed (pip install -e '.[litellm]')",
                    allow_module_level=True)


def decision_with_feedback(tenant: Any, decision_id: str, timeout_s: float = 30.0, *,
                           rated: bool = False) -> dict:
    """The decision (``tenant``: a RouterClient) once LiteLLM's callback has posted its
    feedback (or after ``timeout_s``, without); ``rated``: once a row has a quality (a
    success's is the plug-in's default, learned after the tenant's wait: see
    :func:`learn_defaults_at_once`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        decision = tenant.decision(decision_id)
        fb = decision["feedback"]
        if (any(f["quality"] is not None for f in fb) if rated else fb) \
                or time.monotonic() > deadline:
            return decision
        time.sleep(0.1)


def learn_defaults_at_once(base_url: str, key: str) -> None:
    """The tenant's ``quality_wait_seconds`` to 0: the plug-in's success quality (a
    default a client's quality would replace) is learned within the applier's round."""
    r = httpx.put(f"{base_url}/v1/tenants/me/gateway", json={"quality_wait_seconds": 0},
                  headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text


@contextmanager
def running_proxy(config: Mapping[str, Any], folder: Path,
                  env: Mapping[str, str] | None = None) -> Iterator[tuple[str, Path]]:
    """Start the proxy with ``config`` (a dict, written as YAML into ``folder``); yields
    ``(base_url, log_path)``; stops it (SIGTERM, then SIGKILL) on exit."""
    cli = litellm_cli()
    if cli is None:
        raise RuntimeError("the litellm command is not installed: pip install -e '.[litellm]'")
    config_path = folder / "litellm_config.yaml"
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    log_path = folder / "litellm.log"
    port = free_port()
    child_env = {k: v for k, v in os.environ.items()
                 if not k.startswith(("DATABASE_URL", "REDIS_", "LITELLM_"))}
    child_env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
                      "NO_DOCS": "True", "PYTHONUNBUFFERED": "1"})
    child_env.update(env or {})
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 - our own venv's litellm, fixed arguments
            [cli, "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port),
             "--num_workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=folder)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, base_url, log_path)
        yield base_url, log_path
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the LiteLLM proxy exited with {process.returncode}:\n"
                               + _tail(log_path))
        try:
            if httpx.get(f"{base_url}/health/liveliness", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the LiteLLM proxy did not start within {START_TIMEOUT_S} s:\n"
                       + _tail(log_path))


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
