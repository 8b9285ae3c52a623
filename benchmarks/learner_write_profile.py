"""Where a learner's PostgreSQL time goes, statement by statement (issue 17).

Runs the learner's own code for steps 2 and 5 (``Learner._fetch_decisions`` and
``Learner._write_partition``, no Kafka) against the real PostgreSQL that ``ops/`` starts:
``--decisions`` stored decisions (d=64, 16 models, as ``learner_throughput``), feedback
events for them in partition batches of ``--batch`` events (the size a 20,000-record
poll gives each of 6 partitions), rotating over ``--partitions`` partitions, so every
write also stores a partition's statistics as the learner does. The connections are
wrapped: each statement's backend CPU (``/proc/<pid>/schedstat``, nanoseconds) and wall
time are summed by statement, and reported per event. The decisions query runs once per
partition batch here (the learner runs one per poll, for every partition's events). With
``--explain`` the write
statement of one more batch is run under ``EXPLAIN (ANALYZE, BUFFERS, WAL)`` and rolled
back.

Run::

    python -m benchmarks.learner_write_profile --decisions 60000 --batch 3333
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from kafka import TopicPartition

from benchmarks.learner_throughput import (
    DIM,
    RESULT,
    drop_database,
    make_database,
    store_decisions,
)
from streams import learner as L
from streams.config import StreamsConfig
from streams.schemas import FeedbackEvent


def backend_ns(pid: int) -> int:
    """CPU time of a PostgreSQL backend so far, in nanoseconds (Linux schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def label(query: Any) -> str:
    text = " ".join(str(query).split())
    for key, name in (("INTO feedback", "feedback rows + spend"),
                      ("INTO learner_applied", "learner_applied keys"),
                      ("FOR UPDATE", "lock partition"),
                      ("INTO partition_statistics", "statistics upsert"),
                      ("UPDATE learner_partitions", "offset"), ("pg_notify", "notify"),
                      ("INTO learner_partitions", "load partitions (at start)"),
                      ("SELECT next_offset", "load partitions (at start)"),
                      ("FROM partition_statistics", "load partitions (at start)"),
                      ("FROM decisions WHERE id = ANY", "decisions join (loop)"),
                      ("UPDATE decisions SET guard", "guards")):
        if key in text:
            return name
    return text[:40]


class Probe:
    """A psycopg connection whose statements are timed (backend CPU and wall)."""

    def __init__(self, conn: psycopg.Connection, totals: dict[str, list[float]]) -> None:
        self._conn = conn
        self._pid = conn.info.backend_pid
        self._totals = totals

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        cpu, wall = backend_ns(self._pid), time.perf_counter()
        yield
        entry = self._totals[name]
        entry[0] += (backend_ns(self._pid) - cpu) / 1e9
        entry[1] += time.perf_counter() - wall

    def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:
        with self._timed(label(query)):
            return self._conn.execute(query, params, **kw)

    def cursor(self, *a: Any, **kw: Any) -> Any:
        probe, cur = self, self._conn.cursor(*a, **kw)

        class Cursor:
            def __getattr__(self, name: str) -> Any:
                return getattr(cur, name)

            def __enter__(self) -> Cursor:
                cur.__enter__()
                return self

            def __exit__(self, *exc: Any) -> None:
                cur.__exit__(*exc)

            def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:
                with probe._timed(label(query)):
                    return cur.execute(query, params, **kw)

            def executemany(self, query: Any, params: Any, **kw: Any) -> Any:
                with probe._timed(label(query)):
                    return cur.executemany(query, params, **kw)

        return Cursor()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        tx = self._conn.transaction()
        tx.__enter__()
        try:
            yield
        except BaseException as exc:
            tx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        with self._timed("commit"):
            tx.__exit__(None, None, None)


def run(args: argparse.Namespace) -> dict:
    url = make_database(args.database_url)
    rng = np.random.default_rng(0)
    learner: L.Learner | None = None
    try:
        ids, owners = store_decisions(url, args.decisions, rng)
        config = StreamsConfig(bootstrap="unused:9092", feedback_topic="profile",
                               group_id="profile", dim=DIM,
                               reconcile_spend=not args.no_spend)
        learner = L.Learner(config, url)
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        learner._conn = Probe(L._connect(learner.database_url), totals)
        learner._wconn = Probe(L._connect(learner.database_url), totals)
        wpid = learner._wconn._pid
        states = {p: learner._load(TopicPartition("profile", p))
                  for p in range(args.partitions)}
        quality = rng.uniform(size=len(ids))
        events, batches, write_cpu, write_wall = 0, 0, 0.0, 0.0
        for start in range(0, len(ids) - args.batch + 1, args.batch):
            state = states[batches % args.partitions]
            chunk = range(start, start + args.batch)
            now = time.time()
            decisions = learner._fetch_decisions({ids[i] for i in chunk}, now)
            items = [L._Apply(L._Pending(i, None, b"", FeedbackEvent(
                f"e{i}", ids[i], owners[i], quality=float(quality[i]), cost_usd=0.001,
                latency_ms=500.0), now + 30, now), decisions, decisions.index[ids[i]])
                for i in chunk]
            write = L._Write(state, items, start + args.batch,
                             learner._blobs(state.stats, items))
            cpu, wall = backend_ns(wpid), time.perf_counter()
            learner._write_partition(write)
            write_cpu += (backend_ns(wpid) - cpu) / 1e9
            write_wall += time.perf_counter() - wall
            events += len(items)
            batches += 1
        table = {k: {"cpu_us_per_event": round(1e6 * v[0] / events, 2),
                     "wall_us_per_event": round(1e6 * v[1] / events, 2)}
                 for k, v in sorted(totals.items(), key=lambda kv: -kv[1][0])}
        explain = explain_write(learner, ids, owners, args) if args.explain else None
        size = learner._wconn.execute(
            "SELECT pg_total_relation_size('partition_statistics'),"
            " pg_total_relation_size('feedback'), (SELECT string_agg(DISTINCT"
            " pg_column_compression(data), ',') FROM partition_statistics)").fetchone()
        return {"events": events, "batches": batches, "batch": args.batch,
                "reconcile_spend": not args.no_spend,
                "write_cpu_us_per_event": round(1e6 * write_cpu / events, 2),
                "write_wall_us_per_event": round(1e6 * write_wall / events, 2),
                "statements": table, "explain": explain,
                "relation_bytes": {"partition_statistics": size[0], "feedback": size[1]},
                "statistics_compression": size[2]}
    finally:
        for conn in (() if learner is None else (learner._conn, learner._wconn)):
            if conn is not None:
                conn.close()
        drop_database(args.database_url, url)


def explain_write(learner: L.Learner, ids: list[str], owners: list[str],
                  args: argparse.Namespace) -> list[str]:
    """The write statement of one batch of fresh events (decisions with no feedback
    yet), under EXPLAIN ANALYZE, rolled back."""
    conn = learner._wconn._conn
    fresh = [f"fresh-{i}" for i in range(args.batch)]  # event ids never written
    now = time.time()
    take = range(args.batch)
    decisions = learner._fetch_decisions({ids[i] for i in take}, now)
    items = [L._Apply(L._Pending(i, None, b"", FeedbackEvent(
        fresh[i], ids[i], owners[i], quality=0.5, cost_usd=0.002, latency_ms=500.0),
        now + 30, now), decisions, decisions.index[ids[i]]) for i in take]
    statement = L._FRESH_ROWS
    ctes = statement.ctes + ("" if args.no_spend else ", " + statement.spend)
    params = {**L._event_arrays("profile", items), "k": len(items)}
    # Constant fragments of streams.learner; every value is a parameter.
    sql = (f"EXPLAIN (ANALYZE, BUFFERS, WAL, TIMING ON) WITH {ctes}, fresh (d, e) AS"  # noqa: S608
           f" ({statement.select}) SELECT count(*) FROM fresh")
    try:
        with conn.transaction():
            # The arrays' literals fill whole lines: cut them.
            lines = [r[0] if len(r[0]) < 300 else r[0][:300] + "..."
                     for r in conn.execute(sql, params).fetchall()]
            raise _Rollback
    except _Rollback:
        pass
    return lines


class _Rollback(Exception):
    pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("BANDIT_TEST_DATABASE_URL"))
    parser.add_argument("--decisions", type=int, default=60_000)
    parser.add_argument("--batch", type=int, default=3333)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--no-spend", action="store_true",
                        help="the learner without --reconcile-spend")
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--out", default=None, metavar="NAME",
                        help="file name in benchmarks/results/ (default: print only)")
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("set BANDIT_TEST_DATABASE_URL (see ops/) or pass --database-url")
    result = run(args)
    print(f"{result['events']:,} events in {result['batches']} partition writes of "
          f"{args.batch}: write {result['write_cpu_us_per_event']} us/event backend CPU, "
          f"{result['write_wall_us_per_event']} us wall; statistics compressed with "
          f"{result['statistics_compression']}")
    print(f"{'statement':28} {'CPU us/event':>13} {'wall us/event':>14}")
    for name, row in result["statements"].items():
        print(f"{name:28} {row['cpu_us_per_event']:>13} {row['wall_us_per_event']:>14}")
    for line in result["explain"] or []:
        print(line)
    if args.out:
        out = RESULT.with_name(args.out)
        out.write_text(json.dumps({"date": datetime.now(UTC).isoformat(timespec="seconds"),
                                   "load_average": os.getloadavg(), **result}, indent=2)
                       + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
