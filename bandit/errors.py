"""One exception family for the whole router.

Every error a caller can cause is a :class:`RoutingError`; the ones caused by bad input
are also :class:`ValueError` and carry the offending ``field`` and what is ``allowed``, so
the service can map them to RFC 9457 problem details in one place.
"""

from __future__ import annotations

__all__ = ["RoutingError", "InvalidInputError", "DimensionError", "UnknownArmError"]


class RoutingError(Exception):
    """Base class of every error raised by the router."""


class InvalidInputError(RoutingError, ValueError):
    """Bad input: names the field, what was wrong and the allowed values.

    Examples
    --------
    >>> err = InvalidInputError("quality", "must be within [0, 1]", value=1.5)
    >>> str(err)
    'quality: must be within [0, 1] (got 1.5)'
    >>> err.field
    'quality'
    """

    def __init__(self, field: str, allowed: str, value: object = None) -> None:
        self.field = field
        self.allowed = allowed
        self.value = value
        shown = "" if value is None else f" (got {value!r})"
        super().__init__(f"{field}: {allowed}{shown}")


class DimensionError(InvalidInputError):
    """A context vector whose length is not the policy's dimension."""


class UnknownArmError(InvalidInputError):
    """An arm (model) name the policy does not know."""
