"""Exact and near-duplicate removal for prompts, across sources and against history.

Red-team generators repeat themselves, and seed sets overlap (AdvBench and HarmBench share
behaviours). A prompt is dropped when its normalised text was seen before (exact), or when the
Jaccard similarity of its n-gram shingles with any kept or historical prompt reaches ``threshold``
(near). Shingles are hashed into a sparse binary matrix by scikit-learn's ``HashingVectorizer``,
so one sparse product gives every intersection: thousands of prompts take well under a second.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import HashingVectorizer

_NON_WORD = re.compile(r"[^\w\s]+")
_SPACE = re.compile(r"\s+")
_CHUNK = 2048  # rows per sparse product against history, bounds memory


def normalize(text: str) -> str:
    """Case-, accent-, punctuation- and whitespace-insensitive form of a text."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return _SPACE.sub(" ", _NON_WORD.sub(" ", text.lower())).strip()


class _HasText(Protocol):
    text: str


_Row = TypeVar("_Row", bound=_HasText)


@dataclass(frozen=True)
class Decision:
    keep: bool
    reason: Literal["kept", "exact", "near"]
    similarity: float = 0.0
    match: str | None = None  # the earlier text it duplicates


@dataclass
class Deduplicator:
    """Stateful filter: every kept text joins the history later texts are compared against."""

    threshold: float = 0.7
    ngram: int = 5
    unit: Literal["char", "word"] = "char"
    _exact: dict[str, str] = field(default_factory=dict, repr=False)
    _texts: list[str] = field(default_factory=list, repr=False)
    _matrix: sp.csr_matrix | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        analyzer = "char_wb" if self.unit == "char" else "word"
        self._vectorizer = HashingVectorizer(
            analyzer=analyzer,
            ngram_range=(self.ngram, self.ngram),
            preprocessor=normalize,
            token_pattern=r"(?u)\b\w+\b",
            n_features=2**22,
            binary=True,
            norm=None,
            alternate_sign=False,
            dtype=np.float32,
        )

    def __len__(self) -> int:
        return len(self._texts)

    def add_history(self, texts: Iterable[str]) -> None:
        """Remember texts (e.g. earlier iterations' prompts) without filtering them."""
        texts = list(texts)
        if not texts:
            return
        for text in texts:
            self._exact.setdefault(normalize(text), text)
        self._append(texts, self._shingles(texts))

    def filter(self, texts: Sequence[str]) -> list[Decision]:
        """Decide for each text, in order, whether it is new; kept texts join the history."""
        texts = list(texts)
        if not texts:
            return []
        batch = self._shingles(texts)
        best_sim, best_idx = self._best_match_in_history(batch)
        within = _jaccard(batch, batch).tolil()  # pairwise inside the batch
        decisions: list[Decision] = []
        kept: list[int] = []
        kept_set: set[int] = set()
        for i, text in enumerate(texts):
            key = normalize(text)
            if key in self._exact:
                decisions.append(Decision(False, "exact", 1.0, self._exact[key]))
                continue
            sim, match = best_sim[i], self._texts[best_idx[i]] if best_sim[i] > 0 else None
            for j, s in zip(within.rows[i], within.data[i], strict=True):
                if s > sim and j in kept_set:
                    sim, match = s, texts[j]
            if sim >= self.threshold:
                decisions.append(Decision(False, "near", float(sim), match))
                continue
            decisions.append(Decision(True, "kept", float(sim), match))
            kept.append(i)
            kept_set.add(i)
            self._exact[key] = text
        if kept:
            self._append([texts[i] for i in kept], batch[kept])
        return decisions

    def first_new(self, rows: Iterable[_Row], count: int) -> list[_Row]:
        """The first ``count`` of ``rows`` (anything with a ``text``) whose text is new, in
        order; each one kept joins the history, so the picks are new to each other too."""
        picked: list[_Row] = []
        for row in rows:
            if len(picked) == count:
                break
            if self.filter([row.text])[0].keep:
                picked.append(row)
        return picked

    # -- internals ----------------------------------------------------------------------------

    def _shingles(self, texts: list[str]) -> sp.csr_matrix:
        matrix = self._vectorizer.transform(texts).tocsr()
        # Texts shorter than one n-gram have no shingles: fall back to their unigrams.
        empty = np.flatnonzero(matrix.getnnz(axis=1) == 0)
        if len(empty):
            short = HashingVectorizer(
                analyzer="word", preprocessor=normalize, n_features=2**22, binary=True,
                norm=None, alternate_sign=False, dtype=np.float32,
            ).transform([texts[i] for i in empty]).tocsr()  # fmt: skip
            matrix = matrix.tolil()
            for row, i in enumerate(empty):
                matrix[i] = short[row]
            matrix = matrix.tocsr()
        return matrix

    def _best_match_in_history(self, batch: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        n = batch.shape[0]
        best_sim, best_idx = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.int64)
        if self._matrix is None:
            return best_sim, best_idx
        for start in range(0, self._matrix.shape[0], _CHUNK):
            sims = _jaccard(batch, self._matrix[start : start + _CHUNK]).toarray()
            idx = sims.argmax(axis=1)
            top = sims[np.arange(n), idx]
            better = top > best_sim
            best_sim[better], best_idx[better] = top[better], idx[better] + start
        return best_sim, best_idx

    def _append(self, texts: list[str], matrix: sp.csr_matrix) -> None:
        self._texts.extend(texts)
        self._matrix = matrix if self._matrix is None else sp.vstack([self._matrix, matrix]).tocsr()


def _jaccard(a: sp.csr_matrix, b: sp.csr_matrix) -> sp.csr_matrix:
    """Sparse Jaccard similarity of the binary rows of ``a`` and ``b`` (only overlapping pairs)."""
    inter = (a @ b.T).tocoo()
    size_a = np.asarray(a.sum(axis=1)).ravel()
    size_b = np.asarray(b.sum(axis=1)).ravel()
    union = size_a[inter.row] + size_b[inter.col] - inter.data
    data = np.divide(inter.data, union, out=np.zeros_like(inter.data), where=union > 0)
    return sp.csr_matrix((data, (inter.row, inter.col)), shape=inter.shape)


def deduplicate(
    texts: Sequence[str],
    *,
    history: Iterable[str] = (),
    threshold: float = 0.7,
    ngram: int = 5,
    unit: Literal["char", "word"] = "char",
) -> list[Decision]:
    """One-shot helper: decisions for ``texts`` against ``history`` and each other."""
    dedup = Deduplicator(threshold=threshold, ngram=ngram, unit=unit)
    dedup.add_history(history)
    return dedup.filter(texts)
