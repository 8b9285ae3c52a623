"""Distributed mode's statistics follower: the learners' partition statistics in
PostgreSQL, loaded again whenever a learner bumps a partition's version (used by
:class:`service.distributed.FollowedStatistics` on every API replica)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg

from bandit import Policy
from streams.config import StreamsConfig
from streams.learner import NOTIFY_CHANNEL, libpq_url
from streams.stats import check_featurizer, load_statistics, sum_statistics

__all__ = ["StatisticsFollower"]

log = logging.getLogger("service.distributed")


class StatisticsFollower:
    """Loads the partitions' statistics when their version changes; calls ``on_change``.

    One thread, one PostgreSQL connection in autocommit mode: ``LISTEN`` on the
    learners' channel, and every ``poll_interval_s`` (or on a notification) one cheap
    query of the partitions' versions. Only partitions whose version moved are read
    again. Refreshes are at most every ``min_interval_s``: under load the learners write
    several times a second and a rebuild costs tens of milliseconds of CPU.

    With forgetting (``config.half_life_hours``) the published sums are decayed to
    ``clock()`` (the prior is not part of them), and they are published again every
    ``decay_interval_s`` even when no partition changed: an idle stream keeps forgetting.
    Statistics stored with another half-life are refused (:attr:`error`, and the
    refresh raises).
    """

    def __init__(self, database_url: str, config: StreamsConfig,
                 on_change: Callable[[dict[str, Policy], dict[int, int]], None], *,
                 poll_interval_s: float = 1.0, min_interval_s: float = 0.2,
                 decay_interval_s: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.url = libpq_url(database_url)
        self.config = config
        self.on_change = on_change
        self.poll_interval_s = poll_interval_s
        self.min_interval_s = min_interval_s
        self.versions: dict[int, int] = {}
        self.offsets: dict[int, int] = {}
        self._parts: dict[int, dict[str, Policy]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.decay_interval_s = decay_interval_s
        self.clock = clock
        self._published_at: float | None = None
        #: Why the statistics cannot be followed (a half-life mismatch), else None.
        self.error: str | None = None
        self.refreshes = 0

    def refresh(self, conn: psycopg.Connection | None = None) -> bool:
        """Read the changed partitions and publish a new sum; True if anything changed."""
        own = conn is None
        conn = conn or psycopg.connect(self.url, autocommit=True)
        try:
            rows = conn.execute(
                "SELECT partition, version, next_offset FROM learner_partitions"
                " WHERE group_id = %s AND topic = %s",
                (self.config.group_id, self.config.feedback_topic)).fetchall()
            changed = [int(p) for p, v, _ in rows if self.versions.get(int(p)) != int(v)]
            if not changed:
                return self._redecay()
            # Statistics and version read in one statement: a consistent pair.
            blobs = conn.execute(
                "SELECT p.partition, p.version, p.next_offset, s.key, s.data, s.featurizer"
                " FROM learner_partitions p LEFT JOIN partition_statistics s"
                " ON s.group_id = p.group_id AND s.topic = p.topic"
                " AND s.partition = p.partition"
                " WHERE p.group_id = %s AND p.topic = %s AND p.partition = ANY(%s)",
                (self.config.group_id, self.config.feedback_topic, changed)).fetchall()
        finally:
            if own:
                conn.close()
        fresh: dict[int, dict[str, Policy]] = {}
        versions, offsets = {}, {}
        for partition, version, offset, key, data, spec in blobs:
            fresh.setdefault(partition, {})
            versions[partition] = int(version)
            offsets[partition] = int(offset)
            if key is not None:
                where = f"partition {partition} ({key})"
                try:
                    fresh[partition][key] = load_statistics(
                        bytes(data), self.config.dim, self.config.half_life_hours, where,
                        self.config.tag_dims)
                    check_featurizer(spec, self.config.featurizer, where)
                except ValueError as exc:
                    # Versions not recorded: every refresh tries (and reports) again.
                    self.error = str(exc)
                    raise
        self.error = None
        self.versions.update(versions)
        self.offsets.update(offsets)
        self._parts.update(fresh)
        self._publish()
        return True

    def _redecay(self) -> bool:
        """Publish the same sums decayed to now, once per ``decay_interval_s``."""
        if (self.config.half_life_hours is None or self._published_at is None
                or self.clock() - self._published_at < self.decay_interval_s):
            return False
        self._publish()
        return True

    def _publish(self) -> None:
        now = self.clock()
        keys = {k for part in self._parts.values() for k in part}
        totals = {key: sum_statistics((p[key] for p in self._parts.values() if key in p),
                                      self.config.dim, self.config.half_life_hours, now,
                                      self.config.tag_dims)
                  for key in keys}
        self.on_change(totals, dict(self.offsets))
        self._published_at = now
        self.refreshes += 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="statistics-follower",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    while not self._stop.is_set():
                        started = time.monotonic()
                        self.refresh(conn)
                        # Wait for a notification (or the poll interval), then drain the
                        # rest: one refresh covers every write so far.
                        for _ in conn.notifies(timeout=self.poll_interval_s, stop_after=1):
                            pass
                        rest = self.min_interval_s - (time.monotonic() - started)
                        if rest > 0:
                            self._stop.wait(rest)
                        for _ in conn.notifies(timeout=0.0):
                            pass
            except Exception:
                # The snapshot in memory keeps serving; try the database again soon.
                log.exception("statistics refresh failed; retrying in 2 s")
                self._stop.wait(2.0)
