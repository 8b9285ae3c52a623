"""Where the router's CPU per forwarded call goes: py-spy on the router under load.

The router and the fake upstream of ``benchmarks.gateway_overhead`` (same processes, same
settings), a warm-up at ``--rate`` (numba compiles the batched decide on the first batch
of more than one decide), then for each mode (plain, stream) ``py-spy record --gil
--format raw`` on the router process while the open loop runs. ``--gil``: only the
thread holding the GIL is sampled; without it the event loop's samples include its waits
for the GIL (the storing thread's turns), counted at whatever line it waited.

Each sample is counted in one group: the innermost frame that matches a group's
patterns, for the event loop's thread (``loop:``) and for the background threads
(``thread:``). py-spy is not a dependency: ``pip install py-spy`` (it needs ptrace).

Run::

    python -m benchmarks.gateway_profile --rate 600 --seconds 10   # prints, writes raw
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import REPO_ROOT, print_table
from benchmarks.gateway_overhead import (
    cpu_seconds,
    fake_upstream_process,
    open_loop,
    router_process,
)

#: (group, patterns) in order of precedence for a frame; the innermost frame that
#: matches any group decides the sample's group.
LOOP_GROUPS = [
    ("json (orjson)", ["orjson"]),
    ("featurize", ["featurize", "service/features.py", "_hashing"]),
    ("decide (batcher, policy, predictions, reserve)",
     ["service/decider.py", "service/batching.py", "bandit/"]),
    ("aiohttp client (incl. the send syscall)", ["aiohttp/", "yarl/", "multidict/"]),
    ("our route code (gateway, decide_pending, metrics)",
     ["service/gateway/", "service/routes/decide.py", "service/deps.py",
      "service/routing.py", "service/writer.py", "service/budget.py", "prometheus_client/"]),
    ("our middleware", ["service/middleware.py", "service/observability.py",
                        "service/limits.py"]),
    ("Starlette/FastAPI", ["starlette/", "fastapi/"]),
    ("uvicorn/httptools (incl. the send syscall)",
     ["uvicorn/protocols", "uvicorn/middleware", "httptools"]),
]
THREAD_GROUPS = [
    ("learning (PolicyStore.apply)", ["service/policies.py"]),
    ("decision writer", ["service/decision_insert.py", "DecisionWriter"]),
    ("storing outcomes (ingest SQL)", ["service/ingest", "sqlalchemy/", "sqlite3"]),
]


def _group(frames: list[str], groups: list[tuple[str, list[str]]]) -> str | None:
    for frame in reversed(frames):
        for name, patterns in groups:
            if any(p in frame for p in patterns):
                return name
    return None


def grouped(raw: Path) -> Counter[str]:
    """GIL-held samples of a py-spy raw file by group."""
    counts: Counter[str] = Counter()
    pending = ""
    for part in raw.read_text().split("\n"):
        # A sample is "frame;frame;... count"; a frame's name may hold a newline (SQL
        # text): the parts are joined until one ends with the count.
        stack, _, n = (pending + part).rpartition(" ")
        if not n.isdigit():
            pending += part + "\n"
            continue
        pending = ""
        frames = stack.split(";")
        if any("Thread._bootstrap" in f for f in frames):
            counts["thread: " + (_group(frames, THREAD_GROUPS) or "other")] += int(n)
        else:
            name = _group(frames, LOOP_GROUPS)
            if name is None and frames[-1].startswith("Runner.run"):
                name = "uvloop itself (C: callbacks, socket reads)"
            counts["loop: " + (name or "other")] += int(n)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=600.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()),
                        help="folder for the raw py-spy files")
    args = parser.parse_args()
    beside = Path(sys.executable).with_name("py-spy")  # a venv's, not on PATH
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    results = {}
    with fake_upstream_process() as upstream, tempfile.TemporaryDirectory() as tmp:
        with router_process(upstream, Path(tmp) / "router", source=REPO_ROOT) as target:
            assert target.pid is not None
            for stream in (False, True):  # warm-up: connections, caches, compiled kernels
                asyncio.run(open_loop(target, stream, args.rate, 3.0))
            for mode in ("plain", "stream"):
                raw = args.out / f"gateway_profile_{mode}.txt"
                proc = subprocess.Popen(  # noqa: S603 - py-spy, fixed arguments
                    [spy, "record", "--pid", str(target.pid), "--rate", "200", "--gil",
                     "--format", "raw", "--nonblocking", "-o", str(raw),
                     "--duration", str(int(args.seconds) + 1)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                time.sleep(0.5)  # py-spy attached
                before = cpu_seconds(target.pid)
                out = asyncio.run(open_loop(target, mode == "stream", args.rate,
                                            args.seconds))
                cpu_ms = (cpu_seconds(target.pid) - before) * 1e3 / out["requests"]
                if proc.wait() != 0:
                    raise SystemExit(proc.stderr.read().decode()[-2000:])
                results[mode] = (grouped(raw), cpu_ms, raw)
    names = sorted({g for counts, _, _ in results.values() for g in counts},
                   key=lambda g: (g.split(":")[0], -results["plain"][0][g]))
    totals = {mode: sum(counts.values()) for mode, (counts, _, _) in results.items()}
    print_table(f"Router GIL-held samples by group at {args.rate:g} req/s (py-spy --gil)",
                ["group", "plain", "stream"],
                [[g, *(f"{100 * results[m][0][g] / totals[m]:.1f}%" for m in results)]
                 for g in names],
                caption=", ".join(f"{m}: {totals[m]} samples, router CPU {cpu:.2f} ms per "
                                  f"call, raw {raw}" for m, (_, cpu, raw) in results.items()))


if __name__ == "__main__":
    main()
