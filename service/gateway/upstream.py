"""Calling a model's upstream: the pooled HTTP client, the target of a registered model,
and what an upstream's failure means for the caller and for the learner.

One ``aiohttp.ClientSession`` per app (opened when the app starts, closed when it stops)
serves every upstream: connections are kept alive per host and reused across requests.
No provider SDK: any OpenAI-compatible API (OpenAI, vLLM, Ollama, LiteLLM, Together...)
answers ``POST <base_url>/chat/completions``.

Why aiohttp and not httpx (which the rest of the project uses as a client): on this
path the client's own CPU time is most of what the router adds to a call, and
httpx 0.29 / httpcore 1.0 spend about 1.0 ms of CPU per request at 4 requests in
flight and 3.6 ms at 50 (its pool scans every connection, probing idle sockets, for
each request), against 0.17 ms for aiohttp's, on the same fake upstream
(``python -m benchmarks.gateway_overhead --client-cost``; issue 16's goal is 1 ms added
in all).

The key: a model names the environment variable that holds it (``api_key_env``); it is
read from the router's environment at each request (a rotated key is picked up without a
restart), sent only in the upstream request's ``Authorization`` header, never logged,
stored or answered. An upstream's 401/403 message (OpenAI's quotes part of the key) is
not passed on either.
"""

from __future__ import annotations

import asyncio
import os
from typing import NamedTuple

import aiohttp
import orjson

from service.config import Settings
from service.gateway.errors import GatewayError
from service.routing import ModelState

__all__ = ["Target", "UpstreamFailure", "open_client", "target_of", "failure_of_status",
           "failure_of_exception", "CALLER_FAULTS", "CALL_ERRORS"]

#: Upstream statuses that are the request's fault, not the model's: answered as the
#: upstream sent them, no failure outcome, no fallback.
CALLER_FAULTS = frozenset({400, 413, 422})
_MESSAGE_CHARS = 500


class Target(NamedTuple):
    url: str
    model: str  # the name the upstream knows
    headers: dict[str, str]


class UpstreamFailure(GatewayError):
    """The upstream failed (the model's fault: a failure outcome, and a fallback when the
    tenant allows one). ``kind`` is the code: upstream_timeout, upstream_unreachable,
    upstream_rate_limited, upstream_error."""


def open_client(settings: Settings) -> aiohttp.ClientSession:
    """The pooled client (in the event loop that serves the requests)."""
    connector = aiohttp.TCPConnector(limit=settings.upstream_max_connections,
                                     limit_per_host=0)
    # sock_read: each byte (a stream's next chunk) within the timeout, not the whole
    # answer; no bound on the wait for a free connection of the pool (the caller's
    # disconnect ends it).
    timeout = aiohttp.ClientTimeout(total=None, sock_read=settings.upstream_timeout_s,
                                    sock_connect=settings.upstream_connect_timeout_s)
    # trust_env=False: the upstreams are what the registry says, not a proxy variable's.
    # raise_for_status=False: an error status is read and mapped here. No cookie jar:
    # the pool is shared by every tenant, and a cookie an upstream sets for one tenant's
    # call must not ride along on the next tenant's.
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                 raise_for_status=False, auto_decompress=True,
                                 cookie_jar=aiohttp.DummyCookieJar())


def target_of(model: ModelState) -> Target:
    """Where ``model``'s requests go (its base URL must be set: callers check)."""
    assert model.base_url is not None
    headers = {"content-type": "application/json"}
    if model.api_key_env:
        key = os.environ.get(model.api_key_env)
        if not key:
            # The variable's name only: an operator must set it in the router's environment.
            raise UpstreamFailure(502, f"the upstream key of model {model.name!r} is "
                                  f"missing: environment variable {model.api_key_env} is "
                                  "not set in the router's process", code="upstream_error")
        headers["authorization"] = f"Bearer {key}"
    return Target(model.base_url.rstrip("/") + "/chat/completions",
                  model.upstream_model or model.name, headers)


def _upstream_message(content: bytes) -> str:
    try:
        data = orjson.loads(content)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) \
            else data.get("error") or data.get("detail") or data.get("message")
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        message = content.decode("utf-8", "replace")
    return str(message)[:_MESSAGE_CHARS]


def failure_of_status(model: str, status: int, content: bytes,
                      retry_after: str | None) -> UpstreamFailure:
    """The failure an upstream's error status means (not for :data:`CALLER_FAULTS`)."""
    if status == 429:
        return UpstreamFailure(429, f"the upstream of model {model!r} is rate limited "
                               f"(429): {_upstream_message(content)}",
                               code="upstream_rate_limited",
                               headers={"Retry-After": retry_after} if retry_after else None)
    if status in (401, 403):
        # OpenAI's message quotes part of the key: not passed on.
        return UpstreamFailure(502, f"the upstream of model {model!r} refused the router's "
                               f"key ({status}); check the model's api_key_env",
                               code="upstream_error")
    return UpstreamFailure(502, f"the upstream of model {model!r} answered {status}: "
                           f"{_upstream_message(content)}", code="upstream_error")


#: What a failed call to an upstream raises (besides a cancellation).
CALL_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


def failure_of_exception(model: str, exc: BaseException, timeout_s: float
                         ) -> UpstreamFailure:
    """The failure a :data:`CALL_ERRORS` exception means."""
    if isinstance(exc, asyncio.TimeoutError):
        what = "connect" if isinstance(exc, aiohttp.ConnectionTimeoutError) else "answer"
        return UpstreamFailure(504, f"the upstream of model {model!r} did not {what} in "
                               f"time ({timeout_s:g} s without a byte)",
                               code="upstream_timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure(502, f"the upstream of model {model!r} is unreachable "
                               "(connection refused or failed)", code="upstream_unreachable")
    return UpstreamFailure(502, f"the connection to the upstream of model {model!r} "
                           f"failed ({type(exc).__name__})", code="upstream_unreachable")
