"""Searching the gallery with one query, and the original result figure (query, AP curve, results)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.metrics import average_precision_at_k, top_k_indices


@dataclass(frozen=True)
class Hit:
    rank: int
    index: int
    distance: float


def search(query: np.ndarray, gallery: np.ndarray, r: int, metric: str = "euclidean") -> list[Hit]:
    """The ``r`` nearest gallery rows to ``query`` (one vector), nearest first, ties by gallery order.

    Distances are Euclidean (as the original) or cosine distances (1 - cosine similarity).
    """
    query = np.asarray(query, np.float64).reshape(1, -1)
    gallery = np.asarray(gallery, np.float64)
    if metric == "cosine":
        q = query / max(float(np.linalg.norm(query)), 1e-12)
        g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
        distances = 1.0 - (g @ q.T).ravel()
    else:
        distances = np.sqrt(np.maximum(np.sum((gallery - query) ** 2, axis=1), 0.0))
    order = top_k_indices(-distances[None, :], r)[0]
    return [Hit(rank=i + 1, index=int(j), distance=float(distances[j])) for i, j in enumerate(order)]


def ap_curve(relevant: Sequence[bool]) -> tuple[float, np.ndarray]:
    """(AP@R, AP@i for i = 1..R) as the original figure plots it."""
    relevant = list(relevant)
    curve = np.array([average_precision_at_k(relevant[: i + 1]) for i in range(len(relevant))])
    return average_precision_at_k(relevant), curve


def _load_thumbnail(path: str, size: int = 256) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            rgb.thumbnail((size, size))
            return np.asarray(rgb)
    except (OSError, UnidentifiedImageError):
        return None


def draw_results(
    output: Path,
    query_path: str,
    query_label: str | None,
    result_paths: Sequence[str],
    result_labels: Sequence[str],
    *,
    ap: float | None = None,
    aps: np.ndarray | None = None,
    columns: int = 4,
) -> Path:
    """The original figure: query ("Original Label"), the AP curve, then "R{i} Label: {label}" in a grid.

    As the original, the first row holds the query and the AP curve, and results start on the second.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    n = len(result_paths)
    rows = 1 + -(-n // columns)
    figure = plt.figure(figsize=(10, 10 * rows / max(columns, rows) + 1))

    def show(position: int, path: str, title: str) -> None:
        axis = figure.add_subplot(rows, columns, position)
        axis.set_title(title, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
        pixels = _load_thumbnail(path)
        if pixels is not None:
            axis.imshow(pixels)
        else:
            axis.text(0.5, 0.5, "unreadable", ha="center", va="center")

    show(1, query_path, "Original Label" if query_label is None else f"Original Label: {query_label}")
    if aps is not None and len(aps):
        axis = figure.add_subplot(rows, columns, 2)
        axis.set_title(f"Resumen ap: {ap:.2f}", fontsize=9)
        axis.plot(np.arange(1, len(aps) + 1), aps, "o-")
        axis.set_ylim(0, 1.05)
    for i, (path, label) in enumerate(zip(result_paths, result_labels, strict=True)):
        show(columns + 1 + i, path, f"R{i + 1} Label: {label}")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png")
    plt.close(figure)
    return output
