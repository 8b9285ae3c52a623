"""What the learner hears of forwarded calls when the tenant sets no ``success_quality``
(most gateway users): the failures and the successes alike, or neither.

The stream below is generated, not sampled: model ``good`` answers better (the client
rates it 0.9, ``fair`` 0.6) but fails every 4th call; the client rates one success in
three, as real users rate some answers and not others. Were each failure a quality 0
while the unrated successes say nothing, ``good`` would be heard at (12 x 0 + 12 x 0.9)
/ 24 = 0.45 against ``fair``'s 0.6, and lose: before the fix the learner predicted 0.45
against 0.59 and routed 0 of the 20 requests to ``good``; after it, 0.87 against 0.59
and 20 of 20 (SQLite and PostgreSQL alike). Its expected quality counting a failure as 0 is
0.675, still above 0.6: the failures belong to availability, the ratings to quality.
"""

from __future__ import annotations

from tests.fakes.openai_upstream import FakeModel
from tests.gateway.conftest import Router

MESSAGES = [{"role": "user", "content": "Explain the trade-off in two sentences."}]
RATING = {"good": 0.9, "fair": 0.6}
#: Calls to each model in the stream: enough ratings (12 and 16) that neither is a cold
#: arm (fewer than 10 qualities), which the policy would explore on a share of its own.
CALLS = 48


def _ask(router: Router, auth: dict, model: str, failing: set[str]) -> tuple[str, str, int]:
    r = router.http.post("/v1/chat/completions", headers=auth,
                         json={"model": model, "messages": MESSAGES})
    name = r.headers["x-router-model"]
    assert r.status_code == (502 if name in failing else 200), r.text
    return name, r.headers["x-router-decision-id"], r.status_code


def test_failures_without_success_quality_do_not_bias_which_model_is_chosen(
        router: Router) -> None:
    names = {label: router.add_model(answer=FakeModel(f"{label} answers."))
             for label in RATING}
    label_of = {name: label for label, name in names.items()}
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    assert router.http.put("/v1/tenants/me/gateway", headers=auth, json={
        "aliases": {"pair": {"candidates": list(names.values())}}}).status_code == 200
    calls = {label: 0 for label in RATING}
    successes = dict(calls)

    def arm() -> set[str]:
        # good's every 4th call fails (a 503). Which model a routed request calls is
        # known only after its decision: the failure waits for good's next call.
        fails = (calls["good"] + 1) % 4 == 0
        router.upstream.set(names["good"], status=503 if fails else None,
                            fail_times=1 if fails else None)
        return {names["good"]} if fails else set()

    # 1. The stream: each model named in turn (the same calls whatever the policy).
    heard = []  # the quality of the router's own outcome of each call
    for i in range(2 * CALLS):
        label = "good" if i % 2 == 0 else "fair"
        _, decision_id, status = _ask(router, auth, names[label], arm())
        calls[label] += 1
        expected_rows = 1
        if status == 200:
            successes[label] += 1
            if successes[label] % 3 == 0:
                r = router.http.post("/v1/feedback", headers=auth, json={
                    "decision_id": decision_id, "quality": RATING[label]})
                assert r.status_code == 202, r.text
                expected_rows = 2
        fb = router.decision(key, decision_id, feedback=expected_rows)["feedback"]
        gateway = next(f for f in fb if f["event_id"] == "gateway")
        heard.append(gateway["quality"])
        assert gateway["latency_ms"] is not None
    assert calls == {"good": CALLS, "fair": CALLS}
    assert successes == {"good": CALLS * 3 // 4, "fair": CALLS}

    # 2. Routed by the learner: good is the better model, and it is chosen.
    chosen, beliefs = [], []
    for _ in range(20):
        name, decision_id, _ = _ask(router, auth, "auto:pair", arm())
        chosen.append(label_of[name])
        calls[chosen[-1]] += 1
        decision = router.decision(key, decision_id)
        beliefs.append({label_of[n]: p["quality"] for n, p in decision["predictions"].items()})
    assert chosen.count("good") >= 14, (chosen, beliefs[0])
    assert all(b["good"] > b["fair"] for b in beliefs), beliefs
    # Success or failure, the router reported no quality of its own.
    assert heard == [None] * 2 * CALLS, heard


def test_success_quality_reports_failures_as_zero_too(router: Router) -> None:
    name = router.add_model(answer=FakeModel("answered"))
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    assert router.http.put("/v1/tenants/me/gateway", headers=auth, json={
        "success_quality": 0.7, "quality_wait_seconds": 0}).status_code == 200
    heard = []
    for status in (None, 503):
        router.upstream.set(name, status=status)
        r = router.http.post("/v1/chat/completions", headers=auth,
                             json={"model": name, "messages": MESSAGES})
        assert r.status_code == (200 if status is None else 502), r.text
        # A success's quality is its own event once the wait (0 here) is over
        # (tests/gateway/test_quality_default.py); a failure's is in its outcome.
        fb = router.decision(key, r.headers["x-router-decision-id"],
                             feedback=2 if status is None else 1)["feedback"]
        heard.append([f["quality"] for f in fb if f["quality"] is not None])
    assert heard == [[0.7], [0.0]]  # both sides reported: no one-sided bias
