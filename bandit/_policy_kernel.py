"""Compiled kernels of the linear policies' single-context hot path (numba).

:meth:`bandit.stats.ArmStatistics.predict` for one context and
:meth:`bandit.stats.ArmStatistics.update` (any objectives reported: the whole outcome or
a piece of it; the split of a head group stays numpy) each cost a dozen
numpy calls on arrays of a few hundred numbers; numpy's ~1 µs per call, not the
arithmetic, was the floor. Each kernel here is one call, in place on the stacked arrays,
with no temporary larger than a D-vector. The numpy code stays the reference: the tests
(tests/bandit/test_policy_kernel.py) hold the kernels to it within 1e-9 over random
streams, and same seed -> same decisions.

What differs is only the order of floating-point sums: they may be reassociated
(``fastmath`` reassociation only, so that the dot products vectorize; no change to NaN
and infinity handling).

Compiled on first use and cached next to the module (``cache=True``, as
:mod:`bandit._hashing_kernel`); ``benchmarks/policy_speed.py`` reports the import and
first-call cost with and without a warm cache.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["copy_bounded", "copy_bounded_row", "quality_ceiling", "predict_one",
           "predict_width", "add_quadratic_forms", "width_matrix", "update_arm",
           "flush_data", "defer_data", "flush_all",
           "thompson_propensities", "decide_rows", "decide_one", "decide_one_split",
           "RULE_UCB", "RULE_THOMPSON", "PHI_TABLE"]

# Reassociation lets the dot products vectorize; the other fast-math flags (no NaN, no
# infinity) would change what the numpy reference does with them.
_FAST = {"reassoc", "contract"}


@njit(cache=True, nogil=True, fastmath=_FAST)
def _quadratic(p: np.ndarray, x: np.ndarray) -> float:
    """``x^T P x`` for a symmetric P (D, D) (float64, or float32 summed in float64), from
    its lower triangle: ``sum_i x_i (P_ii x_i + 2 sum_{j<i} P_ij x_j)``, half the reads
    and multiply-adds of the full form (the quadratic forms are most of a decide: 16 of
    65 x 65 at d=64). Four rows at a time share each x_j read and the loop's overhead
    (the rows are short): 16 forms at D=65 6.9 -> 6.0-6.3 µs against two rows at a time
    (two runs), 258-286 -> 225-231 µs at D=385 (a one-off timing, docs/results.md
    "Decide alone"); two rows were 1.3-1.8x faster than the full form at D=65, one row
    ~1.2x slower than two. Each row's loop starts at 0, so it vectorizes (one starting
    at i + 1 does not: 3x slower here); the small triangle of the four rows among
    themselves is summed apart."""
    d = x.shape[0]
    total = 0.0
    i = 0
    while i + 3 < d:
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        for j in range(i):
            xj = x[j]
            a0 += np.float64(p[i, j]) * xj
            a1 += np.float64(p[i + 1, j]) * xj
            a2 += np.float64(p[i + 2, j]) * xj
            a3 += np.float64(p[i + 3, j]) * xj
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        a1 += np.float64(p[i + 1, i]) * x0
        a2 += np.float64(p[i + 2, i]) * x0 + np.float64(p[i + 2, i + 1]) * x1
        a3 += (np.float64(p[i + 3, i]) * x0 + np.float64(p[i + 3, i + 1]) * x1
               + np.float64(p[i + 3, i + 2]) * x2)
        total += ((2.0 * a0 + np.float64(p[i, i]) * x0) * x0
                  + (2.0 * a1 + np.float64(p[i + 1, i + 1]) * x1) * x1
                  + (2.0 * a2 + np.float64(p[i + 2, i + 2]) * x2) * x2
                  + (2.0 * a3 + np.float64(p[i + 3, i + 3]) * x3) * x3)
        i += 4
    while i < d:  # the last D mod 4 rows
        acc = 0.0
        for j in range(i):
            acc += np.float64(p[i, j]) * x[j]
        total += (2.0 * acc + np.float64(p[i, i]) * x[i]) * x[i]
        i += 1
    return total


@njit(cache=True, nogil=True, fastmath=_FAST)
def predict_one(theta: np.ndarray, x: np.ndarray, w: np.ndarray, means: np.ndarray,
                utility: np.ndarray) -> None:
    """Head means (K, H) = theta (K, H, D) . x (D,) and utility (K,) = means . w (H,)."""
    k_arms, heads, d = theta.shape
    for k in range(k_arms):
        u = 0.0
        for h in range(heads):
            acc = 0.0
            for j in range(d):
                acc += theta[k, h, j] * x[j]
            means[k, h] = acc
            u += acc * w[h]
        utility[k] = u


@njit(cache=True, nogil=True, inline="always")
def _copy_row(x: np.ndarray, out: np.ndarray, bound: float) -> bool:
    """Copy one context x (D-1,) into out[:-1], the bias out[-1] = 1; whether every
    value is within +-bound (NaN is not)."""
    ok = True
    d = x.shape[0]
    for j in range(d):
        v = x[j]
        out[j] = v
        if not -bound <= v <= bound:
            ok = False
    out[d] = 1.0
    return ok


@njit(cache=True, nogil=True)
def copy_bounded(x: np.ndarray, out: np.ndarray, bound: float) -> bool:
    """Copy the contexts x (n, D-1) into out[:, :-1] and set the bias out[:, -1] = 1;
    whether every value is within +-bound (NaN is not)."""
    ok = True
    for r in range(x.shape[0]):
        ok &= _copy_row(x[r], out[r], bound)
    return ok


@njit(cache=True, nogil=True)
def copy_bounded_row(x: np.ndarray, out: np.ndarray, bound: float) -> bool:
    """:func:`copy_bounded` of one context x (D-1,) into out (1, D): a decide's, without
    the (1, D-1) view that the batch kernel takes (~0.3 µs less per decide: the view and
    a 2-D argument)."""
    return _copy_row(x, out[0], bound)


@njit(cache=True, nogil=True)
def _quality_ceiling(utility: np.ndarray, means: np.ndarray, w0: float,
                     out: np.ndarray) -> None:
    for r in range(utility.shape[0]):
        for j in range(utility.shape[1]):
            gap = 1.0 - means[r, j, 0]
            out[r, j] = utility[r, j] + w0 * (0.0 if gap < 0.0 else gap)  # NaN stays, as np.maximum


def quality_ceiling(utility: np.ndarray, means: np.ndarray, w0: float) -> np.ndarray:
    """``utility + w0 * max(1 - quality, 0)`` (n, K) for means (n, K, H): each arm's
    utility with perfect quality, in one call (the same operations, the same result as
    numpy's four)."""
    out = np.empty_like(utility)
    _quality_ceiling(utility, means, w0, out)
    return out


@njit(cache=True, nogil=True, fastmath=_FAST)
def predict_width(theta: np.ndarray, xb: np.ndarray, w: np.ndarray, c: np.ndarray,
                  inv: np.ndarray, q_inv: np.ndarray, q_sel: np.ndarray, selecting: bool,
                  sel: np.ndarray, same: int, group: np.ndarray, a_inv: np.ndarray,
                  means: np.ndarray, utility: np.ndarray, std: np.ndarray) -> None:
    """Head means (n, K, H), utility (n, K) and the utility's std (n, K) of a few contexts
    xb (n, D): ``std[r, k]^2 = sum_h c[k, h] x_r^T inv[k] x_r`` over the arm's shared
    inverse ``inv`` (K, D, D), except with quality model selection (``selecting``), where
    the quality head's term reads its selected candidate's ``q_inv[k, q_sel[k]]``
    (``ArmStatistics.width_inverses``), unless that candidate ``sel[k]`` is ``same``, the
    one whose inverse is ``inv[k]``, and the head is in its arm's group (then one
    quadratic form serves every head); and a head split off its arm's group
    (``group[k, h]`` False, when ``group`` (K, H) is not empty), other than a selected
    quality head, reads its own ``a_inv[k, h]``. A sum of weights 0 skips its inverse
    (not read). Arm by arm, so each arm's inverses are read from memory once for all
    the rows."""
    k_arms, heads, d = theta.shape
    n = xb.shape[0]
    first = 1 if selecting else 0
    split = group.shape[0] > 0
    for k in range(k_arms):
        fold = selecting and sel[k] == same and not (split and not group[k, 0])
        scale = 0.0
        for h in range(first, heads):
            if not (split and not group[k, h]):
                scale += c[k, h]
        if fold:
            scale += c[k, 0]
        for r in range(n):
            x = xb[r]
            u = 0.0
            for h in range(heads):
                acc = 0.0
                for j in range(d):
                    acc += theta[k, h, j] * x[j]
                means[r, k, h] = acc
                u += acc * w[h]
            utility[r, k] = u
            var = scale * _quadratic(inv[k], x) if scale != 0.0 else 0.0
            if split:
                for h in range(first, heads):
                    if not group[k, h] and c[k, h] != 0.0:
                        var += c[k, h] * _quadratic(a_inv[k, h], x)
            if selecting and not fold and c[k, 0] != 0.0:
                var += c[k, 0] * _quadratic(q_inv[k, q_sel[k]], x)
            std[r, k] = math.sqrt(var) if var > 0.0 else 0.0


@njit(cache=True, nogil=True, fastmath=_FAST)
def add_quadratic_forms(inv: np.ndarray, x: np.ndarray, scale: np.ndarray,
                        var: np.ndarray) -> None:
    """``var[k] += scale[k] * x^T inv[k] x`` for symmetric inv (K, D, D); arms with scale
    0 are skipped (their inverse is not read)."""
    for k in range(inv.shape[0]):
        if scale[k] != 0.0:
            var[k] += scale[k] * _quadratic(inv[k], x)


@njit(cache=True, nogil=True)
def width_matrix(inv: np.ndarray, c: np.ndarray, sel_inv: np.ndarray, sel: np.ndarray,
                 c_sel: np.ndarray, out: np.ndarray) -> None:
    """The batch path's combined matrices, side by side: ``out[i, k D + j] = c[k]
    inv[k, i, j] + c_sel[k] sel_inv[k, sel[k], i, j]`` (D, K D), the second term only
    when ``sel_inv`` is not empty (the quality head's selected candidate, read in place:
    no copy into ``q_inv``); ``out`` float64, or float32 (rounded once at the end).

    The numpy reference's operations exactly (each product rounded, then the sum: no
    fast-math, so no fused multiply-add), written once into the layout of its
    ``(xb @ m)`` product, with no (K, D, D) temporaries."""
    k_arms, d, _ = inv.shape
    selecting = sel_inv.shape[0] > 0
    for k in range(k_arms):
        a = c[k]
        col = k * d
        if selecting:
            b = c_sel[k]
            q = sel_inv[k, sel[k]]
            for i in range(d):
                for j in range(d):
                    out[i, col + j] = a * inv[k, i, j] + b * q[i, j]
        else:
            for i in range(d):
                for j in range(d):
                    out[i, col + j] = a * inv[k, i, j]


@njit(cache=True, nogil=True, fastmath=_FAST, inline="always")
def _gain(p: np.ndarray, x: np.ndarray, weight: float, px: np.ndarray) -> float:
    """``px = P x`` (in place) and the Sherman-Morrison scale ``w / (1 + w x^T P x)``."""
    d = x.shape[0]
    for i in range(d):
        acc = 0.0
        for j in range(d):
            acc += p[i, j] * x[j]
        px[i] = acc
    xpx = 0.0
    for i in range(d):
        xpx += px[i] * x[i]
    return weight / (1.0 + weight * xpx)


@njit(cache=True, nogil=True, fastmath=_FAST, inline="always")
def _step(p: np.ndarray, a: np.ndarray, x: np.ndarray, weight: float, px: np.ndarray,
          scale: float, th: np.ndarray, err: np.ndarray, heads: np.ndarray, only: int,
          inv32: np.ndarray, k32: int, data: bool, q32: np.ndarray, kq: int) -> None:
    """One Sherman-Morrison step of an inverse ``p`` and its data matrix ``a`` (gain
    ``scale * px`` from :func:`_gain`), and of the coefficients ``th[h]`` of the heads
    that read them (``heads`` (H,) mask, or head ``only`` alone when >= 0);
    ``inv32[k32]`` (D, D), the inverse's float32 copy, written in the same loop as the
    step, from the value stored (none when ``k32`` < 0): a second loop over each row
    cost select's update at d=384 ~25 µs more of ~300 (a one-off ablation,
    docs/results.md "select's update at d=384"); the same numbers bit for bit. The
    data matrix's step ``a += w x x^T`` is left out when ``data`` is False (deferred:
    :func:`defer_data`). ``q32[kq]`` (when ``kq`` >= 0) is a second float32 copy
    written from the same values (the selected quality candidate's, when it is the
    group's: :func:`_update_candidates`), from each row's copy while it is in cache.
    """
    d = x.shape[0]
    copy = k32 >= 0
    for i in range(d):
        gi = scale * px[i]
        wxi = weight * x[i]
        if copy:
            row32 = inv32[k32, i]
            if data:
                for j in range(d):
                    v = p[i, j] - gi * px[j]
                    p[i, j] = v
                    row32[j] = v
                    a[i, j] += wxi * x[j]
            else:
                for j in range(d):
                    v = p[i, j] - gi * px[j]
                    p[i, j] = v
                    row32[j] = v
        elif data:
            for j in range(d):
                p[i, j] -= gi * px[j]
                a[i, j] += wxi * x[j]
        else:
            for j in range(d):
                p[i, j] -= gi * px[j]
        if kq >= 0:
            rowq = q32[kq, i]
            if copy:
                for j in range(d):
                    rowq[j] = row32[j]
            else:
                for j in range(d):
                    rowq[j] = p[i, j]
        if only >= 0:
            th[only, i] += err[only] * gi
        else:
            for h in range(heads.shape[0]):
                if heads[h]:
                    th[h, i] += err[h] * gi


@njit(cache=True, nogil=True, fastmath=_FAST)
def update_arm(k: int, x: np.ndarray, y: np.ndarray, weight: float, group: np.ndarray,
               s_inv: np.ndarray, s_data: np.ndarray, a_inv: np.ndarray,
               a_data: np.ndarray, theta: np.ndarray, b_data: np.ndarray,
               srr: np.ndarray, wsum: np.ndarray, count: np.ndarray, lam: np.ndarray,
               mu0: np.ndarray, sigma0: np.ndarray, sigma2: np.ndarray, nu0: float,
               inv32: np.ndarray, a_inv32: np.ndarray, sel_inv: np.ndarray,
               sel_theta: np.ndarray,
               sel_err: np.ndarray, sel: np.ndarray, q_stale: np.ndarray,
               same_stale: np.ndarray, q_inv32: np.ndarray, same: int,
               pend_x: np.ndarray, pend_w: np.ndarray, pend_n: np.ndarray) -> float:
    """Arm k's weighted Sherman-Morrison step for the heads reported in ``y`` (H,) (NaN:
    not reported), in place; returns the quality residual before it (NaN when quality
    is not reported).

    The same steps as the numpy path of ``ArmStatistics.update``, after its split:
    ``group[k]`` (H,) are the heads sharing ``s_inv[k]`` / ``s_data[k]``, all reported
    or none (the caller splits the unreported ones off first); the others have their own
    ``a_inv[k, h]`` / ``a_data[k, h]`` and are stepped one by one when reported. Each
    step: gain ``g = w A^-1 x / (1 + w x^T A^-1 x)``, ``A^-1 -= g (A^-1 x)^T``,
    ``A += w x x^T``, ``theta_h += (y_h - theta_h . x) g``; then for every reported
    head ``b_h += w y_h x`` and the sums, and every head's noise ``sigma^2`` from them
    (``ArmStatistics._update_sigma2``). ``inv32``: the float32 copy of every arm's
    shared inverse (K, D, D), kept equal to it; ``a_inv32``: the float32 copy of the
    heads' own inverses (K, H, D, D), each reported own head's kept equal to it; either
    empty when there is none.

    With quality model selection (``sel_inv`` (K, G, D, D) not empty) and quality
    reported: the numpy path's candidates step (:func:`_update_candidates`), after the
    quality head's own step (shared or its own inverse: the candidate ``same``, with the
    group's ridge, has the same matrix as either, since the split copies the shared
    one). Each candidate's prequential error on this observation before it is learned,
    one step per candidate, then the quality head takes the candidate of lowest error
    (the first on ties, as ``np.argmin``): its coefficients into ``theta[k, 0]``, its
    index into ``sel[k]``, and its inverse, not copied, is marked for
    ``ArmStatistics.q_inv`` to copy when read (``q_stale[k]``); its float32 copy
    ``q_inv32[k]`` (when not empty) is written in the candidate's own step. The
    candidate ``same`` is not stored while the quality head is in its arm's group: its
    inverse is ``s_inv[k]`` (``same_stale[k]`` set: ``ArmStatistics.sel_inv`` copies it
    when read; see :func:`_update_candidates`).

    With ``pend_x`` (K, M, D) not empty, the group's data matrix step ``s_data[k] +=
    w x x^T`` is deferred: x and w are kept in arm k's rows of ``pend_x`` / ``pend_w``
    (``pend_n[k]`` of them), and added M at a time (:func:`flush_data`, the same sums
    in the same order, so the same numbers bit for bit): ``s_data`` is read only by
    refreshes, merges, forgetting, serialization and the numpy paths, which flush first
    (``ArmStatistics.s_data``). Each rank-one step read and wrote the whole D x D
    matrix (at d=384 ~60 µs, bound by memory); M of them at once read it once.
    """
    th = theta[k]
    b = b_data[k]
    grp = group[k]
    d = x.shape[0]
    heads = y.shape[0]
    err = np.empty(heads)
    touched = False
    for h in range(heads):
        touched = touched or (y[h] == y[h] and grp[h])
        acc = 0.0
        for j in range(d):
            acc += th[h, j] * x[j]
        err[h] = y[h] - acc
    # A^-1 x of the shared inverse (row 0) and of the heads' own (row 1, head 0's last)
    px = np.empty((2, d))
    scale_group = 0.0
    scale_own = 0.0
    # The quality candidates' errors, each before its step (none depends on the heads'
    # steps), and the one selected: its float32 copy, when it is the group's candidate,
    # is written by the group's step.
    choosing = sel_inv.shape[0] > 0 and y[0] == y[0]
    errs = np.empty(sel_inv.shape[1])
    best = _candidate_errors(k, x, y[0], weight, sel_theta, sel_err, errs) if choosing else -1
    kq = k if choosing and grp[0] and best == same and q_inv32.shape[0] else -1
    if touched:
        scale_group = _gain(s_inv[k], x, weight, px[0])
        defer = pend_x.shape[0] > 0
        _step(s_inv[k], s_data[k], x, weight, px[0], scale_group, th, err, grp, -1,
              inv32, k if inv32.shape[0] else -1, not defer, q_inv32, kq)
        if defer:
            defer_data(k, x, weight, s_data, pend_x, pend_w, pend_n)
    own32 = a_inv32.shape[0] > 0
    for h in range(heads - 1, -1, -1):
        if y[h] == y[h] and not grp[h]:
            scale_own = _gain(a_inv[k, h], x, weight, px[1])
            _step(a_inv[k, h], a_data[k, h], x, weight, px[1], scale_own, th, err, grp,
                  h, a_inv32[k] if own32 else inv32, h if own32 else -1, True, q_inv32, -1)
    if choosing:
        _update_candidates(k, x, weight, px[0] if grp[0] else px[1],
                           scale_group if grp[0] else scale_own,
                           s_inv[k] if grp[0] else a_inv[k, 0], grp[0], same, sel_inv,
                           sel_theta, errs, best, th, sel, q_stale, same_stale, q_inv32)
    for h in range(heads):
        if y[h] == y[h]:
            wy = weight * y[h]
            for j in range(d):
                b[h, j] += wy * x[j]
            srr[k, h] += wy * y[h]
            wsum[k, h] += weight
            count[k, h] += 1
        # Penalized residual sum of squares from the sums (ArmStatistics._update_sigma2).
        lam_mu0 = lam[k, h] * mu0[k, h]
        bt = 0.0
        for j in range(d):
            bt += b[h, j] * th[h, j]
        rss = max(srr[k, h] + lam_mu0 * (mu0[k, h] - th[h, d - 1]) - bt, 0.0)
        sigma2[k, h] = (nu0 * sigma0[k, h] ** 2 + rss) / (nu0 + wsum[k, h])
    return err[0]


@njit(cache=True, nogil=True, fastmath=_FAST)
def flush_data(a: np.ndarray, xs: np.ndarray, ws: np.ndarray, n: int) -> None:
    """``a += sum_r ws[r] xs[r] xs[r]^T`` over the first n rows: for each entry the
    rank-one steps' terms ``(w_r x_ri) x_rj`` added in the rows' order, as n calls of
    :func:`_step` would add them (the same numbers bit for bit), one row of ``a`` at a
    time (it stays in cache for the n terms: ``a`` is read once, not n times)."""
    d = a.shape[0]
    for i in range(d):
        row = a[i]
        for r in range(n):
            c = ws[r] * xs[r, i]
            xr = xs[r]
            for j in range(d):
                row[j] += c * xr[j]


@njit(cache=True, nogil=True)
def defer_data(k: int, x: np.ndarray, weight: float, s_data: np.ndarray,
               pend_x: np.ndarray, pend_w: np.ndarray, pend_n: np.ndarray) -> None:
    """Keep arm k's data step ``s_data[k] += w x x^T`` for later (:func:`update_arm`);
    its M kept steps are added first when its rows are full."""
    n = pend_n[k]
    if n == pend_x.shape[1]:
        flush_data(s_data[k], pend_x[k], pend_w[k], n)
        n = 0
    pend_x[k, n] = x
    pend_w[k, n] = weight
    pend_n[k] = n + 1


@njit(cache=True, nogil=True)
def flush_all(s_data: np.ndarray, pend_x: np.ndarray, pend_w: np.ndarray,
              pend_n: np.ndarray) -> None:
    """Add every arm's kept data steps (:func:`defer_data`) and empty its rows."""
    for k in range(pend_n.shape[0]):
        if pend_n[k]:
            flush_data(s_data[k], pend_x[k], pend_w[k], pend_n[k])
            pend_n[k] = 0


@njit(cache=True, nogil=True, fastmath=_FAST, inline="always")
def _candidate_errors(k: int, x: np.ndarray, y0: float, weight: float,
                      sel_theta: np.ndarray, sel_err: np.ndarray, errs: np.ndarray) -> int:
    """Each quality candidate's error ``errs`` (G,) on this observation before its step,
    added (weighted, squared) to ``sel_err[k]``; the candidate of lowest error sum then
    (the first on ties, as ``np.argmin``)."""
    d = x.shape[0]
    best, best_err = 0, np.inf
    for g in range(errs.shape[0]):
        tg = sel_theta[k, g]
        e = y0
        for j in range(d):
            e -= tg[j] * x[j]
        errs[g] = e
        sel_err[k, g] += weight * e * e
        if sel_err[k, g] < best_err:
            best, best_err = g, sel_err[k, g]
    return best


@njit(cache=True, nogil=True, fastmath=_FAST)
def _update_candidates(k: int, x: np.ndarray, weight: float, px: np.ndarray,
                       scale0: float, shared: np.ndarray, grouped: bool, same: int,
                       sel_inv: np.ndarray, sel_theta: np.ndarray, errs: np.ndarray,
                       best: int, th: np.ndarray, sel: np.ndarray, q_stale: np.ndarray,
                       same_stale: np.ndarray, q_inv32: np.ndarray) -> None:
    """The candidates step of :func:`update_arm`, after the step of the inverse the
    quality head reads (``shared``: its group's, or its own ``a_inv[k, 0]`` when split
    off; now updated; ``px`` its A^-1 x before the step and ``scale0`` its gain's
    scale).

    The errors ``errs`` and the selection ``best`` come first (:func:`_candidate_errors`,
    in :func:`update_arm`: each candidate's own, before its step, so the same numbers as
    error-then-step per candidate): the selected candidate's float32 copy is written
    row by row in its step, not by a second pass.
    Candidate ``same`` has the quality head's ridge, hence the same matrix as ``shared``
    and the same step: its gain is the shared one's and its inverse is copied from it,
    unless ``shared`` is the group's ``s_inv[k]`` (``grouped``): then it is not copied
    at all (``same_stale[k]`` set; ``ArmStatistics.sel_inv`` copies it when read, and
    the compiled decides read ``s_inv`` for it: an arm that selected it folds its
    quality term into the group's); when selected, its float32 copy ``q_inv32[k]`` was
    written by the group's step. At d=384 the copy was ~46 µs of select's ~320 µs
    update (docs/results.md)."""
    d = x.shape[0]
    pc = np.empty(d)  # the other candidates' A^-1 x
    n_cand = sel_inv.shape[1]
    copy = q_inv32.shape[0] > 0
    for g in range(n_cand):
        p = sel_inv[k, g]
        tg = sel_theta[k, g]
        e = errs[g]
        if g == same:
            same_stale[k] = grouped
            if grouped:
                for i in range(d):
                    tg[i] += e * (scale0 * px[i])
                continue
            for i in range(d):
                if copy and g == best:
                    row32 = q_inv32[k, i]
                    for j in range(d):
                        v = shared[i, j]
                        p[i, j] = v
                        row32[j] = v
                else:
                    for j in range(d):
                        p[i, j] = shared[i, j]
                tg[i] += e * (scale0 * px[i])
            continue
        scale = _gain(p, x, weight, pc)
        for i in range(d):
            gi = scale * pc[i]
            if copy and g == best:
                row32 = q_inv32[k, i]
                for j in range(d):
                    v = p[i, j] - gi * pc[j]
                    p[i, j] = v
                    row32[j] = v
            else:
                for j in range(d):
                    p[i, j] -= gi * pc[j]
            tg[i] += e * gi
    th[0, :] = sel_theta[k, best]
    sel[k] = best
    q_stale[k] = True


# The normal CDF of the propensity integral from a table: cubic Hermite interpolation of
# Phi on a grid of step 1/128 over [-_Z_MAX, _Z_MAX] (values and derivatives exact, from
# scipy), error below 2e-11 (h^4 / 384 times the largest fourth derivative; the tests
# check 1e-10 against scipy's ndtr): several times cheaper than libm's erfc, which was
# most of a batch's propensities. Beyond the grid Phi is 0 or 1 within 1e-17. Each
# interval's cubic is stored as its 4 power coefficients in one row (Horner's rule: one
# 32-byte row read per value instead of 4 reads from 2 arrays, and 6 operations instead
# of ~15): 2x faster on a batch's propensities, the same cubic within 4e-16.
_Z_MAX = 8.5
_Z_STEP = 1.0 / 128.0


def _phi_table() -> np.ndarray:
    """(nodes, 4): on [z_i, z_i + step) at fraction f, Phi = c0 + f (c1 + f (c2 + f c3))
    (the Hermite cubic of Phi and step x density at both ends)."""
    from scipy.special import ndtr

    z = np.arange(-_Z_MAX, _Z_MAX + 2 * _Z_STEP, _Z_STEP)
    phi, dphi = ndtr(z), _Z_STEP * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    coef = np.zeros((z.shape[0], 4))
    coef[:, 0], coef[:, 1] = phi, dphi
    coef[:-1, 2] = 3.0 * (phi[1:] - phi[:-1]) - 2.0 * dphi[:-1] - dphi[1:]
    coef[:-1, 3] = 2.0 * (phi[:-1] - phi[1:]) + dphi[:-1] + dphi[1:]
    return coef


_PHI = _phi_table()


@njit(cache=True, nogil=True, inline="always")
def _ndtr(z: float, phi: np.ndarray) -> float:
    """Phi(z) by cubic Hermite interpolation of the table."""
    if z <= -_Z_MAX:
        return 0.0
    if z >= _Z_MAX:
        return 1.0
    return _hermite((z + _Z_MAX) * 128.0, phi)


@njit(cache=True, nogil=True, inline="always")
def _hermite(t: float, phi: np.ndarray) -> float:
    """The table's interpolant at position t in [0, 2 * _Z_MAX * 128) (in steps)."""
    i = int(t)
    f = t - i
    return phi[i, 0] + f * (phi[i, 1] + f * (phi[i, 2] + f * phi[i, 3]))


def normal_cdf(z: np.ndarray) -> np.ndarray:
    """The kernel's normal CDF on an array (for the tests)."""
    return _normal_cdf(np.ascontiguousarray(z, dtype=np.float64).ravel(),
                       _PHI).reshape(np.shape(z))


@njit(cache=True, nogil=True)
def _normal_cdf(z: np.ndarray, phi: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    for i in range(z.shape[0]):
        out[i] = _ndtr(z[i], phi)
    return out


# A node whose product of the competitors' CDFs falls below this adds less than 1e-15
# to the propensity: neither its remaining factors (each <= 1) nor the lower nodes
# (smaller still) are computed; together at most nodes x 1e-15.
_NEGLIGIBLE = 1e-15


def thompson_propensities(utility: np.ndarray, s: np.ndarray, choices: np.ndarray,
                          quantiles: np.ndarray, prune_sigmas: float) -> np.ndarray:
    """P(arm ``choices[r]`` draws the largest sample) per row r (n,): the midpoint rule
    over the chosen arm's ``quantiles`` of ``E prod_{i != j} Phi((u - u_i) / s_i)``, as
    ``LinearThompson._main_propensity`` computes it in numpy (the same pruning of arms
    ``prune_sigmas`` below the lowest node; an arm with no spread is a step function;
    a chosen arm with utility -inf has propensity 0)."""
    out = np.empty(utility.shape[0])
    _thompson_propensities(np.ascontiguousarray(utility), np.ascontiguousarray(s),
                           np.ascontiguousarray(choices, dtype=np.intp), quantiles,
                           prune_sigmas, _PHI, out)
    return out


@njit(cache=True, nogil=True, fastmath=_FAST)
def _thompson_propensities(utility: np.ndarray, s: np.ndarray, choices: np.ndarray,
                           quantiles: np.ndarray, prune_sigmas: float, phi: np.ndarray,
                           out: np.ndarray) -> None:
    n, k_arms = utility.shape
    nodes = quantiles.shape[0]
    prod = np.empty(nodes)  # the integrand at each node, one competitor at a time
    table_end = 2.0 * _Z_MAX * 128.0
    for r in range(n):
        j = choices[r]
        mu_j = utility[r, j]
        if not math.isfinite(mu_j):
            out[r] = 0.0
            continue
        s_j = s[r, j]
        low = mu_j + s_j * quantiles[0]
        prod[:] = 1.0
        # Nodes below ``bottom`` are negligible already (the integrand rises with the
        # node, and every further factor is <= 1): neither they nor, once all are, the
        # remaining competitors are computed.
        bottom = 0
        for i in range(k_arms):
            # The competitors of this row: every other arm that can reach the lowest node
            # (the numpy reference's pruning) and whose CDF is not 1 there already (then
            # it is 1 at every node: the nodes only rise).
            if i == j or utility[r, i] + prune_sigmas * s[r, i] < low:
                continue
            s_i = s[r, i]
            if s_i > 0.0:
                if (low - utility[r, i]) / s_i >= _Z_MAX:
                    continue
                # The table position of z = (u_q - mu_i) / s_i, linear in the node's
                # quantile: one multiply-add per node. (The loop stays scalar: LLVM
                # does not gather the table rows on this CPU, znver4; ~2 ns per node
                # and competitor, ~390 of them per decide in benchmarks/decide_alone.)
                inv = 128.0 / s_i
                t0 = (mu_j - utility[r, i]) * inv + _Z_MAX * 128.0
                t1 = s_j * inv
                # t rises with the node (t1 >= 0): the nodes below the table (Phi 0),
                # those above it (Phi 1: left as they are), and between them the table,
                # in a loop without branches.
                lo = bottom
                while lo < nodes and t0 + t1 * quantiles[lo] <= 0.0:
                    prod[lo] = 0.0
                    lo += 1
                hi = nodes
                while hi > lo and t0 + t1 * quantiles[hi - 1] >= table_end:
                    hi -= 1
                for q in range(lo, hi):
                    prod[q] *= _hermite(t0 + t1 * quantiles[q], phi)
            else:
                # An arm with no spread is a step function.
                for q in range(bottom, nodes):
                    diff = mu_j + s_j * quantiles[q] - utility[r, i]
                    if diff < 0.0:
                        prod[q] = 0.0
                    elif diff == 0.0:
                        prod[q] *= 0.5
            while bottom < nodes and prod[bottom] < _NEGLIGIBLE:
                bottom += 1
            if bottom == nodes:
                break
        # From the highest node down, up to the first negligible one (as the reference).
        total = 0.0
        for q in range(nodes - 1, bottom - 1, -1):
            if prod[q] < _NEGLIGIBLE:
                break
            total += prod[q]
        out[r] = total / nodes


@njit(cache=True, nogil=True, fastmath=_FAST, inline="always")
def _dots(th: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """``out[h] = th[h] . x`` for th (H, D): the policies' three heads in one pass over x
    (each x_i read once for the three; three loops of 65 cost ~0.4 µs more per decide
    at d=64, K=16: decide10's timing)."""
    d = x.shape[0]
    if th.shape[0] == 3:
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        for i in range(d):
            xi = x[i]
            a0 += th[0, i] * xi
            a1 += th[1, i] * xi
            a2 += th[2, i] * xi
        out[0], out[1], out[2] = a0, a1, a2
        return
    for h in range(th.shape[0]):
        acc = 0.0
        for i in range(d):
            acc += th[h, i] * x[i]
        out[h] = acc


# Rules of the main branch :func:`decide_rows` computes (the policies' ``_score``).
RULE_UCB = 0  # LinUCB: min(u + alpha * std, max(ceiling, u))
RULE_THOMPSON = 1  # LinearThompson: u + scale * std * noise


@njit(cache=True, nogil=True, fastmath=_FAST)
def decide_rows(theta: np.ndarray, xb: np.ndarray, w: np.ndarray, sigma2: np.ndarray,
                inv: np.ndarray, q_inv: np.ndarray, q_sel: np.ndarray, selecting: bool,
                sel: np.ndarray, same: int, group: np.ndarray, a_inv: np.ndarray,
                arms: np.ndarray, level: float, estimate: np.ndarray, factor: np.ndarray,
                bounded: bool, rule: int, param: float, noise: np.ndarray, forced: np.ndarray,
                epsilon: float, quantiles: np.ndarray, prune_sigmas: float,
                want_propensity: bool, phi: np.ndarray,
                means: np.ndarray, table: np.ndarray, choices: np.ndarray,
                propensity: np.ndarray, explored: np.ndarray) -> None:
    """A whole decide of the contexts xb (n, D) over the candidates ``arms`` (m,) in one
    call, when no candidate is cold among warm ones: the numpy path of
    ``Policy.decide_batch`` from the predictions to the propensities, the same
    operations in the same order (sums reassociated).

    Per row and candidate: head means (``level`` added to quality), utility, its std
    (``w_h^2 sigma2_h`` per head over the shared inverse ``inv``, the quality head over
    its selected candidate's ``q_inv[k, q_sel[k]]`` when ``selecting``, or over ``inv``
    when that candidate ``sel[k]`` is ``same`` and the head is in its arm's group
    (:func:`predict_width`); a head split off its arm's group (``group[k, h]`` False,
    when ``group`` (K, H) is not empty: outcomes reported in pieces) over its own
    ``a_inv[k, h]`` (K, H, D, D), unless it is the selected quality head; the cost
    head's term left out
    when ``estimate`` (n, m) is not empty: the predicted cost is then the estimate times
    ``factor`` (K,)), the quality ceiling (+inf unless ``bounded``), the main branch's
    score (``rule``, ``param``: alpha or scale; Thompson's standard normal ``noise``
    (n, m) drawn by the caller), the choice (``forced[r]`` >= 0: the caller's uniform
    draw, else the score's argmax), whether it differs from the utility's argmax, and
    ``epsilon / m + (1 - epsilon) * p_main`` (NaN unless ``want_propensity``).

    Outputs: ``means`` (n, m, H) in head units; ``table`` (n, m, 6) per candidate
    quality, cost, latency in ms, utility, std and score (``Prediction``'s fields);
    ``choices``, ``propensity``, ``explored`` (n,).
    """
    n = xb.shape[0]
    m = arms.shape[0]
    heads = theta.shape[1]
    first = 1 if selecting else 0
    priced = estimate.shape[0] > 0
    split = group.shape[0] > 0
    dots = np.empty(heads)
    for r in range(n):
        x = xb[r]
        best_u, best_s = 0, 0
        for j in range(m):
            k = arms[j]
            u = 0.0
            scale = 0.0
            own = 0.0  # the terms of heads split off their arm's group
            _dots(theta[k], x, dots)
            for h in range(heads):
                acc = dots[h]
                if h == 0:
                    acc += level
                elif h == 1 and priced:
                    acc = estimate[r, j] * factor[k]
                means[r, j, h] = acc
                table[r, j, h] = acc * 1e3 if h == 2 else acc
                u += acc * w[h]
                if h >= first and not (h == 1 and priced):
                    ch = w[h] * w[h] * sigma2[k, h]
                    if split and not group[k, h]:
                        if ch != 0.0:
                            own += ch * _quadratic(a_inv[k, h], x)
                    else:
                        scale += ch
            table[r, j, 3] = u
            c0 = w[0] * w[0] * sigma2[k, 0]
            fold = selecting and sel[k] == same and not (split and not group[k, 0])
            if fold:
                scale += c0
            var = scale * _quadratic(inv[k], x) if scale != 0.0 else 0.0
            var += own
            if selecting and not fold and c0 != 0.0:
                var += c0 * _quadratic(q_inv[k, q_sel[k]], x)
            sd = math.sqrt(var) if var > 0.0 else 0.0
            table[r, j, 4] = sd
            if rule == RULE_UCB:
                gap = 1.0 - means[r, j, 0]
                ceiling = u + w[0] * (0.0 if gap < 0.0 else gap) if bounded else np.inf
                top = u + param * sd
                cap = ceiling if ceiling > u else u
                sc = top if top < cap else cap
            else:
                sc = u + param * sd * noise[r, j]
            table[r, j, 5] = sc
            if sc > table[r, best_s, 5]:
                best_s = j
            if u > table[r, best_u, 3]:
                best_u = j
        c = forced[r] if forced[r] >= 0 else best_s
        choices[r] = c
        explored[r] = c != best_u
        if not want_propensity:
            propensity[r] = np.nan
            continue
        if rule == RULE_UCB:
            p_main = 1.0 if c == best_s else 0.0
        else:
            s = np.empty((1, m))
            for j in range(m):
                s[0, j] = param * table[r, j, 4]
            one = np.empty(1)
            ur = np.empty((1, m))
            for j in range(m):
                ur[0, j] = table[r, j, 3]
            _thompson_propensities(ur, s, choices[r:r + 1], quantiles,
                                   prune_sigmas, phi, one)
            p_main = one[0]
        propensity[r] = epsilon / m + (1.0 - epsilon) * p_main


@njit(cache=True, nogil=True, inline="always")
def _decide_one(theta: np.ndarray, xb: np.ndarray, w: np.ndarray, sigma2: np.ndarray,
                inv: np.ndarray, q_inv: np.ndarray, q_sel: np.ndarray, selecting: bool,
                sel: np.ndarray, same: int, group: np.ndarray, a_inv: np.ndarray,
                arms: np.ndarray, level: float, estimate: np.ndarray, factor: np.ndarray,
                bounded: bool, rule: int, param: float, noise: np.ndarray, forced: int,
                epsilon: float, quantiles: np.ndarray, prune_sigmas: float,
                ) -> tuple[int, float, bool, np.ndarray]:
    """:func:`decide_rows` of one context xb (1, D) with propensity (``Policy.decide``):
    the choice, its propensity, whether it explored, and the table row (m, 6); ``forced``
    the uniform draw's candidate or -1. Its outputs are allocated here and the normal
    CDF table is the module's: 7 arrays fewer to pass from Python than to decide_rows,
    none to allocate there (each array argument costs ~0.1 µs to unbox, each np.empty
    ~0.2 µs: ~2 µs of a ~20 µs decide), and scalars back instead of 1-element arrays.
    Inlined into :func:`decide_one` and :func:`decide_one_split` (numba IR), so each
    calls :func:`decide_rows` directly: one more level of compiled calls would link and
    optimize decide_rows once more when the cache is cold (seconds)."""
    m = arms.shape[0]
    means = np.empty((1, m, theta.shape[1]))
    table = np.empty((1, m, 6))
    choices = np.empty(1, dtype=np.intp)
    propensity = np.empty(1)
    explored = np.empty(1, dtype=np.bool_)
    row = np.empty(1, dtype=np.intp)
    row[0] = forced
    decide_rows(theta, xb, w, sigma2, inv, q_inv, q_sel, selecting, sel, same, group,
                a_inv, arms, level, estimate, factor, bounded, rule, param, noise, row,
                epsilon, quantiles, prune_sigmas, True, _PHI, means, table, choices,
                propensity, explored)
    return choices[0], propensity[0], explored[0], table[0]


@njit(cache=True, nogil=True)
def decide_one_split(theta: np.ndarray, xb: np.ndarray, w: np.ndarray, sigma2: np.ndarray,
                     inv: np.ndarray, q_inv: np.ndarray, q_sel: np.ndarray,
                     selecting: bool, sel: np.ndarray, same: int, group: np.ndarray,
                     a_inv: np.ndarray, arms: np.ndarray, level: float,
                     estimate: np.ndarray, factor: np.ndarray, bounded: bool, rule: int,
                     param: float, noise: np.ndarray, forced: int, epsilon: float,
                     quantiles: np.ndarray, prune_sigmas: float,
                     ) -> tuple[int, float, bool, np.ndarray]:
    """:func:`_decide_one` when some head is split off its arm's group (``group``,
    ``a_inv``: see :func:`decide_rows`)."""
    return _decide_one(theta, xb, w, sigma2, inv, q_inv, q_sel, selecting, sel, same,
                       group, a_inv, arms, level, estimate, factor, bounded, rule, param,
                       noise, forced, epsilon, quantiles, prune_sigmas)


@njit(cache=True, nogil=True)
def decide_one(theta: np.ndarray, xb: np.ndarray, w: np.ndarray, sigma2: np.ndarray,
               inv: np.ndarray, q_inv: np.ndarray, q_sel: np.ndarray, selecting: bool,
               sel: np.ndarray, same: int, arms: np.ndarray, level: float,
               estimate: np.ndarray, factor: np.ndarray, bounded: bool, rule: int,
               param: float, noise: np.ndarray, forced: int, epsilon: float,
               quantiles: np.ndarray, prune_sigmas: float,
               ) -> tuple[int, float, bool, np.ndarray]:
    """:func:`_decide_one` when every head of every arm is in its arm's group: the empty
    head groups and own inverses are made here, two array arguments fewer to unbox per
    call (~0.3 µs of a ~12 µs decide). Not module constants: numba types those as
    read-only arrays, which would compile :func:`decide_rows` a second time."""
    return _decide_one(theta, xb, w, sigma2, inv, q_inv, q_sel, selecting, sel, same,
                       np.empty((0, 3), dtype=np.bool_), np.empty((0, 3, 1, 1)), arms,
                       level, estimate, factor, bounded, rule, param, noise, forced,
                       epsilon, quantiles, prune_sigmas)


#: The normal CDF table :func:`decide_rows` takes (``phi``).
PHI_TABLE = _PHI
