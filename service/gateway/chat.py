"""What the router reads of an OpenAI chat-completion request.

The body is forwarded as the client sent it (only ``model`` is replaced, and a stream
asks for its usage), so only what routing needs is checked here: a JSON object, a string
``model``, a non-empty ``messages`` list of objects with a string ``role``, a boolean
``stream``, ``metadata`` as tags. The rest (parameters, tools, images) is the
upstream's to judge; it answers 400 for what it refuses, and that answer is passed on.

The context a decision is made on:

* the text: the last user message with text (a conversation without one: all its
  messages' text; none at all: ``"-"``);
* the tags: the request's ``metadata`` (OpenAI's string-to-string map, checked as a
  decide's ``tags``, 400 naming ``metadata``), the ``x-router-tags`` header's (which win
  on a shared key), and ``system_prompt``: a 12-hex-digit digest of the first system (or
  developer) message, so that the applications behind one tenant key, told apart by
  their system prompts, are learned apart without sending the prompt's words as
  features of every query.

>>> chat = parse_chat(b'{"model": "auto", "messages": [{"role": "system", "content": "Be '
...                   b'brief"}, {"role": "user", "content": "Hi"}], "metadata": {"app": '
...                   b'"faq"}}')
>>> chat.model, chat.stream, chat.text, chat.tags
('auto', False, 'Hi', {'app': 'faq', 'system_prompt': '767a2abaf5ff'})
>>> parse_chat(b'{"model": "auto", "messages": []}')
Traceback (most recent call last):
...
service.gateway.errors.GatewayError: messages: must be a non-empty array of message objects
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from bandit import InvalidInputError
from bandit.featurize import MAX_TAGS, check_tags
from service.gateway.errors import GatewayError

__all__ = ["ChatRequest", "parse_chat", "message_text", "routing_text", "tags_of_header",
           "merged_tags", "TAGS_HEADER", "SYSTEM_TAG"]

#: Request header with tags for the context: ``app=support-bot,task=code``.
TAGS_HEADER = "x-router-tags"
#: The tag holding the system prompt's digest.
SYSTEM_TAG = "system_prompt"


@dataclass(frozen=True)
class ChatRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    #: The client asked for the usage chunk (``stream_options.include_usage``).
    include_usage: bool
    #: The text routed on (see the module docstring).
    text: str
    #: ``metadata`` and the system prompt's digest as tags (None: none).
    tags: dict[str, str] | None = None


def _bad(param: str, message: str) -> GatewayError:
    return GatewayError(400, f"{param}: {message}", param=param, code="invalid_value")


def message_text(content: Any) -> str:
    """The text of a message's content (a string, or the text parts of a list)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def parse_chat(raw: bytes) -> ChatRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise GatewayError(400, "the request body is not valid JSON", code="invalid_json"
                           ) from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object (a chat "
                           "completion request)", code="invalid_value")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "required: 'auto', 'auto:<alias>' or a registered model's name")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(msg, dict) for msg in messages):
        raise _bad("messages", "must be a non-empty array of message objects")
    for i, msg in enumerate(messages):
        if not isinstance(msg.get("role"), str):
            raise _bad(f"messages[{i}].role", "required: a string such as 'user'")
        content = msg.get("content")
        if not (content is None or isinstance(content, str) or (isinstance(
                content, list) and all(isinstance(part, dict) for part in content))):
            raise _bad(f"messages[{i}].content", "must be a string, an array of content "
                       "parts (objects) or null")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "must be an object")
    include_usage = bool((options or {}).get("include_usage"))
    tags = _tags(body.get("metadata"), messages)
    return ChatRequest(body, model, stream, include_usage, routing_text(messages), tags)


def routing_text(messages: list[dict[str, Any]]) -> str:
    """The text a decision is made on (see the module docstring)."""
    for msg in reversed(messages):
        if msg["role"] == "user":
            text = message_text(msg.get("content")).strip()
            if text:
                return text
    return " ".join(message_text(m.get("content")) for m in messages).strip() or "-"


def _tags(metadata: Any, messages: list[dict[str, Any]]) -> dict[str, str] | None:
    try:
        tags = check_tags(metadata, "metadata")
    except InvalidInputError as err:
        raise GatewayError(400, str(err), param=err.field, code="invalid_value") from None
    for msg in messages:
        if msg["role"] in ("system", "developer"):
            prompt = message_text(msg.get("content"))
            if prompt and SYSTEM_TAG not in tags and len(tags) < MAX_TAGS:
                tags[SYSTEM_TAG] = hashlib.blake2b(prompt.encode(), digest_size=6).hexdigest()
            break
    return tags or None


def merged_tags(chat: ChatRequest, header: dict[str, str] | None) -> dict[str, str] | None:
    """The request's tags with the header's (which win), checked together."""
    if not header:
        return chat.tags
    if not chat.tags:
        return header
    try:
        return check_tags({**chat.tags, **header}, TAGS_HEADER)
    except InvalidInputError as err:
        raise GatewayError(400, f"{err} (metadata and the {TAGS_HEADER} header together)",
                           param=TAGS_HEADER, code="invalid_value") from None


def tags_of_header(value: str | None) -> dict[str, str] | None:
    """Tags from the ``x-router-tags`` header (``k=v,k2=v2``), checked as a decide's
    ``tags`` (400 naming the header)."""
    if not value:
        return None
    pairs = [p.partition("=") for p in value.split(",") if p.strip()]
    if any(not sep for _k, sep, _v in pairs):
        raise _bad(TAGS_HEADER, "must be comma-separated key=value pairs")
    try:
        return check_tags({k.strip(): v.strip() for k, _sep, v in pairs}, TAGS_HEADER)
    except InvalidInputError as err:
        raise GatewayError(400, str(err), param=TAGS_HEADER, code="invalid_value") from None
