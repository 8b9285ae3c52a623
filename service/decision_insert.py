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
    """One multi-row INSERT per batch (SQLite), through ``exec_driver_sql`` with the
    values converted by the columns' own bind processors (exactly what
    ``insert(DecisionRow)`` would store).

    The statement's shape is a power of two rows, ``INSERT INTO decisions (...) SELECT
    column1, ... FROM (VALUES (..., 1), (..., 1), (NULL, ..., NULL)) WHERE column17 IS
    NOT NULL``: a batch of n rows fills the next power of two with rows of NULLs that
    the last column (1 for a row, NULL for a filler) leaves out. Every row count being a
    distinct SQL text, Python's sqlite3 would keep a prepared statement per batch size
    (~2.8 KB per row; tests/service/test_memory_bounds.py): the shapes stay
    log2(batch size) + 1. Before, a batch was written in parts of 2**k rows, one
    autocommit statement each: 3 statements for 7 rows, each a transaction that wrote
    the indexes' last pages to the WAL again and a trip of the writer through the GIL;
    in one statement a row costs ~30% less of the writer's CPU at half load's batch
    sizes (docs/results.md).

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
                      f"({', '.join(quote(name) for name, _ in self._columns)}) ")
        # VALUES names its columns column1, column2, ...; the last one marks a row.
        width = len(self._columns) + 1
        self._select = (f"SELECT {', '.join(f'column{i}' for i in range(1, width))} "  # noqa: S608
                        "FROM (VALUES ")
        self._where = f") WHERE column{width} IS NOT NULL"
        self._values = "(" + ", ".join([self._placeholder or "?"] * width) + ")"
        self._filler = (None,) * width
        # SQLite's default limit is 32766 variables per statement: the largest power of
        # two of rows under it (1024 rows of 17 values).
        self._max_rows = 1 << ((30_000 // width).bit_length() - 1)
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
            params.append(1)
        size = 1 << (len(chunk) - 1).bit_length()  # the power of two it fills
        params.extend(self._filler * (size - len(chunk)))
        sql = self._sql.get(size)
        if sql is None:
            sql = self._sql[size] = (self._head + self._select
                                     + ", ".join([self._values] * size) + self._where)
        return sql, tuple(params)
