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
   The bare endpoint (and the baseline) at the same rate, alternating: bare's p99 is
   what the machine and the load generator alone leave of the goal; each round also
   reports the load generator's own lateness (p99 of send time - scheduled time).
   Errors are counted over every round of every phase.

Goals (issue 4): router >= 70% of the bare endpoint's throughput; p99 <= 5 ms at half of
the router's maximum throughput; no errors.

Run::

    python -m benchmarks.http_decide            # writes benchmarks/results/http_decide.json
    python -m benchmarks.http_decide --quick    # short smoke run, writes nothing
    # decide with a budgeted tenant on PostgreSQL, budget leases off / on (issue 17),
    # alternating; writes benchmarks/results/http_decide_leases.json:
    python -m benchmarks.http_decide --leases --database-url "$(bash ops/postgres.sh url)"
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
from typing import Any

import httpx
import numpy as np

from benchmarks.common import REPO_ROOT, print_table, write_results

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The same server settings for both apps: those `bandit-router serve` ships with.
UVICORN_ARGS = ["--loop", "uvloop", "--http", "httptools", "--log-level", "warning",
                "--no-access-log"]


def start_server(module_dir: Path, module: str, port: int, env: dict[str, str],
                 source: Path = REPO_ROOT) -> subprocess.Popen:
    """Start ``module:app`` under uvicorn, importing the router's packages from
    ``source`` (another checkout for a before/after comparison)."""
    cmd = [sys.executable, "-m", "uvicorn", f"{module}:app", "--host", "127.0.0.1",
           "--port", str(port), *UVICORN_ARGS]
    proc = subprocess.Popen(cmd, cwd=module_dir,
                            env={**os.environ, **env,
                                 "PYTHONPATH": f"{module_dir}{os.pathsep}{source}"},
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


def build_requests(key: str | None, n: int = 256) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        x = rng.standard_normal(DIM)
        body = json.dumps({"query": {"embedding": (x / np.linalg.norm(x)).round(6).tolist()}})
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


def server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) the process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_loop(port: int, requests: list[bytes], connections: int,
                      seconds: float, pid: int | None = None) -> dict[str, float]:
    """Closed-loop load; with the server's ``pid`` also its CPU time per request, the
    measure that other work on a shared machine inflates least (a one-worker server
    bound by its CPU serves 1 / that many requests per second)."""
    cpu0 = server_cpu_s(pid) if pid is not None else 0.0
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
    out = {"requests": len(latencies), "errors": errors, "seconds": elapsed,
           "throughput_rps": len(latencies) / elapsed,
           "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}
    if pid is not None:
        out["server_cpu_us_per_request"] = (server_cpu_s(pid) - cpu0) / len(latencies) * 1e6
    return out


async def open_loop_times(port: int, requests: list[bytes], rate: float, seconds: float,
                          connections: int) -> list[tuple[float, float, float, int]]:
    """Send at ``rate`` requests/s over ``connections`` connections: (scheduled, sent,
    answered, status) per request (``perf_counter`` times)."""
    n = int(rate * seconds)
    start = time.perf_counter() + 0.2
    out: list[tuple[float, float, float, int]] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for j in range(n):
        queue.put_nowait(j)

    async def worker() -> None:
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
            sent = time.perf_counter()
            writer.write(requests[j % len(requests)])
            status = await _read_response(reader)
            out.append((scheduled, sent, time.perf_counter(), status))
        writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return out


async def open_loop(port: int, requests: list[bytes], rate: float, seconds: float,
                    connections: int, pid: int | None = None) -> dict[str, float]:
    """Send at ``rate`` requests/s; latency from each request's scheduled time. With the
    server's ``pid`` also its CPU time per request at that rate."""
    cpu0 = server_cpu_s(pid) if pid is not None else 0.0
    times = await open_loop_times(port, requests, rate, seconds, connections)
    lat = np.array([done - scheduled for scheduled, _, done, _ in times]) * 1e3
    # How late the load generator itself sent (its process competes for the same cores):
    # a part of every latency above that the server did not cause.
    late_ms = np.array([sent - scheduled for scheduled, sent, _, _ in times]) * 1e3
    out = {"rate_rps": rate, "requests": len(times),
           "errors": sum(status != 200 for *_, status in times),
           "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
           "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
           "client_late_p99_ms": float(np.percentile(late_ms, 99))}
    if pid is not None:
        out["server_cpu_us_per_request"] = (server_cpu_s(pid) - cpu0) / len(times) * 1e6
    return out


def half_load_rounds(runs: dict[str, list[dict[str, float]]], names: list[str],
                     servers: dict[str, Any], reqs: dict[str, list[bytes]], rate: float,
                     seconds: float, connections: int, rounds: int) -> None:
    """``rounds`` open-loop rounds at ``rate`` of each server in ``names`` (the order
    shifted each round), into ``runs[name + "_half_load"]``."""
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            runs[f"{name}_half_load"].append(asyncio.run(open_loop(
                servers[name][1], reqs[name], rate, seconds, connections,
                pid=servers[name][0].pid)))


def _median_run(runs: list[dict[str, float]], key: str) -> dict[str, float]:
    """The run with the median ``key`` (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]


def leases_comparison(args: argparse.Namespace, seconds: float, rounds: int) -> None:
    """The decide path with a budgeted tenant (a budget it never exhausts, so every
    decision reserves) on PostgreSQL, budget leases off and on: two routers, each on
    a fresh database, measured alternating (max throughput, then p99 at half of the
    slower one's maximum)."""
    import psycopg

    admin = args.database_url.replace("postgresql+psycopg://", "postgresql://")
    names = {v: f"bench_leases_{v}_{os.getpid()}" for v in ("off", "on")}
    runs: dict[str, list[dict[str, float]]] = {f"{v}_{phase}": [] for v in names
                                               for phase in ("max", "half_load")}
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in names.values():
            conn.execute(f'CREATE DATABASE "{name}"')
    base = args.database_url.rpartition("/")[0]
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmpdir = Path(tmp)
            (tmpdir / "router_app.py").write_text(ROUTER_APP)
            reqs = {}
            for variant, name in names.items():
                env = {"BANDIT_ROUTER_DATA_DIR": str(tmpdir / variant),
                       "BANDIT_ROUTER_ADMIN_KEY": ADMIN_KEY, "BANDIT_ROUTER_DIM": str(DIM),
                       "BANDIT_ROUTER_DATABASE_URL": f"{base}/{name}",
                       "BANDIT_ROUTER_BUDGET_LEASES": "true" if variant == "on" else "false"}
                port = free_port()
                servers[variant] = (start_server(tmpdir, "router_app", port, env), port)
                key = setup_router(port)
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                    http.put("/v1/tenants/me/preferences", json={
                        "budget_usd_per_day": 1e6, "on_budget_exhausted": "reject"},
                        headers={"Authorization": f"Bearer {key}"}).raise_for_status()
                reqs[variant] = build_requests(key)
                asyncio.run(closed_loop(port, reqs[variant], 4, 1.0))  # warm-up
            for r in range(rounds):
                for v in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    runs[f"{v}_max"].append(asyncio.run(closed_loop(
                        servers[v][1], reqs[v], args.connections, seconds)))
            half = min(_median_run(runs[f"{v}_max"], "throughput_rps")["throughput_rps"]
                       for v in names) / 2
            for r in range(rounds):
                for v in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    runs[f"{v}_half_load"].append(asyncio.run(open_loop(
                        servers[v][1], reqs[v], half, seconds, args.connections)))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in names.values():
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    medians = {k: _median_run(v, "p99_ms" if k.endswith("half_load") else "throughput_rps")
               for k, v in runs.items()}
    print_table(f"decide with a budgeted tenant, PostgreSQL, leases off / on (medians of "
                f"{rounds} round(s), alternating)",
                ["leases", "max req/s", f"p50 ms at {half:.0f} req/s", "p99 ms", "errors"],
                [[v, f"{medians[f'{v}_max']['throughput_rps']:.0f}",
                  f"{medians[f'{v}_half_load']['p50_ms']:.2f}",
                  f"{medians[f'{v}_half_load']['p99_ms']:.2f}",
                  sum(r["errors"] for k, rs in runs.items() if k.startswith(v) for r in rs)]
                 for v in names],
                caption="half-load p99 per round, off: "
                + ", ".join(f"{r['p99_ms']:.1f}" for r in runs["off_half_load"])
                + "; on: " + ", ".join(f"{r['p99_ms']:.1f}" for r in runs["on_half_load"]))
    if not (args.quick or args.no_write):
        path = write_results("http_decide_leases", {
            "settings": {"dim": DIM, "models": N_MODELS, "connections": args.connections,
                         "seconds_per_phase": seconds, "rounds": rounds,
                         "half_load_rps": half},
            "medians": medians, "rounds": runs}, packages=("fastapi", "uvicorn", "psycopg"))
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of each phase; medians are reported")
    parser.add_argument("--quick", action="store_true",
                        help="2 s phases, 1 round, no results file")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--results-name", default="http_decide", metavar="NAME",
                        help="write results/NAME.json (default: %(default)s)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another source tree (a checkout of the router's packages) "
                             "served as a third server, alternating with the two others: "
                             "a before/after comparison in one run")
    parser.add_argument("--leases", action="store_true",
                        help="only compare a budgeted tenant's decide with budget leases "
                        "off and on (PostgreSQL: --database-url)")
    parser.add_argument("--database-url", default=os.environ.get("BANDIT_TEST_DATABASE_URL"))
    args = parser.parse_args(argv)
    seconds = 2.0 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds
    if args.leases:
        if not args.database_url:
            parser.error("--leases needs --database-url (PostgreSQL; ops/postgres.sh url)")
        leases_comparison(args, seconds, rounds)
        return

    results: dict[str, object] = {"settings": {"dim": DIM, "models": N_MODELS,
                                               "connections": args.connections,
                                               "seconds_per_phase": seconds,
                                               "rounds": rounds,
                                               "uvicorn": " ".join(UVICORN_ARGS)}}
    names = ["bare", "router"] + (["baseline"] if args.baseline is not None else [])
    runs: dict[str, list[dict[str, float]]] = {f"{n}_max": [] for n in names}
    # At half of the router's maximum: the router, and at the same rate the bare endpoint
    # (what the machine and the load generator leave of the 5 ms) and the baseline.
    half_names = ["router", "bare"] + (["baseline"] if args.baseline is not None else [])
    for name in half_names:
        runs[f"{name}_half_load"] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "bare_app.py").write_text(BARE_APP)
        (tmpdir / "router_app.py").write_text(ROUTER_APP)
        def router_env(name: str) -> dict[str, str]:
            return {"BANDIT_ROUTER_DATA_DIR": str(tmpdir / f"data-{name}"),
                    "BANDIT_ROUTER_ADMIN_KEY": ADMIN_KEY, "BANDIT_ROUTER_DIM": str(DIM),
                    "BANDIT_ROUTER_DATABASE_URL": ""}

        servers = {}
        try:
            for name in names:
                port = free_port()
                if name == "bare":
                    servers[name] = (start_server(tmpdir, "bare_app", port, {}), port)
                else:
                    source = args.baseline if name == "baseline" else REPO_ROOT
                    servers[name] = (start_server(tmpdir, "router_app", port,
                                                  router_env(name), source=source), port)
            reqs = {"bare": build_requests(None)}
            for name in names[1:]:
                reqs[name] = build_requests(setup_router(servers[name][1]))
            for name in names:  # warm-up
                asyncio.run(closed_loop(servers[name][1], reqs[name], 4, 1.0))
            # Maximum throughput: the servers alternate, in a different order each round,
            # so that a burst of load from elsewhere on the machine is less likely to land
            # on one of them only; each is reported by its median round.
            for r in range(rounds):
                shift = r % len(names)
                order = names[shift:] + names[:shift]
                for name in (order if r % 2 == 0 else order[::-1]):
                    runs[f"{name}_max"].append(asyncio.run(closed_loop(
                        servers[name][1], reqs[name], args.connections, seconds,
                        pid=servers[name][0].pid)))
            half = _median_run(runs["router_max"], "throughput_rps")["throughput_rps"] / 2
            half_load_rounds(runs, half_names, servers, reqs, half, seconds,
                             args.connections, rounds)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)

    bare = results["bare_max"] = _median_run(runs["bare_max"], "throughput_rps")
    ours = results["router_max"] = _median_run(runs["router_max"], "throughput_rps")
    half_load = results["router_half_load"] = _median_run(runs["router_half_load"], "p99_ms")
    for name in half_names[1:]:
        results[f"{name}_half_load"] = _median_run(runs[f"{name}_half_load"], "p99_ms")
    results["rounds"] = runs
    ratio = ours["throughput_rps"] / bare["throughput_rps"]
    results["ratio_to_bare"] = ratio
    results["ratio_to_bare_per_round"] = [
        o["throughput_rps"] / b["throughput_rps"]
        for o, b in zip(runs["router_max"], runs["bare_max"], strict=True)]
    errors = sum(run["errors"] for phase in runs.values() for run in phase)
    # Server CPU per request, medians over the rounds; bare / router is the throughput
    # ratio a CPU-bound one-worker server would reach on an otherwise idle machine.
    cpu = results["server_cpu_us_per_request"] = {
        name: float(np.median([r["server_cpu_us_per_request"] for r in runs[f"{name}_max"]]))
        for name in names}
    results["cpu_ratio_to_bare"] = {name: cpu["bare"] / cpu[name] for name in names[1:]}
    # At half load too: the decision writer's batches are smaller there than at the
    # maximum (its cost per row depends on them).
    cpu_half = results["server_cpu_us_per_request_half_load"] = {
        name: float(np.median([r["server_cpu_us_per_request"]
                               for r in runs[f"{name}_half_load"]])) for name in half_names}
    print("server CPU per request at half load (median of the rounds), µs: " + ", ".join(
        f"{name} {v:.0f}" for name, v in cpu_half.items()))
    print("server CPU per request (median of the rounds), µs: " + ", ".join(
        f"{name} {cpu[name]:.0f}" for name in names) + "; bare / router = " + ", ".join(
        f"{name} {v:.2f}" for name, v in results["cpu_ratio_to_bare"].items()))
    if args.baseline is not None:
        base = results["baseline_max"] = _median_run(runs["baseline_max"], "throughput_rps")
        results["baseline_ratio_to_bare"] = base["throughput_rps"] / bare["throughput_rps"]
        results["baseline_ratio_to_bare_per_round"] = [
            o["throughput_rps"] / b["throughput_rps"]
            for o, b in zip(runs["baseline_max"], runs["bare_max"], strict=True)]
        print(f"baseline ({args.baseline}) / bare throughput = "
              f"{results['baseline_ratio_to_bare']:.2f} (per round: "
              + ", ".join(f"{x:.2f}" for x in results["baseline_ratio_to_bare_per_round"])
              + f"); router - baseline = {ratio - results['baseline_ratio_to_bare']:+.3f}")
    results["goals"] = {
        "throughput_ratio_ge_0.7": ratio >= 0.7,
        "p99_at_half_load_le_5ms": half_load["p99_ms"] <= 5.0,
        "no_errors": errors == 0,
    }
    print_table("HTTP decide (uvicorn, loopback, d=64, 16 models; medians of "
                f"{rounds} round(s))",
                ["phase", "req/s", "p50 ms", "p99 ms", "errors"],
                [["bare endpoint, max", f"{bare['throughput_rps']:.0f}",
                  f"{bare['p50_ms']:.2f}", f"{bare['p99_ms']:.2f}", bare["errors"]],
                 ["router decide, max", f"{ours['throughput_rps']:.0f}",
                  f"{ours['p50_ms']:.2f}", f"{ours['p99_ms']:.2f}", ours["errors"]],
                 *[[f"{name} at {half_load['rate_rps']:.0f} req/s (router's half)", "",
                    f"{results[f'{name}_half_load']['p50_ms']:.2f}",
                    f"{results[f'{name}_half_load']['p99_ms']:.2f}",
                    results[f"{name}_half_load"]["errors"]] for name in half_names]],
                caption=f"router / bare throughput = {ratio:.2f} (per round: "
                        + ", ".join(f"{x:.2f}" for x in results["ratio_to_bare_per_round"])
                        + "); half-load p99 per round (load generator's own lateness p99): "
                        + "; ".join(f"{name} " + ", ".join(
                            f"{r['p99_ms']:.1f} ({r['client_late_p99_ms']:.1f})"
                            for r in runs[f"{name}_half_load"]) for name in half_names)
                        + f" ms; errors (all rounds): {errors}; goals: {results['goals']}")
    if not (args.quick or args.no_write):
        path = write_results(args.results_name, results,
                             packages=("fastapi", "uvicorn", "uvloop", "httptools",
                                       "starlette", "pydantic", "numpy", "sqlalchemy",
                                       "orjson"))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
