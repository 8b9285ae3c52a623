"""The learned-state file: what ``bandit-router warmstart`` writes and ``bandit-router
state export`` / ``GET /v1/admin/state`` give, and what ``bandit-router state import`` /
``PUT /v1/admin/state`` load into a running service.

One JSON object::

    {"format": "bandit-router-state", "version": 1, "source": "warmstart" | "export",
     "featurizer": "<spec of the featurizer the contexts came from>",
     "context_dim": 64, "created_at": "...",
     "policies": {"shared:linucb": "<base64 of zlib of Policy.to_bytes()>", ...}}

Keys as in the checkpoints: ``shared:<kind>`` and ``tenant:<id>:<kind>`` (an isolated
tenant's own pair). The featurizer spec and the dimension are checked at import, as the
checkpoints' dimension is at start-up: statistics learned in another feature space
would route by noise. The policies are written without what can be recomputed
(``to_bytes(derived=False)``) and compressed: a state is a request body at import, under
``MAX_BODY_BYTES`` (raise it for a deployment with many isolated tenants).
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bandit import InvalidInputError

__all__ = ["StateFile", "FORMAT", "VERSION"]

FORMAT = "bandit-router-state"
VERSION = 1


@dataclass(frozen=True)
class StateFile:
    featurizer: str
    context_dim: int
    policies: dict[str, bytes]
    source: str = "export"
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "source": self.source,
                "featurizer": self.featurizer, "context_dim": self.context_dim,
                "created_at": self.created_at,
                "policies": {k: base64.b64encode(zlib.compress(v)).decode()
                             for k, v in self.policies.items()}}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    @classmethod
    def from_json(cls, obj: Any) -> StateFile:
        """Parse and check the envelope (not the policies: the importer restores them).

        >>> s = StateFile("hashing-v1:dim=8", 8, {"shared:linucb": b"x"})
        >>> StateFile.from_json(s.to_json()).policies
        {'shared:linucb': b'x'}
        >>> StateFile.from_json({"format": "other"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        bandit.errors.InvalidInputError: format: must be 'bandit-router-state' ... (got 'other')
        """
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise InvalidInputError("format", f"must be {FORMAT!r} (a file of bandit-router "
                                    "warmstart or state export)",
                                    obj.get("format") if isinstance(obj, dict) else obj)
        if obj.get("version") != VERSION:
            raise InvalidInputError("version", f"must be {VERSION}", obj.get("version"))
        featurizer, dim, policies = (obj.get("featurizer"), obj.get("context_dim"),
                                     obj.get("policies"))
        if not isinstance(featurizer, str) or not featurizer:
            raise InvalidInputError("featurizer", "must be a featurizer spec (a string)",
                                    featurizer)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise InvalidInputError("context_dim", "must be an integer >= 1", dim)
        if not isinstance(policies, dict) or not policies:
            raise InvalidInputError("policies", "must be a non-empty object of key: "
                                    "base64 policy", type(policies).__name__)
        decoded = {}
        for key, value in policies.items():
            try:
                decoded[str(key)] = zlib.decompress(base64.b64decode(value, validate=True))
            except (binascii.Error, TypeError, ValueError, zlib.error):
                raise InvalidInputError(f"policies.{key}", "must be base64 of a compressed "
                                        "serialized policy", str(value)[:20]) from None
        return cls(featurizer, dim, decoded, str(obj.get("source", "export")),
                   str(obj.get("created_at", "")))
