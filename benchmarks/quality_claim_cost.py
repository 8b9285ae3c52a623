"""What the check against a gateway call's default quality adds to ``POST /v1/feedback``.

A tenant with ``success_quality`` set (or whose gateway posts ``default_quality``) has
each of its qualities claim the call's row in ``quality_defaults`` first
(service/quality_defaults.py): one more statement in its own transaction. This measures
that against a tenant without it, in the same run: the real app (embedded mode,
SQLite on disk, in-process ASGI client), the same number of decisions each, feedback
posted in alternating rounds (claims, then none, then claims...), the median time per
request of each round, and their ratio per pair of rounds.

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
            tenants = {claims: _tenant(client, claims) for claims in (True, False)}
            n = args.rounds * args.per_round
            ids = {c: _decisions(client, auth, n) for c, auth in tenants.items()}
            medians: dict[bool, list[float]] = {True: [], False: []}
            for k in range(args.rounds):
                order = (True, False) if k % 2 == 0 else (False, True)
                for c in order:
                    chunk = ids[c][k * args.per_round:(k + 1) * args.per_round]
                    medians[c].append(_round(client, tenants[c], chunk))
    ratios = [a / b for a, b in zip(medians[True], medians[False], strict=True)]
    payload = {"rounds": args.rounds, "per_round": args.per_round,
               "median_ms_with_claims": medians[True],
               "median_ms_without": medians[False], "ratio_per_pair": ratios,
               "ratio_median": statistics.median(ratios)}
    path = write_results(args.out_name, payload, results_dir=args.out_dir)
    print_table("POST /v1/feedback with a quality, median ms per request",
                ["", "with the claim", "without", "ratio"],
                [[f"pair {i + 1}", f"{a:.2f}", f"{b:.2f}", f"{r:.2f}"]
                 for i, (a, b, r) in enumerate(zip(medians[True], medians[False], ratios,
                                                   strict=True))]
                + [["median", f"{statistics.median(medians[True]):.2f}",
                    f"{statistics.median(medians[False]):.2f}",
                    f"{statistics.median(ratios):.2f}"]],
                caption=f"written to {path}")


if __name__ == "__main__":
    main()
