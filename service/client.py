"""The typed HTTP client, kept importable from its old place.

It is its own distribution now, ``bandit-router-client`` (``client/`` in this
repository; httpx is its only dependency), so that a gateway installs the client without
the server. Import it as ``bandit_router_client``; this module re-exports it.
"""

from bandit_router_client import *  # noqa: F403
from bandit_router_client import (
    __all__,  # noqa: F401
    __getattr__,  # noqa: F401, E402 - the deprecated names
)
