"""HTTP decide with query texts: the router (hashing featurizer version 2, and version 1)
next to a bare FastAPI endpoint, with two load generators.

The set-up of :mod:`benchmarks.http_decide` (uvicorn, one worker per server, the same
settings; embedded router, d=64, 16 models), but every request carries a query text:
``--text-chars`` characters of real prompts from the development data (256 different
ones, cycled; generated prompt-like text without the data), featurized by the service's
hashing featurizer, the default way users call us. Three servers, in the same run:

* ``bare``: a FastAPI endpoint returning a constant body;
* ``router``: the router as it is (hashing featurizer version 2, the default of a new
  deployment);
* ``router_v1``: the same router with ``HASHING_VERSION=1`` (a deployment that learned
  with version 1 before version 2 existed keeps it);
* ``baseline`` (with ``--baseline DIR``): the router from another source tree (e.g.
  ``git archive main | tar -x -C DIR``): a before/after comparison in one run.

1. Maximum throughput, ``--rounds`` rounds, the servers taking turns in a different
   order each round, each reported by its median round: with the asyncio load generator
   of :mod:`benchmarks.http_decide` (closed loop, ``--connections``), and with ``wrk``
   (the external load generator, Debian package ``wrk``; one thread, the same number of
   connections, a Lua script cycling through 32 of the request bodies) when installed.
2. Latency of ``router`` at half of its median maximum throughput (open loop), and of
   ``bare`` (and ``baseline``) at the same rate, alternating (see
   :mod:`benchmarks.http_decide`).

``--profile FILE`` instead samples the ``router`` server with py-spy (``pip install
py-spy``) under the closed-loop load for ``--seconds``, writes the raw stacks to FILE and
prints where the event-loop thread spends its time (inclusive share per frame), then the
same samples by component (:data:`COMPONENTS`) in µs per request (the share of every
thread's samples times the server's CPU time per request while sampled): what is left
per request once the text is cheap.

``--write-cost`` instead measures uvicorn's response writes (``RequestResponseCycle.send``,
headers and body) in ``bare`` and ``router`` under the closed-loop load: CPU time of the
calling thread (``time.thread_time``, which counts the system call's kernel work, on
loopback the client's receive path too) against wall time per call. py-spy counts a
sample of a thread that is runnable but not running as busy, and a write that wakes the
client is often preempted by it on a busy machine: the profile's share of the writes is
larger than their CPU time (:data:`WRITE_COST_PATCH`).

Goals (issue 19): router >= 60% of the bare endpoint's throughput with a 500-character
text; p99 <= 5 ms at half load; no errors.

Run::

    python -m benchmarks.http_decide_text          # writes results/http_decide_text.json
    python -m benchmarks.http_decide_text --quick  # short smoke run, writes nothing
    python -m benchmarks.http_decide_text --profile /tmp/router.txt --seconds 20
    python -m benchmarks.http_decide_text --write-cost --rounds 3 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO_ROOT, data_root, print_table, write_results
from benchmarks.http_decide import (
    ADMIN_KEY,
    BARE_APP,
    DIM,
    N_MODELS,
    ROUTER_APP,
    UVICORN_ARGS,
    _median_run,
    closed_loop,
    free_port,
    half_load_rounds,
    setup_router,
    start_server,
)

NAMES = ("bare", "router", "router_v1")
#: Per server, the router's settings beyond the common ones.
EXTRA_ENV = {"router": {}, "router_v1": {"BANDIT_ROUTER_HASHING_VERSION": "1"},
             "baseline": {}}

# wrk's request() callback cycles through pre-formatted requests.
WRK_SCRIPT = """
local bodies = {bodies}
local requests = {{}}
for i, body in ipairs(bodies) do
  requests[i] = wrk.format("POST", "/v1/decide", {{["Content-Type"] = "application/json",
    ["Authorization"] = "{auth}"}}, body)
end
local n = 0
request = function()
  n = n % #requests + 1
  return requests[n]
end
"""


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


def raw_request(body: str, key: str | None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    data = body.encode()
    return (f"POST /v1/decide HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            ).encode() + data


def wrk_round(port: int, script: Path, connections: int, seconds: float,
              path: str = "/v1/decide") -> dict[str, Any]:
    """One closed-loop run of ``wrk`` (one thread): req/s, p50, p99, errors."""
    done = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
                           "-s", str(script), f"http://127.0.0.1:{port}{path}"],
                          capture_output=True, text=True, timeout=seconds + 60, check=True)
    out: dict[str, Any] = {"errors": 0.0}
    for line in done.stdout.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            out["throughput_rps"] = float(words[1])
        elif words[:1] in (["50%"], ["99%"]):
            out[f"p{words[0][:2]}_ms"] = _ms(words[1])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            out["errors"] += float(words[-1])
            out["error_lines"] = [*out.get("error_lines", []), line.strip()]
        elif line.strip().startswith("Socket errors:"):
            out["errors"] += sum(float(w.rstrip(",")) for w in words[3::2])
            # connect / read / write / timeout: a timeout (2 s) is a stall, not an answer.
            out["error_lines"] = [*out.get("error_lines", []), line.strip()]
    return out


def _ms(value: str) -> float:
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if value.endswith(unit):
            return float(value[:-len(unit)]) * scale
    raise ValueError(value)


#: Prepended to the server modules by ``--write-cost``: times every call of uvicorn's
#: ``RequestResponseCycle.send`` by message kind (calls, CPU s, wall s) and dumps the sums
#: to ``$WRITE_STATS`` every 100 responses (uvicorn ends on a signal: no atexit).
WRITE_COST_PATCH = """
import json as _json, os as _os, time as _time
from uvicorn.protocols.http import httptools_impl as _impl
_send = _impl.RequestResponseCycle.send
_sums = {"headers": [0, 0.0, 0.0], "body": [0, 0.0, 0.0]}
async def _timed_send(self, message):
    kind = "headers" if message["type"] == "http.response.start" else "body"
    cpu, wall = _time.thread_time(), _time.perf_counter()
    await _send(self, message)
    entry = _sums[kind]
    entry[0] += 1
    entry[1] += _time.thread_time() - cpu
    entry[2] += _time.perf_counter() - wall
    if kind == "body" and entry[0] % 100 == 0:
        with open(_os.environ["WRITE_STATS"], "w") as fh:
            _json.dump(_sums, fh)
_impl.RequestResponseCycle.send = _timed_send
"""


def _write_sums(path: Path) -> dict[str, list[float]]:
    if not path.is_file():  # fewer than 100 responses so far
        return {"headers": [0, 0.0, 0.0], "body": [0, 0.0, 0.0]}
    return json.loads(path.read_text())


def write_cost(servers: dict[str, tuple[subprocess.Popen, int]], requests: dict[str, list[bytes]],
               stats: dict[str, Path], connections: int, seconds: float,
               rounds: int) -> dict[str, Any]:
    """``--write-cost``: per server, µs of CPU and of wall time per header write and per
    body write during ``rounds`` closed-loop runs (alternating), with the server's CPU
    per request; printed and returned."""
    out: dict[str, Any] = {}
    for r in range(rounds):
        for name in list(servers)[::1 if r % 2 == 0 else -1]:
            proc, port = servers[name]
            before = _write_sums(stats[name])
            load = asyncio.run(closed_loop(port, requests[name], connections, seconds,
                                           pid=proc.pid))
            after = _write_sums(stats[name])
            run = {"server_cpu_us_per_request": load["server_cpu_us_per_request"],
                   "throughput_rps": load["throughput_rps"]}
            for kind in ("headers", "body"):
                n = after[kind][0] - before[kind][0]
                run[f"{kind}_cpu_us"] = 1e6 * (after[kind][1] - before[kind][1]) / n
                run[f"{kind}_wall_us"] = 1e6 * (after[kind][2] - before[kind][2]) / n
            out.setdefault(name, []).append(run)
    keys = ("headers_cpu_us", "headers_wall_us", "body_cpu_us", "body_wall_us",
            "server_cpu_us_per_request")
    medians = {name: {k: float(np.median([run[k] for run in runs])) for k in keys}
               for name, runs in out.items()}
    print_table(f"uvicorn's response writes under closed-loop load (medians of {rounds} "
                "round(s), µs per call)",
                ["server", "headers CPU", "headers wall", "body CPU", "body wall",
                 "server CPU per request"],
                [[name, *(f"{m[k]:.1f}" for k in keys)] for name, m in medians.items()])
    return {"medians": medians, "rounds": out}


#: Where an event-loop sample goes: the first component (in this order) with a frame in
#: the sample's stack, so a sample inside the decide is the decide's, not the middleware's.
COMPONENTS = (
    ("policy: Policy.decide_batch (predict, score, propensities)", "Policy.decide_batch"),
    ("decider: prediction dicts", "prediction_dicts"),
    ("decider: reservation and row (predictions' orjson, id, time)", "Decider._reserve"),
    ("decider: the rest (groups, candidates, prices, guard)", "Decider.decide_many"),
    ("featurizing the text", "RoutingService.context_from"),
    ("route: pydantic body validation", "model_validate_json"),
    ("route: tenant for the key", "tenant_for_authorization"),
    ("route: enqueue for the writer, prompt tokens, batcher", "decide_pending"),
    ("route: the answer's orjson, the rest", "decide_body"),
    ("uvicorn: writing the response (two transport.write)", "RequestResponseCycle.send"),
    ("uvicorn: parsing the request (httptools callbacks)", "HttpToolsProtocol"),
    ("service middleware, Starlette routing and exception layers", "ServiceMiddleware"),
    ("FastAPI's own layers (telemetry check, body limit)", "FastAPI.__call__"),
    ("uvicorn: the request task, proxy headers", "run_asgi"),
    ("event loop, other", None),
)


def profile(port: int, pid: int, requests: list[bytes], connections: int, seconds: float,
            out: Path, gil: bool = False) -> None:
    """py-spy the server ``pid`` under closed-loop load; print its main thread's frames
    by inclusive share of the samples (idle excluded), then every thread's functions by
    their own (self) share. ``gil``: only samples of the thread holding the GIL (where
    the CPU goes, without the time spent waiting for the GIL)."""
    # py-spy is a binary that pip puts next to the interpreter.
    exe = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if exe is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    spy = subprocess.Popen([exe, "record", "--pid", str(pid),
                            "--duration", f"{seconds:g}", "--rate", "250", "--format", "raw",
                            "--output", str(out), "--nonblocking", "--threads",
                            *(["--gil"] if gil else [])],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    load = asyncio.run(closed_loop(port, requests, connections, seconds + 1.0, pid=pid))
    if spy.wait(60) != 0:
        raise RuntimeError(spy.stderr.read().decode()[-2000:])
    threads: collections.Counter[str] = collections.Counter()
    components: collections.Counter[str] = collections.Counter()
    frames: collections.Counter[tuple[str, str]] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    with out.open(encoding="utf-8") as fh:
        for line in fh:
            stack, count = line.rsplit(" ", 1)
            thread, *calls = stack.split(";")
            threads[thread] += int(count)
            leaves[re.sub(r":\d+\)$", ")", calls[-1]) if calls else thread] += int(count)
            # "function (file.py:line)" -> "function (file.py)", counted once per stack.
            for call in {re.sub(r":\d+\)$", ")", c) for c in calls}:
                frames[(thread, call)] += int(count)
            if "MainThread" in thread:
                components[next((name for name, key in COMPONENTS[:-1]
                                 if any(key in c for c in calls)), COMPONENTS[-1][0])
                           ] += int(count)
    main_thread, total = next((t, n) for t, n in threads.most_common() if "MainThread" in t)
    rows = [[call, f"{100 * n / total:.1f}"] for (t, call), n in frames.most_common()
            if t == main_thread and n >= 0.02 * total and "(asyncio/" not in call
            and "(click/" not in call and "runpy>" not in call and "uvicorn/main" not in call]
    print_table(f"router under load ({load['throughput_rps']:.0f} req/s while sampled): "
                f"event-loop thread, share of its {total} samples", ["frame", "%"], rows,
                caption="other threads' samples: " + ", ".join(
                    f"{t.split(': ')[-1]} {n}" for t, n in threads.most_common()
                    if t != main_thread) + f"; stacks in {out}")
    # µs per request: a share of every thread's samples times the server's CPU time per
    # request while sampled (the samples exclude idle time; GIL waits are counted).
    everything = sum(leaves.values())
    us = load["server_cpu_us_per_request"]
    shares = [(name, components[name]) for name, _ in COMPONENTS]
    shares.append(("other threads (decision writer, ...)", everything - total))
    print_table("where a request's time goes: event-loop thread by component (first "
                "match, in this order), then the other threads",
                ["component", "% of samples", "µs per request"],
                [[name, f"{100 * n / everything:.1f}", f"{us * n / everything:.0f}"]
                 for name, n in shares],
                caption=f"the server's CPU per request while sampled: {us:.0f} µs")
    print_table(f"self time, every thread ({everything} samples"
                + (", GIL holder only)" if gil else ")"), ["function", "%"],
                [[call, f"{100 * n / everything:.1f}"] for call, n in leaves.most_common(30)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--text-chars", type=int, default=500)
    parser.add_argument("--quick", action="store_true",
                        help="2 s phases, 1 round, no results file")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another source tree served as a fourth server (see above)")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="only py-spy the router under load (see the module doc)")
    parser.add_argument("--gil", action="store_true",
                        help="with --profile: sample only the thread holding the GIL")
    parser.add_argument("--write-cost", action="store_true",
                        help="only time uvicorn's response writes in bare and router "
                             "(see the module doc); writes results/NAME.json")
    parser.add_argument("--results-name", default="http_decide_text", metavar="NAME",
                        help="write results/NAME.json (default: %(default)s)")
    args = parser.parse_args(argv)
    seconds, rounds = (2.0, 1) if args.quick else (args.seconds, args.rounds)
    generators = ["asyncio"] + (["wrk"] if shutil.which("wrk") else [])
    if "wrk" not in generators:
        print("wrk not installed (apt-get install wrk): asyncio load generator only")

    names = NAMES + (("baseline",) if args.baseline is not None else ())
    if args.write_cost:
        names = ("bare", "router")
    runs: dict[str, list[dict[str, float]]] = {
        f"{name}_{gen}": [] for gen in generators for name in names}
    # At half of the router's maximum: the router, and at the same rate the bare endpoint
    # (what the machine and the load generator leave of the 5 ms) and the baseline.
    half_names = [n for n in ("router", "bare", "baseline") if n in names]
    for name in half_names:
        runs[f"{name}_half_load"] = []
    texts = query_texts(args.text_chars, 256)
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        patch = WRITE_COST_PATCH if args.write_cost else ""
        (tmpdir / "bare_app.py").write_text(patch + BARE_APP)
        (tmpdir / "router_app.py").write_text(patch + ROUTER_APP)
        stats = {name: tmpdir / f"write_cost_{name}.json" for name in names}
        servers = {}
        try:
            for name in names:
                env = {} if name == "bare" else {
                    "BANDIT_ROUTER_DATA_DIR": str(tmpdir / f"data_{name}"),
                    "BANDIT_ROUTER_ADMIN_KEY": ADMIN_KEY, "BANDIT_ROUTER_DIM": str(DIM),
                    "BANDIT_ROUTER_DATABASE_URL": "", **EXTRA_ENV[name]}
                env["WRITE_STATS"] = str(stats[name])
                port = free_port()
                source = args.baseline if name == "baseline" else REPO_ROOT
                servers[name] = (start_server(tmpdir, "bare_app" if name == "bare"
                                              else "router_app", port, env, source=source),
                                 port)
            keys = {name: None if name == "bare" else setup_router(servers[name][1])
                    for name in names}
            bodies = [json.dumps({"query": {"text": t}}) for t in texts]
            reqs = {name: [raw_request(b, keys[name]) for b in bodies] for name in names}
            scripts = {}
            for name in names:
                scripts[name] = tmpdir / f"{name}.lua"
                scripts[name].write_text(WRK_SCRIPT.format(
                    bodies="{" + ", ".join(json.dumps(b) for b in bodies[:32]) + "}",
                    auth=f"Bearer {keys[name]}" if keys[name] else ""))
            for name in names:  # warm-up
                asyncio.run(closed_loop(servers[name][1], reqs[name], 4, 1.0))
            if args.profile is not None:
                proc, port = servers["router"]
                profile(port, proc.pid, reqs["router"], args.connections, seconds,
                        args.profile, gil=args.gil)
                return
            if args.write_cost:
                result = write_cost({name: servers[name] for name in names}, reqs, stats,
                                    args.connections, seconds, rounds)
                if not args.quick:
                    print(f"wrote {write_results(args.results_name, result)}")
                return
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    port = servers[name][1]
                    runs[f"{name}_asyncio"].append(asyncio.run(closed_loop(
                        port, reqs[name], args.connections, seconds,
                        pid=servers[name][0].pid)))
                    if "wrk" in generators:
                        runs[f"{name}_wrk"].append(wrk_round(
                            port, scripts[name], args.connections, seconds))
            half = _median_run(runs["router_asyncio"], "throughput_rps")["throughput_rps"] / 2
            half_load_rounds(runs, half_names, servers, reqs, half, seconds,
                             args.connections, rounds)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)

    medians = {phase: _median_run(phase_runs, "p99_ms" if phase.endswith("_half_load")
                                  else "throughput_rps")
               for phase, phase_runs in runs.items()}
    ratios, per_round, rows = {}, {}, []
    for gen in generators:
        bare = runs[f"bare_{gen}"]
        for name in names:
            phase = f"{name}_{gen}"
            run = medians[phase]
            if name != "bare":
                ratios[phase] = run["throughput_rps"] / medians[f"bare_{gen}"]["throughput_rps"]
                per_round[phase] = [o["throughput_rps"] / b["throughput_rps"]
                                    for o, b in zip(runs[phase], bare, strict=True)]
            rows.append([f"{name} ({gen})", f"{run['throughput_rps']:.0f}",
                         f"{ratios[phase]:.2f}" if phase in ratios else "",
                         f"{run['p50_ms']:.2f}", f"{run['p99_ms']:.2f}",
                         f"{run['errors']:.0f}"])
    # Server CPU per request (asyncio rounds, medians): bare / router is the throughput
    # ratio a CPU-bound one-worker server would reach on an otherwise idle machine.
    cpu = {name: float(np.median([r["server_cpu_us_per_request"]
                                  for r in runs[f"{name}_asyncio"]])) for name in names}
    cpu_ratios = {name: cpu["bare"] / cpu[name] for name in names if name != "bare"}
    # At half load too: the decision writer's batches are smaller there than at the
    # maximum (its cost per row depends on them).
    cpu_half = {name: float(np.median([r["server_cpu_us_per_request"]
                                       for r in runs[f"{name}_half_load"]]))
                for name in half_names}
    half_load = medians["router_half_load"]
    for name in half_names:
        run = medians[f"{name}_half_load"]
        rows.append([f"{name} at {half_load['rate_rps']:.0f} req/s (router's half)", "", "",
                     f"{run['p50_ms']:.2f}", f"{run['p99_ms']:.2f}", f"{run['errors']:.0f}"])
    errors = sum(run["errors"] for phase in runs.values() for run in phase)
    goals = {"throughput_ratio_ge_0.6": ratios["router_asyncio"] >= 0.6,
             "p99_at_half_load_le_5ms": half_load["p99_ms"] <= 5.0, "no_errors": errors == 0}
    print_table(f"HTTP decide with {args.text_chars}-character query texts (uvicorn, "
                f"loopback, d={DIM}, {N_MODELS} models; medians of {rounds} round(s))",
                ["server (load generator)", "req/s", "/ bare", "p50 ms", "p99 ms", "errors"],
                rows, caption="ratio to bare per round: " + "; ".join(
                    f"{phase} " + ", ".join(f"{x:.2f}" for x in values)
                    for phase, values in per_round.items())
                + "; half-load p99 per round (load generator's own lateness p99): "
                + "; ".join(f"{name} " + ", ".join(
                    f"{r['p99_ms']:.1f} ({r['client_late_p99_ms']:.1f})"
                    for r in runs[f"{name}_half_load"]) for name in half_names)
                + f" ms; errors (all rounds): {errors:.0f}; goals: {goals}; server CPU µs per "
                "request (asyncio, median): " + ", ".join(f"{n} {v:.0f}" for n, v in cpu.items())
                + "; CPU ratio bare / router: " + ", ".join(
                    f"{n} {v:.2f}" for n, v in cpu_ratios.items())
                + "; server CPU µs per request at half load (median): " + ", ".join(
                    f"{n} {v:.0f}" for n, v in cpu_half.items()))
    if not args.quick:
        path = write_results(args.results_name, {
            "settings": {"dim": DIM, "models": N_MODELS, "connections": args.connections,
                         "baseline": None if args.baseline is None else str(args.baseline),
                         "seconds_per_phase": seconds, "rounds": rounds,
                         "text_chars": args.text_chars, "generators": generators,
                         "uvicorn": " ".join(UVICORN_ARGS)},
            **medians, "ratio_to_bare": ratios, "ratio_to_bare_per_round": per_round,
            "server_cpu_us_per_request": cpu, "cpu_ratio_to_bare": cpu_ratios,
            "server_cpu_us_per_request_half_load": cpu_half,
            "rounds": runs, "goals": goals,
        }, packages=("fastapi", "uvicorn", "uvloop", "httptools", "starlette", "pydantic",
                     "numpy", "numba", "orjson"))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
