"""select's update at d=384 without two D x D passes (issue 19): the shared data
matrices' rank-one steps deferred (``ArmStatistics.defer_rows`` per arm, added at once
when full or when ``s_data`` is read), and the quality candidate with the group's ridge
not stored while the quality head is in its group (``_same_stale``: copied from
``s_inv`` when ``sel_inv`` is read).

Neither changes a number: each test runs a policy that defers (``defer_rows`` forced on
at a small d) against the same policy that does not, on the same stream, and holds
every array, the serialized bytes, merges, forgetting, refreshes, removed arms, splits
and decisions to it bit for bit, right after updates whose steps are still deferred.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from bandit import LinUCB, Policy, SelectiveThompson
from tests.bandit.test_partial_update import COMPARED, piece

PIECES = (("quality", "cost_usd", "latency_ms"), ("quality",), ("cost_usd", "latency_ms"))


def twins(cls: type[Policy], d: int = 6, rows: int = 5, **params) -> list[Policy]:
    """(deferring, plain): the same policy with ``defer_rows`` = rows and 0."""
    out = []
    for m in (rows, 0):
        policy = cls(d, seed=3, drift_delta=None, **params)
        for j in range(3):
            policy.add_arm(f"m{j}")
        policy._stats.defer_rows = m
        out.append(policy)
    return out


def feed(policies: list[Policy], rng: np.random.Generator, n: int, pieces=None,
         every_arm: bool = False) -> None:
    """n outcomes of random arms (``every_arm``: the arms in turn) to each policy."""
    d = policies[0].dim
    for t in range(n):
        x = rng.standard_normal(d) / np.sqrt(d)
        if pieces is None:
            y = {"quality": float(rng.random()), "cost_usd": 1e-3, "latency_ms": 200.0 + t}
        else:
            y = piece(rng, t, pieces)
        arms = policies[0].arms
        arm = arms[t % len(arms)] if every_arm else arms[int(rng.integers(len(arms)))]
        for policy in policies:
            policy.update(arm, x, y)


def assert_bitwise(a: Policy, b: Policy, context: str) -> None:
    sa, sb = a._stats, b._stats
    for name in (*COMPARED, "mu0", "lam", "sigma0", "price_ratio"):
        np.testing.assert_array_equal(getattr(sa, name), getattr(sb, name),
                                      err_msg=f"{name} {context}")


def pending(policy: Policy) -> int:
    pend = policy._stats._pend
    return 0 if pend is None else int(pend[2].sum())


@pytest.mark.parametrize("cls", [SelectiveThompson, LinUCB])
def test_deferred_data_steps_are_read_added_everywhere(cls):
    rng = np.random.default_rng(4)
    lazy, plain = twins(cls, refresh_every=1000)
    feed([lazy, plain], rng, 11)
    assert pending(lazy) > 0  # steps still deferred (5 rows per arm, 3 arms)
    # Serialization right after: the same bytes (derived arrays and sums).
    assert lazy.to_bytes() == plain.to_bytes()
    assert pending(lazy) == 0
    feed([lazy, plain], rng, 7)
    assert pending(lazy) > 0
    assert lazy.clone().to_bytes() == plain.clone().to_bytes()
    # A merge right after: the merged sums and the refreshed inverses.
    other_lazy, other_plain = twins(cls)
    feed([other_lazy, other_plain], np.random.default_rng(5), 9)
    feed([lazy, plain], rng, 4)
    assert pending(lazy) > 0 and pending(other_lazy) > 0
    lazy.merge(other_lazy)
    plain.merge(other_plain)
    assert_bitwise(lazy, plain, "after a merge")
    # Forgetting right after deferred steps (the data discounted, then refreshed).
    feed([lazy, plain], rng, 4)
    assert pending(lazy) > 0
    for policy in (lazy, plain):
        policy._stats.scale(0.5)
    assert_bitwise(lazy, plain, "after forgetting")
    # Steps deferred across many flushes, then a refresh (refresh_every updates).
    for policy in (lazy, plain):
        policy._stats.refresh_every = 6
    feed([lazy, plain], rng, 40)
    assert_bitwise(lazy, plain, "after refreshes")
    # The numpy path after deferred steps, then back to the kernel; an arm removed.
    feed([lazy, plain], rng, 3)
    for policy in (lazy, plain):
        policy._stats.compiled = False
    feed([lazy, plain], rng, 5)
    for policy in (lazy, plain):
        policy._stats.compiled = True
    feed([lazy, plain], rng, 4)
    assert pending(lazy) > 0
    for policy in (lazy, plain):
        policy.remove_arm("m1")
        policy.add_arm("m3")
    feed([lazy, plain], rng, 9)
    assert_bitwise(lazy, plain, "after the numpy path and a removed arm")
    x = rng.standard_normal(lazy.dim) / np.sqrt(lazy.dim)
    assert lazy.decide(x) == plain.decide(x)


@pytest.mark.parametrize("cls", [SelectiveThompson, LinUCB])
def test_deferred_data_steps_with_outcomes_in_pieces(cls):
    """Pieces split the quality head off its group (then its candidate is stored) and
    step own heads (not deferred); splits copy s_data into a_data right after a
    deferred step."""
    rng = np.random.default_rng(8)
    lazy, plain = twins(cls)
    for t in range(60):
        feed([lazy, plain], rng, 1, PIECES if t > 4 else PIECES[:1])
        assert_bitwise(lazy, plain, f"after update {t}")
    assert not lazy._stats.group.all()


def test_shared_candidate_not_stored_while_grouped_then_copied_when_read():
    """The kernel leaves the shared candidate of an arm whose quality head is grouped
    unstored (flagged); every reader sees it: sel_inv, q_inv, a split of the quality
    head, an arm removed before it (indices shift), a new tag ridge, the numpy path."""
    rng = np.random.default_rng(6)
    lazy, plain = twins(SelectiveThompson, d=6, rows=0, refresh_every=1000)
    plain._stats.compiled = False  # the numpy reference stores every candidate
    stats = lazy._stats
    same = stats.shared_candidate
    assert same >= 0
    feed([lazy, plain], rng, 12, every_arm=True)
    assert stats._same_stale.all()  # every arm updated since: none stored
    k = int(np.flatnonzero(stats._same_stale)[0])
    assert not np.array_equal(stats._sel_inv[k, same], stats.s_inv[k])  # not stored
    np.testing.assert_allclose(stats.sel_inv, plain._stats.sel_inv, rtol=1e-9, atol=1e-12)
    assert not stats._same_stale.any()
    # Removing an arm while the others' are unstored: each keeps its own.
    feed([lazy, plain], rng, 9, every_arm=True)
    assert stats._same_stale.all()
    for policy in (lazy, plain):
        policy.remove_arm("m0")
    np.testing.assert_allclose(stats.sel_inv, plain._stats.sel_inv, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.q_inv, plain._stats.q_inv, rtol=1e-9, atol=1e-12)
    # A split of the quality head right after (cost and latency alone): the compiled
    # decide then reads the stored candidate.
    feed([lazy, plain], rng, 6, every_arm=True)
    assert stats._same_stale.all()
    for policy in (lazy, plain):
        for arm in policy.arms:
            policy.update(arm, np.full(6, 0.1), {"cost_usd": 1e-3, "latency_ms": 100.0})
    assert not stats.group[:, 0].any()
    np.testing.assert_allclose(stats._sel_inv, plain._stats.sel_inv, rtol=1e-9, atol=1e-12)
    x = rng.standard_normal(6) / np.sqrt(6)
    np.testing.assert_allclose(lazy.decide_batch(x).uncertainty,
                               plain.decide_batch(x).uncertainty, rtol=1e-9)


def test_shared_candidate_stored_before_a_new_tag_ridge():
    lazy, plain = (SelectiveThompson(6, seed=1, drift_delta=None, tag_dims=2,
                                     tag_ridge=3.0, tag_ridges=(1e6, 3.0))
                   for _ in range(2))
    for policy in (lazy, plain):
        for j in range(2):
            policy.add_arm(f"m{j}")
    plain._stats.compiled = False
    assert lazy._stats.shared_candidate >= 0
    feed([lazy, plain], np.random.default_rng(2), 10, every_arm=True)
    assert lazy._stats._same_stale.all()
    rows = lazy._stats.sel_diag[:, -2] != 1e6
    for policy in (lazy, plain):
        policy._stats.set_tag_ridge(rows, 2, 30.0)
    np.testing.assert_allclose(lazy._stats.sel_inv, plain._stats.sel_inv, rtol=1e-9,
                               atol=1e-12)


def test_two_threads_reading_s_data_add_the_deferred_steps_once():
    # Reading s_data adds the deferred steps (a nogil kernel): two readers at once
    # added them twice before the lock (a review's reproducer: trial 1 differed).
    d = 300
    pair = []
    for _ in range(2):
        p = LinUCB(d, seed=0, drift_delta=None)
        for j in range(8):
            p.add_arm(f"m{j}")
        pair.append(p)
    shared, alone = pair
    rng = np.random.default_rng(0)
    for _trial in range(10):
        for t in range(8 * 31):
            x = rng.standard_normal(d) / np.sqrt(d)
            y = {"quality": float(rng.random()), "cost_usd": 1e-3, "latency_ms": 100.0}
            shared.update(f"m{t % 8}", x, y)
            alone.update(f"m{t % 8}", x, y)
        assert shared._stats._pend[2].any()  # noqa: SLF001 - steps are waiting
        go = threading.Barrier(2)

        def read(go: threading.Barrier = go) -> None:
            go.wait()
            shared._stats.s_data  # noqa: B018, SLF001 - the read adds them

        threads = [threading.Thread(target=read) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        np.testing.assert_array_equal(shared._stats.s_data, alone._stats.s_data)  # noqa: SLF001


@pytest.mark.parametrize("cls", [SelectiveThompson, LinUCB])
def test_saved_merged_copied_installed_state_at_d257_has_every_deferred_step(cls):
    """At d=257 (DEFER_DIM: the steps deferred by default, not forced) the state a user
    keeps right after updates whose steps are still deferred: a checkpoint (deepcopy
    under the locks, then to_bytes), a restore, a state export (derived=False), a merge,
    a distributed snapshot (recast + merge into the registry's priors), decide_batch:
    each equals the same policy that applied every step at once, bit for bit, and the
    restored / copied policy keeps learning as the plain one does."""
    import copy

    from streams.stats import recast

    rng = np.random.default_rng(11)
    d = 257
    lazy, plain = twins(cls, d=d, rows=32, half_life_hours=1.0)
    assert lazy._stats.defer_rows == 32  # the default at this d

    def feed_timed(policies: list[Policy], n: int, t0: float) -> None:
        for t in range(n):
            x = rng.standard_normal(d) / np.sqrt(d)
            y = {"quality": float(rng.random()), "cost_usd": 1e-3, "latency_ms": 100.0 + t}
            arm = policies[0].arms[int(rng.integers(3))]
            for policy in policies:
                policy.update(arm, x, y, time=t0 + 60.0 * t, cost_estimate=5e-4)

    feed_timed([lazy, plain], 20, 0.0)
    assert pending(lazy) > 0
    # A checkpoint: deepcopy (under the locks), serialized later; the live one goes on.
    saved = copy.deepcopy(lazy)
    feed_timed([lazy, plain], 3, 1200.0)
    assert pending(saved) > 0
    restored = Policy.from_bytes(saved.to_bytes())
    assert pending(lazy) > 0
    assert lazy.to_bytes(derived=False) == plain.to_bytes(derived=False)  # state export
    assert_bitwise(lazy, plain, "after an export")
    # The restored checkpoint learns the rows after it as the plain policy did.
    twin = Policy.from_bytes(saved.to_bytes())
    twin._stats.defer_rows = 0
    assert restored.to_bytes() == twin.to_bytes()
    feed_timed([restored, twin], 30, 1400.0)
    assert pending(restored) > 0
    assert_bitwise(restored, twin, "a restored checkpoint after more updates")
    # decide_batch right after deferred steps: the same rows.
    feed_timed([lazy, plain], 5, 3400.0)
    assert pending(lazy) > 0
    x = rng.standard_normal((4, d)) / np.sqrt(d)
    a, b = lazy.decide_batch(x), plain.decide_batch(x)
    np.testing.assert_array_equal(a.choices, b.choices)
    np.testing.assert_array_equal(a.means, b.means)
    np.testing.assert_array_equal(a.scores, b.scores)
    # A merge of two replicas, each with deferred steps.
    other_lazy, other_plain = twins(cls, d=d, rows=32, half_life_hours=1.0)
    feed_timed([other_lazy, other_plain], 9, 3000.0)
    feed_timed([lazy, plain], 4, 3800.0)
    assert pending(lazy) > 0 and pending(other_lazy) > 0
    merged_lazy = copy.deepcopy(lazy).merge(copy.deepcopy(other_lazy))
    merged_plain = copy.deepcopy(plain).merge(copy.deepcopy(other_plain))
    assert_bitwise(merged_lazy, merged_plain, "after a merge")
    # A distributed snapshot: the learners' sums recast and merged into fresh priors.
    assert pending(lazy) > 0
    installed = [twins(cls, d=d, rows=m, half_life_hours=1.0)[0] for m in (32, 0)]
    for fresh, total in zip(installed, (lazy, plain), strict=True):
        fresh.merge(recast(total, cls))
    assert_bitwise(installed[0], installed[1], "after a snapshot install")
    assert_bitwise(lazy, plain, "at the end")
