"""What the check against a gateway call's default quality adds to ``POST /v1/feedback``.

A tenant with ``success_quality`` set (or whose gateway posts ``default_quality``) has
each of its qualities claim the call's row in ``quality_defaults`` first
(service/quality_defaults.py): one more statement in its own transaction. This measures
that against a tenant without it, in the same run: the real app (embedded mode,
SQLite on disk, in-process ASGI client), the same number of decisions each, feedback
posted in alternating rounds (claims, then none, then claims...), the median time per
request of each round, and their ratio per pair of rounds. A third arm, the tenant
without defaults with its decision lookup turned off (what a replica did before it
looked up a recorded default its cached settings do not know of, issue 16), measures
that lookup: ``ratio_lookup_median``, without / without-lookup.

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.quality_claim_cost --rounds 6 --per-round 100
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from fastapi.testclient import TestClient

from benchmarks.common import add_output_options, print_table, write_results
from service.app import create_app
from service.config import Settings

ADMIN = {"Authorization": "Bearer bench-admin-key-0123456789abcdef"}


def _tenant(client: TestClient, claims: bool) -> dict[str, str]:
    r = client.post("/v1/admin/tenants", json={"name": f"t-{uuid.uuid4().hex[:6]}"},
                    headers=ADMIN)
    auth = {"Authorization": f"Bearer {r.json()['api_key']}"}
    if claims:
        r = client.put("/v1/tenants/me/gateway", json={"success_quality": 1.0}, headers=auth)
        assert r.status_code == 200, r.text
    return auth


def _decisions(client: TestClient, auth: dict[str, str], n: int) -> list[str]:
    out = []
    for i in range(n):
        r = client.post("/v1/decide", json={"query": {"text": f"question {i}"}}, headers=auth)
        assert r.status_code == 200, r.text
        out.append(r.json()["decision_id"])
    return out


def _round(client: TestClient, auth: dict[str, str], ids: list[str]) -> float:
    times = []
    for d in ids:
        started = time.perf_counter()
        r = client.post("/v1/feedback", json={"decision_id": d, "quality": 0.5},
                        headers=auth)
        times.append(time.perf_counter() - started)
        assert r.status_code == 202, r.text
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="pairs of rounds")
    parser.add_argument("--per-round", type=int, default=100, help="feedback per round")
    add_output_options(parser, "quality_claim_cost")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(database_url=f"sqlite:///{Path(folder) / 'bench.db'}",
                            admin_key=ADMIN["Authorization"].removeprefix("Bearer "),
                            featurizer="hashing", dim=64, checkpoint_interval_s=3600.0)
        with TestClient(create_app(settings)) as client:
            for i in range(3):
                client.post("/v1/admin/models", json={
                    "name": f"m{i}", "input_price_per_mtok": 1.0,
                    "output_price_per_mtok": 2.0}, headers=ADMIN)
            defaults = client.app.state.gateway.defaults  # type: ignore[attr-defined]
            tenants = {claims: _tenant(client, claims) for claims in (True, False)}
            tenants[None] = tenants[False]  # None: without, the lookup off
            n = args.rounds * args.per_round
            ids = {c: _decisions(client, auth, n) for c, auth in tenants.items()}
            medians: dict[bool | None, list[float]] = {True: [], False: [], None: []}
            for k in range(args.rounds):
                order = (True, False, None) if k % 2 == 0 else (None, False, True)
                for c in order:
                    if c is None:
                        defaults._recorded = lambda *_: False
                    chunk = ids[c][k * args.per_round:(k + 1) * args.per_round]
                    medians[c].append(_round(client, tenants[c], chunk))
                    vars(defaults).pop("_recorded", None)
    ratios = [a / b for a, b in zip(medians[True], medians[False], strict=True)]
    lookup = [a / b for a, b in zip(medians[False], medians[None], strict=True)]
    payload = {"rounds": args.rounds, "per_round": args.per_round,
               "median_ms_with_claims": medians[True],
               "median_ms_without": medians[False], "ratio_per_pair": ratios,
               "ratio_median": statistics.median(ratios),
               "median_ms_without_lookup": medians[None], "ratio_lookup_per_pair": lookup,
               "ratio_lookup_median": statistics.median(lookup)}
    path = write_results(args.out_name, payload, results_dir=args.out_dir)
    _table("POST /v1/feedback with a quality, median ms per request", "with the claim",
           "without", medians[True], medians[False], ratios, None)
    _table("the decision lookup of a tenant without defaults, median ms per request",
           "without", "lookup off", medians[False], medians[None], lookup,
           f"written to {path}")


def _table(title: str, first: str, second: str, a: list[float], b: list[float],
           ratios: list[float], caption: str | None) -> None:
    print_table(title, ["", first, second, "ratio"],
                [[f"pair {i + 1}", f"{x:.2f}", f"{y:.2f}", f"{r:.2f}"]
                 for i, (x, y, r) in enumerate(zip(a, b, ratios, strict=True))]
                + [["median", f"{statistics.median(a):.2f}", f"{statistics.median(b):.2f}",
                    f"{statistics.median(ratios):.2f}"]],
                caption=caption)


if __name__ == "__main__":
    main()
