"""The context a policy sees: the configured featurizer, optionally followed by a
prototype map (``BANDIT_ROUTER_PROTOTYPE_MAP``).

Without a map the context is the featurizer's vector (or the caller's ``embedding``),
``BANDIT_ROUTER_DIM`` long. With a map, ``BANDIT_ROUTER_DIM`` stays the featurizer's
output length (= the length of ``query.embedding``) and both are mapped: the policies,
the stored decisions, the checkpoints and the learners' statistics all have the map's
``dim``. A map that cannot be read or that was fitted on vectors of another length
refuses the start: mixing two kinds of context in one policy would corrupt it silently.
"""

from __future__ import annotations

import json

from bandit import InvalidInputError
from bandit.featurize import PrototypeMap
from service.config import Settings

__all__ = ["ContextSettingsError", "load_prototype_map", "context_dim", "head_and_tail"]


def head_and_tail(text: str, max_chars: int) -> str:
    """``text`` if at most ``max_chars`` long, else its first and last ``max_chars // 2``
    characters joined by a newline (what a long query is featurized from).

    >>> head_and_tail("abcdefghij", 4), head_and_tail("abc", 4)
    ('ab\\nij', 'abc')
    """
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return text[:half] + "\n" + text[-half:]


class ContextSettingsError(RuntimeError):
    """The settings describe a context the service cannot build (raised at start-up)."""


def load_prototype_map(settings: Settings) -> PrototypeMap | None:
    """The map named by ``settings.prototype_map`` (None when unset), checked against
    ``settings.dim``.

    Raises
    ------
    ContextSettingsError
        The file is missing or not a prototype map, or was fitted on vectors of another
        length than ``BANDIT_ROUTER_DIM``.
    """
    path = settings.prototype_map
    if path is None:
        return None
    if not path.is_file():
        raise ContextSettingsError(
            f"BANDIT_ROUTER_PROTOTYPE_MAP: no file {str(path)!r}; fit one with "
            "`bandit-router fit-prototypes` (service/README.md) or unset the setting")
    try:
        prototype_map = PrototypeMap.load(str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, InvalidInputError, KeyError,
            TypeError, ValueError) as exc:
        raise ContextSettingsError(
            f"BANDIT_ROUTER_PROTOTYPE_MAP: {str(path)!r} is not a prototype map written "
            f"by `bandit-router fit-prototypes` ({type(exc).__name__}: {exc})") from None
    if prototype_map.base_dim != settings.dim:
        raise ContextSettingsError(
            f"BANDIT_ROUTER_PROTOTYPE_MAP: {str(path)!r} was fitted on "
            f"{prototype_map.base_dim}-dimensional vectors, but BANDIT_ROUTER_DIM (the "
            f"featurizer's output and query.embedding length) is {settings.dim}: set "
            f"BANDIT_ROUTER_DIM={prototype_map.base_dim} with the featurizer the map was "
            "fitted with, or fit a map with --dim "
            f"{settings.dim}")
    return prototype_map


def context_dim(settings: Settings, prototype_map: PrototypeMap | None = None) -> int:
    """The policies' context dimension: the map's ``dim`` if there is one, else
    ``settings.dim``. Loads the map named by the settings unless one is given."""
    if prototype_map is None:
        prototype_map = load_prototype_map(settings)
    return settings.dim if prototype_map is None else prototype_map.dim
