"""The learner's packed binary arrays, read back by PostgreSQL itself."""

from __future__ import annotations

from streams.learner import _connect, _Texts, libpq_url


def test_texts_round_trip_through_postgresql(database_url: str) -> None:
    # The ASCII layout (numpy) for ids of mixed lengths, the empty string included, and
    # the one-by-one layout for strings with characters of several bytes.
    ascii_ids = ["8c0b0d3e-5a1f-4a52-9d0a-3b5e2b0c9f11", "", "e1", "e12345", "x" * 300]
    other = ["é", "", "naïve-∑", "e7"]
    with _connect(libpq_url(database_url)) as conn:
        for values in (ascii_ids, other, []):
            got = conn.execute("SELECT %b::varchar[]", (_Texts(values),)).fetchone()
            assert got is not None
            assert got[0] == values
