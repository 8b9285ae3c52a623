"""The LiteLLM Proxy plug-in: the router decides which deployment of a model group
serves a request, and learns from what LiteLLM observed of the call.

One object, named twice in the proxy's ``config.yaml`` (docs/litellm.md):

1. ``router_settings.plugins`` (LiteLLM's routing-plugin pipeline, documented for the
   proxy since v1.94): before LiteLLM picks a deployment, :meth:`BanditRouter.run` asks
   the router (``POST /v1/decide``) with the last user message as the query and the
   group's deployments LiteLLM would call now (their ``litellm_params.model``; none in
   cooldown or paused: :meth:`BanditRouter._callable`) as the candidates, then narrows
   LiteLLM's ``candidate_models`` to the chosen one. The decision rides along in the
   request's metadata (``routing_plugin_signals["bandit_router"]``, LiteLLM's documented
   channel for plug-in signals).
2. ``litellm_settings.callbacks`` (a ``CustomLogger``): when the call ends,
   :meth:`BanditRouter.async_log_success_event` /
   :meth:`BanditRouter.async_log_failure_event` post the outcome (``POST /v1/feedback``)
   with that decision id: LiteLLM's ``response_cost``, the call's latency, and a quality
   (``failure_quality`` for an error, posted ``failed``: final, a later quality of the
   client's is refused; ``success_quality`` for a success, posted as ``default_quality``:
   learned after the tenant's ``quality_wait_seconds`` unless the client's own quality
   replaces it; both as the router's gateway does). The feedback's
   ``event_id`` is LiteLLM's call id, so a repeated callback is applied once. The same
   callback adds the headers ``x-bandit-router-decision-id`` and
   ``x-bandit-router-model`` to the proxy's answer, so a client can report the quality
   later (``POST /v1/feedback``). A 503 or 429 of the router (its database or broker
   away) or a transport failure is retried with backoff (:data:`FEEDBACK_RETRY`) in a
   task of its own: the callback returns after the first attempt.

Failing open: the router is an optimisation in front of traffic that must flow. When it
cannot decide (unreachable, slower than ``timeout_s``, an error such as a deployment not
registered as a model in the router), the plug-in logs why and leaves LiteLLM's choice
alone; no feedback is posted for that request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import weakref
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

import httpx
from litellm.integrations.custom_logger import CustomLogger
from litellm.types.router import RoutingContext

from bandit_router_litellm._client import AsyncRouterClient, RetryPolicy, RouterError
from bandit_router_litellm.settings import PluginSettings

__all__ = ["BanditRouter", "SIGNAL", "DECISION_HEADER", "MODEL_HEADER", "FEEDBACK_RETRY",
           "MAX_POSTING", "last_user_text"]

log = logging.getLogger("bandit_router_litellm")

SIGNAL = "bandit_router"  # key of the decision in routing_plugin_signals
DECISION_HEADER = "x-bandit-router-decision-id"
MODEL_HEADER = "x-bandit-router-model"
#: The retries of a feedback post the router answered 503 or 429 (its database or broker
#: away), or that did not reach it: 4 more attempts, after 0.5 s, 1 s, 2 s, 4 s (full
#: jitter, never sooner than the router's Retry-After, at most 30 s), then dropped with a
#: warning. The event id makes a repeat a duplicate.
FEEDBACK_RETRY = RetryPolicy(max_attempts=4, backoff_s=0.5, max_backoff_s=4.0,
                             max_retry_wait_s=30.0)
#: The retrying task's client: the task waits FEEDBACK_RETRY's first wait, then its
#: client's n-th retry waits FEEDBACK_RETRY's (n+1)-th (0.5 s, then 1, 2, 4 s; before,
#: the client started over at 0.5 s: 0.5, 0.5, 1, 2 s).
_TASK_RETRY = replace(FEEDBACK_RETRY, backoff_s=2 * FEEDBACK_RETRY.backoff_s)
#: Feedback posts retrying at most (a router away for long: later ones are dropped with a
#: warning rather than piling up in the proxy's memory).
MAX_POSTING = 10_000
#: The first attempt's answers that are retried (0: no answer, a transport error).
_RETRIED = frozenset({0, 429, 503})


def last_user_text(messages: list[dict[str, Any]]) -> str | None:
    """The text of the last user message (text parts joined), or None.

    >>> last_user_text([{"role": "user", "content": "first"},
    ...                 {"role": "assistant", "content": "ok"},
    ...                 {"role": "user", "content": [{"type": "text", "text": "second"},
    ...                                              {"type": "image_url", "image_url": {}},
    ...                                              {"type": "text", "text": "part"}]}])
    'second\\npart'
    >>> last_user_text([{"role": "system", "content": "be brief"}]) is None
    True
    """
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = "\n".join(p["text"] for p in content
                             if isinstance(p, dict) and isinstance(p.get("text"), str))
        else:
            text = ""
        return text.strip() or None
    return None


def _decision_of(kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The decision :meth:`BanditRouter.run` attached to this call, if any."""
    litellm_params = kwargs.get("litellm_params") or {}
    for key in ("metadata", "litellm_metadata"):
        metadata = litellm_params.get(key) or kwargs.get(key) or {}
        signal = (metadata.get("routing_plugin_signals") or {}).get(SIGNAL)
        if isinstance(signal, dict) and signal.get("decision_id"):
            return signal
    return None


def _latency_ms(start: Any, end: Any) -> float | None:
    if isinstance(start, datetime) and isinstance(end, datetime):
        return max((end - start).total_seconds() * 1000.0, 0.0)
    if isinstance(start, int | float) and isinstance(end, int | float):
        return max((end - start) * 1000.0, 0.0)
    return None


class BanditRouter(CustomLogger):
    """A LiteLLM routing plug-in and callback backed by a bandit-router service.

    Parameters
    ----------
    settings : PluginSettings, optional
        Read from the environment (:meth:`PluginSettings.from_env`) on first use when
        not given, so that importing this module (LiteLLM does it while loading its
        config) needs neither the variables nor a network.
    litellm_router : litellm.Router, optional
        The Router whose cooldowns the decisions respect; in the proxy, found without
        being given (the proxy's ``llm_router``). An SDK user passes the Router it
        builds with ``plugins=[plugin]`` (``plugin.litellm_router = router``).
    """

    def __init__(self, settings: PluginSettings | None = None, *,
                 litellm_router: Any | None = None) -> None:
        super().__init__()
        self._settings = settings
        #: The Router whose cooldowns the decisions respect (see the class docstring).
        self.litellm_router = litellm_router
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[AsyncRouterClient, AsyncRouterClient]] = \
            weakref.WeakKeyDictionary()
        self._posting: set[asyncio.Task[None]] = set()

    @property
    def settings(self) -> PluginSettings:
        if self._settings is None:
            self._settings = PluginSettings.from_env(os.environ)
        return self._settings

    def _client(self, *, feedback: bool = False) -> AsyncRouterClient:
        """The running loop's client for decisions, or (``feedback``) for feedback."""
        # An httpx.AsyncClient belongs to the event loop it first ran on; LiteLLM may run
        # callbacks on another loop than requests, so keep the clients per loop.
        loop = asyncio.get_running_loop()
        clients = self._clients.get(loop)
        if clients is None:
            s = self.settings
            # Decisions: one attempt, bounded by timeout_s: a decision that waits for a
            # retry is a request that waits; failing open is the better answer. Feedback
            # is off the request's path: retried (FEEDBACK_RETRY).
            clients = (AsyncRouterClient(s.url, s.api_key, timeout=s.timeout_s,
                                         retry=RetryPolicy(max_attempts=1)),
                       AsyncRouterClient(s.url, s.api_key, timeout=s.timeout_s,
                                         retry=_TASK_RETRY))
            self._clients[loop] = clients
        return clients[feedback]

    async def aclose(self) -> None:
        """Wait for the running event loop's feedback posts (bounded by their attempts),
        then close its HTTP clients (LiteLLM never calls this; a test or an embedding
        application may)."""
        loop = asyncio.get_running_loop()
        # A copy: a post ending on another loop's thread discards itself meanwhile.
        posting = [t for t in list(self._posting) if t.get_loop() is loop]
        if posting:
            await asyncio.gather(*posting, return_exceptions=True)
        for client in self._clients.pop(loop, ()):
            await client.aclose()

    # ------------------------------------------------------------ the decision
    async def run(self, context: RoutingContext) -> RoutingContext:
        """LiteLLM's ``RoutingPlugin`` interface: narrow the candidates to the router's
        choice (only for the configured model groups)."""
        group = context.metadata.get("model_group")
        if group not in self.settings.groups or not context.candidate_models:
            return context
        query = last_user_text(context.structured_messages or context.raw_messages)
        if query is None:
            log.info("bandit-router: no user text in the request to %s; LiteLLM picks", group)
            return context
        candidates = await self._callable(str(group), list(dict.fromkeys(
            context.candidate_models)))
        if not candidates:
            log.info("bandit-router: every deployment of %s is in cooldown; LiteLLM "
                     "answers", group)
            return context
        try:
            decision = await self._client().decide(query, candidates=candidates)
        except RouterError as exc:
            # str(exc) is the router's problem detail; it never contains the key.
            log.warning("bandit-router: no decision for %s (%s); LiteLLM picks", group, exc)
            return context
        if decision.model not in candidates:  # cannot happen with candidates given
            log.warning("bandit-router chose %r outside %s; LiteLLM picks", decision.model,
                        candidates)
            return context
        context.candidate_models = [decision.model]
        context.signals[SIGNAL] = {"decision_id": decision.decision_id,
                                   "model": decision.model,
                                   "propensity": decision.propensity,
                                   "explored": decision.explored}
        return context

    def _router(self) -> Any | None:
        if self.litellm_router is not None:
            return self.litellm_router
        # Inside the proxy: its Router, as LiteLLM's own integrations reach it (``from
        # litellm.proxy.proxy_server import llm_router``); looked up, never imported, so
        # that an SDK user without the proxy loaded pays nothing.
        proxy = sys.modules.get("litellm.proxy.proxy_server")
        return getattr(proxy, "llm_router", None)

    async def _callable(self, group: str, candidates: list[str]) -> list[str]:
        """The ``candidates`` LiteLLM would call now: those with a deployment in ``group``
        neither in cooldown nor paused (the filters LiteLLM applies after the plug-ins).
        A candidate the Router does not list for ``group`` stays: its state is unknown.

        Deciding among the others would end the request with LiteLLM's "No deployments
        left after routing-plugin filtering". Without a Router to ask (an SDK user who
        did not pass one), or when asking fails, all of them.
        """
        router = self._router()
        if router is None:
            return candidates
        try:
            deployments = router.get_model_list(model_name=group) or []
            ids = [d["model_info"]["id"] for d in deployments]
            cooling = {model_id for model_id, _ in
                       await router.cooldown_cache.async_get_active_cooldowns(
                           model_ids=ids, parent_otel_span=None)}
            known = {d["litellm_params"]["model"] for d in deployments}
            usable = {d["litellm_params"]["model"] for d in deployments
                      if d["model_info"]["id"] not in cooling
                      and d["model_info"].get("blocked") is not True}
        except Exception as exc:  # noqa: BLE001 - LiteLLM's internals moved: decide as before
            log.warning("bandit-router: LiteLLM's cooldowns of %s unknown (%r); deciding "
                        "among all its deployments", group, exc)
            return candidates
        unknown = [c for c in candidates if c not in known]
        if unknown:
            # An alias, a wildcard route or a LiteLLM whose model list differs: their
            # state is unknown, so they stay (LiteLLM filters them after us if it must).
            log.warning("bandit-router: %s not among the deployments LiteLLM lists for %s; "
                        "their cooldowns unknown", unknown, group)
        return [c for c in candidates if c in usable or c not in known]

    async def async_post_call_response_headers_hook(
            self, data: dict[str, Any], user_api_key_dict: Any, response: Any,
            request_headers: dict[str, str] | None = None,
            litellm_call_info: dict[str, object] | None = None) -> dict[str, str] | None:
        """Name the decision in the proxy's answer (success or error)."""
        decision = _decision_of(data)
        if decision is None:
            return None
        return {DECISION_HEADER: str(decision["decision_id"]),
                MODEL_HEADER: str(decision["model"])}

    # ------------------------------------------------------------ the feedback
    async def async_log_success_event(self, kwargs: dict[str, Any], response_obj: Any,
                                      start_time: Any, end_time: Any) -> None:
        await self._feedback(kwargs, start_time, end_time, failed=False)

    async def async_log_failure_event(self, kwargs: dict[str, Any], response_obj: Any,
                                      start_time: Any, end_time: Any) -> None:
        await self._feedback(kwargs, start_time, end_time, failed=True)

    async def _feedback(self, kwargs: dict[str, Any], start_time: Any, end_time: Any, *,
                        failed: bool) -> None:
        decision = _decision_of(kwargs)
        if decision is None:  # not routed by us: nothing to report, no settings needed
            return
        called = (kwargs.get("litellm_params") or {}).get("model") or kwargs.get("model")
        if called is not None and called != decision["model"] and not str(
                decision["model"]).endswith(f"/{called}"):
            # A fallback to another group served it: the outcome is not the chosen arm's.
            log.info("bandit-router: %s was served by %s; no feedback", decision["model"],
                     called)
            return
        cost = kwargs.get("response_cost")
        # A failed call's cost is unknown to LiteLLM (its response_cost is None or 0).
        cost_usd = float(cost) if not failed and isinstance(cost, int | float) else None
        s = self.settings
        # Both sides or neither (as the gateway, service/gateway/endpoint.py _quality):
        # failures heard always and successes only when a client rates them would drag
        # a deployment that fails now and then towards the failure quality.
        # A success's quality is a default: learned after the tenant's
        # quality_wait_seconds unless the client rates the call (service/quality_defaults.py).
        # A failure's is final (``failed``): a later quality of the client's is a 409.
        default = s.success_quality if not failed else None
        quality = None if s.success_quality is None or not failed else s.failure_quality
        latency_ms = _latency_ms(start_time, end_time)
        if default is None and quality is None and cost_usd is None and latency_ms is None:
            return
        call_id = kwargs.get("litellm_call_id")
        decision_id = str(decision["decision_id"])
        feedback = {"quality": quality, "cost_usd": cost_usd, "latency_ms": latency_ms,
                    "event_id": f"litellm-{call_id}" if call_id else None,
                    "default_quality": default, "failed": quality is not None}
        try:
            await self._client().feedback(decision_id, **feedback)
            return
        except (RouterError, httpx.HTTPError) as exc:
            if not (isinstance(exc, RouterError) and exc.status in _RETRIED
                    and feedback["event_id"] is not None):  # a repeat must be a duplicate
                log.warning("bandit-router: feedback for decision %s not posted (%s)",
                            decision_id, exc)
                return
            first = exc
        wait = FEEDBACK_RETRY.wait(1, None if first.retry_after is None
                                   else str(first.retry_after))
        if wait is None or len(self._posting) >= MAX_POSTING:
            why = (f"the router asks for {first.retry_after:g} s, more than "
                   f"{FEEDBACK_RETRY.max_retry_wait_s:g} s" if wait is None else
                   f"{len(self._posting)} posts wait for the router already")
            log.warning("bandit-router: feedback for decision %s not posted (%s) and not "
                        "retried: %s", decision_id, first, why)
            return
        # The retries in a task of their own: they never hold LiteLLM's callback (its
        # logging worker gives a callback 20 s, then cancels it).
        task = asyncio.get_running_loop().create_task(
            self._retry(decision_id, wait, feedback))
        self._posting.add(task)
        task.add_done_callback(self._posting.discard)

    async def _retry(self, decision_id: str, wait: float, feedback: dict[str, Any]) -> None:
        """Post again ``wait`` seconds after the first attempt's 503/429 (or connection
        failure): ``FEEDBACK_RETRY``'s backoff, never sooner than the router's Retry-After."""
        await asyncio.sleep(wait)
        try:
            await self._client(feedback=True).feedback(decision_id, **feedback)
        except (RouterError, httpx.HTTPError) as exc:
            log.warning("bandit-router: feedback for decision %s not posted after %d "
                        "attempts (%s)", decision_id, FEEDBACK_RETRY.max_attempts + 1, exc)
