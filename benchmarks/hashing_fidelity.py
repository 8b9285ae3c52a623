"""Fidelity to hashing version 2 of candidate versions, without routing data (issue 19).

Version 3 differs from version 2 in three ways at once: 2 coordinates per n-gram
occurrence (v2: 4), each family's projected vector scaled to unit norm (v2: the family's
``log1p(count)`` weights scaled to unit norm before the projection) and counts from a
keyless uint8 table with 4 slots per n-gram (v2: exact). Each candidate here undoes one
or more of them (numpy, the same n-grams, keys and increments as
``HashingFeaturizer._reference_v3``); the table is how each one's cosines follow v2's:
Spearman (rank) and Pearson correlation over random pairs of texts and the mean absolute
difference, beside v1 and the v3 kernel for scale.

Texts: ``featurize_speed.generated_texts`` (made-up topics, boilerplate repeats) and
:func:`made_up_prompts` (templates of coding, math, writing, translation and knowledge
requests, some with a pasted context or a repeated instruction). No development data.

Run::

    python -m benchmarks.hashing_fidelity    # writes results/hashing_fidelity.json
"""

from __future__ import annotations

import numpy as np

from bandit.featurize import _POLY, _U64, HashingFeaturizer, _l2_normalize_rows, _mix64
from benchmarks.common import print_table, write_results
from benchmarks.featurize_speed import generated_texts

_LOG1P = np.log1p(np.arange(0, 256, dtype=np.float64))
#: The k-th occurrence's increment of ``log1p`` and of ``log1p ** 2`` (saturating at 255).
_DELTA = np.r_[np.diff(_LOG1P), 0.0]
_DELTA_SQUARED = np.r_[np.diff(_LOG1P ** 2), 0.0]

#: name: (coordinates per occurrence, normalization, counter slots per n-gram or "exact")
CANDIDATES: dict[str, tuple[int, str, int | str]] = {
    "v3 (2 coords, unit family vector, 4 slots)": (2, "vector", 4),
    "v3 + 4 coords": (4, "vector", 4),
    "v3 + v2 normalization": (2, "weights", 4),
    "v3 + exact counts": (2, "vector", "exact"),
    "v3 + 16 slots": (2, "vector", 16),
    "4 coords + v2 normalization, 4 slots": (4, "weights", 4),
    "4 coords + v2 normalization, 16 slots": (4, "weights", 16),
    "4 coords + v2 normalization, exact": (4, "weights", "exact"),
    "4 coords + unit family vector, exact": (4, "vector", "exact"),
}

_TEMPLATES = {
    "code": ["how do i {v} a {o} in {l}", "write a {l} function that {v}s a {o}",
             "why does my {l} code raise {e} when i {v} the {o}",
             "explain the time complexity of {v}ing a {o} in {l}"],
    "math": ["solve for x: {a}x + {b} = {c}", "what is the integral of x^{a} from {b} to {c}",
             "a train travels {a} km in {b} hours. how far does it go in {c} hours?",
             "prove that the sum of the first {a} odd numbers is a square"],
    "write": ["write a {s} about {t}", "write a short {s} for my {r} about {t}",
              "compose a {s} in the style of {p} about {t}"],
    "translate": ["translate '{q}' into {g}", "how do you say {q} in {g}?",
                  "please translate this paragraph to {g}: {q}"],
    "knowledge": ["who was {p} and why is {p} famous?", "summarize the history of {t}",
                  "what are the main causes of {t}?", "compare {t} and {t2}"],
}
_SLOTS = {
    "v": ["sort", "reverse", "parse", "merge", "filter", "serialize", "hash"],
    "o": ["list", "dictionary", "string", "tree", "json file", "dataframe", "linked list"],
    "l": ["python", "rust", "javascript", "c++", "go", "sql"],
    "e": ["KeyError", "segfault", "TypeError", "a null pointer", "index out of range"],
    "a": [str(i) for i in range(2, 40)], "b": [str(i) for i in range(1, 20)],
    "c": [str(i) for i in range(3, 90)],
    "s": ["poem", "story", "haiku", "speech", "limerick", "cover letter"],
    "t": ["autumn", "the ocean", "the french revolution", "climate change",
          "machine learning", "the roman empire", "coffee"],
    "t2": ["the industrial revolution", "deep learning", "tea", "the cold war"],
    "r": ["grandmother", "boss", "class", "blog"],
    "p": ["shakespeare", "marie curie", "napoleon", "ada lovelace", "emily dickinson"],
    "q": ["where is the train station", "i would like a cup of coffee",
          "the weather is nice today", "thank you very much for your help"],
    "g": ["german", "french", "spanish", "japanese", "italian"],
}


def made_up_prompts(n: int = 600, seed: int = 2) -> list[str]:
    """Prompt-like requests from templates: 1-3 requests of one kind; 30% after a pasted
    context of 20-400 words, 15% followed by an instruction repeated 2-19 times, 20%
    upper-cased or with non-ASCII text."""
    rng = np.random.default_rng(seed)
    intros = ["Here is some context:", "Background:", "I have the following text:", "Context:"]
    filler = ("the report says that revenue grew in the third quarter while costs stayed "
              "flat and the team plans to hire more engineers next year").split()
    kinds = list(_TEMPLATES)
    out = []
    for _ in range(n):
        templates = _TEMPLATES[kinds[rng.integers(len(kinds))]]
        parts = [templates[rng.integers(len(templates))].format(
            **{k: v[rng.integers(len(v))] for k, v in _SLOTS.items()})
            for _ in range(int(rng.integers(1, 4)))]
        text = ". ".join(parts)
        u = rng.random()
        if u < 0.3:
            text = (intros[rng.integers(4)] + " "
                    + " ".join(rng.choice(filler, size=int(rng.integers(20, 400))))
                    + "\n\n" + text)
        elif u < 0.45:
            text += " " + " ".join(["Answer concisely and cite your sources."]
                                   * int(rng.integers(2, 20)))
        if rng.random() < 0.2:
            text = text.upper() if rng.random() < 0.3 else text + " 😀 ¿qué opinas?"
        out.append(text)
    return out


def _occurrence_ranks(groups: np.ndarray) -> np.ndarray:
    """How many earlier entries of ``groups`` equal each entry (at most 255)."""
    order = np.argsort(groups, kind="stable")
    ordered = groups[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    rank = np.empty(groups.size, dtype=np.int64)
    rank[order] = np.arange(groups.size) - np.repeat(starts, np.diff(np.r_[starts,
                                                                             ordered.size]))
    return np.minimum(rank, 255)


def candidate(f: HashingFeaturizer, texts: list[str], nnz: int, norm: str,
              slots: int | str) -> np.ndarray:
    """One candidate's unit vectors (``f``: its n-gram ranges, salts and ``dim``)."""
    out = np.zeros((len(texts), f.dim))
    for i, text in enumerate(texts):
        text = " ".join(text.lower().split())
        if not text:
            continue
        for keys in (f._char_hashes(text, mixed=False), f._word_hashes(text, mixed=False)):
            if keys.size == 0:
                continue
            if slots == "exact":
                rank = _occurrence_ranks(keys)
            else:
                bits = max(int(int(slots) * keys.size - 1).bit_length(), 0)
                rank = _occurrence_ranks((keys * _POLY) >> _U64(64 - bits))
            mixed = _mix64(keys)
            words = [mixed] if nnz == 2 else [mixed, _mix64(mixed + _POLY)]
            acc = np.zeros(f.dim)
            for word in words:  # v2's coordinates: the 32-bit halves of these words
                for half in (word & _U64(0xFFFFFFFF), word >> _U64(32)):
                    coords = ((half >> _U64(1)) * _U64(f.dim)) >> _U64(31)
                    sign = 1.0 - 2.0 * (half & _U64(1)).astype(np.float64)
                    np.add.at(acc, coords.astype(np.intp), sign * _DELTA[rank])
            scale = (np.linalg.norm(acc) if norm == "vector"
                     else np.sqrt(_DELTA_SQUARED[rank].sum()))
            if scale > 0:
                out[i] += acc / scale
    return _l2_normalize_rows(out)


def agreement(base: np.ndarray, other: np.ndarray, pairs: np.ndarray) -> dict[str, float]:
    """Spearman, Pearson and mean |difference| of the two sets' cosines over ``pairs``."""
    a = np.einsum("ij,ij->i", base[pairs[:, 0]], base[pairs[:, 1]])
    b = np.einsum("ij,ij->i", other[pairs[:, 0]], other[pairs[:, 1]])

    def ranks(v: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(v)).astype(np.float64)

    return {"spearman": float(np.corrcoef(ranks(a), ranks(b))[0, 1]),
            "pearson": float(np.corrcoef(a, b)[0, 1]),
            "mean_abs_difference": float(np.mean(np.abs(a - b)))}


def main() -> None:
    sets = {"generated": generated_texts(600), "made-up prompts": made_up_prompts(600)}
    f = HashingFeaturizer(version=2)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, texts in sets.items():
        pairs = np.random.default_rng(1).integers(0, len(texts), size=(5000, 2))
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        v2 = f.transform(texts)
        rows = {"v1 (for scale)": HashingFeaturizer(version=1).transform(texts),
                "v3 kernel": HashingFeaturizer(version=3).transform(texts)}
        rows.update({name: candidate(f, texts, *spec) for name, spec in CANDIDATES.items()})
        results[set_name] = {name: agreement(v2, x, pairs) for name, x in rows.items()}
    names = list(next(iter(results.values())))
    print_table("Cosines against hashing v2's (Spearman / Pearson / mean |diff|), "
                "dim 64, ~5,000 random pairs of 600 texts",
                ["candidate"] + list(results),
                [[name] + [f"{d[name]['spearman']:.3f} / {d[name]['pearson']:.3f} / "
                           f"{d[name]['mean_abs_difference']:.4f}" for d in results.values()]
                 for name in names])
    write_results("hashing_fidelity", {"candidates": {k: list(v) for k, v in
                                                      CANDIDATES.items()},
                                       "agreement_with_v2": results})


if __name__ == "__main__":
    main()
