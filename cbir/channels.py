"""Client channels to other services: message limits, keepalive, optional TLS, round-robin."""

from __future__ import annotations

import grpc

from cbir.defaults import MAX_MESSAGE_BYTES
from cbir.tls import ClientTLS


def channel_options(
    max_message_bytes: int = MAX_MESSAGE_BYTES, round_robin: bool = True
) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect quickly after a dependency restarts instead of backing off for minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    if round_robin:
        # With a dns:/// target resolving to several replicas (a headless Service), spread calls
        # over all of them instead of pinning one connection.
        options.append(("grpc.lb_policy_name", "round_robin"))
    return options


def open_channel(
    target: str,
    tls: ClientTLS | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    round_robin: bool = True,
) -> grpc.Channel:
    """A channel to ``target`` ("host:port" or "dns:///name:port"), TLS when ``tls`` is given."""
    options = channel_options(max_message_bytes, round_robin)
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, tls.credentials(), options=options)
