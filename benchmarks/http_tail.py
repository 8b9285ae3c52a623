"""Where the slow requests of a decide at half load lose their time.

The router of :mod:`benchmarks.http_decide` (uvicorn, one worker, embedded mode, d=64,
16 models, client embeddings), its module prefixed with :data:`TAIL_PATCH`, which
records inside the server, on the clock the load generator uses (``perf_counter``:
``CLOCK_MONOTONIC``, one clock for every process of the machine):

* event-loop stalls: a task sleeping 0.5 ms in a loop; a wake-up more than 2 ms late is
  a stall, kept with the CPU time the event-loop thread used meanwhile (a stall with
  little CPU is a thread that was not running: preempted by other processes, or waiting
  for the GIL; with much CPU, the loop was busy with callbacks, i.e. requests);
* the decision writer's batches (``DecisionWriter._write_batch``: rows, thread CPU);
* the garbage collector's collections (``gc.callbacks``: generation, pause);
* the registry refresh (every ``registry_refresh_s``, in a worker thread).

The load generator is :func:`benchmarks.http_decide.open_loop`'s, extended to keep each
request's scheduled, sent and answered times. For the requests at or above the round's
p99 it reports how late the load generator itself sent them (its process shares the
machine's cores), and which server events overlapped them.

Run::

    python -m benchmarks.http_tail                       # half of a 3 s closed-loop max
    python -m benchmarks.http_tail --rate 2500 --rounds 3 --source /tmp/base_tree
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO_ROOT, print_table, write_results
from benchmarks.http_decide import (
    ADMIN_KEY,
    DIM,
    ROUTER_APP,
    build_requests,
    closed_loop,
    free_port,
    open_loop_times,
    setup_router,
    start_server,
)

#: Prepended to the router's module: records the events above in a list, written to
#: ``$TAIL_EVENTS`` (and the list emptied) whenever ``$TAIL_EVENTS.go`` appears.
TAIL_PATCH = '''
import asyncio as _asyncio, gc as _gc, json as _json, os as _os, threading as _threading
import time as _time
_events = []
_pc, _tt = _time.perf_counter, _time.thread_time
_gc_start = [0.0]
def _on_gc(phase, info):
    if phase == "start":
        _gc_start[0] = _pc()
    else:
        _events.append(("gc%d" % info["generation"], _gc_start[0], _pc(), 0, 0.0))
_gc.callbacks.append(_on_gc)
import service.batching as _batching, service.routing as _routing, service.writer as _writer
def _timed(cls, name, kind, rows=False):
    original = getattr(cls, name)
    def timed(self, *args):
        t0, c0 = _pc(), _tt()
        try:
            return original(self, *args)
        finally:
            _events.append((kind, t0, _pc(), len(args[0]) if rows else 0, _tt() - c0))
    setattr(cls, name, timed)
_timed(_writer.DecisionWriter, "_write_batch", "write", rows=True)
_timed(_routing.RoutingService, "refresh_registry", "refresh")
async def _watch_loop():
    while True:
        t0, c0 = _pc(), _tt()
        await _asyncio.sleep(0.0005)
        t1 = _pc()
        if t1 - t0 > 0.002:
            _events.append(("stall", t0, t1, 0, _tt() - c0))
_decide = _batching.DecideBatcher.decide
def _decide_watched(self, *args, **kwargs):
    if not getattr(self, "_watched", False):
        self._watched = True
        _asyncio.get_running_loop().create_task(_watch_loop())
    return _decide(self, *args, **kwargs)
_batching.DecideBatcher.decide = _decide_watched
def _dump():
    path = _os.environ["TAIL_EVENTS"]
    while True:
        _time.sleep(0.1)
        if _os.path.exists(path + ".go"):
            events = list(_events)
            del _events[:len(events)]
            with open(path + ".tmp", "w") as fh:
                _json.dump(events, fh)
            _os.replace(path + ".tmp", path)
            _os.remove(path + ".go")
_threading.Thread(target=_dump, name="tail-events", daemon=True).start()
'''


def _take_events(path: Path) -> list[list[Any]]:
    """The server's events since the last call."""
    go = Path(f"{path}.go")
    path.unlink(missing_ok=True)
    go.touch()
    deadline = time.monotonic() + 10
    while go.exists() or not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not write its events")
        time.sleep(0.02)
    return json.loads(path.read_text())


def analyse(times: list[tuple[float, float, float, int]], events: list[list[Any]]
            ) -> dict[str, Any]:
    """One round: latency, the load generator's lateness, the server's events, and what
    overlapped the requests at or above the p99."""
    lat = np.array([(done - scheduled) * 1e3 for scheduled, _, done, _ in times])
    late = np.array([(sent - scheduled) * 1e3 for scheduled, sent, _, _ in times])
    p99 = float(np.percentile(lat, 99))
    slow = [t for t, ms in zip(times, lat, strict=True) if ms >= p99]
    stalls = [e for e in events if e[0] == "stall"]
    # Not running: the event-loop thread used under half of the stall's wall time.
    idle = [e for e in stalls if e[4] < 0.5 * (e[2] - e[1])]
    kinds = {"stall, loop not running": idle,
             "stall, loop busy": [e for e in stalls if e not in idle],
             "writer batch": [e for e in events if e[0] == "write"],
             "gc collection": [e for e in events if e[0].startswith("gc")],
             "registry refresh": [e for e in events if e[0] == "refresh"]}

    def overlapping(spans: list[list[Any]]) -> int:
        return sum(any(e[1] < done and e[2] > scheduled for e in spans)
                   for scheduled, _, done, _ in slow)

    writes = kinds["writer batch"]
    rows = sum(e[3] for e in writes)
    span = max(done for _, _, done, _ in times) - min(s for s, _, _, _ in times)
    return {
        "requests": len(times), "errors": sum(status != 200 for *_, status in times),
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": p99,
        "client_late_p99_ms": float(np.percentile(late, 99)),
        "slow_requests": len(slow),
        "slow_client_late_median_ms": float(np.median(
            [(sent - scheduled) * 1e3 for scheduled, sent, _, _ in slow])),
        "slow_overlapping": {k: overlapping(v) for k, v in kinds.items()},
        "stalls": {"not_running": len(idle), "busy": len(stalls) - len(idle),
                   "not_running_ms": sum(e[2] - e[1] for e in idle) * 1e3,
                   "busy_ms": sum(e[2] - e[1] for e in stalls if e not in idle) * 1e3,
                   "max_ms": max([(e[2] - e[1]) * 1e3 for e in stalls], default=0.0),
                   "not_running_during_writes": sum(
                       any(w[1] < e[2] and w[2] > e[1] for w in writes) for e in idle)},
        "writer": {"batches": len(writes), "rows": rows,
                   "cpu_us_per_row": sum(e[4] for e in writes) / max(rows, 1) * 1e6,
                   # The share of the round's time a batch was being written: a stall
                   # overlaps a batch about this often by chance alone.
                   "time_share": sum(e[2] - e[1] for e in writes) / span,
                   "max_batch_ms": max([(e[2] - e[1]) * 1e3 for e in writes], default=0.0)},
        "gc": {"collections": len(kinds["gc collection"]),
               "max_pause_ms": max([(e[2] - e[1]) * 1e3 for e in kinds["gc collection"]],
                                   default=0.0)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rate", type=float, default=None,
                        help="requests/s (default: half of a 3 s closed-loop maximum)")
    parser.add_argument("--source", type=Path, default=REPO_ROOT,
                        help="the source tree of the router (default: this one)")
    parser.add_argument("--results-name", default=None, metavar="NAME",
                        help="also write results/NAME.json")
    args = parser.parse_args(argv)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "router_app.py").write_text(TAIL_PATCH + ROUTER_APP)
        events = tmpdir / "events.json"
        env = {"BANDIT_ROUTER_DATA_DIR": str(tmpdir / "data"),
               "BANDIT_ROUTER_ADMIN_KEY": ADMIN_KEY, "BANDIT_ROUTER_DIM": str(DIM),
               "BANDIT_ROUTER_DATABASE_URL": "", "TAIL_EVENTS": str(events)}
        port = free_port()
        proc = start_server(tmpdir, "router_app", port, env, source=args.source)
        try:
            reqs = build_requests(setup_router(port))
            top = asyncio.run(closed_loop(port, reqs, args.connections, 3.0))  # warm-up
            rate = args.rate or top["throughput_rps"] / 2
            for _ in range(args.rounds):
                _take_events(events)
                times = asyncio.run(open_loop_times(port, reqs, rate, args.seconds,
                                                    args.connections))
                rounds.append(analyse(times, _take_events(events)))
        finally:
            proc.terminate()
            proc.wait(30)
    print_table(f"decide at {rate:.0f} req/s (open loop, {args.connections} connections, "
                f"{args.seconds:g} s rounds; router from {args.source})",
                ["round", "p50 ms", "p99 ms", "load generator late p99 ms",
                 "slow: its lateness (median) ms", "slow overlapping (of n)",
                 "loop stalls > 2 ms: not running / busy (ms)",
                 "not running during a write (writes' time share)", "writer µs CPU / row",
                 "gc (max ms)"],
                [[i, f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                  f"{r['client_late_p99_ms']:.2f}", f"{r['slow_client_late_median_ms']:.2f}",
                  f"n={r['slow_requests']}: " + ", ".join(
                      f"{k} {v}" for k, v in r["slow_overlapping"].items() if v),
                  f"{r['stalls']['not_running']} ({r['stalls']['not_running_ms']:.0f}) / "
                  f"{r['stalls']['busy']} ({r['stalls']['busy_ms']:.0f}); max "
                  f"{r['stalls']['max_ms']:.1f}",
                  f"{r['stalls']['not_running_during_writes']} "
                  f"({r['writer']['time_share']:.0%})",
                  f"{r['writer']['cpu_us_per_row']:.1f}",
                  f"{r['gc']['collections']} ({r['gc']['max_pause_ms']:.1f})"]
                 for i, r in enumerate(rounds)])
    if args.results_name:
        path = write_results(args.results_name, {
            "settings": {"rate_rps": rate, "seconds": args.seconds,
                         "connections": args.connections, "source": str(args.source)},
            "rounds": rounds}, packages=("uvicorn", "uvloop", "starlette", "numpy"))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
