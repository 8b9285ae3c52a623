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

:class:`DecisionSpool` does the same for decisions (issue 14): while the database is
away the decision writer (``service.writer``) moves the decisions it holds into a file of
the same kind, before they are answered, and replays them oldest first once the database
is back; feedback referring to them waits for them. :class:`LocalState` keeps what a start
needs (models, tenants, admin key digests, the newest checkpoint's policies) so that a
restart during an outage serves, degraded, from it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import sqlite3
import threading
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.engine import make_url

__all__ = ["FeedbackSpool", "SpooledFeedback", "DecisionSpool", "LocalState", "spool_path",
           "outage_serving", "outage_files", "buffer_dir"]

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


def buffer_dir(settings: Any) -> Path:
    """Where the outage files (buffers, spools, local copy) live: ``feedback_buffer_dir``,
    else ``data_dir`` (service settings)."""
    return (settings.feedback_buffer_dir if settings.feedback_buffer_dir is not None
            else settings.data_dir)


def spool_path(directory: Path, database_url: str, kind: str = "feedback-buffer") -> Path:
    """``<directory>/<kind>-<digest of the database URL>.sqlite3`` (the password is not
    part of the digest: a rotated password keeps the same buffer)."""
    try:
        ident = make_url(database_url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - any string names a buffer
        ident = database_url
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return directory.expanduser().absolute() / f"{kind}-{digest}.sqlite3"


class _SqliteFile:
    """One small SQLite file (WAL, ``synchronous=FULL``, autocommit), opened on first use
    or at once when a previous run left it, used under one lock; :meth:`close` removes it
    when :attr:`_table` is empty."""

    _schema = ""
    _table = ""

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
            # FULL: each commit is synced to disk before the answer (survives power loss,
            # not only kill -9).
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(self._schema)
            self._conn = conn
            self._count()
        return self._conn

    def _count(self) -> None:
        assert self._conn is not None
        self._depth = int(self._conn.execute(
            f"SELECT count(*) FROM {self._table}").fetchone()[0])  # noqa: S608 - a constant

    def depth(self) -> int:
        return self._depth

    def remove_through(self, seq: int) -> None:
        """Forget every row up to ``seq`` (handled).

        A crash before this runs leaves them in the file; the next run finds them
        stored already (a duplicate), so they are never applied twice."""
        with self._lock:
            if self._conn is None:
                return
            self._conn.execute(f"DELETE FROM {self._table} WHERE seq <= ?",  # noqa: S608
                               (seq,))
            self._count()

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
                log.warning("%d rows left in %s; the next start stores them", self._depth,
                            self.path)


class FeedbackSpool(_SqliteFile):
    """A bounded, durable FIFO of feedback (thread-safe; one connection under a lock)."""

    _schema = _SCHEMA
    _table = "feedback_buffer"

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


_DECISION_SCHEMA = """
CREATE TABLE IF NOT EXISTS decision_spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    charged_usd REAL NOT NULL,
    row BLOB NOT NULL
)
"""


def _encode_decision(row: dict[str, Any]) -> bytes:
    """A writer row (``service.routing``'s ``_reserve``) as JSON: bytes in base64, the
    time in ISO 8601, the predictions as encoded for the response."""
    out = {k: v for k, v in row.items()
           if k not in ("context", "created_at", "predictions", "predictions_json")}
    out["context"] = base64.b64encode(row["context"]).decode()
    out["created_at"] = row["created_at"].isoformat()
    predictions = row.get("predictions_json")
    out["predictions"] = (orjson.Fragment(predictions) if predictions is not None
                          else row["predictions"])
    return orjson.dumps(out)


def _decode_decision(data: bytes) -> dict[str, Any]:
    row = orjson.loads(data)
    row["context"] = base64.b64decode(row["context"])
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    row["predictions_json"] = orjson.dumps(row["predictions"])
    return row


class DecisionSpool(_SqliteFile):
    """A bounded, durable FIFO of decision rows, filled by the decision writer while the
    database is unreachable (thread-safe). Every :meth:`add_many` is one committed
    transaction: a decision is answered only after it returns."""

    _schema = _DECISION_SCHEMA
    _table = "decision_spool"

    def add_many(self, rows: list[dict[str, Any]]) -> int:
        """Append as many of ``rows`` as fit (in order); returns how many (0 when full).
        Raises :class:`sqlite3.Error` when the disk refuses (then none was added)."""
        with self._lock:
            conn = self._open()
            room = max(self.capacity - self._depth, 0)
            chunk = rows[:room]
            if not chunk:
                return 0
            conn.execute("BEGIN")
            try:
                conn.executemany(
                    "INSERT OR IGNORE INTO decision_spool (id, tenant_id, charged_usd, row)"
                    " VALUES (?, ?, ?, ?)",
                    [(r["id"], r["tenant_id"], float(r["charged_usd"]), _encode_decision(r))
                     for r in chunk])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._count()
            return len(chunk)

    def head(self, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """The oldest ``limit`` rows as ``(seq, writer row)``, oldest first."""
        with self._lock:
            if self._conn is None or self._depth == 0:
                return []
            rows = self._conn.execute("SELECT seq, row FROM decision_spool ORDER BY seq "
                                      "LIMIT ?", (limit,)).fetchall()
        return [(seq, _decode_decision(data)) for seq, data in rows]

    def ids(self) -> list[str]:
        with self._lock:
            if self._conn is None:
                return []
            return [i for (i,) in self._conn.execute("SELECT id FROM decision_spool")]

    def charges(self) -> dict[str, float]:
        """``charged_usd`` per tenant of the spooled decisions (not in the database yet)."""
        with self._lock:
            if self._conn is None or self._depth == 0:
                return {}
            return dict(self._conn.execute("SELECT tenant_id, sum(charged_usd) FROM "
                                           "decision_spool GROUP BY tenant_id"))


_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS local_state (key TEXT PRIMARY KEY, data BLOB NOT NULL)
"""


class LocalState(_SqliteFile):
    """What a start needs, kept on local disk so that a restart while the database is
    unreachable can serve (degraded): key -> bytes, written by
    :class:`~service.local.LocalCopy` at start and at each checkpoint (policies)
    and when the registry changes (models, tenants, admin key digests)."""

    _schema = _STATE_SCHEMA
    _table = "local_state"

    def put(self, items: dict[str, bytes], *, drop_prefix: str | None = None) -> None:
        """Write ``items`` in one transaction (replacing keys, and first removing every
        key starting with ``drop_prefix``)."""
        with self._lock:
            conn = self._open()
            conn.execute("BEGIN")
            try:
                if drop_prefix is not None:
                    conn.execute("DELETE FROM local_state WHERE substr(key, 1, ?) = ?",
                                 (len(drop_prefix), drop_prefix))
                conn.executemany("INSERT OR REPLACE INTO local_state (key, data) "
                                 "VALUES (?, ?)", list(items.items()))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            finally:
                # Closed after each write (a checkpoint's, once a minute): an open
                # connection would keep the policies' blobs in its page cache and its
                # cached statement (docs/reliability.md, load: "checkpoint blobs").
                self._conn = None
                conn.close()

    def get_all(self) -> dict[str, bytes]:
        with self._lock:
            if not self.path.exists():
                return {}
            conn = self._open()
            try:
                return {k: bytes(v) for k, v in conn.execute(
                    "SELECT key, data FROM local_state")}
            finally:
                self._conn = None
                conn.close()

    def close(self) -> None:
        """Nothing to do: the file is closed after each use and kept (it is the next
        start's fallback)."""


def outage_serving(decisions: DecisionSpool | None, feedback: FeedbackSpool | None) -> str:
    """What callers get while the database is unreachable (for ``/readyz``), given the
    decision writer's spool and the feedback buffer (None: none)."""
    served = ("decisions from memory, spooled to disk before the answer"
              if decisions is not None else "decisions from memory")
    if feedback is None:
        return f"{served}; feedback refused with 503 + Retry-After"
    return (f"{served}; feedback buffered ({feedback.depth()} of "
            f"{feedback.capacity}; 503 + Retry-After when full)")


def outage_files(decisions: DecisionSpool | None,
                 feedback: FeedbackSpool | None) -> dict[str, str]:
    """The outage files still being written to the database (for ``/readyz``)."""
    out: dict[str, str] = {}
    spooled = decisions.depth() if decisions is not None else 0
    if spooled:
        out["decision_spool"] = (f"{spooled} decisions spooled while the database was "
                                 "unreachable, being written")
    buffered = feedback.depth() if feedback is not None else 0
    if buffered:
        out["feedback_buffer"] = (f"{buffered} feedback events accepted while the "
                                  "database was unreachable, being stored")
    return out
