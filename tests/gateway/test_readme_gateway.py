"""README's "Point your OpenAI client here" runs as written: its curl lines (after the
"Route a request" ones that register the models and the tenant) and its Python block,
against the real service, with the fake upstream standing in for api.openai.com."""

from __future__ import annotations

import httpx

from tests.fakes.openai_upstream import FakeModel, running_upstream
from tests.service.conftest import ADMIN_KEY
from tests.service.live import live_server
from tests.service.test_readme_example import (
    README,
    _blocks,
    _commands,
    _curl,
    _section,
    _settings,
)

OPENAI = "https://api.openai.com/v1"


def test_run_readme_openai_client_section_as_written(tmp_path, monkeypatch) -> None:
    setup = next(b for b in _blocks(_section(README.read_text(), "## Route a request"),
                                    "bash") if "curl" in b)
    section = _section(README.read_text(), "## Point your OpenAI client here")
    patches = _commands(_blocks(section, "bash")[0])
    (code,) = _blocks(section, "python")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-readme-not-a-real-key")
    with running_upstream({"gpt-4o-mini": FakeModel("Routers hum softly."),
                           "gpt-4o": FakeModel("Packets find their way.")}) as up, \
            live_server(_settings(tmp_path)) as base, httpx.Client(base_url=base) as http:
        variables = {"ADMIN": f"Authorization: Bearer {ADMIN_KEY}"}
        key = ""
        for command, _ in _commands(setup):
            if command.startswith("curl") and "/v1/admin/" in command:
                r = _curl(http, command, variables)
                assert r.status_code == 201, r.text
                key = r.json().get("api_key", key)
        ran = 0
        for command, _ in patches:
            if command.startswith("curl"):
                r = _curl(http, command.replace(OPENAI, f"{up.base_url}/v1"), variables)
                assert r.status_code == 200, (command, r.text)
                assert r.json()["api_key_env"] == "OPENAI_API_KEY"
                ran += 1
        assert ran == 2 and key.startswith("brt_")
        namespace: dict = {}
        source = code.replace("http://127.0.0.1:8000", base).replace('"brt_..."', repr(key))
        exec(source, namespace)  # noqa: S102 - the README's own code, as written
        reply = namespace["raw"].parse()
        assert reply.model in ("small", "large")
        assert reply.choices[0].message.content in ("Routers hum softly.",
                                                    "Packets find their way.")
        assert namespace["decision_id"]
        assert up.calls()[-1].headers["authorization"] == "Bearer sk-readme-not-a-real-key"
