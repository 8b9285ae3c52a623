"""bandit-router inside a LiteLLM Proxy: routes a model group's requests by the router's
learned decision, and learns from LiteLLM's success and failure callbacks.

Install with ``pip install -e ".[litellm]"`` from a checkout and name :data:`router` twice in
the proxy's ``config.yaml`` (docs/litellm.md has the whole snippet)::

    router_settings:
      plugins: ["bandit_router_litellm.router"]
    litellm_settings:
      callbacks: ["bandit_router_litellm.router"]

with ``BANDIT_ROUTER_URL`` and ``BANDIT_ROUTER_API_KEY`` in the proxy's environment.
"""

from bandit_router_litellm.plugin import BanditRouter
from bandit_router_litellm.settings import PluginSettings

__all__ = ["BanditRouter", "PluginSettings", "router"]

#: The instance ``config.yaml`` names. Its settings are read from the environment on
#: first use, not at import (LiteLLM imports this while it loads its config).
router = BanditRouter()
