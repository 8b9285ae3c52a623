"""The one place the plug-in imports the router's typed HTTP client.

The client lives in ``service/client.py`` today and is moving to its own distribution;
only this import changes then. It is the HTTP client only (httpx): nothing here imports
the server.
"""

from service.client import AsyncRouterClient, DecideResult, RetryPolicy, RouterError

__all__ = ["AsyncRouterClient", "DecideResult", "RetryPolicy", "RouterError"]
