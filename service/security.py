"""API keys: high-entropy random tokens, stored as SHA-256 digests.

A key carries 256 bits of randomness, so a plain (unsalted, fast) hash is enough: there
is nothing to brute-force that a slow password hash would protect.

>>> key = new_key("tenant")
>>> key.startswith("brt_") and len(hash_key(key)) == 64
True
>>> verify_key(key, hash_key(key)), verify_key("brt_wrong", hash_key(key))
(True, False)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["new_key", "hash_key", "verify_key"]

_PREFIX = {"tenant": "brt_", "admin": "bra_"}


def new_key(kind: str) -> str:
    return _PREFIX[kind] + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def verify_key(key: str, digest: str) -> bool:
    return hmac.compare_digest(hash_key(key), digest)
