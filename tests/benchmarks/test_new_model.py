"""benchmarks.new_model: the shared-difficulty option and the specialist's pull counts."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import new_model


def test_shared_difficulty_is_refused_for_linucb(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        new_model.main(["--policy", "linucb", "--shared-difficulty", "on"])
    assert refused.value.code == 2
    assert "--shared-difficulty: only with --policy select" in capsys.readouterr().err


def test_span_pulls_counts_the_specialist_up_to_its_clusters_nth_query() -> None:
    # rows 0-1 before the add; from row 2 on, own-cluster rows 2, 4, 6 (n=2: rows 2..5).
    target = np.array([1, 1, 1, 0, 1, 0, 1, 0], dtype=bool)
    choices = np.array([9, 9, 9, 9, 0, 9, 9, 9])
    assert new_model.span_pulls(choices, target, 2, 2, 9) == {"own_cluster": 1,
                                                             "other_clusters": 2}
