"""Learner throughput and feedback-to-decision visibility (issue 5).

Against the real PostgreSQL and Kafka-protocol broker that ``ops/`` starts (the URLs
come from ``BANDIT_TEST_DATABASE_URL`` / ``BANDIT_TEST_KAFKA_BOOTSTRAP`` or the options):

1. Throughput. ``--events`` feedback events for stored decisions (d=64, 16 models,
   4 tenants) are produced ahead of time to a topic with ``--partitions`` partitions.
   First a bare kafka-python consumer (the learner's poll settings, ``json.loads`` of
   each value, nothing else) reads them, timed from its assignment to the end: the
   baseline. Then 1 (and, on a second topic, 2) learner processes
   (``python -m streams.learner``) consume the same records. The clock starts once
   every learner of the run holds its partitions (parsed from their logs: no rebalance
   inside the measured window) and stops when every partition's stored offset reached
   the end; events/s = events applied in that window (from the stored offsets) / its
   length. ``--rounds`` rounds of (1 learner, 2 learners); reported: medians, the
   1-learner rate over its own run's bare consumer, and the 2-learner rate over the
   1-learner rate of its round (the machine's load, which swings absolute rates,
   cancels in the ratios).
2. Visibility. One learner, caught up; probes are produced at ``--rate`` events/s for
   ``--seconds``; a :class:`service.distributed.StatisticsFollower` (what every API
   replica runs) rebuilds the decision snapshot (priors + recast + merge, every policy
   kind) on each NOTIFY. A probe is visible when the snapshot includes its partition
   offset; latency = visible time - send time. p50 / p99 reported.

Goals (issue 17): one learner >= 0.5 of the bare consumer's rate, two learners >= 1.7x
one; visibility p99 < 2 s.

Run::

    bash ops/postgres.sh start && bash ops/kafka.sh start
    python -m benchmarks.learner_throughput            # writes the JSON result
    python -m benchmarks.learner_throughput --events 100000 --rounds 3 --throughput-only
    python -m benchmarks.learner_throughput --quick    # small smoke run, writes nothing
    # the cost of one of the learner's writes, one learner alternating without / with it:
    python -m benchmarks.learner_throughput --feedback-rows-ratio 4 --events 100000
    python -m benchmarks.learner_throughput --reconcile-ratio 2 --events 100000
    # one learner of another commit against this tree's, alternating in the same run:
    mkdir /tmp/base && git archive COMMIT | tar -x -C /tmp/base
    python -m benchmarks.learner_throughput --events 100000 --against-tree /tmp/base 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer

from bandit import ArmPrior, LinearThompson, LinUCB, SelectiveThompson
from service.db.engine import upgrade
from streams.config import StreamsConfig
from streams.learner import DEFAULT_CONSUMER_SETTINGS, libpq_url
from streams.schemas import FeedbackEvent, encode_feedback
from streams.stats import candidate_settings, recast
from streams.topics import create_topic

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "learner_throughput.json"
DIM, MODELS, TENANTS = 64, 16, 4


def make_database(admin_url: str, root: Path = ROOT) -> str:
    """A fresh database with the schema of the source tree ``root`` (its migrations:
    a learner of another tree is measured on its own schema)."""
    name = f"bench_learner_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin_url.rpartition("/")
    url = f"{base}/{name}"
    if Path(root).resolve() == ROOT:
        upgrade(url)
    else:
        subprocess.run(  # noqa: S603 - our own interpreter, the other tree's migrations
            [sys.executable, "-c", "import sys; from service.db.engine import upgrade;"
             " upgrade(sys.argv[1])", url], cwd=root, check=True,
            env={**os.environ, "PYTHONPATH": str(root)})
    return url


def drop_database(admin_url: str, url: str) -> None:
    name = url.rpartition("/")[2]
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def store_decisions(url: str, n: int, rng: np.random.Generator,
                    spread_h: float = 0.0) -> tuple[list, list]:
    tenants = [str(uuid.uuid4()) for _ in range(TENANTS)]
    models = [f"model-{i:02d}" for i in range(MODELS)]
    ids = [str(uuid.uuid4()) for _ in range(n)]
    owner = rng.integers(TENANTS, size=n)
    chosen = rng.integers(MODELS, size=n)
    x = rng.normal(size=(n, DIM)).astype("<f8")
    now = datetime.now(UTC)
    # Decision times spread over the last spread_h hours in random order: the event
    # times forgetting runs on (every batch then moves its partition's reference time).
    created = [now - timedelta(hours=float(h)) for h in rng.uniform(0, spread_h, size=n)]
    with psycopg.connect(libpq_url(url)) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO tenants (id, name, key_hash, weight_quality, weight_cost,"
                " weight_latency, policy, scope, on_budget_exhausted, created_at,"
                " updated_at) VALUES (%s, %s, %s, 1, 0, 0, 'linucb', 'shared', 'cheapest',"
                " %s, %s)", [(t, t[:8], uuid.uuid4().hex * 2, now, now) for t in tenants])
            with cur.copy("COPY decisions (id, tenant_id, model, policy, policy_version,"
                          " scope, propensity, context, predictions, predicted_cost_usd,"
                          " charged_usd, over_budget, created_at) FROM STDIN") as copy:
                for i in range(n):
                    copy.write_row((ids[i], tenants[owner[i]], models[chosen[i]], "linucb",
                                    0, "shared", 1.0, x[i].tobytes(), "{}", 0.0, 0.0, False,
                                    created[i]))
        conn.commit()
    return ids, [tenants[o] for o in owner]


def produce(bootstrap: str, topic: str, ids: list[str], owners: list[str],
            rng: np.random.Generator) -> dict[int, int]:
    prod = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                         batch_size=256 * 1024, max_in_flight_requests_per_connection=5)
    q = rng.uniform(size=len(ids))
    futures = []
    for i, (d, t) in enumerate(zip(ids, owners, strict=True)):
        event = FeedbackEvent(f"e{i}", d, t, quality=float(q[i]), cost_usd=0.001,
                              latency_ms=500.0)
        futures.append(prod.send(topic, key=d.encode(), value=encode_feedback(event)))
    prod.flush()
    ends: dict[int, int] = {}
    for f in futures:
        m = f.get(timeout=60)
        ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)
    prod.close()
    return ends


def stored(url: str, group: str, topic: str) -> dict[int, int]:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute("SELECT partition, next_offset FROM learner_partitions"
                            " WHERE group_id = %s AND topic = %s", (group, topic)).fetchall()
    return {int(p): int(o) for p, o in rows}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux ``/proc``; 0 when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backend_pids(url: str) -> list[int]:
    """The PostgreSQL server processes of the benchmark's database (the learners'
    connections; the caller's own short-lived ones come and go)."""
    name = url.rpartition("/")[2]
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s"
                            " AND pid <> pg_backend_pid()", (name,)).fetchall()
    return [int(r[0]) for r in rows]


def bare_consumer(bootstrap: str, topic: str, ends: dict[int, int],
                  max_poll_records: int) -> dict:
    """The baseline: a bare kafka-python consumer with the learner's poll settings that
    only ``json.loads`` each value, timed from its assignment to the end of every
    partition (what a learner could do at most with the same client)."""
    assigned: list[float] = []

    class Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: list) -> None:
            pass

        def on_partitions_assigned(self, tps: list) -> None:
            if tps and not assigned:
                assigned.append(time.perf_counter())

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=f"bench-bare-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False, auto_offset_reset="earliest",
        max_poll_records=max_poll_records, **DEFAULT_CONSUMER_SETTINGS)
    consumer.subscribe([topic], listener=Listener())
    total, taken, checksum = sum(ends.values()), 0, 0.0
    cpu0 = time.process_time()
    try:
        deadline = time.monotonic() + 300
        while taken < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bare consumer took {taken} of {total} records")
            for batch in consumer.poll(timeout_ms=500).values():
                for record in batch:
                    checksum += json.loads(record.value)["quality"]
                taken += len(batch)
        elapsed = time.perf_counter() - assigned[0]
        cpu = time.process_time() - cpu0  # this process, all its threads
    finally:
        consumer.close(autocommit=False)
    return {"events": taken, "seconds": round(elapsed, 3),
            "events_per_s": round(taken / elapsed, 1), "quality_sum": round(checksum, 3),
            "cpu_us_per_event": round(1e6 * cpu / taken, 1)}


class LearnerProcess:
    def __init__(self, name: str, url: str, bootstrap: str, topic: str, group: str,
                 max_poll_records: int, log_dir: Path, *, reconcile_spend: bool = True,
                 half_life_hours: float | None = None, feedback_rows: bool = True,
                 root: Path = ROOT) -> None:
        self.log = log_dir / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(root), "OPENBLAS_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "streams.learner", "--bootstrap", bootstrap,
             "--database-url", url, "--feedback-topic", topic, "--group-id", group,
             "--dim", str(DIM), "--max-poll-records", str(max_poll_records),
             "--no-create-topics", "--client-id", name,
             *([] if reconcile_spend else ["--no-reconcile-spend"]),
             *([] if half_life_hours is None else ["--half-life-hours", str(half_life_hours)]),
             *([] if feedback_rows else ["--no-feedback-rows"])],
            env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, cwd=root)

    def assignments(self) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return re.findall(r"(assigned|revoked) \[([0-9, ]*)\]", text)

    def holds_partitions(self) -> bool:
        events = self.assignments()
        return bool(events) and events[-1][0] == "assigned" and events[-1][1] != ""

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def throughput(url: str, bootstrap: str, admin: KafkaAdminClient, n_learners: int,
               events: int, partitions: int, max_poll_records: int, rng: np.random.Generator,
               log_dir: Path, *, reconcile_spend: bool = True,
               half_life_hours: float | None = None, spread_h: float = 0.0,
               feedback_rows: bool = True, bare: bool = False, root: Path = ROOT) -> dict:
    topic = f"bench-feedback-{uuid.uuid4().hex[:8]}"
    group = f"bench-{uuid.uuid4().hex[:8]}"
    create_topic(admin, topic, partitions)
    ids, owners = store_decisions(url, events, rng, spread_h)
    t = time.perf_counter()
    ends = produce(bootstrap, topic, ids, owners, rng)
    produce_s = time.perf_counter() - t
    # The baseline reads the very same records just before the learners do.
    baseline = bare_consumer(bootstrap, topic, ends, max_poll_records) if bare else None
    learners = [LearnerProcess(f"learner-{i}", url, bootstrap, topic, group,
                               max_poll_records, log_dir, reconcile_spend=reconcile_spend,
                               half_life_hours=half_life_hours, feedback_rows=feedback_rows,
                               root=root)
                for i in range(n_learners)]
    try:
        deadline = time.monotonic() + 120
        while not all(lp.holds_partitions() for lp in learners):
            if time.monotonic() > deadline:
                raise RuntimeError("learners did not all get partitions")
            time.sleep(0.02)
        # Partitions held by everyone: the group is stable from here on.
        start_offsets = stored(url, group, topic)
        # CPU: the learner processes and their PostgreSQL connections (the writer's is
        # opened at the first write: it starts from zero).
        cpu0 = {lp.proc.pid: cpu_seconds(lp.proc.pid) for lp in learners}
        pg0 = {pid: cpu_seconds(pid) for pid in backend_pids(url)}
        t0 = time.perf_counter()
        while True:
            now = stored(url, group, topic)
            if all(now.get(p, -1) >= end for p, end in ends.items()):
                break
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        learner_cpu = sum(cpu_seconds(pid) - c for pid, c in cpu0.items())
        pg_cpu = sum(cpu_seconds(pid) - pg0.get(pid, 0.0)
                     for pid in set(pg0) | set(backend_pids(url)))
    finally:
        for lp in learners:
            lp.stop()
    applied = sum(end - max(start_offsets.get(p, 0), 0) for p, end in ends.items())
    with psycopg.connect(libpq_url(url)) as conn:
        applied_keys = conn.execute("SELECT count(*) FROM learner_applied WHERE group_id = %s",
                                    (group,)).fetchone()[0]
        feedback = conn.execute("SELECT count(*) FROM feedback").fetchone()[0]
    return {"learners": n_learners, "source": str(root), "reconcile_spend": reconcile_spend,
            "feedback_rows": feedback_rows,
            "half_life_hours": half_life_hours, "decision_spread_h": spread_h,
            "events_produced": events, "partitions": partitions,
            "events_measured": applied, "seconds": round(elapsed, 3),
            "events_per_s": round(applied / elapsed, 1),
            "events_per_s_per_learner": round(applied / elapsed / n_learners, 1),
            "produce_events_per_s": round(events / produce_s, 1),
            "applied_keys_total": int(applied_keys), "feedback_rows_total": int(feedback),
            "cpu_us_per_event": {"learners": round(1e6 * learner_cpu / applied, 1),
                                 "postgres": round(1e6 * pg_cpu / applied, 1)},
            "bare_consumer": baseline}


def visibility(url: str, bootstrap: str, admin: KafkaAdminClient, rate: float,
               seconds: float, partitions: int, rng: np.random.Generator,
               log_dir: Path) -> dict:
    from service.distributed import StatisticsFollower

    topic = f"bench-visibility-{uuid.uuid4().hex[:8]}"
    group = f"bench-vis-{uuid.uuid4().hex[:8]}"
    create_topic(admin, topic, partitions)
    n = int(rate * seconds)
    ids, owners = store_decisions(url, n, rng)
    config = StreamsConfig(bootstrap=bootstrap, feedback_topic=topic, group_id=group,
                           dim=DIM).validated()
    models = [f"model-{i:02d}" for i in range(MODELS)]
    bases = {}
    for cls in (LinUCB, LinearThompson, SelectiveThompson):
        base = cls(DIM, seed=0)
        for m in models:
            base.add_arm(m, ArmPrior(quality=0.5, cost_usd=0.001))
        bases[cls] = base
    seen: list[tuple[float, dict[int, int]]] = []
    rebuild_s: list[float] = []

    def on_change(totals: dict, offsets: dict[int, int]) -> None:
        # The decider's rebuild: priors + the recast sum, for every policy kind.
        t = time.perf_counter()
        total = totals.get("shared")
        if total is not None:
            for cls, base in bases.items():
                base.clone().merge(recast(total, cls, **candidate_settings(base.config)))
        rebuild_s.append(time.perf_counter() - t)
        seen.append((time.time(), dict(offsets)))

    follower = StatisticsFollower(url, config, on_change, poll_interval_s=1.0)
    follower.start()
    learner = LearnerProcess("vis-learner", url, bootstrap, topic, group, 5000, log_dir)
    prod = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1)
    sends: list[tuple[float, object]] = []
    try:
        deadline = time.monotonic() + 60
        while not learner.holds_partitions():
            if time.monotonic() > deadline:
                raise RuntimeError("learner did not get partitions")
            time.sleep(0.05)
        t_start = time.perf_counter()
        for i in range(n):
            target = t_start + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            event = FeedbackEvent(f"v{i}", ids[i], owners[i], quality=0.7, latency_ms=400.0)
            sends.append((time.time(), prod.send(topic, key=ids[i].encode(),
                                                 value=encode_feedback(event))))
        prod.flush()
        metas = [(t, f.get(timeout=30)) for t, f in sends]
        ends: dict[int, int] = {}
        for _, m in metas:
            ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)
        deadline = time.monotonic() + 60
        while not seen or any(seen[-1][1].get(p, -1) < e for p, e in ends.items()):
            if time.monotonic() > deadline:
                raise RuntimeError("the snapshot never caught up")
            time.sleep(0.05)
    finally:
        learner.stop()
        follower.stop()
        prod.close()
    latencies = []
    for sent, m in metas:
        for t_seen, offsets in seen:
            if offsets.get(m.partition, -1) > m.offset:
                latencies.append(t_seen - sent)
                break
    lat = np.array(latencies)
    return {"rate_per_s": rate, "seconds": seconds, "probes": len(latencies),
            "p50_s": round(float(np.percentile(lat, 50)), 4),
            "p99_s": round(float(np.percentile(lat, 99)), 4),
            "max_s": round(float(lat.max()), 4), "snapshot_refreshes": len(seen),
            "rebuild_ms_median": round(1e3 * float(np.median(rebuild_s)), 2)}


def paired_ratio(args: argparse.Namespace, admin: KafkaAdminClient,
                 rng: np.random.Generator, log_dir: Path, label: str, rounds: int,
                 result: str, without: dict, with_: dict) -> None:
    """One learner run with ``without`` then with ``with_`` (keyword arguments of
    :func:`throughput`: one of the learner's writes, or forgetting), alternating on the
    same machine: the cost, as a ratio of the medians (the machine's load, which swings
    absolute rates, cancels). The order flips every round (without, with, with,
    without, ...): a host that slows down over the run favours neither side."""
    rows = []
    sides = {"without": [], "with": []}
    for round_ in range(rounds):
        order = (("without", without), ("with", with_))
        for name, settings in order if round_ % 2 == 0 else order[::-1]:
            url = make_database(args.database_url, settings.get("root", ROOT))
            try:
                row = throughput(url, args.bootstrap, admin, 1, args.events, args.partitions,
                                 args.max_poll_records, rng, log_dir, **settings)
            finally:
                drop_database(args.database_url, url)
            rows.append({**row, "side": name})
            sides[name].append(row)
            bare = row["bare_consumer"]
            print(f"{label} {name:7}: {row['events_per_s']:>10,.0f} events/s "
                  f"(feedback rows {row['feedback_rows_total']:,}; CPU us/event: learner "
                  f"{row['cpu_us_per_event']['learners']}, its PostgreSQL "
                  f"{row['cpu_us_per_event']['postgres']})"
                  + ("" if bare is None else f"; bare consumer {bare['events_per_s']:,.0f} "
                     f"events/s ({bare['cpu_us_per_event']} us/event), learner/bare "
                     f"{row['events_per_s'] / bare['events_per_s']:.3f}"), flush=True)
    rate = {name: float(np.median([r["events_per_s"] for r in runs]))
            for name, runs in sides.items()}
    ratio = rate["with"] / rate["without"]
    pairs = [b["events_per_s"] / a["events_per_s"]
             for a, b in zip(sides["without"], sides["with"], strict=True)]
    print(f"median events/s: without {rate['without']:,.0f}, with {rate['with']:,.0f}: "
          f"ratio {ratio:.2f} (per pair {', '.join(f'{r:.2f}' for r in pairs)}; "
          f"load average {os.getloadavg()[0]:.1f})")
    to_bare = {name: [r["events_per_s"] / r["bare_consumer"]["events_per_s"]
                      for r in runs if r["bare_consumer"]] for name, runs in sides.items()}
    cpu = {name: {k: float(np.median([r["cpu_us_per_event"][k] for r in runs]))
                  for k in ("learners", "postgres")} for name, runs in sides.items()}
    if to_bare["with"]:
        print("median learner/bare consumer: " + ", ".join(
            f"{name} {np.median(v):.3f} ({', '.join(f'{x:.3f}' for x in v)})"
            for name, v in to_bare.items()))
    print("median CPU us/event (learner, its PostgreSQL): " + ", ".join(
        f"{name} {c['learners']:.1f}, {c['postgres']:.1f}" for name, c in cpu.items()))
    if not args.quick:
        out = RESULT.with_name(result)
        out.write_text(json.dumps({
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "flag": label,
            "load_average": os.getloadavg(), "events": args.events, "runs": rows,
            "median_events_per_s": rate, "ratio_with_to_without": round(ratio, 3),
            "pair_ratios": [round(r, 3) for r in pairs],
            "median_to_bare": {k: round(float(np.median(v)), 3) if v else None
                               for k, v in to_bare.items()},
            "to_bare": {k: [round(x, 3) for x in v] for k, v in to_bare.items()},
            "median_cpu_us_per_event": cpu}, indent=2) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("BANDIT_TEST_DATABASE_URL"))
    parser.add_argument("--bootstrap", default=os.environ.get("BANDIT_TEST_KAFKA_BOOTSTRAP"))
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--max-poll-records", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of (bare consumer + 1 learner, bare consumer + 2 "
                        "learners); medians are reported")
    parser.add_argument("--throughput-only", action="store_true",
                        help="measure throughput only; keep the stored visibility row")
    parser.add_argument("--quick", action="store_true", help="small run, no JSON written")
    parser.add_argument("--visibility-only", action="store_true",
                        help="measure visibility only; keep the stored throughput rows")
    parser.add_argument("--reconcile-ratio", type=int, default=0, metavar="ROUNDS",
                        help="only compare one learner with and without writing real costs "
                        "into decisions.charged_usd, ROUNDS alternating pairs; writes "
                        "learner_reconcile.json")
    parser.add_argument("--feedback-rows-ratio", type=int, default=0, metavar="ROUNDS",
                        help="only compare one learner with and without writing applied "
                        "events into the feedback table, ROUNDS alternating pairs; writes "
                        "learner_feedback_rows.json")
    parser.add_argument("--forgetting-ratio", type=int, default=0, metavar="ROUNDS",
                        help="only compare one learner with and without forgetting "
                        "(--half-life-hours 168, decisions spread over a week), ROUNDS "
                        "alternating pairs; writes learner_forgetting.json")
    parser.add_argument("--against-tree", nargs=2, metavar=("DIR", "ROUNDS"), default=None,
                        help="only compare one learner run from another source tree DIR "
                        "(e.g. an older commit: `git worktree add DIR COMMIT`) with one "
                        "of this tree, ROUNDS alternating pairs (without = DIR, with = "
                        "this tree), each after its own bare consumer; writes "
                        "learner_against.json (or --out)")
    parser.add_argument("--out", default=None, metavar="NAME",
                        help="file name in benchmarks/results/ for --against-tree")
    args = parser.parse_args(argv)
    if not args.database_url or not args.bootstrap:
        parser.error("set BANDIT_TEST_DATABASE_URL and BANDIT_TEST_KAFKA_BOOTSTRAP (see "
                     "ops/) or pass --database-url and --bootstrap")
    if args.quick:
        args.events, args.seconds, args.rounds = 20_000, 5.0, 1
    rng = np.random.default_rng(0)
    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap)
    log_dir = Path(tempfile.mkdtemp(prefix="learner-bench-"))
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                     "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                              "python": platform.python_version()},
                     "dim": DIM, "models": MODELS, "throughput": [], "visibility": None}
    # Decisions spread over a week, so that forgetting (half-life 168 h) has ages to weigh.
    week = {"spread_h": 168.0}
    other = [] if args.against_tree is None else [
        (f"this tree vs {args.against_tree[0]}", int(args.against_tree[1]),
         args.out or "learner_against.json",
         {"root": Path(args.against_tree[0]).resolve(), "bare": True}, {"bare": True})]
    for label, rounds, result, without, with_ in (*other,
            ("reconcile_spend", args.reconcile_ratio, "learner_reconcile.json",
             {"reconcile_spend": False}, {"reconcile_spend": True}),
            ("feedback_rows", args.feedback_rows_ratio, "learner_feedback_rows.json",
             {"feedback_rows": False}, {"feedback_rows": True}),
            ("half_life_hours=168", args.forgetting_ratio, "learner_forgetting.json",
             week, {**week, "half_life_hours": 168.0})):
        if rounds:
            paired_ratio(args, admin, rng, log_dir, label, rounds, result, without, with_)
            admin.close()
            return
    if args.visibility_only and RESULT.exists():
        results["throughput"] = json.loads(RESULT.read_text())["throughput"]
    for _ in range(0 if args.visibility_only else args.rounds):
        for n_learners in (1, 2):
            url = make_database(args.database_url)
            try:
                row = throughput(url, args.bootstrap, admin, n_learners, args.events,
                                 args.partitions, args.max_poll_records, rng, log_dir,
                                 bare=True)
            finally:
                drop_database(args.database_url, url)
            results["throughput"].append(row)
            print(f"{n_learners} learner(s): {row['events_per_s']:>10,.0f} events/s "
                  f"({row['events_per_s_per_learner']:,.0f} per learner; "
                  f"{row['events_measured']:,} events in {row['seconds']} s); bare consumer "
                  f"{row['bare_consumer']['events_per_s']:,.0f} events/s; CPU us/event: "
                  f"learner(s) {row['cpu_us_per_event']['learners']}, their PostgreSQL "
                  f"{row['cpu_us_per_event']['postgres']}, bare consumer "
                  f"{row['bare_consumer']['cpu_us_per_event']}", flush=True)
    if not args.visibility_only:
        results["summary"] = summarize(results["throughput"])
        print("median: " + ", ".join(f"{k} {v:,}" for k, v in results["summary"].items()
                                     if not isinstance(v, (list, dict))))
    if args.throughput_only:
        vis_stored = json.loads(RESULT.read_text()).get("visibility") if RESULT.exists() \
            else None
        results["visibility"] = vis_stored
        finish(args, admin, results)
        return
    url = make_database(args.database_url)
    try:
        vis = visibility(url, args.bootstrap, admin, args.rate, args.seconds,
                         args.partitions, rng, log_dir)
    finally:
        drop_database(args.database_url, url)
    results["visibility"] = vis
    print(f"visibility at {vis['rate_per_s']:.0f} events/s: p50 {vis['p50_s']} s, "
          f"p99 {vis['p99_s']} s, max {vis['max_s']} s "
          f"({vis['snapshot_refreshes']} refreshes, rebuild {vis['rebuild_ms_median']} ms)")
    finish(args, admin, results)


def summarize(rows: list[dict]) -> dict:
    """Medians over the rounds; each learner run is paired with the bare consumer that
    read the same records just before it, and each 2-learner run with the 1-learner
    run of its round (the machine's load, which swings absolute rates, cancels)."""
    one = [r for r in rows if r["learners"] == 1]
    two = [r for r in rows if r["learners"] == 2]
    to_bare = [r["events_per_s"] / r["bare_consumer"]["events_per_s"] for r in one]
    # CPU per event (the learner process and its PostgreSQL connections, against the
    # bare consumer's process; the broker's share is left out of both): what the rate
    # ratio would be with the CPU to itself, as on a quiet host. Less swung by the load
    # of the moment than rates, not free of it (cache and scheduling).
    cpu_to_bare = [r["bare_consumer"]["cpu_us_per_event"]
                   / (r["cpu_us_per_event"]["learners"] + r["cpu_us_per_event"]["postgres"])
                   for r in one]
    scale = [b["events_per_s"] / a["events_per_s"] for a, b in zip(one, two, strict=True)]
    # What two learners could reach over one if the host's CPUs were theirs alone: the
    # CPUs over one learner's CPU per event (its process and its PostgreSQL backend; the
    # broker's share left out, so an upper bound), over one learner's rate; at most 2.
    # Below 1.7 the scaling goal cannot be met on this host, whatever the code does.
    cpus = os.cpu_count() or 1
    ceiling = [min(2.0, cpus * 1e6 / (r["cpu_us_per_event"]["learners"]
                                       + r["cpu_us_per_event"]["postgres"])
                   / r["events_per_s"]) for r in one]
    return {
        "bare_events_per_s": round(float(np.median(
            [r["bare_consumer"]["events_per_s"] for r in rows])), 1),
        "one_learner_events_per_s": round(float(np.median([r["events_per_s"] for r in one])), 1),
        "two_learners_events_per_s": round(float(np.median([r["events_per_s"] for r in two])),
                                           1),
        "one_learner_to_bare": round(float(np.median(to_bare)), 3),
        "two_to_one_learner": round(float(np.median(scale)), 3),
        "one_learner_to_bare_per_round": [round(v, 3) for v in to_bare],
        "one_learner_cpu_to_bare": round(float(np.median(cpu_to_bare)), 3),
        "one_learner_cpu_us_per_event": {
            k: round(float(np.median([r["cpu_us_per_event"][k] for r in one])), 1)
            for k in ("learners", "postgres")},
        "bare_cpu_us_per_event": round(float(np.median(
            [r["bare_consumer"]["cpu_us_per_event"] for r in rows])), 1),
        "two_to_one_per_round": [round(v, 3) for v in scale],
        "two_to_one_cpu_ceiling": round(float(np.median(ceiling)), 3),
        "load_average": [round(v, 2) for v in os.getloadavg()]}


def finish(args: argparse.Namespace, admin: KafkaAdminClient, results: dict) -> None:
    admin.close()
    if not args.quick:
        RESULT.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
