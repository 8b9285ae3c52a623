"""The service's domain errors: what the routing core raises, with no HTTP in it.

They extend the library's family (:class:`bandit.RoutingError`, whose
:class:`~bandit.InvalidInputError` already names the field and the allowed values), and
:mod:`service.errors` maps the whole family to problem details in one table. A module of
the core (registry, policy store, feedback ingest, decider) raises these; only the HTTP
layer (``service.deps``, ``service.limits``, ``service.routes``) speaks in statuses.

Examples
--------
>>> err = NotFoundError("decision 42 does not exist", slug="decision-not-found")
>>> str(err), err.slug
('decision 42 does not exist', 'decision-not-found')
>>> UnavailableError("retry", retry_after_s=5).retry_after_s
5
"""

from __future__ import annotations

from bandit import RoutingError

__all__ = ["RoutingError", "ServiceError", "NotFoundError", "ConflictError", "BudgetExhaustedError",
           "UnavailableError"]


class ServiceError(RoutingError):
    """A refusal by the service; ``slug`` names it in the problem's ``type``."""

    default_slug = "error"

    def __init__(self, detail: str, *, slug: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.slug = slug or self.default_slug


class NotFoundError(ServiceError):
    """A model, tenant or decision that does not exist (or is another tenant's)."""

    default_slug = "not-found"


class ConflictError(ServiceError):
    """A write that contradicts what is stored (a name already used)."""

    default_slug = "conflict"

    def __init__(self, detail: str, *, field: str, reason: str, allowed: str,
                 slug: str | None = None) -> None:
        super().__init__(detail, slug=slug)
        self.field = field
        self.reason = reason
        self.allowed = allowed


class BudgetExhaustedError(ServiceError):
    """The tenant's budget is spent and it asked for ``on_budget_exhausted='reject'``."""

    default_slug = "budget-exhausted"
    #: A day's budget frees up at the earliest at the next UTC day: try in an hour.
    retry_after_s = 3600


class UnavailableError(ServiceError):
    """A part the call needs is away or behind (database, broker, buffer, writer) or
    missing (no model registered): nothing was accepted; retry after ``retry_after_s``
    (None: not before an operator acts).

    ``unsent``: the refused item certainly went nowhere (the buffer was full, the
    producer refused it before sending), so what was done for it may be undone. False
    (the default): it may have gone (e.g. the broker's acknowledgement never came:
    the event may be on the topic), so only a retry of the same item is safe."""

    default_slug = "unavailable"

    def __init__(self, detail: str, *, retry_after_s: int | None,
                 slug: str | None = None, unsent: bool = False) -> None:
        super().__init__(detail, slug=slug)
        self.retry_after_s = retry_after_s
        self.unsent = unsent
