"""One table maps the domain error family to problem details (service.errors)."""

from __future__ import annotations

import pytest

from bandit import InvalidInputError, RoutingError
from service.errors import domain_problem
from service.exceptions import (
    BudgetExhaustedError,
    ConflictError,
    NotFoundError,
    UnavailableError,
)


@pytest.mark.parametrize(("error", "status", "slug", "headers"), [
    (NotFoundError("decision 1 does not exist", slug="decision-not-found"), 404,
     "decision-not-found", {}),
    (ConflictError("taken", field="name", reason="already used", allowed="a new name"), 409,
     "conflict", {}),
    (BudgetExhaustedError("spent"), 429, "budget-exhausted", {"Retry-After": "3600"}),
    (UnavailableError("broker away", retry_after_s=1), 503, "unavailable",
     {"Retry-After": "1"}),
    (UnavailableError("no model", retry_after_s=None, slug="no-models"), 503, "no-models",
     {}),
])
def test_domain_problem_maps_each_error_once(error, status, slug, headers):
    problem = domain_problem(error)
    assert (problem.status, problem.slug, problem.headers) == (status, slug, headers)
    assert problem.detail == str(error)


def test_domain_problem_conflict_and_invalid_input_name_the_field():
    conflict = domain_problem(ConflictError("taken", field="name", reason="already used",
                                            allowed="a new name"))
    assert conflict.errors == [{"field": "name", "message": "already used",
                                "allowed": "a new name"}]
    invalid = domain_problem(InvalidInputError("quality", "must be within [0, 1]", 2))
    assert invalid.status == 422
    assert invalid.errors == [{"field": "quality", "message": "must be within [0, 1] "
                               "(got 2)", "allowed": "must be within [0, 1]"}]


def test_domain_problem_bare_base_class_is_500():
    assert domain_problem(RoutingError("?")).status == 500
