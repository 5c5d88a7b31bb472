"""The similarity metric of an index generation: its hnswlib space, distances and scores, in one place.

Values equal ``cbir.v1.Metric`` (types.proto), so a ``Metric`` can be put in a proto field or stored as
an integer unchanged. Distances follow hnswlib's definitions (the exact reference search uses the same
ones); scores follow types.proto: higher is more similar.

| metric        | hnswlib space | distance        | score               |
| ------------- | ------------- | --------------- | ------------------- |
| COSINE        | ``cosine``    | 1 - cos(a, b)   | cos(a, b)           |
| L2            | ``l2``        | abs(a - b)^2    | 1 / (1 + distance)  |
| INNER_PRODUCT | ``ip``        | 1 - a.b         | a.b                 |
"""

from __future__ import annotations

import enum

import numpy as np

from cbir.errors import InvalidInput


class Metric(enum.IntEnum):
    COSINE = 1
    L2 = 2
    INNER_PRODUCT = 3

    @classmethod
    def from_value(cls, value: int) -> Metric:
        """The metric of a request field; InvalidInput for METRIC_UNSPECIFIED or an unknown value."""
        try:
            return cls(value)
        except ValueError:
            raise InvalidInput("metric must be METRIC_COSINE, METRIC_L2 or METRIC_INNER_PRODUCT") from None

    @classmethod
    def from_name(cls, name: str) -> Metric:
        """A name of :data:`METRIC_NAMES` (a command-line ``--metric``); InvalidInput otherwise."""
        try:
            return METRIC_NAMES[name]
        except KeyError:
            raise InvalidInput(f"--metric must be one of {sorted(METRIC_NAMES)}, got {name!r}") from None

    @property
    def cli_name(self) -> str:
        return self.name.lower()

    @property
    def space(self) -> str:
        """hnswlib's name of the space."""
        return _SPACES[self]

    @property
    def distances_can_be_negative(self) -> bool:
        # 1 - a.b is negative when a.b > 1; cosine and squared L2 distances are >= 0 in exact arithmetic.
        return self is Metric.INNER_PRODUCT

    def scores(self, distances: np.ndarray) -> np.ndarray:
        """hnswlib distances -> scores."""
        if self is Metric.L2:
            return 1.0 / (1.0 + distances)
        return 1.0 - distances

    def distances(
        self, queries: np.ndarray, vectors: np.ndarray, *, unit_vectors: bool = False
    ) -> np.ndarray:
        """Exact distances [queries, vectors] with hnswlib's definitions (vectors as stored).

        ``unit_vectors``: cosine's vectors are already normalised (ExactIndex does it once, instead
        of on every query, which cost an exact scan ten times its matrix product)."""
        q = np.asarray(queries, dtype=np.float32)
        distances: np.ndarray
        if self is Metric.COSINE:
            distances = 1.0 - normalise(q) @ (vectors if unit_vectors else normalise(vectors)).T
        elif self is Metric.INNER_PRODUCT:
            distances = 1.0 - q @ vectors.T
        else:
            sq = (q * q).sum(1)[:, None] + (vectors * vectors).sum(1)[None, :] - 2.0 * q @ vectors.T
            distances = np.maximum(sq, 0.0)
        return distances

    def self_score(self, vector: np.ndarray) -> float:
        """The score of a vector against itself: what an item scores when it finds itself."""
        if self is Metric.INNER_PRODUCT:
            return float(np.dot(vector, vector))
        return 1.0


_SPACES = {Metric.COSINE: "cosine", Metric.L2: "l2", Metric.INNER_PRODUCT: "ip"}
# The spellings --metric accepts: each metric's own name (cosine, l2, inner_product) and hnswlib's
# ("ip" is what earlier versions documented).
METRIC_NAMES = {**{m.space: m for m in Metric}, **{m.cli_name: m for m in Metric}}


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows left as they are)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)
