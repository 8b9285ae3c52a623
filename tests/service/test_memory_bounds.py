"""Memory that stays bounded however long the service runs (issue 7: flat RSS under load).

The decision writer writes each batch as one multi-row INSERT on SQLite; every row count
is a distinct SQL text, and Python's sqlite3 keeps up to 128 prepared statements per
connection (about 2.8 KB per row of a ``decisions`` INSERT). Before the writer split
batches into parts of 2**k rows, batches of every size up to 200 left ~50 MB of prepared
statements behind, and under load the RSS grew with every new batch size
(docs/reliability.md, load). SQLite only: on PostgreSQL the writer does not build these
statements.

The periodic checkpoint allocates and frees ~30 MB in a worker thread; glibc kept it
resident in that thread's arena (a different one each time) until the app called
``malloc_trim`` after each checkpoint (service/memory.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db import models as m
from service.db.engine import make_engine, upgrade
from service.writer import DecisionWriter

MAX_BATCH = 200


def _sqlite_library() -> ctypes.CDLL:
    """The SQLite library Python's sqlite3 module uses (the same loaded copy)."""
    import _sqlite3

    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    if "libsqlite3" not in maps:
        pytest.skip(f"sqlite3 is not a shared libsqlite3 here ({_sqlite3.__file__})")
    lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return lib


def _row(tenant_id: str) -> dict[str, object]:
    now = datetime.now(UTC)
    return {"id": str(uuid.uuid4()), "tenant_id": tenant_id, "model": "model-a",
            "policy": "linucb", "policy_version": 1, "scope": "shared", "propensity": 0.5,
            "context": bytes(64 * 8), "predictions": {"model-a": {"quality": 0.5}},
            "predictions_json": b'{"model-a":{"quality":0.5}}', "predicted_cost_usd": 0.001,
            "charged_usd": 0.001, "over_budget": False, "created_at": now,
            "tags": None, "guard": None}


def test_writer_statement_memory_bounded_for_every_batch_size(tmp_path):
    url = f"sqlite:///{tmp_path / 'router.db'}"
    upgrade(url)
    engine = make_engine(url)
    tenant_id = str(uuid.uuid4())
    with Session(engine) as session, session.begin():
        session.add(m.Tenant(id=tenant_id, name="t", key_hash="0" * 64, policy="linucb"))
    sqlite = _sqlite_library()
    # A long flush interval: the rows of each round are all queued before the writer,
    # woken by flush(), takes them as one batch of exactly that size.
    writer = DecisionWriter(engine, queue_size=10_000, batch_size=500, flush_interval_s=5.0)
    writer.start()
    try:
        assert writer.submit(_row(tenant_id)) and writer.flush(30)  # warm the connection
        before = sqlite.sqlite3_memory_used()
        written = 1
        for n in range(1, MAX_BATCH + 1):
            for _ in range(n):
                assert writer.submit(_row(tenant_id))
            assert writer.flush(30)
            written += n
        grown_mb = (sqlite.sqlite3_memory_used() - before) / 2**20
    finally:
        writer.stop()
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(m.DecisionRow)) == written
    engine.dispose()
    # Unbounded shapes: the 128 most recent (73..200 rows), ~50 MB. Powers of two: 8
    # shapes (1..128 rows) plus the connection's page cache, a few MB.
    assert grown_mb < 12, f"SQLite holds {grown_mb:.1f} MB more after batches of 1..{MAX_BATCH}"
    shapes = sorted(writer._insert._sql)
    assert len(shapes) <= 9, f"{len(shapes)} distinct INSERT shapes: {shapes}"
    assert all(n & (n - 1) == 0 for n in shapes), shapes


def _anon_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise AssertionError("no Anonymous line in smaps_rollup")


def test_release_free_memory_returns_a_threads_freed_heap():
    """What a checkpoint leaves behind: ~32 MB malloc'ed and freed by a worker thread
    stays resident in that thread's arena (glibc trims only the top of a heap, and one
    live block pins it) until ``malloc_trim``."""
    if not Path("/proc/self/smaps_rollup").exists():
        pytest.skip("needs Linux /proc")
    from service.memory import release_free_memory

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "malloc_trim"):
        pytest.skip("not glibc")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    kept: list[int] = []

    def churn() -> None:
        blocks = []
        for _ in range(2048):  # 16 KB blocks: below the mmap threshold, from the heap
            p = libc.malloc(16 * 1024)
            libc.memset(p, 1, 16 * 1024)  # touched: resident
            blocks.append(p)
        kept.append(blocks.pop())  # the last block stays alive and pins the heap's top
        for p in blocks:
            libc.free(p)

    thread = threading.Thread(target=churn)
    thread.start()
    thread.join()
    held = _anon_kb()
    assert release_free_memory()
    released_mb = (held - _anon_kb()) / 1024
    libc.free(kept[0])
    assert released_mb > 16, f"malloc_trim gave back only {released_mb:.1f} MB of ~32 MB"


def test_checkpoint_job_releases_memory_only_after_writing(monkeypatch):
    import service.memory as memory

    calls: list[str] = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: calls.append("trim"))
    results = iter([True, False])
    job = memory.then_release_free_memory(lambda: calls.append("checkpoint") or next(results))
    assert job() is True and job() is False
    assert calls == ["checkpoint", "trim", "checkpoint"]


def test_checkpoint_leaves_no_policy_blobs_in_sqlite(tmp_path):
    """sqlite3 keeps a connection's prepared INSERT with its last parameters bound: a
    checkpoint's policy blobs (d=64, 16 models: ~4 MB per policy) stayed in memory for as
    long as the pooled connection that wrote them lived. The checkpoint closes its
    connection instead."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.service.conftest import add_model, make_settings

    sqlite = _sqlite_library()
    settings = make_settings(f"sqlite:///{tmp_path / 'router.db'}", dim=64)
    with TestClient(create_app(settings)) as client:
        for i in range(16):
            add_model(client, f"model-{i:02d}")
        routing = client.app.state.routing
        before = sqlite.sqlite3_memory_used()
        for _ in range(3):
            assert routing.checkpoint(force=True)
        grown_mb = (sqlite.sqlite3_memory_used() - before) / 2**20
    # Blobs still bound: ~8 MB (two policies) per connection that wrote a checkpoint.
    assert grown_mb < 3, f"SQLite holds {grown_mb:.1f} MB more after 3 checkpoints"
