"""Word and character n-gram features that sit beside the sentence embedding in the route head.

A sentence embedding says what a turn is about; it is weaker at *how* it is written. Whether
"tangled is so beautiful" is small talk or a review, or "Who wrote Dune ?" a question, shows in
function words, punctuation and spelling ("lol", "!!", "?", "I think"), which TF-IDF over word
and character n-grams (scikit-learn's ``TfidfVectorizer``) captures cheaply: transforming one
short turn takes well under a millisecond. The head is a logistic regression over
``[embedding * EMBEDDING_WEIGHT, word tf-idf, char tf-idf]``.

On disk the vocabularies are JSON lists (router.json) and the idf vectors tensors
(routes.safetensors): no pickles.
"""

from __future__ import annotations

import numpy as np

WORD = {"analyzer": "word", "ngram_range": (1, 2), "lowercase": True, "token_pattern": r"(?u)\b\w+\b|[?!]"}
CHAR = {"analyzer": "char_wb", "ngram_range": (2, 5), "lowercase": True}
COMMON = {"sublinear_tf": True, "dtype": np.float32}


def _vectorizer(kind: str, vocabulary=None, max_features: int | None = None):
    from sklearn.feature_extraction.text import TfidfVectorizer  # lazy: sklearn is heavy

    settings = WORD if kind == "word" else CHAR
    if vocabulary is not None:
        return TfidfVectorizer(**settings, **COMMON, vocabulary={t: i for i, t in enumerate(vocabulary)})
    return TfidfVectorizer(**settings, **COMMON, min_df=2, max_features=max_features)


class NgramFeatures:
    """Fitted word and char n-gram TF-IDF features (either may be absent).

    Args:
        vocabularies: ``{"word": [terms], "char": [terms]}``, term i is column i.
        idf: the matching idf vectors.
    """

    def __init__(self, vocabularies: dict[str, list[str]], idf: dict[str, np.ndarray]):
        self.vocabularies = {k: list(v) for k, v in vocabularies.items() if v}
        self._vectorizers = {}
        for kind, terms in self.vocabularies.items():
            vec = _vectorizer(kind, vocabulary=terms)
            vec.idf_ = np.asarray(idf[kind], dtype=np.float64)
            self._vectorizers[kind] = vec

    @classmethod
    def fit(cls, texts: list[str], max_word: int, max_char: int) -> NgramFeatures:
        """Learn vocabularies (terms in at least two texts, the most frequent first) and idf."""
        vocabularies, idf = {}, {}
        for kind, limit in (("word", max_word), ("char", max_char)):
            if limit <= 0:
                continue
            vec = _vectorizer(kind, max_features=limit).fit(texts)
            terms = sorted(vec.vocabulary_, key=vec.vocabulary_.get)
            vocabularies[kind], idf[kind] = terms, vec.idf_
        return cls(vocabularies, idf)

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.vocabularies.values())

    def transform(self, texts: list[str]):
        """Sparse (len(texts), size) matrix: word columns, then char columns."""
        from scipy.sparse import csr_matrix, hstack  # lazy: scipy is heavy

        parts = [self._vectorizers[k].transform(texts) for k in self.vocabularies]
        if not parts:
            return csr_matrix((len(texts), 0), dtype=np.float32)
        return hstack(parts, format="csr", dtype=np.float32)

    def to_config(self) -> dict:
        return {"vocabularies": self.vocabularies}

    def tensors(self) -> dict[str, np.ndarray]:
        return {f"ngram.idf.{k}": self._vectorizers[k].idf_.astype(np.float32) for k in self.vocabularies}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, np.ndarray]) -> NgramFeatures:
        vocabularies = config["vocabularies"]
        return cls(vocabularies, {k: tensors[f"ngram.idf.{k}"] for k in vocabularies})
