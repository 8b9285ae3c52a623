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
from typing import Any

import numpy as np

from bandit import InvalidInputError
from bandit.base import MAX_ABS_CONTEXT
from bandit.featurize import (
    TAG_BLOCK_DIMS,
    TAG_BLOCK_SPEC,
    PrototypeMap,
    append_tag_block,
    with_tags,
)
from service.config import Settings

__all__ = ["ContextSettingsError", "load_prototype_map", "context_dim", "head_and_tail",
           "Contexts"]


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
    ``settings.dim``, plus the tag block's with ``TAG_BLOCK``. Loads the map named by the
    settings unless one is given."""
    if prototype_map is None:
        prototype_map = load_prototype_map(settings)
    text = settings.dim if prototype_map is None else prototype_map.dim
    return text + (TAG_BLOCK_DIMS if settings.tag_block else 0)


class Contexts:
    """The context of a request: the featurizer (built on first use), the prototype map,
    the request's tags; and the words that say which settings made the dimension.

    Loads the map (and checks it against ``BANDIT_ROUTER_DIM``) when built, so that a
    bad map refuses the start before anything else is done.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.prototype_map = load_prototype_map(settings)
        #: The policies' context dimension (the map's dim, else BANDIT_ROUTER_DIM; plus
        #: the tag block's with TAG_BLOCK).
        self.dim = context_dim(settings, self.prototype_map)
        #: Width of the tag block at the end of every context (0: no block).
        self.tag_dims = TAG_BLOCK_DIMS if settings.tag_block else 0
        self.featurizer: Any = None
        #: The newest checkpoint's featurizer spec (set by the checkpoints' restore).
        self.stored_spec: str | None = None
        #: Statistics exist that name no spec: they predate versions (version 1).
        self._legacy = False

    def hashing_version(self) -> int:
        """HASHING_VERSION, else the version the newest checkpoint's featurizer spec
        names, else ``HASHING_DEFAULT_VERSION`` (2; versions 3 and 4 are opt-in), except in
        distributed mode, which keeps 1 (the learners' statistics record it and refuse
        another: service/config.py)."""
        if self.settings.hashing_version is not None:
            return self.settings.hashing_version
        from bandit.featurize import HASHING_DEFAULT_VERSION, HASHING_VERSIONS

        if self._legacy or self.settings.kafka_bootstrap:
            return 1
        # Statistics learned with any version keep it (HASHING_DEFAULT_VERSION is only
        # for fresh state).
        for version in HASHING_VERSIONS:
            if self.stored_spec is not None and self.stored_spec.startswith(
                    f"hashing-v{version}:"):
                return version
        return HASHING_DEFAULT_VERSION

    def adopt_stored_spec(self, stored: str | None, *, legacy: bool = False) -> bool:
        """Record the newest checkpoint's spec; True when that changed the hashing
        version (HASHING_VERSION unset, the statistics learned with another version than
        the default, 1, 3 or 4: keep it),
        the featurizer then rebuilt. ``legacy``: statistics exist but name no spec
        (learned before hashing had versions, so with version 1)."""
        before, self.stored_spec, self._legacy = self.hashing_version(), stored, legacy
        if self.hashing_version() == before:
            return False
        self.featurizer = None
        self.featurize("warm up")
        return True

    def featurize(self, text: str) -> np.ndarray:
        """The context of a text: featurizer, then the prototype map if configured."""
        if self.featurizer is None:
            from bandit.featurize import PrototypeFeaturizer, make_featurizer

            featurizer = make_featurizer(self.settings.featurizer, self.settings.dim,
                                         seed=self.settings.featurizer_seed,
                                         hashing_version=self.hashing_version())
            if self.prototype_map is not None:
                featurizer = PrototypeFeaturizer(featurizer, self.prototype_map)
            self.featurizer = featurizer
        return np.asarray(self.featurizer.transform_one(text), dtype=np.float64)

    def spec(self) -> str:
        """What names the featurizer (stored with a checkpoint, checked at start), and
        the tag block when there is one."""
        return self.with_tag_block(
            str(getattr(self.featurizer, "spec", type(self.featurizer).__name__)))

    def with_tag_block(self, featurizer_spec: str) -> str:
        """A featurizer's spec, with the tag block's layout when there is one."""
        return f"{featurizer_spec}|{TAG_BLOCK_SPEC}" if self.tag_dims else featurizer_spec

    def tag_settings(self) -> dict[str, int]:
        """The policies' tag block setting (``tag_dims``; ``tag_ridge`` is the policy's
        default)."""
        return {"tag_dims": self.tag_dims}

    def dim_source(self) -> str:
        """Which settings make the context dimension (for the refusals' messages)."""
        block = (f" plus BANDIT_ROUTER_TAG_BLOCK's {self.tag_dims}" if self.tag_dims
                 else "; BANDIT_ROUTER_TAG_BLOCK is off")
        if self.prototype_map is None:
            return f"BANDIT_ROUTER_DIM{block}; BANDIT_ROUTER_PROTOTYPE_MAP is unset"
        return (f"the k={self.prototype_map.k} prototypes of BANDIT_ROUTER_PROTOTYPE_MAP="
                f"{str(self.settings.prototype_map)!r}"
                + (" plus BANDIT_ROUTER_DIM" if self.prototype_map.include_base else "")
                + block)

    def stored(self, context: bytes, feedback_id: int) -> np.ndarray:
        """A stored decision's context, refused (at start-up) if another setting made it."""
        x = np.frombuffer(context, dtype=np.float64)
        if x.size != self.dim:
            raise ContextSettingsError(
                f"the decision of feedback {feedback_id} has a {x.size}-dimensional "
                f"context, the settings say {self.dim} ({self.dim_source()}): restore the "
                "settings it was decided with, or start on a fresh database")
        return x

    def context_from(self, text: str | None, embedding: list[float] | None,
                     tags: dict[str, str] | None = None) -> np.ndarray:
        """The context of a query: its text's features or its embedding (through the
        prototype map when one is configured), with the request's tags in their own block
        after it with ``TAG_BLOCK`` (:func:`bandit.featurize.append_tag_block`; untagged:
        zeros), else hashed into the same coordinates (:func:`bandit.featurize.with_tags`;
        untagged: unchanged)."""
        x = self._query_context(text, embedding)
        return append_tag_block(x, tags, self.tag_dims) if self.tag_dims else with_tags(x, tags)

    def _query_context(self, text: str | None, embedding: list[float] | None) -> np.ndarray:
        if embedding is not None:
            x = np.asarray(embedding, dtype=np.float64)
            if x.shape != (self.settings.dim,):
                raise InvalidInputError("query.embedding",
                                        f"must be a list of {self.settings.dim} numbers",
                                        f"{x.size} numbers")
            if not np.isfinite(x).all():
                raise InvalidInputError("query.embedding", "must be finite numbers "
                                        "(no NaN or infinity)", "non-finite value")
            if np.abs(x).max() > MAX_ABS_CONTEXT:
                raise InvalidInputError("query.embedding", "every value must be within "
                                        f"+-{MAX_ABS_CONTEXT:g}", float(np.abs(x).max()))
            if self.prototype_map is not None:
                # The same map as for text: a caller who embeds with the configured
                # featurizer gets the features a text would have given.
                x = self.prototype_map.transform(x)
            return x
        assert text is not None
        return self.featurize(text)
