"""Latency a gateway adds in front of an OpenAI-compatible upstream (issue 16, goal 4).

The upstream is the fake of ``tests/fakes/openai_upstream.py`` in its own process
(answers at once: whatever latency is measured is the path's, not a model's). Targets,
measured in the same run with the same load generator:

* ``direct``: the fake itself, ``POST /v1/chat/completions``;
* ``litellm``: a real LiteLLM Proxy process (``tests/bandit_router_litellm/proxy.py``:
  offline, no database, one worker) with one deployment pointing at the fake; no
  plug-in (LiteLLM's own overhead);
* ``router``: our ``POST /v1/chat/completions`` (service/gateway), served as
  ``bandit-router serve`` serves (uvicorn, uvloop, httptools, one worker, SQLite in a
  temporary folder), ``model: "auto"`` among two models whose upstream is the fake: a
  decision, the forwarded call and the outcome the router posts itself (stored in the
  background) per request. ``--no-litellm`` leaves LiteLLM out.

For each target and mode (``plain``, ``stream`` with ``include_usage``): an open loop at
``--rate`` requests/s for ``--seconds``, latency counted from each request's scheduled
send time (no coordinated omission); for a stream, also the time to the first content
chunk. The load generator is aiohttp: an earlier httpx one spent 1-3 ms of CPU per
request itself and saturated first (the 73 stream "errors" of that run, p99 50 s, were
most likely its own 30 s timeouts; it did not record their kind). Errors are counted by
kind (a status, or the exception's class). ``--rounds`` rounds, targets alternating (in
a different order each round);
each figure is the median over rounds, and "added" is the median over rounds of the
round's (gateway - direct) difference.

Each phase also records the CPU of each process per request (``cpu`` in the results):
the gateway's (its main thread, the event loop, apart from its other threads: storing,
learning; from ``/proc/PID/task/PID/stat``), the upstream's, the load generator's own
(``process_time``), the gateway loop's busy fraction (its CPU seconds per second of the
phase) and the harness's share of the machine's cores (upstream + load generator).

The harness (issue 16, fourteenth round): on a 2-core machine the upstream and the load
generator take cores the router would use. ``--upstream lean`` serves canned bytes from
benchmarks/lean_upstream.py instead of the tests' fake (the same answers but the ids;
used for the direct and the gateway targets alike), ``--loadgen raw`` sends with raw
asyncio streams and pre-encoded requests instead of aiohttp (the same measurement). A
deployment's upstream runs on another machine; the defaults (the fake, aiohttp) stay the
reference figures, the lean options are reported beside them.

Goal (issue 16, for our endpoint): p50 <= 1 ms and p99 <= 5 ms added at 1,000 req/s.
LiteLLM publishes p50 2 ms / p99 13 ms added at ~1,170 req/s on 4 instances x 4 CPUs.
On this shared 2-core machine, keep runs short (defaults: 100 req/s, 10 s, 3 rounds).

``--phases`` times the phases of one request inside the router instead
(benchmarks/gateway_phases.py, ``gateway_phases.json``); ``--store-cost`` the CPU per
outcome the router stores, by batch size (``gateway_store_cost.json``).

``--client-cost`` measures instead the CPU per call of the pooled client alone (httpx vs
aiohttp, this process's ``process_time`` over the calls, at 4 and 50 in flight): why the
gateway's upstream client is aiohttp (service/gateway/upstream.py).

Run::

    python -m benchmarks.gateway_overhead             # writes results/gateway_overhead.json
    python -m benchmarks.gateway_overhead --client-cost   # ..._client_cost.json
    python -m benchmarks.gateway_overhead --rate 1000 --seconds 3   # ..._1000rps.json
    python -m benchmarks.gateway_overhead --rate 1000 --upstream lean --loadgen raw
    python -m benchmarks.gateway_overhead --quick     # 3 s phases, 1 round, writes nothing
    python -m benchmarks.gateway_overhead --phases    # ..._phases.json
    python -m benchmarks.gateway_overhead --store-cost    # ..._store_cost.json
    python -m benchmarks.gateway_overhead --wrk       # ..._wrk.json (Debian package wrk)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np

from benchmarks.common import REPO_ROOT, print_table, write_results

MODEL = "fake"
ANSWER = "The fake upstream answers in eight short words here."
MESSAGES = [{"role": "user", "content": "How much latency does a gateway add?"}]


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # .../v1/chat/completions
    headers: dict[str, str]
    model: str = MODEL  # what the requests ask for
    #: The gateway's process: its CPU time per request is measured too (on a busy
    #: machine a more stable figure than the latencies, which include waiting for a core).
    pid: int | None = None


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process so far (Linux /proc); of its thread ``tid``
    alone when given (``tid == pid``: the main thread, the router's event loop)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(target: Target, upstream_pid: int | None) -> dict[str, float]:
    """The CPU seconds so far of each process of a phase: the gateway (its main thread,
    the event loop, and all its threads), the upstream, and this process (the load
    generator: ``process_time``, every thread of it)."""
    out = {"wall": time.perf_counter(), "loadgen": time.process_time()}
    if target.pid:
        out |= {"router_loop": cpu_seconds(target.pid, target.pid),
                "router": cpu_seconds(target.pid)}
    if upstream_pid:
        out["upstream"] = cpu_seconds(upstream_pid)
    return out


def cpu_shares(before: dict[str, float], ended: dict[str, float], after: dict[str, float],
               requests: int) -> dict[str, float]:
    """CPU ms per request of each process, their shares of the machine's cores, and the
    gateway's event-loop busy fraction, between two :func:`cpu_snapshot`s.

    ``ended`` is taken when the open loop ends, ``after`` once the gateway has stored the
    outcomes of the last answers: per-request figures count up to ``after``; the shares
    and the busy fraction (CPU seconds of the event loop's thread over the wall time of
    the phase: with the GIL, a thread waiting for it does not count) up to ``ended``."""
    wall = ended["wall"] - before["wall"]
    cores = os.cpu_count() or 1
    out: dict[str, float] = {"wall_s": wall}
    for name in ("router", "router_loop", "upstream", "loadgen"):
        if name in before:
            out[f"{name}_cpu_ms_per_request"] = (after[name] - before[name]) * 1e3 / requests
            out[f"{name}_share_of_cores"] = (ended[name] - before[name]) / (wall * cores)
    if "router" in before:
        out["router_threads_cpu_ms_per_request"] = (out["router_cpu_ms_per_request"]
                                                    - out["router_loop_cpu_ms_per_request"])
        out["router_loop_busy"] = (ended["router_loop"] - before["router_loop"]) / wall
    return out


def measured(target: Target, stream: bool, rate: float, seconds: float,
             upstream_pid: int | None = None, loadgen: str = "aiohttp") -> dict[str, Any]:
    """One phase of :func:`open_loop` (or another of :data:`LOADGENS`), with the CPU ms
    per request of each process (:func:`cpu_shares`; the gateway's also as
    ``cpu_ms_per_request``)."""
    before = cpu_snapshot(target, upstream_pid)
    out = asyncio.run(LOADGENS[loadgen](target, stream, rate, seconds))
    ended = cpu_snapshot(target, upstream_pid)
    if target.pid:
        time.sleep(0.5)  # the outcomes the router stores after its answers
    out["cpu"] = cpu_shares(before, ended, cpu_snapshot(target, upstream_pid),
                            out["requests"])
    if target.pid:
        out["cpu_ms_per_request"] = out["cpu"]["router_cpu_ms_per_request"]
    return out


#: The benchmark upstreams (``--upstream``): the fake of the tests (uvicorn + Starlette,
#: records every request; the default and the reference) and benchmarks/lean_upstream.py
#: (an asyncio protocol answering canned bytes: less of the two cores for the harness).
UPSTREAMS = {"fake": "tests.fakes.openai_upstream", "lean": "benchmarks.lean_upstream"}


@dataclass(frozen=True)
class Upstream:
    base: str  # http://127.0.0.1:<port>
    pid: int
    kind: str


@contextmanager
def upstream_process(kind: str = "fake") -> Iterator[Upstream]:
    """The upstream ``kind`` of :data:`UPSTREAMS` in its own process."""
    from tests.fakes.openai_upstream import free_port

    port = free_port()
    proc = subprocess.Popen(  # noqa: S603 - this interpreter, fixed arguments
        [sys.executable, "-m", UPSTREAMS[kind], "--port", str(port),
         "--model", f"{MODEL}={ANSWER}"], cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-2000:])
            try:
                if httpx.get(f"{base}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
        yield Upstream(base, proc.pid, kind)
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def fake_upstream_process() -> Iterator[str]:
    """The fake upstream in its own process; yields its base URL."""
    with upstream_process("fake") as upstream:
        yield upstream.base


@contextmanager
def litellm_proxy(upstream: str, folder: Path) -> Iterator[Target]:
    from tests.bandit_router_litellm.proxy import MASTER_KEY, running_proxy

    config = {"model_list": [{"model_name": MODEL, "litellm_params": {
                  "model": f"openai/{MODEL}", "api_base": f"{upstream}/v1",
                  "api_key": "sk-fake-upstream"}}],
              "router_settings": {"num_retries": 0},
              "general_settings": {"master_key": MASTER_KEY}}
    with running_proxy(config, folder, {"LITELLM_LOG": "ERROR"}) as (base, _log):
        yield Target("litellm", f"{base}/v1/chat/completions",
                     {"Authorization": f"Bearer {MASTER_KEY}"})


#: The router's app module with the phase timers of benchmarks/gateway_phases.py.
PHASES_APP = ("import benchmarks.gateway_phases as phases\n{app}"
              "app = phases.wrap_app(app)\n")


@contextmanager
def router_process(upstream: str, folder: Path, phases: Path | None = None,
                   source: Path = REPO_ROOT, name: str = "router") -> Iterator[Target]:
    """Our router in its own process, two models on the fake upstream, one tenant;
    with ``phases``, timed by phase (written there on SIGUSR1); the router's packages
    imported from ``source`` (another checkout: the baseline of a before/after run)."""
    from benchmarks.http_decide import ADMIN_KEY, ROUTER_APP, free_port, start_server

    folder.mkdir(exist_ok=True)
    (folder / "router_app.py").write_text(
        ROUTER_APP if phases is None else PHASES_APP.format(app=ROUTER_APP))
    port = free_port()
    proc = start_server(folder, "router_app", port, {
        "BANDIT_ROUTER_DATA_DIR": str(folder / "data"), "BANDIT_ROUTER_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_PHASES_OUT": str(phases or "")}, source=source)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for i, quality in enumerate((0.6, 0.8)):
                http.post("/v1/admin/models", headers=admin, json={
                    "name": f"model-{i}", "input_price_per_mtok": 0.1 * (i + 1),
                    "output_price_per_mtok": 0.4 * (i + 1), "prior_quality": quality,
                    "base_url": f"{upstream}/v1", "upstream_model": MODEL}
                ).raise_for_status()
            r = http.post("/v1/admin/tenants", headers=admin, json={"name": "bench"})
            r.raise_for_status()
            key = r.json()["api_key"]
        yield Target(name, f"http://127.0.0.1:{port}/v1/chat/completions",
                     {"Authorization": f"Bearer {key}"}, model="auto", pid=proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)


async def open_loop(target: Target, stream: bool, rate: float, seconds: float
                    ) -> dict[str, Any]:
    """``rate`` requests/s for ``seconds``; latency (and time to first token) from each
    request's scheduled time."""
    n = int(rate * seconds)
    payload, tally = _payload(target, stream), _Tally(n, stream)
    headers = {**target.headers, "content-type": "application/json"}
    # The load generator is aiohttp: httpx's own CPU per request (1-3 ms, see
    # service/gateway/upstream.py) saturated the generator before the gateways at
    # 1,000 req/s, and its 30 s pool timeout was the stream "errors" counted then.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        start = time.perf_counter() + 0.2

        async def one(j: int) -> None:
            scheduled = start + j / rate
            await asyncio.sleep(max(scheduled - time.perf_counter(), 0.0))
            try:
                async with client.post(target.url, data=payload,
                                       headers=headers) as response:
                    first = None
                    async for line in response.content:
                        if first is None and b'"content"' in line:
                            first = time.perf_counter()
                # After the response is released, as before: the same latency.
                tally.answered(j, response.status, scheduled, first)
            except (aiohttp.ClientError, TimeoutError) as exc:
                tally.error(type(exc).__name__)

        await asyncio.gather(*(one(j) for j in range(n)))
    return tally.summary()


class _Raw:
    """One keep-alive HTTP/1.1 connection of :func:`open_loop_raw`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def exchange(self, request: bytes) -> tuple[int, float | None, bool]:
        """Send ``request``, read the whole answer: (status, when the first chunk with
        a ``"content"`` arrived or None, whether the connection can be used again)."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked, again = 0, False, True
        for line in head.lower().split(b"\r\n")[1:]:
            if line.startswith(b"content-length:"):
                length = int(line[15:])
            elif line.startswith(b"transfer-encoding:") and b"chunked" in line:
                chunked = True
            elif line.startswith(b"connection:") and b"close" in line:
                again = False
        first = None
        if not chunked:
            body = await self.reader.readexactly(length)
            if b'"content"' in body:
                first = time.perf_counter()
            return status, first, again
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return status, first, again
            if first is None and b'"content"' in data:
                first = time.perf_counter()


async def open_loop_raw(target: Target, stream: bool, rate: float, seconds: float
                        ) -> dict[str, Any]:
    """:func:`open_loop`'s measurement with a leaner sender (``--loadgen raw``): raw
    asyncio streams, the request's bytes encoded once, a pool of keep-alive connections
    that grows as needed (no limit, as aiohttp's ``limit=0``); the same latency from each
    scheduled send, time to the first chunk with content for a stream, 30 s to read an
    answer, errors by kind (a status, or the exception's class)."""
    n = int(rate * seconds)
    payload, tally = _payload(target, stream), _Tally(n, stream)
    host_port, _, path = target.url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    request = (f"POST /{path} HTTP/1.1\r\nhost: {host_port}\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())
               + f"content-type: application/json\r\ncontent-length: {len(payload)}"
               "\r\n\r\n").encode() + payload
    idle: list[_Raw] = []
    opened: list[_Raw] = []
    start = time.perf_counter() + 0.2

    async def one(j: int) -> None:
        scheduled = start + j / rate
        await asyncio.sleep(max(scheduled - time.perf_counter(), 0.0))
        conn = None
        try:
            if idle:
                conn = idle.pop()
            else:
                conn = _Raw(*await asyncio.open_connection(host, int(port)))
                opened.append(conn)
            async with asyncio.timeout(30.0):
                status, first, again = await conn.exchange(request)
            if again:
                idle.append(conn)
            else:
                conn.writer.close()
            tally.answered(j, status, scheduled, first)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                TimeoutError, ValueError) as exc:
            if conn is not None:
                conn.writer.close()
            tally.error(type(exc).__name__)

    await asyncio.gather(*(one(j) for j in range(n)))
    for conn in opened:
        conn.writer.close()
    return tally.summary()


def _payload(target: Target, stream: bool) -> bytes:
    """The chat request both load generators send (a stream asks for its usage)."""
    body = {"model": target.model, "messages": MESSAGES}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


class _Tally:
    """What both load generators record: latency (and time to the first content chunk
    of a stream) from each request's scheduled time, errors by kind."""

    def __init__(self, n: int, stream: bool) -> None:
        self.n, self.stream = n, stream
        self.latencies, self.ttfts = np.full(n, np.nan), np.full(n, np.nan)
        self.errors: dict[str, int] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def answered(self, j: int, status: int, scheduled: float, first: float | None) -> None:
        if status != 200:
            self.error(f"status {status}")
            return
        self.latencies[j] = time.perf_counter() - scheduled
        if self.stream and first is not None:
            self.ttfts[j] = first - scheduled

    def summary(self) -> dict[str, Any]:
        ms = self.latencies[~np.isnan(self.latencies)] * 1e3
        out: dict[str, Any] = {
            "requests": self.n, "errors": sum(self.errors.values()),
            "errors_by_kind": self.errors,
            "p50_ms": float(np.percentile(ms, 50)) if ms.size else float("nan"),
            "p99_ms": float(np.percentile(ms, 99)) if ms.size else float("nan")}
        if self.stream:
            t = self.ttfts[~np.isnan(self.ttfts)] * 1e3
            out |= {"ttft_p50_ms": float(np.percentile(t, 50)) if t.size else float("nan"),
                    "ttft_p99_ms": float(np.percentile(t, 99)) if t.size else float("nan")}
        return out


#: The load generators (``--loadgen``): aiohttp (the default) or raw asyncio streams.
LOADGENS = {"aiohttp": open_loop, "raw": open_loop_raw}


async def client_cost(url: str, n: int, in_flight: int) -> dict[str, float]:
    """CPU ms per call of each client (``n`` calls, ``in_flight`` at a time)."""
    payload = json.dumps({"model": MODEL, "messages": MESSAGES}).encode()
    headers = {"content-type": "application/json"}

    async def drive(one: Any) -> float:
        await asyncio.gather(*(one() for _ in range(in_flight)))  # warm: connections
        gate = asyncio.Semaphore(in_flight)

        async def gated() -> None:
            async with gate:
                await one()

        before = time.process_time()
        await asyncio.gather(*(gated() for _ in range(n)))
        return (time.process_time() - before) * 1e3 / n

    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as hx, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000)) as ah:
        async def httpx_call() -> None:
            (await hx.post(url, content=payload, headers=headers)).raise_for_status()

        async def aiohttp_call() -> None:
            async with ah.post(url, data=payload, headers=headers) as r:
                await r.read()

        return {"httpx": await drive(httpx_call), "aiohttp": await drive(aiohttp_call)}


@contextmanager
def outcomes_to_store(n: int) -> Iterator[tuple[Any, Iterator[Any]]]:
    """A router app (embedded SQLite in a temporary folder) with ``n`` decisions written,
    and outcomes as the gateway posts them (``FeedbackItem``), without end: after the
    ``n`` decisions, the same decisions again with another event id (each outcome is
    stored and learned, none is a duplicate)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.gateway.feedback import EVENT_ID
    from service.routing import FeedbackItem
    from tests.service.conftest import add_model, create_tenant, decide, make_settings

    with tempfile.TemporaryDirectory() as tmp, \
            TestClient(create_app(make_settings(f"sqlite:///{tmp}/store.db"))) as client:
        service = client.app.state.routing  # type: ignore[attr-defined]
        models = [add_model(client) for _ in range(2)]
        headers = create_tenant(client)
        tenant = service.tenants[headers["X-Tenant"]]
        ids = [decide(client, headers, models, seed=i).json()["decision_id"]
               for i in range(n)]
        assert service.writer.flush()
        outcome = {"quality": None, "cost_usd": 1e-4, "latency_ms": 3.0}
        yield service, (FeedbackItem(tenant, ids[i % n], outcome, f"{EVENT_ID}-{i // n}")
                        for i in itertools.count())


def store_cost(batches: tuple[int, ...], per_size: int, rounds: int
               ) -> dict[str, list[float]]:
    """CPU ms per outcome the router stores (``feedback_many``), by batch size; this
    process's ``process_time``, steadier than wall time on a shared machine."""
    runs: dict[str, list[float]] = {}
    with outcomes_to_store(1000) as (service, items):
        service.feedback_many([next(items) for _ in range(20)])  # warm-up
        for _ in range(rounds):
            for size in batches:
                before = time.process_time()
                for _ in range(per_size // size):
                    service.feedback_many([next(items) for _ in range(size)])
                runs.setdefault(str(size), []).append(
                    (time.process_time() - before) * 1e3 / (per_size // size * size))
    return runs


def loop_lag(rounds: int, seconds: float = 2.0) -> dict[str, list[dict[str, float]]]:
    """How late the event loop wakes (a 2 ms timer, again and again) while another thread
    stores outcomes in batches of 25 without pause, by ``sys.setswitchinterval``; and with
    the thread idle, the machine's own lateness. A thread running Python code keeps the
    GIL up to the interval each time the loop wants it back: the mechanism of the
    router's latency tail while outcomes are stored. The last variant turns off the
    storing thread's pauses between chunks of rows applied (``service.ingest._YIELD_S``)."""
    import threading

    import service.ingest as ingest

    runs: dict[str, list[dict[str, float]]] = {}
    default = sys.getswitchinterval()
    variants = (("idle thread, 5 ms", 0.005, False), ("storing, 5 ms", 0.005, True),
                ("storing, 1 ms", 0.001, True), ("storing, 5 ms, no pauses", 0.005, True))
    pause = ingest._YIELD_EVERY
    with outcomes_to_store(1000) as (service, items):
        for _ in range(rounds):
            for name, interval, busy in variants:
                stop = threading.Event()

                def store(stop: threading.Event = stop) -> None:
                    while not stop.is_set():
                        service.feedback_many([next(items) for _ in range(25)])

                async def probe() -> list[float]:
                    late, end = [], time.perf_counter() + seconds
                    while time.perf_counter() < end:
                        t = time.perf_counter()
                        await asyncio.sleep(0.002)
                        late.append((time.perf_counter() - t - 0.002) * 1e3)
                    return late

                sys.setswitchinterval(interval)
                ingest._YIELD_EVERY = 10**9 if name.endswith("no pauses") else pause
                thread = threading.Thread(target=store if busy else stop.wait)
                thread.start()
                try:
                    late = asyncio.run(probe())
                finally:
                    stop.set()
                    thread.join()
                    sys.setswitchinterval(default)
                    ingest._YIELD_EVERY = pause
                runs.setdefault(name, []).append(
                    {"p50_ms": float(np.percentile(late, 50)),
                     "p99_ms": float(np.percentile(late, 99)), "wakeups": len(late)})
    return runs


def main_store_cost(rounds: int) -> None:
    runs = store_cost((1, 5, 25, 100), 300, rounds)
    summary = {k: float(np.median(v)) for k, v in runs.items()}
    print_table(f"CPU ms per stored outcome by batch size (SQLite; median of {rounds} "
                "rounds of 300 outcomes)", ["batch size", "CPU ms per outcome"],
                [[k, f"{v:.3f}"] for k, v in summary.items()],
                caption="why service/gateway/feedback.py waits for a batch")
    lag = loop_lag(rounds)
    lag_summary = {k: {f: float(np.median([r[f] for r in v])) for f in ("p50_ms", "p99_ms")}
                   for k, v in lag.items()}
    print_table(f"Event-loop lateness while outcomes are stored (median of {rounds} rounds "
                "of 2 s)", ["thread / switch interval", "p50 ms", "p99 ms"],
                [[k, f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}"]
                 for k, v in lag_summary.items()],
                caption="the tail the storing thread adds to every request it overlaps")
    path = write_results("gateway_store_cost", {
        "summary": summary, "rounds": runs, "loop_lag": lag_summary, "loop_lag_rounds": lag},
        packages=("sqlalchemy",))
    print(f"wrote {path}")


#: wrk's script: every request the same chat body (``wrk.format`` builds it once).
WRK_CHAT = """
local req = wrk.format("POST", nil, {{["Content-Type"] = "application/json"{auth}}},
                       [[{body}]])
request = function() return req end
"""


def main_wrk(seconds: float, rounds: int, connections: int, write: bool,
             baseline: Path | None) -> None:
    """Cross-check with ``wrk`` (closed loop, one thread, ``connections`` connections,
    plain): the most each target serves, and its latencies there; the router's CPU."""
    from benchmarks.http_decide_text import wrk_round

    runs: dict[str, list[dict[str, Any]]] = {}
    with fake_upstream_process() as upstream, tempfile.TemporaryDirectory() as tmp, \
            contextlib.ExitStack() as stack:
        targets = [Target("direct", f"{upstream}/v1/chat/completions", {}),
                   stack.enter_context(router_process(upstream, Path(tmp) / "router"))]
        if baseline is not None:
            targets.append(stack.enter_context(router_process(
                upstream, Path(tmp) / "baseline", source=baseline.resolve(),
                name="baseline")))
        for r in range(rounds + 1):  # round 0: warm-up, not kept
            for target in targets if r % 2 else targets[::-1]:
                auth = "".join(f', ["{k}"] = "{v}"' for k, v in target.headers.items())
                script = Path(tmp) / f"{target.name}.lua"
                script.write_text(WRK_CHAT.format(auth=auth, body=json.dumps(
                    {"model": target.model, "messages": MESSAGES})))
                port = int(target.url.split(":")[2].split("/")[0])
                before = cpu_seconds(target.pid) if target.pid else 0.0
                out = wrk_round(port, script, connections, seconds,
                                path="/v1/chat/completions")
                if target.pid:
                    served = out["throughput_rps"] * seconds
                    out["cpu_ms_per_request"] = (cpu_seconds(target.pid) - before) * 1e3 \
                        / served
                if r:
                    runs.setdefault(target.name, []).append(out)
    summary = {name: {k: float(np.median([run[k] for run in rs]))
                      for k in rs[0] if k != "error_lines"} for name, rs in runs.items()}
    print_table(f"wrk -t1 -c{connections} closed loop, plain chat (medians of {rounds} "
                f"round(s) of {seconds:.0f} s)",
                ["target", "req/s", "p50 ms", "p99 ms", "errors", "router CPU ms/req"],
                [[name, f"{s['throughput_rps']:.0f}", f"{s['p50_ms']:.2f}",
                  f"{s['p99_ms']:.2f}", f"{s['errors']:.0f}",
                  f"{s['cpu_ms_per_request']:.2f}" if "cpu_ms_per_request" in s else ""]
                 for name, s in summary.items()])
    if write:
        path = write_results("gateway_overhead_wrk", {
            "settings": {"connections": connections, "seconds": seconds, "rounds": rounds},
            "summary": summary, "rounds": runs}, packages=("aiohttp", "uvicorn"))
        print(f"wrote {path}")


def main_client_cost(rounds: int) -> None:
    runs: dict[str, list[float]] = {}
    with fake_upstream_process() as upstream:
        for _ in range(rounds):
            for in_flight in (4, 50):
                for name, ms in asyncio.run(client_cost(
                        f"{upstream}/v1/chat/completions", 2000, in_flight)).items():
                    runs.setdefault(f"{name}/{in_flight}", []).append(ms)
    summary = {k: float(np.median(v)) for k, v in runs.items()}
    print_table("CPU ms per call of the pooled client alone (fake upstream, 2,000 calls; "
                f"median of {rounds} rounds)", ["client / in flight", "CPU ms per call"],
                [[k, f"{v:.3f}"] for k, v in summary.items()])
    path = write_results("gateway_client_cost", {"summary": summary, "rounds": runs},
                         packages=("httpx", "httpcore", "aiohttp"))
    print(f"wrote {path}")


def phases_of(target: Target, out: Path) -> dict[str, dict[str, float]]:
    """What the router's phase timers measured since the last call."""
    assert target.pid is not None
    out.unlink(missing_ok=True)
    os.kill(target.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not out.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the router wrote no phase timings")
        time.sleep(0.05)
    return json.loads(out.read_text())


def main_phases(rate: float, seconds: float, rounds: int, write: bool) -> None:
    """Time the phases of a request inside the router (see benchmarks/gateway_phases.py),
    plain and stream, beside the direct path's latency in the same run."""
    runs: dict[str, list[Any]] = {}
    with fake_upstream_process() as upstream, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "phases.json"
        with router_process(upstream, Path(tmp), phases=out) as router:
            direct = Target("direct", f"{upstream}/v1/chat/completions", {})
            for target in (router, direct):  # warm-up
                asyncio.run(open_loop(target, False, rate, 1.0))
            for _ in range(rounds):
                for mode, stream in (("plain", False), ("stream", True)):
                    runs.setdefault(f"direct/{mode}", []).append(
                        asyncio.run(open_loop(direct, stream, rate, seconds)))
                    phases_of(router, out)  # clears what the direct phase saw
                    runs.setdefault(f"router/{mode}", []).append(
                        measured(router, stream, rate, seconds))
                    runs.setdefault(f"phases/{mode}", []).append(phases_of(router, out))
    summary: dict[str, Any] = {}
    for mode in ("plain", "stream"):
        phases = runs[f"phases/{mode}"]
        summary[mode] = {
            "direct_p50_ms": float(np.median([r["p50_ms"] for r in runs[f"direct/{mode}"]])),
            "router_p50_ms": float(np.median([r["p50_ms"] for r in runs[f"router/{mode}"]])),
            "router_p99_ms": float(np.median([r["p99_ms"] for r in runs[f"router/{mode}"]])),
            "cpu_ms_per_request": float(np.median([r["cpu_ms_per_request"]
                                                   for r in runs[f"router/{mode}"]])),
            "phases": {name: {field: float(np.median([p[name][field] for p in phases
                                                      if name in p]))
                              for field in phases[0][name]}
                       for name in phases[0]}}
        s = summary[mode]
        print_table(f"Phases of one request inside the router, {mode}, {rate:.0f} req/s "
                    f"(medians of {rounds} round(s) of {seconds:.0f} s)",
                    ["phase", "n", "wall p50 ms", "wall p99 ms", "wall mean ms",
                     "thread CPU mean ms"],
                    [[name, int(p["n"]), f"{p['wall_p50_ms']:.3f}", f"{p['wall_p99_ms']:.3f}",
                      f"{p['wall_mean_ms']:.3f}", f"{p['cpu_mean_ms']:.3f}"]
                     for name, p in s["phases"].items()],
                    caption=f"direct p50 {s['direct_p50_ms']:.2f} ms; router p50 "
                            f"{s['router_p50_ms']:.2f} / p99 {s['router_p99_ms']:.2f} ms; "
                            f"router process CPU {s['cpu_ms_per_request']:.2f} ms per "
                            "request. bg_*: per batch, in background threads.")
    if write:
        path = write_results("gateway_phases", {
            "settings": {"rate_rps": rate, "seconds_per_phase": seconds, "rounds": rounds},
            "summary": summary, "rounds": runs}, packages=("aiohttp", "uvicorn"))
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="3 s phases, 1 round, no results file")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", default=None,
                        help="results file name (default gateway_overhead[_<rate>rps])")
    parser.add_argument("--upstream", choices=sorted(UPSTREAMS), default="fake",
                        help="the upstream of every target: the tests' fake (default) or "
                             "benchmarks/lean_upstream.py (canned bytes, less CPU)")
    parser.add_argument("--loadgen", choices=("aiohttp", "raw"), default="aiohttp",
                        help="the open-loop sender: aiohttp (default) or raw asyncio "
                             "streams with pre-encoded requests (less CPU)")
    parser.add_argument("--no-litellm", action="store_true",
                        help="measure the direct path and our router only")
    parser.add_argument("--client-cost", action="store_true",
                        help="the CPU per call of httpx vs aiohttp alone (see above)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="also measure the router of this checkout (e.g. main's: "
                             "git archive main | tar -x -C DIR) as target 'baseline'")
    parser.add_argument("--phases", action="store_true",
                        help="time the phases of a request inside the router instead "
                             "(benchmarks/gateway_phases.py; gateway_phases.json)")
    parser.add_argument("--store-cost", action="store_true",
                        help="the CPU per outcome the router stores, by batch size "
                             "(gateway_store_cost.json)")
    parser.add_argument("--wrk", action="store_true",
                        help="cross-check with wrk, closed loop (gateway_overhead_wrk.json)")
    args = parser.parse_args(argv)
    if args.wrk:
        main_wrk(3.0 if args.quick else args.seconds, 1 if args.quick else args.rounds, 8,
                 not (args.quick or args.no_write), args.baseline)
        return
    if args.store_cost:
        main_store_cost(args.rounds)
        return
    if args.phases:
        main_phases(args.rate, 3.0 if args.quick else args.seconds,
                    1 if args.quick else args.rounds, not (args.quick or args.no_write))
        return
    if args.client_cost:
        main_client_cost(args.rounds)
        return
    seconds = 3.0 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds
    modes = {"plain": False, "stream": True}

    runs: dict[str, list[dict[str, Any]]] = {}
    load_at_start = uptime()
    print(f"load average at start: {load_at_start}")
    with upstream_process(args.upstream) as up, tempfile.TemporaryDirectory() as tmp, \
            contextlib.ExitStack() as stack:
        upstream = up.base
        targets = [Target("direct", f"{upstream}/v1/chat/completions", {}),
                   stack.enter_context(router_process(upstream, Path(tmp) / "router"))]
        if args.baseline is not None:
            targets.append(stack.enter_context(router_process(
                upstream, Path(tmp) / "baseline", source=args.baseline.resolve(),
                name="baseline")))
        if not args.no_litellm:
            (Path(tmp) / "litellm").mkdir()
            targets.append(stack.enter_context(litellm_proxy(upstream, Path(tmp) / "litellm")))
        for target in targets:  # warm-up: connections, imports, caches
            for stream in modes.values():
                asyncio.run(LOADGENS[args.loadgen](target, stream, args.rate, 1.0))
        for r in range(rounds):
            # A different order each round: the gateways alternate with the direct path.
            for target in (targets if r % 2 == 0 else targets[::-1]):
                for mode, stream in modes.items():
                    runs.setdefault(f"{target.name}/{mode}", []).append(
                        measured(target, stream, args.rate, seconds, up.pid,
                                 args.loadgen))

    def median(key: str, field: str) -> float:
        return float(np.median([run[field] for run in runs[key]]))

    def added(gateway: str, mode: str, field: str) -> float:
        return float(np.median([g[field] - d[field] for g, d in zip(
            runs[f"{gateway}/{mode}"], runs[f"direct/{mode}"], strict=True)]))

    summary: dict[str, dict[str, Any]] = {}
    rows = []
    for key in runs:
        target, mode = key.split("/")
        fields = ["p50_ms", "p99_ms"] + (["ttft_p50_ms", "ttft_p99_ms"] if modes[mode] else [])
        summary[key] = {f: median(key, f) for f in fields}
        if "cpu_ms_per_request" in runs[key][0]:
            summary[key]["cpu_ms_per_request"] = median(key, "cpu_ms_per_request")
            print(f"{key}: gateway process CPU {summary[key]['cpu_ms_per_request']:.2f} ms "
                  "per request")
        summary[key]["cpu"] = {f: float(np.median([run["cpu"][f] for run in runs[key]]))
                               for f in runs[key][0]["cpu"]}
        summary[key]["cpu"] |= harness_shares(runs[key])
        summary[key]["errors"] = sum(run["errors"] for run in runs[key])
        kinds: dict[str, int] = {}
        for run in runs[key]:
            for kind, count in run["errors_by_kind"].items():
                kinds[kind] = kinds.get(kind, 0) + count
        summary[key]["errors_by_kind"] = kinds
        if target != "direct":
            summary[key] |= {f"added_{f}": added(target, mode, f) for f in fields}
        s = summary[key]
        rows.append([key, f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}",
                     f"{s['ttft_p50_ms']:.2f}" if "ttft_p50_ms" in s else "",
                     f"{s['added_p50_ms']:.2f}" if "added_p50_ms" in s else "",
                     f"{s['added_p99_ms']:.2f}" if "added_p99_ms" in s else "",
                     f"{s['added_ttft_p50_ms']:.2f}" if "added_ttft_p50_ms" in s else "",
                     s["errors"]])
    print_table(f"CPU per request by process at {args.rate:.0f} req/s ({args.upstream} "
                f"upstream, {args.loadgen} load generator; medians of {rounds} round(s); "
                f"{os.cpu_count()} cores)",
                ["target/mode", "router ms/req", "its loop", "its threads", "loop busy",
                 "upstream ms/req", "loadgen ms/req", "harness share", "all share"],
                [[key, *(f"{s['cpu'][f]:.3f}" if f in s["cpu"] else "" for f in (
                    "router_cpu_ms_per_request", "router_loop_cpu_ms_per_request",
                    "router_threads_cpu_ms_per_request")),
                  f"{s['cpu']['router_loop_busy']:.2f}" if "router_loop_busy" in s["cpu"]
                  else "",
                  f"{s['cpu']['upstream_cpu_ms_per_request']:.3f}",
                  f"{s['cpu']['loadgen_cpu_ms_per_request']:.3f}",
                  f"{s['cpu']['harness_share_of_cores']:.2f}",
                  f"{s['cpu']['all_share_of_cores']:.2f}"] for key, s in summary.items()],
                caption="ms of CPU per request (user + system) of each process; 'its "
                        "loop': the router's main thread (the event loop), 'its threads': "
                        "the others (storing, learning); loop busy: the loop thread's CPU "
                        "seconds per second of the phase; shares: CPU seconds per second "
                        "of the phase over the cores, harness = upstream + load generator, "
                        "all = harness + the gateway measured (LiteLLM's is not counted).")
    print_table(f"Gateway overhead at {args.rate:.0f} req/s (loopback, {args.upstream} "
                f"upstream, {args.loadgen} load generator; "
                f"medians of {rounds} round(s) of {seconds:.0f} s)",
                ["target/mode", "p50 ms", "p99 ms", "TTFT p50", "added p50", "added p99",
                 "added TTFT p50", "errors"], rows,
                caption="added = gateway - direct, median over rounds of the paired "
                        "difference. LiteLLM publishes p50 2 ms / p99 13 ms added at "
                        "~1,170 req/s on 4 instances x 4 CPUs.")
    if not (args.quick or args.no_write):
        name = args.out or ("gateway_overhead"
                            + ("" if args.rate == 100 else f"_{args.rate:.0f}rps"))
        path = write_results(name, {
            "settings": {"rate_rps": args.rate, "seconds_per_phase": seconds,
                         "upstream": args.upstream, "loadgen": args.loadgen,
                         "load_at_start": load_at_start,
                         "load_at_end": uptime(),
                         "baseline": None if args.baseline is None else str(args.baseline),
                         "rounds": rounds, "litellm_workers": 1 if not args.no_litellm else 0,
                         "router": "uvicorn, 1 worker, SQLite, model auto of 2"},
            "summary": summary, "rounds": runs}, packages=("litellm", "aiohttp", "uvicorn"))
        print(f"wrote {path}")


def uptime() -> str:
    """The machine's load averages (1, 5, 15 min) when the results are written."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def harness_shares(phases: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over rounds of the harness's share of the cores (upstream + load
    generator) and of everything measured (+ the gateway when it is ours)."""
    def share(run: dict[str, Any], names: tuple[str, ...]) -> float:
        return sum(run["cpu"].get(f"{n}_share_of_cores", 0.0) for n in names)

    return {"harness_share_of_cores": float(np.median(
                [share(r, ("upstream", "loadgen")) for r in phases])),
            "all_share_of_cores": float(np.median(
                [share(r, ("upstream", "loadgen", "router")) for r in phases]))}


if __name__ == "__main__":
    main()
