"""The decision writer's INSERT (:mod:`service.writer`): on SQLite one multi-row
statement per batch built here; elsewhere SQLAlchemy's ``insert(DecisionRow)``."""

from __future__ import annotations

import logging
import operator
from typing import Any

from sqlalchemy import Connection, Engine, insert

from service.db.models import DecisionRow

__all__ = ["RowInserter"]

log = logging.getLogger("service.writer")


class RowInserter:
    """One multi-row ``INSERT INTO decisions (...) VALUES (...), (...)`` per batch
    (SQLite), through ``exec_driver_sql`` with the values converted by the columns' own bind
    processors (exactly what ``insert(DecisionRow)`` would store).

    ``conn.execute(insert(DecisionRow), rows)`` spent more time in SQLAlchemy's per-row
    parameter processing than SQLite spent inserting, all of it holding the GIL that the
    event loop needs; and SQLite's executemany releases and re-takes the GIL around every
    row. A row may carry ``predictions_json`` (the predictions already encoded, as the
    API encoded them for the response): then they are not encoded a second time.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Connection | None = None
        dialect = engine.dialect
        self._placeholder = {"qmark": "?", "format": "%s",
                             "pyformat": "%s"}.get(dialect.paramstyle)
        # SQLite only: PostgreSQL needs casts (JSON) that only the compiler renders, and
        # does the inserting in its own process anyway.
        self.fast = dialect.name == "sqlite" and self._placeholder is not None
        table = DecisionRow.__table__
        quote = dialect.identifier_preparer.quote
        self._columns = [(c.name, c.type.dialect_impl(dialect).bind_processor(dialect))
                         for c in table.columns]
        self._names = names = [name for name, _ in self._columns]
        self._values_of = operator.itemgetter(*names)  # a row's values in one C call
        self._processed = [(i, p) for i, (n, p) in enumerate(self._columns)  # but these 2:
                           if p is not None and n not in ("predictions", "created_at")]
        self._at = (names.index("predictions"), names.index("created_at"))
        # Built from the table's metadata only (no value is ever formatted into it).
        self._head = (f"INSERT INTO {quote(table.name)} "  # noqa: S608
                      f"({', '.join(quote(name) for name, _ in self._columns)}) VALUES ")
        self._values = "(" + ", ".join([self._placeholder or "?"] * len(self._columns)) + ")"
        # SQLite's default limit is 32766 variables per statement.
        self._max_rows = max(1, 30_000 // len(self._columns))
        self._sql: dict[int, str] = {}

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows`` (all or none); raises SQLAlchemy's exceptions."""
        if not self.fast:
            with self._engine.begin() as conn:
                conn.execute(insert(DecisionRow), [{k: v for k, v in row.items()
                                                 if k != "predictions_json"} for row in rows])
            return
        # SQLite: a connection of the writer's own in autocommit mode. One multi-row
        # INSERT is atomic by itself, so a batch is one statement: no BEGIN and COMMIT,
        # each of which releases the GIL and then waits up to the switch interval (5 ms)
        # to take it back from a busy event loop.
        if self._conn is None:
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        conn = self._conn
        try:
            chunks = range(0, len(rows), self._max_rows)
            if len(chunks) > 1:
                conn.exec_driver_sql("BEGIN")
            for start in chunks:
                conn.exec_driver_sql(*self._statement(rows[start:start + self._max_rows]))
            if len(chunks) > 1:
                conn.exec_driver_sql("COMMIT")
            conn.commit()  # ends SQLAlchemy's own bookkeeping; nothing is sent
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except Exception:  # already broken: the pool discards it
                log.debug("closing the writer's connection failed", exc_info=True)

    def _statement(self, chunk: list[dict[str, Any]]) -> tuple[str, tuple[Any, ...]]:
        params: list[Any] = []
        at_p, at_t = self._at
        encode_json, format_time = self._columns[at_p][1], self._columns[at_t][1]
        # The decisions of one decide batch share one datetime object (service.decider),
        # formatted once here (SQLite's DATETIME processor costs ~2 us a row).
        last: tuple[Any, Any] = (None, None)
        for row in chunk:
            try:
                values = list(self._values_of(row))
            except KeyError:  # a column a row does not name is NULL
                values = [row.get(name) for name in self._names]
            for i, process in self._processed:
                if values[i] is not None:
                    values[i] = process(values[i])
            encoded = row.get("predictions_json")
            if encoded is not None:
                values[at_p] = encoded.decode()
            elif values[at_p] is not None:
                values[at_p] = encode_json(values[at_p])
            if values[at_t] is not None:
                if values[at_t] is not last[0]:
                    last = (values[at_t], format_time(values[at_t]))
                values[at_t] = last[1]
            params.extend(values)
        sql = self._sql.get(len(chunk))
        if sql is None:
            sql = self._sql[len(chunk)] = self._head + ", ".join([self._values] * len(chunk))
        return sql, tuple(params)
