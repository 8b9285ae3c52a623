"""The OpenAI-compatible routing endpoint, ``POST /v1/chat/completions`` (issue 16).

Point an OpenAI client's base URL at the router and send ``model: "auto"``: the router
decides, forwards the request to the chosen model's upstream (the model's ``base_url``,
``upstream_model`` and ``api_key_env`` in the registry), answers with what the upstream
answered, and posts the outcome to itself. Modules:

* :mod:`~service.gateway.endpoint`: the route (ASGI), routing and forwarding;
* :mod:`~service.gateway.chat`: what is read of the request;
* :mod:`~service.gateway.upstream`: the pooled HTTP client, targets, failures;
* :mod:`~service.gateway.feedback`: the outcomes, stored in the background;
* :mod:`~service.gateway.settings`, :mod:`~service.gateway.routes`: each tenant's
  aliases, fallback and success quality (``/v1/tenants/me/gateway``), and the lifespan;
* :mod:`~service.gateway.errors`: OpenAI-style errors;
* :mod:`~service.gateway.metrics`: its instruments on ``/metrics``;
* :mod:`~service.gateway.openapi`: its operation in ``/openapi.json``.
"""

from __future__ import annotations

from starlette.routing import Route

from service.gateway.endpoint import PATH, ChatCompletionsEndpoint
from service.gateway.openapi import add_openapi
from service.gateway.routes import router, wire_defaults

__all__ = ["route", "router", "add_openapi", "wire_defaults"]


def route() -> Route:
    """``POST /v1/chat/completions``; the app factory passes it in FastAPI's ``routes``
    argument right after ``POST /v1/decide`` (and documents it with :func:`add_openapi`).
    ``router`` holds the settings routes, whose lifespan opens and closes the gateway's
    state."""
    return Route(PATH, ChatCompletionsEndpoint(), methods=["POST"], include_in_schema=False)
