"""The client example of README.md runs as written against a real service."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from service.client import RouterClient
from tests.service.conftest import ADMIN_KEY, make_settings
from tests.service.live import live_server

README = Path(__file__).resolve().parents[2] / "README.md"


def test_run_readme_client_example(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    example = next(b for b in blocks if "RouterClient" in b)
    with live_server(make_settings(f"sqlite:///{tmp_path / 'r.db'}")) as base:
        with RouterClient(base, ADMIN_KEY) as admin:
            admin.add_model("small-model", 0.15, 0.6)
            admin.add_model("large-model", 3.0, 15.0, prior_quality=0.9)
            key = admin.create_tenant("my-gateway").api_key
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
