"""TF Serving's REST API on ``--rest_api_port``: predict, model status, metadata, Prometheus metrics.

Same paths and JSON as tensorflow_model_server: ``POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict``
with ``{"instances": [{"b64": "..."}]}`` (row format) or ``{"inputs": ...}`` (columnar),
``GET /v1/models/<name>[/versions/<v>]`` for status, ``GET .../metadata``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import numpy as np
import prometheus_client
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2

from cbir.errors import HTTP_STATUS, CbirError, InvalidInput, Unimplemented
from cbir.ports import cannot_listen, describe
from embedder.model_config import MonitoringConfig
from embedder.model_manager import ModelManager, ModelRef

log = logging.getLogger(__name__)


_MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<metadata>/metadata)?"
    r"(?::(?P<verb>[a-z]+))?$"
)


def _decode_value(value: Any) -> Any:
    """JSON value -> Python value, turning {"b64": "..."} into bytes (recursively)."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, TypeError) as exc:
                raise InvalidInput(f"invalid base64 value: {exc}") from None
        return {k: _decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    if isinstance(value, str):
        return value.encode()
    return value


def _to_array(values: Any) -> np.ndarray:
    def has_bytes(v: Any) -> bool:
        return isinstance(v, bytes) or (isinstance(v, list) and any(has_bytes(x) for x in v))

    if has_bytes(values):
        array = (
            np.empty(len(values), dtype=object)
            if isinstance(values, list)
            else np.array(values, dtype=object)
        )
        if isinstance(values, list):
            array[:] = values
        return array
    return np.asarray(values)


def predict_inputs(body: dict[str, Any], input_names: list[str]) -> tuple[dict[str, np.ndarray], bool]:
    """The request's tensors and whether it used the row ("instances") format."""
    if ("instances" in body) == ("inputs" in body):
        raise InvalidInput(
            'JSON request must have exactly one of "instances" (row format) or "inputs" (columnar)'
        )
    if "instances" in body:
        instances = _decode_value(body["instances"])
        if not isinstance(instances, list):
            raise InvalidInput('"instances" must be a list')
        if all(isinstance(i, dict) and not isinstance(i, bytes) for i in instances) and instances:
            names = set(instances[0])
            if any(set(i) != names for i in instances):
                raise InvalidInput("every instance must name the same inputs")
            return {n: _to_array([i[n] for i in instances]) for n in names}, True
        if len(input_names) != 1:
            raise InvalidInput(f"instances must be objects naming the inputs {sorted(input_names)}")
        return {input_names[0]: _to_array(instances)}, True
    inputs = _decode_value(body["inputs"])
    if isinstance(inputs, dict):
        return {n: _to_array(v) for n, v in inputs.items()}, False
    if len(input_names) != 1:
        raise InvalidInput(f'"inputs" must be an object naming the inputs {sorted(input_names)}')
    return {input_names[0]: _to_array(inputs)}, False


def _json_ready(array: np.ndarray) -> Any:
    if array.dtype == object:
        return [{"b64": base64.b64encode(v).decode()} if isinstance(v, bytes) else v for v in array.tolist()]
    return array.tolist()


class RestApi:
    """Handles REST requests against the same manager as the gRPC servicers."""

    def __init__(self, manager: ModelManager, monitoring: MonitoringConfig):
        self.manager = manager
        self.monitoring = monitoring

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        if method == "GET" and self.monitoring.prometheus_enabled and path == self.monitoring.prometheus_path:
            return 200, prometheus_client.CONTENT_TYPE_LATEST, prometheus_client.generate_latest()
        try:
            return 200, "application/json", json.dumps(self._route(method, path, body)).encode()
        except CbirError as exc:
            return _error(HTTP_STATUS.get(exc.code, HTTPStatus.INTERNAL_SERVER_ERROR), exc.message)

    def _route(self, method: str, path: str, body: bytes) -> Any:
        match = _MODEL_PATH.match(path)
        if match is None:
            raise _HttpNotFound(f"Malformed request: {method} {path}")
        ref = ModelRef(match["name"], int(match["version"]) if match["version"] else None, match["label"])
        verb = match["verb"]
        if method == "GET" and not verb:
            return self._metadata(ref) if match["metadata"] else self._status(ref)
        if method == "POST" and verb == "predict" and not match["metadata"]:
            return self._predict(ref, body)
        if method == "POST" and verb in ("classify", "regress"):
            raise Unimplemented(f"{verb} is not implemented by this model server; use :predict")
        raise _HttpNotFound(f"Malformed request: {method} {path}")

    def _status(self, ref: ModelRef) -> Any:
        entries = self.manager.status(ref.name, ref.version, ref.label)
        return {
            "model_version_status": [
                {
                    "version": str(s.version),
                    "state": s.state.name,
                    "status": {"error_code": s.error_code.name, "error_message": s.error_message},
                }
                for s in entries
            ]
        }

    def _metadata(self, ref: ModelRef) -> Any:
        servable, version = self.manager.metadata(ref)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature_def)
        return {
            "model_spec": {"name": servable.name, "signature_name": "", "version": str(version)},
            "metadata": {
                "signature_def": json_format.MessageToDict(signature_map, preserving_proto_field_name=True)
            },
        }

    def _predict(self, ref: ModelRef, body: bytes) -> Any:
        try:
            request = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"JSON Parse error: {exc}") from None
        except RecursionError:
            raise InvalidInput("JSON Parse error: the document is nested too deeply") from None
        if not isinstance(request, dict):
            raise InvalidInput("JSON request must be an object")
        signature_name = request.get("signature_name", "") or ""
        servable, _ = self.manager.metadata(ref)
        signature = servable.signature(signature_name)
        inputs, row_format = predict_inputs(request, sorted(signature.inputs))
        for alias, array in inputs.items():
            spec = signature.inputs.get(alias)
            # JSON numbers have no width: take the signature's dtype, as TF Serving's REST API does.
            if spec is not None and spec.dtype != tf.string and array.dtype.kind in "iufb":
                inputs[alias] = array.astype(spec.dtype.as_numpy_dtype)
        result = self.manager.predict(ref, signature_name, inputs)
        outputs = result.outputs
        if not row_format:
            if len(outputs) == 1:
                return {"outputs": _json_ready(next(iter(outputs.values())))}
            return {"outputs": {k: _json_ready(v) for k, v in outputs.items()}}
        if len(outputs) == 1:
            return {"predictions": _json_ready(next(iter(outputs.values())))}
        rows = len(next(iter(outputs.values())))
        return {
            "predictions": [
                {k: _json_ready(v[i : i + 1])[0] for k, v in outputs.items()} for i in range(rows)
            ]
        }


class _HttpNotFound(CbirError):
    code = grpc.StatusCode.NOT_FOUND


def _error(status: int, message: str) -> tuple[int, str, bytes]:
    return int(status), "application/json", json.dumps({"error": message}).encode()


def _content_length(header: str | None) -> int | None:
    """The request body's length; None when the header is not a non-negative integer."""
    if header is None or not header.strip():
        return 0
    try:
        length = int(header)
    except ValueError:
        return None
    return length if length >= 0 else None


def start_rest_server(
    api: RestApi, host: str, port: int, *, flag: str = "--rest_api_port"
) -> tuple[ThreadingHTTPServer, int]:
    """Serves ``api`` on ``host:port`` in a background thread; returns the server and bound port.

    ``flag`` names the setting of the port in the error raised when it cannot be bound.
    """

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self, method: str) -> None:
            length = _content_length(self.headers.get("Content-Length"))
            if length is None:
                # The body's end is unknown, so the connection cannot be reused for another request.
                self.close_connection = True
                status, content_type, payload = _error(
                    HTTPStatus.BAD_REQUEST, "Content-Length must be a non-negative integer"
                )
                self._reply(status, content_type, payload)
                return
            body = self.rfile.read(length) if length else b""
            try:
                status, content_type, payload = api.handle(method, self.path.split("?", 1)[0], body)
            except Exception:  # noqa: BLE001 - one bad request must not kill the handler thread
                log.exception("REST request failed", extra={"path": self.path})
                status, content_type, payload = 500, "application/json", b'{"error": "internal error"}'
            self._reply(status, content_type, payload)

        def _reply(self, status: int, content_type: str, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("rest " + format % args)

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise cannot_listen(host, port, describe(exc), flag) from None
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="rest-api", daemon=True)
    thread.start()
    return server, server.server_address[1]
