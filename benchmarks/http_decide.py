"""HTTP decide throughput and latency through uvicorn on loopback.

Two servers, each ``uvicorn`` with one worker in its own process and the same settings
(uvloop, httptools, no access log: what ``bandit-router serve`` ships with), measured in
the same run with the same load generator:

* ``router``: ``service.app.create_app`` (embedded mode: SQLite in a temporary
  directory, batched decision writer running), d=64, 16 models, one tenant;
  ``POST /v1/decide`` with a client-supplied embedding;
* ``bare``: a FastAPI app whose one async endpoint returns a constant JSON body.

The load generator is one process speaking raw HTTP/1.1 over keep-alive connections
(asyncio streams, pre-encoded requests) so that the client costs as little as possible.

1. Maximum throughput: closed loop, ``--connections`` connections each sending its next
   request as soon as the previous answer arrives, for ``--seconds``; ``--rounds``
   rounds, the two servers alternating (in a different order each round), each reported
   by its median round (every round is in the results file).
2. Latency at half of the router's (median) maximum throughput: open loop, requests
   scheduled at a fixed rate; latency counted from the scheduled send time (no
   coordinated omission); ``--rounds`` rounds, the round with the median p99 reported.
   Errors are counted over every round of every phase.

With ``--query text`` the requests carry a query text instead (``--text-chars``
characters of real prompts from the development data, 256 different ones, cycled; the
default way users call us), featurized by the service's hashing featurizer, and a third
server joins the rounds: ``router_reference``, the same router whose featurizer runs the
numpy reference implementation (``HashingFeaturizer._reference_transform``, the code
before the compiled kernel; the same vectors): before and after in one run.

Goals (issues 4, 19): router >= 70% of the bare endpoint's throughput with an embedding,
>= 60% with a 500-character text; p99 <= 5 ms at half of the router's maximum
throughput; no errors.

Run::

    python -m benchmarks.http_decide            # writes benchmarks/results/http_decide.json
    python -m benchmarks.http_decide --query text   # writes .../http_decide_text.json
    python -m benchmarks.http_decide --quick    # short smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import REPO_ROOT, data_root, print_table, write_results

DIM = 64
N_MODELS = 16
ADMIN_KEY = "bra_benchmark-admin-key-not-secret-0123456789"

BARE_APP = textwrap.dedent('''
    from fastapi import FastAPI
    app = FastAPI()
    BODY = {"decision_id": "00000000-0000-0000-0000-000000000000", "model": "m-0",
            "propensity": 1.0}

    @app.post("/v1/decide")
    async def decide() -> dict:
        return BODY
''')

# What `bandit-router serve` does, minus the command line.
ROUTER_APP = textwrap.dedent('''
    from service.app import create_app
    from service.commands.serve import tune_process
    from service.config import Settings
    tune_process()
    app = create_app(Settings(), freeze_gc=True)
''')

# The router with the featurizer as it was before its compiled kernel: the numpy
# reference (same vectors), patched in for the benchmark only.
ROUTER_REFERENCE_APP = textwrap.dedent('''
    from bandit.featurize import HashingFeaturizer

    def _reference_vector(self, text, tokens, out):
        out[:] = self._reference_transform([text], tokens)[0]
        return out

    HashingFeaturizer._vector = _reference_vector
''') + ROUTER_APP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The same server settings for both apps: those `bandit-router serve` ships with.
UVICORN_ARGS = ["--loop", "uvloop", "--http", "httptools", "--log-level", "warning",
                "--no-access-log"]


def start_server(module_dir: Path, module: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "uvicorn", f"{module}:app", "--host", "127.0.0.1",
           "--port", str(port), *UVICORN_ARGS]
    proc = subprocess.Popen(cmd, cwd=module_dir,
                            env={**os.environ, **env,
                                 "PYTHONPATH": f"{module_dir}{os.pathsep}{REPO_ROOT}"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode()[-2000:])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{module} did not start")


def setup_router(port: int) -> str:
    """Register 16 models and one tenant; returns the tenant's API key."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        for _ in range(300):
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        for i in range(N_MODELS):
            r = http.post("/v1/admin/models", headers=admin, json={
                "name": f"model-{i:02d}", "input_price_per_mtok": 0.1 * (i + 1),
                "output_price_per_mtok": 0.4 * (i + 1), "prior_quality": 0.5 + 0.02 * i})
            r.raise_for_status()
        r = http.post("/v1/admin/tenants", headers=admin, json={"name": "bench"})
        r.raise_for_status()
        return r.json()["api_key"]


def query_texts(chars: int, n: int) -> list[str]:
    """``n`` different texts of ``chars`` characters: pieces of the development data's
    prompts (joined), or of generated prompt-like text without the data."""
    path = data_root() / "llmrouter" / "test.jsonl"
    if path.is_file():
        with path.open(encoding="utf-8") as fh:
            corpus = "\n\n".join(json.loads(line)["question"] for line in fh)
    else:
        words = ("how do i reverse a list in python summarize the attached report "
                 "translate this paragraph into german write a sql query").split()
        corpus = " ".join(np.random.default_rng(0).choice(words, size=50 * chars))
    starts = np.linspace(0, len(corpus) - chars - 1, n).astype(int)
    return [corpus[s:s + chars] for s in starts]


def build_requests(key: str | None, n: int = 256, text_chars: int | None = None) -> list[bytes]:
    rng = np.random.default_rng(0)
    texts = None if text_chars is None else query_texts(text_chars, n)
    out = []
    for i in range(n):
        if texts is not None:
            body = json.dumps({"query": {"text": texts[i]}})
        else:
            x = rng.standard_normal(DIM)
            body = json.dumps({"query": {"embedding": (x / np.linalg.norm(x)).round(6)
                                         .tolist()}})
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        out.append((f"POST /v1/decide HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
                    "Content-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    return out


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def closed_loop(port: int, requests: list[bytes], connections: int,
                      seconds: float) -> dict[str, float]:
    stop = time.perf_counter() + seconds
    latencies: list[float] = []
    errors = 0

    async def worker(w: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = w
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - t0)
            errors += status != 200
            i += connections
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(connections)))
    elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    return {"requests": len(latencies), "errors": errors, "seconds": elapsed,
            "throughput_rps": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


async def open_loop(port: int, requests: list[bytes], rate: float, seconds: float,
                    connections: int) -> dict[str, float]:
    """Send at ``rate`` requests/s; latency from each request's scheduled time."""
    n = int(rate * seconds)
    start = time.perf_counter() + 0.2
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for j in range(n):
        queue.put_nowait(j)

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while True:
            try:
                j = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            scheduled = start + j / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(requests[j % len(requests)])
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - scheduled)
            errors += status != 200
        writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    lat = np.array(latencies) * 1e3
    return {"rate_rps": rate, "requests": len(latencies), "errors": errors,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max())}


def _median_run(runs: list[dict[str, float]], key: str) -> dict[str, float]:
    """The run with the median ``key`` (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]


# wrk's request() callback cycles through pre-formatted requests (one per query).
WRK_SCRIPT = """
local bodies = {BODIES}
local requests = {{}}
for i, body in ipairs(bodies) do
  requests[i] = wrk.format("POST", "/v1/decide", {{["Content-Type"] = "application/json",
    ["Authorization"] = "{AUTH}"}}, body)
end
local n = 0
request = function()
  n = n % #requests + 1
  return requests[n]
end
"""


def wrk_round(port: int, script: Path, connections: int, seconds: float) -> dict[str, float]:
    """One closed-loop run of the external load generator ``wrk`` (1 thread)."""
    done = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
                           "-s", str(script), f"http://127.0.0.1:{port}/v1/decide"],
                          capture_output=True, text=True, timeout=seconds + 60, check=True)
    out: dict[str, float] = {"errors": 0.0}
    for line in done.stdout.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            out["throughput_rps"] = float(words[1])
        elif words[:1] == ["99%"]:
            out["p99_ms"] = _ms(words[1])
        elif words[:1] == ["50%"]:
            out["p50_ms"] = _ms(words[1])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            out["errors"] += float(words[-1])
        elif line.strip().startswith("Socket errors:"):
            out["errors"] += sum(float(w.rstrip(",")) for w in words[3::2])
    return out


def _ms(value: str) -> float:
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if value.endswith(unit):
            return float(value[:-len(unit)]) * scale
    raise ValueError(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of each phase; medians are reported")
    parser.add_argument("--query", choices=("embedding", "text"), default="embedding",
                        help="what the decide requests carry")
    parser.add_argument("--text-chars", type=int, default=500,
                        help="length of the query texts with --query text")
    parser.add_argument("--wrk", action="store_true",
                        help="also measure maximum throughput with wrk (Debian package)")
    parser.add_argument("--quick", action="store_true",
                        help="2 s phases, 1 round, no results file")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    seconds = 2.0 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds
    text_chars = args.text_chars if args.query == "text" else None
    names = ["bare", "router"] + (["router_reference"] if text_chars else [])

    results: dict[str, object] = {"settings": {"dim": DIM, "models": N_MODELS,
                                               "connections": args.connections,
                                               "seconds_per_phase": seconds,
                                               "rounds": rounds, "query": args.query,
                                               "text_chars": text_chars,
                                               "uvicorn": " ".join(UVICORN_ARGS)}}
    runs: dict[str, list[dict[str, float]]] = {f"{name}_max": [] for name in names}
    runs["router_half_load"] = []
    if args.wrk:
        runs.update({f"{name}_wrk": [] for name in names})
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "bare_app.py").write_text(BARE_APP)
        (tmpdir / "router_app.py").write_text(ROUTER_APP)
        (tmpdir / "router_reference_app.py").write_text(ROUTER_REFERENCE_APP)
        servers = {}
        try:
            for name in names:
                env = {} if name == "bare" else {
                    "BANDIT_ROUTER_DATA_DIR": str(tmpdir / f"data_{name}"),
                    "BANDIT_ROUTER_ADMIN_KEY": ADMIN_KEY, "BANDIT_ROUTER_DIM": str(DIM),
                    "BANDIT_ROUTER_DATABASE_URL": ""}
                port = free_port()
                servers[name] = (start_server(tmpdir, f"{name}_app", port, env), port)
            keys = {name: None if name == "bare" else setup_router(servers[name][1])
                    for name in names}
            reqs = {name: build_requests(keys[name], text_chars=text_chars) for name in names}
            scripts = {}
            for name in names if args.wrk else ():
                bodies = [r.split(b"\r\n\r\n", 1)[1].decode() for r in reqs[name][:32]]
                scripts[name] = tmpdir / f"{name}.lua"
                scripts[name].write_text(WRK_SCRIPT.format(
                    BODIES="{" + ", ".join(json.dumps(b) for b in bodies) + "}",
                    AUTH=f"Bearer {keys[name]}" if keys[name] else ""))
            for name in names:  # warm-up
                asyncio.run(closed_loop(servers[name][1], reqs[name], 4, 1.0))
            # Maximum throughput: the servers take turns, in a different order each
            # round, so that a burst of load from elsewhere on the machine is less likely
            # to land on one of them only; each is reported by its median round.
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    runs[f"{name}_max"].append(asyncio.run(closed_loop(
                        servers[name][1], reqs[name], args.connections, seconds)))
                    if args.wrk:
                        runs[f"{name}_wrk"].append(wrk_round(
                            servers[name][1], scripts[name], args.connections, seconds))
            half = _median_run(runs["router_max"], "throughput_rps")["throughput_rps"] / 2
            for _ in range(rounds):
                runs["router_half_load"].append(asyncio.run(open_loop(
                    servers["router"][1], reqs["router"], half, seconds, args.connections)))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)

    medians = {phase: _median_run(phase_runs, "p99_ms" if phase == "router_half_load"
                                  else "throughput_rps")
               for phase, phase_runs in runs.items()}
    results.update(medians)
    results["rounds"] = runs
    ratios = {}
    for phase in runs:
        if phase.endswith(("_max", "_wrk")) and not phase.startswith("bare"):
            base = medians["bare_" + phase.rsplit("_", 1)[1]]
            ratios[phase] = medians[phase]["throughput_rps"] / base["throughput_rps"]
    results["ratio_to_bare"] = ratios
    results["ratio_to_bare_per_round"] = {
        phase: [o["throughput_rps"] / b["throughput_rps"] for o, b in zip(
            runs[phase], runs["bare_" + phase.rsplit("_", 1)[1]], strict=True)]
        for phase in ratios}
    half_load = medians["router_half_load"]
    errors = sum(run["errors"] for phase in runs.values() for run in phase)
    goal_ratio = 0.6 if text_chars else 0.7
    results["goals"] = {
        f"throughput_ratio_ge_{goal_ratio}": ratios["router_max"] >= goal_ratio,
        "p99_at_half_load_le_5ms": half_load["p99_ms"] <= 5.0,
        "no_errors": errors == 0,
    }
    rows = []
    for phase in runs:
        if phase == "router_half_load":
            continue
        run = medians[phase]
        rows.append([phase.replace("_", " "), f"{run['throughput_rps']:.0f}",
                     f"{ratios[phase]:.2f}" if phase in ratios else "",
                     f"{run.get('p50_ms', float('nan')):.2f}",
                     f"{run.get('p99_ms', float('nan')):.2f}", f"{run['errors']:.0f}"])
    rows.append([f"router at {half_load['rate_rps']:.0f} req/s (half)", "", "",
                 f"{half_load['p50_ms']:.2f}", f"{half_load['p99_ms']:.2f}",
                 half_load["errors"]])
    query = f"{text_chars}-character text" if text_chars else "embedding"
    print_table(f"HTTP decide (uvicorn, loopback, d={DIM}, {N_MODELS} models, query: "
                f"{query}; medians of {rounds} round(s))",
                ["phase", "req/s", "/ bare", "p50 ms", "p99 ms", "errors"], rows,
                caption="ratio to bare per round: " + "; ".join(
                    f"{phase} " + ", ".join(f"{x:.2f}" for x in per_round)
                    for phase, per_round in results["ratio_to_bare_per_round"].items())
                + "; half-load p99 per round: "
                + ", ".join(f"{r['p99_ms']:.1f}" for r in runs["router_half_load"])
                + f" ms; errors (all rounds): {errors:.0f}; goals: {results['goals']}")
    if not (args.quick or args.no_write):
        path = write_results("http_decide" + ("_text" if text_chars else ""), results,
                             packages=("fastapi", "uvicorn", "uvloop", "httptools",
                                       "starlette", "pydantic", "numpy", "numba",
                                       "sqlalchemy", "orjson"))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
