"""The client is its own distribution: installed alone, it imports nothing of the server."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "client"
#: Top-level packages of the server and of its dependencies; httpx's are allowed.
SERVER_ONLY = ("service", "bandit", "streams", "numpy", "scipy", "river", "fastapi",
               "starlette", "pydantic", "sqlalchemy", "psycopg", "kafka", "orjson")


def test_client_pyproject_depends_on_httpx_only():
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "bandit-router-client"
    assert [d.split(">")[0].split("=")[0] for d in project["dependencies"]] == ["httpx"]


def test_install_client_alone_imports_without_server_packages(tmp_path):
    target, source = tmp_path / "site", tmp_path / "client"
    # From a copy: pip builds in the source tree (build/, *.egg-info).
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                  "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check",
                    "--target", str(target), str(source)], check=True)
    assert (target / "bandit_router_client" / "__init__.py").is_file()
    assert not (target / "service").exists() and not (target / "bandit").exists()
    # A fresh interpreter (-I: no PYTHONPATH, no current directory) that sees the
    # installed client and httpx, and fails any import of the server's packages.
    import httpx

    script = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {SERVER_ONLY!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("server package imported: " + name)
                return None

        sys.meta_path.insert(0, Block())
        sys.path[:0] = [{str(target)!r}, {str(Path(httpx.__file__).parents[1])!r}]
        import bandit_router_client as c
        assert c.__file__.startswith({str(target)!r}), c.__file__
        import httpx

        def answer(request):  # a problem-details refusal, as the service sends
            return httpx.Response(401, json={{"type": "about:blank", "title": "Unauthorized",
                                             "status": 401, "detail": "unknown API key"}},
                                  headers={{"content-type": "application/problem+json"}})

        with c.RouterClient("http://router", api_key="k",
                            transport=httpx.MockTransport(answer)) as router:
            try:
                router.decide("hello")
            except c.RouterError as exc:
                print("refused", exc.status, exc.detail)
            else:
                raise SystemExit("the refusal was not raised")
        print(sorted(set(m.split(".")[0] for m in sys.modules) & set(BLOCKED)))
    """)
    out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["refused 401 unknown API key", "[]"]
