"""Server bootstrap shared by every service: flags, error mapping, metrics, health, reflection, TLS,
graceful shutdown.

A service's ``main`` parses flags, builds its servicers, and hands them to :func:`start_server`; then
:func:`serve_until_signalled` blocks until SIGTERM/SIGINT and stops the server gracefully.
"""

from __future__ import annotations

import argparse
import contextvars
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeAlias, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cbir import metrics
from cbir.config import env_flag
from cbir.defaults import MAX_MESSAGE_BYTES
from cbir.errors import CbirError, InvalidInput, status_of
from cbir.logs import configure_logging, request_id_var
from cbir.ports import DEFAULT_HOST, bind_problem, cannot_listen, describe, ensure_can_listen
from cbir.tls import ServerTLS, server_tls_from_flags

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"


# --------------------------------------------------------------------------- flags


def add_common_flags(
    parser: argparse.ArgumentParser, *, env_prefix: str, port: int, metrics_port: int
) -> None:
    """Flags every service has; each also reads ``<env_prefix>_<NAME>`` from the environment.

    The prefix is recorded in the parsed arguments, so an error about a flag can name its variable.
    """
    p = env_prefix
    parser.set_defaults(env_prefix=p)
    env_flag(
        parser,
        "--host",
        env=f"{p}_HOST",
        default=DEFAULT_HOST,
        help="Address to listen on (gRPC and metrics); 0.0.0.0 for every interface.",
    )
    env_flag(
        parser, "--port", env=f"{p}_PORT", default=port, type=int, help="gRPC port (0 picks a free one)."
    )
    env_flag(
        parser,
        "--metrics-port",
        env=f"{p}_METRICS_PORT",
        default=metrics_port,
        type=int,
        help="Prometheus /metrics port (0 picks a free one, -1 disables).",
    )
    env_flag(
        parser,
        "--max-message-bytes",
        env=f"{p}_MAX_MESSAGE_BYTES",
        default=MAX_MESSAGE_BYTES,
        type=int,
        help="Largest gRPC message accepted or sent.",
    )
    env_flag(
        parser,
        "--max-workers",
        env=f"{p}_MAX_WORKERS",
        default=16,
        type=int,
        help="Threads handling RPCs concurrently.",
    )
    env_flag(
        parser, "--tls-cert", env=f"{p}_TLS_CERT", default=None, help="Server certificate (PEM); enables TLS."
    )
    env_flag(parser, "--tls-key", env=f"{p}_TLS_KEY", default=None, help="Server private key (PEM).")
    env_flag(
        parser,
        "--tls-client-ca",
        env=f"{p}_TLS_CLIENT_CA",
        default=None,
        help="CA (PEM) that client certificates must chain to; makes client certificates mandatory.",
    )
    env_flag(
        parser,
        "--grace-seconds",
        env=f"{p}_GRACE_SECONDS",
        default=10.0,
        type=float,
        help="On SIGTERM, time given to in-flight RPCs before they are cancelled.",
    )
    env_flag(
        parser,
        "--port-file",
        env=f"{p}_PORT_FILE",
        default=None,
        help="Write the bound gRPC port here once serving (useful with --port 0).",
    )
    env_flag(
        parser,
        "--log-level",
        env=f"{p}_LOG_LEVEL",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="Log level.",
    )
    env_flag(
        parser,
        "--log-format",
        env=f"{p}_LOG_FORMAT",
        default="json",
        choices=["json", "text"],
        help="Log format.",
    )


@dataclass(frozen=True)
class ServerOptions:
    """Resolved common flags."""

    service_name: str
    host: str = DEFAULT_HOST
    port: int = 0
    metrics_port: int = -1
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_workers: int = 16
    tls: ServerTLS | None = None
    grace_seconds: float = 10.0
    port_file: str | None = None
    # Prefix of the services' environment variables (CBIR_INDEXER), named in errors about a flag.
    env_prefix: str = ""

    def flag(self, name: str) -> str:
        """How a user sets common flag ``name`` ("metrics-port"): "--metrics-port / CBIR_X_METRICS_PORT"."""
        variable = f" / {self.env_prefix}_{name.upper().replace('-', '_')}" if self.env_prefix else ""
        return f"--{name}{variable}"

    @classmethod
    def from_args(cls, service_name: str, args: argparse.Namespace) -> ServerOptions:
        configure_logging(service_name, args.log_level, args.log_format)
        return cls(
            service_name=service_name,
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            max_message_bytes=args.max_message_bytes,
            max_workers=args.max_workers,
            tls=server_tls_from_flags(args.tls_cert, args.tls_key, args.tls_client_ca),
            grace_seconds=args.grace_seconds,
            port_file=args.port_file,
            env_prefix=getattr(args, "env_prefix", ""),
        )


# --------------------------------------------------------------------------- interceptor


def request_id_from(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The caller's ``x-request-id`` (1-128 characters) or a new id; metadata keys are lower case."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    # 64 random bits: unique enough to find one request in the logs, and a quarter of uuid4's cost.
    return os.urandom(8).hex()


class _Undecodable:
    """What the request deserializer returns for bytes it cannot parse; the call then fails with ``error``."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidInput):
        self.error = error


def tolerant_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` returning an :class:`_Undecodable` (naming the message type) instead of raising.

    grpcio answers a raising request deserializer with INTERNAL ("Exception deserializing request!")
    and a logged traceback before any interceptor runs; with this one the undecodable message (bad
    UTF-8 in a string field, truncated or garbage bytes) reaches the interceptor, which raises it as
    the client mistake it is. The parse stays where grpcio does it: no extra work, no extra copy.
    """
    if deserializer is None:
        return None
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    name = descriptor.full_name if descriptor is not None else "request message"

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - whatever the parser raises, the bytes were bad
            reason = str(exc).rpartition("': ")[2] or type(exc).__name__
            return _Undecodable(InvalidInput(f"request is not a valid {name} ({len(raw)} bytes): {reason}"))

    return parse


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise request.error
    return request


def _decoded_each(requests: Iterable[Any]) -> Iterator[Any]:
    """A request stream checked message by message, as the servicer iterates it."""
    for request in requests:
        yield _decoded(request)


# A string: grpc.RpcMethodHandler is generic only in its stubs.
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# A method's behaviour: (request or request iterator, context) -> response or response iterator.
_Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _rebuilt(handler: _Handler, wrap: Callable[[_Behavior], _Behavior]) -> _Handler:
    """``handler`` with its behaviour replaced by ``wrap(behaviour)`` and a tolerant deserializer."""
    deserializer = tolerant_deserializer(handler.request_deserializer)
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), deserializer, serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), deserializer, serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), deserializer, serializer)
    # A handler has exactly one of the four behaviours: the last one is set when the others are not.
    stream_stream = cast(_Behavior, handler.stream_stream)
    return grpc.stream_stream_rpc_method_handler(wrap(stream_stream), deserializer, serializer)


class ServiceInterceptor(grpc.ServerInterceptor):
    """The one place where errors become statuses; also request decoding, ids, metrics and access logs.

    - An undecodable request message -> INVALID_ARGUMENT naming the message type (also for health
      and reflection, which are otherwise left unobserved: probes would drown the metrics).
    - :class:`CbirError` -> its status code and message.
    - ``grpc.RpcError`` from a dependency with a pass-through code (UNAVAILABLE, DEADLINE_EXCEEDED,
      ...) -> the same code, with the dependency's message.
    - anything else -> INTERNAL with a generic message and the request id; full traceback logged.

    gRPC asks the interceptor for every call's handler, so the wrapped handler of each method and its
    metric series are built once and reused: per call there is only the work of the call itself.
    """

    def __init__(self, service_name: str):
        self.service_name = service_name
        self._in_flight = metrics.GRPC_IN_FLIGHT.labels(service_name)
        # method -> (the handler gRPC found, our wrapper of it); a different handler (another
        # interceptor's per-call rejection, say) is wrapped afresh.
        self._wrapped: dict[str, tuple[_Handler, _Handler]] = {}
        self._requests: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._latency: dict[str, Any] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], _Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: _Handler, method: str) -> _Handler:
        short = method.rsplit("/", 1)[-1]
        request_streaming, response_streaming = handler.request_streaming, handler.response_streaming

        def decode(request: Any) -> Any:
            return _decoded_each(request) if request_streaming else _decoded(request)

        if method.startswith(("/grpc.health.", "/grpc.reflection.")):

            def unobserved(behavior: _Behavior) -> _Behavior:
                def run_unobserved(request: Any, context: grpc.ServicerContext) -> Any:
                    try:
                        answer = behavior(decode(request), context)
                    except InvalidInput as exc:
                        context.abort(exc.code, exc.message)
                    return self._abort_undecodable(answer, context) if response_streaming else answer

                return run_unobserved

            return _rebuilt(handler, unobserved)

        def observed(behavior: _Behavior) -> _Behavior:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                request_id = request_id_from(context.invocation_metadata())
                token = request_id_var.set(request_id)
                context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
                started = time.perf_counter()
                code = grpc.StatusCode.OK
                self._in_flight.inc()
                try:
                    if response_streaming:
                        # Server-streaming: errors surface while iterating, so wrap the generator.
                        return self._stream(
                            behavior(decode(request), context), context, short, started, token
                        )
                    return behavior(decode(request), context)
                except Exception as exc:  # noqa: BLE001 - this is the single mapping point
                    code = self._abort(exc, context, short)
                finally:
                    if not response_streaming:
                        self._finish(context, short, started, code, token)

            return run

        return _rebuilt(handler, observed)

    @staticmethod
    def _abort_undecodable(answers: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        # A bidirectional stream (reflection) reads its requests while producing answers.
        try:
            yield from answers
        except InvalidInput as exc:
            context.abort(exc.code, exc.message)

    def _stream(
        self,
        iterator: Iterator[Any],
        context: grpc.ServicerContext,
        short: str,
        started: float,
        token: contextvars.Token[str],
    ) -> Iterator[Any]:
        code = grpc.StatusCode.OK
        try:
            yield from iterator
        except Exception as exc:  # noqa: BLE001
            code = self._abort(exc, context, short)
        finally:
            self._finish(context, short, started, code, token)

    def _abort(self, exc: Exception, context: grpc.ServicerContext, short: str) -> grpc.StatusCode:
        status = status_of(exc)
        if status is not None:
            code, message = status
            ours = isinstance(exc, CbirError)
            log.log(
                logging.INFO if ours else logging.WARNING,
                "request failed" if ours else "dependency failed",
                extra={"method": short, "code": code.name, "error": message},
            )
            context.abort(code, message)
        # ServicerContext.code() exists since grpcio 1.38; types-grpcio does not declare it.
        if context.code() not in (None, grpc.StatusCode.OK):  # type: ignore[attr-defined]
            # The servicer already aborted the call itself: keep its status.
            raise exc
        log.exception("unhandled error", extra={"method": short})
        context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id_var.get()})")
        raise AssertionError("unreachable")  # abort always raises

    def _finish(
        self,
        context: grpc.ServicerContext,
        short: str,
        started: float,
        code: grpc.StatusCode,
        token: contextvars.Token[str],
    ) -> None:
        final = context.code() or code or grpc.StatusCode.OK  # type: ignore[attr-defined]  # as in _abort
        if isinstance(final, int):
            final = grpc.StatusCode.OK
        self._in_flight.dec()
        counter = self._requests.get((short, final))
        if counter is None:
            counter = self._requests[(short, final)] = metrics.GRPC_REQUESTS.labels(
                self.service_name, short, final.name
            )
        counter.inc()
        latency = self._latency.get(short)
        if latency is None:
            latency = self._latency[short] = metrics.GRPC_LATENCY.labels(self.service_name, short)
        latency.observe(time.perf_counter() - started)
        request_id_var.reset(token)


# --------------------------------------------------------------------------- server


@dataclass
class RunningServer:
    """A started gRPC server with its health servicer; ``set_serving`` flips every service's health."""

    server: grpc.Server
    port: int
    metrics_port: int
    health: health.HealthServicer
    service_names: tuple[str, ...]
    grace_seconds: float
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    _stopping: threading.Lock = field(default_factory=threading.Lock)
    _stopped: threading.Event = field(default_factory=threading.Event)

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """Stops accepting RPCs, lets in-flight ones finish within the grace period, runs cleanups."""
        if not self._stopping.acquire(blocking=False):
            self._stopped.wait()
            return
        try:
            self.set_serving(False)
            self.server.stop(self.grace_seconds if grace is None else grace).wait()
            for cleanup in reversed(self.on_stop):
                try:
                    cleanup()
                except Exception:  # noqa: BLE001 - one failing cleanup must not skip the others
                    log.exception("cleanup failed during shutdown")
        finally:
            self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


def start_server(
    options: ServerOptions,
    registrations: Iterable[tuple[Callable[[Any, grpc.Server], None], Any]],
    service_names: Iterable[str],
    *,
    serving: bool = True,
    extra_interceptors: Iterable[grpc.ServerInterceptor] = (),
) -> RunningServer:
    """Builds and starts a gRPC server with health, reflection, the error interceptor and metrics.

    ``registrations`` are ``(add_XServicer_to_server, servicer)`` pairs; ``service_names`` their full
    names (for health and reflection). Health starts SERVING unless ``serving`` is False (a service
    that loads something first flips it with ``set_serving`` when ready).
    """
    service_names = tuple(service_names)
    # Checked before anything starts, so a taken port is one line naming the flag to change, not
    # grpc's C-core log line and a traceback (add_insecure_port raises or returns 0 by version).
    ensure_can_listen(options.host, options.port, options.flag("port"))
    ensure_can_listen(options.host, options.metrics_port, options.flag("metrics-port"))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix=options.service_name),
        interceptors=[ServiceInterceptor(options.service_name), *extra_interceptors],
        options=[
            ("grpc.max_send_message_length", options.max_message_bytes),
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    for add, servicer in registrations:
        add(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{options.host}:{options.port}"
    try:
        if options.tls is not None:
            port = server.add_secure_port(address, options.tls.credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        # Taken between the check and the bind.
        reason = bind_problem(options.host, options.port) or "the port cannot be bound"
        raise cannot_listen(options.host, options.port, reason, options.flag("port"))
    try:
        metrics_port = metrics.start_metrics_server(options.metrics_port, options.host)
    except OSError as exc:
        server.stop(None)
        raise cannot_listen(
            options.host, options.metrics_port, describe(exc), options.flag("metrics-port")
        ) from None
    server.start()
    running = RunningServer(server, port, metrics_port, health_servicer, service_names, options.grace_seconds)
    running.set_serving(serving)
    if options.port_file:
        write_port_file(options.port_file, port)
    log.info(
        "server started",
        extra={
            "port": port,
            "metrics_port": metrics_port,
            "tls": options.tls is not None,
            "services": list(service_names),
        },
    )
    return running


def write_port_file(path: str, port: int) -> None:
    """Writes the bound port atomically (a reader never sees a half-written number)."""
    with open(path + ".tmp", "w") as fh:
        fh.write(str(port))
    os.replace(path + ".tmp", path)


def serve_until_signalled(running: RunningServer) -> int:
    """Blocks until SIGTERM or SIGINT, then stops gracefully. Returns the process exit code."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received, shutting down", extra={"signal": signal.Signals(signum).name})
        threading.Thread(target=running.stop, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    running.wait()
    log.info("server stopped")
    return 0
