"""``bandit-router replay``: placeholder until the replay engine lands."""

from __future__ import annotations


def replay() -> None:
    raise NotImplementedError
