"""Exec probe for a gRPC service behind TLS: asks grpc.health.v1 and exits 0 only when SERVING.

Kubernetes' native grpc probe speaks plaintext only, so the tls component replaces it with
`cbir-health-check --port N --tls-ca ... [--tls-cert ... --tls-key ...]`, installed in the services
image from this file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbir-health-check", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="Address of the server (default: %(default)s).")
    parser.add_argument("--port", type=int, required=True, help="gRPC port of the server.")
    parser.add_argument("--service", default="", help="Health service name; empty = the whole server.")
    parser.add_argument("--timeout", type=float, default=3.0, help="Seconds to wait (default: %(default)s).")
    parser.add_argument("--tls-ca", help="CA (PEM) the server certificate chains to; enables TLS.")
    parser.add_argument("--tls-cert", help="Client certificate (PEM) for servers that require one.")
    parser.add_argument("--tls-key", help="Client private key (PEM).")
    parser.add_argument("--server-name", help="Name the server certificate is issued for, if not --host.")
    return parser


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def check(args: argparse.Namespace) -> tuple[bool, str]:
    """(healthy, what was seen)."""
    target = f"{args.host}:{args.port}"
    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(args.tls_ca),
            private_key=_read(args.tls_key),
            certificate_chain=_read(args.tls_cert),
        )
        options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            return False, f"{target}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("cbir-health-check: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        healthy, seen = check(args)
    except OSError as exc:
        print(f"cbir-health-check: cannot read a TLS file: {exc}", file=sys.stderr)
        return 2
    print(seen, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
