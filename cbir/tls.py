"""Optional TLS for servers and clients, from PEM files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from cbir.errors import InvalidInput


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {what} file {path!r}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class ServerTLS:
    """Server certificate and key; with ``client_ca`` set, clients must present a certificate."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = [(_read(self.key_file, "TLS key"), _read(self.cert_file, "TLS certificate"))]
        if self.client_ca_file:
            return grpc.ssl_server_credentials(
                pair, root_certificates=_read(self.client_ca_file, "client CA"), require_client_auth=True
            )
        return grpc.ssl_server_credentials(pair)


@dataclass(frozen=True)
class ClientTLS:
    """What a client needs to reach a TLS server: the CA to trust, and optionally its own pair."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Expected server name when it differs from the target host (e.g. connecting by IP).
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        root = _read(self.ca_file, "TLS CA") if self.ca_file else None
        key = _read(self.key_file, "TLS client key") if self.key_file else None
        cert = _read(self.cert_file, "TLS client certificate") if self.cert_file else None
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)


def server_tls_from_flags(cert: str | None, key: str | None, client_ca: str | None) -> ServerTLS | None:
    """TLS settings from the common flags; both cert and key or neither."""
    if not cert and not key:
        if client_ca:
            raise InvalidInput("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise InvalidInput("TLS needs both --tls-cert and --tls-key")
    return ServerTLS(cert, key, client_ca or None)
