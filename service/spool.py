"""The feedback buffer: feedback accepted while the database is unreachable.

When storing a feedback fails because the database cannot be reached (an outage, a
failover), :class:`~service.ingest.FeedbackIngest` puts it here and answers 202
``buffered``; a background thread drains the buffer, oldest first, through the same
store-then-apply path as direct feedback once the database is back.

The buffer is a small SQLite file (WAL, ``synchronous=FULL``) next to the service's data:
one committed INSERT per accepted feedback, made before the 202 is sent. So ``kill -9``
during an outage loses nothing acknowledged; the next start drains the file. The file is
created on the first buffered feedback (a service that never saw an outage has none) and
removed at a clean stop once empty. Its name carries a digest of the database URL, so a
service pointed at another database never drains feedback meant for the first one.

Bounded: at most ``capacity`` rows; beyond that :meth:`FeedbackSpool.add` answers
``"full"`` and the API answers 503 + ``Retry-After`` (nothing accepted, the caller
retries). ``(tenant_id, decision_id, event_id)`` is unique in the buffer: a repeat while
buffered answers ``"duplicate"``, full or not. The tenant is part of the key so that feedback forged
by another tenant for the same decision cannot shadow the owner's (the drain drops the
forged one).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

__all__ = ["FeedbackSpool", "SpooledFeedback", "spool_path"]

log = logging.getLogger("service.spool")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback_buffer (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL,
    decision_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    quality REAL,
    cost_usd REAL,
    latency_ms REAL,
    received_at TEXT NOT NULL,
    UNIQUE (tenant_id, decision_id, event_id)
)
"""


@dataclass(frozen=True)
class SpooledFeedback:
    seq: int
    tenant_id: str
    decision_id: str
    event_id: str
    outcome: dict[str, float | None]
    received_at: str  # ISO 8601 with the UTC offset, as the API received it


def spool_path(directory: Path, database_url: str) -> Path:
    """``<directory>/feedback-buffer-<digest of the database URL>.sqlite3`` (the password
    is not part of the digest: a rotated password keeps the same buffer)."""
    try:
        ident = make_url(database_url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - any string names a buffer
        ident = database_url
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return directory.expanduser().absolute() / f"feedback-buffer-{digest}.sqlite3"


class FeedbackSpool:
    """A bounded, durable FIFO of feedback (thread-safe; one connection under a lock)."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._depth = 0
        if path.exists():  # left by a previous run (an outage, a kill): drain it
            self._open()

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit: every statement is its own committed transaction.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit is synced to disk before the 202 (survives power loss,
            # not only kill -9).
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(_SCHEMA)
            self._depth = int(conn.execute("SELECT count(*) FROM feedback_buffer")
                              .fetchone()[0])
            self._conn = conn
        return self._conn

    def depth(self) -> int:
        return self._depth

    def add(self, tenant_id: str, decision_id: str, event_id: str,
            outcome: dict[str, float | None], received_at: str) -> str:
        """``"buffered"`` (committed to disk), ``"duplicate"`` or ``"full"``."""
        with self._lock:
            conn = self._open()
            if self._depth >= self.capacity:
                # A repeat of what the buffer holds is answered as one, full or not: the
                # caller's retry loop must not be told to come back for feedback kept.
                held = conn.execute(
                    "SELECT 1 FROM feedback_buffer WHERE tenant_id = ? AND decision_id = ?"
                    " AND event_id = ?", (tenant_id, decision_id, event_id)).fetchone()
                return "full" if held is None else "duplicate"
            try:
                conn.execute(
                    "INSERT INTO feedback_buffer (tenant_id, decision_id, event_id, quality,"
                    " cost_usd, latency_ms, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (tenant_id, decision_id, event_id, outcome.get("quality"),
                     outcome.get("cost_usd"), outcome.get("latency_ms"), received_at))
            except sqlite3.IntegrityError:
                return "duplicate"
            self._depth += 1
            return "buffered"

    def head(self, limit: int = 100) -> list[SpooledFeedback]:
        """The oldest ``limit`` rows, oldest first."""
        with self._lock:
            if self._conn is None or self._depth == 0:
                return []
            rows = self._conn.execute(
                "SELECT seq, tenant_id, decision_id, event_id, quality, cost_usd, latency_ms,"
                " received_at FROM feedback_buffer ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [SpooledFeedback(seq, tenant, decision, event,
                                {"quality": q, "cost_usd": c, "latency_ms": lat}, received)
                for seq, tenant, decision, event, q, c, lat, received in rows]

    def remove_through(self, seq: int) -> None:
        """Forget every row up to ``seq`` (handled: stored, duplicate or dropped).

        A crash before this runs leaves them in the file; the next drain finds them
        stored already (``duplicate``), so they are never applied twice."""
        with self._lock:
            if self._conn is None:
                return
            self._conn.execute("DELETE FROM feedback_buffer WHERE seq <= ?", (seq,))
            self._depth = int(self._conn.execute("SELECT count(*) FROM feedback_buffer")
                              .fetchone()[0])

    def close(self) -> None:
        """Close the file; remove it when empty (it is created again when needed)."""
        with self._lock:
            if self._conn is None:
                return
            conn, self._conn = self._conn, None
            empty = self._depth == 0
            try:
                if empty:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            if empty:
                for suffix in ("", "-wal", "-shm"):
                    with suppress(FileNotFoundError):
                        Path(f"{self.path}{suffix}").unlink()
            else:
                log.warning("%d buffered feedback events left in %s; the next start "
                            "stores them", self._depth, self.path)
