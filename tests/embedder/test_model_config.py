"""TF Serving config files: model_config_list with version policies and labels, batching, monitoring."""

from __future__ import annotations

import pytest

from cbir.errors import InvalidInput
from embedder.model_config import (
    BatchingParameters,
    ModelEntry,
    VersionPolicy,
    format_model_server_config,
    model_entries,
    parse_batching_parameters,
    parse_model_server_config,
    parse_monitoring_config,
)

CONFIG = """
model_config_list {
  config {
    name: "clothing"
    base_path: "/models/clothing"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 3 versions: 2 } }
    version_labels { key: "stable" value: 2 }
    version_labels { key: "canary" value: 3 }
  }
  config {
    name: "bags"
    base_path: "/models/bags"
    model_version_policy { latest { num_versions: 2 } }
  }
  config { name: "all" base_path: "/models/all" model_version_policy { all {} } }
  config { name: "plain" base_path: "/models/plain" }
}
"""


def test_parses_policies_and_labels_like_tf_serving():
    entries = {e.name: e for e in model_entries(parse_model_server_config(CONFIG))}
    assert entries["clothing"].policy == VersionPolicy("specific", versions=(2, 3))
    assert dict(entries["clothing"].labels) == {"stable": 2, "canary": 3}
    assert entries["bags"].policy == VersionPolicy("latest", num_versions=2)
    assert entries["all"].policy.kind == "all"
    assert entries["plain"].policy == VersionPolicy("latest", num_versions=1)
    assert entries["plain"].base_path == "/models/plain"


@pytest.mark.parametrize(
    ("policy", "available", "served"),
    [
        (VersionPolicy("latest", 1), [1, 2, 10], {10}),
        (VersionPolicy("latest", 2), [1, 2, 10], {2, 10}),
        (VersionPolicy("latest", 5), [3], {3}),
        (VersionPolicy("all"), [1, 4], {1, 4}),
        (VersionPolicy("specific", versions=(1, 7)), [1, 2], {1}),
        (VersionPolicy("latest", 1), [], set()),
    ],
)
def test_version_policy_selection(policy, available, served):
    assert policy.select(available) == served


def test_format_round_trips():
    entries = model_entries(parse_model_server_config(CONFIG))
    again = model_entries(parse_model_server_config(format_model_server_config(entries)))
    assert [(e.name, e.base_path, e.policy, dict(e.labels)) for e in again] == [
        (e.name, e.base_path, e.policy, dict(e.labels)) for e in entries
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model_config_list { config { name: 'a' base_path: '/a' } config { name: 'a' base_path: '/b' } }",
            "more than once",
        ),
        ("model_config_list { config { name: 'a' } }", "has no base_path"),
        ("model_config_list { config { base_path: '/a' } }", "has no name"),
        ("model_config_list { config { name: 'a' base_path: '/a' model_platform: 'pytorch' } }", "pytorch"),
        ("model_config_list { config { name: 'a' base_path: '/a' nonsense: 1 } }", "nonsense"),
        ("model_config_list { config { name: 'a' base_path: '/a' ", "1:"),
        (
            "model_config_list { config { name: 'a' base_path: '/a' "
            "model_version_policy { specific { } } } }",
            "lists no versions",
        ),
    ],
)
def test_rejects_bad_model_configs_with_a_clear_message(text, message):
    with pytest.raises(InvalidInput, match=message):
        parse_model_server_config(text)


def test_batching_parameters_with_tf_serving_syntax_and_defaults():
    params = parse_batching_parameters(
        """
        max_batch_size { value: 32 }
        batch_timeout_micros { value: 2000 }
        max_enqueued_batches { value: 100 }
        num_batch_threads { value: 4 }
        allowed_batch_sizes: 8
        allowed_batch_sizes: 16
        allowed_batch_sizes: 32
        pad_variable_length_inputs: false
        """
    )
    assert (params.max_batch_size, params.batch_timeout_micros, params.max_enqueued_batches) == (
        32,
        2000,
        100,
    )
    assert params.num_batch_threads == 4
    assert params.allowed_batch_sizes == (8, 16, 32)
    assert [params.padded_size(n) for n in (1, 8, 9, 32)] == [8, 8, 16, 32]
    defaults = parse_batching_parameters("")
    assert defaults.max_batch_size == 1000 and defaults.batch_timeout_micros == 0
    assert defaults.padded_size(7) == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "max_batch_size { value: 32 } allowed_batch_sizes: 8 allowed_batch_sizes: 16",
            "must equal max_batch_size",
        ),
        (
            "max_batch_size { value: 32 } allowed_batch_sizes: 16 allowed_batch_sizes: 8 allowed_batch_sizes: 32",
            "monotonically increasing",
        ),
        ("max_batch_size { value: 0 }", "max_batch_size must be positive"),
        ("max_batch_size: 32", "1:"),  # TF Serving wants the wrapper syntax
        ("max_batch_sise { value: 3 }", "max_batch_sise"),
    ],
)
def test_rejects_bad_batching_parameters(text, message):
    with pytest.raises(InvalidInput, match=message):
        parse_batching_parameters(text)


def test_large_batch_splitting_uses_the_execution_size():
    params = BatchingParameters(
        max_batch_size=64,
        enable_large_batch_splitting=True,
        max_execution_batch_size=16,
        allowed_batch_sizes=(8, 16),
    )
    assert params.execution_batch_size == 16


def test_monitoring_config():
    assert parse_monitoring_config("prometheus_config { enable: true }").prometheus_enabled
    custom = parse_monitoring_config('prometheus_config { enable: true, path: "/metrics" }')
    assert custom.prometheus_path == "/metrics"
    assert not parse_monitoring_config("").prometheus_enabled
    with pytest.raises(InvalidInput):
        parse_monitoring_config("prometheus_config { enable: maybe }")


def test_model_entry_defaults_to_latest_one():
    assert ModelEntry("m", "/m").policy.select([1, 2, 3]) == {3}
