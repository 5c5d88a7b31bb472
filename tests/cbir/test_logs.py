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


def test_cli_logging_follows_stderr_swaps_without_duplicate_handlers():
    import contextlib
    import io

    from cbir.logs import CurrentStderrHandler, configure_cli_logging

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        configure_cli_logging("INFO")
        configure_cli_logging("WARNING")
        assert sum(isinstance(h, CurrentStderrHandler) for h in root.handlers) == 1
        first, second = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(first):
            logging.getLogger("t").warning("one")
        first.close()  # a closed old stream must not be written to again
        with contextlib.redirect_stderr(second):
            logging.getLogger("t").warning("two")
        assert "WARNING t: two" in second.getvalue()
    finally:
        root.handlers[:] = before
