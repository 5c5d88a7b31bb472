"""cbir.metric: the spellings --metric accepts, and their one error."""

from __future__ import annotations

import pytest

from cbir.errors import InvalidInput
from cbir.metric import METRIC_NAMES, Metric


@pytest.mark.parametrize(
    "name, metric",
    [
        ("cosine", Metric.COSINE),
        ("l2", Metric.L2),
        ("inner_product", Metric.INNER_PRODUCT),
        ("ip", Metric.INNER_PRODUCT),  # hnswlib's name, documented by earlier versions
    ],
)
def test_from_name_accepts_the_cli_and_the_hnswlib_spelling(name: str, metric: Metric) -> None:
    assert Metric.from_name(name) is metric
    assert name in METRIC_NAMES


def test_every_metric_is_named_by_its_cli_name_and_its_space() -> None:
    for metric in Metric:
        assert Metric.from_name(metric.cli_name) is metric
        assert Metric.from_name(metric.space) is metric


def test_unknown_name_lists_the_accepted_ones() -> None:
    with pytest.raises(
        InvalidInput, match=r"--metric must be one of \['cosine', 'inner_product', 'ip', 'l2'\], got 'dot'"
    ):
        Metric.from_name("dot")
