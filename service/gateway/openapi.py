"""``POST /v1/chat/completions`` in ``/openapi.json``.

The route is an ASGI endpoint (no FastAPI model), so its operation is written here:
the part of OpenAI's Chat Completions request the router reads and checks (``model``,
``messages`` with their ``role`` and ``content``, ``stream``, ``stream_options``,
``metadata``; every other field is allowed and forwarded as it is), the answer (a chat
completion, or ``text/event-stream`` chunks), and the errors in OpenAI's shape
(:data:`service.gateway.errors.STATUSES`), not the problem details of the rest of the API.
"""

from __future__ import annotations

import copy
from typing import Any

from bandit.featurize import MAX_TAG_KEY_LENGTH, MAX_TAG_VALUE_LENGTH, MAX_TAGS
from service.gateway.endpoint import PATH
from service.gateway.errors import STATUSES, TYPES

__all__ = ["add_openapi"]

_NULL = {"type": "null"}
_SCHEMAS: dict[str, Any] = {
    "ChatCompletionRequest": {
        "type": "object", "title": "ChatCompletionRequest",
        "required": ["model", "messages"],
        "description": "OpenAI's Chat Completions request. Fields not listed are "
                       "forwarded to the upstream unchanged.",
        "properties": {
            "model": {"type": "string", "minLength": 1, "description":
                      "'auto' (routed among every enabled model with a base_url), "
                      "'auto:<alias>' (a tenant alias) or a registered model's name "
                      "(that model, still logged as a decision)."},
            "messages": {"type": "array", "minItems": 1,
                         "items": {"$ref": "#/components/schemas/ChatMessage"}},
            "stream": {"anyOf": [{"type": "boolean"}, _NULL], "default": False},
            "stream_options": {"anyOf": [{"type": "object"}, _NULL]},
            "metadata": {"anyOf": [{
                "type": "object", "maxProperties": MAX_TAGS,
                "propertyNames": {"minLength": 1, "maxLength": MAX_TAG_KEY_LENGTH,
                                  "pattern": "^[A-Za-z0-9][A-Za-z0-9._:/-]*$"},
                "additionalProperties": {"type": "string", "minLength": 1,
                                         "maxLength": MAX_TAG_VALUE_LENGTH}}, _NULL],
                "description": "Tags of the decision (as a decide's tags), merged with "
                               "the x-router-tags header's."},
        },
    },
    "ChatMessage": {
        "type": "object", "title": "ChatMessage", "required": ["role"],
        "properties": {
            "role": {"type": "string", "description": "system, developer, user, "
                     "assistant, tool..."},
            "content": {"anyOf": [{"type": "string"},
                                  {"type": "array", "items": {"type": "object"}}, _NULL]},
        },
    },
    "ChatCompletion": {
        "type": "object", "title": "ChatCompletion",
        "required": ["id", "object", "model", "choices"],
        "description": "The upstream's answer as it sent it, with model naming the "
                       "registered model used.",
        "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                       "created": {"type": "integer"}, "model": {"type": "string"},
                       "choices": {"type": "array", "items": {"type": "object"}},
                       "usage": {"anyOf": [{"type": "object"}, _NULL]}},
    },
    "OpenAIError": {
        "type": "object", "title": "OpenAIError", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"},
                           "type": {"type": "string", "enum": sorted(set(TYPES.values()))},
                           "param": {"anyOf": [{"type": "string"}, _NULL]},
                           "code": {"anyOf": [{"type": "string"}, _NULL]}}}},
    },
}
_ROUTED = {"x-router-model": {"description": "The registered model that answered",
                              "schema": {"type": "string"}},
           "x-router-decision-id": {"description": "The decision, for POST /v1/feedback",
                                    "schema": {"type": "string"}}}
_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}
_OPERATION = {
    "tags": ["routing"], "summary": "Chat completions (OpenAI-compatible)",
    "operationId": "chat_completions_v1_chat_completions_post",
    "description": "Route an OpenAI chat completion and forward it to the chosen model's "
                   "upstream (docs/api.md, 'OpenAI-compatible endpoint'). Authorization: "
                   "Bearer <tenant key>. Optional header x-router-tags: k=v,k2=v2.",
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
    "responses": {
        "200": {"description": "The upstream's answer", "headers": _ROUTED, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
            # For text/event-stream the schema is one event's (OpenAPI 3.2's itemSchema,
            # as schemathesis reads it): its fields, the data a chunk's JSON or [DONE].
            "text/event-stream": {"schema": {
                "type": "object", "description": "stream: true: the upstream's "
                "chat.completion.chunk events (data: the chunk's JSON), then data: [DONE]",
                "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                               "id": {"type": "string"}, "retry": {"type": "integer"}},
                "required": ["data"]}}}},
        **{str(status): {"description": why, "content": _ERROR}
           for status, why in sorted(STATUSES.items())}},
}


def add_openapi(document: dict[str, Any]) -> dict[str, Any]:
    """Add the operation and its schemas (after the problem details are documented:
    this operation's errors are OpenAI's)."""
    document.setdefault("paths", {})[PATH] = {"post": copy.deepcopy(_OPERATION)}
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in _SCHEMAS.items():
        schemas.setdefault(name, copy.deepcopy(schema))
    return document
