"""The compiled kernels of :class:`bandit.featurize.HashingFeaturizer` (numba): the
one-pass kernel the featurizer runs (:func:`featurize_onepass`) and the earlier kernel
(:func:`featurize_one`), whose vectors the one-pass kernel gives bit for bit.

Both kernels and every jitted helper they call live in this one file on purpose:
numba's ``cache=True`` decides whether a cached compilation is stale from the source
file of the function it compiled (its modification time and size), not from the files
of the helpers it inlined or called. With the one-pass kernel in a second file that
imported ``_mix64``, ``crc_code_point`` and friends from here, an edit of a helper
recompiled the earlier kernel but left the one-pass kernel's cached machine code as it
was: the two then gave different vectors without any error.
(``tests/bandit/test_featurize.py`` checks that every jitted function the kernels
reach is defined here.)

The earlier kernel
------------------
It computes, for one text, exactly what the numpy reference in ``bandit.featurize``
computes (``HashingFeaturizer._hashed`` and the projection): the same n-grams, the same
64-bit hashes, the same sublinear weights and buckets; only the order of the floating
point sums differs, so the vectors agree to ~1e-15 (the tests hold it to 1e-12 on
random and real texts, unicode included). What it saves is the reference's ~40 numpy
calls and temporary arrays per text: one call, no Python per n-gram or per word. It
stays as the one-pass kernel's specification (the tests compare the bits), as the
benchmark's baseline, and as the kernel for texts over 50,000 characters and for a
machine where the one-pass kernel does not compile (``HashingFeaturizer``).

Version 1's cost is memory: every distinct n-gram adds one 512-byte row of the 8 MiB
projection matrix (``n_buckets`` x ``dim`` float64), about 20 ns per row from the L3
cache here, ~35 µs per 1,000 characters whatever the hashing costs. Version 2 adds to
4 coordinates per n-gram instead (no matrix), which leaves the hashing and the counting
of distinct n-grams: those count raw polynomial hashes and mix only the distinct ones.

Python's own definitions are kept where the reference uses them: whitespace is
``str.isspace`` (what ``str.split()`` splits on) and a word character is what the
regex ``\\w`` matches, both read from a table over all code points built once with
numpy's string functions (which use the same Unicode database as ``str``).

The one-pass kernel
-------------------
1.5-1.8x faster than the earlier kernel on texts up to ~30,000 characters
(``benchmarks/featurize_speed.py``; docs/results.md, "Featurizing text"); no faster at
50,000-100,000 and slower beyond (0.48x at 300,000 on real prompts, ``--long``), so
the featurizer sends texts over 50,000 characters to the earlier kernel.
:func:`featurize_onepass` takes the arguments of :func:`featurize_one` and writes the
identical vector (every bit: the same n-grams, hashes, weights and the same floating
point operations in the same order; ``tests/bandit/test_featurize.py`` holds it to
equality on generated and real texts).
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

Then (issue 19, second round; ~1.3x at 500-2,000 characters, the same bits) the work
that does not depend on the order moved out of the loops that do, into loops of
independent arithmetic that LLVM vectorizes (AVX-512 here): each n's keys and home
slots before its inserts (:func:`_count_ngrams`), and each distinct n-gram's 4
coordinates and signed weights before the additions (:func:`_add_counted_sparse4`).
What is left in order is the inserts (~22 instructions each), the sum of the squared
weights (a chain of dependent additions) and the additions to ``out`` (loads, an
addition and a store each). Measured at 2,000 characters, in the kernel (~45 µs):
counting both families' n-grams ~22 µs (memset of the table included), the scan
(whitespace, words' CRC-32) ~6, the additions ~9, the coordinates ~5, the weights ~3.

Version 3
---------
:func:`featurize_damped` with ``nnz`` 2 (opt-in, issue 19, third round: ~1.6x faster
than the one-pass kernel at 500-2,000 characters) gives other vectors, by design: the
same scan and n-gram keys, but no list of distinct n-grams. The ``log1p(count)`` weights
come as increments, each occurrence's read from a keyless uint8 counter table
(:func:`_add_damped`), and each occurrence adds to 2 coordinates. Its specification is
``HashingFeaturizer._reference_v3`` (tests: to 1e-12).

Version 4
---------
:func:`featurize_damped` with ``nnz`` 4 (opt-in, issue 19, fourth round): version 3's
counting and increments with version 2's 4 coordinates and signs per n-gram (each
occurrence adds to all 4) and version 2's normalization (each family by 1/sqrt of its
sum of squared ``log1p(count)`` weights, summed as squared increments): the cosines
follow version 2's (Spearman ~0.995, ``benchmarks/hashing_fidelity.py``) where version
3's did not (~0.72: its 2 coordinates are half of version 2's projection). The 4
additions per occurrence, with v3's layout, cost what the counting saved; here the sign
is folded into the coordinate (a ``2 * dim`` accumulator: positives, then negatives) and
the 4 coordinates are packed in one uint64, so an addition is one load of ``acc``, an
addition and a store. Its specification is ``HashingFeaturizer._reference_v3`` too.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit
from numba.extending import intrinsic

_U64 = np.uint64
_SPACE = np.uint8(1)
_WORD = np.uint8(2)
#: log1p of the small counts, looked up instead of computed (most n-grams occur once).
_LOG1P = np.log1p(np.arange(64, dtype=np.float64))


@functools.cache
def char_classes() -> np.ndarray:
    """uint8 per code point (0..0x10FFFF): bit 0 = ``str.isspace``, bit 1 = ``\\w``.

    >>> c = char_classes()
    >>> int(c[ord(" ")]), int(c[ord("a")]), int(c[ord("_")]), int(c[ord("-")])
    (1, 2, 2, 0)
    """
    chars = np.arange(0x110000, dtype=np.uint32).view("U1")
    word = np.char.isalnum(chars) | (chars == "_")
    space = np.char.isspace(chars)
    table = (space * _SPACE + word * _WORD).astype(np.uint8)
    table.flags.writeable = False
    return table


@functools.cache
def crc32_table() -> np.ndarray:
    """zlib's CRC-32 (reflected polynomial 0xEDB88320) byte table."""
    table = np.empty(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table[i] = c
    return table


@njit(cache=True, nogil=True, inline="always")
def _mix64(h):
    # splitmix64's finalizer, as bandit.featurize._mix64.
    h = (h ^ (h >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> _U64(27))) * _U64(0x94D049BB133111EB)
    return h ^ (h >> _U64(31))


@njit(cache=True, nogil=True, inline="always")
def _crc_byte(c, byte, table):
    return table[(c ^ byte) & np.uint32(0xFF)] ^ (c >> np.uint32(8))


@njit(cache=True, nogil=True, inline="always")
def crc_code_point(c, cp, table):
    """zlib's CRC-32 state ``c`` extended by the UTF-8 bytes of code point ``cp``."""
    if cp < 0x80:
        return _crc_byte(c, cp, table)
    if cp < 0x800:
        tail, lead = 1, np.uint32(0xC0) | (cp >> np.uint32(6))
    elif cp < 0x10000:
        tail, lead = 2, np.uint32(0xE0) | (cp >> np.uint32(12))
    else:
        tail, lead = 3, np.uint32(0xF0) | (cp >> np.uint32(18))
    c = _crc_byte(c, lead, table)
    for k in range(tail - 1, -1, -1):
        c = _crc_byte(c, np.uint32(0x80) | ((cp >> np.uint32(6 * k)) & np.uint32(0x3F)),
                      table)
    return c


@njit(cache=True, nogil=True)
def _crc32_utf8(codes, start, end, table):
    """zlib.crc32 of the UTF-8 encoding of code points ``codes[start:end]``."""
    c = np.uint32(0xFFFFFFFF)
    for i in range(start, end):
        c = crc_code_point(c, np.uint32(codes[i]), table)
    return c ^ np.uint32(0xFFFFFFFF)


@njit(cache=True, nogil=True)
def _ngram_hashes(units, count, low, high, salts):
    """The polynomial hash of every n-gram of ``units[:count]`` ^ the salt of n, n in
    low..high: bandit.featurize's ``_char_hashes`` / ``_word_hashes`` before their
    ``mix64`` (a bijection, so :func:`_distinct` counts these and mixes only the distinct
    ones), in another order, which only changes the order of the sums."""
    offsets = np.zeros(high + 2, dtype=np.int64)  # where the n-grams of each n start
    for n in range(low, high + 1):
        offsets[n + 1] = offsets[n] + max(count - n + 1, 0)
    out = np.empty(offsets[high + 1], dtype=np.uint64)
    for i in range(count):
        # The (n+1)-gram at i extends the n-gram at i by one multiply-add.
        h = units[i]
        for n in range(1, min(high, count - i) + 1):
            if n > 1:
                h = h * _U64(0x9E3779B97F4A7C15) + units[i + n - 1]
            if n >= low:
                out[offsets[n] + i] = h ^ salts[n - low]
    return out


@njit(cache=True, nogil=True)
def _distinct(hashes, log1p):
    """``mix64`` of the distinct unmixed hashes (in order of first occurrence) and their
    sublinear weights ``log1p(count)``, scaled to unit norm: the reference's
    ``np.unique`` of the mixed hashes + weights (``mix64`` is a bijection: the same
    classes, ~2.5x fewer mixes)."""
    n = hashes.size
    size = 2
    bits = 1
    while size < 2 * n:
        size *= 2
        bits += 1
    # Open addressing with the keys in the table itself (one memory access per probe);
    # a count of 0 marks an empty slot, so every 64-bit key is allowed.
    table = np.empty(size, dtype=np.uint64)
    counts = np.zeros(size, dtype=np.int32)
    first = np.empty(n, dtype=np.int64)  # slot of each distinct hash, in first-seen order
    m = 0
    for i in range(n):
        h = hashes[i]
        # Fibonacci hashing: the top bits of h * 2^64/phi spread the raw polynomial hashes.
        s = (h * _U64(0x9E3779B97F4A7C15)) >> _U64(64 - bits)
        while True:
            if counts[s] == 0:
                table[s] = h
                counts[s] = 1
                first[m] = s
                m += 1
                break
            if table[s] == h:
                counts[s] += 1
                break
            s = (s + _U64(1)) & _U64(size - 1)
    keys = np.empty(m, dtype=np.uint64)
    ordered = np.empty(m, dtype=np.int32)
    for i in range(m):
        keys[i] = _mix64(table[first[i]])
        ordered[i] = counts[first[i]]
    return keys, unit_weights(ordered, log1p)


@njit(cache=True, nogil=True)
def unit_weights(counts, log1p):
    """The sublinear weights ``log1p(count)``, scaled to unit norm (summed in order)."""
    weights = np.empty(counts.size)
    total = 0.0
    for i in range(counts.size):
        c = counts[i]
        w = log1p[c] if c < log1p.size else np.log1p(c)
        weights[i] = w
        total += w * w
    scale = 1.0 / np.sqrt(total)
    for i in range(counts.size):
        weights[i] *= scale
    return weights


@njit(cache=True, nogil=True)
def _add_family(hashes, n_buckets, projection, log1p, out):
    """Version 1: out += sum over distinct hashes of sign * weight * projection[bucket],
    the reference's ``weights @ projection[buckets]``."""
    if hashes.size == 0:
        return
    keys, weights = _distinct(hashes, log1p)
    project_dense(keys, weights, n_buckets, projection, out)


@njit(cache=True, nogil=True)
def project_dense(keys, weights, n_buckets, projection, out):
    """Version 1's projection of the distinct mixed hashes ``keys`` with their unit
    norm ``weights`` (``_distinct``'s result), added to ``out``."""
    dim = out.size
    # A power of two (the default) takes the remainder with a mask: the same bucket,
    # without a 64-bit division per n-gram.
    bucket_mask = _U64(n_buckets - 1) if (n_buckets & (n_buckets - 1)) == 0 else _U64(0)
    # Four partial sums: four independent chains of additions per coordinate.
    partial = np.zeros((4, dim))
    for i in range(keys.size):
        h = keys[i]
        w = -weights[i] if h & _U64(1) else weights[i]
        high = h >> _U64(32)
        row = projection[np.int64(high & bucket_mask if bucket_mask else high % _U64(n_buckets))]
        acc = partial[i & 3]
        for k in range(dim):
            acc[k] += w * row[k]
    for k in range(dim):
        out[k] += (partial[0, k] + partial[1, k]) + (partial[2, k] + partial[3, k])


@njit(cache=True, nogil=True)
def _add_family_sparse(hashes, nnz, log1p, out):
    """Version 2: each distinct hash adds ``sign * weight / sqrt(nnz)`` to ``nnz``
    coordinates of ``out`` (a sparse random projection: no matrix, no memory traffic).

    Entry j reads 32 bits: of ``h`` itself for j = 0, 1 (``h`` is a splitmix64 output
    already), of ``mix64(h + (j // 2) * 2^64/phi)`` for the next pairs; bit 0 is the
    sign and the multiply-shift ``(bits >> 1) * dim >> 31`` the coordinate."""
    if hashes.size == 0:
        return
    keys, weights = _distinct(hashes, log1p)
    dim = _U64(out.size)
    scale = 1.0 / np.sqrt(nnz)
    for i in range(keys.size):
        h = keys[i]
        w = weights[i] * scale
        word = h
        for j in range(nnz):
            if j > 1 and j % 2 == 0:
                word = _mix64(h + _U64(j // 2) * _U64(0x9E3779B97F4A7C15))
            bits = (word >> _U64(32 * (j % 2))) & _U64(0xFFFFFFFF)
            k = np.int64(((bits >> _U64(1)) * dim) >> _U64(31))
            if bits & _U64(1):
                out[k] -= w
            else:
                out[k] += w


@njit(cache=True, nogil=True, inline="always")
def _add(hashes, n_buckets, projection, nnz, out):
    if nnz:
        _add_family_sparse(hashes, nnz, _LOG1P, out)
    else:
        _add_family(hashes, n_buckets, projection, _LOG1P, out)


@njit(cache=True, nogil=True)
def featurize_one(raw, classes, projection, n_buckets, nnz, chars, char_salts, words,
                  word_salts, crc_table, out):
    """Write the unit vector of one (already lowercased) text into ``out``.

    ``raw``: the text's code points (uint32); ``chars`` / ``words``: (low, high) n-gram
    ranges, (0, 0) for none; ``nnz`` 0: version 1 (``projection``, ``n_buckets``), else
    version 2 with ``nnz`` entries per n-gram (``projection`` unused). Whitespace runs
    collapse to one space and the text is padded with a space on each side, as the
    reference's ``" ".join(text.split())`` and ``" " + text + " "``.
    """
    out[:] = 0.0
    codes = np.empty(raw.size + 2, dtype=np.uint64)
    codes[0] = 32
    n = 1
    gap = False
    for i in range(raw.size):
        cp = raw[i]
        if classes[cp] & _SPACE:
            gap = n > 1
        else:
            if gap:
                codes[n] = 32
                n += 1
                gap = False
            codes[n] = cp
            n += 1
    if n > 1:
        codes[n] = 32
        n += 1
        if chars[1] > 0:
            _add(_ngram_hashes(codes, n, chars[0], chars[1], char_salts),
                 n_buckets, projection, nnz, out)
        if words[1] > 0:
            word_crcs = np.empty(n, dtype=np.uint64)
            nw = 0
            i = 0
            while i < n:
                if classes[codes[i]] & _WORD:
                    j = i + 1
                    while j < n and classes[codes[j]] & _WORD:
                        j += 1
                    word_crcs[nw] = _crc32_utf8(codes, i, j, crc_table)
                    nw += 1
                    i = j
                else:
                    i += 1
            _add(_ngram_hashes(word_crcs, nw, words[0], words[1], word_salts),
                 n_buckets, projection, nnz, out)
    normalize(out)


@njit(cache=True, nogil=True)
def normalize(out):
    """Scale ``out`` to unit norm in place (left as it is when zero)."""
    total = 0.0
    for k in range(out.size):
        total += out[k] * out[k]
    if total > 0.0:
        scale = 1.0 / np.sqrt(total)
        for k in range(out.size):
            out[k] *= scale


# ------------------------------------------------------------ the one-pass kernel
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
def _insert(table, mask, s, first, m, key):
    """Count ``key`` in the open-addressing ``table`` ((size, 2): key, count; count 0
    marks an empty slot), probing from its home slot ``s``; a new key's slot is
    appended to ``first``. Returns the new number of distinct keys (unsigned: an
    unsigned index into ``first`` needs no negative-index check).

    A probe goes on while the slot holds another key: ``(slot key ^ key) & taken``
    with ``taken`` all ones for a used slot. Written as ``used and different``, LLVM
    compiles two branches, the first (is the slot used, i.e. is the key already
    counted) as unpredictable as the text: about half of all n-grams paid a
    mispredicted branch. Behind :func:`_opaque` the test is one branch, taken only on
    a collision (under 10% of probes at the table's load)."""
    c = table[s, 1]
    while _opaque((table[s, 0] ^ key) & (_U64(0) - _U64(c != 0))) != _U64(0):
        s = (s + _U64(1)) & mask
        c = table[s, 1]
    table[s, 0] = key
    table[s, 1] = c + _U64(1)
    first[m] = s
    return m + _U64(c == 0)


@njit(cache=True, nogil=True)
def _count_ngrams(units, count, low, high, salts):
    """The distinct salted polynomial hashes of the n-grams of ``units[:count]``, n in
    low..high, in order of first occurrence in the earlier kernel's order (n by n, left
    to right), and how often each occurs: :func:`_ngram_hashes` followed by
    the counting half of ``_distinct``, without the array of all the hashes. Returns
    the table and the slots of the distinct keys in that order.

    For each n, the n-grams' keys and home slots (Fibonacci hashing: the top bits of
    ``key * 2^64/phi``) are computed first, in a loop of independent multiplies that
    LLVM vectorizes; the inserts, one after the other, then only look them up (about
    22 instructions per n-gram instead of 33, counted in the machine code)."""
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
    m = _U64(0)
    h = units[:count].copy()  # h[i]: the n-gram at i, extended by one unit per n
    # The salted keys and home slots of one n's n-grams.
    keys = np.empty(count, dtype=np.uint64)
    slots = np.empty(count, dtype=np.uint64)
    shift = _U64(64 - bits)
    for n in range(1, min(high, count) + 1):
        last = count - n + 1
        if n > 1:
            for i in range(last):
                h[i] = h[i] * _PHI + units[i + n - 1]
        if n >= low:
            salt = salts[n - low]
            for i in range(last):
                k = h[i] ^ salt
                keys[i] = k
                slots[i] = (k * _PHI) >> shift
            for i in range(last):
                m = _insert(table, mask, slots[i], first, m, keys[i])
    return table, first[:m]


@njit(cache=True, nogil=True)
def _weights(table, first, log1p):
    """:func:`_distinct`'s second half, the same operations in the same
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
    """:func:`_add_family_sparse` after ``_distinct``, without a branch on
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
def _add_onepass(units, count, low, high, salts, n_buckets, projection, nnz, out):
    """One family's n-grams of ``units[:count]`` into ``out`` (nothing for no n-grams)."""
    if count - low + 1 <= 0:
        return
    table, first = _count_ngrams(units, count, low, high, salts)
    if nnz == 4:  # version 2's default
        _add_counted_sparse4(table, first, out)
        return
    mixed, weights = _weights(table, first, _LOG1P)
    if nnz:
        _add_sparse(mixed, weights, nnz, out)
    else:
        project_dense(mixed, weights, n_buckets, projection, out)


@njit(cache=True, nogil=True)
def _add_counted_sparse4(table, first, out):
    """:func:`_weights` then :func:`_add_sparse` with 4 entries per key, the same
    floating point operations in the same order (the same bits), in three loops:

    1. the counts' weights and the sum of their squares, in first-seen order: a chain
       of dependent additions, nothing else in the loop;
    2. per key, its 4 coordinates and signed weights: independent integer and
       floating point work that LLVM vectorizes (the mixes, the multiply-shifts, the
       signs and the scaling, 8 keys at a time);
    3. the additions to ``out``, key by key and entry by entry as before (the order
       of each coordinate's sum): loads, an addition and a store each.

    Fused into one loop (the earlier version), each key took ~60 instructions."""
    m = first.size
    keys = np.empty(m, dtype=np.uint64)
    weights = np.empty(m)
    total = 0.0
    for i in range(m):
        s = first[i]
        keys[i] = table[s, 0]
        c = table[s, 1]
        w = _LOG1P[c] if c < _LOG1P.size else np.log1p(c)
        weights[i] = w
        total += w * w
    scale = 1.0 / np.sqrt(total)
    factor = 1.0 / np.sqrt(4)  # _add_sparse's scale, nnz = 4
    dim = _U64(out.size)
    # int64, not a narrower type: with int32 or uint32 the kernel was ~30% slower.
    index = np.empty((4, m), dtype=np.int64)
    value = np.empty((4, m))
    for i in range(m):
        h = _mix64(keys[i])
        w = (weights[i] * scale) * factor
        h2 = _mix64(h + _PHI)
        b0 = h & _U64(0xFFFFFFFF)
        b1 = h >> _U64(32)
        b2 = h2 & _U64(0xFFFFFFFF)
        b3 = h2 >> _U64(32)
        index[0, i] = np.int64(((b0 >> _U64(1)) * dim) >> _U64(31))
        index[1, i] = np.int64(((b1 >> _U64(1)) * dim) >> _U64(31))
        index[2, i] = np.int64(((b2 >> _U64(1)) * dim) >> _U64(31))
        index[3, i] = np.int64(((b3 >> _U64(1)) * dim) >> _U64(31))
        # As _add_signed: the multiply-shift picks the coordinate, bit 0 the sign.
        value[0, i] = w * (1.0 - 2.0 * np.float64(b0 & _U64(1)))
        value[1, i] = w * (1.0 - 2.0 * np.float64(b1 & _U64(1)))
        value[2, i] = w * (1.0 - 2.0 * np.float64(b2 & _U64(1)))
        value[3, i] = w * (1.0 - 2.0 * np.float64(b3 & _U64(1)))
    for i in range(m):
        out[index[0, i]] += value[0, i]
        out[index[1, i]] += value[1, i]
        out[index[2, i]] += value[2, i]
        out[index[3, i]] += value[3, i]


@njit(cache=True, nogil=True, inline="always")
def _scan(raw, classes, crc_table):
    """One pass over a (lowercased) text's code points: ``codes`` (its characters with
    whitespace runs made one space, a space before; ``n`` of them) and ``word_crcs``
    (the CRC-32 of each word's UTF-8, ``nw`` of them), what both one-pass kernels hash.
    The caller adds the closing space when ``n > 1``."""
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
    return codes, n, word_crcs, nw


@njit(cache=True, nogil=True)
def featurize_onepass(raw, classes, projection, n_buckets, nnz, chars, char_salts,
                      words, word_salts, crc_table, out):
    """Write the unit vector of one (already lowercased) text into ``out``: the
    arguments and the result of :func:`featurize_one`, bit for bit."""
    out[:] = 0.0
    codes, n, word_crcs, nw = _scan(raw, classes, crc_table)
    if n > 1:
        codes[n] = 32
        n += 1
        if chars[1] > 0:
            _add_onepass(codes, n, chars[0], chars[1], char_salts, n_buckets, projection, nnz, out)
        if words[1] > 0:
            _add_onepass(word_crcs, nw, words[0], words[1], word_salts, n_buckets, projection,
                 nnz, out)
    normalize(out)


# ------------------------------------------------------------------- version 3
#: Version 3's weight increments: the k-th occurrence (k = c + 1) of an n-gram adds
#: ``log1p(c + 1) - log1p(c)``, so its weight sums to ``log1p(count)``, version 2's
#: sublinear weight, without a list of the distinct n-grams. A counter saturates at
#: 255 (its increment 0: the weight stops at log1p(255) = 5.5).
_V3_DELTA = np.log1p(np.arange(1, 257, dtype=np.float64)) - np.log1p(
    np.arange(0, 256, dtype=np.float64))
_V3_DELTA[255] = 0.0
#: Version 3's counter table has at least this many slots per n-gram (occurrence).
V3_SLOTS_PER_NGRAM = 4


#: Version 4's increments of the squared weight: the occurrence after ``c`` earlier ones
#: in its counter adds ``log1p(c + 1)^2 - log1p(c)^2`` to its family's sum of squared
#: weights, which sums to version 2's ``sum(log1p(count)^2)`` without a list of the
#: distinct n-grams (0 at 255, where the counter and the weight stop).
_V4_DELTA_SQUARED = np.log1p(np.arange(1, 257, dtype=np.float64)) ** 2 - np.log1p(
    np.arange(0, 256, dtype=np.float64)) ** 2
_V4_DELTA_SQUARED[255] = 0.0


@njit(cache=True, nogil=True, inline="always")
def _folded(bits, dim):
    """Version 4's coordinate of 32 hash ``bits`` in a ``2 * dim`` accumulator: version
    2's coordinate (the multiply-shift), plus ``dim`` for a negative sign (bit 0)."""
    return (((bits >> _U64(1)) * dim) >> _U64(31)) + (bits & _U64(1)) * dim


@njit(cache=True, nogil=True)
def _add_damped(units, count, low, high, salts, acc, nnz):
    """Versions 3 (``nnz`` 2) and 4 (``nnz`` 4), one family: every occurrence of an
    n-gram of ``units[:count]`` (n in low..high, n by n, left to right) adds
    ``delta = _V3_DELTA[c]`` to the coordinates its mixed hash picks, ``c`` the count so
    far of its slot in a keyless counter table (uint8, Fibonacci hashing of the unmixed
    key, at least ``V3_SLOTS_PER_NGRAM`` slots per n-gram): no keys stored, no probing,
    no list of distinct n-grams. Two n-grams in one slot share a count (their weights
    sum to log1p of their summed counts).

    Version 3: 2 coordinates, the low and the high 32 bits of ``mix64(key)`` (bit 0 the
    sign, the multiply-shift the coordinate), ``±delta`` into ``acc`` (``dim`` long);
    returns 0.0. Version 4: version 2's 4 coordinates and signs (those 2, then the two
    halves of ``mix64(mix64(key) + 2^64/phi)``), each occurrence's ``delta`` added to
    ``acc`` (``2 * dim`` long: the positive entries, then the negative ones, so no sign
    is loaded or multiplied; the 4 coordinates packed 16 bits each, one load); returns
    the family's sum of squared weights, version 2's normalizer, as the sum of the
    occurrences' ``_V4_DELTA_SQUARED[c]``."""
    total = 0
    for n in range(low, high + 1):
        total += max(count - n + 1, 0)
    if total == 0:
        return 0.0
    size = 1
    bits = 0
    while size < V3_SLOTS_PER_NGRAM * total:
        size *= 2
        bits += 1
    counters = np.zeros(size, dtype=np.uint8)
    shift = _U64(64 - bits)
    v4 = nnz == 4
    dim = _U64(acc.size // 2 if v4 else acc.size)
    h = units[:count].copy()  # h[i]: the n-gram at i, extended by one unit per n
    slots = np.empty(count, dtype=np.uint64)
    per3 = 0 if v4 else count  # version 3's arrays
    index0 = np.empty(per3, dtype=np.int64)
    index1 = np.empty(per3, dtype=np.int64)
    sign0 = np.empty(per3)
    sign1 = np.empty(per3)
    packed = np.empty(count if v4 else 0, dtype=np.uint64)  # version 4's coordinates
    squares = 0.0
    for n in range(1, min(high, count) + 1):
        last = count - n + 1
        if n > 1:
            for i in range(last):
                h[i] = h[i] * _PHI + units[i + n - 1]
        if n < low:
            continue
        salt = salts[n - low]
        if v4:
            # Independent work per n-gram (vectorized): slot, the 4 folded coordinates.
            for i in range(last):
                k = h[i] ^ salt
                slots[i] = (k * _PHI) >> shift
                m = _mix64(k)
                m2 = _mix64(m + _PHI)
                packed[i] = (_folded(m & _U64(0xFFFFFFFF), dim)
                             | (_folded(m >> _U64(32), dim) << _U64(16))
                             | (_folded(m2 & _U64(0xFFFFFFFF), dim) << _U64(32))
                             | (_folded(m2 >> _U64(32), dim) << _U64(48)))
            # In order: the counts, the squared weights' sum and the additions.
            for i in range(last):
                s = slots[i]
                c = counters[s]
                counters[s] = c + np.uint8(c != np.uint8(255))
                d = _V3_DELTA[c]
                squares += _V4_DELTA_SQUARED[c]
                p = packed[i]
                acc[np.int64(p & _U64(0xFFFF))] += d
                acc[np.int64((p >> _U64(16)) & _U64(0xFFFF))] += d
                acc[np.int64((p >> _U64(32)) & _U64(0xFFFF))] += d
                acc[np.int64(p >> _U64(48))] += d
            continue
        # Independent work per n-gram (vectorized): slot, coordinates, signs.
        for i in range(last):
            k = h[i] ^ salt
            slots[i] = (k * _PHI) >> shift
            m = _mix64(k)
            b0 = m & _U64(0xFFFFFFFF)
            b1 = m >> _U64(32)
            index0[i] = np.int64(((b0 >> _U64(1)) * dim) >> _U64(31))
            index1[i] = np.int64(((b1 >> _U64(1)) * dim) >> _U64(31))
            sign0[i] = 1.0 - 2.0 * np.float64(b0 & _U64(1))
            sign1[i] = 1.0 - 2.0 * np.float64(b1 & _U64(1))
        # In order: the counts and the additions.
        for i in range(last):
            s = slots[i]
            c = counters[s]
            counters[s] = c + np.uint8(c != np.uint8(255))
            d = _V3_DELTA[c]
            acc[index0[i]] += d * sign0[i]
            acc[index1[i]] += d * sign1[i]
    return squares


@njit(cache=True, nogil=True, inline="always")
def _add_unit(acc, out):
    """``out += acc / |acc|`` (nothing for a zero ``acc``)."""
    total = 0.0
    for k in range(acc.size):
        total += acc[k] * acc[k]
    if total > 0.0:
        scale = 1.0 / np.sqrt(total)
        for k in range(acc.size):
            out[k] += acc[k] * scale


@njit(cache=True, nogil=True)
def featurize_damped(raw, classes, projection, n_buckets, nnz, chars, char_salts, words,
                     word_salts, crc_table, out):
    """Write version 3's (``nnz`` 2) or version 4's (``nnz`` 4) unit vector of one
    (already lowercased) text into ``out``: the arguments of :func:`featurize_onepass`
    (``projection`` and ``n_buckets`` unused), the same scan (:func:`_scan`) and the same
    n-gram keys; each family by :func:`_add_damped` into its own vector, scaled to unit
    norm (version 3) or by 1/sqrt of its sum of squared weights (version 4, version 2's
    normalization), the two summed and scaled to unit norm."""
    out[:] = 0.0
    codes, n, word_crcs, nw = _scan(raw, classes, crc_table)
    if n > 1:
        codes[n] = 32
        n += 1
        v4 = nnz == 4
        acc = np.empty(2 * out.size if v4 else out.size)
        for family in range(2):
            if family == 0 and chars[1] <= 0 or family == 1 and words[1] <= 0:
                continue
            acc[:] = 0.0
            if family == 0:
                squares = _add_damped(codes, n, chars[0], chars[1], char_salts, acc, nnz)
            else:
                squares = _add_damped(word_crcs, nw, words[0], words[1], word_salts, acc,
                                      nnz)
            if v4:
                _add_folded(acc, squares, out)
            else:
                _add_unit(acc, out)
    normalize(out)


@njit(cache=True, nogil=True, inline="always")
def _add_folded(acc, squares, out):
    """Version 4: ``out += (positives - negatives) / sqrt(squares)`` (nothing for 0)."""
    if squares > 0.0:
        dim = out.size
        scale = 1.0 / np.sqrt(squares)
        for k in range(dim):
            out[k] += (acc[k] - acc[k + dim]) * scale
