"""The one-pass kernel of :class:`bandit.featurize.HashingFeaturizer` (numba): the
vectors of :mod:`bandit._hashing_kernel`, bit for bit, 1.5-1.8x faster
(``benchmarks/featurize_speed.py``; docs/results.md, "Featurizing text").

:func:`featurize_one` takes the arguments of ``_hashing_kernel.featurize_one`` and
writes the identical vector (every bit: the same n-grams, hashes, weights and the same
floating point operations in the same order; ``tests/bandit/test_featurize.py`` holds
it to equality on generated and real texts). The earlier kernel stays as that
specification and as the benchmark's baseline (``benchmarks/featurize_speed.py``).
Where the earlier kernel's time went, per 2,000 characters (~6,000 character n-grams,
~3,000 distinct), and what this one does instead:

* adding each distinct n-gram's 4 signed weights branched on the sign (a hash bit): a
  mispredicted branch about every other addition. Here the sign multiplies
  (``w * ±1.0`` is exact, and ``x + (-w)`` is ``x - w`` in IEEE arithmetic);
* counting distinct n-grams branched on "new or seen" (as unpredictable) and kept keys
  and counts in two arrays. Here a slot is (key, count), 16 bytes together, the probe
  test is one branch taken only on a collision (:func:`_insert`) and the first-seen
  list grows without a branch;
* the n-gram hashes went through an array between hashing and counting, and the text
  was scanned twice (collapsing whitespace, then finding words). Here each n-gram is
  counted as it is hashed, and one scan collapses whitespace and computes each word's
  CRC-32 as its characters go by.

The n-grams are still counted in the earlier kernel's order (all n-grams of the
smallest n, left to right, then the next n), which fixes the order of every sum.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba.extending import intrinsic

from bandit._hashing_kernel import (
    _LOG1P,
    _SPACE,
    _WORD,
    _mix64,
    crc_code_point,
    normalize,
    project_dense,
    unit_weights,
)

_U64 = np.uint64
_U32 = np.uint32
_PHI = _U64(0x9E3779B97F4A7C15)


@intrinsic
def _opaque(typingctx, x):
    """``x`` through an empty inline assembly statement: the compiler must compute it
    as a value and cannot see what it is. :func:`_insert` needs it to keep its probe
    test one branch."""
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(args[0].type, [args[0].type])
        return builder.asm(fnty, "", "=r,0", [args[0]], side_effect=False, name="opaque")
    return x(x), codegen


@njit(cache=True, nogil=True, inline="always")
def _insert(table, mask, bits, first, m, key):
    """Count ``key`` in the open-addressing ``table`` ((size, 2): key, count; count 0
    marks an empty slot); a new key's slot is appended to ``first``. Returns the new
    number of distinct keys.

    A probe goes on while the slot holds another key: ``(slot key ^ key) & taken``
    with ``taken`` all ones for a used slot. Written as ``used and different``, LLVM
    compiles two branches, the first (is the slot used, i.e. is the key already
    counted) as unpredictable as the text: about half of all n-grams paid a
    mispredicted branch. Behind :func:`_opaque` the test is one branch, taken only on
    a collision (under 10% of probes at the table's load)."""
    s = (key * _PHI) >> _U64(64 - bits)
    c = table[s, 1]
    while _opaque((table[s, 0] ^ key) & (_U64(0) - _U64(c != 0))) != _U64(0):
        s = (s + _U64(1)) & mask
        c = table[s, 1]
    table[s, 0] = key
    table[s, 1] = c + _U64(1)
    first[m] = s
    return m + np.int64(c == 0)


@njit(cache=True, nogil=True)
def _count_ngrams(units, count, low, high, salts):
    """The distinct salted polynomial hashes of the n-grams of ``units[:count]``, n in
    low..high, in order of first occurrence in the earlier kernel's order (n by n, left
    to right), and how often each occurs: ``_hashing_kernel._ngram_hashes`` followed by
    the counting half of ``_distinct``, without the array of all the hashes. Returns
    the table and the slots of the distinct keys in that order."""
    total = 0
    for n in range(low, high + 1):
        total += max(count - n + 1, 0)
    size = 2
    bits = 1
    while size < 2 * total:
        size *= 2
        bits += 1
    table = np.zeros((size, 2), dtype=np.uint64)
    mask = _U64(size - 1)
    first = np.empty(total + 1, dtype=np.int64)
    m = 0
    h = units[:count].copy()  # h[i]: the n-gram at i, extended by one unit per n
    for n in range(1, min(high, count) + 1):
        salt = salts[n - low] if n >= low else _U64(0)
        if n == 1:
            if n >= low:
                for i in range(count):
                    m = _insert(table, mask, bits, first, m, h[i] ^ salt)
            continue
        last = count - n + 1
        if n >= low:
            for i in range(last):
                h[i] = h[i] * _PHI + units[i + n - 1]
                m = _insert(table, mask, bits, first, m, h[i] ^ salt)
        else:
            for i in range(last):
                h[i] = h[i] * _PHI + units[i + n - 1]
    return table, first[:m]


@njit(cache=True, nogil=True)
def _weights(table, first, log1p):
    """``_hashing_kernel._distinct``'s second half, the same operations in the same
    order: the keys at the slots ``first`` of ``table`` mixed, ``log1p(count)``
    weights scaled to unit norm."""
    mixed = np.empty(first.size, dtype=np.uint64)
    counts = np.empty(first.size, dtype=np.uint64)
    for i in range(first.size):
        mixed[i] = _mix64(table[first[i], 0])
        counts[i] = table[first[i], 1]
    return mixed, unit_weights(counts, log1p)


@njit(cache=True, nogil=True)
def _add_sparse(keys, weights, nnz, out):
    """``_hashing_kernel._add_family_sparse`` after ``_distinct``, without a branch on
    the sign: ``out[k] += w * sign`` (sign ±1.0, exact) is its ``out[k] -= w`` or
    ``out[k] += w``."""
    dim = _U64(out.size)
    scale = 1.0 / np.sqrt(nnz)
    if nnz == 4:  # the default, unrolled
        for i in range(keys.size):
            h = keys[i]
            w = weights[i] * scale
            h2 = _mix64(h + _PHI)
            _add_signed(out, h & _U64(0xFFFFFFFF), dim, w)
            _add_signed(out, h >> _U64(32), dim, w)
            _add_signed(out, h2 & _U64(0xFFFFFFFF), dim, w)
            _add_signed(out, h2 >> _U64(32), dim, w)
        return
    for i in range(keys.size):
        h = keys[i]
        w = weights[i] * scale
        word = h
        for j in range(nnz):
            if j > 1 and j % 2 == 0:
                word = _mix64(h + _U64(j // 2) * _PHI)
            _add_signed(out, (word >> _U64(32 * (j % 2))) & _U64(0xFFFFFFFF), dim, w)


@njit(cache=True, nogil=True, inline="always")
def _add_signed(out, bits, dim, w):
    """One entry of the sparse projection: 32 hash ``bits`` pick the coordinate
    (multiply-shift) and the sign (bit 0)."""
    out[np.int64(((bits >> _U64(1)) * dim) >> _U64(31))] += \
        w * (1.0 - 2.0 * np.float64(bits & _U64(1)))


@njit(cache=True, nogil=True)
def _add(units, count, low, high, salts, n_buckets, projection, nnz, out):
    """One family's n-grams of ``units[:count]`` into ``out`` (nothing for no n-grams)."""
    if count - low + 1 <= 0:
        return
    mixed, weights = _weights(*_count_ngrams(units, count, low, high, salts), _LOG1P)
    if nnz:
        _add_sparse(mixed, weights, nnz, out)
    else:
        project_dense(mixed, weights, n_buckets, projection, out)


@njit(cache=True, nogil=True)
def featurize_one(raw, classes, projection, n_buckets, nnz, chars, char_salts, words,
                  word_salts, crc_table, out):
    """Write the unit vector of one (already lowercased) text into ``out``: the
    arguments and the result of ``_hashing_kernel.featurize_one``, bit for bit."""
    out[:] = 0.0
    codes = np.empty(raw.size + 2, dtype=np.uint64)
    word_crcs = np.empty(raw.size // 2 + 1, dtype=np.uint64)
    codes[0] = 32
    n = 1
    nw = 0
    gap = 0
    in_word = 0
    crc = _U32(0xFFFFFFFF)
    # No branch on the text: a word's end or a whitespace run is as unpredictable as
    # the text, so each character writes unconditionally and advances counters.
    for i in range(raw.size):
        cp = raw[i]
        cls = classes[cp]
        space = np.int64(cls & _SPACE)
        word = np.int64((cls & _WORD) >> 1)
        # Whitespace runs become one space, written only before the next non-space
        # (none at the ends): the reference's " ".join(text.split()), padded.
        codes[n] = 32
        n += gap & (1 - space)
        codes[n] = cp
        n += 1 - space
        gap = space & np.int64(n > 1)
        # Words are runs of \w characters (never whitespace: char_classes). The CRC-32
        # so far is stored at every character and counted when a word has just ended;
        # it then goes on from its state inside a word, afresh outside one.
        word_crcs[nw] = crc ^ _U32(0xFFFFFFFF)
        nw += in_word & (1 - word)
        # 32 ones inside a word (numba widens uint32 arithmetic: no ~ or 0 - 1 here).
        inside = _U32(0xFFFFFFFF) * _U32(in_word)
        crc = crc_code_point((crc & inside) | (_U32(0xFFFFFFFF) ^ inside), _U32(cp),
                              crc_table)
        in_word = word
    word_crcs[nw] = crc ^ _U32(0xFFFFFFFF)
    nw += in_word
    if n > 1:
        codes[n] = 32
        n += 1
        if chars[1] > 0:
            _add(codes, n, chars[0], chars[1], char_salts, n_buckets, projection, nnz, out)
        if words[1] > 0:
            _add(word_crcs, nw, words[0], words[1], word_salts, n_buckets, projection,
                 nnz, out)
    normalize(out)
