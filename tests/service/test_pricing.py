"""Per-request price estimates on decide, and feedback that reports token counts
(issue 13), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from tests.service.conftest import ADMIN, add_model, assert_problem, create_tenant, decide


def _price(p_in: float, p_out: float, t_in: int, t_out: int) -> float:
    return (p_in * t_in + p_out * t_out) / 1e6


def test_decide_text_prices_each_candidate_from_registry(client):
    headers = create_tenant(client, "pricing-text")
    cheap = add_model(client, input_price=0.5, output_price=1.5)
    dear = add_model(client, input_price=10.0, output_price=30.0)
    r = client.post("/v1/decide", json={"query": {"text": "x" * 400},
                                        "candidates": [cheap, dear]}, headers=headers)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    # 400 characters -> 100 prompt tokens; prior_output_tokens (300) expected out.
    assert preds[cheap]["price_usd"] == pytest.approx(_price(0.5, 1.5, 100, 300), rel=1e-9)
    assert preds[dear]["price_usd"] == pytest.approx(_price(10.0, 30.0, 100, 300), rel=1e-9)
    # No cost feedback yet: the predicted cost is the declared price.
    assert preds[dear]["cost_usd"] == pytest.approx(preds[dear]["price_usd"], rel=1e-9)


def test_decide_embedding_prices_with_prior_input_tokens(client):
    headers = create_tenant(client, "pricing-embedding")
    model = add_model(client, input_price=2.0, output_price=4.0)
    r = decide(client, headers, candidates=[model])
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][model]["price_usd"] == pytest.approx(
        _price(2.0, 4.0, 500, 300), rel=1e-9)


def test_price_change_applies_to_the_very_next_decide(client):
    """The decider reads each candidate list's prices once per registry change: a new
    price (or a deleted model) is what the very next decide sees."""
    headers = create_tenant(client, "pricing-change")
    model = add_model(client, input_price=2.0, output_price=4.0)
    other = add_model(client, input_price=1.0, output_price=1.0)
    for _ in range(2):  # the prices are cached by now
        preds = decide(client, headers, candidates=[model, other]).json()["predictions"]
        assert preds[model]["price_usd"] == pytest.approx(_price(2.0, 4.0, 500, 300), rel=1e-9)
    for p_in, p_out in ((7.0, 4.0), (7.0, 9.0), (0.0, 0.0)):
        r = client.patch(f"/v1/admin/models/{model}", headers=ADMIN,
                         json={"input_price_per_mtok": p_in, "output_price_per_mtok": p_out})
        assert r.status_code == 200, r.text
        preds = decide(client, headers, candidates=[model, other]).json()["predictions"]
        assert preds[model]["price_usd"] == pytest.approx(_price(p_in, p_out, 500, 300),
                                                          rel=1e-9, abs=1e-15)
        assert preds[other]["price_usd"] == pytest.approx(_price(1.0, 1.0, 500, 300), rel=1e-9)
    assert client.delete(f"/v1/admin/models/{other}", headers=ADMIN).status_code == 204
    assert_problem(decide(client, headers, candidates=[model, other]), 422, "candidates",
                   "unknown model")


def test_decide_priced_past_the_cost_bound_names_the_model(client):
    """A prompt long enough to price a dear model past MAX_COST_USD (10,000 USD) is
    refused with the candidate named, whether or not its prices are cached."""
    headers = create_tenant(client, "pricing-bound")
    dear = add_model(client, input_price=1e5, output_price=1.0)
    cheap = add_model(client, input_price=1.0, output_price=1.0)
    ok = client.post("/v1/decide", json={"query": {"text": "x" * 400},
                                         "candidates": [cheap, dear]}, headers=headers)
    assert ok.status_code == 200, ok.text
    r = client.post("/v1/decide", json={"query": {"text": "x" * 400_008},
                                        "candidates": [cheap, dear]}, headers=headers)
    assert_problem(r, 422, f"cost_estimate.{dear}", "10000")


def _feedback_then_stored(client, tenant: str, **feedback: object) -> dict:
    """Decide on a $3 / $15 model, send ``feedback``, return the stored decision."""
    headers = create_tenant(client, tenant)
    model = add_model(client, input_price=3.0, output_price=15.0)
    decision = decide(client, headers, candidates=[model]).json()
    r = client.post("/v1/feedback", json={"decision_id": decision["decision_id"],
                                          **feedback}, headers=headers)
    assert r.status_code == 202, r.text
    return client.get(f"/v1/decisions/{decision['decision_id']}", headers=headers).json()


def test_feedback_tokens_priced_from_registry_and_stored(client):
    stored = _feedback_then_stored(client, "pricing-feedback", quality=1.0,
                                   input_tokens=1000, output_tokens=2000)
    assert stored["feedback"][0]["cost_usd"] == pytest.approx(_price(3.0, 15.0, 1000, 2000),
                                                              rel=1e-9)
    assert stored["charged_usd"] == pytest.approx(_price(3.0, 15.0, 1000, 2000), rel=1e-9)


def test_feedback_cost_usd_wins_over_tokens(client):
    stored = _feedback_then_stored(client, "pricing-both", cost_usd=0.5, input_tokens=1,
                                   output_tokens=1)
    assert stored["feedback"][0]["cost_usd"] == 0.5


@pytest.mark.parametrize(("extra", "field"), [
    ({"input_tokens": -1, "output_tokens": 10}, "input_tokens"),
    ({"input_tokens": 10, "output_tokens": 1.5}, "output_tokens"),
    ({"input_tokens": 10, "output_tokens": 10**9}, "output_tokens"),
])
def test_feedback_bad_tokens_refused_naming_field(client, extra, field):
    headers = create_tenant(client, f"pricing-bad-{field}-{len(str(extra))}")
    model = add_model(client)
    decision = decide(client, headers, candidates=[model]).json()
    r = client.post("/v1/feedback", json={"decision_id": decision["decision_id"],
                                          "quality": 1.0, **extra}, headers=headers)
    assert_problem(r, 422, field=field)
    stored = client.get(f"/v1/decisions/{decision['decision_id']}", headers=headers).json()
    assert stored["feedback"] == []


def test_feedback_one_token_count_without_cost_refused(client):
    headers = create_tenant(client, "pricing-half")
    model = add_model(client)
    decision = decide(client, headers, candidates=[model]).json()
    r = client.post("/v1/feedback", json={"decision_id": decision["decision_id"],
                                          "input_tokens": 10}, headers=headers)
    body = assert_problem(r, 422)
    assert "output_tokens" in str(body)
    stored = client.get(f"/v1/decisions/{decision['decision_id']}", headers=headers).json()
    assert stored["feedback"] == []


def test_decision_row_stores_chosen_models_price_for_learners(client):
    """The chosen model's price estimate is a column of its decision row (migration
    0008), which the Kafka learners divide the reported cost by."""
    from sqlalchemy import select

    from service.db import models as m

    headers = create_tenant(client, "pricing-row")
    model = add_model(client, input_price=2.0, output_price=4.0)
    r = client.post("/v1/decide", json={"query": {"text": "y" * 800},
                                        "candidates": [model]}, headers=headers)
    assert r.status_code == 200, r.text
    decision = r.json()
    # The decision is readable (written) once GET answers it.
    assert client.get(f"/v1/decisions/{decision['decision_id']}",
                      headers=headers).status_code == 200
    engine = client.app.state.routing.engine
    with engine.connect() as conn:
        stored = conn.scalar(select(m.DecisionRow.price_usd)
                             .where(m.DecisionRow.id == decision["decision_id"]))
    assert stored == pytest.approx(_price(2.0, 4.0, 200, 300), rel=1e-9)
    assert stored == pytest.approx(decision["predictions"][model]["price_usd"], rel=1e-12)


def test_model_priced_about_zero_learns_no_price_ratio(client):
    """A model whose price is ~0 per Mtok prices a request at ~1e-15 USD: a reported cost
    over that estimate teaches no ratio (was ~1e13, kept in the arm's sums for good),
    and the next decide predicts its cost from the declared price, finite."""
    import math

    headers = create_tenant(client, "pricing-about-zero")
    model = add_model(client, input_price=1e-12, output_price=1e-12)
    decision = decide(client, headers, candidates=[model]).json()
    assert 0 < decision["predictions"][model]["price_usd"] < 1e-10
    r = client.post("/v1/feedback", json={"decision_id": decision["decision_id"],
                                          "quality": 1.0, "cost_usd": 0.01}, headers=headers)
    assert r.status_code == 202 and r.json()["status"] == "applied", r.text
    service = client.app.state.routing
    for kind, policy in service.shared.items():
        k = policy.arms.index(model)
        assert policy._stats.price_ratio[k].tolist() == [0.0, 0.0], kind
        assert policy.observations(model)["quality"] == 1, kind  # the rest was learned
    again = decide(client, headers, candidates=[model]).json()["predictions"][model]
    assert math.isfinite(again["cost_usd"])
    assert again["cost_usd"] == pytest.approx(again["price_usd"], rel=1e-9)
