"""Where the router's resident memory goes under load (a diagnostic for issue 7).

``benchmarks/load.py --probe FILE`` starts the server through :data:`PROBE_APP`: the
same app as ``bandit-router serve`` plus a daemon thread that appends one JSON line to
FILE every ``BANDIT_PROBE_INTERVAL_S`` seconds (default 10) with:

* ``rss_kb``, ``anon_kb``, ``file_kb``: ``/proc/self/smaps_rollup`` (anonymous memory is
  the heap: Python objects, malloc arenas, SQLite's page caches; file memory is mapped
  code and files);
* ``malloc``: glibc ``mallinfo2()``: ``in_use`` (bytes handed out by malloc), ``free``
  (bytes malloc holds but nobody uses: fragmentation / high-water marks), ``mmap``
  (large blocks mapped one by one), ``arena`` (the main heap's size);
* ``sqlite``: ``sqlite3_memory_used()`` and its high-water mark (page caches, statement
  caches of every connection);
* ``gc``: the collector's per-generation counts, and how many collections of each
  generation have run; ``objects``: how many objects the collector tracks (outside the
  frozen start-up set);
* ``types``: the 15 types whose count grew the most since the first sample (only with
  ``BANDIT_PROBE_TYPES=1``: walking every object holds the GIL for tens of ms);
* ``tracemalloc``: with ``BANDIT_PROBE_TRACEMALLOC=1`` (slows the server down ~2x), the
  15 source lines whose allocations grew the most since the first snapshot taken after
  ``BANDIT_PROBE_BASELINE_S`` seconds;
* ``BANDIT_PROBE_MALLOC_TRIM=1``: call ``malloc_trim(0)`` after each sample and record
  the RSS before and after (how much of the RSS is free memory glibc kept).

Summarise a probe file::

    python -m benchmarks.memory_probe FILE
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

PROBE_APP = '''
from benchmarks.memory_probe import start_probe
from service.app import create_app
from service.commands.serve import tune_process
from service.config import Settings
tune_process()
app = create_app(Settings(), freeze_gc=True)
start_probe(app)
'''


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _libsqlite() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
    except OSError:
        return None
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    lib.sqlite3_memory_highwater.restype = ctypes.c_int64
    lib.sqlite3_memory_highwater.argtypes = [ctypes.c_int]
    return lib


def smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in kB: Rss, Anonymous, and the file-backed rest."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return {"rss_kb": out.get("Rss", 0), "anon_kb": out.get("Anonymous", 0),
            "file_kb": out.get("Rss", 0) - out.get("Anonymous", 0)}


def mallinfo(libc: ctypes.CDLL | None) -> dict[str, int] | None:
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {"arena": info.arena, "mmap": info.hblkhd, "in_use": info.uordblks + info.hblkhd,
            "free": info.fordblks, "top_pad": info.keepcost}


def malloc_heaps(libc: ctypes.CDLL | None) -> list[list[int]] | None:
    """glibc's ``malloc_info()``, per heap (arena): [system bytes, free bytes in bins]
    (the main heap first, then one per thread arena)."""
    import re
    import tempfile

    if libc is None or not hasattr(libc, "malloc_info"):
        return None
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    with tempfile.NamedTemporaryFile(suffix=".xml") as tmp:
        fp = libc.fopen(tmp.name.encode(), b"w")
        if not fp:
            return None
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        text = Path(tmp.name).read_text()
    heaps = []
    for block in re.findall(r'<heap nr="\d+">(.*?)</heap>', text, re.S):
        system = re.search(r'<system type="current" size="(\d+)"', block)
        free = sum(int(v) for v in re.findall(
            r'<total type="(?:fast|rest)" count="\d+" size="(\d+)"', block))
        heaps.append([int(system.group(1)) if system else 0, free])
    return heaps


def pymalloc_stats() -> dict[str, int]:
    """Python's small-object allocator (its arenas are mapped directly, outside malloc):
    the numbers ``sys._debugmallocstats()`` prints to the C stderr, captured."""
    import tempfile

    keys = {"# arenas allocated current": "arenas",
            "# bytes in allocated blocks": "allocated",
            "# bytes in available blocks": "available",
            "unused pools": "unused_pools_bytes",
            "# bytes lost to pool headers": "pool_headers",
            "# bytes lost to quantization": "quantization"}
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read()
    out: dict[str, int] = {}
    for line in text.splitlines():
        for prefix, name in keys.items():
            if line.startswith(prefix) or (name == "unused_pools_bytes" and prefix in line
                                           and line.startswith("#")):
                value = line.rsplit("=", 1)[-1].strip().replace(",", "")
                if value.isdigit():
                    out[name] = int(value)
    if "arenas" in out:
        out["arenas_bytes"] = out["arenas"] * 1024 * 1024  # 1 MiB arenas (3.10+)
    return out


def _sqlite_status(lib: ctypes.CDLL, op: int) -> int:
    current, highwater = ctypes.c_int64(), ctypes.c_int64()
    lib.sqlite3_status64(op, ctypes.byref(current), ctypes.byref(highwater), 0)
    return current.value


def _service_state(app: object) -> dict[str, object]:
    """The writer's statement shapes and the engine's pool, read from the app."""
    routing = getattr(getattr(app, "state", None), "routing", None)
    if routing is None:
        return {}
    out: dict[str, object] = {"pool": routing.engine.pool.status()}
    inserter = getattr(getattr(routing, "writer", None), "_insert", None)
    sql = getattr(inserter, "_sql", None)
    if isinstance(sql, dict):
        sizes = sorted(sql)
        out["insert_shapes"] = len(sizes)
        out["insert_rows_max"] = sizes[-1] if sizes else 0
        out["insert_sql_kb"] = sum(len(v) for v in sql.values()) // 1024
    return out


def start_probe(app: object = None) -> threading.Thread | None:
    """Start the sampling thread when ``BANDIT_PROBE_FILE`` is set."""
    path = os.environ.get("BANDIT_PROBE_FILE")
    if not path:
        return None
    interval = float(os.environ.get("BANDIT_PROBE_INTERVAL_S", "10"))
    baseline_s = float(os.environ.get("BANDIT_PROBE_BASELINE_S", "30"))
    types_on = os.environ.get("BANDIT_PROBE_TYPES") == "1"
    trace = os.environ.get("BANDIT_PROBE_TRACEMALLOC") == "1"
    trim = os.environ.get("BANDIT_PROBE_MALLOC_TRIM") == "1"
    libc, sqlite = _libc(), _libsqlite()
    if trace:
        import tracemalloc

        tracemalloc.start(int(os.environ.get("BANDIT_PROBE_FRAMES", "1")))

    def run() -> None:
        start = time.monotonic()
        first_types: Counter[str] | None = None
        baseline = None
        with open(path, "a") as out:
            while True:
                time.sleep(interval)
                t = time.monotonic() - start
                sample: dict[str, object] = {"t": round(t, 1), **smaps_rollup()}
                sample["malloc"] = mallinfo(libc)
                sample["pymalloc"] = pymalloc_stats()
                sample["heaps"] = malloc_heaps(libc)
                if sqlite is not None:
                    sample["sqlite"] = {"used": sqlite.sqlite3_memory_used(),
                                        "highwater": sqlite.sqlite3_memory_highwater(0),
                                        "pagecache": _sqlite_status(sqlite, 2)}
                sample["service"] = _service_state(app)
                sample["gc"] = {"count": gc.get_count(),
                                "collections": [s["collections"] for s in gc.get_stats()],
                                "collected": [s["collected"] for s in gc.get_stats()],
                                "frozen": gc.get_freeze_count()}
                if types_on:
                    objects = gc.get_objects()
                    sample["objects"] = len(objects)
                    counts = Counter(type(o).__qualname__ for o in objects)
                    del objects
                    if first_types is None:
                        first_types = counts
                    else:
                        growth = counts.copy()
                        growth.subtract(first_types)
                        sample["types"] = growth.most_common(15)
                if trace:
                    import tracemalloc

                    snap = tracemalloc.take_snapshot().filter_traces(
                        [tracemalloc.Filter(False, tracemalloc.__file__)])
                    sample["traced_kb"] = tracemalloc.get_traced_memory()[0] // 1024
                    if baseline is None and t >= baseline_s:
                        baseline = snap
                    elif baseline is not None:
                        stats = snap.compare_to(baseline, "lineno")
                        sample["tracemalloc"] = [
                            (str(s.traceback[0]), s.size_diff // 1024, s.count_diff)
                            for s in stats[:15]]
                    del snap
                if trim and libc is not None:
                    before = sample["rss_kb"]
                    libc.malloc_trim(0)
                    sample["trim"] = {"before_kb": before,
                                      "after_kb": smaps_rollup()["rss_kb"]}
                out.write(json.dumps(sample) + "\n")
                out.flush()

    thread = threading.Thread(target=run, name="memory-probe", daemon=True)
    thread.start()
    return thread


def summarize(path: str) -> None:
    samples = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    print(f"{'t':>6} {'rss MB':>8} {'anon':>8} {'file':>7} {'m.in_use':>9} {'m.free':>8} "
          f"{'m.mmap':>7} {'py.arena':>8} {'py.used':>8} {'sqlite':>7} {'gc2 runs':>8} "
          f"{'gc count':>18} {'sq.pages':>8} shapes")
    for s in samples:
        mal = s.get("malloc") or {}
        sq = s.get("sqlite") or {}
        py = s.get("pymalloc") or {}
        print(f"{s['t']:>6} {s['rss_kb'] / 1024:8.1f} {s['anon_kb'] / 1024:8.1f} "
              f"{s['file_kb'] / 1024:7.1f} {mal.get('in_use', 0) / 2**20:9.1f} "
              f"{mal.get('free', 0) / 2**20:8.1f} {mal.get('mmap', 0) / 2**20:7.1f} "
              f"{py.get('arenas_bytes', 0) / 2**20:8.1f} {py.get('allocated', 0) / 2**20:8.1f} "
              f"{sq.get('used', 0) / 2**20:7.1f} {s['gc']['collections'][2]:>8} "
              f"{str(s['gc']['count']):>18} {sq.get('pagecache', 0) / 2**20:8.1f} "
              f"{s.get('service', {}).get('insert_shapes', '')}"
              + (f" trim {s['trim']['before_kb'] / 1024:.1f}->"
                 f"{s['trim']['after_kb'] / 1024:.1f}" if "trim" in s else "")
              + (f" objects {s['objects']}" if "objects" in s else "")
              + (f" heaps {len(s['heaps'])}: "
                 + " ".join(f"{a / 2**20:.0f}/{f / 2**20:.0f}" for a, f in s["heaps"])
                 if s.get("heaps") else ""))
    last = samples[-1]
    for key in ("types", "tracemalloc"):
        if key in last:
            print(f"\n{key} growth at t={last['t']}:")
            for row in last[key]:
                print("  ", row)


if __name__ == "__main__":
    summarize(sys.argv[1])
