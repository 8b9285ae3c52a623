"""service: the FastAPI routing service and the ``bandit-router`` command line."""
