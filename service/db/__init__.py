"""Persistence: SQLAlchemy 2 models (:mod:`service.db.models`), the engine
(:mod:`service.db.engine`) and repositories (:mod:`service.db.repositories`)."""
