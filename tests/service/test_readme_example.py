"""The examples of README.md and docs/api.md run as written against a real service, and
answer what they say they answer.

The shell blocks are read from the documents themselves: each ``curl`` is sent as
written (its path, headers and body), each ``bandit-router`` line runs through the
command line, and each documented answer (a ``# -> {...}`` comment, or the JSON block
that follows a request) is compared with the real one.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from service.cli import app as cli_app
from service.client import RouterClient
from service.config import Settings
from tests.service.conftest import ADMIN_KEY, make_settings
from tests.service.live import live_server

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
API_DOC = ROOT / "docs" / "api.md"
# What a user gets: the default dimension (the other tests use a small one), and a fixed
# seed so that the 1% of exploration is the same on every run.
DEFAULT_DIM = Settings.model_fields["dim"].default


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.DOTALL)


def _commands(block: str) -> list[tuple[str, str]]:
    """``(command, documented answer)`` pairs: continuation lines joined, the ``# ->``
    comment that follows a command taken as its answer ('' when there is none)."""
    out: list[tuple[str, str]] = []
    for line in block.replace("\\\n", " ").splitlines():
        stripped = line.strip()
        if stripped.startswith("# ->") and out:
            out[-1] = (out[-1][0], stripped.removeprefix("# ->").strip())
        elif stripped and not stripped.startswith("#"):
            out.append((stripped, ""))
    return out


def _curl(client: httpx.Client, command: str, variables: dict[str, str]) -> httpx.Response:
    for name, value in variables.items():
        command = command.replace(f'"${name}"', shlex.quote(value))
    args = shlex.split(command)
    assert args[0] == "curl", command
    url = next(a for a in args[1:] if a.startswith("localhost:"))
    headers = dict(h.split(": ", 1) for h in (args[i + 1] for i, a in enumerate(args)
                                              if a == "-H"))
    body = args[args.index("-d") + 1] if "-d" in args else None
    method = args[args.index("-X") + 1] if "-X" in args else "POST" if body else "GET"
    return client.request(method, url.removeprefix("localhost:8000"),
                          headers=headers, content=body)


def _documented_pairs(comment: str) -> dict[str, Any]:
    """The top-level ``"key": value`` pairs a ``# ->`` comment shows (``...`` elided)."""
    pairs = re.findall(r'"(\w+)": ("[^"]*"|-?[0-9]+(?:\.[0-9]+)?|true|false)', comment)
    return {key: json.loads(value) for key, value in pairs}


def _check(documented: Any, real: Any, where: str) -> None:
    """``real`` has every leaf ``documented`` shows. A string ending in "..." stands for
    any string, with the same key prefix if it shows one ("brt_...")."""
    if isinstance(documented, str) and documented.endswith("..."):
        prefix = documented.partition("_")[0] + "_" if "_" in documented else ""
        assert isinstance(real, str) and real.startswith(prefix), (where, real)
    elif isinstance(documented, dict):
        assert isinstance(real, dict), (where, real)
        for key, value in documented.items():
            if key != "...":
                assert key in real, (where, key, sorted(real))
                _check(value, real[key], f"{where}.{key}")
    elif isinstance(documented, float) or isinstance(real, float):
        # Documented numbers are rounded to the digits they show (two at least).
        assert real == pytest.approx(documented, abs=0.01), (where, real, documented)
    else:
        assert real == documented, (where, real, documented)


def _settings(tmp_path: Path) -> Settings:
    return make_settings(f"sqlite:///{tmp_path / 'r.db'}", dim=DEFAULT_DIM)


def test_run_readme_curl_requests_answer_as_documented(tmp_path):
    block = next(b for b in _blocks(_section(README.read_text(), "## Route a request"),
                                    "bash") if "curl" in b)
    commands = _commands(block)
    assert sum(c.startswith("curl") for c, _ in commands) >= 5
    variables: dict[str, str] = {}
    checked = 0
    with live_server(_settings(tmp_path)) as base, httpx.Client(base_url=base) as client:
        for command, documented in commands:
            assignment = re.fullmatch(r'(\w+)="(.*)"', command)
            if assignment:
                variables[assignment[1]] = assignment[2]
                continue
            command = command.replace("<id of the last decision>", variables.get("ID", ""))
            variables = {k: v.replace("<admin key>", ADMIN_KEY)
                         .replace("<tenant key>", variables.get("KEY", ""))
                         for k, v in variables.items()}
            r = _curl(client, command, variables)
            assert r.status_code in (200, 201, 202), (command, r.text)
            body = r.json()
            variables.update(KEY=body.get("api_key", variables.get("KEY", "")),
                             ID=body.get("decision_id", variables.get("ID", "")))
            if documented:
                _check(_documented_pairs(documented), body, command[:60])
                checked += 1
    assert checked == 4  # the tenant, two decides, the feedback


def _readme_cli_setup(base: str) -> str:
    """Run the README's ``bandit-router`` lines ("From zero to a routed request") as
    written; returns the tenant key they printed."""
    block = next(b for b in _blocks(_section(README.read_text(),
                                             "## From zero to a routed request"), "bash"))
    env = {"BANDIT_ROUTER_URL": base, "BANDIT_ROUTER_KEY": ADMIN_KEY, "COLUMNS": "80"}
    printed = ""
    for command, _ in _commands(block):
        if not command.startswith("bandit-router"):
            continue
        args = shlex.split(command, comments=True)[1:]
        result = CliRunner().invoke(cli_app, args, env=env)
        assert result.exit_code == 0, (command, result.output, result.exception)
        printed += result.stdout
    keys = [line for line in printed.splitlines() if line.startswith("brt_")]
    assert len(keys) == 1, printed
    return keys[0]


def test_run_api_doc_decide_answers_as_documented(tmp_path):
    section = _section(API_DOC.read_text(), "### `POST /v1/decide`")
    request = next(b for b in _blocks(section, "bash"))
    documented = json.loads(_blocks(section, "json")[0])
    with live_server(_settings(tmp_path)) as base, httpx.Client(base_url=base) as client:
        key = _readme_cli_setup(base)
        command = request.replace('"Authorization: Bearer $TENANT_KEY"',
                                  shlex.quote(f"Authorization: Bearer {key}"))
        r = _curl(client, command.replace("\\\n", " ").replace("\n", " "), {})
    assert r.status_code == 200, r.text
    _check(documented, r.json(), "decide")
    assert documented["model"] == r.json()["model"] == "small-model"


def test_run_readme_client_example(tmp_path, capsys):
    blocks = _blocks(README.read_text(), "python")
    example = next(b for b in blocks if "RouterClient" in b)
    with live_server(_settings(tmp_path)) as base:
        key = _readme_cli_setup(base)
        gateway = SimpleNamespace(complete=lambda model, prompt: SimpleNamespace(
            text=f"{model} says QED", cost_usd=0.0005))
        code = example.replace("http://127.0.0.1:8000", base).replace("brt_...", key)
        exec(compile(code, "README.md", "exec"), {"my_gateway": gateway})  # noqa: S102
        with RouterClient(base, key) as router:
            usage = router.usage()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[0] in ("small-model", "large-model")
    assert printed[0].endswith("says QED")
    assert usage.decisions_today == 2
    # 0.0005 reported by route() + 0.0004 by the step-by-step feedback.
    assert float(printed[1]) == usage.spend_usd_today
    assert abs(usage.spend_usd_today - 0.0009) < 1e-12


def test_readme_bare_bandit_router_comes_after_activating_the_venv():
    """``bandit-router`` is on PATH only in an activated venv: the README says so before
    its first bare use (the install line itself says ``.venv/bin/bandit-router``)."""
    text = README.read_text()
    activate = text.find("source .venv/bin/activate")
    assert activate >= 0, "README never says how bandit-router gets on PATH"
    bare = [m.start() for m in re.finditer(r"^bandit-router ", text, flags=re.MULTILINE)]
    assert bare and min(bare) > activate
    assert ".venv/bin/bandit-router serve" in text
