"""Structured logs: one JSON object per line with the request id and extra fields."""

import json
import logging

from cbir.logs import JsonFormatter, request_id_var


def test_json_line_has_request_id_and_extras():
    record = logging.LogRecord("svc.core", logging.INFO, __file__, 1, "upserted %d", (3,), None)
    record.generation = "g1"
    token = request_id_var.set("abc123")
    try:
        line = JsonFormatter("indexer").format(record)
    finally:
        request_id_var.reset(token)
    entry = json.loads(line)
    assert entry["msg"] == "upserted 3"
    assert entry["service"] == "indexer"
    assert entry["request_id"] == "abc123"
    assert entry["generation"] == "g1"
    assert entry["level"] == "info"


def test_no_request_id_outside_requests():
    record = logging.LogRecord("svc", logging.WARNING, __file__, 1, "hello", (), None)
    assert "request_id" not in json.loads(JsonFormatter("gateway").format(record))
