"""Suite-wide pytest setup. Fixtures for the real servers live in tests/integration/."""

from __future__ import annotations

import os
import warnings

import pytest

# kafka-python loads its protocol schemas with importlib.resources.read_text/open_text,
# deprecated since Python 3.11: hundreds of warnings per run that are not ours. Both at
# import (collection imports kafka) and per test (schemas load lazily).
_KAFKA_NOISE = ("read_text is deprecated", "open_text is deprecated")
for _message in _KAFKA_NOISE:
    warnings.filterwarnings("ignore", message=_message, category=DeprecationWarning)


def pytest_configure(config: pytest.Config) -> None:
    for message in _KAFKA_NOISE:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:DeprecationWarning")


def pytest_report_header(config: pytest.Config) -> list[str]:
    # Shows in CI logs which servers the integration tests were pointed at.
    return [
        f"integration: {name}={os.environ.get(name) or '(unset)'}"
        for name in ("BANDIT_TEST_DATABASE_URL", "BANDIT_TEST_KAFKA_BOOTSTRAP")
    ]


@pytest.fixture(scope="module")
def fake_upstream():
    """A fake OpenAI-compatible upstream on loopback, one per test module; configure its
    models with ``fake_upstream.set(name, ...)`` (tests/fakes/openai_upstream.py)."""
    from tests.fakes.openai_upstream import running_upstream

    with running_upstream() as upstream:
        yield upstream
