"""The plug-in's settings, read from the LiteLLM proxy's environment.

LiteLLM loads plug-ins from ``config.yaml`` by a dotted path to an object, so there is no
place to pass arguments: the settings come from environment variables (the router's key
stays out of ``config.yaml`` and out of LiteLLM's logs that way), or from a
:class:`PluginSettings` you build yourself in a module of your own (see docs/litellm.md).

>>> s = PluginSettings.from_env({"BANDIT_ROUTER_URL": "http://router:8000",
...                              "BANDIT_ROUTER_API_KEY": "brt_x"})
>>> s.groups, s.timeout_s, s.success_quality, s.failure_quality
(('bandit-router/auto',), 2.0, 1.0, 0.0)
>>> PluginSettings.from_env({"BANDIT_ROUTER_URL": "http://router:8000",
...                          "BANDIT_ROUTER_API_KEY": "brt_x",
...                          "BANDIT_ROUTER_LITELLM_TIMEOUT_S": "-1"})
Traceback (most recent call last):
...
ValueError: BANDIT_ROUTER_LITELLM_TIMEOUT_S: must be a number > 0 (got -1.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["PluginSettings", "ENV_URL", "ENV_API_KEY", "ENV_GROUPS", "ENV_TIMEOUT",
           "ENV_SUCCESS_QUALITY", "ENV_FAILURE_QUALITY"]

ENV_URL = "BANDIT_ROUTER_URL"
ENV_API_KEY = "BANDIT_ROUTER_API_KEY"  # noqa: S105 - the variable's name, not a secret
ENV_GROUPS = "BANDIT_ROUTER_LITELLM_GROUPS"
ENV_TIMEOUT = "BANDIT_ROUTER_LITELLM_TIMEOUT_S"
ENV_SUCCESS_QUALITY = "BANDIT_ROUTER_LITELLM_SUCCESS_QUALITY"
ENV_FAILURE_QUALITY = "BANDIT_ROUTER_LITELLM_FAILURE_QUALITY"


@dataclass(frozen=True)
class PluginSettings:
    """Where the router is, which LiteLLM model groups it routes, and what outcomes say.

    Parameters
    ----------
    url : str
        The router service, e.g. ``http://127.0.0.1:8000``.
    api_key : str
        A tenant key of the router (``brt_...``). Never logged (``repr`` hides it).
    groups : tuple of str
        The LiteLLM ``model_name`` groups whose requests are routed; others pass untouched.
    timeout_s : float
        Per call to the router. The decision is on the request's path: when the router
        does not answer in time, LiteLLM picks as it would without the plug-in.
    success_quality : float or None
        The quality reported for a call that succeeded (LiteLLM cannot judge an answer);
        None reports only cost and latency, for teams that post quality later themselves.
    failure_quality : float
        The quality reported for a call that failed (5xx, 429, timeout, refused), when
        ``success_quality`` is set; with it None, a failure reports no quality either
        (both sides or neither: see :meth:`BanditRouter._feedback`).
    """

    url: str
    api_key: str = field(repr=False)
    groups: tuple[str, ...] = ("bandit-router/auto",)
    timeout_s: float = 2.0
    success_quality: float | None = 1.0
    failure_quality: float = 0.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"{ENV_URL}: must be an http(s) URL of the router "
                             f"(got {self.url!r})")
        if not self.api_key:
            raise ValueError(f"{ENV_API_KEY}: must be a tenant key of the router (brt_...)")
        if not self.groups or not all(self.groups):
            raise ValueError(f"{ENV_GROUPS}: must name at least one LiteLLM model group "
                             f"(got {','.join(self.groups)!r})")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"{ENV_TIMEOUT}: must be a number > 0 (got {self.timeout_s!r})")
        for name, value in ((ENV_SUCCESS_QUALITY, self.success_quality),
                            (ENV_FAILURE_QUALITY, self.failure_quality)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: must be a quality in [0, 1] (got {value!r})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> PluginSettings:
        missing = [n for n in (ENV_URL, ENV_API_KEY) if not environ.get(n)]
        if missing:
            raise ValueError(f"{', '.join(missing)}: not set in the LiteLLM proxy's "
                             "environment (the router's URL and a tenant key, brt_...)")
        groups = tuple(g.strip() for g in environ.get(ENV_GROUPS, "bandit-router/auto")
                       .split(","))
        return cls(url=environ[ENV_URL].rstrip("/"), api_key=environ[ENV_API_KEY],
                   groups=groups,
                   timeout_s=_number(environ, ENV_TIMEOUT, "2.0", "a number > 0"),
                   success_quality=(None if environ.get(ENV_SUCCESS_QUALITY, "").lower()
                                    == "none" else
                                    _number(environ, ENV_SUCCESS_QUALITY, "1.0",
                                            "a quality in [0, 1] or 'none'")),
                   failure_quality=_number(environ, ENV_FAILURE_QUALITY, "0.0",
                                           "a quality in [0, 1]"))


def _number(environ: Mapping[str, str], name: str, default: str, allowed: str) -> float:
    raw = environ.get(name) or default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}: must be {allowed} (got {raw!r})") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be {allowed} (got {raw!r})")
    return value
